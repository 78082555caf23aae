"""Model sources Kiln accepts, and the checks that run before any byte of them is loaded.

Accepted: a ``.pt2`` torch.export archive, an ``.onnx`` file, a folder with ``kiln.yaml``
(factory + safetensors weights + input spec). Refused: pickles, URLs, archives or external data
escaping their folder, links, oversized files (docs/reliability.md scenarios 15-19).
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from kiln.errors import InvalidInput, TooLarge, UnsafeSource
from kiln.spec import Preprocess, TensorSpec

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:(//|\\\\)|^(//|\\\\)")
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".mar"}
FIX_FORMAT = (
    "export it with torch.export.save(...) to a .pt2 archive, to .onnx, or give a folder with "
    "kiln.yaml and safetensors weights"
)


class SourceFormat(StrEnum):
    pt2 = "pt2"
    onnx = "onnx"
    kiln = "kiln"  # a folder with kiln.yaml, stored as one deterministic tar


def validate_name(name: str) -> str:
    """A model name is a slug: lowercase letters, digits, '-' and '_', at most 64 characters."""
    if not NAME_RE.fullmatch(name or ""):
        raise InvalidInput(
            f"name {name!r} is not a slug: use lowercase letters, digits, '-' or '_' "
            "(1-64 characters, starting and ending with a letter or digit), e.g. 'digits'"
        )
    return name


class KilnYaml(BaseModel):
    """The ``kiln.yaml`` of a folder source."""

    task: str | None = None
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    config: dict[str, Any] = Field(default_factory=dict)
    weights: str
    inputs: list[TensorSpec] = Field(min_length=1)
    preprocess: Preprocess | None = None

    @field_validator("weights")
    @classmethod
    def _weights_inside(cls, weights: str) -> str:
        try:
            _check_member_name(weights)
        except UnsafeSource:
            raise ValueError("must be a relative path inside the folder") from None
        if not weights.endswith(".safetensors"):
            raise ValueError("weights must be a .safetensors file inside the folder")
        return weights


def read_kiln_yaml(folder: Path) -> KilnYaml:
    try:
        raw = yaml.safe_load((folder / "kiln.yaml").read_text())
        return KilnYaml.model_validate(raw)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"kiln.yaml is not valid YAML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "kiln.yaml"
        raise InvalidInput(f"kiln.yaml field {where}: {first['msg']}") from None


@dataclass(frozen=True)
class Source:
    """A source that passed the pre-load checks."""

    format: SourceFormat
    path: Path


def classify_source(source: str, *, max_bytes: int) -> Source:
    """Decide what ``source`` is, refusing anything unsafe before reading it."""
    if URL_RE.match(source):
        raise UnsafeSource(
            f"SOURCE {source!r} is a URL; Kiln never fetches models: download and check it "
            "yourself, then pass the local path"
        )
    path = Path(source)
    if path.is_symlink():
        raise UnsafeSource(f"SOURCE {source!r} is a symbolic link: pass the file it points to")
    if not path.exists():
        raise InvalidInput(f"SOURCE {source!r} does not exist: pass a .pt2, .onnx or a folder")
    if path.is_dir():
        if not (path / "kiln.yaml").is_file():
            raise InvalidInput(f"folder {source!r} has no kiln.yaml: {FIX_FORMAT}")
        _check_folder(path, max_bytes=max_bytes)
        return Source(SourceFormat.kiln, path)
    _check_size(path, max_bytes)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        check_pt2(path, max_bytes=max_bytes)
        return Source(SourceFormat.pt2, path)
    if suffix == ".onnx":
        check_onnx(path)
        return Source(SourceFormat.onnx, path)
    if suffix in PICKLE_SUFFIXES or _looks_pickled(path):
        raise UnsafeSource(
            f"{path.name} is a pickled PyTorch file, which Kiln never loads (unpickling runs "
            f"arbitrary code): {FIX_FORMAT}"
        )
    raise InvalidInput(f"{path.name}: unknown model format; {FIX_FORMAT}")


def _check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise TooLarge(
            f"{path.name} is {size} bytes, over the limit of {max_bytes}: "
            "raise KILN_MAX_UPLOAD_BYTES if this is expected"
        )


def _looks_pickled(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("data.pkl") for n in zf.namelist())
    return False


def _check_member_name(name: str) -> None:
    """Refuse absolute paths, drive letters, backslashes and '..' (zip-slip)."""
    posix = PurePosixPath(name)
    if (
        not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or re.match(r"^[A-Za-z]:", name)
        or ".." in posix.parts
    ):
        raise UnsafeSource(f"archive member or path {name!r} points outside its folder")


def check_pt2(path: Path, *, max_bytes: int) -> None:
    """A torch.export archive: a zip with ``archive_format``, no pickles, no escaping members."""
    if not zipfile.is_zipfile(path):
        raise InvalidInput(f"{path.name} is not a .pt2 archive (not a zip): {FIX_FORMAT}")
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        total = 0
        for info in infos:
            _check_member_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeSource(f"archive member {info.filename!r} is a symbolic link")
            total += info.file_size
        if total > max_bytes:
            raise TooLarge(f"{path.name} unpacks to {total} bytes, over the limit of {max_bytes}")
        names = [i.filename for i in infos]
        if any(n.endswith("data.pkl") for n in names):
            raise UnsafeSource(
                f"{path.name} is a torch.save pickle renamed to .pt2; Kiln never unpickles "
                f"models: {FIX_FORMAT}"
            )
        if not any(n.endswith("archive_format") for n in names):
            raise InvalidInput(f"{path.name} is not a torch.export archive: {FIX_FORMAT}")


def onnx_external_files(path: Path) -> list[Path]:
    """The external-data files an ONNX model names, each checked to stay in its folder."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise InvalidInput(f"{path.name} is not a valid ONNX model: {type(exc).__name__}") from None
    folder = path.parent.resolve()
    files: list[Path] = []
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        _check_member_name(location)
        target = (folder / location).resolve()
        if not target.is_relative_to(folder) or (folder / location).is_symlink():
            raise UnsafeSource(f"ONNX external data {location!r} points outside the model folder")
        if not target.is_file():
            raise InvalidInput(f"ONNX external data {location!r} is missing beside {path.name}")
        if target not in files:
            files.append(target)
    return files


