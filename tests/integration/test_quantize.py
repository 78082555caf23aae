"""kiln.backends.ort_quantize on the real example models with real ONNX Runtime.

The digits CNN and the breast-cancer MLP are exported to ONNX here (dynamo exporter, dynamic
batch), quantized, and judged on their test splits. The accuracy-aware loop runs on the digits
CNN with one outlier channel: conv1's channel k is scaled by 1000 and conv2's weights reading it
by 1/1000. ReLU is positively homogeneous, so the float model computes the same function, but the
activation between the two convolutions now has one channel 1000x wider than the rest, and
per-tensor int8 activations flatten every other channel to zero: the classic outlier failure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kiln.backends.ort_quantize import (
    METADATA_KEY,
    NO_CALIBRATION,
    accuracy_aware_quantize,
    node_sensitivity,
    quantize_dynamic,
    quantize_static,
)
from kiln.errors import InvalidInput

OUTLIER_SCALE = 1000.0

# A module unlifted from torch.export reports training mode and refuses .eval(); the program was
# captured in eval mode, so the exporter's warning does not apply.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode"),
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated"),
]


def _split(examples: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(examples / name / f"{split}.npz", allow_pickle=False) as npz:
        return npz["inputs"].astype(np.float32), npz["labels"]


def _export(module: torch.nn.Module, sample: torch.Tensor, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        module,
        (sample,),
        str(path),
        dynamo=True,
        input_names=["x"],
        output_names=["output"],
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    return path


def _load_module(pt2: Path) -> torch.nn.Module:
    # torch.export captured the model in eval mode (no dropout in the graph).
    return torch.export.load(str(pt2)).module()


def _accuracy(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def _evaluator(examples: Path, name: str) -> Callable[[Path], float]:
    x, y = _split(examples, name, "test")
    return lambda path: _accuracy(path, x, y)


def _producers(model: onnx.ModelProto) -> dict[str, str]:
    return {out: node.op_type for node in model.graph.node for out in node.output}


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def digits_onnx(examples: Path, onnx_dir: Path) -> Path:
    x, _ = _split(examples, "digits", "train")
    module = _load_module(examples / "digits" / "model.pt2")
    return _export(module, torch.from_numpy(x[:8]), onnx_dir / "digits.onnx")


@pytest.fixture(scope="module")
def breast_cancer_onnx(examples: Path, onnx_dir: Path) -> Path:
    x, _ = _split(examples, "breast_cancer", "train")
    module = _load_module(examples / "breast_cancer" / "model.pt2")
    return _export(module, torch.from_numpy(x[:8]), onnx_dir / "breast_cancer.onnx")


@pytest.fixture(scope="module")
def outlier_onnx(examples: Path, onnx_dir: Path) -> Path:
    """The digits CNN with one outlier channel between conv1 and conv2 (same float function)."""
    x, _ = _split(examples, "digits", "train")
    module = _load_module(examples / "digits" / "model.pt2")
    params = dict(module.named_parameters())
    w1, b1, w2 = params["features.0.weight"], params["features.0.bias"], params["features.2.weight"]
    with torch.no_grad():
        # The liveliest channel, so the outlier is present on every input.
        active = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), w1, b1, padding=1))
        k = int(active.mean(dim=(0, 2, 3)).argmax())
        w1[k] *= OUTLIER_SCALE
        b1[k] *= OUTLIER_SCALE
        w2[:, k] /= OUTLIER_SCALE
    return _export(module, torch.from_numpy(x[:8]), onnx_dir / "digits-outlier.onnx")


def test_static_qdq_on_digits_keeps_accuracy(
    examples: Path, digits_onnx: Path, tmp_path: Path
) -> None:
    x_train, _ = _split(examples, "digits", "train")
    evaluate = _evaluator(examples, "digits")
    out = tmp_path / "digits-int8-static.onnx"

    record = quantize_static(digits_onnx, out, calibration=[x_train])

    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert record["quantization_ops"] == {
        "DequantizeLinear": ops.count("DequantizeLinear"),
        "QuantizeLinear": ops.count("QuantizeLinear"),
    }
    producer = _producers(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 == record["quantized_nodes"]["Conv"]
    for conv in convs:  # activation and weight both come through DequantizeLinear
        assert producer.get(conv.input[0]) == "DequantizeLinear"
        assert producer.get(conv.input[1]) == "DequantizeLinear"
    settings = record["settings"]
    assert settings["format"] == "QDQ" and settings["per_channel"] is True
    assert settings["activation_type"] in ("QUInt8", "QInt8")
    assert record["preprocess"] == "applied"
    assert settings["calibration_samples"] == min(256, len(x_train))
    assert record["nodes_excluded"] == [] and record["seconds"] > 0
    assert METADATA_KEY in {p.key for p in model.metadata_props}

    fp32, int8 = evaluate(digits_onnx), evaluate(out)
    assert fp32 - int8 <= 0.01, f"static int8 {int8:.4f} vs fp32 {fp32:.4f}"


def test_dynamic_on_digits_leaves_convolutions_float(
    examples: Path, digits_onnx: Path, tmp_path: Path
) -> None:
    out = tmp_path / "digits-int8-dynamic.onnx"
    record = quantize_dynamic(digits_onnx, out)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert record["settings"]["op_types"] == ["MatMul", "Gemm"]
    assert ops.count("Conv") == 2 and "ConvInteger" not in ops
    assert ops.count("MatMulInteger") == 1 == record["quantized_nodes"]["Gemm"]


def test_dynamic_on_breast_cancer_quantizes_every_linear(
    examples: Path, breast_cancer_onnx: Path, tmp_path: Path
) -> None:
    x_val, _ = _split(examples, "breast_cancer", "val")
    evaluate = _evaluator(examples, "breast_cancer")
    out = tmp_path / "breast-cancer-int8-dynamic.onnx"
    float_ops = [n.op_type for n in onnx.load(str(breast_cancer_onnx)).graph.node]
    linears = float_ops.count("Gemm") + float_ops.count("MatMul")

    record = quantize_dynamic(breast_cancer_onnx, out, calibration=[x_val])

    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert linears == 3
    assert ops.count("MatMulInteger") == linears
    assert ops.count("DynamicQuantizeLinear") > 0
    assert "Gemm" not in ops and "MatMul" not in ops
    assert sum(record["quantized_nodes"].values()) == linears
    assert record["smoke_check"] == "ok" and record["settings"]["weight_type"] == "QInt8"

    fp32, int8 = evaluate(breast_cancer_onnx), evaluate(out)
    assert fp32 - int8 <= 0.02, f"dynamic int8 {int8:.4f} vs fp32 {fp32:.4f}"


def test_static_on_breast_cancer_quantizes_the_linears(
    examples: Path, breast_cancer_onnx: Path, tmp_path: Path
) -> None:
    x_train, _ = _split(examples, "breast_cancer", "train")
    evaluate = _evaluator(examples, "breast_cancer")
    out = tmp_path / "breast-cancer-int8-static.onnx"

    record = quantize_static(breast_cancer_onnx, out, calibration=[x_train])

    model = onnx.load(str(out))
    producer = _producers(model)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert record["settings"]["op_types"] == ["MatMul", "Gemm"]  # no Conv: linear ops only
    assert record["quantized_nodes"] == {"Gemm": len(gemms)} and len(gemms) == 3
    assert all(producer.get(g.input[1]) == "DequantizeLinear" for g in gemms)
    fp32, int8 = evaluate(breast_cancer_onnx), evaluate(out)
    assert fp32 - int8 <= 0.01, f"static int8 {int8:.4f} vs fp32 {fp32:.4f}"


def test_dynamic_excludes_named_nodes(breast_cancer_onnx: Path, tmp_path: Path) -> None:
    first = next(
        n.name for n in onnx.load(str(breast_cancer_onnx)).graph.node if n.op_type == "Gemm"
    )
    out = tmp_path / "partial.onnx"
    record = quantize_dynamic(breast_cancer_onnx, out, nodes_to_exclude=[first])
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulInteger") == 2 and first not in record["quantized_node_names"]
    assert record["nodes_excluded"] == [first] and record["nodes_not_found"] == []


@pytest.mark.parametrize("calibration", [None, []])
def test_static_without_calibration_is_refused(
    digits_onnx: Path, tmp_path: Path, calibration: list[np.ndarray] | None
) -> None:
    out = tmp_path / "never.onnx"
    with pytest.raises(InvalidInput) as info:
        quantize_static(digits_onnx, out, calibration=calibration)
    assert (
        str(info.value)
        == NO_CALIBRATION
        == (
            "static quantization needs calibration data: register a dataset with the model "
            "(kiln upload --dataset) or use dynamic quantization"
        )
    )
    with pytest.raises(InvalidInput, match="needs calibration data"):
        accuracy_aware_quantize(
            digits_onnx,
            out,
            calibration=calibration,
            evaluate=lambda p: 1.0,
            baseline_metric=1.0,
            max_drop=0.01,
        )
    assert not out.exists()


def test_corrupted_calibration_is_refused_with_the_reason(
    examples: Path, digits_onnx: Path, tmp_path: Path
) -> None:
    x_train, _ = _split(examples, "digits", "train")
    bad = x_train[:32].copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        quantize_static(digits_onnx, tmp_path / "bad.onnx", calibration=[bad])
    with pytest.raises(InvalidInput, match="one array per input"):
        quantize_static(digits_onnx, tmp_path / "bad.onnx", calibration=[bad, bad])


def test_accuracy_aware_keeps_the_sensitive_nodes_in_float(
    examples: Path, digits_onnx: Path, outlier_onnx: Path, tmp_path: Path
) -> None:
    x_train, _ = _split(examples, "digits", "train")
    evaluate = _evaluator(examples, "digits")
    baseline = evaluate(outlier_onnx)
    assert baseline == pytest.approx(evaluate(digits_onnx), abs=0.006)  # same float function
    max_drop = 0.01

    # The ranking, measured on its own: quantize everything, then ask which nodes hurt.
    plain = tmp_path / "plain-int8.onnx"
    quantize_static(outlier_onnx, plain, calibration=[x_train])
    assert baseline - evaluate(plain) > max_drop  # the outlier really breaks plain int8
    ranking = node_sensitivity(outlier_onnx, plain, [x_train], samples=64)
    ops = {n.name: n.op_type for n in onnx.load(str(plain)).graph.node}
    assert [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)
    assert {ops[name] for name, _ in ranking} <= {"Conv", "Gemm"}  # no Reshape, MaxPool
    assert {ops[name] for name, _ in ranking[:2]} == {"Conv"}  # the two ends of the outlier

    out = tmp_path / "digits-outlier-int8.onnx"
    result = accuracy_aware_quantize(
        outlier_onnx,
        out,
        calibration=[x_train],
        evaluate=evaluate,
        baseline_metric=baseline,
        max_drop=max_drop,
        budget=4,
    )

    first, last = result.attempts[0], result.attempts[-1]
    assert first.excluded == [] and not first.passed and first.drop > max_drop
    assert result.passed and last.passed and len(result.attempts) <= 4
    assert last.metric > first.metric
    # Exclusions grow along the ranking, one node per attempt (3 ranked nodes -> step 1).
    assert [a.excluded for a in result.attempts] == [
        [name for name, _ in result.sensitivity[:i]] for i in range(len(result.attempts))
    ]
    assert [name for name, _ in result.sensitivity] == [name for name, _ in ranking]
    assert result.nodes_excluded == last.excluded
    assert result.nodes_excluded == [name for name, _ in ranking[: len(result.nodes_excluded)]]

    # The written file is the passing variant: its metric is the evaluated one, its excluded
    # nodes read float weights, and the rest of the graph is still quantized.
    assert result.metric == evaluate(out)
    assert result.metric_drop == pytest.approx(baseline - result.metric)
    model = onnx.load(str(out))
    producer = _producers(model)
    floats = {i.name for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    for name in result.nodes_excluded:
        assert by_name[name].input[1] in floats and by_name[name].input[1] not in producer
    assert result.quantization["quantization_ops"].get("DequantizeLinear", 0) > 0
    assert result.quantization["nodes_excluded"] == result.nodes_excluded
    assert "kept in float" in result.summary()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch


def test_accuracy_aware_out_of_budget_writes_the_best_failing_variant(
    examples: Path, outlier_onnx: Path, tmp_path: Path
) -> None:
    x_train, _ = _split(examples, "digits", "train")
    evaluate = _evaluator(examples, "digits")
    baseline = evaluate(outlier_onnx)
    out = tmp_path / "one-try.onnx"

    result = accuracy_aware_quantize(
        outlier_onnx,
        out,
        calibration=[x_train],
        evaluate=evaluate,
        baseline_metric=baseline,
        max_drop=0.01,
        budget=1,
    )

    assert not result.passed and len(result.attempts) == 1 and result.sensitivity == []
    assert result.nodes_excluded == [] and result.metric == evaluate(out)
