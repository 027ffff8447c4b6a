"""Stage II: CMA-ES over a continuous relaxation of the per-group genes
(:class:`qra_search.genes.GeneSpace`).

CMA-ES (the ``cma`` package) starts from the sensitivity-guided greedy allocation; every
candidate it proposes is decoded, *repaired* into the budget (the cheapest predicted-quality
downgrades first), and the repaired genotype is what CMA-ES is told about (Lamarckian
repair), so the search distribution learns where the feasible region is.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import numpy as np

from .genes import Budget, GeneSpace, GroupConfig

__all__ = ["explore", "Budget", "GeneSpace", "GroupConfig"]


def explore(space: GeneSpace, start: GroupConfig, score: Callable[[GroupConfig], float],
            evaluations: int, seed: int, popsize: Optional[int] = None, sigma0: float = 0.15,
            progress: bool = True) -> List[GroupConfig]:
    """Run CMA-ES for about ``evaluations`` candidates; returns them in order. ``score``
    returns the cheap quality (lower is better) and may answer from the archive."""
    import cma
    popsize = popsize or max(6, 4 + int(3 * math.log(space.dim)))
    es = cma.CMAEvolutionStrategy(space.encode(start), sigma0,
                                  {"seed": seed + 1, "popsize": popsize, "bounds": [0.0, 1.0],
                                   "verbose": -9, "CMA_stds": None})
    seen: List[GroupConfig] = []
    generations = max(1, math.ceil(evaluations / popsize))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=generations * popsize, desc="CMA-ES", unit="cand")
    for _ in range(generations):
        xs = es.ask()
        told, fits = [], []
        for x in xs:
            cfg = space.repair(space.decode(x))
            told.append(space.encode(cfg) if cfg != space.decode(x) else np.asarray(x))
            fits.append(float(score(cfg)))
            seen.append(cfg)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{min(fits):.4g}")
        es.tell(told, fits)
    if bar is not None:
        bar.close()
    return seen
