"""The gateway's inference log against a real `kiln serve` (gateway, supervisor, ONNX
Runtime engine) and a real SQLite registry: what is logged is what was sent and answered; a
stalled writer (the registry's write lock held by this test) fills the bounded queue, which
drops and counts while every request is still answered; the model's 500s and 504s are logged
with their status; the canary's replay takes logged requests. Sampling, write errors and
retention are checked on the log object itself (the same feeder, writer process and database,
no gateway), and so are the frame it sends the writer and the writer's restart after a kill.

One gateway serves the module (sample 1.0, a queue of 32, engine faults through a file the
tests write while it runs).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.registry import crud
from kiln.registry.db import dispose_engines, session_scope
from kiln.registry.records import decode
from kiln.registry.tables import InferenceRecord
from kiln.settings import Settings, get_settings
from serving.inference_log import FRAME, InferenceLog, Pending, pack, to_row, unpack
from serving.metrics import GatewayMetrics
from tests.conftest import RunningGateway, copy_home, deploy, digits_rows, infer_request

QUEUE = 32


@dataclass
class Logged:
    """The module's gateway and what tests need to talk to it and read its registry."""

    gw: RunningGateway
    home: Path
    faults: Path  # KILN_ENGINE_FAULTS_FILE: the engine re-reads it at most once a second
    version: str
    input: str
    x: np.ndarray
    client: httpx.Client

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.home / 'registry.db'}"

    def body(self, x: np.ndarray) -> dict[str, object]:
        return infer_request(self.input, x)

    def infer(self, x: np.ndarray, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.post(
            f"{self.gw.url}/v2/models/digits/infer", json=self.body(x), headers=headers or {}
        )

    def records(self, after: int) -> list[InferenceRecord]:
        with session_scope(self.db_url) as session:
            rows = crud.recent_inferences(session=session, model="digits", status=None)
            return sorted((r for r in rows if (r.id or 0) > after), key=lambda r: r.id or 0)

    def last_id(self) -> int:
        rows = self.records(0)
        return rows[-1].id or 0 if rows else 0

    def metric(self, name: str, **labels: str) -> float:
        text = self.client.get(f"{self.gw.url}/metrics").text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


def poll(until: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """``until()``'s first truthy value, polled until ``timeout`` (no timed assertions)."""
    deadline = time.monotonic() + timeout
    while True:
        value = until()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.1)


@pytest.fixture(scope="module")
def logged(
    validated_home: Path, examples: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Logged]:
    base = tmp_path_factory.mktemp("inference-log")
    home = copy_home(validated_home, base)
    faults = base / "faults"
    faults.write_text("")
    deploy(home)
    gw = RunningGateway(
        home,
        env={
            "KILN_INFERENCE_LOG_SAMPLE": "1.0",
            "KILN_INFERENCE_LOG_QUEUE": str(QUEUE),
            "KILN_ENGINE_FAULTS_FILE": str(faults),
        },
    )
    client = httpx.Client(headers=gw.headers, timeout=30)
    try:
        gw.wait_ready()
        meta = client.get(f"{gw.url}/v2/models/digits").json()
        x, _ = digits_rows(examples, 64)
        yield Logged(
            gw=gw,
            home=home,
            faults=faults,
            version=meta["versions"][0],
            input=meta["inputs"][0]["name"],
            x=x,
            client=client,
        )
    finally:
        client.close()
        gw.stop()
        dispose_engines()


def test_logged_records_are_what_was_sent_and_answered(logged: Logged) -> None:
    before = logged.last_id()
    sent = [logged.x[i : i + 1 + i % 3] for i in range(12)]  # 1 to 3 rows each
    answers = []
    for x in sent:
        resp = logged.infer(x)
        assert resp.status_code == 200, resp.text
        answers.append(resp.json()["outputs"])
    rows = poll(
        lambda: (r := logged.records(before)) and len(r) >= len(sent) and r,
        what=f"{len(sent)} records",
    )
    assert len(rows) == len(sent)
    by_input = {decode(r.input)[logged.input].tobytes(): r for r in rows}
    for x, outputs in zip(sent, answers, strict=True):
        rec = by_input[x.astype(np.float32).tobytes()]  # the input, exactly as sent
        assert (rec.model_name, rec.version, rec.status) == ("digits", logged.version, 200)
        assert rec.latency_ms > 0 and rec.batch_id is None  # the engine names no batch
        got = decode(rec.output)
        assert set(got) == {o["name"] for o in outputs}
        for out in outputs:
            answered = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
            np.testing.assert_array_equal(got[out["name"]].astype(np.float32), answered)
    assert logged.metric("kiln_inference_log_records_total", model="digits") >= len(sent)


def test_model_failures_are_logged_with_their_status(logged: Logged) -> None:
    before = logged.last_id()
    try:
        logged.faults.write_text("error_rate=1.0")
        failed = poll(
            lambda: (r := logged.infer(logged.x[5:6])).status_code == 500 and r,
            what="a 500 from the model",
        )
        logged.faults.write_text("delay_ms=600")
        late = poll(
            lambda: (
                (r := logged.infer(logged.x[6:7], {"X-Kiln-Deadline-Ms": "200"})).status_code == 504
                and r
            ),
            what="a 504 past the deadline",
        )
    finally:
        logged.faults.write_text("")
    assert failed.status_code == 500 and late.status_code == 504
    poll(lambda: logged.infer(logged.x[:1]).status_code == 200, what="the engine healthy again")
    refused = logged.client.post(
        f"{logged.gw.url}/v2/models/digits/infer",
        json={"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
    )
    assert refused.status_code == 400
    rows = poll(
        lambda: (r := logged.records(before)) and {500, 504} <= {x.status for x in r} and r,
        what="the 500 and the 504 logged",
    )
    for status, x in ((500, logged.x[5:6]), (504, logged.x[6:7])):
        rec = next(r for r in rows if r.status == status)
        np.testing.assert_array_equal(decode(rec.input)[logged.input], x)
        assert rec.output == {} and rec.version == logged.version
    assert all(r.status in (200, 500, 504) for r in rows)  # the 400 refusal is not logged


def test_full_queue_drops_and_counts_and_serving_goes_on(logged: Logged) -> None:
    """The registry's write lock held by this test stalls the writer process (its insert waits
    on SQLite's busy timeout), then the pipe to it, then the feeder: the queue fills, further
    samples are dropped and counted, and every request is still answered 200; released, the
    writer writes what it held, what the pipe held and what was queued."""
    dropped_before = logged.metric("kiln_inference_log_dropped_total", reason="queue_full")
    errors_before = logged.metric("kiln_inference_log_dropped_total", reason="write_error")
    before = logged.last_id()

    def mine(i: int) -> np.ndarray:  # this test's inputs: none other is offset by >= 1000
        return logged.x[i % 64 : i % 64 + 1] + np.float32(1000 + i)

    def written() -> list[InferenceRecord]:
        return [r for r in logged.records(before) if decode(r.input)[logged.input].min() >= 1000]

    lock = sqlite3.connect(logged.home / "registry.db", timeout=30, isolation_level=None)
    statuses: list[int] = []
    try:
        lock.execute("BEGIN IMMEDIATE")
        with ThreadPoolExecutor(4) as pool:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                statuses += pool.map(
                    lambda i: logged.infer(mine(i)).status_code,
                    range(len(statuses), len(statuses) + 40),
                )
                depth = logged.metric("kiln_inference_log_queue_depth")
                if (
                    depth == QUEUE
                    and logged.metric("kiln_inference_log_dropped_total", reason="queue_full")
                    > dropped_before
                ):
                    break
    finally:
        lock.rollback()
        lock.close()
    dropped = (
        logged.metric("kiln_inference_log_dropped_total", reason="queue_full") - dropped_before
    )
    assert dropped > 0 and depth == QUEUE
    assert statuses and set(statuses) == {200}
    kept = len(statuses) - int(dropped)
    rows = poll(
        lambda: len(r := written()) >= kept and r, what=f"{kept} records once the lock went"
    )
    assert len(rows) == kept
    assert logged.metric("kiln_inference_log_dropped_total", reason="write_error") == errors_before


def test_canary_replay_takes_logged_requests(
    logged: Logged, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasks.deploy import Standing, replay_inputs

    before = logged.last_id()  # this test logs its own traffic (it may run alone)
    for i in range(20):
        assert logged.infer(logged.x[i : i + 1]).status_code == 200
    poll(
        lambda: sum(r.status == 200 for r in logged.records(before)) >= 20,
        what="20 logged requests",
    )
    monkeypatch.setenv("KILN_HOME", str(logged.home))
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        st = Standing(
            model="digits",
            version=logged.version,
            status="production",
            task="classification",
            stable=logged.version,
            canary=None,
            canary_weight=0.0,
            model_settings={"rollout": {"replay_min_logged": 10}},
        )
        bodies = replay_inputs.fn(st, limit=20)
        assert len(bodies) == 20 and "replaying 20 logged requests" in capsys.readouterr().out
        with session_scope(logged.db_url) as session:
            newest = crud.recent_inferences(
                session=session, model="digits", version=logged.version, limit=20
            )
        sent = [np.asarray(orjson.loads(b)["inputs"][0]["data"], dtype=np.float32) for b in bodies]
        for body_data, rec in zip(sent, newest, strict=True):
            np.testing.assert_array_equal(body_data, decode(rec.input)[logged.input].reshape(-1))
        resp = logged.client.post(
            f"{logged.gw.url}/v2/models/digits/infer",
            content=bodies[0],
            headers={"Content-Type": "application/json"},
        )
        assert resp.status_code == 200, resp.text
        # too few logged: the validation dataset, and the flow's output says so
        thin = Standing(
            **{**st.__dict__, "model_settings": {"rollout": {"replay_min_logged": 10**6}}}
        )
        fallback = replay_inputs.fn(thin, limit=1000)
        assert "replaying the validation dataset" in capsys.readouterr().out
        assert len(fallback) > 20
        dataset = replay_inputs.fn(
            Standing(
                **{**st.__dict__, "model_settings": {"rollout": {"replay_source": "dataset"}}}
            ),
            limit=1000,
        )
        assert dataset == fallback
    finally:
        get_settings.cache_clear()


# --- the writer object on its own: sampling, write errors, retention (no gateway)
def _pending(i: int, at: float | None = None) -> Pending:
    x = np.full((1, 2), i, dtype=np.float32)
    return Pending("m", "1", {"x": x}, {"y": x * 2}, 1.0, 200, time.time() if at is None else at)


def _count(settings: Settings) -> int:
    with session_scope(settings.db_url) as session:
        return len(crud.recent_inferences(session=session, model="m", status=None))


def test_sampling_share_is_binomial(kiln_home: Path) -> None:
    settings = Settings(inference_log_sample=0.2)
    metrics = GatewayMetrics()
    sink = InferenceLog(settings, metrics)
    sink.start()
    n = 3000
    for i in range(n):
        sink.offer("m", "1", {"x": np.full((1, 2), i, dtype=np.float32)}, {}, 1.0, 200)
    sink.stop()
    logged = _count(settings)
    sigma = (n * 0.2 * 0.8) ** 0.5
    assert abs(logged - n * 0.2) <= 6 * sigma, logged
    assert (
        metrics.registry.get_sample_value("kiln_inference_log_records_total", {"model": "m"})
        == logged
    )


def test_sample_zero_starts_nothing_and_queues_nothing(kiln_home: Path) -> None:
    sink = InferenceLog(Settings(inference_log_sample=0.0), GatewayMetrics())
    sink.start()
    for i in range(100):
        sink.offer("m", "1", {"x": np.zeros((1, 2), np.float32)}, {}, 1.0, 200)
    assert sink._thread is None and sink.depth() == 0
    sink.stop()


def test_write_error_is_counted_and_the_writer_goes_on(kiln_home: Path) -> None:
    (kiln_home / "a-directory.db").mkdir(parents=True)  # SQLite cannot open it
    settings = Settings(
        inference_log_sample=1.0, database_url=f"sqlite:///{kiln_home / 'a-directory.db'}"
    )
    metrics = GatewayMetrics()
    sink = InferenceLog(settings, metrics)
    sink.start()

    def errors() -> float:
        return (
            metrics.registry.get_sample_value(
                "kiln_inference_log_dropped_total", {"reason": "write_error"}
            )
            or 0.0
        )

    for round_ in (1, 2):
        for _ in range(5):
            sink.offer("m", "1", {"x": np.zeros((1, 2), np.float32)}, {}, 1.0, 200)
        poll(lambda r=round_: errors() >= 5 * r, what="the failed batch counted")
        assert sink._thread is not None and sink._thread.is_alive()
    sink.stop()
    assert errors() == 10


def test_retention_purges_old_records(kiln_home: Path) -> None:
    settings = Settings(inference_log_sample=1.0, inference_log_retention_days=7)
    sink = InferenceLog(settings, GatewayMetrics())
    day = 86400.0
    assert (
        sink.write(
            [_pending(1, time.time() - 8 * day), _pending(2, time.time() - 6 * day), _pending(3)]
        )
        == 3
    )
    assert sink.purge() == 1
    with session_scope(settings.db_url) as session:
        kept = crud.recent_inferences(session=session, model="m", status=None)
        assert sorted(decode(r.input)["x"][0, 0] for r in kept) == [2.0, 3.0]
        assert decode(kept[0].output)["y"][0, 0] == 6.0


def test_frame_carries_every_tensor_kind_as_sent() -> None:
    """The rows the writer makes of a frame are the rows of the records the feeder packed:
    float (NaN too), int64, BYTES, a scalar, an empty float16 tensor; numeric tensors travel
    as raw bytes."""
    sent = [
        Pending(
            "m",
            "1.0.0",
            {
                "x": np.array([[1.5, np.nan], [-2.0, 3.0]], np.float32),
                "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
                "text": np.array([b"caf\xc3\xa9", b"\xff"], dtype=object),
            },
            {"y": np.float64(7.25), "none": np.zeros((0, 4), np.float16)},
            3.25,
            200,
            1_700_000_000.5,
            None,
        ),
        Pending("n", "2.0.0", {"x": np.ones((1, 2), np.uint8)}, {}, 1.0, 504, 1.0, "b1"),
    ]
    frame = pack(sent)
    meta_len, data_len = FRAME.unpack(frame[: FRAME.size])
    meta = orjson.loads(frame[FRAME.size : FRAME.size + meta_len])
    data = frame[FRAME.size + meta_len :]
    assert len(data) == data_len == 4 * 4 + 6 * 8 + 8 + 2  # every numeric tensor, raw
    got = unpack(meta, data)
    for a, row in zip(sent, got, strict=True):  # the rows the gateway's own thread would write
        assert orjson.dumps(to_row(a), option=orjson.OPT_SERIALIZE_NUMPY) == orjson.dumps(
            row, option=orjson.OPT_SERIALIZE_NUMPY
        )
    assert decode(got[0]["input"])["text"].tolist() == ["caf\u00e9", "\ufffd"]
    np.testing.assert_array_equal(decode(got[0]["input"])["ids"], sent[0].inputs["ids"])


def test_writer_process_runs_niced_and_a_killed_one_is_replaced(kiln_home: Path) -> None:
    """The writer is its own process at a lower CPU priority; killed with records it had not
    answered, those are counted (write_error) and the next records go to a new writer, none
    dropped while its start waits out RESPAWN_S."""
    settings = Settings(inference_log_sample=1.0)
    metrics = GatewayMetrics()
    sink = InferenceLog(settings, metrics)
    sink.start()

    def value(name: str, labels: dict[str, str]) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    def offer(n: int) -> None:
        for i in range(n):
            sink.offer("m", "1", {"x": np.full((1, 2), i, np.float32)}, {}, 1.0, 200)

    try:
        offer(5)
        poll(
            lambda: value("kiln_inference_log_records_total", {"model": "m"}) == 5,
            what="5 records written",
        )
        first = sink._writer
        assert first is not None
        assert (
            os.getpriority(os.PRIO_PROCESS, first.proc.pid)
            == os.getpriority(os.PRIO_PROCESS, 0) + 10
        )
        os.kill(first.proc.pid, signal.SIGSTOP)  # stalled: what it is sent stays unanswered
        offer(3)
        poll(lambda: first.sent == 8 and sink.depth() == 0, what="3 records in the pipe")
        os.kill(first.proc.pid, signal.SIGKILL)
        poll(
            lambda: value("kiln_inference_log_dropped_total", {"reason": "write_error"}) == 3,
            what="the 3 unanswered records counted",
        )
        sink._last_spawn = time.monotonic()  # as if just started: the restart waits RESPAWN_S
        offer(4)  # before the restart is due: they wait for it in the deque
        poll(
            lambda: value("kiln_inference_log_records_total", {"model": "m"}) == 9,
            what="4 more records through a new writer",
        )
        assert sink._writer is not None and sink._writer.proc.pid != first.proc.pid
        assert value("kiln_inference_log_dropped_total", {"reason": "write_error"}) == 3
    finally:
        sink.stop()
    assert _count(settings) == 9
