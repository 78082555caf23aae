"""Garbage collection in Kiln's long-running serving processes (gateway, engine, log writer).

CPython's cyclic collector walks every tracked object of the generations it collects. A process
that imported FastAPI, SQLAlchemy, prometheus-client and a model runtime holds 100-150 k of
them, nearly all alive until exit, so each full (generation 2) collection paused the gateway's
event loop for 50-110 ms: measured with ``gc.callbacks`` during ``bench/serve_bench.py
--sections log-overhead``, such pauses were the top of serving's p99. :func:`freeze` moves what
is alive once a process is ready into the permanent generation (``gc.freeze``, CPython's answer
for exactly this: Instagram's pre-fork servers), so later collections walk only what serving
allocated since.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("kiln.heap")


def freeze(what: str) -> int:
    """Collect once, then exempt every object alive now from later collections; how many."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("%s: %d objects frozen out of garbage collection", what, frozen)
    return frozen
