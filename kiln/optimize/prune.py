"""Structured pruning of a torch.export program: the lowest-L1 output channels of each prunable
layer are removed from the weights themselves, so the model gets smaller and faster.

``prune_structured`` is the optimize pipeline's optional pruning pass. It edits the program's
unlifted module (torch-pruning, which needs ``nn.Linear``/``nn.Conv2d`` modules, cannot read an
exported graph: its layers are ``aten.linear``/``aten.conv2d`` calls on plain parameters) and
exports it again with the same dynamic dimensions, so every backend can build it.

A layer is prunable when every path from its output reaches the next layer's input through
operations that keep channels apart: ``linear -> (relu, gelu, dropout...) -> linear``,
``conv2d -> (relu, batch_norm, max_pool2d...) -> conv2d`` and ``conv2d -> ... -> flatten ->
linear`` (each removed channel removes its ``H*W`` block of the linear's inputs). A layer whose
output is the model's output, or reaches an operation that mixes channels or adds another tensor
(a residual), is left whole and the record says why.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from kiln.errors import VariantUnavailable
from kiln.spec import ModelSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from torch.fx import GraphModule, Node

log = logging.getLogger(__name__)

CRITERION = "L1 norm of each output channel's weights"
PRUNE_RATIO = 0.3  # share of each layer's channels removed (OptimizeSettings.prune_ratio too)


class _Unfollowable(Exception):
    """A layer's output reaches something pruning cannot follow; the message says what."""


@dataclass
class _Group:
    """One prunable layer and every tensor its pruning touches."""

    producer: Node
    kind: str  # "linear" or "conv2d"
    consumers: list[tuple[Node, int]] = field(default_factory=list)  # (layer, block per channel)
    channelwise: list[tuple[Node, int]] = field(default_factory=list)  # (batch_norm, block)
    views: list[tuple[Node, int]] = field(default_factory=list)  # (view, block): sizes to fix


def prune_structured(
    program: Path, out: Path, *, ratio: float = PRUNE_RATIO, spec: ModelSpec
) -> dict[str, Any]:
    """Remove ``ratio`` of the output channels of each prunable layer of ``program``.

    Args:
        program: a ``.pt2`` written by ``torch.export.save`` (the extract stage's program).
        out: where the pruned ``.pt2`` goes; it keeps the program's dynamic dimensions.
        ratio: share of each prunable layer's channels removed (those with the lowest L1 norm),
            rounded down; a layer keeps at least one channel.
        spec: the model's tensors; the pruned program is checked to return the same shapes.

    Returns:
        ``{"ratio", "criterion", "layers": [{"name", "op", "channels_before", "channels_after",
        "removed", "consumers"}], "skipped": [{"name", "op", "reason"}], "params_before",
        "params_after", "max_abs_diff"}``; ``max_abs_diff`` compares the outputs of the program
        and its pruned form on sample inputs (what pruning costs before any gate).

    Raises:
        VariantUnavailable: no layer of the program can be pruned (the record's reasons are in
            the message), or ``ratio`` removes no channel of any layer.
    """
    import torch

    from kiln.backends._torch import example_tensors, export_dynamic_shapes, input_dims

    if not 0.0 < ratio < 1.0:
        raise ValueError(f"prune ratio {ratio}: use a share of channels between 0 and 1, like 0.3")
    exported = torch.export.load(str(program))
    shapes = input_dims(exported)
    examples = example_tensors(exported)
    try:  # the unlifted module's input guards would pin the batch on re-export
        module = exported.module(check_guards=False)
    except TypeError:  # older torch
        module = exported.module()
    params_before = _count_params(module)
    with torch.no_grad():
        reference = [t.clone() for t in _outputs(module, examples)]
        layers, skipped = _prune_module(module, ratio)
    if not layers:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped) or "no layers"
        fix = (
            "raise optimize.prune_ratio"
            if skipped and all("removes none" in s["reason"] for s in skipped)
            else "structured pruning needs a linear or conv2d layer that feeds another "
            "through channel-wise ops; set optimize.prune to false for this model"
        )
        raise VariantUnavailable(
            f"structured pruning found nothing to prune at ratio {ratio} ({reasons}): {fix}"
        )
    module.recompile()
    with torch.no_grad():
        got = _outputs(module, examples)
    pruned = torch.export.export(
        module, tuple(examples), dynamic_shapes=export_dynamic_shapes(shapes)
    )
    _check_shapes(pruned, spec, reference)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(pruned, str(out))
    record = {
        "ratio": ratio,
        "criterion": CRITERION,
        "layers": layers,
        "skipped": skipped,
        "params_before": params_before,
        "params_after": _count_params(module),
        "max_abs_diff": max(
            float((g.float() - r.float()).abs().max()) for g, r in zip(got, reference, strict=True)
        ),
    }
    log.info(
        "pruned %s: %d layers, params %d -> %d, skipped %s",
        program.name,
        len(layers),
        record["params_before"],
        record["params_after"],
        [s["name"] for s in skipped],
    )
    return record


