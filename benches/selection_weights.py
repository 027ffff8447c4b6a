"""Which ``--kl-weight`` w orders the long fine-tunes right? For each ``qra_search.compare``
rows file and budget: the allocations fine-tuned long (grouped by allocation key, mean over
seeds), and for every pair whose final held-out losses differ by more than the larger of
their seed spreads, the w for which ``proxy + w * KL`` puts the better one first; their
intersection per budget, and Spearman rho of KL, of the proxy and of ``proxy + w * KL``
against the final loss. A measurement over committed rows, not a test.

    python benches/selection_weights.py [--weight 2.5] ROWS.jsonl:BUDGET [ROWS.jsonl:BUDGET ...]

e.g. ``benches/results/compare-smollm2-gptq-b3.0-200steps-2026-12-02.jsonl:3``. Rows of one
budget spread over several files are given as ``A.jsonl+B.jsonl:3.5``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qra_search.compare import _current_rows, _read_rows, spearman  # noqa: E402


def allocations(paths, budget):
    rows = [r for p in paths for r in _read_rows(p)]
    by = {}
    for r in _current_rows(rows, latest_only=False):
        if r["budget"] == budget:
            by.setdefault(r["allocation_key"], []).append(r)
    out, seen = {}, {}
    for rs in by.values():
        after = [r["heldout_loss_after"] for r in rs]
        name = rs[0]["variant"]
        # a variant whose allocation changed between searches (a new rule) is listed per
        # allocation: searched, searched-1, ...
        seen[name] = seen.get(name, -1) + 1
        if seen[name]:
            name = f"{name}-{seen[name]}"
        out[name] = {"kl": rs[0]["calib_kl"], "proxy": rs[0]["proxy_loss"],
                     "final": sum(after) / len(after),
                     "spread": max(after) - min(after), "seeds": len(rs)}
    return out


def weight_interval(pts):
    lo, hi = 0.0, math.inf
    for a in pts.values():
        for b in pts.values():
            if a["final"] < b["final"] - max(a["spread"], b["spread"], 1e-9):
                dk, dp = a["kl"] - b["kl"], b["proxy"] - a["proxy"]  # want w * dk < dp
                if dk > 0:
                    hi = min(hi, dp / dk)
                elif dk < 0:
                    lo = max(lo, dp / dk)
                elif dp <= 0:
                    lo = math.inf
    return lo, hi


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="ROWS.jsonl[+MORE.jsonl]:BUDGET")
    p.add_argument("--weight", type=float, default=2.5)
    a = p.parse_args(argv)
    lo_all, hi_all = 0.0, math.inf
    for run in a.runs:
        files, sep, budget = run.rpartition(":")
        if not sep or not files:
            p.error(f"expected ROWS.jsonl:BUDGET, got {run!r}")
        paths = files.split("+")
        for f in paths:
            if not os.path.exists(f):
                p.error(f"{f} does not exist")
        pts = allocations(paths, budget)
        if len(pts) < 2:
            print(f"{run}: fewer than two allocations")
            continue
        lo, hi = weight_interval(pts)
        lo_all, hi_all = max(lo_all, lo), min(hi_all, hi)
        names = list(pts)
        final = [pts[n]["final"] for n in names]

        def rho(values):
            v = spearman(values, final)
            return "n/a" if v is None else f"{v:.2f}"
        print(f"{run}: {len(pts)} allocations; w in ({lo:.3f}, {hi:.3f}); Spearman vs final: "
              f"KL {rho([pts[n]['kl'] for n in names])}, proxy "
              f"{rho([pts[n]['proxy'] for n in names])}, proxy + {a.weight:g} KL "
              f"{rho([pts[n]['proxy'] + a.weight * pts[n]['kl'] for n in names])}")
        for n in sorted(names, key=lambda n: pts[n]["final"]):
            q = pts[n]
            print(f"    {n:<16} KL {q['kl']:.4f} proxy {q['proxy']:.4f} score "
                  f"{q['proxy'] + a.weight * q['kl']:.4f} final {q['final']:.4f} ± "
                  f"{q['spread']:.4f} ({q['seeds']} seeds)")
    print(f"every run: w in ({lo_all:.3f}, {hi_all:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
