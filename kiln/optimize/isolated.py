"""Graph extraction in a sandboxed child: ``extract_isolated`` runs ``kiln.optimize.extract``
under ``python -m kiln.optimize.isolated extract`` (kiln/intake/sandbox.py's child runner), so an
uploaded model's code never loads into the optimizing process. Results come back as files in
``out_dir`` (``result.json``, the program and the ONNX graph), never as pickles.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from kiln.backends.base import ExtractedModel
from kiln.errors import ExtractionError, KilnError
from kiln.intake.sandbox import ChildTimeout, run_child
from kiln.optimize.extract import Extraction, extract
from kiln.settings import apply_privacy_env
from kiln.spec import ModelSpec


def extract_isolated(
    *,
    source_format: str,
    source_path: Path,
    spec: ModelSpec,
    out_dir: Path,
    check_inputs: list[np.ndarray],
    timeout_s: float,
) -> Extraction:
    """``kiln.optimize.extract.extract`` in a child process; the same results and errors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "check.npz", *check_inputs)
    (out_dir / "spec.json").write_text(spec.model_dump_json())
    try:
        child = run_child(
            ["kiln.optimize.isolated", "extract", source_format, str(source_path), str(out_dir)],
            timeout_s=timeout_s,
        )
    except ChildTimeout:
        raise ExtractionError(
            f"graph extraction took over {timeout_s:.0f} s: raise "
            "KILN_LOAD_TIMEOUT_S if the model is that large"
        ) from None
    result_file = out_dir / "result.json"
    if not result_file.is_file():
        raise ExtractionError(f"graph extraction crashed: {child.last_error_line()}")
    result = json.loads(result_file.read_text())
    if "error" in result:
        raise ExtractionError(result["error"])
    program = Path(result["program"]) if result["program"] else None
    return Extraction(
        ExtractedModel(program=program, onnx=Path(result["onnx"]), spec=spec), result["report"]
    )


def _extract_child(source_format: str, source: Path, out_dir: Path) -> None:
    apply_privacy_env()
    spec = ModelSpec.model_validate_json((out_dir / "spec.json").read_text())
    with np.load(out_dir / "check.npz", allow_pickle=False) as data:
        check = [data[f"arr_{i}"] for i in range(len(data.files))]
    try:
        extraction = extract(
            source_format=source_format,
            source_path=source,
            spec=spec,
            out_dir=out_dir,
            check_inputs=check,
        )
        program = extraction.model.program
        result: dict[str, Any] = {
            "program": str(program) if program else None,
            "onnx": str(extraction.model.onnx),
            "report": extraction.report,
        }
    except KilnError as exc:
        result = {"error": str(exc)}
    (out_dir / "result.json").write_text(json.dumps(result, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ext = sub.add_parser("extract")
    ext.add_argument("format")
    ext.add_argument("source", type=Path)
    ext.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    _extract_child(args.format, args.source, args.out_dir)


if __name__ == "__main__":
    main()
