"""Does a search's KL hold on tokens it never scored? For the allocations of a
``qra_search.compare`` run (its variants, the best candidate of each search stage, and every
proxy-fine-tuned finalist), the per-token KL(float || quantized) on held-out blocks of
CPython's documentation (odd topics: the search calibrates on even ones), beside the KL the
search measured on its own calibration blocks. Descent and CMA-ES pick the best of many
candidates on the same few blocks; if that selection fitted those blocks, the held-out KL
of the winners rises above the searched one. A measurement, not a test.

    flock /tmp/cpu.lock python benches/search_heldout_kl.py --run DIR --budget 4 \\
        [--model M.gguf] [--method gptq] [--blocks 16] [--cache-dir CACHE] [--out R.json]

The quantizer settings must be the run's (``--method``, 4 calibration blocks, 128 Hessian
blocks of 128 tokens, group 64: ``qra_search.compare``'s defaults); with the run's cache
directory the quantized entries are read, not recomputed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a qra_search.compare output directory")
    p.add_argument("--budget", required=True, help="the budget key of its rows, e.g. 4 or 3.5")
    p.add_argument("--model", default=None, help="the run's model (default SmolLM2-135M)")
    p.add_argument("--method", default="gptq")
    p.add_argument("--blocks", type=int, default=16, help="held-out blocks of 128 tokens")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows_path = os.path.join(a.run, "rows.jsonl")
    archive_path = os.path.join(a.run, f"archive-{a.budget}.jsonl")
    for f in (rows_path, archive_path):
        if not os.path.exists(f):
            p.error(f"{f} does not exist")

    import torch
    from qra_kernels.allocation import linear_shapes
    from qra_search.compare import _read_rows
    from qra_search.config import SearchConfig
    from qra_search.costs import CostModel
    from qra_search.evaluate import Evaluator, layer_groups
    from qra_search.genes import Budget, GeneSpace
    from qra_search.models import corpus, load_model, search_calibration, token_blocks
    from qra_search.store import quant_store

    torch.set_num_threads(a.threads)
    searches = [r for r in _read_rows(rows_path)
                if r.get("kind") == "search" and r["budget"] == a.budget]
    if not searches:
        p.error(f"{rows_path} has no search row for budget {a.budget}")
    srch = searches[-1]
    model, tok = load_model(a.model)
    cfg = SearchConfig(budget_bits=float(a.budget), method=a.method, n_blocks=4,
                       hessian_blocks=128, seq_len=128)
    _, hessian = search_calibration(tok, cfg)
    shapes = linear_shapes(model)
    store = quant_store(model, shapes, group_size=64, method=a.method, cache_dir=a.cache_dir,
                        max_rank=64, hessian_tokens=hessian)
    store.fill((2, 3, 4, 8), progress=True)
    space = GeneSpace(layer_groups(list(shapes), "block"), (2, 3, 4, 8), (0, 4, 8, 16, 32, 64),
                      CostModel(shapes, 64), Budget(1 << 40, None), None)

    def as_cfg(c):
        return {g: tuple(o) for g, o in c.items()}
    allocs = {v: as_cfg(x["config"]) for v, x in srch["allocations"].items()}
    arch = [json.loads(l) for l in open(archive_path)][1:]
    target = srch["budget_bytes"]
    for stage in ("cma-es", "gp", "descent"):
        cands = [r for r in arch if r.get("stage") == stage and r.get("fidelity") == "cheap"
                 and r["memory_bytes"] <= target]
        if cands:
            allocs[f"best-{stage}"] = as_cfg(min(cands, key=lambda r: r["quality"])["config"])
    keys = {space.key(c) for c in allocs.values()}
    for r in arch:
        if r.get("fidelity") == "proxy" and r["key"] not in keys:
            allocs[f"finalist-{len(allocs)}"] = as_cfg(r["config"])
            keys.add(r["key"])
    search_kl = {r["key"]: r["quality"] for r in arch if r.get("fidelity") == "cheap"}
    proxy = {r["key"]: r["quality"] for r in arch if r.get("fidelity") == "proxy"}

    held = token_blocks(tok, corpus("python-docs-odd"), 128, a.blocks)
    ev = Evaluator(model, store, held, held)
    out = {}
    try:
        for v, c in allocs.items():
            t = time.perf_counter()
            k = space.key(c)
            out[v] = {"heldout_kl": ev.kl(space.layers(c)), "search_kl": search_kl.get(k),
                      "proxy_loss": proxy.get(k), "memory_MiB": space.memory(c) / 2**20,
                      "mix": Counter(f"{b}/{r}" for b, r in c.values()).most_common(),
                      "key": k}
            print(f"{v:<16} held-out KL {out[v]['heldout_kl']:.4f}  search KL "
                  f"{out[v]['search_kl'] if out[v]['search_kl'] is not None else float('nan'):.4f}"
                  f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    finally:
        ev.restore()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"run": a.run, "budget": a.budget, "heldout_blocks": a.blocks,
                       "allocations": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
