"""The backend registry and what each backend says about this host, plus the torch helpers the
GPU backends rely on (cast to a reduced precision, dynamic dims read back), on tiny modules.

TensorRT runs only where CUDA and torch_tensorrt are present; elsewhere its tests are skipped
with the backend's own reason.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.backends import REGISTRY, available_backends, get_backend
from kiln.backends._torch import DimRange, cast_program, input_dims
from kiln.backends.base import ExtractedModel
from kiln.errors import NotFound, VariantUnavailable
from kiln.optimize.extract import condense_export_error
from kiln.spec import ModelSpec, TensorSpec

CUDA = torch.cuda.is_available()


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_program() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(
        TinyMLP().eval(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: batch}}
    )


def test_registry_lists_the_four_backends_baseline_first() -> None:
    assert list(REGISTRY) == ["torch-eager", "onnxruntime", "inductor", "tensorrt"]
    for name, backend in REGISTRY.items():
        assert get_backend(name) is backend and backend.name == name
        assert backend.precisions and "fp32" in backend.precisions
    assert REGISTRY["onnxruntime"].precisions == ("fp32", "int8-dynamic", "int8-static")
    with pytest.raises(NotFound, match=r"unknown backend 'tvm'.*torch-eager"):
        get_backend("tvm")


def test_importing_the_registry_stays_cheap() -> None:
    code = (
        "import sys, kiln.backends; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'torch_tensorrt') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


def test_availability_on_this_host() -> None:
    found = available_backends()
    assert set(found) == set(REGISTRY)
    assert found["torch-eager"].ok and found["onnxruntime"].ok
    for verdict in found.values():
        assert verdict.ok or (verdict.reason and "\n" not in verdict.reason)
    if not CUDA:
        assert not found["tensorrt"].ok
        assert found["tensorrt"].reason.startswith("no CUDA device")


def test_unknown_precision_is_refused_with_what_the_backend_builds() -> None:
    verdict = REGISTRY["onnxruntime"].supports("int4")
    assert not verdict.ok
    assert verdict.reason == "onnxruntime builds fp32, int8-dynamic, int8-static, not int4"


@pytest.mark.skipif(CUDA, reason="checks the CPU-only refusal")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_inductor_reduced_precision_needs_cuda(precision: str, tmp_path: Path) -> None:
    inductor = REGISTRY["inductor"]
    verdict = inductor.supports(precision)
    assert not verdict.ok and "needs a CUDA device" in verdict.reason
    model = ExtractedModel(
        program=tmp_path / "model.pt2",
        onnx=tmp_path / "model.onnx",
        spec=ModelSpec(inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])], outputs=[]),
    )
    with pytest.raises(VariantUnavailable, match="needs a CUDA device"):
        inductor.build(model, precision, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_torch_backends_refuse_an_onnx_only_model(tmp_path: Path) -> None:
    model = ExtractedModel(
        program=None,
        onnx=tmp_path / "model.onnx",
        spec=ModelSpec(inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])], outputs=[]),
    )
    with pytest.raises(VariantUnavailable, match="uploaded as ONNX"):
        REGISTRY["inductor"].build(model, "fp32", tmp_path / "out")


def test_int8_static_without_calibration_is_skipped_with_the_fix(tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"")
    model = ExtractedModel(
        program=None,
        onnx=onnx_path,
        spec=ModelSpec(inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])], outputs=[]),
    )
    with pytest.raises(VariantUnavailable, match=r"calibration data.*int8-dynamic"):
        REGISTRY["onnxruntime"].build(model, "int8-static", tmp_path / "out")


def test_cast_program_keeps_dynamic_batch_and_runs_in_bf16() -> None:
    program = tiny_program()
    assert input_dims(program) == [[DimRange(input_dims(program)[0][0].symbol, 1, 64), 4]]
    cast = cast_program(program, dtype=torch.bfloat16)
    [[batch, width]] = input_dims(cast)
    assert isinstance(batch, DimRange) and (batch.min, batch.max, width) == (1, 64, 4)
    x = torch.randn(5, 4)
    with torch.inference_mode():
        want = program.module()(x)
        got = cast.module()(x.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == (5, 3)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    # No float32 is left burnt into the graph to promote the result back.
    dtypes = {n.kwargs.get("dtype") for n in cast.graph.nodes if n.op == "call_function"}
    assert torch.float32 not in dtypes


def test_condensed_export_error_is_one_readable_paragraph() -> None:
    class Branchy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x * 2
            return x - 1

    batch = torch.export.Dim("batch", min=1, max=64)
    with pytest.raises(Exception) as caught:
        torch.export.export(Branchy(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: batch}})
    message = condense_export_error(caught.value)
    assert "\n" not in message and len(message) <= 600
    assert "data-dependent" in message
    assert "test_backends.py" in message and "if x.sum() > 0:" in message
    assert "torch.where or torch.cond" in message
    assert "/" not in message.split("(at ")[1].split(":")[0]  # no absolute path
    for noise in ("Traceback", "TORCH_LOGS", "docs.google", "draft_export"):
        assert noise not in message


# ----------------------------------------------------------------------------- tensorrt
@pytest.fixture
def trt_ready() -> None:
    verdict = REGISTRY["tensorrt"].available()
    if not verdict.ok:
        pytest.skip(f"tensorrt unavailable: {verdict.reason}")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_variant_matches_eager(trt_ready: None, precision: str, tmp_path: Path) -> None:
    program = tiny_program()
    torch.export.save(program, str(tmp_path / "model.pt2"))
    spec = ModelSpec(
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorSpec(name="output", datatype="FP32", shape=[-1, 3])],
    )
    model = ExtractedModel(program=tmp_path / "model.pt2", onnx=tmp_path / "model.onnx", spec=spec)
    backend = REGISTRY["tensorrt"]
    result = backend.build(model, precision, tmp_path / "trt", max_batch=16)
    assert [p.name for p in (tmp_path / "trt").iterdir()] == [result.path.name]
    runner = backend.load(result.path, spec=spec)
    x = np.random.default_rng(0).standard_normal((7, 4), dtype=np.float32)
    with torch.inference_mode():
        want = program.module()(torch.from_numpy(x)).numpy()
    tol = 1e-3 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(runner([x])[0], want, rtol=tol, atol=tol)


def test_tensorrt_fp8_needs_hopper(trt_ready: None) -> None:
    verdict = REGISTRY["tensorrt"].supports("fp8")
    if torch.cuda.get_device_capability() < (9, 0):
        assert not verdict.ok and "Hopper" in verdict.reason
