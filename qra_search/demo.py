"""``qra demo``: the main job end to end on the default model.

1. search per-layer (bits, rank) under the budget (resuming from ``<out>/archive.jsonl``
   when the directory holds an earlier demo);
2. held-out perplexity of float, the uniform allocations at the bit-widths around the budget
   (without and with rank ``--default-rank`` adapters: 4-bit at ``--budget-bits 4.0``, 3- and
   4-bit at 3.25, those over the budget marked) and the searched allocation, on blocks never
   used for calibration;
3. the searched allocation applied as ``QRALinear`` layers from the very entries the search
   scored, its logits checked against the evaluated allocation's, and saved with
   :func:`qra_kernels.save_quantized` to ``<out>/model`` (reloads with ``from_pretrained``);
4. ``<out>/report.json``: perplexities, time and peak memory per stage (with every earlier
   run of the same directory), the logit check.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from qra_kernels._io import atomic_write


def is_demo_dir(path: str) -> bool:
    """A directory an earlier ``qra demo`` wrote (so a rerun resumes it)."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("archive.jsonl", "report.json"))


def run_demo(args) -> int:
    from .cli import (cache_dir_of, check_model_path, check_out_dir, format_allocation,
                      format_front, load, run, search_config, _setup)
    from .resources import StageClock, peak_rss_mb
    config = search_config(args)
    check_out_dir(args.out, resumable=is_demo_dir)
    path = check_model_path(args.model, "the demo")
    _setup(args)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    args.cache_dir_resolved = args.cache_dir or os.path.join(args.out, "cache")
    clock = StageClock()
    clock.start("load")
    model, tok = load(args, path)
    clock.stop()

    archive = os.path.join(args.out, "archive.jsonl")
    result = run(args, config, model, tok, archive, resume=True)
    print(format_front(result))
    print(format_allocation(result.best))
    alloc_path = os.path.join(args.out, "allocation.json")
    result.best.save(alloc_path)
    from .plot import plot_front
    plot_front(result, os.path.join(args.out, "pareto.png"))

    clock.start("heldout")
    report, held, ref = _heldout_table(args, config, model, tok, result)
    clock.stop()

    clock.start("save")
    from .quantize import quantize_allocation
    out_model = os.path.join(args.out, "model")
    import torch
    import shutil
    if os.path.isdir(out_model):
        shutil.rmtree(out_model)  # a resumed demo rewrites its model
    info = quantize_allocation(model, tok, result.best, out_model, method=config.method,
                               cache_dir=args.cache_dir_resolved, progress=not args.no_progress)
    with torch.no_grad():
        got = model(held[:1, :64], use_cache=False).logits
    diff = float((got - ref).abs().max())
    clock.stop()

    n_held = f"{held.shape[0]}×{held.shape[1]}"
    print(f"\nheld-out perplexity ({n_held} tokens of CPython docs never used for calibration; "
          "'float' is the default model's dequantized Q4_1 weights):")
    for r in report:
        mem = f"{r['linear_MiB']:.2f} MiB" if r["linear_MiB"] else "float32"
        over = "  (over the budget)" if r.get("within_budget") is False else ""
        print(f"  {r['model']:<26} ppl {r['heldout_ppl']:8.2f}   linear layers {mem}{over}")
    print(f"saved the quantized model to {info['dir']} (QRALinear layers "
          f"{info['linear_bytes'] / 2**20:.2f} MiB; its logits match the evaluated "
          f"allocation to {diff:.2e}); reload: import qra_kernels; "
          f"AutoModelForCausalLM.from_pretrained({info['dir']!r})")
    total = time.perf_counter() - t_start
    all_runs = dict(result.total_timings)
    summary = {
        "perplexity": report, "heldout_tokens": n_held,
        "chosen": {"memory_MiB": result.best.memory_bytes / 2**20,
                   "average_bits": result.best.average_bits,
                   "objectives": result.best.objectives},
        "search_timings_s": result.timings, "search_timings_all_runs_s": all_runs,
        "stage_timings_s": clock.timings, "total_s": total,
        "total_all_runs_s": all_runs.get("total", 0.0) + sum(
            v for k, v in clock.timings.items() if k != "total"),
        "peak_rss_mb": {**{k: v["peak_rss_mb"] for k, v in result.resources.items()},
                        **{k: v["peak_rss_mb"] for k, v in clock.resources.items()},
                        "process": round(peak_rss_mb(), 1)},
        "qralinear_max_logit_diff": diff, "budget": result.budget,
        "evaluations": result.evaluations, "settings": config.to_dict(),
        "model_dir": info["dir"], "linear_bytes": info["linear_bytes"],
    }
    with atomic_write(os.path.join(args.out, "report.json")) as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {alloc_path}, {args.out}/pareto.png, {args.out}/report.json; "
          f"this run {total / 60:.1f} min (all runs of this directory "
          f"{summary['total_all_runs_s'] / 60:.1f} min), peak memory "
          f"{summary['peak_rss_mb']['process']:.0f} MB", file=sys.stderr)
    return 0


def uniform_bits_near(budget_bits, bits_choices):
    """The uniform references the held-out table compares the search with: the bit-widths
    just below and just above a ``--budget-bits`` budget (both 4 at 4.0, 3 and 4 at 3.25),
    4 bits when the budget is given another way. Only bit-widths the search may choose."""
    choices = sorted(bits_choices)
    if budget_bits is None:
        return [4] if 4 in choices else []
    below = [b for b in choices if b <= budget_bits]
    above = [b for b in choices if b >= budget_bits]
    return sorted(set(below[-1:] + above[:1]))


def _heldout_table(args, config, model, tok, result):
    """Perplexity rows on held-out blocks, and the evaluated allocation's reference logits
    (on the first held-out block) for the saved model's check."""
    import torch
    from tqdm.auto import tqdm

    from .costs import CostModel
    from .evaluate import Evaluator
    from .models import calibration_and_heldout, search_calibration
    from .store import quant_store
    _, held = calibration_and_heldout(tok, config.seq_len, config.n_blocks, args.heldout_blocks)
    _, hessian = search_calibration(tok, config)
    layers = result.best.layers
    store = quant_store(model, layers, group_size=config.group_size, method=config.method,
                        cache_dir=args.cache_dir_resolved, max_rank=max(config.rank_choices),
                        hessian_tokens=hessian)
    ev = Evaluator(model, store, held[:1])
    rows = [("float", None)]
    for bits in uniform_bits_near(config.budget_bits, config.bits_choices):
        for rank in (0, config.default_rank):
            name = f"uniform {bits}-bit" + (f" + rank {rank}" if rank else "")
            rows.append((name, {n: (bits, rank) for n in layers}))
    rows.append(("searched", {n: (s["bits"], s["rank"]) for n, s in layers.items()}))
    costs = CostModel({n: tuple(s["shape"]) for n, s in layers.items()}, config.group_size)
    limit = result.budget.get("memory_bytes")
    report = []
    for name, cfg in tqdm(rows, desc="held-out perplexity", disable=args.no_progress):
        nll = ev.loss(cfg or {}, held)
        mem = costs.memory_bytes(cfg) if cfg else None
        report.append({"model": name, "heldout_ppl": math.exp(nll), "heldout_nll": nll,
                       "linear_MiB": mem / 2**20 if mem else None,
                       "within_budget": None if mem is None or limit is None else mem <= limit})
    ev.apply(rows[-1][1])
    with torch.no_grad():
        ref = model(held[:1, :64], use_cache=False).logits
    ev.restore()
    del ev
    return report, held, ref
