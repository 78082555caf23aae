"""The engine's model cache (loads on a miss, once per key, evicts least recently used first
within its memory budget, never a pinned version) and LoadedModel's input checks
(serving.loader), with a fake loader and runner."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kiln.errors import InvalidInput
from kiln.faults import EngineFaults
from kiln.spec import ModelSpec
from serving.loader import LoadedModel, ModelCache

MB = 2**20
SPEC = ModelSpec.model_validate(
    {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }
)


class FakeLoader:
    """Loads a doubling 'model' of a given size, counting loads per key."""

    def __init__(self, sizes: dict[str, int], delay: float = 0.0) -> None:
        self.sizes = sizes
        self.delay = delay
        self.calls: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name: str, version: str) -> LoadedModel:
        with self._lock:
            self.calls.append((name, version))
        if self.delay:
            time.sleep(self.delay)
        if name in self.fail:
            raise RuntimeError(f"cannot load {name}")
        return LoadedModel(
            name=name,
            version=version,
            spec=SPEC,
            runner=lambda xs: [xs[0] * 2],
            memory_bytes=self.sizes[name] * MB,
        )


def test_miss_loads_then_hits() -> None:
    loader = FakeLoader({"a": 10})
    cache = ModelCache(100 * MB, loader)
    first = cache.get("a", "1.0.0")
    assert cache.get("a", "1.0.0") is first
    assert loader.calls == [("a", "1.0.0")]
    assert first({"x": np.ones((3, 2), np.float32)})["y"].tolist() == [[2.0, 2.0]] * 3


def test_evicts_least_recently_used_over_budget() -> None:
    loader = FakeLoader({"a": 40, "b": 40, "c": 40})
    cache = ModelCache(100 * MB, loader)
    cache.get("a", "1")
    cache.get("b", "1")
    cache.get("a", "1")  # a is now the most recently used
    cache.get("c", "1")  # 120 MB > 100 MB: b goes
    assert cache.keys() == [("a", "1"), ("c", "1")]
    assert cache.total_bytes == 80 * MB
    assert cache.evictions == 1
    cache.get("b", "1")  # a miss again: loaded anew, and a (now LRU) goes
    assert loader.calls.count(("b", "1")) == 2
    assert cache.keys() == [("c", "1"), ("b", "1")]


def test_pinned_primary_is_never_evicted() -> None:
    loader = FakeLoader({"primary": 60, "b": 30, "c": 30})
    cache = ModelCache(100 * MB, loader)
    cache.get("primary", "1", pin=True)
    cache.get("b", "1")
    cache.get("c", "1")  # 120 MB: the LRU is the primary, pinned, so b goes
    assert ("primary", "1") in cache
    assert cache.keys() == [("primary", "1"), ("c", "1")]


def test_entry_in_use_stays_even_over_budget() -> None:
    loader = FakeLoader({"primary": 80, "big": 50})
    cache = ModelCache(100 * MB, loader)
    cache.get("primary", "1", pin=True)
    big = cache.get("big", "1")  # nothing evictable: kept (the caller is about to use it)
    assert big.name == "big"
    assert cache.total_bytes == 130 * MB
    cache.unpin("primary", "1")
    cache.get("big", "1")
    loader.sizes["other"] = 10
    cache.get("other", "1")  # now the primary is evictable, and least recently used
    assert ("primary", "1") not in cache


def test_one_load_per_key_under_concurrency() -> None:
    loader = FakeLoader({"a": 10, "b": 10}, delay=0.2)
    cache = ModelCache(100 * MB, loader)
    results: list[LoadedModel] = []

    def get(name: str) -> None:
        results.append(cache.get(name, "1"))

    threads = [threading.Thread(target=get, args=(n,)) for n in ["a"] * 4 + ["b"] * 4]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    elapsed = time.monotonic() - started
    assert sorted(loader.calls) == [("a", "1"), ("b", "1")]
    assert len({id(r) for r in results}) == 2
    assert elapsed < 0.39, f"a and b loaded one after the other ({elapsed:.2f} s)"


def test_failed_load_is_not_cached() -> None:
    loader = FakeLoader({"a": 10})
    loader.fail.add("a")
    cache = ModelCache(100 * MB, loader)
    with pytest.raises(RuntimeError, match="cannot load a"):
        cache.get("a", "1")
    assert len(cache) == 0
    loader.fail.clear()
    assert cache.get("a", "1").name == "a"
    assert len(loader.calls) == 2


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="budget_bytes"):
        ModelCache(0, FakeLoader({}))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.ones((2, 3), np.float32)}, "'x' has shape \\[2, 3\\]"),
        ({"x": np.ones((2, 2), np.float64)}, "'x' must be FP32, got FP64"),
        ({"x": np.ones((2,), np.float32)}, "'x' has shape"),
        ({"x": np.ones((0, 2), np.float32)}, "'x' has no rows"),
        ({"x": np.array([[1.0, np.nan]], np.float32)}, "'x' holds NaN"),
        ({"x": np.ones((1, 2), np.float32), "z": np.ones((1,), np.float32)}, "unknown input 'z'"),
        ({}, "'x' is missing"),
    ],
)
def test_check_names_the_bad_field(inputs: dict[str, np.ndarray], message: str) -> None:
    model = FakeLoader({"a": 1})("a", "1")
    with pytest.raises(InvalidInput, match=message):
        model.check(inputs)


def test_engine_faults_parse() -> None:
    faults = EngineFaults.parse("delay_ms=5, error_rate=0.25,nan_rate=0.5,seed=3")
    assert (faults.delay_ms, faults.error_rate, faults.nan_rate) == (5.0, 0.25, 0.5)
    draws = [faults.draw() for _ in range(4000)]
    assert 0.2 < draws.count("error") / 4000 < 0.3
    assert 0.45 < draws.count("nan") / 4000 < 0.55
    assert EngineFaults.from_env({}) is None
    with pytest.raises(ValueError, match="KILN_ENGINE_FAULTS"):
        EngineFaults.parse("slow=1")
    with pytest.raises(ValueError, match="error_rate"):
        EngineFaults.parse("error_rate=2")
