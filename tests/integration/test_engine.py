"""The LitServe engine with real processes: `python -m serving.engine` serving the digits CNN
(its selected ONNX Runtime fp32 artifact) on a free 127.0.0.1 port, called with the gateway's
wire format; plus the loader in-process (sha256 refusal, tokenizer)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from kiln.processes import group_members
from serving.engine import start_engine_process, stop_engine_process
from serving.wire import decode_tensor, encode_tensor
from tests.conftest import copy_home, digits_eager_logits, digits_rows, free_port, kiln_env

READY_TIMEOUT_S = 90.0


class Engine:
    """One engine process group on a free port, logging to a file; stopped by ``stop``."""

    def __init__(self, home: Path, version: str, **env: str) -> None:
        self.version = version
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"engine-{self.port}.log"
        self.started = time.monotonic()
        self.proc = start_engine_process(
            "digits", version, self.port, env=kiln_env(home, **env), log_path=self.log
        )
        self.client = httpx.Client(timeout=30)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> list[str]:
        """Poll /health until 200; returns what each poll saw. At the first 200 the log must
        already say the model was warmed up."""
        seen: list[str] = []
        while time.monotonic() - self.started < timeout:
            assert self.proc.poll() is None, f"engine exited {self.proc.returncode}:\n{self.tail()}"
            try:
                status = self.client.get(self.url + "/health", timeout=2).status_code
            except httpx.TransportError:
                seen.append("refused")
            else:
                seen.append(str(status))
                if status == 200:
                    assert "warmed up" in self.log.read_text(), self.tail()
                    return seen
            time.sleep(0.05)
        raise AssertionError(f"engine not ready in {timeout} s:\n{self.tail()}")

    def predict(
        self, x: np.ndarray, *, deadline: float | None = None, **extra: Any
    ) -> httpx.Response:
        doc = {
            "model": "digits",
            "version": self.version,
            "deadline": deadline,
            "inputs": [encode_tensor("x", x)],
            "outputs": None,
            **extra,
        }
        return self.client.post(self.url + "/predict", json=doc)

    def stats(self) -> dict[str, int]:
        return self.client.get(self.url + "/stats").json()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        self.client.close()
        stop_engine_process(self.proc, timeout_s=15)


def _served_version(home: Path) -> str:
    from kiln.registry import crud
    from kiln.registry.db import session_scope
    from kiln.settings import Settings

    with session_scope(Settings(home=home).db_url) as session:
        return crud.require_version(session=session, name="digits").version


def _outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    return dict(decode_tensor(t) for t in response.json()["outputs"])


@pytest.fixture(scope="module")
def engine_home(validated_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_home(validated_home, tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def engine(engine_home: Path) -> Iterator[Engine]:
    """The digits engine, started once for the module; the first test checks its readiness."""
    running = Engine(engine_home, _served_version(engine_home))
    try:
        yield running
    finally:
        running.stop()


def test_health_turns_200_only_after_warm_up(engine: Engine) -> None:
    seen = engine.wait_ready()
    assert seen[-1] == "200"
    assert all(s in ("refused", "503") for s in seen[:-1])
    listening = [
        c.laddr
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == engine.port
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)


def test_predictions_match_eager_torch(engine: Engine, examples: Path) -> None:
    engine.wait_ready()
    x, labels = digits_rows(examples)
    want = digits_eager_logits(examples, x)
    response = engine.predict(x)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert (doc["model_name"], doc["model_version"]) == ("digits", engine.version)
    assert doc["batch_size"] == 64 and doc["engine_ms"] >= 0
    logits = _outputs(response)["output"]
    assert logits.shape == (64, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == want.argmax(1)).all()
    assert float((logits.argmax(1) == labels).mean()) > 0.9


def test_concurrent_requests_are_batched(engine: Engine, examples: Path) -> None:
    engine.wait_ready()
    x, _ = digits_rows(examples, 48)
    want = digits_eager_logits(examples, x)

    def one(i: int) -> tuple[int, np.ndarray, int]:
        with httpx.Client(timeout=30) as client:
            doc = {
                "model": "digits",
                "version": engine.version,
                "deadline": None,
                "inputs": [encode_tensor("x", x[i : i + 1])],
                "outputs": None,
            }
            response = client.post(engine.url + "/predict", json=doc)
            assert response.status_code == 200, response.text
            return i, _outputs(response)["output"], response.json()["batch_size"]

    before = engine.stats()
    batch_sizes = []
    for _ in range(5):  # rounds of 48 concurrent one-row requests, until some were batched
        with concurrent.futures.ThreadPoolExecutor(48) as pool:
            results = list(pool.map(one, range(48)))
        for i, logits, _size in results:  # each answer carries its own row
            np.testing.assert_allclose(logits[0], want[i], rtol=1e-4, atol=1e-4)
        batch_sizes += [size for _, _, size in results]
        if max(batch_sizes) > 1:
            break
    assert max(batch_sizes) > 1, batch_sizes
    after = engine.stats()
    assert after["served"] - before["served"] == len(batch_sizes)
    assert after["model_calls"] - before["model_calls"] < len(batch_sizes)


def test_bad_requests_name_the_field(engine: Engine, examples: Path) -> None:
    engine.wait_ready()
    x, _ = digits_rows(examples, 2)
    cases = [
        (engine.predict(x.astype(np.float64)), 400, "'x' must be FP32"),
        (engine.predict(x[:, :, :4]), 400, "'x' has shape [2, 1, 4, 8]"),
        (engine.predict(np.full_like(x, np.nan)), 400, "'x' holds NaN"),
        (engine.predict(x, outputs=["probabilities"]), 400, "unknown output 'probabilities'"),
        (engine.predict(x, version="9.9.9"), 404, "no version 9.9.9"),
        (engine.client.post(engine.url + "/predict", json={"model": 1}), 400, "'model'"),
    ]
    for response, status, detail in cases:
        assert response.status_code == status, response.text
        assert detail in response.json()["detail"]


def test_expired_deadline_is_504_and_never_runs(engine: Engine, examples: Path) -> None:
    engine.wait_ready()
    x, _ = digits_rows(examples, 4)
    before = engine.stats()
    response = engine.predict(x, deadline=time.time() - 0.5)
    assert response.status_code == 504
    assert "deadline" in response.json()["detail"]
    after = engine.stats()
    assert after["expired"] - before["expired"] == 1
    assert after["model_calls"] == before["model_calls"]  # the model never ran for it


def test_slow_model_nan_output_and_queued_expiry(
    engine_home: Path, examples: Path, tmp_path: Path
) -> None:
    """A model call takes 600 ms and outputs NaN: the running request gets a 500 with a JSON
    detail naming the output; one queued behind it with a 200 ms deadline gets 504 without
    running. Stopping the process group leaves no engine process alive."""
    home = copy_home(engine_home, tmp_path)
    engine = Engine(home, _served_version(home), KILN_ENGINE_FAULTS="delay_ms=600,nan_rate=1")
    try:
        engine.wait_ready()
        x, _ = digits_rows(examples, 4)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(engine.predict, x)
            time.sleep(0.2)  # the first request is in its model call now
            queued_at = time.monotonic()
            queued = pool.submit(engine.predict, x, deadline=time.time() + 0.2)
            first, second = slow.result(timeout=30), queued.result(timeout=30)
        assert first.status_code == 500
        assert "output 'output'" in first.json()["detail"]
        assert "NaN" in first.json()["detail"]
        assert second.status_code == 504, second.text
        assert time.monotonic() - queued_at < 5
        stats = engine.stats()
        assert stats["model_calls"] == 1 and stats["expired"] == 1 and stats["failed"] == 1
        members = group_members(engine.proc.pid)
        assert len(members) >= 2  # LitServe's main process and its worker(s)
    finally:
        engine.stop()
    time.sleep(0.2)
    assert group_members(engine.proc.pid) == []
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(engine.port) in " ".join(p.info["cmdline"] or [])
    ]


def test_bit_flipped_artifact_is_refused(engine_home: Path, tmp_path: Path) -> None:
    """docs/reliability.md scenario 20: a corrupt selected artifact is never loaded, in the engine
    process (it exits with a clear log line, never ready) or through the loader."""
    from kiln.errors import IntegrityError
    from kiln.settings import Settings
    from serving.loader import load_version, read_version

    home = copy_home(engine_home, tmp_path)
    version = _served_version(home)
    settings = Settings(home=home)
    artifact = home / read_version(settings, "digits", version).artifact.path
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))

    engine = Engine(home, version)
    try:
        assert engine.proc.wait(timeout=60) == 5  # IntegrityError's exit code
        assert "refusing to serve digits" in engine.tail()
        assert "is corrupt" in engine.tail()
    finally:
        engine.stop()
    with pytest.raises(IntegrityError, match="corrupt"):
        load_version(settings, "digits", version)
    artifact.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(IntegrityError, match="corrupt"):
        load_version(settings, "digits", version)


def test_loader_tokenizes_text_like_optimize(examples: Path) -> None:
    """A text model's texts are tokenized with its tokenizer, padded to the call's longest."""
    from tokenizers import Tokenizer

    from kiln.optimize.pipeline import tokenize
    from kiln.spec import ModelSpec
    from serving.loader import LoadedModel

    folder = examples / "minilm" / "model"
    spec = ModelSpec.model_validate(
        {
            "inputs": [
                {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
            ],
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}],
            "preprocess": {"file": "tokenizer.json", "max_length": 16},
        }
    )
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(16)
    tokenizer.enable_padding()
    calls: list[list[np.ndarray]] = []

    def runner(inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(inputs)
        return [inputs[1].astype(np.float32)]

    model = LoadedModel(
        name="minilm",
        version="1.0.0",
        spec=spec,
        runner=runner,
        memory_bytes=1,
        tokenizer=tokenizer,
    )
    texts = ["a short one", "a much longer sentence than the first one, by far " * 3]
    out = model({"text": np.array(texts, dtype=object)})
    want = tokenize(folder / "tokenizer.json", texts, max_length=16, names=spec.inputs)
    np.testing.assert_array_equal(calls[0][0], want[0])
    np.testing.assert_array_equal(calls[0][1], want[1])
    assert out["embedding"].shape == (2, 16)


def test_engine_loads_onnx_without_idle_spinning(engine_home: Path) -> None:
    """An engine's ONNX Runtime session stops its intra-op threads spinning when a call returns
    (``session.force_spinning_stop``), so between requests the CPU goes to the engine's server
    and the gateway; the optimize stage's timing loads the same artifact with spinning on."""
    from kiln.backends import get_backend
    from kiln.settings import Settings
    from serving.loader import load_version, read_version

    settings = Settings(home=engine_home)
    version = _served_version(engine_home)
    loaded = load_version(settings, "digits", version)
    assert loaded.backend == "onnxruntime", loaded.backend  # what digits' optimize selects
    key = "session.force_spinning_stop"
    served = loaded.runner._session.get_session_options()  # type: ignore[attr-defined]
    assert served.get_session_config_entry(key) == "1"
    assert loaded.runner.meta["force_spinning_stop"] is True  # type: ignore[attr-defined]

    record = read_version(settings, "digits", version)
    timed = get_backend("onnxruntime").load(engine_home / record.artifact.path, spec=record.spec)
    assert timed._session.get_session_options().get_session_config_entry(key) == "0"  # type: ignore[attr-defined]
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(loaded.runner([x])[0], timed([x])[0])
