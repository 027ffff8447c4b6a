"""Stage IV: measured descent — the interactions the additive model cannot see.

The sensitivity profile (stage I) measures each group alone, every other group in float,
and the seeds, CMA-ES's repair and the GP's neighbourhoods all lean on the sum of those
single-group figures. In the quantized model a group's harm depends on what else is
quantized: errors compound through the residual stream, and an adapter's share of the
error is not independent of the next block's. So here the marginals are measured *in
context*: around the current best allocation, the KL of every one-level change (one group's
bits or rank one choice up or down) is measured for real. Budget-neutral exchanges are
built from those measured marginals (each upgrade paid for by the downgrades that cost the
least measured harm per byte freed, every group moved at most once); since the marginals
are first-order, prefixes of that sequence of growing length (1, 2, 4, … exchanges) are
measured too, and the best measured feasible allocation becomes the next centre. A round
costs about ``4 · groups + log2(groups)`` KL passes; descent stops when a round does not
improve or after ``rounds`` rounds. Measured on SmolLM2-135M (30 blocks, bits 2/3/4/8, ranks
0–64): 79–86 one-level changes a round, about 75 s a round on 2 CPU cores.

Limits: exchanges balance memory only. Under a latency budget every measured allocation is
still checked against it (nothing infeasible is ever chosen), but upgrades are not paid for
in microseconds, so fewer exchanges fit. A move changes one gene of a group; the trade
inside one group (bits up, rank down) takes two exchanges.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from .genes import GeneSpace, GroupConfig

Move = Tuple[str, Tuple[int, int]]  # (group, new (bits, rank))


def one_level_moves(space: GeneSpace, cfg: GroupConfig) -> List[Move]:
    """Every change of one group's bits or rank by one choice, up or down
    (:meth:`GeneSpace.neighbours`)."""
    return [(g, o) for g in space.names for o in space.neighbours(g, cfg[g])]


def exchanges(space: GeneSpace, cfg: GroupConfig, delta: Dict[Move, float]) -> List[List[Move]]:
    """Budget-neutral exchanges from measured marginals ``delta`` (KL change of each move
    alone, negative = better): moves that help and free bytes first, then each helpful
    upgrade (largest measured gain first) with the downgrades that pay for it (least harm
    per byte freed first), kept when the measured sum predicts a gain. Each group is moved at
    most once. Returns the exchanges in the order built (each a list of moves)."""
    limit = space.budget.memory_bytes
    mem = space.memory(cfg)
    used = set()
    out: List[List[Move]] = []

    def extra(m: Move) -> int:
        g, o = m
        return space._bytes[g][o] - space._bytes[g][cfg[g]]

    free = sorted((m for m in delta if delta[m] < 0 and extra(m) <= 0), key=lambda m: delta[m])
    for m in free:
        if m[0] not in used:
            used.add(m[0])
            mem += extra(m)
            out.append([m])
    ups = sorted((m for m in delta if delta[m] < 0 and extra(m) > 0), key=lambda m: delta[m])
    downs = sorted((m for m in delta if extra(m) < 0),
                   key=lambda m: max(delta[m], 0.0) / -extra(m))
    for up in ups:
        if up[0] in used:
            continue
        need = mem + extra(up) - limit if limit is not None else 0
        total, moves, groups = delta[up], [up], {up[0]}
        for d in downs:
            if need <= 0:
                break
            if d[0] in used or d[0] in groups:
                continue
            total += max(delta[d], 0.0)
            need += extra(d)
            moves.append(d)
            groups.add(d[0])
        if need > 0 or total >= 0:
            continue
        used |= groups
        mem += sum(extra(m) for m in moves)
        out.append(moves)
    return out


def descend(space: GeneSpace, start: GroupConfig, start_quality: float,
            score: Callable[[GroupConfig], float], rounds: int,
            progress: bool = True) -> List[GroupConfig]:
    """Up to ``rounds`` rounds of measured descent from ``start`` (feasible, its KL
    ``start_quality``). ``score`` returns the cheap quality and may answer from the
    archive. Returns every allocation measured, in order."""
    seen: List[GroupConfig] = []
    centre, best_q = dict(start), float(start_quality)
    bar = None
    for _ in range(rounds):
        moves = one_level_moves(space, centre)
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(moves), desc="measured descent", unit="cand")
        delta: Dict[Move, float] = {}
        measured: List[Tuple[float, GroupConfig]] = []
        for g, o in moves:
            trial = dict(centre)
            trial[g] = o
            q = float(score(trial))
            seen.append(trial)
            delta[(g, o)] = q - best_q
            if space.feasible(trial):
                measured.append((q, trial))
            if bar is not None:
                bar.update(1)
        seq = exchanges(space, centre, delta)
        n = 1
        while seq and n <= len(seq):
            trial = dict(centre)
            for ex in seq[:n]:
                for g, o in ex:
                    trial[g] = o
            if space.feasible(trial):
                q = float(score(trial))
                seen.append(trial)
                measured.append((q, trial))
            if n == len(seq):
                break
            n = min(2 * n, len(seq))
        if bar is not None:
            bar.close()
        if not measured:
            break
        q, cfg = min(measured, key=lambda t: (t[0], space.key(t[1])))
        if q >= best_q:
            break
        centre, best_q = cfg, q
    return seen
