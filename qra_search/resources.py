"""Time and memory of each stage of a run, measured.

``peak_rss_mb`` is the process's peak resident set so far (``getrusage``'s ``ru_maxrss``),
read when a stage ends, so each stage's figure is the peak up to and including it;
``rss_mb`` is the resident set at that moment (``/proc/self/statm``), after the heap's free
pages have been handed back. glibc's heap is kept in bounds here too: ``bound_heap_growth``
(the ``qra`` command's mmap threshold) and ``release_free_heap`` (between stages).
"""
from __future__ import annotations

import os
import resource
import time
from typing import Dict, Optional


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _glibc():
    """glibc through ctypes, loaded once; ``None`` where there is none (other libcs)."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


_libc = None


def release_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Freed small blocks — activations, adapter gradients — stay in the heap
    between allocated ones and keep counting in the resident set; called between stages so
    that what one stage freed does not raise the next one's peak (SmolLM2-135M: the resident
    set after the proxy stage 10 MiB above its start, against 181 MiB without it). Frees
    nothing that is in use, so it is safe in a library."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def bound_heap_growth() -> None:
    """Return freed large blocks to the system at once (glibc only; no-op elsewhere).

    The search frees and reallocates layer-sized tensors thousands of times; glibc's default
    raises its mmap threshold after the first frees, so such blocks are then carved from the
    heap, fragment it, and the resident set only grows (measured on SmolLM2-135M: +450 MB over
    three whole-model evaluations, all of it freed memory). A fixed 256 KiB threshold keeps
    every large block — and the fine-tune's per-block activations (128 tokens × 576 fp32 ≈
    288 KiB on SmolLM2) — in its own mapping, unmapped when freed. Measured on SmolLM2-135M
    against 1 MiB: a KL pass's transient +86 MiB instead of +163, a fine-tune's +169 instead
    of +300–344, the fine-tune ~12% slower, KL passes within noise. Process-wide, so only
    the ``qra`` command sets it, never the library."""
    libc = _glibc()
    if libc is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)
    libc.mallopt(M_TRIM_THRESHOLD, 4 << 20)


class StageClock:
    """``start(stage)`` … ``stop()`` around each stage. Each finished stage is also written
    to the archive (if one is attached) as an event line, and :meth:`close` writes the
    stage in progress as interrupted — so a resumed run can report the time of every run
    before it, killed ones included (all but a SIGKILLed stage's)."""

    def __init__(self):
        self.timings: Dict[str, float] = {}
        self.resources: Dict[str, Dict[str, float]] = {}
        self.archive = None
        self._stage: Optional[str] = None
        self._t0 = time.perf_counter()
        self._t = self._t0

    def start(self, stage: str) -> None:
        if self._stage is not None:
            self.stop()
        self._stage, self._t = stage, time.perf_counter()

    def stop(self, interrupted: bool = False) -> None:
        if self._stage is None:
            return
        seconds = time.perf_counter() - self._t
        release_free_heap()
        self.timings[self._stage] = self.timings.get(self._stage, 0.0) + seconds
        self.resources[self._stage] = {"peak_rss_mb": round(peak_rss_mb(), 1),
                                       "rss_mb": round(rss_mb(), 1)}
        self.timings["total"] = time.perf_counter() - self._t0
        if self.archive is not None:
            self.archive.event({"event": "stage", "stage": self._stage,
                                "seconds": round(seconds, 3), "interrupted": interrupted,
                                **self.resources[self._stage]})
        self._stage = None

    def close(self) -> None:
        if self._stage is not None:
            self.stop(interrupted=True)
