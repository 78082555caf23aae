"""Graph extraction: a model source becomes a torch.export program and an ONNX graph, both with a
dynamic batch dimension (and sequence length for text), checked against the eager model.

``extract`` is the pipeline's first stage. It writes ``model.pt2`` (``torch.export.save``) and
``model.onnx`` (the dynamo exporter, opset >= 18, one self-contained file) into ``out_dir`` and
returns an :class:`Extraction`: the :class:`~kiln.backends.base.ExtractedModel` with a parity
report. A model that
``torch.export`` cannot capture raises :class:`~kiln.errors.ExtractionError` whose message is the
exporter's reason in one paragraph (the version becomes ``rejected``).

It runs the model's own code (a ``kiln.yaml`` factory, a program's graph): callers in the
pipeline run it in a sandbox subprocess, as upload runs its probe (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.backends.base import (
    PARITY_ATOL,
    PARITY_RTOL,
    PARITY_SAMPLE_SHAPES,
    ExtractedModel,
)
from kiln.errors import ExtractionError, InvalidInput
from kiln.intake.formats import SourceFormat
from kiln.spec import ModelSpec

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 560  # plus the stage's own prefix: ~600 in all


@dataclass(frozen=True)
class Extraction:
    """What ``extract`` produced: the model's program and graph, and the report of how they
    were made and checked (``extract``'s docstring lists its keys)."""

    model: ExtractedModel
    report: dict[str, Any]


@dataclass(frozen=True)
class ExtractSettings:
    """How extraction exports and checks a model; each default written once, here."""

    opset: int = 18  # the dynamo exporter's native opset: no version conversion
    max_batch: int = 1024  # upper bound of the dynamic batch dimension
    seq_min: int = 2  # bounds of other dynamic dims (sequence length): 0 and 1 would specialise
    seq_max: int = 512
    # torch.testing.assert_close tolerances, eager vs program and vs ONNX
    rtol: float = PARITY_RTOL
    atol: float = PARITY_ATOL
    # (batch, dynamic-dim size) of the sample inputs every model is checked on, besides the
    # caller's check inputs
    sample_shapes: tuple[tuple[int, int], ...] = PARITY_SAMPLE_SHAPES

    def __post_init__(self) -> None:
        if self.opset < 18:
            raise ValueError(f"opset {self.opset}: the dynamo exporter needs opset 18 or newer")
        if not 2 <= self.seq_min <= self.seq_max:
            raise ValueError("seq_min must be at least 2 and at most seq_max")
        if self.max_batch < 4 or self.rtol < 0 or self.atol < 0:
            raise ValueError("max_batch must be at least 4; tolerances non-negative")


def extract(
    *,
    source_format: str,
    source_path: Path,
    spec: ModelSpec,
    out_dir: Path,
    check_inputs: list[np.ndarray] | None = None,
    settings: ExtractSettings | None = None,
) -> Extraction:
    """Export ``source_path`` to ``out_dir/model.pt2`` and ``out_dir/model.onnx`` and check both.

    Args:
        source_format: ``pt2`` (a torch.export archive, kept as it is when its batch dimension
            is dynamic), ``kiln`` (a folder with ``kiln.yaml``, or its stored tar) or ``onnx``
            (used as it is: there is then no torch program).
        source_path: the stored source.
        spec: the version's recorded spec (model inputs: preprocessing excluded).
        out_dir: where the artifacts go (created).
        check_inputs: one array per model input (a batch of validation rows) that parity is
            checked on, besides deterministic samples at two batch sizes and sequence lengths.
        settings: export and tolerance settings.

    Returns:
        The extracted model and a report: ``{"source_format", "opset", "rtol", "atol",
        "timings_s": {"export", "save", "onnx"}, "parity": {"program": {...}, "onnx": {...}}}``
        where each parity entry holds ``max_abs_diff`` and ``cases``.

    Raises:
        ExtractionError: torch.export or the ONNX exporter could not capture the model, or the
            captured graph disagrees with the eager model beyond the tolerances.
    """
    settings = settings or ExtractSettings()
    try:
        fmt = SourceFormat(source_format)
    except ValueError:
        raise InvalidInput(f"source format {source_format!r}: use pt2, onnx or kiln") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("extract %s %s with %s", fmt.value, source_path.name, settings)
    report: dict[str, Any] = {"source_format": fmt.value, **asdict(settings), "timings_s": {}}
    report["sample_shapes"] = [list(s) for s in settings.sample_shapes]

    if fmt is SourceFormat.onnx:
        onnx_path = out_dir / "model.onnx"
        _copy_onnx(source_path, onnx_path)
        report["parity"] = {"onnx": _check_onnx_runs(onnx_path, spec, check_inputs, settings)}
        return Extraction(ExtractedModel(program=None, onnx=onnx_path, spec=spec), report)

    import torch

    with _stdout_to_stderr():
        started = time.perf_counter()
        if fmt is SourceFormat.kiln:
            eager, program = _export_folder(source_path, spec, settings, out_dir)
        else:
            eager, program = _load_pt2(source_path, spec, settings)
        report["timings_s"]["export"] = round(time.perf_counter() - started, 3)

        started = time.perf_counter()
        program_path = out_dir / "model.pt2"
        torch.export.save(program, str(program_path))
        report["timings_s"]["save"] = round(time.perf_counter() - started, 3)

        started = time.perf_counter()
        onnx_path = out_dir / "model.onnx"
        _export_onnx(program, spec, onnx_path, settings)
        report["timings_s"]["onnx"] = round(time.perf_counter() - started, 3)

    cases = _parity_cases(spec, check_inputs, settings)
    reloaded = torch.export.load(str(program_path)).module()
    report["parity"] = _check_parity(eager, reloaded, onnx_path, spec, cases, settings)
    log.info("extracted %s: %s", source_path.name, report["parity"])
    return Extraction(ExtractedModel(program=program_path, onnx=onnx_path, spec=spec), report)


# ------------------------------------------------------------------------------ export
def _export_folder(
    source: Path, spec: ModelSpec, settings: ExtractSettings, out_dir: Path
) -> tuple[Any, ExportedProgram]:
    """Build a kiln.yaml model and export it with dynamic batch (and sequence) dims."""
    import torch

    from kiln.intake.probe import load_kiln_folder, sample_inputs

    folder = source
    if source.is_file():  # the stored form: a deterministic tar of the folder
        from kiln.intake.formats import unpack_folder

        folder = unpack_folder(source, out_dir / "source")
    model = load_kiln_folder(folder)
    args = tuple(sample_inputs(spec.inputs, batch=2, dynamic=8))
    try:
        program = torch.export.export(model, args, dynamic_shapes=_dynamic_shapes(spec, settings))
    except Exception as exc:
        raise ExtractionError(
            f"torch.export could not capture the model: {condense_export_error(exc)}"
        ) from None
    finally:
        if folder != source:
            shutil.rmtree(folder, ignore_errors=True)
    return model, program


def _dynamic_shapes(spec: ModelSpec, settings: ExtractSettings) -> tuple[dict[int, Any], ...]:
    """Dynamic batch for every input; every other ``-1`` dim dynamic too, shared by position
    (``input_ids`` and ``attention_mask`` share one sequence length)."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=settings.max_batch)
    others: dict[int, Any] = {}
    shapes = []
    for tensor in spec.inputs:
        dims: dict[int, Any] = {0: batch}
        for i, size in enumerate(tensor.shape[1:], start=1):
            if size == -1:
                name = "seq" if i == 1 else f"dim{i}"
                dims[i] = others.setdefault(
                    i, torch.export.Dim(name, min=settings.seq_min, max=settings.seq_max)
                )
        shapes.append(dims)
    return tuple(shapes)


def _load_pt2(
    source: Path, spec: ModelSpec, settings: ExtractSettings
) -> tuple[Any, ExportedProgram]:
    """The uploaded program as it is, or re-exported when its batch dimension is fixed."""
    import torch

    from kiln.backends._torch import (
        DimRange,
        example_tensors,
        export_dynamic_shapes,
        has_dynamic_batch,
        input_dims,
    )

    try:
        program = torch.export.load(str(source))
    except Exception as exc:
        raise ExtractionError(
            f"the .pt2 archive does not load: {condense_export_error(exc)}"
        ) from None
    eager = program.module()
    if has_dynamic_batch(program):
        return eager, program
    # A program traced with a fixed batch: export its module again, batch made dynamic.
    dims = input_dims(program)
    batch = DimRange("batch", 1, settings.max_batch)
    dynamic = [[batch, *d[1:]] if d else d for d in dims]
    log.info("%s has a fixed batch dimension: re-exporting it with a dynamic one", source.name)
    examples = example_tensors(program)
    try:
        # The unlifted module's input guards would pin the batch again: re-trace without them
        # (older torch has no check_guards argument).
        try:
            unguarded = program.module(check_guards=False)
        except TypeError:
            unguarded = program.module()
        exported = torch.export.export(
            unguarded, tuple(examples), dynamic_shapes=export_dynamic_shapes(dynamic)
        )
        return _in_fixed_batches(eager, examples[0].shape[0]), exported
    except Exception as exc:
        raise ExtractionError(
            "the .pt2 program has a fixed batch size and could not be re-exported with a "
            f"dynamic one: {condense_export_error(exc)} Export it with "
            "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}."
        ) from None


def _in_fixed_batches(module: Any, size: int) -> Any:
    """Run a fixed-batch module on any batch: rows padded to a multiple of ``size``, run in
    chunks, outputs concatenated and cut back (the reference for a re-exported program)."""
    import torch

    from kiln.backends._torch import flatten_outputs

    def run(*tensors: torch.Tensor) -> list[torch.Tensor]:
        rows = tensors[0].shape[0]
        padded = -(-rows // size) * size
        if padded != rows:
            tensors = tuple(
                torch.cat([t, t[-1:].expand(padded - rows, *t.shape[1:])]) for t in tensors
            )
        chunks = [
            flatten_outputs(module(*(t[i : i + size] for t in tensors)))
            for i in range(0, padded, size)
        ]
        return [torch.cat(parts)[:rows] for parts in zip(*chunks, strict=True)]

    return run


def _export_onnx(
    program: ExportedProgram, spec: ModelSpec, path: Path, settings: ExtractSettings
) -> None:
    """ONNX through the dynamo exporter, from the program (its dynamic dims carried over)."""
    import onnx
    import torch

    from kiln.backends._torch import example_tensors

    args = tuple(example_tensors(program))
    try:
        onnx_program = torch.onnx.export(
            program,
            args,
            dynamo=True,
            opset_version=settings.opset,
            verbose=False,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            external_data=False,
        )
        assert onnx_program is not None
        model = onnx_program.model_proto
    except Exception as exc:
        raise ExtractionError(
            f"the ONNX exporter could not translate the program: {condense_export_error(exc)}"
        ) from None
    _name_dynamic_dims(model, spec)
    onnx.save_model(model, str(path), save_as_external_data=False)


def _name_dynamic_dims(model: Any, spec: ModelSpec) -> None:
    """Rename the exporter's symbols (``s43``) to ``batch`` / ``seq`` throughout the graph."""
    names: dict[str, str] = {}
    for value, tensor in zip(model.graph.input, spec.inputs, strict=False):
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and dim.dim_param not in names and i < len(tensor.shape):
                base = name = "batch" if i == 0 else "seq" if i == 1 else f"dim{i}"
                while name in names.values():  # two independent lengths stay two names
                    name = f"{base}_{len(names)}"
                names[dim.dim_param] = name
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def _copy_onnx(source: Path, dest: Path) -> None:
    """An ONNX source as one self-contained file (external data, already checked, folded in)."""
    import onnx

    from kiln.intake.formats import onnx_external_files

    if onnx_external_files(source):
        onnx.save_model(onnx.load(str(source)), str(dest), save_as_external_data=False)
    else:
        shutil.copyfile(source, dest)


# ------------------------------------------------------------------------------ parity
def _parity_cases(
    spec: ModelSpec, check_inputs: list[np.ndarray] | None, settings: ExtractSettings
) -> list[list[np.ndarray]]:
    from kiln.intake.probe import sample_inputs

    cases = [
        [t.numpy() for t in sample_inputs(spec.inputs, batch=b, dynamic=d)]
        for b, d in settings.sample_shapes
    ]
    if check_inputs is not None:
        if len(check_inputs) != len(spec.inputs):
            raise InvalidInput(
                f"check inputs: the model takes {len(spec.inputs)} inputs, "
                f"got {len(check_inputs)} arrays"
            )
        cases.append(list(check_inputs))
    return cases


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_parity(
    eager: Any,
    program: Any,
    onnx_path: Path,
    spec: ModelSpec,
    cases: list[list[np.ndarray]],
    settings: ExtractSettings,
) -> dict[str, Any]:
    """Eager vs the saved program vs ONNX Runtime on every case, within the tolerances."""
    import torch

    from kiln.backends._torch import flatten_outputs, to_tensors

    session = _ort_session(onnx_path)
    names = [i.name for i in session.get_inputs()]
    worst = {"program": 0.0, "onnx": 0.0}
    for case in cases:
        tensors = to_tensors(case, spec.inputs)
        with torch.inference_mode():
            want = [t.float() for t in flatten_outputs(eager(*tensors))]
            got_program = [t.float() for t in flatten_outputs(program(*tensors))]
        feeds = {n: t.numpy() for n, t in zip(names, tensors, strict=True)}
        got_onnx = [torch.from_numpy(np.asarray(o)).float() for o in session.run(None, feeds)]
        shape = "x".join(str(s) for s in case[0].shape)
        for what, got in (("program", got_program), ("onnx", got_onnx)):
            if len(got) != len(want):
                raise ExtractionError(
                    f"the {what} returns {len(got)} outputs, the eager model {len(want)}"
                )
            for g, w in zip(got, want, strict=True):
                diff = float((g - w).abs().max()) if g.numel() and g.shape == w.shape else 0.0
                worst[what] = max(worst[what], diff)
                try:
                    torch.testing.assert_close(g, w, rtol=settings.rtol, atol=settings.atol)
                except AssertionError as exc:
                    detail = " ".join(str(exc).split())[:300]
                    raise ExtractionError(
                        f"the exported {what} disagrees with the eager model on inputs of shape "
                        f"{shape} beyond rtol={settings.rtol}, atol={settings.atol}: {detail}"
                    ) from None
    return {what: {"max_abs_diff": worst[what], "cases": len(cases)} for what in worst}


def _check_onnx_runs(
    path: Path, spec: ModelSpec, check_inputs: list[np.ndarray] | None, settings: ExtractSettings
) -> dict[str, Any]:
    """An ONNX source has nothing to compare with: check it runs and its outputs are finite."""
    session = _ort_session(path)
    names = [i.name for i in session.get_inputs()]
    from kiln.backends._torch import to_tensors

    cases = _parity_cases(spec, check_inputs, settings)
    for case in cases:
        feeds = {n: t.numpy() for n, t in zip(names, to_tensors(case, spec.inputs), strict=True)}
        for out in session.run(None, feeds):
            arr = np.asarray(out)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ExtractionError(
                    "the ONNX model's output is not finite (NaN or Inf) on "
                    f"inputs of shape {case[0].shape}"
                )
    return {"max_abs_diff": None, "cases": len(cases), "reference": "none (ONNX source)"}


# ------------------------------------------------------------------------------ errors
_NOISE = re.compile(
    r"TORCH_LOGS|TORCHDYNAMO_|For more (information|debugging)|docs\.google|draft_export|"
    r"^Caused by:|The error above occurred|C\+\+ stack trace|If you're using|"
    r"consider using data-dependent friendly APIs|^The following call raised"
)
_CALL_SITE = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)')
_CAUSED_BY = re.compile(r"Caused by: \(([^)\s]+):(\d+) in (\w+)\)")
_ABS_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s/:\"'()]+)+/([^\s/:\"'()]+)")


