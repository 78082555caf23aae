"""Upload end to end through the real `kiln` CLI: formats, no-ops, conflicts, refusals, crashes.

Every refusal checks both the error (exit code, one line naming the fix) and that nothing
changed: registry rows, stored objects and the DVC remote are as before.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import export_linear, run_kiln


def _files(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def snapshot(home: Path) -> dict:
    """Everything an upload may change: the registry's rows and the stored bytes."""
    registry = {}
    db = home / "registry.db"
    if db.exists():
        import sqlite3

        with sqlite3.connect(db) as conn:
            for table in ("model", "modelversion", "artifact", "dataset"):
                registry[table] = conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
    return {
        "registry": registry,
        "objects": _files(home / "objects"),
        "remote": _files(home / "dvc-remote"),
        "staging": _files(home / "tmp"),
    }


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole of stdout is one JSON document


def _refused(proc, *, code: int = 2, match: str = "") -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    if match:
        assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def registered(kiln_home: Path, tiny_pt2: Path) -> dict:
    """tiny@0.1.0 registered, with its dataset."""
    return _json(run_kiln("upload", "tiny", str(tiny_pt2), "--task", "classification", "--json"))


def test_upload_registers_hashes_and_tracks(
    registered: dict, kiln_home: Path, tiny_pt2: Path
) -> None:
    sha = hashlib.sha256(tiny_pt2.read_bytes()).hexdigest()
    assert registered["version"] == "0.1.0" and registered["sha256"] == sha
    assert registered["status"] == "uploaded" and registered["created"] is True
    shown = _json(run_kiln("show", "tiny", "--json"))
    assert set(shown) >= {"name", "version", "status", "artifacts", "jobs"}
    [artifact] = shown["artifacts"]
    assert set(artifact) >= {"kind", "backend", "precision", "sha256", "path", "selected"}
    assert artifact["sha256"] == sha and artifact["selected"] is True
    assert hashlib.sha256(Path(artifact["path"]).read_bytes()).hexdigest() == sha
    assert Path(artifact["path"]).is_relative_to(kiln_home / "objects")
    assert Path(artifact["path"] + ".dvc").is_file()
    spec = shown["spec"]
    assert spec["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert spec["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    models = _json(run_kiln("models", "--json"))
    assert models == {
        "models": [
            {
                "name": "tiny",
                "task": "classification",
                "versions": [{"version": "0.1.0", "status": "uploaded", "sha256": sha}],
            }
        ]
    }


def test_same_content_is_a_noop_and_new_content_bumps_the_patch(
    registered: dict, kiln_home: Path, tiny_pt2: Path, tmp_path: Path
) -> None:
    before = snapshot(kiln_home)
    again = _json(run_kiln("upload", "tiny", str(tiny_pt2), "--json"))
    assert again["version"] == "0.1.0" and again["created"] is False
    assert snapshot(kiln_home) == before
    other = export_linear(tmp_path / "other.pt2", seed=1)
    bumped = _json(run_kiln("upload", "tiny", str(other), "--json"))
    assert bumped["version"] == "0.1.1" and bumped["created"] is True


def test_same_version_other_content_is_refused(
    registered: dict, kiln_home: Path, tmp_path: Path
) -> None:
    before = snapshot(kiln_home)
    other = export_linear(tmp_path / "other.pt2", seed=2)
    _refused(
        run_kiln("upload", "tiny", str(other), "--version", "0.1.0"), code=4, match="immutable"
    )
    assert snapshot(kiln_home) == before


# ---------------------------------------------------------------- refusals (RELIABILITY 15-19)
class Marker:
    """Unpickling this writes a marker file: the proof that a pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("filename", ["model.pt", "model.pth", "weights.bin", "model.pkl"])
def test_pickled_module_refused_and_never_run(
    registered: dict, kiln_home: Path, tmp_path: Path, filename: str
) -> None:
    marker = tmp_path / "pwned"
    source = tmp_path / filename
    source.write_bytes(pickle.dumps(Marker(marker)))
    before = snapshot(kiln_home)
    line = _refused(run_kiln("upload", "tiny", str(source)))
    assert ".pt2" in line and ".onnx" in line and "kiln.yaml" in line
    assert not marker.exists()
    assert snapshot(kiln_home) == before


def test_torch_save_archive_refused_and_never_run(
    registered: dict, kiln_home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    source = tmp_path / "model.pt2"
    torch.save({"m": Marker(marker)}, str(source))  # a zip with data.pkl, renamed .pt2
    before = snapshot(kiln_home)
    _refused(run_kiln("upload", "tiny", str(source)), match="pickle")
    assert not marker.exists() and snapshot(kiln_home) == before


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_url_sources_refused_and_never_fetched(
    registered: dict, kiln_home: Path, tiny_pt2: Path
) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        before = snapshot(kiln_home)
        port = server.server_address[1]
        for url in (
            f"http://127.0.0.1:{port}/model.pt2",
            "file:///etc/passwd",
            "http://169.254.169.254/latest/model.onnx",
        ):
            _refused(run_kiln("upload", "tiny", url), match="URL")
        _refused(
            run_kiln(
                "upload", "tiny", str(tiny_pt2), "--dataset", f"http://127.0.0.1:{port}/d.npz"
            ),
            match="URL",
        )
        assert _Recorder.hits == 0 and snapshot(kiln_home) == before
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "%2e%2e", "UPPER", "x-"])
def test_bad_names_refused(registered: dict, kiln_home: Path, tiny_pt2: Path, name: str) -> None:
    before = snapshot(kiln_home)
    _refused(run_kiln("upload", name, str(tiny_pt2)), match="slug")
    assert snapshot(kiln_home) == before


@pytest.mark.parametrize("member", ["../../escaped.txt", "/tmp/kiln-absolute-escape.txt"])
def test_escaping_archives_refused(
    registered: dict, kiln_home: Path, tmp_path: Path, tiny_pt2: Path, member: str
) -> None:
    source = tmp_path / "evil.pt2"
    shutil_copy = zipfile.ZipFile(tiny_pt2)
    with zipfile.ZipFile(source, "w") as out:
        for info in shutil_copy.infolist():
            out.writestr(info, shutil_copy.read(info))
        out.writestr(member, "escaped")
    before = snapshot(kiln_home)
    _refused(run_kiln("upload", "tiny", str(source)), match="outside")
    assert snapshot(kiln_home) == before
    assert not (tmp_path.parent / "escaped.txt").exists()
    assert not Path("/tmp/kiln-absolute-escape.txt").exists()


def test_onnx_external_data_outside_refused(
    registered: dict, kiln_home: Path, tmp_path: Path
) -> None:
    from tests.unit.test_formats import _onnx_with_external

    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    folder = tmp_path / "onnx"
    folder.mkdir()
    before = snapshot(kiln_home)
    _refused(
        run_kiln("upload", "tiny", str(_onnx_with_external(folder, "../secret.bin"))),
        match="outside",
    )
    assert snapshot(kiln_home) == before


def test_oversized_files_refused(registered: dict, kiln_home: Path, tiny_pt2: Path) -> None:
    before = snapshot(kiln_home)
    _refused(
        run_kiln("upload", "tiny", str(tiny_pt2), env={"KILN_MAX_UPLOAD_BYTES": "1000"}),
        match="KILN_MAX_UPLOAD_BYTES",
    )
    assert snapshot(kiln_home) == before


def test_model_that_fails_to_run_is_refused(
    registered: dict, kiln_home: Path, tmp_path: Path
) -> None:
    folder = _folder_model(tmp_path, factory_body="raise RuntimeError('boom in factory')")
    before = snapshot(kiln_home)
    line = _refused(run_kiln("upload", "tiny", str(folder)))
    assert "boom in factory" in line
    assert snapshot(kiln_home) == before


def test_model_load_timeout(registered: dict, kiln_home: Path, tmp_path: Path) -> None:
    folder = _folder_model(tmp_path, factory_body="import time; time.sleep(60)")
    before = snapshot(kiln_home)
    _refused(
        run_kiln("upload", "tiny", str(folder), env={"KILN_LOAD_TIMEOUT_S": "3"}),
        match="KILN_LOAD_TIMEOUT_S",
    )
    assert snapshot(kiln_home) == before


# ---------------------------------------------------------------- kiln.yaml folders, ONNX
def _folder_model(tmp_path: Path, *, factory_body: str = "") -> Path:
    folder = tmp_path / "folder-model"
    folder.mkdir(exist_ok=True)
    (folder / "tinyfactory.py").write_text(
        "import torch\n\n"
        "def build(hidden: int = 5):\n"
        f"    {factory_body or 'pass'}\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(hidden, 1))\n"
    )
    torch.manual_seed(0)
    state = {
        "0.weight": torch.randn(5, 3),
        "0.bias": torch.randn(5),
        "2.weight": torch.randn(1, 5),
        "2.bias": torch.randn(1),
    }
    save_file(state, str(folder / "weights.safetensors"))
    (folder / "kiln.yaml").write_text(
        "task: regression\nfactory: tinyfactory:build\nconfig: {hidden: 5}\n"
        "weights: weights.safetensors\ninputs:\n  - {name: features, datatype: FP32, "
        "shape: [-1, 3]}\n"
    )
    return folder


def test_kiln_yaml_folder_with_dataset(kiln_home: Path, tmp_path: Path) -> None:
    folder = _folder_model(tmp_path)
    data = tmp_path / "reg.npz"
    rng = np.random.default_rng(0)
    np.savez(
        data, inputs=rng.random((20, 3), dtype=np.float32), labels=rng.random(20).astype(np.float32)
    )
    result = _json(run_kiln("upload", "reg", str(folder), "--dataset", str(data), "--json"))
    assert result["version"] == "0.1.0" and result["dataset"]["check_passed"] is True
    shown = _json(run_kiln("show", "reg@0.1.0", "--json"))
    assert shown["task"] == "regression" and shown["source_format"] == "kiln"
    assert shown["spec"]["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 1]}]
    assert shown["datasets"][0]["rows"] == 20
    # the packed folder is deterministic: the same folder again is a no-op
    assert _json(run_kiln("upload", "reg", str(folder), "--json"))["created"] is False


def test_failing_dataset_is_reported_and_not_used(
    kiln_home: Path, tiny_pt2: Path, tmp_path: Path
) -> None:
    data = tmp_path / "bad.npz"
    inputs = np.random.default_rng(0).random((10, 4), dtype=np.float32)
    inputs[3, 1] = np.nan
    np.savez(data, inputs=inputs, labels=np.array([0, 1, 2, 7, 0, 1, 2, 0, 1, 2]))
    proc = run_kiln("upload", "tiny", str(tiny_pt2), "--dataset", str(data), "--json")
    result = _json(proc)
    assert result["dataset"]["check_passed"] is False
    failures = " ".join(result["dataset"]["failures"])
    assert "expect_column_values_to_be_between" in failures  # label 7 of 3 classes, and NaN
    from kiln.registry import crud
    from kiln.registry.db import session_scope
    from kiln.settings import get_settings

    with session_scope(get_settings().db_url) as session:
        version = crud.require_version(session=session, name="tiny")
        assert crud.dataset_for(session=session, version=version) is None


def test_onnx_upload(kiln_home: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(2, 3, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = _json(run_kiln("upload", "mm", str(path), "--task", "regression", "--json"))
    shown = _json(run_kiln("show", "mm", "--json"))
    assert result["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert shown["spec"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    assert shown["artifacts"][0]["backend"] == "onnxruntime"


# ---------------------------------------------------------------- crash safety (RELIABILITY 19)
@pytest.mark.parametrize(
    "point", ["store.before_rename", "store.after_rename", "upload.before_commit"]
)
def test_killed_upload_leaves_nothing(kiln_home: Path, tiny_pt2: Path, point: str) -> None:
    proc = run_kiln(
        "upload", "tiny", str(tiny_pt2), "--task", "classification", env={"KILN_FAILPOINTS": point}
    )
    assert proc.returncode == -9  # SIGKILL
    # the next start sweeps what the killed one left, then the re-upload succeeds
    result = _json(run_kiln("upload", "tiny", str(tiny_pt2), "--task", "classification", "--json"))
    assert result["version"] == "0.1.0"
    assert result["sha256"] == hashlib.sha256(tiny_pt2.read_bytes()).hexdigest()
    state = snapshot(kiln_home)
    assert len(state["registry"]["modelversion"]) == 1
    assert [f for f in state["objects"] if not f.endswith((".dvc", ".gitignore"))] == [
        f"{result['sha256'][:2]}/{result['sha256']}.pt2"
    ]
    assert state["staging"] == []


def test_killed_upload_then_sweep_without_reupload(kiln_home: Path, tiny_pt2: Path) -> None:
    proc = run_kiln(
        "upload",
        "tiny",
        str(tiny_pt2),
        "--task",
        "classification",
        env={"KILN_FAILPOINTS": "upload.before_commit"},
    )
    assert proc.returncode == -9
    assert snapshot(kiln_home)["registry"]["modelversion"] == []
    other = run_kiln("upload", "x", "missing.pt2")  # any later start sweeps first
    assert other.returncode == 2
    state = snapshot(kiln_home)
    assert [f for f in state["objects"] if not f.endswith(".gitignore")] == []
