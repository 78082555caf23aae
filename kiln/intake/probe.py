"""Load a model source and run it once on a sample input, in a sandbox subprocess.

``probe_source`` starts ``python -m kiln.intake.probe`` with a timeout (untrusted models never load
into Kiln's own process: docs/reliability.md, torch.load RCE) and returns the model's recorded
``ModelSpec``. The child prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, cast

from kiln.errors import ModelLoadError
from kiln.spec import Datatype, ModelSpec, TensorSpec

# A model with no registered dataset is evaluated (the optimize pipeline) and replayed to (a
# canary) on this many rows of ``sample_inputs``, dynamic dimensions (sequence length) this long.
SAMPLE_ROWS = 64
SAMPLE_DYNAMIC = 16


def probe_source(fmt: str, path: Path, *, timeout_s: float) -> ModelSpec:
    """Spec of the model at ``path`` (a .pt2, .onnx or unpacked kiln folder)."""
    from kiln.intake.sandbox import ChildTimeout, run_child

    try:
        child = run_child(
            ["kiln.intake.probe", "--format", fmt, str(path)],
            timeout_s=timeout_s,
            env={"OMP_NUM_THREADS": "1"},
        )
    except ChildTimeout:
        raise ModelLoadError(
            f"loading the model and running one sample took over {timeout_s:.0f} s: "
            "raise KILN_LOAD_TIMEOUT_S if the model is that slow"
        ) from None
    if child.returncode != 0:
        raise ModelLoadError(
            f"the model failed to load or run on a sample input: {child.last_error_line()}"
        )
    return ModelSpec.model_validate_json(child.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- the child process
def sample_inputs(specs: list[TensorSpec], *, batch: int, dynamic: int) -> list[Any]:
    """Deterministic sample tensors for ``specs`` (integers small, as token ids are)."""
    import torch

    from kiln.spec import numpy_of_datatype

    gen = torch.Generator().manual_seed(0)
    tensors = []
    for spec in specs:
        shape = spec.sample_shape(batch, dynamic)
        dtype = getattr(torch, numpy_of_datatype(spec.datatype).name)
        if dtype.is_floating_point:
            tensors.append(torch.rand(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.ones(shape, dtype=dtype))
        else:
            tensors.append(torch.randint(1, 100, shape, generator=gen).to(dtype))
    return tensors


def _spec_from(name: str, value: Any, other: Any) -> TensorSpec:
    """A spec from the same output at two sample sizes: dimensions that differ are dynamic."""
    from kiln.spec import datatype_of_numpy

    a, b = value.detach().cpu().numpy(), other.detach().cpu().numpy()
    shape = [
        -1 if (i == 0 or da != db) else da
        for i, (da, db) in enumerate(zip(a.shape, b.shape, strict=True))
    ]
    datatype = cast(Datatype, datatype_of_numpy(a.dtype))
    return TensorSpec(name=name, datatype=datatype, shape=shape)


def _as_list(out: Any) -> list[Any]:
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, list | tuple):
        return list(out)
    return [out]


def _output_specs(run: Any, inputs: list[TensorSpec]) -> list[TensorSpec]:
    first = _as_list(run(sample_inputs(inputs, batch=1, dynamic=8)))
    second = _as_list(run(sample_inputs(inputs, batch=2, dynamic=9)))
    if len(first) != len(second):
        raise ValueError("the model returns a different number of outputs per batch size")
    for tensor in first:
        if tensor.dtype.is_floating_point and not bool(tensor.isfinite().all()):
            raise ValueError("the model's output on a sample input is not finite (NaN or Inf)")
    names = ["output"] if len(first) == 1 else [f"output_{i}" for i in range(len(first))]
    return [_spec_from(n, a, b) for n, a, b in zip(names, first, second, strict=True)]


def probe_pt2(path: Path) -> ModelSpec:
    import torch

    from kiln.spec import datatype_of_numpy

    program = torch.export.load(str(path))
    module = program.module()
    user_inputs = set(program.graph_signature.user_inputs)
    inputs = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta["val"]
            shape = [d if isinstance(d, int) else -1 for d in val.shape]
            dtype = cast(Datatype, datatype_of_numpy(torch.empty(0, dtype=val.dtype).numpy().dtype))
            inputs.append(TensorSpec(name=node.name, datatype=dtype, shape=shape))
    with torch.inference_mode():
        outputs = _output_specs(lambda xs: module(*xs), inputs)
    return ModelSpec(inputs=inputs, outputs=outputs)


_ORT_TYPES: dict[str, Datatype] = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def probe_onnx(path: Path) -> ModelSpec:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = []
    for arg in session.get_inputs():
        if arg.type not in _ORT_TYPES:
            raise ValueError(f"input {arg.name} has unsupported type {arg.type}")
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
        inputs.append(TensorSpec(name=arg.name, datatype=_ORT_TYPES[arg.type], shape=shape))
    names = [i.name for i in inputs]

    def run(xs: list[Any]) -> list[Any]:
        feeds = {n: x.numpy() for n, x in zip(names, xs, strict=True)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]

    return ModelSpec(inputs=inputs, outputs=_output_specs(run, inputs))


def load_kiln_folder(folder: Path) -> Any:
    """Build a folder model: import its factory, load its safetensors weights (strict)."""
    import importlib

    from safetensors.torch import load_file

    from kiln.intake.formats import read_kiln_yaml

    config = read_kiln_yaml(folder)
    sys.path.insert(0, str(folder))  # a factory module may ship inside the folder
    module_name, func = config.factory.split(":")
    factory = getattr(importlib.import_module(module_name), func)
    model = factory(**config.config)
    model.load_state_dict(load_file(str(folder / config.weights)), strict=True)
    return model.eval()


def probe_kiln(folder: Path) -> ModelSpec:
    import torch

    from kiln.intake.formats import read_kiln_yaml

    config = read_kiln_yaml(folder)
    model = load_kiln_folder(folder)
    if config.preprocess is not None:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(folder / config.preprocess.file)).encode("A sample sentence.")
    with torch.inference_mode():
        outputs = _output_specs(lambda xs: model(*xs), config.inputs)
    return ModelSpec(inputs=config.inputs, outputs=outputs, preprocess=config.preprocess)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--format", required=True, choices=["pt2", "onnx", "kiln"])
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    from kiln.settings import apply_privacy_env

    apply_privacy_env()
    probe = {"pt2": probe_pt2, "onnx": probe_onnx, "kiln": probe_kiln}[args.format]
    try:
        spec = probe(args.path)
    except Exception as exc:  # the parent reports the last stderr line
        print(
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            file=sys.stderr,
        )
        sys.exit(1)
    print(json.dumps(spec.model_dump(mode="json")))


if __name__ == "__main__":
    main()