def check_onnx(path: Path) -> None:
    onnx_external_files(path)


def _check_folder(folder: Path, *, max_bytes: int) -> None:
    total = 0
    for entry in sorted(folder.rglob("*")):
        if entry.is_symlink():
            raise UnsafeSource(f"{entry.relative_to(folder)} is a symbolic link; copy the file in")
        if entry.is_file():
            total += entry.stat().st_size
        elif not entry.is_dir():
            raise UnsafeSource(f"{entry.relative_to(folder)} is not a regular file")
    if total > max_bytes:
        raise TooLarge(f"folder {folder.name} holds {total} bytes, over the limit of {max_bytes}")
    config = read_kiln_yaml(folder)
    if not (folder / config.weights).is_file():
        raise InvalidInput(f"kiln.yaml names weights {config.weights!r}, missing in the folder")
    if config.preprocess and not (folder / config.preprocess.file).is_file():
        raise InvalidInput(f"kiln.yaml names {config.preprocess.file!r}, missing in the folder")


def pack_folder(folder: Path, dest: Path) -> Path:
    """Write ``folder`` as a deterministic tar (sorted, zero mtimes and owners) at ``dest``."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = entry.relative_to(folder).as_posix()
            if any(part.startswith(".") or part == "__pycache__" for part in rel.split("/")):
                continue
            info = tarfile.TarInfo(rel)
            info.size = entry.stat().st_size
            info.mode = 0o644
            with entry.open("rb") as fh:
                tar.addfile(info, fh)
    return dest


def unpack_folder(archive: Path, dest: Path) -> Path:
    """Extract a packed folder with tarfile's 'data' filter (no links, no escapes)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r") as tar:
        for member in tar.getmembers():
            _check_member_name(member.name)
            if not member.isfile():
                raise UnsafeSource(f"archive member {member.name!r} is not a regular file")
        tar.extractall(dest, filter="data")
    return dest