# ------------------------------------------------------------------------------ graph walk
def _ops() -> dict[str, set[Any]]:
    """Operator families the walk recognises (aten overloads, as torch.export records them)."""
    import torch

    aten = torch.ops.aten
    return {
        # one input tensor in, same shape out, each element on its own
        "elementwise": {
            aten.relu.default,
            aten.relu_.default,
            aten.gelu.default,
            aten.silu.default,
            aten.sigmoid.default,
            aten.tanh.default,
            aten.hardtanh.default,
            aten.hardswish.default,
            aten.leaky_relu.default,
            aten.elu.default,
            aten.mish.default,
            aten.softplus.default,
            aten.dropout.default,
            aten.clone.default,
            aten.contiguous.default,
            aten.alias.default,
            aten.mul.Tensor,
            aten.div.Tensor,
            aten.add.Tensor,
            aten.sub.Tensor,
        },
        # NCHW: per-channel over the spatial dims
        "spatial": {
            aten.max_pool2d.default,
            aten.avg_pool2d.default,
            aten.adaptive_avg_pool2d.default,
        },
        "batch_norm": {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default},
        "flatten": {aten.flatten.using_ints},
        "view": {aten.view.default, aten.reshape.default, aten._unsafe_view.default},
        "mean": {aten.mean.dim},
        "linear": {aten.linear.default},
        "conv2d": {aten.conv2d.default},
        "getitem": {operator.getitem},
        "sym_size": {aten.sym_size.int},
    }


