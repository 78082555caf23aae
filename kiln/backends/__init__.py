"""Inference backends: one module each, registered here by name.

``REGISTRY`` maps a backend's name to its instance; adding a backend is adding a module and a
line below. Importing this package is cheap: each backend imports torch, onnxruntime or
torch_tensorrt inside the methods that need them.

Owns: ``base`` (the ``Backend`` and ``Runner`` protocols, ``ExtractedModel``), one module per
backend (``torch_eager``, ``onnxruntime``, ``inductor``, ``tensorrt``), ``_torch`` (what the
torch-based ones share), and the ONNX graph tools the ONNX Runtime backend builds variants with:
``ort_quantize`` (int8 dynamic and static QDQ, the accuracy-aware retry) and ``ort_fusion``
(attention, layer-norm and GELU fusion into ORT's contrib ops).

May import: ``kiln.errors``, ``kiln.spec``, ``kiln.settings``, ``kiln.gate``. Imported by: ``kiln.optimize``,
``serving`` (engines load a backend's artifact), ``tasks``.
"""

from __future__ import annotations

from kiln.backends.base import (
    Availability,
    Backend,
    BuildResult,
    ExtractedModel,
    Runner,
    default_threads,
)
from kiln.backends.inductor import InductorBackend
from kiln.backends.onnxruntime import OnnxRuntimeBackend
from kiln.backends.tensorrt import TensorRTBackend
from kiln.backends.torch_eager import TorchEagerBackend
from kiln.errors import NotFound

#: name -> backend, the baseline first
REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (TorchEagerBackend(), OnnxRuntimeBackend(), InductorBackend(), TensorRTBackend())
}

BASELINE = "torch-eager"


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise NotFound(f"unknown backend {name!r}: use one of {', '.join(REGISTRY)}") from None


def available_backends() -> dict[str, Availability]:
    """Every registered backend with whether this host can run it, and why not."""
    return {name: backend.available() for name, backend in REGISTRY.items()}


__all__ = [
    "BASELINE",
    "REGISTRY",
    "Availability",
    "Backend",
    "BuildResult",
    "ExtractedModel",
    "Runner",
    "available_backends",
    "default_threads",
    "get_backend",
]
