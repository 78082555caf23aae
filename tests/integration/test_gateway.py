"""The gateway with real processes: `kiln serve` (gateway + supervisor) and LitServe engines
serving the digits CNN, called by Triton's own HTTP client and by plain HTTP."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from tests.conftest import (
    RunningGateway,
    copy_home,
    deploy,
    digits_eager_logits,
    digits_rows,
    infer_request,
    set_model_settings,
)


def test_triton_client_gets_eager_predictions(
    served_digits: RunningGateway, examples: Path
) -> None:
    import tritonclient.http as triton

    x, labels = digits_rows(examples)
    want = digits_eager_logits(examples, x)
    client = triton.InferenceServerClient(url=served_digits.url.removeprefix("http://"))
    headers = served_digits.headers
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_model_metadata("digits", headers=dict(headers))
    in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    assert meta["inputs"] == [{"name": in_name, "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": out_name, "datatype": "FP32", "shape": [-1, 10]}]
    for binary in (True, False):  # Triton's binary extension (its default), then JSON tensors
        got = []
        for start in range(0, len(x), 16):
            chunk = x[start : start + 16]
            inp = triton.InferInput(in_name, list(chunk.shape), "FP32")
            inp.set_data_from_numpy(chunk, binary_data=binary)
            outputs = [triton.InferRequestedOutput(out_name, binary_data=binary)]
            # the client writes its own headers into the dict it is given: a fresh one each call
            result = client.infer("digits", [inp], outputs=outputs, headers=dict(headers))
            got.append(result.as_numpy(out_name))
        logits = np.concatenate(got)
        np.testing.assert_allclose(logits, want, rtol=1e-3, atol=1e-4)
        assert (logits.argmax(1) == want.argmax(1)).all()
        accuracy = float((logits.argmax(1) == labels).mean())
        assert accuracy > 0.9
    # one request pinned to the version, one single row, no outputs listed (all binary)
    inp = triton.InferInput(in_name, [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x[:1])
    result = client.infer("digits", [inp], model_version=meta["versions"][0], headers=dict(headers))
    assert result.as_numpy(out_name).argmax() == want[0].argmax()
    client.close()


def test_metadata_metrics_and_plain_json(served_digits: RunningGateway, examples: Path) -> None:
    x, _ = digits_rows(examples, 3)
    url, headers = served_digits.url, served_digits.headers
    meta = httpx.get(f"{url}/v2/models/digits", headers=headers).json()
    assert meta["name"] == "digits" and len(meta["versions"]) == 1
    version, in_name = meta["versions"][0], meta["inputs"][0]["name"]
    assert meta["platform"].startswith("kiln_")
    assert meta["inputs"][0]["shape"][1:] == [1, 8, 8]
    assert (
        httpx.get(f"{url}/v2/models/digits/versions/{version}/ready", headers=headers).status_code
        == 200
    )
    assert httpx.get(f"{url}/v2/models/digits/versions/9.9.9", headers=headers).status_code == 404
    body = {"id": "r1", **infer_request(in_name, x)}
    resp = httpx.post(f"{url}/v2/models/digits/infer", json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["id"] == "r1" and doc["model_version"] == version
    assert doc["outputs"][0]["shape"][0] == 3
    metrics = httpx.get(f"{url}/metrics", headers=headers).text
    for name in (
        "kiln_request_duration_seconds_bucket",
        "kiln_requests_total",
        "kiln_batch_size_bucket",
        "kiln_inflight_requests",
        "kiln_engine_up",
        "kiln_engine_resident_memory_bytes",
        "process_resident_memory_bytes",
    ):
        assert name in metrics, name
    assert 'stage="engine"' in metrics and 'stage="gateway"' in metrics


def test_killing_one_of_two_replicas_under_load_loses_no_request(
    validated_home: Path, tmp_path: Path, examples: Path
) -> None:
    home = copy_home(validated_home, tmp_path)
    set_model_settings(home, "digits", {"serving": {"min_replicas": 2, "max_replicas": 2}})
    deploy(home)
    gateway = RunningGateway(home)
    try:
        gateway.wait_ready()
        engines = _engine_pids(gateway)
        deadline = time.monotonic() + 120
        while len(engines) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            engines = _engine_pids(gateway)
        assert len(engines) == 2, gateway.tail()
        x, _ = digits_rows(examples, 8)
        body = json.dumps(infer_request("x", x[:1]))
        results: list[int] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(
                headers={**gateway.headers, "Content-Type": "application/json"}, timeout=30
            ) as http:
                while not stop.is_set():
                    try:
                        code = http.post(
                            f"{gateway.url}/v2/models/digits/infer", content=body
                        ).status_code
                    except httpx.TransportError:
                        code = -1
                    results.append(code)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        before = len(results)
        os.killpg(engines[0], signal.SIGKILL)  # one replica dies mid-traffic
        time.sleep(4.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        after_kill = results[before:]
        failures = [c for c in results if c != 200]
        print(
            f"requests: {len(results)} ({len(after_kill)} after the kill), failed: {len(failures)}"
        )
        assert len(after_kill) > 50
        assert failures == []
        # the supervisor brings the killed replica back
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = _engine_pids(gateway)
            if len(pids) == 2 and engines[0] not in pids:
                break
            time.sleep(0.5)
        assert len(_engine_pids(gateway)) == 2
        running = _engine_pids(gateway)
    finally:
        gateway.stop()
    time.sleep(0.5)
    assert not [
        p
        for p in running
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]


def _engine_pids(gateway: RunningGateway) -> list[int]:
    """Process-group leaders of the engines this gateway started (its direct children)."""
    return [p.pid for p in gateway.engines()]


def test_engines_stop_when_the_supervisor_is_killed(served_digits: RunningGateway) -> None:
    """A SIGKILLed `kiln serve` cannot stop its engines; they notice and stop themselves."""
    engines = _engine_pids(served_digits)
    assert engines
    members = [
        p.pid
        for e in engines
        for p in [psutil.Process(e), *psutil.Process(e).children(recursive=True)]
    ]
    os.kill(served_digits.proc.pid, signal.SIGKILL)
    served_digits.proc.wait(timeout=10)
    start = time.monotonic()
    alive = members
    while alive and time.monotonic() - start < 20:
        time.sleep(0.25)
        alive = [
            p
            for p in members
            if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
    print(f"engine processes gone {time.monotonic() - start:.1f} s after the supervisor died")
    assert not alive
