"""Graph extraction and the CPU backends on the example models.

Digits (a .pt2) and MiniLM (a kiln.yaml folder) are extracted once per module; their program and
ONNX graph must keep a dynamic batch (and sequence length), agree with eager within the recorded
tolerances, and a model torch.export cannot capture must be rejected with a readable reason.
ONNX Runtime and AOTInductor fp32 variants of digits must agree with eager on the test split and
load from their one artifact file in a fresh process. AOTInductor compiles once (module fixture).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln.backends import REGISTRY, BuildResult
from kiln.errors import ExtractionError
from kiln.intake.probe import probe_kiln, probe_pt2
from kiln.optimize.extract import Extraction, extract
from kiln.spec import ModelSpec, TensorSpec

REPO = Path(__file__).resolve().parents[2]


def split(folder: Path, name: str) -> np.ndarray:
    with np.load(folder / f"{name}.npz", allow_pickle=False) as npz:
        return npz["inputs"]


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def digits(examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Extraction:
    source = examples / "digits" / "model.pt2"
    return extract(
        source_format="pt2",
        source_path=source,
        spec=probe_pt2(source),
        out_dir=tmp_path_factory.mktemp("digits-extract"),
        check_inputs=[split(examples / "digits", "val")],
    )


@pytest.fixture(scope="module")
def minilm(examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Extraction:
    from tokenizers import Tokenizer

    folder = examples / "minilm" / "model"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sentences = [str(s) for s in split(examples / "minilm", "sentences")[:8]]
    encoded = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    assert mask.min() == 0  # padded rows: the mask matters in the check
    return extract(
        source_format="kiln",
        source_path=folder,
        spec=probe_kiln(folder),
        out_dir=tmp_path_factory.mktemp("minilm-extract"),
        check_inputs=[ids, mask],
    )


def test_digits_extracts_with_parity_recorded(
    digits: Extraction,
) -> None:
    model, report = digits.model, digits.report
    assert model.program and model.program.name == "model.pt2" and model.onnx.name == "model.onnx"
    assert report["rtol"] > 0 and report["atol"] > 0 and report["opset"] >= 18
    for what in ("program", "onnx"):
        entry = report["parity"][what]
        assert entry["cases"] == 3  # two samples and the validation split
        assert 0 <= entry["max_abs_diff"] <= report["atol"] + report["rtol"] * 50
    assert set(report["timings_s"]) == {"export", "save", "onnx"}

    import onnx

    proto = onnx.load(str(model.onnx))
    assert proto.opset_import[0].version >= 18
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert not any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
    )  # one self-contained file
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]


@pytest.mark.parametrize("batch", [1, 3, 300])
def test_digits_program_and_onnx_take_any_batch(
    digits: Extraction, examples: Path, batch: int
) -> None:
    model = digits.model
    x = np.resize(split(examples / "digits", "test"), (batch, 1, 8, 8)).astype(np.float32)
    assert model.program is not None
    with torch.inference_mode():
        program_out = torch.export.load(str(model.program)).module()(torch.from_numpy(x)).numpy()
    onnx_out = ort_session(model.onnx).run(None, {"x": x})[0]
    assert program_out.shape == onnx_out.shape == (batch, 10)
    np.testing.assert_allclose(onnx_out, program_out, rtol=1e-4, atol=1e-4)


def test_minilm_extracts_with_dynamic_batch_and_sequence(
    minilm: Extraction,
) -> None:
    model, report = minilm.model, minilm.report
    assert report["parity"]["onnx"]["max_abs_diff"] < 1e-4
    assert report["parity"]["program"]["cases"] == 3
    assert model.program is not None
    program = torch.export.load(str(model.program)).module()
    session = ort_session(model.onnx)
    assert [i.shape for i in session.get_inputs()] == [["batch", "seq"], ["batch", "seq"]]
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        for seq in (5, 17):
            ids = rng.integers(1000, 8000, (batch, seq), dtype=np.int64)
            mask = np.ones((batch, seq), dtype=np.int64)
            mask[0, seq - 2 :] = 0
            with torch.inference_mode():
                want = program(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            assert want.shape == got.shape == (batch, 384)
            np.testing.assert_allclose(got, want, rtol=report["rtol"], atol=report["atol"])
            np.testing.assert_allclose(np.linalg.norm(want, axis=1), 1.0, rtol=1e-4)


BRANCHY = """
import torch


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return self.fc(x)
        return -x


def build():
    return Branchy()
