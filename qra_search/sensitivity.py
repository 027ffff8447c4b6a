"""Stage I: how much each layer group suffers at each bit-width, and what rank recovers.

* ``kl[group][bits]`` — mean per-token KL(float ‖ model with only that group quantized at
  ``bits``, no adapter) on the calibration tokens.
* ``recovered[group][bits][rank]`` — the rank signal: the share of the group's quantization
  error ``Σ‖W - Wq‖²`` that the rank-``rank`` adapter (initialised from the error's top
  singular triplets, see :mod:`qra_search.evaluate`) removes before any training.

The additive model ``predicted(group, bits, rank) = kl · (1 - recovered)`` seeds the
evolution and ranks the repair step's moves; every candidate is still scored for real.
Profiles are cached as JSON keyed by the model's weights, the tokens and the settings.
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
    h = hashlib.sha1()
    for g, names in groups.items():
        h.update(g.encode())
        for n in names:
            h.update(evaluator.cache.weight_hash(n).encode())
    h.update(evaluator.calib.numpy().tobytes())
    h.update(json.dumps([sorted(bits_choices), sorted(rank_choices), evaluator.cache.group_size,
                         evaluator.cache.method, evaluator.cache.max_rank]).encode())
    return h.hexdigest()[:20]


def profile(evaluator: Evaluator, groups: Mapping[str, Sequence[str]],
            bits_choices: Sequence[int], rank_choices: Sequence[int],
            cache_dir: Optional[str] = None, progress: bool = True) -> Sensitivity:
    """Measure (or load from ``cache_dir``) the sensitivity profile."""
    path = None
    if cache_dir:
        key = profile_key(evaluator, groups, bits_choices, rank_choices)
        path = os.path.join(cache_dir, f"sensitivity-{key}.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    return Sensitivity.from_dict(json.load(f))
            except (json.JSONDecodeError, KeyError, ValueError):
                pass  # torn or stale: measure again
    jobs = [(g, b) for g in groups for b in sorted(bits_choices)]
    it = jobs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc="sensitivity", unit="layer×bits")
    kl: Dict[str, Dict[int, float]] = {g: {} for g in groups}
    rec: Dict[str, Dict[int, Dict[int, float]]] = {g: {} for g in groups}
    cache = evaluator.cache
    for g, b in it:
        names: List[str] = list(groups[g])
        kl[g][b] = max(0.0, evaluator.kl({n: (b, 0) for n in names}))
        err2 = sum(cache.get(n, b)["err2"] for n in names)
        rec[g][b] = {}
        for r in sorted(rank_choices):
            got = sum(cache.recovered_fraction(n, b, r) * cache.get(n, b)["err2"] for n in names)
            rec[g][b][r] = got / err2 if err2 > 0 else 0.0
    evaluator.restore()
    sens = Sensitivity(kl, rec)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(sens.to_dict(), f)
        os.replace(tmp, path)
    return sens
