"""Build ``bench/gpu-carry/``: everything ``bench/gpu_check.py`` needs on a GPU machine, small
enough to travel with the working tree (the device tool carries 64 MiB in all).

Reads the example models that ``dvc repro`` builds under ``--data-root`` (default ``data``) and
writes into ``--out`` (default ``bench/gpu-carry``, git-ignored):

- ``digits/model.pt2`` and ``digits/test.npz``: the exported digits CNN and its test split, as
  they are (the GPU machine has no way to rebuild them without the venv);
- ``minilm/model.fp16.safetensors``: the MiniLM weights re-keyed for
  :func:`kiln.examples.minilm`, every float tensor cast to float16 (about 45 MB instead of 88);
- ``minilm/config.json``: the ``BertConfig`` values of the model's ``kiln.yaml``;
- ``minilm/tokenizer.json``: the model's tokenizer (truncates at 128, pads to the longest row);
- ``minilm/sentences.json``: the first 256 sentences of ``sentences.npz``;
- ``minilm/reference.npy``: float32 embeddings of those sentences by the *original* fp32 weights
  (computed here on CPU, batches of 32), so the GPU check also measures what fp16 weights cost;
- ``wheels/``: the wheels Kiln's engine needs that the GPU machine's ``python3`` lacks
  (``WHEELS``: LitServe, FastAPI, Starlette, uvicorn, pydantic and pydantic-core,
  pyzmq, orjson...; about 4.3 MB), at the versions of ``requirements.lock``, downloaded with
  ``pip download`` for CPython 3.12 on manylinux x86_64 (``--wheels-for gpu``, the GPU
  machine) or for this interpreter (``--wheels-for here``, what the tests use);
- ``manifest.json``: each file's size and sha256, and the total.

Fails (exit 1) when the folder exceeds 60 MiB. It also prints the size of the working tree that
travels with it, which must stay under the tool's 64 MiB. Run by ``make gpu-check``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: what Kiln's engine imports (bench/gpu_serve.py) that the GPU machine's python3 lacks, or has
#: at versions too old for the rest (anyio, typing-extensions); it has click, h11, idna and
#: annotated-doc, and uvicorn falls back to h11 and asyncio without httptools or websockets
WHEELS = (
    "litserve",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "opentelemetry-api",
    "pyzmq",
    "orjson",
    "anyio",
)
#: the GPU machine's python3 (bench/README-gpu.md); pip matches manylinux tags exactly
GPU_PYTHON = "3.12"
GPU_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
MIB = 1024 * 1024
LIMIT_MIB = 60  # the carry folder's own budget; the device tool's limit for everything is 64
TOOL_LIMIT_MIB = 64
N_SENTENCES = 256
BATCH = 32


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _need(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(
            f"{path} is missing: build the examples first (`dvc repro`, or "
            "`make bench`), or point --data-root at a folder holding "
            "digits/{model.pt2,test.npz} and minilm/{model/,sentences.npz}"
        )
    return path


def carry_digits(data: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt2", "test.npz"):
        shutil.copyfile(_need(data / name), out / name)


def minilm_reference(folder: Path, config: dict, sentences: list[str]) -> np.ndarray:
    """Embeddings of ``sentences`` by the fp32 model in ``folder``, batches of ``BATCH``."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    sys.path.insert(0, str(ROOT))
    from kiln.examples import minilm

    model = minilm(**config)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    model.eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    parts = []
    with torch.inference_mode():
        for start in range(0, len(sentences), BATCH):
            encoded = tokenizer.encode_batch(sentences[start : start + BATCH])
            ids = torch.tensor([e.ids for e in encoded], dtype=torch.int64)
            mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64)
            parts.append(model(ids, mask).float().numpy())
    return np.concatenate(parts)


