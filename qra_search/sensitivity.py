"""Stage I: how much each layer group suffers at each bit-width, and what rank recovers.

* ``kl[group][bits]`` — mean per-token KL(float ‖ model with only that group quantized at
  ``bits``, no adapter) on the calibration tokens.
* ``recovered[group][bits][rank]`` — the rank signal: the share of the group's quantization
  error ``Σ‖W - Wq‖²`` that the rank-``rank`` adapter (initialised from the error's top
  singular triplets, see :mod:`qra_search.evaluate`) removes before any training.

The additive model ``predicted(group, bits, rank) = kl · (1 - recovered)`` seeds the
evolution and ranks the repair step's moves; every candidate is still scored for real.
Profiles are cached pass by pass (JSON lines) keyed by the model's weights, the tokens and
the quantizer settings, so a killed stage I resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from .evaluate import Evaluator


@dataclass
class Sensitivity:
    kl: Dict[str, Dict[int, float]]
    recovered: Dict[str, Dict[int, Dict[int, float]]]

    def predicted(self, group: str, bits: int, rank: int) -> float:
        return self.kl[group][bits] * (1.0 - self.recovered[group][bits].get(rank, 0.0))

    def to_dict(self) -> dict:
        return {"kl": {g: {str(b): v for b, v in d.items()} for g, d in self.kl.items()},
                "recovered": {g: {str(b): {str(r): v for r, v in rd.items()} for b, rd in d.items()}
                              for g, d in self.recovered.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        return cls({g: {int(b): float(v) for b, v in x.items()} for g, x in d["kl"].items()},
                   {g: {int(b): {int(r): float(v) for r, v in rd.items()} for b, rd in x.items()}
                    for g, x in d["recovered"].items()})


def profile_key(evaluator: Evaluator, groups: Mapping[str, Sequence[str]],
                bits_choices: Sequence[int], rank_choices: Sequence[int]) -> str:
    """What a profile depends on: the groups' weights, the calibration tokens and the
    quantizer settings of every bit-width (not the search's effort settings)."""
    store = evaluator.store
    h = hashlib.sha1()
    for g, names in groups.items():
        h.update(g.encode())
        for n in names:
            h.update(store.floats.hashes[n].encode())
    h.update(evaluator.calib.numpy().tobytes())
    h.update(json.dumps([sorted(rank_choices), store.group_size,
                         {b: store.settings_key(b) for b in sorted(bits_choices)}]).encode())
    return h.hexdigest()[:20]


def profile(evaluator: Evaluator, groups: Mapping[str, Sequence[str]],
            bits_choices: Sequence[int], rank_choices: Sequence[int],
            cache_dir: Optional[str] = None, progress: bool = True) -> Sensitivity:
    """Measure (or load from ``cache_dir``) the sensitivity profile.

    Each pass — one (group, bits) KL — is appended to ``sensitivity-<key>.jsonl`` as soon as
    it is measured (flushed and fsync'ed), so a killed profile resumes losing at most the
    pass in flight; a torn last line is ignored."""
    store = evaluator.store
    path = None
    done: Dict[tuple, float] = {}
    if cache_dir:
        key = profile_key(evaluator, groups, bits_choices, rank_choices)
        path = os.path.join(cache_dir, f"sensitivity-{key}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        done[(rec["group"], int(rec["bits"]))] = float(rec["kl"])
                    except (json.JSONDecodeError, KeyError, ValueError, TypeError):
                        continue  # a torn line from a killed write
    jobs = [(g, b) for g in groups for b in sorted(bits_choices)]
    it = jobs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc="sensitivity", unit="pass", initial=0)
    kl: Dict[str, Dict[int, float]] = {g: {} for g in groups}
    rec: Dict[str, Dict[int, Dict[int, float]]] = {g: {} for g in groups}
    out = None
    try:
        for g, b in it:
            names: List[str] = list(groups[g])
            if (g, b) in done:
                kl[g][b] = done[(g, b)]
            else:
                kl[g][b] = max(0.0, evaluator.kl({n: (b, 0) for n in names}))
                if path:
                    if out is None:
                        os.makedirs(cache_dir, exist_ok=True)
                        out = open(path, "a")
                    out.write(json.dumps({"group": g, "bits": b, "kl": kl[g][b]}) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
            err2 = sum(store.spectrum(n, b)[1] for n in names)
            rec[g][b] = {}
            for r in sorted(rank_choices):
                got = sum(store.recovered_fraction(n, b, r) * store.spectrum(n, b)[1]
                          for n in names)
                rec[g][b][r] = got / err2 if err2 > 0 else 0.0
    finally:
        if out is not None:
            out.close()
    evaluator.restore()
    return Sensitivity(kl, rec)
