"""The gateway's channel to an engine worker (serving/channel.py, serving/wire.py frames).

A real KilnEngine (set up in this process, as a LitServe worker sets it up) listens on its
channel; the model is a small numpy function, given through the engine's ``loader`` (the way
bench/gpu_serve.py runs an engine without a registry), so each output row says which input row
it came from. Concurrent callers through one :class:`Channel` are coalesced into frames, and
each gets its own rows back, in order, whatever the other requests in its frame were.
"""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest

from kiln.spec import ModelSpec, TensorSpec
from serving.channel import Channel, ChannelBroken, ChannelServer, WireJob
from serving.config import ServingSettings
from serving.engine import ChannelPorts, KilnEngine
from serving.loader import LoadedModel
from serving.wire import frame, frame_length, read_header, read_tensors, tensor_entries

SPEC = ModelSpec(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 3])],
    outputs=[
        TensorSpec(name="y", datatype="FP32", shape=[-1, 3]),
        TensorSpec(name="total", datatype="FP32", shape=[-1]),
    ],
)
CALLS: list[int] = []  # rows of each model call (in this process: the engine runs here)


def run_model(inputs: list[np.ndarray]) -> list[np.ndarray]:
    (x,) = inputs
    CALLS.append(int(x.shape[0]))
    time.sleep(0.002)  # long enough for callers to queue up behind a frame in flight
    return [x * 2.0, x.sum(axis=1)]


def load_numpy_model(name: str, version: str, *, device: str, threads: int | None) -> LoadedModel:
    return LoadedModel(name=name, version=version, spec=SPEC, runner=run_model, memory_bytes=1)


def numpy_engine() -> KilnEngine:
    """The numpy model's engine, set up as a worker sets it up, listening on its channel."""
    api = KilnEngine(
        "m",
        "1.0.0",
        ServingSettings(max_batch_size=16),
        loader=load_numpy_model,
        channel_host="127.0.0.1",
        channel_ports=ChannelPorts(),
    )
    api.setup("cpu")
    return api


@pytest.fixture
def engine() -> KilnEngine:
    api = numpy_engine()
    yield api
    assert api.channel is not None
    api.channel.close()


def job(rows: np.ndarray, *, deadline_s: float = 10.0, outputs: list[str] | None = None) -> WireJob:
    return WireJob(
        model="m",
        version="1.0.0",
        deadline=time.time() + deadline_s,
        inputs={"x": rows},
        outputs=outputs,
        rows=int(rows.shape[0]),
    )


def test_frames_round_trip_tensors_of_every_kind() -> None:
    tensors = [
        ("f", np.arange(6, dtype=np.float32).reshape(2, 3)),
        ("i", np.array([[1], [-2]], dtype=np.int64)),
        ("empty", np.zeros((0, 4), dtype=np.float16)),
        ("b", np.array(["a", "béta"], dtype=object)),
    ]
    entries, chunks = tensor_entries(tensors)
    pieces = frame({"id": 7, "inputs": entries}, chunks)
    raw = b"".join(pieces)
    length, head = frame_length(raw[:8])
    assert length == len(raw) - 8
    header, tail = read_header(raw[8:], head)
    back, end = read_tensors(header["inputs"], tail, 0)
    assert end == len(tail) and header["id"] == 7
    for (name, want), (got_name, got) in zip(tensors, back, strict=True):
        assert got_name == name and got.dtype == want.dtype and got.shape == want.shape
        assert (got == want).all()


def test_a_tensor_announcing_more_bytes_than_the_frame_holds_is_refused() -> None:
    entries, chunks = tensor_entries([("x", np.ones((2, 3), dtype=np.float32))])
    entries[0]["nbytes"] = 999
    raw = b"".join(frame({"inputs": entries}, chunks))
    header, tail = read_header(raw[8:], frame_length(raw[:8])[1])
    with pytest.raises(ValueError, match="tensor 'x' is malformed: 999 bytes announced"):
        read_tensors(header["inputs"], tail, 0)


def test_concurrent_callers_are_coalesced_and_each_gets_its_own_rows(engine: KilnEngine) -> None:
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(1, 6, size=60)]  # mixed: 1 to 5 rows each
    requests = [rng.normal(size=(n, 3)).astype(np.float32) for n in sizes]
    bad = 17  # this caller sends 4 columns: only it gets the 400
    requests[bad] = np.ones((2, 4), dtype=np.float32)
    assert engine.channel is not None

    async def main() -> tuple[list[object], Channel]:
        channel = Channel(engine.channel.endpoint, max_rows=16)
        try:
            answers = await asyncio.gather(
                *(channel.call(job(x)) for x in requests), return_exceptions=True
            )
            return list(answers), channel
        finally:
            await channel.close()

    CALLS.clear()
    answers, channel = asyncio.run(main())
    for i, (x, answer) in enumerate(zip(requests, answers, strict=True)):
        assert not isinstance(answer, BaseException), (i, answer)
        if i == bad:
            assert answer.status == 400, answer
            assert "'x' has shape [2, 4]" in answer.detail
            continue
        assert answer.status == 200, (i, answer.detail)
        np.testing.assert_array_equal(answer.outputs["y"], x * 2.0)
        np.testing.assert_allclose(answer.outputs["total"], x.sum(axis=1), rtol=1e-6)
        assert answer.batch_size >= x.shape[0]
    # coalesced: fewer frames than callers, no frame over max_batch_size rows, every good row
    # run exactly once
    assert channel.frames_sent < len(requests) / 2, channel.frames_sent
    assert max(CALLS) <= 16
    assert sum(CALLS) == sum(sizes) - sizes[bad]
    assert max(a.batch_size for a in answers if not isinstance(a, BaseException)) > 5