def condense_export_error(exc: BaseException, *, limit: int = MAX_REASON_CHARS) -> str:
    """The exporter's reason as one readable paragraph: its first statement, where in the
    model's code it happened, and how to fix the model. No traceback, no absolute paths."""
    text = str(exc).strip() or type(exc).__name__
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    kept: list[str] = []
    for i, para in enumerate(paragraphs):
        if i > 0 and not para.lstrip().startswith("Suggested fixes"):
            continue
        for line in para.splitlines():
            line = line.strip().lstrip("- ").strip()
            kept.extend(
                sentence
                for sentence in re.split(r"(?<=[.!?])\s+", line)
                if sentence and not _NOISE.search(sentence)
            )
    reason = " ".join(kept).replace("(Size-like symbols: none)", "").strip()
    reason = re.sub(r"\s+", " ", _ABS_PATH.sub(r"\1", reason))
    where = _where(exc, text)
    hint = _hint(exc, text)
    budget = limit - len(where) - len(hint) - 4
    if len(reason) > budget:
        reason = reason[: max(budget - 3, 40)].rstrip() + "..."
    parts = [reason.rstrip(".") + (f" ({where})" if where else "") + "."]
    if hint:
        parts.append(hint)
    return " ".join(parts)[:limit]


def _where(exc: BaseException, text: str) -> str:
    """``file.py:12 in forward: `code``` for the model line that failed, if known."""
    calls = _CALL_SITE.findall(text)
    if calls:
        file, line, func, code = calls[-1]
        return f"at {Path(file).name}:{line} in {func}: `{code.strip()[:80]}`"
    caused = _CAUSED_BY.search(text)
    if caused:
        return f"at {Path(caused.group(1)).name}:{caused.group(2)} in {caused.group(3)}"
    # No location in the message: the deepest frame outside torch is the model's own code.
    import torch

    torch_dir = str(Path(torch.__file__).parent)
    stack = list(traceback.extract_tb(exc.__traceback__))
    inside = [i for i, f in enumerate(stack) if f.filename.startswith(torch_dir)]
    # Frames before the first torch frame are the caller's (this module), not the model's.
    frames = (
        [f for f in stack[inside[0] :] if not f.filename.startswith(torch_dir)] if inside else []
    )
    if frames:
        frame = frames[-1]
        code = f": `{frame.line.strip()[:80]}`" if frame.line else ""
        return f"at {Path(frame.filename).name}:{frame.lineno} in {frame.name}{code}"
    return ""


def _hint(exc: BaseException, text: str) -> str:
    """How to change the model, for the failures models commonly hit."""
    kind = type(exc).__name__
    if "DataDependent" in kind or "data-dependent" in text:
        return (
            "The model's forward branches on (or sizes a tensor by) the values in a tensor, "
            "which torch.export cannot capture: use torch.where or torch.cond instead, or "
            "move that logic out of forward."
        )
    if "Constraints violated" in text:
        return (
            "The model fixes the size of a dimension Kiln exports as dynamic (batch or "
            "sequence length): compute sizes from the input (x.shape[0], reshape(-1)) "
            "instead of constants."
        )
    if kind in ("Unsupported", "UnsupportedOperatorError") or "not supported" in text:
        return (
            "Replace the unsupported call with torch operations, or export the model to "
            ".onnx yourself and upload that."
        )
    return ""


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Exporters print progress on stdout; `kiln --json` keeps stdout for its one document."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
