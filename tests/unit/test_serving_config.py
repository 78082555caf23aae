"""Serving settings: the replica limit the autoscaler obeys."""

from __future__ import annotations

import pytest

from serving import config
from serving.config import ServingSettings


def test_max_replicas_set_by_hand_wins() -> None:
    assert ServingSettings(max_replicas=3).replica_limit == 3


@pytest.mark.parametrize(
    ("cores", "gpus", "expected"),
    [
        (2, 0, 1),  # this machine: one CPU replica (a second would share the same 2 cores)
        (16, 0, 4),
        (16, 2, 4),  # two per GPU
    ],
)
def test_default_limit_follows_the_host(
    monkeypatch: pytest.MonkeyPatch, cores: int, gpus: int, expected: int
) -> None:
    monkeypatch.setattr(config.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(config, "gpu_count", lambda: gpus)
    assert ServingSettings().replica_limit == expected
    assert ServingSettings(min_replicas=6).replica_limit == 6  # never below the minimum


def test_max_below_min_is_refused() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        ServingSettings(min_replicas=3, max_replicas=2)