def test_a_lone_request_is_sent_at_once(engine: KilnEngine) -> None:
    """Batching never waits for company: a request for an idle worker is written in the same
    turn of the event loop that submitted it, alone, and runs as one model call of its rows."""
    assert engine.channel is not None

    async def main() -> None:
        channel = Channel(engine.channel.endpoint, max_rows=16)
        try:
            await channel.call(job(np.ones((1, 3), np.float32)))  # connect
            sent = channel.frames_sent
            call = asyncio.create_task(
                channel.call(job(np.ones((2, 3), np.float32), outputs=["total"]))
            )
            await asyncio.sleep(0)  # one turn: the task runs up to its wait for the answer
            assert channel.frames_sent == sent + 1 and not call.done()
            answer = await call
            assert answer.status == 200 and list(answer.outputs) == ["total"]
            assert answer.batch_size == 2
        finally:
            await channel.close()

    CALLS.clear()
    asyncio.run(main())
    assert CALLS == [1, 2]


def test_a_request_past_its_deadline_is_dropped_never_run(engine: KilnEngine) -> None:
    assert engine.channel is not None

    async def main() -> object:
        channel = Channel(engine.channel.endpoint, max_rows=16)
        try:
            return await channel.call(job(np.ones((1, 3), np.float32), deadline_s=-1.0))
        finally:
            await channel.close()

    CALLS.clear()
    answer = asyncio.run(main())
    assert answer.status == 504 and "dropped" in answer.detail  # type: ignore[attr-defined]
    assert CALLS == []


def test_a_worker_that_goes_away_fails_what_it_carried_and_the_next_call_reconnects() -> None:
    """A closed connection fails the waiting callers with ChannelBroken (the gateway retries
    them elsewhere); a worker listening again on the endpoint is reached by the next call."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    async def main() -> None:
        channel = Channel(f"127.0.0.1:{port}", max_rows=4)
        loop = asyncio.get_running_loop()
        accepted = loop.run_in_executor(None, listener.accept)
        calls = [
            asyncio.create_task(channel.call(job(np.ones((1, 3), np.float32)))) for _ in range(3)
        ]
        conn, _ = await accepted
        conn.close()  # the worker dies with the frame in flight and two more waiting
        for call in calls:
            with pytest.raises(ChannelBroken):
                await call
        listener.close()
        with pytest.raises(ChannelBroken, match="cannot connect"):
            await channel.call(job(np.ones((1, 3), np.float32)))
        echo = ChannelServer(
            "127.0.0.1",
            lambda body, head: frame(
                {
                    "id": read_header(body, head)[0]["id"],
                    "answers": [{"status": 503, "detail": "x"}],
                },
                [],
            ),
            port=port,
        ).start()
        try:
            answer = await channel.call(job(np.ones((1, 3), np.float32)))
            assert answer.status == 503
        finally:
            echo.close()
            await channel.close()

    asyncio.run(main())


def test_a_job_whose_time_runs_out_while_queued_is_never_sent() -> None:
    """The gateway passes each request's remaining deadline: the caller gets TimeoutError
    when it passes, and a job still waiting behind a busy worker's frame is dropped, unsent."""
    seen: list[int] = []

    def slow(body: bytes, head: int) -> list[bytes]:
        header = read_header(body, head)[0]
        seen.append(len(header["jobs"]))
        time.sleep(0.3)
        answers = [{"status": 504, "detail": "late"} for _ in header["jobs"]]
        return frame({"id": header["id"], "answers": answers}, [])

    server = ChannelServer("127.0.0.1", slow).start()

    async def main() -> None:
        channel = Channel(server.endpoint, max_rows=8)
        try:
            first = asyncio.create_task(channel.call(job(np.ones((1, 3), np.float32)), 5.0))
            await asyncio.sleep(0.05)  # the first frame is in flight
            with pytest.raises(TimeoutError):
                await channel.call(job(np.ones((1, 3), np.float32)), 0.05)
            assert (await first).status == 504
            assert channel.frames_sent == 1 and not channel.queue
        finally:
            await channel.close()

    try:
        asyncio.run(main())
    finally:
        server.close()
    assert seen == [1]


def test_a_worker_with_a_secret_answers_only_callers_that_prove_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KILN_ENGINE_SECRET: the worker's challenge is answered with an HMAC of it; a caller
    with another secret, or none, is cut off before any frame of its is run."""
    monkeypatch.setenv("KILN_ENGINE_SECRET", "s3cret-shared")
    api = numpy_engine()
    assert api.channel is not None and api.channel.secret == b"s3cret-shared"
    CALLS.clear()

    async def call(secret: bytes | None) -> np.ndarray:
        assert api.channel is not None
        channel = Channel(api.channel.endpoint, max_rows=4, secret=secret)
        try:
            answer = await channel.call(job(np.ones((1, 3), np.float32)), 5.0)
            assert answer.status == 200, answer.detail
            return answer.outputs["y"]
        finally:
            await channel.close()

    try:
        assert asyncio.run(call(b"s3cret-shared")).tolist() == [[2.0, 2.0, 2.0]]
        for wrong in (b"another", None):
            with pytest.raises(ChannelBroken):
                asyncio.run(call(wrong))
    finally:
        api.channel.close()
    assert CALLS == [1]  # the refused callers' frames never reached the model
