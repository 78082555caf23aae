"""Graph fusion for ONNX Runtime (kiln.backends.ort_fusion) on the dynamo-exported MiniLM, and the
onnxruntime backend building every precision on the fused graph.

MiniLM (6 layers) must come out with its attention and GELUs fused into ORT's contrib ops (the
residual LayerNorms fused by onnxscript, then split again: ORT's CPU SkipLayerNormalization is
slower than Add + LayerNormalization), its key-padding attention bias turned into ``mask_index``
(so dynamic int8 makes the attention's packed QKV projection a ``QAttention``), fewer nodes, and
the unfused graph's outputs on real padded sentences. A tiny causal BERT checks that a bias
which is not key padding stays, and a fusion that breaks the outputs is refused and the backend
falls back to the extracted graph. No timing here: speed belongs in the benchmark.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kiln.backends import REGISTRY, ExtractedModel
from kiln.backends import ort_fusion as fusion
from kiln.backends.ort_fusion import optimize_graph
from kiln.intake.probe import probe_kiln, probe_pt2
from kiln.optimize.extract import extract
from kiln.optimize.validate import trim_padding
from kiln.spec import ModelSpec, TensorSpec

pytestmark = [
    pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode"),
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:# The axis name"),  # batch and seq shared by both inputs
]

LAYERS = 6  # all-MiniLM-L6-v2
FUSED = {"Attention": LAYERS, "BiasGelu": LAYERS}
ROWS = 64


def ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def run(path: Path, inputs: list[np.ndarray], batch: int = 16) -> np.ndarray:
    """The first output over every row, in batches with their padding trimmed (as validate)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    parts = []
    for start in range(0, len(inputs[0]), batch):
        rows = trim_padding([x[start : start + batch] for x in inputs], mask_index=1)
        parts.append(session.run(None, dict(zip(names, rows, strict=True)))[0])
    return np.concatenate(parts)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def sentences(examples: Path) -> list[np.ndarray]:
    """ROWS real sentences tokenized, sorted by length, padded to the longest (as optimize)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(examples / "minilm" / "model" / "tokenizer.json"))
    with np.load(examples / "minilm" / "sentences.npz", allow_pickle=False) as npz:
        texts = sorted((str(s) for s in npz["inputs"][:ROWS]), key=len)
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    assert mask.min() == 0  # padded rows: the mask matters
    return [ids, mask]


@pytest.fixture(scope="module")
def minilm(
    examples: Path, sentences: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> ExtractedModel:
    folder = examples / "minilm" / "model"
    return extract(
        source_format="kiln",
        source_path=folder,
        spec=probe_kiln(folder),
        out_dir=tmp_path_factory.mktemp("minilm-extract"),
        check_inputs=[x[:8] for x in sentences],
    ).model


@pytest.fixture(scope="module")
def fused(
    minilm: ExtractedModel, sentences: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("minilm-fused") / "fused.onnx"
    record = optimize_graph(
        minilm.onnx, out, spec=minilm.spec, check_inputs=[x[::8] for x in sentences]
    )
    return out, record


def test_minilm_fusion_statistics_show_attention_and_gelu_fused(
    minilm: ExtractedModel, fused: tuple[Path, dict[str, Any]]
) -> None:
    path, record = fused
    assert record["applied"], record.get("reason")
    assert record["fused_ops"] == FUSED
    assert {
        k: record["fusions"][k] for k in ("attention", "skip_layer_normalization", "bias_gelu")
    } == {"attention": LAYERS, "skip_layer_normalization": 2 * LAYERS, "bias_gelu": LAYERS}
    assert record["unfused"] == {"SkipLayerNormalization": 2 * LAYERS}  # fused, then split
    assert record["attention_mask"].startswith("mask_index from attention_mask")
    before, after = ops(minilm.onnx), ops(path)
    assert {k: after[k] for k in FUSED} == FUSED
    assert after["LayerNormalization"] == 2 * LAYERS + 1 and not after["SkipLayerNormalization"]
    # the decomposed pieces are gone: SDPA's softmax and NaN guard, erf-GELU, QKV concat
    assert not {"Softmax", "IsNaN", "Erf", "Transpose"} & set(after)
    assert (
        sum(after.values())
        == record["nodes"]["after"]
        < record["nodes"]["before"]
        == sum(before.values())
    )
    assert sum(after.values()) < sum(before.values()) / 3
    assert after["MatMul"] == 3 * LAYERS  # attention output, FFN in and out; QKV packed
    attention = [
        n
        for n in onnx.load(str(path), load_external_data=False).graph.node
        if n.op_type == "Attention"
    ]
    assert all(
        len(n.input) == 4
        and n.input[3]
        and not any(a.name == "qkv_hidden_sizes" for a in n.attribute)
        for n in attention
    )


def test_fused_graph_agrees_with_unfused_on_real_padded_sentences(
    minilm: ExtractedModel, fused: tuple[Path, dict[str, Any]], sentences: list[np.ndarray]
) -> None:
    path, record = fused
    parity = record["parity"]
    assert parity["cases"] == 5  # two samples, their padded twins... and the real rows
    assert parity["max_abs_diff"] <= parity["atol"]
    want, got = run(minilm.onnx, sentences), run(path, sentences)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # padding trimmed or not, the fused graph gives the same embeddings (mask_index works)
    np.testing.assert_allclose(run(path, sentences, batch=ROWS), want, rtol=1e-4, atol=1e-4)


def test_backend_builds_fp32_and_int8_on_the_fused_graph(
    minilm: ExtractedModel, sentences: list[np.ndarray], tmp_path: Path
) -> None:
    backend = REGISTRY["onnxruntime"]
    calibration = [x[::4] for x in sentences]
    fp32 = backend.build(minilm, "fp32", tmp_path / "fp32", calibration=calibration)
    assert fp32.meta["graph"] == "fused" and fp32.meta["fusion"]["applied"]
    assert fp32.meta["fusion"]["fused_ops"] == FUSED
    assert fp32.meta["session"]["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert sum(ops(fp32.path).values()) < sum(ops(minilm.onnx).values())
    np.testing.assert_allclose(
        run(fp32.path, sentences), run(minilm.onnx, sentences), rtol=1e-4, atol=1e-4
    )
    assert (minilm.onnx.parent / "model.fused.json").is_file()  # shared by the precisions

    int8 = backend.build(minilm, "int8-dynamic", tmp_path / "int8")
    assert int8.meta["graph"] == "fused"
    assert int8.meta["fusion"] == fp32.meta["fusion"]  # the recorded fusion, reused
    record = int8.meta["quantization"]
    assert record["quantized_nodes"] == {"Attention": LAYERS, "MatMul": 3 * LAYERS}
    assert record["quantization_ops"]["QAttention"] == LAYERS
    assert record["settings"]["per_channel"] is True
    cos = cosine(run(int8.path, sentences), run(minilm.onnx, sentences))
    assert cos.mean() >= 0.99 and cos.min() >= 0.97  # MiniLM's default gates


# ------------------------------------------------------------------------- tiny BERTs
def tiny_bert(folder: Path, *, causal: bool) -> ExtractedModel:
    """A 2-layer BERT encoder (mean-pooled, as MiniLM) exported by the dynamo exporter."""
    from kiln.examples import minilm

    torch.manual_seed(0)
    model = minilm(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        is_decoder=causal,
    )
    spec = ModelSpec(
        inputs=[
            TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1]),
            TensorSpec(name="attention_mask", datatype="INT64", shape=[-1, -1]),
        ],
        outputs=[TensorSpec(name="pooled", datatype="FP32", shape=[-1, 64])],
    )
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=2, max=64)
    args = (torch.randint(1, 100, (2, 8)), torch.ones(2, 8, dtype=torch.int64))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    torch.onnx.export(
        model,
        args,
        str(path),
        dynamo=True,
        verbose=False,
        input_names=["input_ids", "attention_mask"],
        output_names=["pooled"],
        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
    )
    return ExtractedModel(program=None, onnx=path, spec=spec)


def test_causal_attention_bias_is_not_taken_for_key_padding(tmp_path: Path) -> None:
    model = tiny_bert(tmp_path / "causal", causal=True)
    record = optimize_graph(model.onnx, tmp_path / "fused.onnx", spec=model.spec)
    assert record["applied"] and record["fused_ops"]["Attention"] == 2
    assert record["attention_mask"].startswith("attention_bias kept: bias")
    assert "not the key-padding mask" in record["attention_mask"]
    assert record["parity"]["max_abs_diff"] <= record["parity"]["atol"]


def test_fusion_that_disagrees_is_refused_and_the_backend_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_bert(tmp_path / "bidir", causal=False)
    real = fusion._fuse

    def broken(
        graph: onnx.ModelProto, settings: fusion.FusionSettings
    ) -> tuple[onnx.ModelProto, dict[str, int], dict[str, int]]:
        fused, counts, split = real(graph, settings)
        attention = next(n for n in fused.graph.node if n.op_type == "Attention")
        weight = next(i for i in fused.graph.initializer if i.name == attention.input[1])
        array = onnx.numpy_helper.to_array(weight) * 1.5
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        return fused, counts, split

    monkeypatch.setattr(fusion, "_fuse", broken)
    built = REGISTRY["onnxruntime"].build(model, "fp32", tmp_path / "fp32")
    assert built.meta["graph"] == "extracted"
    assert not built.meta["fusion"]["applied"]
    assert "disagrees with the unfused one" in built.meta["fusion"]["reason"]
    assert built.path.read_bytes() == model.onnx.read_bytes()
    assert not (model.onnx.parent / "model.fused.onnx").exists()


def test_a_cnn_keeps_its_extracted_graph(examples: Path, tmp_path: Path) -> None:
    source = examples / "digits" / "model.pt2"
    model = extract(
        source_format="pt2", source_path=source, spec=probe_pt2(source), out_dir=tmp_path / "digits"
    ).model
    built = REGISTRY["onnxruntime"].build(model, "fp32", tmp_path / "fp32")
    assert built.meta["graph"] == "extracted"
    assert "no transformer subgraph" in built.meta["fusion"]["reason"]
    assert built.path.read_bytes() == model.onnx.read_bytes()
