"""The backend contract: where a backend runs, how it builds a variant, how a variant runs.

A backend is one module in ``kiln/backends/`` with one ``Backend`` subclass registered in
``kiln.backends.REGISTRY``; adding a backend is adding a module. Lifecycle of a variant:
``available()`` (may this host build/run it?) -> ``supports(precision)`` (and this precision?)
-> ``build(model, precision, out_dir)`` (write one artifact file, return its path) ->
``load(path)`` (a ``Runner``) -> ``runner(inputs)``.

Modules here import only numpy and Kiln: torch, onnxruntime and friends are imported inside the
methods that need them, so listing the backends stays cheap.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from kiln.spec import ModelSpec

# How a rewritten graph is checked against what it was made from. Extraction (eager against the
# program and the ONNX graph, kiln.optimize.extract) and fusion (fused against extracted,
# kiln.backends.ort_fusion) hold graphs to the same tolerances on the same sample shapes.
PARITY_RTOL = 1e-4
PARITY_ATOL = 1e-4
# (batch, dynamic-dim size) of the deterministic sample inputs: two of each, so a dimension
# baked in as a constant shows up
PARITY_SAMPLE_SHAPES: tuple[tuple[int, int], ...] = ((1, 5), (3, 17))


@dataclass(frozen=True)
class ExtractedModel:
    """A model after graph extraction: its torch.export program and its ONNX graph."""

    # .pt2 written by torch.export.save (dynamic batch, and sequence for text); None when the
    # source was ONNX, which has no torch program (torch backends then refuse or fall back).
    program: Path | None
    onnx: Path  # .onnx from the dynamo exporter, self-contained
    spec: ModelSpec  # the model's tensors (preprocessing excluded: model inputs only)


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""  # why not, in one line a user understands ("no CUDA device")


@dataclass
class BuildResult:
    path: Path  # the one artifact file the engine loads
    meta: dict[str, Any] = field(default_factory=dict)  # settings worth recording (threads...)


class Runner(Protocol):
    """A loaded variant: numpy arrays in (the spec's input order), numpy arrays out."""

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...


class Backend(ABC):
    """One way to build and run a model (onnxruntime, inductor, tensorrt, torch-eager)."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]  # what this backend can build on a capable host
    needs_gpu: ClassVar[bool] = False  # builds and runs on an NVIDIA GPU only

    @abstractmethod
    def available(self) -> Availability:
        """Whether this host can build and run this backend's variants."""

    def supports(self, precision: str) -> Availability:
        """Whether this host can build and run ``precision`` with this backend."""
        if precision not in self.precisions:
            return Availability(
                False, f"{self.name} builds {', '.join(self.precisions)}, not {precision}"
            )
        return self.available()

    def require(self, precision: str, model: ExtractedModel | None = None) -> None:
        """Raise VariantUnavailable unless this host can build ``precision`` (and, for
        backends that compile a torch program, unless ``model`` has one)."""
        from kiln.errors import VariantUnavailable

        verdict = self.supports(precision)
        if not verdict.ok:
            raise VariantUnavailable(verdict.reason)
        if model is not None and model.program is None:
            raise VariantUnavailable(
                f"{self.name} compiles a torch program, and this model was "
                "uploaded as ONNX: upload a .pt2 or kiln.yaml folder"
            )

    @abstractmethod
    def build(
        self, model: ExtractedModel, precision: str, out_dir: Path, **options: Any
    ) -> BuildResult:
        """Write the variant for ``precision`` into ``out_dir``."""

    @abstractmethod
    def load(
        self,
        path: Path,
        *,
        spec: ModelSpec,
        device: str = "cpu",
        threads: int | None = None,
        idle_spin: bool = True,
    ) -> Runner:
        """Load a built artifact for inference.

        ``threads`` is the intra-op thread count (default :func:`default_threads`): every backend
        uses the same count, so baseline and variants are timed alike. ``idle_spin``: whether the
        runtime's intra-op threads may keep spinning after a call returns (the lowest latency for
        back-to-back calls, as in the optimize stage's timing); an engine loads with False, so
        between requests the CPU goes to the processes it shares the host with (its own server,
        the gateway). Backends whose runtime has no such per-model switch ignore it.
        """


def default_threads() -> int:
    """Intra-op threads every backend uses unless told otherwise: the CPUs this process may
    run on (its affinity mask, which container CPU pinning narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
