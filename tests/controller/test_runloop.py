"""The event-loop helpers every command shares."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from controller import runloop


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()  # what the test froze goes back to the collector, as in a fresh process


def test_settle_heap_freezes_what_lives_and_collects_less_often(restore_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    kept = [[i] for i in range(1000)]  # long-lived containers made at start-up
    runloop.settle_heap()
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold() == runloop.GC_THRESHOLDS
    young, middle, old = runloop.GC_THRESHOLDS
    assert young >= 10 * 700 and middle >= 10 and old >= 10  # never more often than Python's default


def test_a_young_collection_still_frees_cyclic_garbage(restore_gc: None) -> None:
    runloop.settle_heap()
    collected: list[int] = []
    gc.callbacks.append(lambda phase, info: collected.append(info["collected"]) if phase == "stop" else None)
    try:
        for _ in range(3 * runloop.GC_THRESHOLDS[0]):
            a: list[object] = []
            a.append(a)  # a cycle only the collector frees
            del a
    finally:
        gc.callbacks.pop()
    assert sum(collected) > 0  # the thresholds delay collections, they never stop them
