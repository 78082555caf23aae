"""serving.heap.freeze: what is alive when a serving process is ready leaves the collector's
generations (the gateway, engines and log writer call it once ready)."""

from __future__ import annotations

import gc
import weakref

from serving import heap


class Node:
    """A tracked object that can sit in a reference cycle."""

    other: Node | None = None


def test_freeze_moves_live_objects_out_of_collection() -> None:
    cycle = Node()
    cycle.other = cycle  # only the cyclic collector can free it
    ref = weakref.ref(cycle)
    try:
        frozen = heap.freeze("test")
        assert frozen == gc.get_freeze_count() > 0
        del cycle
        gc.collect()
        assert ref() is not None  # frozen: full collections no longer walk it
    finally:
        gc.unfreeze()  # this test process goes on collecting as usual
    gc.collect()
    assert ref() is None and gc.get_freeze_count() == 0
