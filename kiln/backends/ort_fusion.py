"""Graph fusion for ONNX Runtime: transformer subgraphs of a dynamo-exported graph become ORT's
fused contrib ops (``Attention``, ``SkipLayerNormalization``, ``BiasGelu``...), checked against
the unfused graph before anything is built on them.

Why not ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")``: its pattern
matchers expect the TorchScript exporter's graphs. On the dynamo-exported MiniLM (ORT 1.32) it
fused BiasGelu only (SkipLayerNormalization too with ``opt_level=99``), never Attention: the
exported SDPA (scale on Q and K, a boolean key-padding mask turned into an additive bias through
GatherND/Where, a NaN guard after Softmax) matches none of its attention patterns, and its
symbolic shape inference fails on the graph. onnxscript's ORT fusions are written for the dynamo
exporter: ``optimize_for_ort`` rewrites SDPA -> MultiHeadAttention -> Attention (Q, K and V
projections packed into one weight), LayerNormalization after a residual Add ->
SkipLayerNormalization, Erf-GELU after a bias Add -> BiasGelu. SkipLayerNormalization is then
split again into Add + LayerNormalization (``FusionSettings.skip_layer_norm``): ORT 1.32's CPU
kernel for it is slower than the two ops it replaces.

Two further rewrites make the fused graph quantizable by ORT's dynamic quantizer, which turns an
``Attention`` into an int8 ``QAttention`` only when the node has no ``qkv_hidden_sizes`` and no
``attention_bias`` input (``QAttention`` has neither):

- the packed Q/K/V weight is constant-folded into one initializer (onnxscript's default folding
  limits leave its ``Concat`` to run at inference time), and ``qkv_hidden_sizes`` is dropped when
  the three sizes are equal, which is the attribute's default meaning;
- an ``attention_bias`` that is the key-padding mask of the model's 2-D ``attention_mask`` input
  (0 where the mask is set, a large negative number where it is not, the same for every query
  row and head) is replaced by ``mask_index``, the mask itself as int32. This is checked on the
  bias values, not assumed from names: the bias tensors are computed on padded sample inputs and
  compared with the mask; a causal or relative-position bias fails the check and stays.

Every result is checked against the unfused graph in ONNX Runtime (``assert_close``-style
tolerances, on deterministic samples with and without padding, and on the caller's real rows);
a fused graph that disagrees is not used and the record says why.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.backends.base import PARITY_ATOL, PARITY_RTOL, PARITY_SAMPLE_SHAPES
from kiln.spec import ModelSpec, numpy_of_datatype

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

METHOD = "onnxscript.rewriter.ort_fusions.optimize_for_ort + constant folding"
MS_DOMAIN = "com.microsoft"
#: ORT contrib ops that stand for a fused subgraph (what ``fused_ops`` counts).
FUSED_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "EmbedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "SimplifiedLayerNormalization",
        "BiasGelu",
        "FastGelu",
        "Gelu",
        "GemmFastGelu",
        "RotaryEmbedding",
        "FusedMatMul",
        "BiasSplitGelu",
        "BiasAdd",
        "GroupNorm",
    }
)
#: Fused ops that alone do not make a fused graph worth building on (a CNN or MLP keeps its
#: extracted graph: ORT's own session-time fusions already cover Conv/Gemm chains).
MINOR_OPS = frozenset({"FusedMatMul", "BiasAdd"})
MAX_FUSE_BYTES = 1_900_000_000  # one self-contained protobuf holds < 2 GiB
_MASK_NAMES = ("attention_mask",)


@dataclass(frozen=True)
class FusionSettings:
    """How ``optimize_graph`` checks the fused graph; each default written once, here."""

    rtol: float = PARITY_RTOL  # as extraction's eager-vs-ONNX check
    atol: float = PARITY_ATOL
    # (batch, dynamic-dim size) of the deterministic samples, as extraction's
    sample_shapes: tuple[tuple[int, int], ...] = PARITY_SAMPLE_SHAPES
    check_rows: int = 16  # rows of the caller's inputs checked as well
    fold_limit: int = 1 << 26  # elements a folded constant may have (packed QKV weights)
    mask_index: bool = True  # replace a key-padding attention_bias by mask_index
    # Keep SkipLayerNormalization fused. Off: on ORT 1.32's CPU provider its kernel is slower
    # than the Add + LayerNormalization it replaces (MiniLM, batch 32, AVX-512 EPYC, 2 threads:
    # int8 20.2 ms unfused vs 24.0 ms fused, fp32 51.8 vs 56.3 ms; also at batch 1), so the
    # written graph keeps them apart and Kiln's CPU sessions disable ORT's SkipLayerNormFusion
    # (kiln.backends.onnxruntime.CPU_DISABLED_OPTIMIZERS). CUDA sessions fuse them again.
    skip_layer_norm: bool = False


def optimize_graph(
    model_in: Path,
    model_out: Path,
    *,
    spec: ModelSpec,
    check_inputs: Sequence[np.ndarray] | None = None,
    settings: FusionSettings | None = None,
) -> dict[str, Any]:
    """Fuse ``model_in``'s transformer subgraphs for ONNX Runtime into ``model_out``.

    Args:
        model_in: the extracted (unfused) fp32 ONNX graph.
        model_out: where the fused graph is written (one self-contained file), only when fusion
            applied and the fused graph agrees with ``model_in``.
        spec: the model's tensors (input names, dtypes, which dims are dynamic).
        check_inputs: real rows (one array per input) checked besides the samples; text inputs
            may be padded to the dataset's longest row.
        settings: tolerances and folding limits.

    Returns:
        ``{"applied": bool, "method", "versions", "settings", "fusions": {rule: count} (what
        onnxscript fused), "unfused": {op: count} (split again), "fused_ops": {op: count} (in
        the written graph), "nodes": {"before", "after"}, "attention_mask": str, "parity":
        {...}, "seconds"}``; when ``applied`` is false, ``"reason"`` says why in one line and
        ``model_out`` is not written (build on ``model_in``).
    """
    settings = settings or FusionSettings()
    started = time.perf_counter()
    record: dict[str, Any] = {
        "applied": False,
        "method": METHOD,
        "versions": _versions(),
        "settings": asdict(settings),
    }
    model_in, model_out = Path(model_in), Path(model_out)
    if model_in.stat().st_size > MAX_FUSE_BYTES:
        return _skip(
            record, started, "the graph is over 1.9 GB: fusion writes one self-contained file"
        )
    try:
        original = _load(model_in)
        record["nodes"] = {"before": len(original.graph.node)}
        fused, record["fusions"], record["unfused"] = _fuse(original, settings)
    except Exception as exc:  # an onnxscript rewrite that fails leaves the graph as it was
        return _skip(record, started, f"onnxscript's ORT fusions failed: {_one_line(exc)}")
    record["fused_ops"] = _fused_ops(fused)
    if not set(record["fused_ops"]) - MINOR_OPS:
        return _skip(
            record,
            started,
            "no transformer subgraph matched onnxscript's ORT fusions "
            "(no Attention, LayerNorm or GELU pattern)",
        )
    model_out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fused, failure = _check(fused, model_in, model_out, spec, check_inputs, settings, record)
    except Exception as exc:  # e.g. a contrib op this onnxruntime build lacks
        return _skip(record, started, f"the fused graph could not be checked: {_one_line(exc)}")
    if failure:
        return _skip(record, started, f"the fused graph disagrees with the unfused one: {failure}")
    record["fused_ops"] = _fused_ops(fused)
    record["nodes"]["after"] = len(fused.graph.node)
    record["applied"] = True
    record["seconds"] = round(time.perf_counter() - started, 3)
    log.info(
        "fused %s: %s, %d -> %d nodes, %s",
        model_in.name,
        record["fused_ops"],
        record["nodes"]["before"],
        record["nodes"]["after"],
        record["attention_mask"],
    )
    return record


def _check(
    fused: onnx.ModelProto,
    model_in: Path,
    model_out: Path,
    spec: ModelSpec,
    check_inputs: Sequence[np.ndarray] | None,
    settings: FusionSettings,
    record: dict[str, Any],
) -> tuple[onnx.ModelProto, str]:
    """The mask rewrite, then parity with ``model_in``; ``model_out`` written when it holds.
    Returns the graph written (or last tried) and '' or the disagreement."""
    cases = _cases(spec, check_inputs, settings)
    attention = _attention_nodes(fused)
    note = "no Attention node"
    if attention:
        note = "attention_bias kept (mask_index rewrite off)"
        if settings.mask_index:
            note = _to_mask_index(fused, attention, spec, cases, model_out.parent)
    record["attention_mask"] = note
    _prune(fused)
    with tempfile.TemporaryDirectory(prefix=".fuse-", dir=model_out.parent) as tmp:
        candidate = Path(tmp) / "fused.onnx"
        _save(fused, candidate)
        failure = _parity(model_in, candidate, cases, settings, record)
        if failure and note.startswith("mask_index"):
            # the bias values were the key-padding mask, yet the outputs differ: undo it
            log.warning(
                "fused graph with mask_index disagrees (%s); retrying with attention_bias", failure
            )
            fused = _fuse(_load(model_in), settings)[0]
            _prune(fused)
            record["attention_mask"] = f"attention_bias kept: with mask_index, {failure}"
            _save(fused, candidate)
            failure = _parity(model_in, candidate, cases, settings, record)
        if not failure:
            os.replace(candidate, model_out)
    return fused, failure


# ------------------------------------------------------------------------------ fusion
def _fuse(
    model: onnx.ModelProto, settings: FusionSettings
) -> tuple[onnx.ModelProto, dict[str, int], dict[str, int]]:
    """onnxscript's ORT fusions, then constant folding with limits that fit packed weights,
    ``qkv_hidden_sizes`` dropped where equal, and SkipLayerNormalization split again unless
    ``settings.skip_layer_norm``. Returns the graph, onnxscript's fusion counts and what was
    split again."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    graph = ir.from_proto(model)
    graph, counts = optimize_for_ort(graph)
    onnxscript.optimizer.optimize(
        graph, input_size_limit=settings.fold_limit, output_size_limit=settings.fold_limit
    )
    fused = ir.to_proto(graph)
    _drop_equal_qkv_sizes(_attention_nodes(fused))
    opset = next((o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")), 0)
    split = {} if settings.skip_layer_norm or opset < 17 else _unfuse_skip_layer_norm(fused)
    return fused, {k: int(v) for k, v in counts.items() if v}, split


def _fused_ops(model: onnx.ModelProto) -> dict[str, int]:
    return dict(
        sorted(
            Counter(
                n.op_type
                for n in model.graph.node
                if n.domain == MS_DOMAIN and n.op_type in FUSED_OPS
            ).items()
        )
    )


def _attention_nodes(model: onnx.ModelProto) -> list[Any]:
    return [n for n in model.graph.node if n.domain == MS_DOMAIN and n.op_type == "Attention"]


def _drop_equal_qkv_sizes(nodes: list[Any]) -> None:
    """``qkv_hidden_sizes`` equal for Q, K and V is the attribute's default: drop it (ORT's
    quantizer leaves an Attention that has it in float)."""
    from onnx import helper

    for node in nodes:
        for attr in list(node.attribute):
            if attr.name == "qkv_hidden_sizes" and len(set(helper.get_attribute_value(attr))) == 1:
                node.attribute.remove(attr)


def _unfuse_skip_layer_norm(model: onnx.ModelProto) -> dict[str, int]:
    """Each SkipLayerNormalization back to Add (bias), Add (skip) and LayerNormalization (see
    ``FusionSettings.skip_layer_norm``); returns how many were split."""
    from onnx import helper

    nodes: list[Any] = []
    count = 0
    for node in model.graph.node:
        if node.op_type != "SkipLayerNormalization" or node.domain != MS_DOMAIN:
            nodes.append(node)
            continue
        count += 1
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        x, skip, gamma = node.input[:3]
        beta, bias = _input(node, 3), _input(node, 4)
        base = node.name or node.output[0]
        if bias:
            nodes.append(
                helper.make_node("Add", [x, bias], [f"{base}_biased"], name=f"{base}_bias")
            )
            x = f"{base}_biased"
        total = _output(node, 3) or f"{base}_sum"  # input + skip + bias, when it is used
        nodes.append(helper.make_node("Add", [x, skip], [total], name=f"{base}_skip"))
        outputs = [node.output[0], _output(node, 1), _output(node, 2)]
        while outputs and not outputs[-1]:
            outputs.pop()
        nodes.append(
            helper.make_node(
                "LayerNormalization",
                [total, gamma, *([beta] if beta else [])],
                outputs,
                name=f"{base}_layernorm",
                axis=-1,
                epsilon=epsilon,
            )
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return {"SkipLayerNormalization": count} if count else {}


def _output(node: Any, index: int) -> str:
    return node.output[index] if len(node.output) > index else ""


def _to_mask_index(
    model: onnx.ModelProto,
    nodes: list[Any],
    spec: ModelSpec,
    cases: list[dict[str, np.ndarray]],
    scratch: Path,
) -> str:
    """Replace each Attention's key-padding ``attention_bias`` by ``mask_index`` (the 2-D mask
    as int32); returns the note for the record. The bias values are checked first."""
    from onnx import TensorProto, helper

    mask = next(
        (
            t
            for t in spec.inputs
            if t.name in _MASK_NAMES
            and len(t.shape) == 2
            and numpy_of_datatype(t.datatype).kind in "iub"
        ),
        None,
    )
    if mask is None:
        return "attention_bias kept: the model has no 2-D integer attention_mask input"
    candidates = [
        n
        for n in nodes
        if _input(n, 5)
        and not _input(n, 3)
        and not _input(n, 4)
        and not any(a.name == "unidirectional" and a.i for a in n.attribute)
    ]
    if len(candidates) != len(nodes):
        return "attention_bias kept: an Attention node has a past state, a mask or is causal"
    biases = sorted({n.input[5] for n in candidates})
    padded = [c for c in cases if not c[mask.name].astype(bool).all()]
    if not padded:
        return "attention_bias kept: no padded sample to check the bias on"
    problem = _check_key_padding(model, biases, mask.name, padded, scratch)
    if problem:
        return f"attention_bias kept: {problem}"
    cast_out = f"{mask.name}_int32_mask_index"
    model.graph.node.insert(
        0,
        helper.make_node(
            "Cast", [mask.name], [cast_out], name=f"{mask.name}_to_mask_index", to=TensorProto.INT32
        ),
    )
    for node in candidates:
        inputs = list(node.input)
        inputs[3], inputs[5] = cast_out, ""
        while inputs and not inputs[-1]:
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
    return (
        f"mask_index from {mask.name}: the attention_bias of {len(candidates)} Attention "
        f"node(s) was its key-padding mask on {len(padded)} padded sample(s)"
    )


def _check_key_padding(
    model: onnx.ModelProto,
    biases: list[str],
    mask_name: str,
    cases: list[dict[str, np.ndarray]],
    scratch: Path,
) -> str:
    """'' when every bias tensor is 0 where ``mask`` is set and <= -1e4 where it is not, for
    every query row and head; else what differs."""
    import onnx
    from onnx import TensorProto, helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(b, TensorProto.FLOAT, None) for b in biases if b not in known
    )
    with tempfile.TemporaryDirectory(prefix=".mask-", dir=scratch) as tmp:
        path = Path(tmp) / "probe.onnx"
        _save(probe, path)
        session = _session(path)
        names = [o.name for o in session.get_outputs()]
        for case in cases:
            got = dict(zip(names, session.run(None, _feeds(session, case)), strict=True))
            keep = case[mask_name].astype(bool)[:, None, None, :]  # [batch, 1, 1, key]
            for name in biases:
                bias = np.asarray(got[name], dtype=np.float64)
                if (
                    bias.ndim != 4
                    or bias.shape[0] not in (1, keep.shape[0])
                    or bias.shape[-1] != keep.shape[-1]
                ):
                    return f"bias {name} has shape {list(bias.shape)}, not [batch, 1, q, key]"
                full = np.broadcast_to(keep, np.broadcast_shapes(keep.shape, bias.shape))
                bias = np.broadcast_to(bias, full.shape)
                if np.abs(bias[full]).max(initial=0.0) > 0 or bias[~full].max(initial=-1e30) > -1e4:
                    return f"bias {name} is not the key-padding mask of {mask_name}"
    return ""


def _input(node: Any, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing uses (the bias chain mask_index replaced)."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_reads(node))
    kept.reverse()
    del model.graph.node[:]
    model.graph.node.extend(kept)
    inits = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def _subgraph_reads(node: Any) -> set[str]:
    """Every name the node's subgraphs (If, Loop, Scan bodies) read, outer-scope ones included."""
    from onnx import AttributeProto

    names: set[str] = set()
    graphs = [a.g for a in node.attribute if a.type == AttributeProto.GRAPH]
    graphs += [g for a in node.attribute if a.type == AttributeProto.GRAPHS for g in a.graphs]
    for graph in graphs:
        for inner in graph.node:
            names.update(i for i in inner.input if i)
            names.update(_subgraph_reads(inner))
    return names


# ------------------------------------------------------------------------------ parity
def _cases(
    spec: ModelSpec, check_inputs: Sequence[np.ndarray] | None, settings: FusionSettings
) -> list[dict[str, np.ndarray]]:
    """Deterministic samples (each twice for a text model: mask all set, and padded) and the
    caller's rows, as feeds by input name."""
    rng = np.random.default_rng(0)
    cases = []
    for batch, size in settings.sample_shapes:
        case = {}
        for t in spec.inputs:
            shape = t.sample_shape(batch, size)
            dtype = numpy_of_datatype(t.datatype)
            if dtype.kind == "f":
                case[t.name] = rng.random(shape).astype(dtype)
            elif dtype.kind == "b":
                case[t.name] = np.ones(shape, dtype=dtype)
            else:
                case[t.name] = rng.integers(1, 100, shape).astype(dtype)
        cases.append(case)
        masks = [t for t in spec.inputs if t.name in _MASK_NAMES and len(t.shape) == 2]
        if masks and size > 2:
            padded = dict(case)
            for t in masks:
                mask = np.ones_like(case[t.name])
                for row in range(batch):  # row r keeps size - 1 - r tokens (at least 1)
                    mask[row, max(1, size - 1 - row * max(1, size // (batch + 1))) :] = 0
                padded[t.name] = mask
            cases.append(padded)
    if check_inputs is not None:
        if len(check_inputs) != len(spec.inputs):
            raise ValueError(
                f"check inputs: the model takes {len(spec.inputs)} inputs, got "
                f"{len(check_inputs)} arrays"
            )
        rows = [np.asarray(x)[: settings.check_rows] for x in check_inputs]
        cases.append(
            {
                t.name: np.ascontiguousarray(x, dtype=numpy_of_datatype(t.datatype))
                for t, x in zip(spec.inputs, rows, strict=True)
            }
        )
    return cases


def _parity(
    reference: Path,
    candidate: Path,
    cases: list[dict[str, np.ndarray]],
    settings: FusionSettings,
    record: dict[str, Any],
) -> str:
    """'' when ``candidate`` agrees with ``reference`` on every case; else the first
    disagreement. Fills ``record["parity"]``."""
    want_session, got_session = _session(reference), _session(candidate)
    worst = 0.0
    for case in cases:
        want = want_session.run(None, _feeds(want_session, case))
        got = got_session.run(None, _feeds(got_session, case))
        shape = "x".join(str(s) for s in next(iter(case.values())).shape)
        for w, g in zip(want, got, strict=True):
            w, g = np.asarray(w), np.asarray(g)
            if w.shape != g.shape:
                return f"output shape {list(g.shape)} instead of {list(w.shape)} on {shape}"
            if w.dtype.kind != "f":
                if not np.array_equal(w, g):
                    return f"integer outputs differ on inputs of shape {shape}"
                continue
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            worst = max(worst, float(diff.max(initial=0.0)))
            allowed = settings.atol + settings.rtol * np.abs(w.astype(np.float64))
            if not np.isfinite(g).all() or (diff > allowed).any():
                return (
                    f"max abs diff {float(diff.max(initial=0.0)):.3g} beyond rtol="
                    f"{settings.rtol}, atol={settings.atol} on inputs of shape {shape}"
                )
    record["parity"] = {
        "reference": "the unfused graph in ONNX Runtime",
        "cases": len(cases),
        "max_abs_diff": worst,
        "rtol": settings.rtol,
        "atol": settings.atol,
    }
    return ""


def _feeds(session: Any, case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: case[i.name] for i in session.get_inputs()}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------ helpers
def _load(path: Path) -> onnx.ModelProto:
    import onnx

    return onnx.load(str(path))


def _save(model: onnx.ModelProto, path: Path) -> None:
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=False)


def _skip(record: dict[str, Any], started: float, reason: str) -> dict[str, Any]:
    log.info("graph fusion not applied: %s", reason)
    record["reason"] = reason
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("onnxscript", "onnx-ir", "onnxruntime"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found
