"""Timing and memory protocol, the same for every implementation.

Cache protocol (fixed, stated in every report): each timed pass calls the operation on
``copies`` independent copies of its operands (weights, adapters, activations) in turn,
with ``copies`` chosen so one pass touches at least twice the last-level cache (the CPU's
L3, the GPU's L2). When an operand comes round again it has been evicted, so every call
reads its weights from memory — the decode situation, where a layer's weights were last
touched one whole forward pass ago. The number of copies is capped (``max_copies``, a
memory budget, and a time per pass for slow calls); a report row says how many were used and whether the pass really
exceeded twice the cache (``cold_cache``).

Timer: on the CPU, ``time.perf_counter`` around whole passes (the Python dispatch of the
op is included: users pay it too). On a GPU, one pass is captured in a CUDA graph and
replayed between two CUDA events, so launch overhead is not measured; if capture fails
(an implementation that syncs or allocates on the host), eager launches between events
are timed instead and the row says so (``timer``).

Memory: the peak memory an implementation allocates *during one call* above what was
allocated before it (its temporaries plus its output). On a GPU from
``torch.cuda.max_memory_allocated``; on Linux CPUs from the process's resident-set
high-water mark (``VmHWM``), reset before the call through ``/proc/self/clear_refs``.
glibc keeps freed memory for reuse, so a temporary that fits in memory it already holds
would not raise the high-water mark; before the measured call free heap memory is
returned to the kernel (``malloc_trim``), during it every allocation of 64 KiB or more is
served by its own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``), and then the
threshold is put back to glibc's ceiling (32 MiB), for every implementation
alike. Temporaries below 64 KiB are not seen, and resolution is one page.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

__all__ = ["Timing", "make_copies", "one_call_s", "time_calls", "peak_call_memory"]


@dataclass
class Timing:
    median_s: float
    min_s: float
    rounds: int
    calls_per_round: int
    copies: int
    cold_cache: bool
    timer: str


def make_copies(state: Any, bytes_per_call: int, cache_bytes: int, max_copies: int = 512,
                memory_budget: int = 1 << 30, call_s: Optional[float] = None,
                max_pass_s: Optional[float] = None) -> List[Any]:
    """``state`` plus deep copies of it, enough that one pass exceeds ``2 * cache_bytes``.

    Capped by ``max_copies``, by ``memory_budget`` bytes of copies and — when ``call_s``
    (one warm call's time) and ``max_pass_s`` are given — by the pass taking at most
    ``max_pass_s``: a call that slow is dominated by its own arithmetic, not by where its
    weights come from, and thousands of copies would only make the run long. Rows whose
    pass stays under ``2 * cache_bytes`` are marked ``cold_cache: false``.
    """
    want = max(1, math.ceil(2 * cache_bytes / max(1, bytes_per_call)))
    cap = max(1, min(max_copies, memory_budget // max(1, bytes_per_call)))
    if call_s is not None and max_pass_s is not None and call_s > 0:
        cap = max(1, min(cap, int(max_pass_s / call_s)))
    n = min(want, cap)
    return [state] + [copy.deepcopy(state) for _ in range(n - 1)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_call_s(fn: Callable[[Any], Any], state: Any, device: torch.device) -> float:
    """Seconds of one warm call (a rough figure, for sizing the timed passes)."""
    _sync(device)
    t0 = time.perf_counter()
    fn(state)
    _sync(device)
    return time.perf_counter() - t0


def time_calls(fn: Callable[[Any], Any], states: List[Any], device: torch.device,
               bytes_per_call: int, cache_bytes: int, min_time_s: float = 0.2,
               max_rounds: int = 25, min_rounds: int = 3) -> Timing:
    """Per-call time of ``fn(state)`` over passes across ``states`` (see module doc)."""
    cold = len(states) * bytes_per_call >= 2 * cache_bytes
    for s in states:  # warm-up: first-call work (caches, autotuning) is not measured
        fn(s)
    _sync(device)
    if device.type == "cuda":
        timing = _time_cuda_graph(fn, states, device, min_time_s, max_rounds, min_rounds)
        if timing is not None:
            timing.cold_cache = cold
            return timing
        return _time_loop(fn, states, device, min_time_s, max_rounds, min_rounds, cold,
                          "cuda-events-eager")
    return _time_loop(fn, states, device, min_time_s, max_rounds, min_rounds, cold,
                      "perf_counter")


def _time_loop(fn, states, device, min_time_s, max_rounds, min_rounds, cold, timer) -> Timing:
    per_call: List[float] = []
    spent = 0.0
    while len(per_call) < max_rounds and (len(per_call) < min_rounds or spent < min_time_s):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            for s in states:
                fn(s)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for s in states:
                fn(s)
            elapsed = time.perf_counter() - t0
        spent += elapsed
        per_call.append(elapsed / len(states))
        if elapsed > 4 * min_time_s:
            # One pass took far longer than the whole time budget (large M on a CPU): more
            # samples would take minutes; the row records how many rounds it has.
            break
    return Timing(statistics.median(per_call), min(per_call), len(per_call), len(states),
                  len(states), cold, timer)


def _time_cuda_graph(fn, states, device, min_time_s, max_rounds, min_rounds
                     ) -> Optional[Timing]:
    stream = torch.cuda.Stream(device)
    try:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for s in states:  # warm-up on the side stream, as graph capture requires
                fn(s)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for s in states:
                fn(s)
        graph.replay()
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - any capture failure means "time eagerly instead"
        torch.cuda.synchronize(device)
        return None
    per_call: List[float] = []
    spent = 0.0
    while len(per_call) < max_rounds and (len(per_call) < min_rounds or spent < min_time_s):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end) / 1e3
        spent += elapsed
        per_call.append(elapsed / len(states))
    del graph
    return Timing(statistics.median(per_call), min(per_call), len(per_call), len(states),
                  len(states), True, "cuda-graph")


_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _rss_kib(field: str) -> int:
    with open(_STATUS) as f:
        m = re.search(rf"{field}:\s+(\d+) kB", f.read())
    if m is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(m.group(1))


def peak_call_memory(fn: Callable[[Any], Any], state: Any, device: torch.device
                     ) -> Optional[int]:
    """Bytes allocated at the peak of one call above the level before it (None when the
    platform cannot tell)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(state)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    try:
        with _mmap_large_allocations():
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")  # "5" resets the resident-set high-water mark to the current RSS
            before = _rss_kib("VmRSS")
            out = fn(state)
            peak = _rss_kib("VmHWM") - before
            del out
        return max(0, peak) * 1024
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_libc = None


@contextlib.contextmanager
def _mmap_large_allocations(threshold: int = 64 << 10, restore: int = 32 << 20):
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if name is None:
            raise OSError("no C library to tune the allocator")
        _libc = ctypes.CDLL(name)
    if not hasattr(_libc, "mallopt") or _libc.mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        raise OSError("mallopt(M_MMAP_THRESHOLD) is not available (not glibc)")
    # The threshold only applies when the heap must grow; free heap memory left by earlier
    # calls is resident and would be reused unseen, so hand it back to the kernel first.
    _libc.malloc_trim(0)
    try:
        yield
    finally:
        _libc.mallopt(_M_MMAP_THRESHOLD, restore)
