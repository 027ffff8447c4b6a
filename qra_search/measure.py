"""The measurements behind docs/SEARCH.md: searched vs uniform allocations on a real model.

    python -m qra_search.measure --out search_results.json [--model M] [--budgets 4.0,3.25]

For each budget (``--budget-bits``, reference rank 16): run the search, then give the
chosen allocation and the uniform allocations that fit the budget *the same* short LoRA
fine-tune (calibration blocks, seeded order, same steps and learning rate) and report the
loss on held-out blocks the search never saw, before and after. Also checks whether every
uniform configuration evaluated is dominated by a searched point of the front
(memory ≤ and KL <), and records the search's wall time per stage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qra_search.measure")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="search_results.json")
    p.add_argument("--budgets", default="4.0,3.25")
    p.add_argument("--method", default="rtn")
    p.add_argument("--calib-blocks", type=int, default=8)
    p.add_argument("--heldout-blocks", type=int, default=8)
    p.add_argument("--evaluations", type=int, default=24)
    p.add_argument("--refine-steps", type=int, default=4)
    p.add_argument("--proxy-top", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="fine-tune steps (search proxy and comparison)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/qra"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from .evaluate import Evaluator
    from .store import quant_store
    from .models import calibration_and_heldout, load_model
    from .search import run_search

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    calib, held = calibration_and_heldout(tok, 128, args.calib_blocks, args.heldout_blocks)
    out = {"settings": vars(args), "load_s": time.perf_counter() - t0, "budgets": {}}
    for budget in [float(b) for b in args.budgets.split(",")]:
        arch = os.path.join(os.path.dirname(os.path.abspath(args.out)),
                            f"measure-archive-{budget}.jsonl")
        r = run_search(model, calib, budget, method=args.method, evaluations=args.evaluations,
                       refine_steps=args.refine_steps, proxy_top=args.proxy_top,
                       proxy_steps=args.steps, proxy_lr=args.lr, cache_dir=args.cache_dir,
                       archive=arch, resume=True, n_blocks=args.calib_blocks)
        store = quant_store(model, r.best.layers, group_size=64, method=args.method,
                            cache_dir=args.cache_dir)
        n_valid = max(1, calib.shape[0] // 4)
        ev = Evaluator(model, store, calib[:-n_valid], held)
        rows = {"searched": {n: (s["bits"], s["rank"]) for n, s in r.best.layers.items()}}
        for bits, rank in ((4, 16), (4, 0), (3, 16), (3, 0)):
            cfg = {n: (bits, rank) for n in r.best.layers}
            from .costs import CostModel
            cm = CostModel({n: tuple(s["shape"]) for n, s in r.best.layers.items()})
            if cm.memory_bytes(cfg) <= r.budget["memory_bytes"]:
                rows[f"uniform {bits}-bit rank {rank}"] = cfg
        res = {}
        for name, cfg in rows.items():
            before = ev.loss(cfg, held)
            kl = ev.kl(cfg)
            after = ev.proxy_finetune(cfg, args.steps, args.lr, seed=0, eval_tokens=held)
            from .costs import CostModel
            cm = CostModel({n: tuple(s["shape"]) for n, s in r.best.layers.items()})
            res[name] = {"memory_MiB": cm.memory_bytes(cfg) / 2**20, "calib_kl": kl,
                         "heldout_loss_before": before, "heldout_ppl_before": math.exp(before),
                         "heldout_loss_after_finetune": after,
                         "heldout_ppl_after_finetune": math.exp(after)}
            print(f"budget {budget}: {name:<24} {res[name]}", flush=True)
        ev.restore()
        searched_keys = {json.dumps(a.layers, sort_keys=True) for a, _ in r.pareto}
        dom = {}
        for a, o in r.baselines:
            s = next(iter(a.layers.values()))
            key = json.dumps(a.layers, sort_keys=True)
            by = [(o2["memory_bytes"] / 2**20, o2["quality"]) for a2, o2 in r.pareto
                  if json.dumps(a2.layers, sort_keys=True) != key
                  and o2["memory_bytes"] <= o["memory_bytes"] and o2["quality"] < o["quality"]]
            dom[f"{s['bits']}-bit rank {s['rank']}"] = {
                "memory_MiB": o["memory_bytes"] / 2**20, "kl": o["quality"],
                "dominated_by": min(by, key=lambda t: t[1]) if by else None,
                "on_front": key in searched_keys}
        out["budgets"][str(budget)] = {
            "budget_MiB": r.budget["memory_bytes"] / 2**20, "timings_s": r.timings,
            "evaluations": r.evaluations, "comparison": res, "uniform_dominance": dom,
            "best_bits_histogram": _hist(r.best), "front_size": len(r.pareto)}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    out["total_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return 0


def _hist(alloc):
    h = {}
    for s in alloc.layers.values():
        k = f"{s['bits']}b/r{s['rank']}"
        h[k] = h.get(k, 0) + 1
    return h


if __name__ == "__main__":
    raise SystemExit(main())
