"""Measured time and memory of a run's stages."""
import sys

import pytest
import torch

from qra_search.resources import StageClock, release_free_heap, rss_mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_heap_returns_freed_small_blocks():
    # 40 KB tensors come from the heap, not their own mappings; every 16th stays alive so
    # the freed ones sit between live blocks, where only malloc_trim can return them.
    blocks = [torch.ones(10_000) for _ in range(6_000)]  # ~240 MB
    keep = blocks[::16]
    before = rss_mb()
    del blocks
    held = rss_mb()
    release_free_heap()
    after = rss_mb()
    assert before - after > 150, (before, held, after)
    assert all(float(k[0]) == 1.0 for k in keep)  # what is alive is untouched


def test_stage_clock_records_each_stage():
    clock = StageClock()
    clock.start("a")
    clock.start("b")  # ends "a"
    clock.stop()
    assert set(clock.timings) == {"a", "b", "total"}
    assert clock.resources["a"]["peak_rss_mb"] > 0 and clock.resources["b"]["rss_mb"] > 0
