"""Pre-load checks of model sources: names, URLs, pickles, archives, ONNX external data."""

from __future__ import annotations

import io
import pickle
import stat
import zipfile
from pathlib import Path

import pytest

from kiln.errors import InvalidInput, TooLarge, UnsafeSource
from kiln.intake.formats import SourceFormat, classify_source, pack_folder, validate_name

BIG = 1 << 30


@pytest.mark.parametrize("name", ["digits", "breast-cancer", "minilm", "a", "m_2", "x" * 64])
def test_slug_names_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "../x", "a/b", "..", "%2e%2e", "Digits", "a b", "-a", "a-", "x" * 65, "a\x00b", "ä"],
)
def test_non_slug_names_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="not a slug"):
        validate_name(name)


@pytest.mark.parametrize(
    "source",
    [
        "http://127.0.0.1:8080/model.pt2",
        "https://example.com/m.onnx",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "//host/share/m.pt2",
        "s3://bucket/m.pt2",
    ],
)
def test_urls_refused(source: str) -> None:
    with pytest.raises(UnsafeSource, match="URL"):
        classify_source(source, max_bytes=BIG)


def test_pickle_refused_without_loading(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(UnsafeSource, match=r"\.pt2.*\.onnx.*kiln\.yaml"):
        classify_source(str(path), max_bytes=BIG)


def test_pickle_renamed_to_pt2_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data.pkl", pickle.dumps(1))
        zf.writestr("model/archive_format", "pt2")
    with pytest.raises(UnsafeSource, match="pickle"):
        classify_source(str(path), max_bytes=BIG)


def _zip_with(tmp_path: Path, member: str, *, symlink: bool = False) -> Path:
    path = tmp_path / "evil.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/archive_format", "pt2")
        info = zipfile.ZipInfo(member)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd" if symlink else "x")
    return path


@pytest.mark.parametrize(
    "member", ["../escape.txt", "m/../../escape.txt", "/etc/cron.d/x", "C:/windows/x", "m\\..\\x"]
)
def test_zip_slip_refused(tmp_path: Path, member: str) -> None:
    with pytest.raises(UnsafeSource, match="outside"):
        classify_source(str(_zip_with(tmp_path, member)), max_bytes=BIG)


def test_zip_symlink_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeSource, match="symbolic link"):
        classify_source(str(_zip_with(tmp_path, "m/link", symlink=True)), max_bytes=BIG)


def test_zip_bomb_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/archive_format", "pt2")
        zf.writestr("m/data/weights/w", b"\0" * 5_000_000)
    assert path.stat().st_size < 100_000
    with pytest.raises(TooLarge, match="unpacks"):
        classify_source(str(path), max_bytes=1_000_000)


def test_file_over_limit_refused(tiny_pt2: Path) -> None:
    with pytest.raises(TooLarge, match="KILN_MAX_UPLOAD_BYTES"):
        classify_source(str(tiny_pt2), max_bytes=100)


def test_symlinked_source_refused(tmp_path: Path, tiny_pt2: Path) -> None:
    link = tmp_path / "link.pt2"
    link.symlink_to(tiny_pt2)
    with pytest.raises(UnsafeSource, match="symbolic link"):
        classify_source(str(link), max_bytes=BIG)


def _onnx_with_external(folder: Path, location: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 2])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[tensor],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_onnx_external_data_traversal_refused(tmp_path: Path, location: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(UnsafeSource, match="outside"):
        classify_source(str(_onnx_with_external(folder, location)), max_bytes=BIG)


def test_onnx_external_data_inside_folder_accepted(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    source = classify_source(str(_onnx_with_external(tmp_path, "weights.bin")), max_bytes=BIG)
    assert source.format is SourceFormat.onnx


def test_not_onnx_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"definitely not protobuf \xff\xfe")
    with pytest.raises(InvalidInput):
        classify_source(str(path), max_bytes=BIG)


def _kiln_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "folder-model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"\0" * 8)
    (folder / "kiln.yaml").write_text(
        "task: regression\nfactory: mymodel:build\nweights: weights.safetensors\n"
        "inputs:\n  - {name: x, datatype: FP32, shape: [-1, 3]}\n"
    )
    return folder


def test_kiln_folder_with_symlink_refused(tmp_path: Path) -> None:
    folder = _kiln_folder(tmp_path)
    (folder / "link").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeSource, match="symbolic link"):
        classify_source(str(folder), max_bytes=BIG)


@pytest.mark.parametrize("weights", ["../w.safetensors", "/abs/w.safetensors", "w.bin"])
def test_kiln_yaml_weights_must_stay_inside(tmp_path: Path, weights: str) -> None:
    folder = _kiln_folder(tmp_path)
    (folder / "kiln.yaml").write_text(
        (folder / "kiln.yaml").read_text().replace("weights.safetensors", weights)
    )
    with pytest.raises(InvalidInput, match="weights"):
        classify_source(str(folder), max_bytes=BIG)


def test_kiln_yaml_errors_name_the_field(tmp_path: Path) -> None:
    folder = _kiln_folder(tmp_path)
    (folder / "kiln.yaml").write_text("factory: mymodel:build\nweights: weights.safetensors\n")
    with pytest.raises(InvalidInput, match="inputs"):
        classify_source(str(folder), max_bytes=BIG)


def test_pack_folder_is_deterministic(tmp_path: Path) -> None:
    folder = _kiln_folder(tmp_path)
    first = pack_folder(folder, tmp_path / "a.tar").read_bytes()
    (folder / "kiln.yaml").touch()  # a new mtime must not change the archive
    second = pack_folder(folder, tmp_path / "b.tar").read_bytes()
    assert first == second and len(first) > 0
    assert io.BytesIO(first).read(1)  # non-empty tar
