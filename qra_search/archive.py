"""The on-disk, append-only archive of every evaluation, and the Pareto front.

One JSON object per line. The first line is the header: what the evaluations depend on
(model fingerprint, calibration tokens, quantizer, proxy settings, seed; see
:data:`qra_search.config.IDENTITY_FIELDS`). Every later line is one evaluation:
``{"key", "fidelity", "quality", "memory_bytes", "latency_us", "stage", "seconds",
"config"}``, or an event (``{"event": "stage", "stage", "seconds", "interrupted",
"peak_rss_mb", "rss_mb"}``, written as each stage of a run ends).
Each line is flushed and fsync'ed as it is written, so a killed search loses at most the
evaluation in flight; a torn last line is dropped on reading. ``--resume`` re-reads the
file and answers every evaluation it holds without recomputing it; because the search is
deterministic from its seed, a resumed search replays to the same result.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from qra_kernels._io import atomic_write


class Archive:
    def __init__(self, path: Optional[str], header: dict, resume: bool = False):
        """``path=None`` keeps the archive in memory only."""
        self.path, self.header = path, dict(header)
        self.records: List[dict] = []
        self.events: List[dict] = []
        self._index: Dict[Tuple[str, str], dict] = {}
        if path is None:
            return
        exists = os.path.exists(path) and os.path.getsize(path) > 0
        if exists and not resume:
            raise ValueError(f"archive {path!r} already exists: pass --resume to continue that "
                             "search, or choose another --archive path")
        if exists:
            self._read()
        else:
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            self._write_line({"header": self.header})

    def _read(self) -> None:
        with open(self.path) as f:
            lines = f.read().split("\n")
        good = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i >= len(lines) - 2:  # torn final line from a killed write: drop it
                    break
                raise ValueError(f"archive {self.path!r}: line {i + 1} is not JSON") from None
            good.append(rec)
        if not good or "header" not in good[0]:
            raise ValueError(f"archive {self.path!r} has no header line")
        old = good[0]["header"]
        for k in sorted(set(old) | set(self.header)):
            if old.get(k) != self.header.get(k):
                raise ValueError(f"archive {self.path!r} was written by a different search "
                                 f"({k}: {old.get(k)!r} there, {self.header.get(k)!r} now); "
                                 "use a new --archive path")
        # Rewrite without any torn tail so later appends start on a clean line.
        with atomic_write(self.path) as f:
            for rec in good:
                f.write(json.dumps(rec) + "\n")
        for rec in good[1:]:
            self._add(rec)

    def _write_line(self, rec: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _add(self, rec: dict) -> None:
        if "event" in rec:
            self.events.append(rec)
            return
        self.records.append(rec)
        self._index[(rec["key"], rec["fidelity"])] = rec

    def event(self, rec: dict) -> None:
        """Append an event line (see the module docstring)."""
        self._write_line(rec)
        self._add(rec)

    def stage_seconds(self) -> Dict[str, float]:
        """Seconds per stage summed over every run of this archive, and their total."""
        out: Dict[str, float] = {}
        for e in self.events:
            if e.get("event") == "stage":
                out[e["stage"]] = out.get(e["stage"], 0.0) + float(e["seconds"])
        out["total"] = sum(out.values())
        return out

    def get(self, key: str, fidelity: str) -> Optional[dict]:
        return self._index.get((key, fidelity))

    def append(self, rec: dict) -> dict:
        if (rec["key"], rec["fidelity"]) in self._index:
            return self._index[(rec["key"], rec["fidelity"])]
        self._write_line(rec)
        self._add(rec)
        return rec


def pareto_front(points: Sequence[Sequence[float]]) -> List[int]:
    """Indices of the points no other point dominates (every objective minimised; equal
    points: the first is kept)."""
    idx = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if j == i:
                continue
            if all(a <= b for a, b in zip(q, p)) and (any(a < b for a, b in zip(q, p)) or j < i):
                dominated = True
                break
        if not dominated:
            idx.append(i)
    return idx