def _prune_module(
    module: GraphModule, ratio: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prune every prunable layer of ``module`` in place, in graph order."""
    ops = _ops()
    layers: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    uses = _attr_uses(module)
    for node in list(module.graph.nodes):
        kind = _layer_kind(node, ops)
        if kind is None or not _is_attr(node.args[1]):
            continue
        name = _weight(node).rpartition(".")[0] or _weight(node)
        try:
            if uses[_weight(node)] > 1:
                raise _Unfollowable("its weight is shared with another layer")
            if kind == "conv2d" and _conv_groups(node) != 1:
                raise _Unfollowable("grouped or depthwise convolution")
            group = _follow(node, kind, ops)
            if not group.consumers:
                raise _Unfollowable("no later layer reads its output")
            if any(uses[_weight(c)] > 1 for c, _ in group.consumers):
                raise _Unfollowable("a layer reading its output shares its weight")
            channels = _attr(module, _weight(node)).shape[0]
            for consumer, block in group.consumers:
                if _attr(module, _weight(consumer)).shape[1] != channels * block:
                    raise _Unfollowable(
                        f"{_layer_name(consumer)} reads its output in a layout Kiln does not follow"
                    )
            remove = min(math.floor(ratio * channels + 1e-9), channels - 1)
            if remove < 1:
                raise _Unfollowable(f"{channels} channels: ratio {ratio} removes none")
        except _Unfollowable as why:
            skipped.append({"name": name, "op": kind, "reason": str(why)})
            continue
        keep, removed = _choose(_attr(module, _weight(node)), remove)
        _apply(module, group, keep, channels)
        layers.append(
            {
                "name": name,
                "op": kind,
                "channels_before": channels,
                "channels_after": len(keep),
                "removed": removed,
                "consumers": [_layer_name(c) for c, _ in group.consumers],
            }
        )
    return layers, skipped


def _layer_kind(node: Node, ops: dict[str, set[Any]]) -> str | None:
    if node.op != "call_function":
        return None
    for kind in ("linear", "conv2d"):
        if node.target in ops[kind]:
            return kind
    return None


def _follow(producer: Node, kind: str, ops: dict[str, set[Any]]) -> _Group:
    """Every node the channels of ``producer``'s output reach, up to the next layers.

    The walk tracks where the channels are: dim 1 of NCHW (``"nchw"``) after a conv, the last
    dim (``"last"``) after a linear or a flatten, each channel then spanning ``block`` features.
    """
    from torch.fx import Node

    group = _Group(producer=producer, kind=kind)
    stack: list[tuple[Node, str, int]] = [(producer, "nchw" if kind == "conv2d" else "last", 1)]
    seen: set[Node] = set()
    while stack:
        node, where, block = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            op = user.target
            tensors = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, Node)]
            if user.op == "output":
                raise _Unfollowable("its output is the model's output")
            if op in ops["sym_size"] and user.args[1] == 0:
                continue  # the batch size: independent of channels
            if op in ops["getitem"]:
                if user.args[1] != 0:
                    raise _Unfollowable(f"reads item {user.args[1]} of {node.name}")
                stack.append((user, where, block))
            elif (
                op in ops["elementwise"]
                and tensors == [node]
                and user.args[0] is node
                or op in ops["spatial"]
                and where == "nchw"
                and user.args[0] is node
            ):
                stack.append((user, where, block))
            elif op in ops["batch_norm"] and user.args[0] is node and _channel_dim_1(node, where):
                if not all(_is_attr(a) or a is None for a in user.args[1:5]):
                    raise _Unfollowable("a batch_norm whose statistics are computed")
                group.channelwise.append((user, block))
                stack.append((user, where, block))
            elif where == "nchw" and op in ops["flatten"] and _flattens_chw(user):
                stack.append((user, "last", block * _spatial(node)))
            elif where == "nchw" and op in ops["view"] and _flat_view(user, node):
                group.views.append((user, block * _spatial(node)))
                stack.append((user, "last", block * _spatial(node)))
            elif (
                where == "nchw"
                and op in ops["mean"]
                and user.args[0] is node
                and isinstance(user.args[1], list | tuple)
                and sorted(d % 4 for d in cast("Sequence[int]", user.args[1])) == [2, 3]
            ):
                keepdim = bool(user.args[2]) if len(user.args) > 2 else False
                stack.append((user, "nchw" if keepdim else "last", block))
            elif (
                op in ops["linear"]
                and where == "last"
                and user.args[0] is node
                and _is_attr(user.args[1])
                and node not in user.args[1:]
            ):
                group.consumers.append((user, block))
            elif (
                op in ops["conv2d"]
                and where == "nchw"
                and user.args[0] is node
                and _is_attr(user.args[1])
                and _conv_groups(user) == 1
            ):
                group.consumers.append((user, 1))
            else:
                raise _Unfollowable(
                    f"its output reaches {_describe(user)}, which Kiln does not "
                    "follow (a residual, or an op that mixes channels)"
                )
    return group


def _describe(node: Node) -> str:
    """``aten.add.Tensor`` (an operator as the graph names it)."""
    return str(node.target).replace(".default", "")


def _shape(node: Node) -> tuple[Any, ...]:
    val = node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        raise _Unfollowable(f"{node.name} has no recorded shape")
    return tuple(val.shape)


def _channel_dim_1(node: Node, where: str) -> bool:
    """batch_norm normalises dim 1: the channel dim in NCHW, or the last dim of a 2-D tensor."""
    return where == "nchw" or len(_shape(node)) == 2


def _spatial(node: Node) -> int:
    """H*W of an NCHW tensor (fixed sizes only)."""
    shape = _shape(node)
    if len(shape) != 4 or not all(isinstance(s, int) for s in shape[2:]):
        raise _Unfollowable(f"{node.name} is not NCHW with fixed height and width")
    return int(shape[2] * shape[3])


def _flattens_chw(flatten: Node) -> bool:
    start = cast(int, flatten.args[1]) if len(flatten.args) > 1 else 0  # start_dim
    end = cast(int, flatten.args[2]) if len(flatten.args) > 2 else -1  # end_dim
    return start == 1 and end in (-1, 3)


def _flat_view(view: Node, source: Node) -> bool:
    """``x.view(batch, C*H*W)`` (or ``-1`` features) of an NCHW tensor."""
    from torch.fx import Node

    size = view.args[1]
    if view.args[0] is not source or not isinstance(size, list | tuple) or len(size) != 2:
        return False
    if not (isinstance(size[0], Node) or size[0] == -1):  # the batch, then the features
        return False
    channels = _shape(source)[1]
    features = cast("int | Node", size[1])  # a view's sizes are ints or (symbolic) nodes
    return features == -1 or features == channels * _spatial(source)


def _conv_groups(node: Node) -> int:
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return int(cast(int, groups))


def _is_attr(arg: Any) -> TypeGuard[Node]:
    from torch.fx import Node

    return isinstance(arg, Node) and arg.op == "get_attr"


def _weight(layer: Node) -> str:
    """The parameter a layer reads as its weight: the target of its ``args[1]``, a get_attr
    node (callers have checked :func:`_is_attr`), whose target is the dotted name."""
    return cast(str, cast("Node", layer.args[1]).target)


def _layer_name(node: Node) -> str:
    target = str(cast("Node", node.args[1]).target)
    return target.rpartition(".")[0] or target


def _attr_uses(module: GraphModule) -> dict[str, int]:
    """How many nodes read each parameter (a weight shared by two layers is not pruned)."""
    uses: dict[str, int] = {}
    for node in module.graph.nodes:
        if node.op == "get_attr":
            uses[str(node.target)] = uses.get(str(node.target), 0) + len(node.users)
    return uses


# ------------------------------------------------------------------------------ surgery
def _choose(weight: torch.Tensor, remove: int) -> tuple[list[int], list[int]]:
    """Kept and removed output channels: the ``remove`` channels of lowest L1 norm go."""
    import torch

    norms = weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1)
    order = torch.argsort(norms, stable=True).tolist()
    return sorted(order[remove:]), sorted(order[:remove])


def _apply(module: GraphModule, group: _Group, keep: list[int], channels: int) -> None:
    import torch

    rows = torch.tensor(keep, dtype=torch.long)

    def features(block: int) -> torch.Tensor:  # channel c spans features c*block ... +block-1
        return (rows[:, None] * block + torch.arange(block)[None, :]).reshape(-1)

    producer = group.producer
    _slice(module, cast("Node", producer.args[1]), 0, rows)
    if len(producer.args) > 2 and _is_attr(producer.args[2]):
        _slice(module, producer.args[2], 0, rows)
    for norm, block in group.channelwise:
        for arg in norm.args[1:5]:
            if _is_attr(arg):
                _slice(module, arg, 0, features(block))
    for consumer, block in group.consumers:
        _slice(module, cast("Node", consumer.args[1]), 1, features(block))
    for view, block in group.views:
        size = list(cast("Sequence[int | Node]", view.args[1]))  # checked by _flat_view
        if size[1] != -1:
            size[1] = len(keep) * block
        view.args = (view.args[0], size, *view.args[2:])


def _attr(module: GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return cast("torch.Tensor", getattr(module.get_submodule(owner) if owner else module, name))


def _slice(module: GraphModule, node: Node, dim: int, index: torch.Tensor) -> None:
    """Replace the parameter or buffer ``node`` reads with its ``index`` rows along ``dim``."""
    import torch

    owner_name, _, name = str(node.target).rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    value = getattr(owner, name)
    smaller = value.detach().index_select(dim, index).contiguous()
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(smaller, requires_grad=False)
    else:
        setattr(owner, name, smaller)


# ------------------------------------------------------------------------------ checks
def _count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _outputs(module: Any, examples: list[torch.Tensor]) -> list[torch.Tensor]:
    from kiln.backends._torch import flatten_outputs

    return [t.detach() for t in flatten_outputs(module(*examples))]


def _check_shapes(program: Any, spec: ModelSpec, reference: list[torch.Tensor]) -> None:
    """The pruned program runs at batch 1 and 3 and returns what the model returned."""
    from kiln.backends._torch import flatten_outputs
    from kiln.intake.probe import sample_inputs

    module = program.module()
    for batch in (1, 3):
        got = flatten_outputs(module(*sample_inputs(spec.inputs, batch=batch, dynamic=8)))
        want = [(batch, *r.shape[1:]) for r in reference]
        if [tuple(g.shape) for g in got] != want:
            raise RuntimeError(
                f"the pruned program returns shapes "
                f"{[tuple(g.shape) for g in got]} at batch {batch}, the model "
                f"{want}: a pruning bug, report it with the model"
            )