"""


def test_data_dependent_control_flow_is_rejected_with_a_readable_reason(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "branchy"
    folder.mkdir()
    (folder / "kiln_test_branchy.py").write_text(BRANCHY)
    torch.manual_seed(0)
    save_file(
        {"fc.weight": torch.randn(4, 4), "fc.bias": torch.zeros(4)},
        str(folder / "model.safetensors"),
    )
    (folder / "kiln.yaml").write_text(
        textwrap.dedent("""\
        factory: kiln_test_branchy:build
        weights: model.safetensors
        inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
        """)
    )
    spec = ModelSpec(
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorSpec(name="output", datatype="FP32", shape=[-1, 4])],
    )
    out = tmp_path / "out"
    with pytest.raises(ExtractionError) as caught:
        extract(source_format="kiln", source_path=folder, spec=spec, out_dir=out)
    message = str(caught.value)
    assert caught.value.exit_code == 7 and caught.value.http_status == 422
    assert message.startswith("torch.export could not capture the model: ")
    assert "data-dependent" in message and "kiln_test_branchy.py" in message
    assert "if x.sum() > 0:" in message and "torch.where or torch.cond" in message
    assert "\n" not in message and len(message) <= 620
    assert "Traceback" not in message and str(tmp_path) not in message
    assert not list(out.iterdir())  # nothing written


def test_onnx_source_is_used_as_is(digits: Extraction, tmp_path: Path) -> None:
    source = digits.model
    extraction = extract(
        source_format="onnx", source_path=source.onnx, spec=source.spec, out_dir=tmp_path / "x"
    )
    model, report = extraction.model, extraction.report
    assert model.program is None
    assert model.onnx.read_bytes() == source.onnx.read_bytes()
    assert report["parity"]["onnx"]["cases"] == 2
    eager = REGISTRY["torch-eager"]
    built = eager.build(model, "fp32", tmp_path / "eager")
    assert built.path.suffix == ".onnx" and "onnxruntime fp32" in built.meta["fallback"]
    runner = eager.load(built.path, spec=model.spec)
    assert "fallback" in runner.meta  # type: ignore[attr-defined]
    assert runner([np.zeros((2, 1, 8, 8), np.float32)])[0].shape == (2, 10)


# ------------------------------------------------------------------ variants of digits
@pytest.fixture(scope="module")
def digits_variants(
    digits: Extraction, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, BuildResult]:
    model = digits.model
    root = tmp_path_factory.mktemp("digits-variants")
    return {
        name: REGISTRY[name].build(model, "fp32", root / name)
        for name in ("torch-eager", "onnxruntime", "inductor")
    }


@pytest.mark.parametrize("backend", ["onnxruntime", "inductor"])
def test_fp32_variant_agrees_with_eager_on_the_test_split(
    digits: Extraction,
    digits_variants: dict[str, BuildResult],
    examples: Path,
    backend: str,
) -> None:
    model = digits.model
    x = split(examples / "digits", "test")
    baseline = REGISTRY["torch-eager"].load(digits_variants["torch-eager"].path, spec=model.spec)
    variant = REGISTRY[backend].load(digits_variants[backend].path, spec=model.spec)
    want, got = baseline([x])[0], variant([x])[0]
    assert got.shape == want.shape == (len(x), 10)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.995
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    result = digits_variants[backend]
    assert list(result.path.parent.iterdir()) == [result.path]  # one artifact file
    if backend == "onnxruntime":
        assert result.meta["session"]["intra_op_num_threads"] >= 1
        assert variant.meta["providers"] == ["CPUExecutionProvider"]  # type: ignore[attr-defined]
    else:
        assert result.meta["device"] == "cpu" and result.meta["compile_s"] > 0


FRESH = """
import json, sys
from pathlib import Path
import numpy as np
from kiln.backends import get_backend
from kiln.spec import ModelSpec

backend, artifact, spec, data, out = sys.argv[1:]
runner = get_backend(backend).load(Path(artifact), spec=ModelSpec.model_validate_json(spec))
with np.load(data) as npz:
    np.save(out, runner([npz["inputs"][:16]])[0])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("kiln"))))
"""


@pytest.mark.parametrize("backend", ["onnxruntime", "inductor"])
def test_variant_loads_from_its_file_in_a_fresh_process(
    digits: Extraction,
    digits_variants: dict[str, BuildResult],
    examples: Path,
    backend: str,
    tmp_path: Path,
) -> None:
    model = digits.model
    data = examples / "digits" / "test.npz"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH,
            backend,
            str(digits_variants[backend].path),
            model.spec.model_dump_json(),
            str(data),
            str(tmp_path / "out.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kiln.optimize.extract" not in json.loads(proc.stdout.strip().splitlines()[-1])
    baseline = REGISTRY["torch-eager"].load(digits_variants["torch-eager"].path, spec=model.spec)
    want = baseline([split(examples / "digits", "test")[:16]])[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=1e-3, atol=1e-3)


def test_fixed_batch_program_is_reexported_with_a_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    torch.export.save(
        torch.export.export(module.eval(), (torch.randn(4, 4),)), str(tmp_path / "fixed.pt2")
    )
    spec = ModelSpec(
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorSpec(name="output", datatype="FP32", shape=[-1, 3])],
    )
    extraction = extract(
        source_format="pt2", source_path=tmp_path / "fixed.pt2", spec=spec, out_dir=tmp_path / "out"
    )
    model, report = extraction.model, extraction.report
    assert report["parity"]["onnx"]["cases"] == 2  # batches of 1 and 3, against the original
    assert model.program is not None
    x = torch.randn(7, 4)
    with torch.inference_mode():
        got = torch.export.load(str(model.program)).module()(x)
        torch.testing.assert_close(got, module(x))
    assert ort_session(model.onnx).run(None, {"input": x.numpy()})[0].shape == (7, 3)
