"""Run the command's event loop: uvloop when installed (it is, with `make`), else asyncio."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# Collector thresholds after start-up. Python's default (700, 10, 10) runs a young collection
# every 700 net allocations: a round of 100 one-connection prosumers made ~7 a round and a
# full one every ~18 rounds (25 ms each), ~10 % of the clients' time. Messages die young,
# so 10,000 collects ~70x less often at ~4 ms a young collection at most (docs/benchmarks.md).
GC_THRESHOLDS = (10_000, 20, 100)


def settle_heap() -> None:
    """Call once start-up has imported and built everything long-lived: those ~100,000
    objects move to the permanent generation, so a full collection no longer walks them
    (80-170 ms each on this machine kind, a pause of the event loop that every pending
    acknowledgement would wait for; docs/benchmarks.md). Then collect less often
    (`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


_settled = False


def settle_heap_once() -> None:
    """`settle_heap` the first time only (what was imported and built by then): for code that
    builds long-lived things again and again, such as an environment's episodes, where a
    full collection each time would cost more than it saves."""
    global _settled
    if not _settled:
        _settled = True
        settle_heap()
