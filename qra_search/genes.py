"""The search's gene space: each layer group's (bits, rank), what it costs, and the
budget-aware moves built on the sensitivity profile (repair, greedy, exchange, fill).

Each group has two genes in ``[0, 1]``: one picks its bit-width, one its rank, by cutting
``[0, 1]`` into equal cells over the sorted choices (:meth:`GeneSpace.decode`).

A group's rank applies to its layers that can carry an adapter: routed-expert groups (3-D
shapes) take the group's bits and rank 0 (no LoRA on experts yet), so a decoder block of a
MoE model is one gene whose rank adapts its attention (and shared-expert) projections. A
group made only of expert groups has one rank, 0: its rank gene is ignored.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from .costs import CostModel
from .sensitivity import Sensitivity

GroupConfig = Dict[str, Tuple[int, int]]  # {group: (bits, rank)}


class Budget:
    def __init__(self, memory_bytes: Optional[int] = None, latency_us: Optional[float] = None):
        self.memory_bytes, self.latency_us = memory_bytes, latency_us

    def __repr__(self):
        return f"Budget(memory_bytes={self.memory_bytes}, latency_us={self.latency_us})"


class GeneSpace:
    def __init__(self, groups: Mapping[str, Sequence[str]], bits_choices: Sequence[int],
                 rank_choices: Sequence[int], costs: CostModel, budget: Budget,
                 sens: Optional[Sensitivity] = None):
        self.groups = {g: list(n) for g, n in groups.items()}
        self.names = list(self.groups)
        self.bits = sorted(set(bits_choices))
        self.ranks = sorted(set(rank_choices))
        self.costs, self.budget, self.sens = costs, budget, sens
        self.options = [(b, r) for b in self.bits for r in self.ranks]
        # Layers that take the group's rank (2-D); expert groups (3-D) keep rank 0.
        self._adapts = {n: len(costs.shapes[n]) == 2 for ns in self.groups.values() for n in ns}
        self._ranked = {g: any(self._adapts[n] for n in ns) for g, ns in self.groups.items()}
        self._bytes = {g: {o: sum(costs.layer_bytes(n, *self._layer_option(n, o)) for n in ns)
                           for o in self.options}
                       for g, ns in self.groups.items()}
        self._lat = None
        if costs.latency is not None:
            self._lat = {g: {o: costs.latency_us({n: self._layer_option(n, o) for n in ns})
                             for o in self.options}
                         for g, ns in self.groups.items()}

    @property
    def dim(self) -> int:
        return 2 * len(self.names)

    # --- genotype <-> allocation -------------------------------------------------------------
    def decode(self, x: Sequence[float]) -> GroupConfig:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        out = {}
        for i, g in enumerate(self.names):
            bi = min(int(x[2 * i] * len(self.bits)), len(self.bits) - 1)
            ri = min(int(x[2 * i + 1] * len(self.ranks)), len(self.ranks) - 1)
            out[g] = (self.bits[bi], self.ranks[ri])
        return out

    def encode(self, cfg: GroupConfig) -> np.ndarray:
        """The centre of each gene's cell (decode(encode(c)) == c)."""
        x = np.empty(self.dim)
        for i, g in enumerate(self.names):
            b, r = cfg[g]
            x[2 * i] = (self.bits.index(b) + 0.5) / len(self.bits)
            x[2 * i + 1] = (self.ranks.index(r) + 0.5) / len(self.ranks)
        return x

    def features(self, cfg: GroupConfig) -> np.ndarray:
        """Normalised choice indices in [0, 1] (the GP's inputs)."""
        x = np.empty(self.dim)
        for i, g in enumerate(self.names):
            b, r = cfg[g]
            x[2 * i] = self.bits.index(b) / max(1, len(self.bits) - 1)
            x[2 * i + 1] = self.ranks.index(r) / max(1, len(self.ranks) - 1)
        return x

    def _layer_option(self, name: str, option) -> Tuple[int, int]:
        b, r = option
        return (b, r) if self._adapts.get(name, True) else (b, 0)

    def layers(self, cfg: GroupConfig) -> Dict[str, Tuple[int, int]]:
        """Per layer (bits, rank): the group's, with rank 0 for expert groups."""
        return {n: self._layer_option(n, cfg[g]) for g, ns in self.groups.items() for n in ns}

    def key(self, cfg: GroupConfig) -> str:
        """One key per distinct allocation: a group with no adaptable layer is keyed at rank 0
        whatever its rank gene says."""
        return ";".join(f"{g}={b}/{r if self._ranked.get(g, True) else 0}"
                        for g, (b, r) in sorted(cfg.items()))

    # --- costs -------------------------------------------------------------------------------
    def memory(self, cfg: GroupConfig) -> int:
        return sum(self._bytes[g][tuple(o)] for g, o in cfg.items())

    def latency(self, cfg: GroupConfig) -> Optional[float]:
        if self._lat is None:
            return None
        return sum(self._lat[g][tuple(o)] for g, o in cfg.items())

    def feasible(self, cfg: GroupConfig, budget: Optional[Budget] = None) -> bool:
        budget = budget or self.budget
        if budget.memory_bytes is not None and self.memory(cfg) > budget.memory_bytes:
            return False
        if budget.latency_us is not None and self.latency(cfg) > budget.latency_us + 1e-9:
            return False
        return True

    def cheapest(self) -> GroupConfig:
        return {g: (self.bits[0], self.ranks[0]) for g in self.names}

    def uniform(self, bits: int, rank: int) -> GroupConfig:
        return {g: (bits, rank) for g in self.names}

    def neighbours(self, g: str, option, up: bool = True, down: bool = True):
        """The options one level from ``option`` for group ``g``: its bits one choice down
        or up (rank kept), then its rank one choice down or up (bits kept) — the one-level
        moves that fill, the measured descent and the harness's random top-up all take. A
        group with no adaptable layer has no rank moves."""
        b, r = option
        i, j = self.bits.index(b), self.ranks.index(r)
        steps = [s for s, ok in ((-1, down), (1, up)) if ok]
        out = [(self.bits[i + s], r) for s in steps if 0 <= i + s < len(self.bits)]
        if self._ranked.get(g, True):
            out += [(b, self.ranks[j + s]) for s in steps if 0 <= j + s < len(self.ranks)]
        return out

    def _pred(self, g: str, o) -> float:
        return self.sens.predicted(g, *o) if self.sens is not None else 0.0

    # --- budget-aware moves ------------------------------------------------------------------
    def repair(self, cfg: GroupConfig, budget: Optional[Budget] = None) -> GroupConfig:
        """Cheapest-harm downgrades until ``cfg`` fits ``budget``: each step takes the
        move with the smallest predicted quality loss per byte (or µs) saved."""
        budget = budget or self.budget
        cfg = dict(cfg)
        while not self.feasible(cfg, budget):
            over_mem = budget.memory_bytes is not None and self.memory(cfg) > budget.memory_bytes
            best = None
            for g in self.names:
                cur = cfg[g]
                for o in self.options:
                    saved = (self._bytes[g][cur] - self._bytes[g][o]) if over_mem else \
                        (self._lat[g][cur] - self._lat[g][o])
                    if saved <= 0:
                        continue
                    harm = max(0.0, self._pred(g, o) - self._pred(g, cur))
                    score = (harm + 1e-12) / saved
                    if best is None or score < best[0]:
                        best = (score, g, o)
            if best is None:
                raise ValueError("no allocation fits the budget")
            cfg[best[1]] = best[2]
        return cfg

    def greedy(self, budget: Optional[Budget] = None, min_rank: int = 0,
               fill: bool = False) -> GroupConfig:
        """From the cheapest allocation, repeatedly take the feasible change with the best
        predicted quality gain per byte added, until none helps. ``min_rank`` keeps every
        group's adapter at least that large: the cheap fidelity sees what an adapter
        recovers at initialisation, not what it can still learn (plasticity), so seeds with
        a rank floor put the budget's bits where they matter while keeping that capacity.
        ``fill``: then spend what is left of the memory budget (:meth:`fill`)."""
        budget = budget or self.budget
        cfg = self.exchange(self._greedy_up(budget, min_rank), budget, min_rank)
        return self.fill(cfg, budget) if fill else cfg

    def fill(self, cfg: GroupConfig, budget: Optional[Budget] = None,
             slack: float = 0.01) -> GroupConfig:
        """Spend the rest of the memory budget one level at a time (a group's bits or its
        rank up one choice), best predicted gain per byte first — zero gains included,
        since the additive model predicts nothing for what it cannot see (an adapter's
        capacity to learn, interactions); a move predicted to *hurt* (a profile noisier than
        its bit-widths' differences) is never taken — until within ``slack`` below the
        budget or no move fits. Greedy stops where no move is *predicted* to help, often
        well below the budget; a practitioner spends the memory they have."""
        budget = budget or self.budget
        target = budget.memory_bytes
        cfg = dict(cfg)
        if target is None:
            return cfg
        while self.memory(cfg) < (1.0 - slack) * target:
            best = None
            mem = self.memory(cfg)
            for g in self.names:
                for o in self.neighbours(g, cfg[g], down=False):
                    extra = self._bytes[g][o] - self._bytes[g][cfg[g]]
                    if extra <= 0 or mem + extra > target:
                        continue
                    trial = dict(cfg)
                    trial[g] = o
                    if not self.feasible(trial, budget):
                        continue
                    gain = self._pred(g, cfg[g]) - self._pred(g, o)
                    if gain < 0:
                        continue
                    score = (gain / extra, -extra)
                    if best is None or score > best[0]:
                        best = (score, g, o)
            if best is None:
                break
            cfg[best[1]] = best[2]
        return cfg

    def exchange(self, cfg: GroupConfig, budget: Optional[Budget] = None, min_rank: int = 0,
                 max_moves: int = 1000) -> GroupConfig:
        """Exchanges at a fixed budget: move one group's bits up a level and as few others
        down a level as pay for it (ranks kept) while the predicted total improves. Pure
        upward greed stalls at a uniform allocation when no single upgrade fits."""
        budget = budget or self.budget
        cfg = dict(cfg)
        for _ in range(max_moves):
            mem = self.memory(cfg)
            best = None
            ups, downs = [], []
            for g in self.names:
                b, r = cfg[g]
                i = self.bits.index(b)
                for j, lst in ((i + 1, ups), (i - 1, downs)):
                    if 0 <= j < len(self.bits) and r >= min_rank:
                        o = (self.bits[j], r)
                        lst.append((g, o, self._pred(g, o) - self._pred(g, (b, r)),
                                    self._bytes[g][o] - self._bytes[g][(b, r)]))
            limit = budget.memory_bytes
            downs.sort(key=lambda t: t[2] / max(-t[3], 1))  # least harm per byte freed first
            for gu, ou, du, bu in ups:
                if du >= -1e-12:
                    continue
                total, moves, need = du, [(gu, ou)], (mem + bu - limit) if limit is not None else 0
                for gd, od, dd, bd in downs:
                    if need <= 0:
                        break
                    if gd == gu:
                        continue
                    total += dd
                    need += bd
                    moves.append((gd, od))
                if need > 0 or total >= -1e-12:
                    continue
                if best is None or total < best[0]:
                    best = (total, moves)
            if best is None:
                break
            trial = dict(cfg)
            for g, o in best[1]:
                trial[g] = o
            if not self.feasible(trial, budget):
                break
            cfg = trial
        return cfg

    def _greedy_up(self, budget: Budget, min_rank: int) -> GroupConfig:
        ranks = [r for r in self.ranks if r >= min_rank]
        if not ranks:
            raise ValueError(f"no rank choice >= {min_rank}")
        options = [o for o in self.options if o[1] >= min_rank]
        cfg = {g: (self.bits[0], ranks[0]) for g in self.names}
        if not self.feasible(cfg, budget):
            raise ValueError("no allocation fits the budget")
        while True:
            best = None
            mem, lat = self.memory(cfg), self.latency(cfg)
            for g in self.names:
                cur = cfg[g]
                for o in options:
                    gain = self._pred(g, cur) - self._pred(g, o)
                    extra = self._bytes[g][o] - self._bytes[g][cur]
                    if gain <= 0 or extra <= 0:
                        continue
                    ok = budget.memory_bytes is None or mem + extra <= budget.memory_bytes
                    if ok and budget.latency_us is not None:
                        ok = lat + self._lat[g][o] - self._lat[g][cur] <= budget.latency_us + 1e-9
                    if ok and (best is None or gain / extra > best[0]):
                        best = (gain / extra, g, o)
            if best is None:
                return cfg
            cfg[best[1]] = best[2]