def carry_minilm(data: Path, out: Path) -> None:
    import torch
    import yaml
    from safetensors.torch import load_file, save_file

    folder = _need(data / "model")
    out.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load(_need(folder / "kiln.yaml").read_text())
    config = dict(spec["config"])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(_need(folder / "tokenizer.json"), out / "tokenizer.json")

    state = load_file(_need(folder / spec["weights"]))
    half = {
        k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
    }
    save_file(
        half,
        out / "model.fp16.safetensors",
        metadata={"format": "pt", "source": "kiln.examples.minilm weights, cast to fp16"},
    )

    with np.load(_need(data / "sentences.npz"), allow_pickle=False) as npz:
        sentences = [str(s) for s in npz["inputs"][:N_SENTENCES]]
    if len(sentences) < N_SENTENCES:
        raise SystemExit(f"sentences.npz holds {len(sentences)} sentences, need {N_SENTENCES}")
    (out / "sentences.json").write_text(json.dumps(sentences, indent=0) + "\n")
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    np.save(out / "reference.npy", minilm_reference(folder, config, sentences))


def locked_versions(lock: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of ``lock`` (names normalised)."""
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.split(";")[0].strip()
    return pins


def carry_wheels(out: Path, wheels_for: str, lock: Path) -> None:
    """``pip download`` the engine's wheels (no dependencies: WHEELS lists them all) into
    ``out``, for the GPU machine's Python and platform or for this interpreter."""
    pins = locked_versions(lock)
    missing = [name for name in WHEELS if name not in pins]
    if missing:
        raise SystemExit(f"{lock} pins no version of {', '.join(missing)}: run `make lock`")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(out),
    ]
    if wheels_for == "gpu":
        command += ["--python-version", GPU_PYTHON, "--implementation", "cp"]
        command += [arg for platform in GPU_PLATFORMS for arg in ("--platform", platform)]
    command += [f"{name}=={pins[name]}" for name in WHEELS]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "ERROR" in line] or [
            proc.stderr.strip()[-500:]
        ]
        raise SystemExit(
            f"pip download of the engine's wheels failed (PyPI unreachable?): {errors[0]}"
        )
    found = sorted(p.name for p in out.glob("*.whl"))
    if len(found) != len(WHEELS):
        raise SystemExit(f"expected {len(WHEELS)} wheels in {out}, found {found}")


def travelling_tree_bytes() -> int | None:
    """Bytes of the files the device tool sends besides ``carry`` (tracked, and untracked but
    not ignored), or None where git cannot say."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=ROOT / "data",
        help="folder holding digits/ and minilm/ as dvc repro writes them",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "gpu-carry",
        help="the carry folder to (re)build",
    )
    parser.add_argument(
        "--wheels-for",
        choices=("gpu", "here"),
        default="gpu",
        help=f"download the engine's wheels for the GPU machine (CPython "
        f"{GPU_PYTHON}, manylinux x86_64) or for this interpreter (tests)",
    )
    parser.add_argument(
        "--lock",
        type=Path,
        default=ROOT / "requirements.lock",
        help="where the wheels' versions are pinned",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.out.exists():
        shutil.rmtree(args.out)
    carry_digits(args.data_root / "digits", args.out / "digits")
    carry_minilm(args.data_root / "minilm", args.out / "minilm")
    carry_wheels(args.out / "wheels", args.wheels_for, args.lock)

    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    manifest = {
        "files": {
            str(p.relative_to(args.out)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in files
        },
        "n_sentences": N_SENTENCES,
        "wheels_for": args.wheels_for,
        "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    total = sum(f["bytes"] for f in manifest["files"].values())
    manifest["total_bytes"] = total
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total += (args.out / "manifest.json").stat().st_size

    for name, entry in manifest["files"].items():
        print(f"  {entry['bytes'] / MIB:8.2f} MiB  {name}")
    wheels = sum(e["bytes"] for n, e in manifest["files"].items() if n.startswith("wheels/"))
    print(f"  {wheels / MIB:8.2f} MiB  in {len(WHEELS)} wheels (for {args.wheels_for})")
    print(
        f"{args.out}: {total / MIB:.2f} MiB in {len(files) + 1} files "
        f"(limit {LIMIT_MIB} MiB); built in {time.perf_counter() - started:.1f}s"
    )
    tree = travelling_tree_bytes()
    if tree is not None:
        print(
            f"working tree that travels besides it: {tree / MIB:.2f} MiB; together "
            f"{(tree + total) / MIB:.2f} MiB of the device tool's {TOOL_LIMIT_MIB} MiB"
        )
    if total >= LIMIT_MIB * MIB:
        print(
            f"error: the carry folder is {total / MIB:.2f} MiB, over {LIMIT_MIB} MiB",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
