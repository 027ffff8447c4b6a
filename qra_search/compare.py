"""Does the search earn its cost? The searched allocation against the cheap ones a
practitioner would try first, at equal memory, after a real fine-tune, on text it never saw.

    python -m qra_search.compare --out DIR [--model M] [--budgets 4.0,3.5,3.0]
        [--seeds 0,1,2] [--steps 400] [--method rtn] [--only 4.0:searched:0]

For each budget B (bits, against uniform B-bit + rank ``--default-rank``):

1. **search** — :func:`qra_search.run_search` on calibration text (CPython's documentation,
   even topics), resumable (its archive lives in ``DIR``);
2. **allocations at the same memory** (within [0.99·T, T] of the budget's bytes T):
   ``searched``; ``greedy`` (the search's own measured sensitivity, spent greedily:
   :meth:`GeneSpace.greedy` with ``fill``, the search's first seed) and ``greedy-r<r>``
   (the same with every adapter at rank >= r); ``uniform`` (the uniform (bits, rank)
   closest to T from below); ``random-0..2`` (seeded random genes, repaired and topped up
   into the band). Also, below the band: ``uniform-<b>b-r<r>``, per bit-width the largest
   rank that fits (the uniform choices a practitioner weighs; their ``of T`` column says how
   much less memory they use). An extra variant equal to one listed before it is not repeated;
3. **the same fine-tune for each** — ``--steps`` Adam steps of the adapters (svd-initialised,
   base frozen, cosine schedule) on a fine-tune text that is neither the calibration nor the
   evaluation text (``--finetune-corpus``, default the section-1 manual pages), one run per
   seed (``--seeds``: the seed orders the blocks);
4. **held-out loss** on a third text (``--heldout-corpus``, default the licence texts) before
   and after, and on fine-tune-domain blocks never trained on.

It also measures how well the search's two fidelities predict the long fine-tune's ranking
(Spearman ρ of KL and of the proxy loss against the final held-out loss, over the
allocations of a budget), the time of a fine-tune step and of one epoch of the fine-tune
text, and the whole search's time (every run of its archive). Rows go to ``DIR/rows.jsonl``
one at a time (a killed run resumes at the row in flight); ``DIR/summary.json`` and the
printed tables are rebuilt from the rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Dict, List, Optional

from qra_kernels.cli_common import Parser, positive, str_list

# SearchConfig.kl_weight's default, written out because importing qra_search.config loads
# torch and this parser must not (tests/qra_search/test_compare.py checks the two agree)
DEFAULT_KL_WEIGHT = 2.5


def _float_list(s: str) -> List[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def build_parser() -> Parser:
    p = Parser(prog="python -m qra_search.compare", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for rows.jsonl, summary.json, archives")
    p.add_argument("--model", default=None, help="model directory or .gguf (default SmolLM2-135M)")
    p.add_argument("--budgets", type=_float_list, default=[4.0, 3.5, 3.0],
                   help="budgets in bits (uniform B-bit + rank --default-rank), default 4.0,3.5,3.0")
    p.add_argument("--seeds", type=str_list("--seeds"), default=["0", "1", "2"],
                   help="fine-tune seeds (block order), default 0,1,2")
    p.add_argument("--steps", type=positive(int), default=400, help="fine-tune steps (default 400)")
    p.add_argument("--batch", type=positive(int), default=2, help="blocks per fine-tune step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (cosine to 0)")
    p.add_argument("--seq-len", type=positive(int), default=128, help="tokens per block")
    p.add_argument("--finetune-corpus", default="man", help="fine-tune text (qra_search.models.corpus)")
    p.add_argument("--finetune-documents", type=positive(int), default=400,
                   help="documents of the fine-tune corpus (its first ones, sorted by name)")
    p.add_argument("--heldout-corpus", default="licenses", help="evaluation text")
    p.add_argument("--heldout-blocks", type=positive(int), default=16)
    p.add_argument("--method", default="rtn", help="quantizer of the search and all allocations")
    p.add_argument("--bits", default="2,3,4,8", help="bit-width choices")
    p.add_argument("--ranks", default="0,4,8,16,32,64", help="rank choices")
    p.add_argument("--default-rank", type=int, default=16)
    p.add_argument("--granularity", choices=["block", "module"], default="block")
    p.add_argument("--evaluations", type=positive(int), default=20)
    p.add_argument("--refine-steps", type=int, default=4)
    p.add_argument("--descent-rounds", type=int, default=2)
    p.add_argument("--select", choices=["proxy+kl", "proxy-near-kl", "kl", "proxy"],
                   default="proxy+kl")
    p.add_argument("--kl-weight", type=float, default=DEFAULT_KL_WEIGHT)
    p.add_argument("--kl-slack", type=float, default=2.0)
    p.add_argument("--proxy-top", type=int, default=1)
    p.add_argument("--proxy-steps", type=int, default=8)
    p.add_argument("--calib-blocks", type=positive(int), default=4)
    p.add_argument("--hessian-blocks", type=positive(int), default=128,
                   help="with --method gptq: calibration blocks for its Hessians")
    p.add_argument("--randoms", type=int, default=3, help="random allocations per budget")
    p.add_argument("--only", type=str_list("--only"), default=None,
                   help="run only these rows, as budget:variant:seed (e.g. 4.0:searched:0); a "
                   "budget or seed not in --budgets/--seeds is an error, a variant the search "
                   "does not return a warning and exit status 1")
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--cache-dir", default=None, help="default: DIR/cache")
    return p


# --- allocations at equal memory -------------------------------------------------------------
def random_allocation(space, target: int, rng: random.Random):
    """Seeded random genes, repaired into ``target`` bytes, then topped up with random
    upgrades until within 1% below it (or no upgrade fits)."""
    from .genes import Budget
    cfg = {g: (rng.choice(space.bits), rng.choice(space.ranks)) for g in space.names}
    budget = Budget(target, None)
    cfg = space.repair(cfg, budget)
    for _ in range(10 * len(space.names) * len(space.options)):
        if space.memory(cfg) >= 0.99 * target:
            break
        g = rng.choice(space.names)
        moves = space.neighbours(g, cfg[g], down=False)
        if not moves:
            continue
        trial = dict(cfg)
        trial[g] = rng.choice(moves)
        if space.memory(trial) <= target:
            cfg = trial
    return cfg


def greedy_allocation(space, target: int):
    """The practitioner's greedy: the search's measured sensitivity spent greedily, then the
    rest of the budget spent the same way (:meth:`GeneSpace.greedy` with ``fill``)."""
    from .genes import Budget
    return space.greedy(Budget(target, None), fill=True)


def widest_uniforms(space, target: int) -> Dict[str, dict]:
    """Per bit-width, the uniform allocation with the largest rank that fits ``target``:
    the uniform choices a practitioner would weigh (``uniform`` alone, the closest from
    below, may be 2-bit with a large adapter)."""
    out = {}
    for b in space.bits:
        fits = [r for r in space.ranks if space.memory(space.uniform(b, r)) <= target]
        if fits:
            out[f"uniform-{b}b-r{max(fits)}"] = space.uniform(b, max(fits))
    return out


def closest_uniform(space, target: int):
    best = None
    for b in space.bits:
        for r in space.ranks:
            u = space.uniform(b, r)
            m = space.memory(u)
            if m <= target and (best is None or m > best[0]):
                best = (m, u)
    return best[1] if best else None


def spearman(x: List[float], y: List[float]) -> Optional[float]:
    if len(x) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else None


# --- the run ---------------------------------------------------------------------------------
def _read_rows(path: str) -> List[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # torn last line of a killed run
    return rows


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fingerprint(blocks) -> str:
    return hashlib.sha1(blocks.numpy().tobytes()).hexdigest()[:12]


def _parse_only(parser, args):
    """``--only`` entries as the (budget key, variant, seed) the rows carry. The budget is
    normalised as the harness writes it (``4.0`` -> ``4``), and a budget or seed that this run
    does not have is an error before anything loads. Before this check, ``--only 4.0:...`` (the
    help's own example) matched no row and fine-tuned nothing, silently."""
    if args.only is None:
        return None
    keys = {f"{b:g}" for b in args.budgets}
    only = set()
    for entry in args.only:
        parts = entry.split(":")
        if len(parts) != 3 or not all(parts):
            parser.error(f"--only entries are budget:variant:seed, got {entry!r}")
        try:
            budget = f"{float(parts[0]):g}"
        except ValueError:
            parser.error(f"--only {entry!r}: the budget {parts[0]!r} is not a number")
        if budget not in keys:
            parser.error(f"--only {entry!r}: budget {parts[0]} is not in --budgets")
        if parts[2] not in args.seeds:
            parser.error(f"--only {entry!r}: seed {parts[2]} is not in --seeds")
        only.add((budget, parts[1], parts[2]))
    return only


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    only = _parse_only(parser, args)
    import torch
    torch.set_num_threads(args.threads)
    from .config import SearchConfig
    from .costs import CostModel
    from .evaluate import Evaluator, layer_groups
    from .genes import Budget, GeneSpace
    from .models import corpus, load_model, search_calibration, token_blocks
    from .search import run_search
    from .store import quant_store
    from qra_kernels.allocation import linear_shapes

    os.makedirs(args.out, exist_ok=True)
    cache_dir = args.cache_dir or os.path.join(args.out, "cache")
    rows_path = os.path.join(args.out, "rows.jsonl")
    # a row counts as done only for the allocation it measured: a search rerun with other
    # settings (or other code) may change what "searched" is, and its old rows are stale
    measured = _current_rows(_read_rows(rows_path), latest_only=False)
    done = {(r["budget"], r["variant"], r["seed"], r["allocation_key"]) for r in measured}
    # the same allocation fine-tuned with the same seed under another name: the fine-tune is
    # deterministic, so its row is reused (marked) rather than run again
    by_allocation = {(r["budget"], r["seed"], r["allocation_key"]): r for r in measured}

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    ft_texts = corpus(args.finetune_corpus, args.finetune_documents)
    n_ft_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in ft_texts)
    n_ft_blocks = n_ft_tokens // args.seq_len
    ft_all = token_blocks(tok, ft_texts, args.seq_len, n_ft_blocks)
    # the last blocks of the fine-tune text are never trained on: same-domain held-out
    ft_train, ft_held = ft_all[:-args.heldout_blocks], ft_all[-args.heldout_blocks:]
    held = token_blocks(tok, corpus(args.heldout_corpus), args.seq_len, args.heldout_blocks)
    setup = {"finetune_tokens": int(ft_train.numel()), "finetune_blocks": int(ft_train.shape[0]),
             "finetune_fingerprint": _fingerprint(ft_train), "heldout_fingerprint": _fingerprint(held),
             "settings": vars(args)}
    print(f"fine-tune text: {args.finetune_corpus} ({setup['finetune_tokens']} tokens); "
          f"held-out: {args.heldout_corpus} ({held.numel()} tokens)", file=sys.stderr)

    bits = tuple(int(b) for b in args.bits.split(","))
    ranks = tuple(int(r) for r in args.ranks.split(","))
    shapes = linear_shapes(model)
    costs = CostModel(shapes, 64)
    groups = layer_groups(list(shapes), args.granularity)
    unmatched = 0  # --only rows naming a variant the search does not have
    for budget_bits in args.budgets:
        key = f"{budget_bits:g}"
        config = SearchConfig(budget_bits=budget_bits, bits_choices=bits, rank_choices=ranks,
                              default_rank=args.default_rank, granularity=args.granularity,
                              method=args.method, evaluations=args.evaluations,
                              refine_steps=args.refine_steps,
                              descent_rounds=args.descent_rounds, select=args.select,
                              kl_slack=args.kl_slack, kl_weight=args.kl_weight,
                              proxy_top=args.proxy_top,
                              proxy_steps=args.proxy_steps, seq_len=args.seq_len,
                              n_blocks=args.calib_blocks, hessian_blocks=args.hessian_blocks)
        archive = os.path.join(args.out, f"archive-{key}.jsonl")
        calib, hessian = search_calibration(tok, config)
        result = run_search(model, calib, config=config, archive=archive, resume=True,
                            cache_dir=cache_dir, progress=True, hessian_calibration=hessian)
        target = result.budget["memory_bytes"]
        space = GeneSpace(groups, bits, ranks, costs, Budget(target, None), result.sensitivity)
        group_of = {n: g for g, ns in groups.items() for n in ns}
        searched = {}
        for n, s in result.best.layers.items():
            searched[group_of[n]] = (s["bits"], s["rank"])
        variants = {"searched": searched, "greedy": greedy_allocation(space, target),
                    "uniform": closest_uniform(space, target)}
        # the same greedy keeping every adapter at rank >= r (the search's plasticity seeds)
        for floor in sorted(r for r in ranks if 0 < r <= args.default_rank):
            try:
                variants[f"greedy-r{floor}"] = space.greedy(Budget(target, None), min_rank=floor,
                                                            fill=True)
            except ValueError:
                pass
        variants.update(widest_uniforms(space, target))
        for i in range(args.randoms):
            variants[f"random-{i}"] = random_allocation(space, target,
                                                        random.Random(1000 * i + 7))
        # the extra greedy and uniform variants only where they are a new allocation
        # (searched, greedy and uniform always run, also when two of them coincide)
        unique, seen_keys = {}, set()
        for v, c in variants.items():
            extra = v.startswith(("greedy-r", "uniform-"))
            if not (extra and space.key(c) in seen_keys):
                unique[v] = c
            seen_keys.add(space.key(c))
        variants = unique
        for b, v, _ in sorted(only or ()):
            if b == key and v not in variants:
                print(f"qra compare: WARNING: --only names {v!r} at budget {key}, which this "
                      f"search does not have (it has: {', '.join(variants)}); nothing is run "
                      f"for it", file=sys.stderr)
                unmatched += 1
        _append(rows_path, {"kind": "search", "budget": key, "budget_bytes": target,
                            "search_seconds_all_runs": result.total_timings.get("total"),
                            "search_timings": result.total_timings,
                            "evaluations": result.evaluations,
                            "allocations": {v: {"memory_bytes": space.memory(c),
                                                "config": {g: list(o) for g, o in c.items()}}
                                            for v, c in variants.items()}, **setup})
        store = quant_store(model, shapes, group_size=64, method=args.method,
                            cache_dir=cache_dir, max_rank=max(ranks), hessian_tokens=hessian)
        n_valid = max(1, calib.shape[0] // 4)
        ev = Evaluator(model, store, calib[:-n_valid], calib[-n_valid:])
        for variant, cfg in variants.items():
            layers = space.layers(cfg)
            for seed in args.seeds:
                if (key, variant, seed, space.key(cfg)) in done:
                    continue
                if only is not None and (key, variant, seed) not in only:
                    continue
                same = by_allocation.get((key, seed, space.key(cfg)))
                if same is not None:
                    _append(rows_path, {**same, "variant": variant,
                                        "copied_from": same["variant"]})
                    continue
                adapted = sum(1 for _, r in layers.values() if r > 0)
                if not adapted:  # said, not silent: its "after" is its "before"
                    print(f"qra compare: {key} {variant}: every layer at rank 0, no adapter "
                          f"to fine-tune; its held-out loss after is the loss before",
                          file=sys.stderr)
                t = time.perf_counter()
                before = ev.loss(layers, held)
                kl = ev.kl(layers)
                proxy = ev.proxy_finetune(layers, args.proxy_steps, 5e-4, seed=0)
                log: List[float] = []
                t_ft = time.perf_counter()
                losses = ev.finetune(layers, args.steps, args.lr, int(seed), train_tokens=ft_train,
                                     batch_size=args.batch,
                                     eval_tokens={"heldout": held, "finetune_domain": ft_held},
                                     schedule="cosine", warmup=min(20, args.steps // 10),
                                     progress=True, desc=f"{key} {variant} seed {seed}", log=log,
                                     # hundreds of steps on a small model: time, not memory,
                                     # is what bounds this harness (same losses either way)
                                     checkpoint_blocks=False)
                ft_seconds = time.perf_counter() - t_ft
                after, same_domain = losses["heldout"], losses["finetune_domain"]
                row = {"kind": "finetune", "budget": key, "variant": variant, "seed": seed,
                       "allocation_key": space.key(cfg), "adapted_layers": adapted,
                       "memory_bytes": space.memory(cfg),
                       "memory_ratio_to_budget": space.memory(cfg) / target,
                       "calib_kl": kl, "proxy_loss": proxy, "heldout_loss_before": before,
                       "heldout_loss_after": after, "finetune_domain_loss_after": same_domain,
                       "finetune_seconds": ft_seconds, "step_seconds": ft_seconds / args.steps,
                       "train_loss_first10": statistics.mean(log[:10]) if log else None,
                       "train_loss_last10": statistics.mean(log[-10:]) if log else None,
                       "row_seconds": time.perf_counter() - t}
                _append(rows_path, row)
                print(json.dumps(row), flush=True)
        ev.restore()
        del ev
    summary = summarize(_read_rows(rows_path))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary))
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if unmatched else 0


def _allocation_key(config: Dict[str, list]) -> str:
    return ";".join(f"{g}={b}/{r}" for g, (b, r) in sorted(config.items()))


def _current_rows(rows: List[dict], latest_only: bool = True) -> List[dict]:
    """The fine-tune rows, each with the ``allocation_key`` it measured (rows written before
    the key was recorded take it from the search row that preceded them). With
    ``latest_only``, only rows of the allocations the latest search row of their budget
    names."""
    last: Dict[str, dict] = {}
    out = []
    for r in rows:
        if r.get("kind") == "search":
            last[r["budget"]] = r
        elif r.get("kind") == "finetune":
            k = r.get("allocation_key")
            if k is None:
                a = last.get(r["budget"], {}).get("allocations", {}).get(r["variant"])
                k = _allocation_key(a["config"]) if a else None
            out.append({**r, "allocation_key": k})
    if latest_only:
        now = {(b, v): _allocation_key(a["config"]) for b, s in last.items()
               for v, a in s.get("allocations", {}).items()}
        out = [r for r in out if now.get((r["budget"], r["variant"])) == r["allocation_key"]]
    return out


def summarize(rows: List[dict]) -> Dict[str, dict]:
    """Per budget: mean ± spread (max − min over seeds) of the held-out loss after the
    fine-tune per variant, the search's margins, rank correlations, and the cost ratio.
    Only rows of the allocations the latest search row names count (:func:`_current_rows`)."""
    out: Dict[str, dict] = {}
    searches = {r["budget"]: r for r in rows if r.get("kind") == "search"}
    current = _current_rows(rows)
    for budget, srch in searches.items():
        fts = [r for r in current if r["budget"] == budget]
        by_variant: Dict[str, List[dict]] = {}
        for r in fts:
            by_variant.setdefault(r["variant"], []).append(r)
        table = {}
        for v, rs in by_variant.items():
            after = [r["heldout_loss_after"] for r in rs]
            table[v] = {"memory_MiB": rs[0]["memory_bytes"] / 2**20,
                        "memory_ratio_to_budget": rs[0]["memory_ratio_to_budget"],
                        "seeds": len(rs), "calib_kl": rs[0]["calib_kl"],
                        "proxy_loss": rs[0]["proxy_loss"],
                        "heldout_loss_before": rs[0]["heldout_loss_before"],
                        "heldout_loss_after_mean": statistics.mean(after),
                        "heldout_loss_after_spread": max(after) - min(after),
                        "step_seconds": statistics.mean(r["step_seconds"] for r in rs)}
        entry = {"budget_MiB": srch["budget_bytes"] / 2**20, "variants": table,
                 "search_seconds": srch["search_seconds_all_runs"]}
        if table:
            means = [table[v]["heldout_loss_after_mean"] for v in table]
            entry["spearman_kl_vs_final"] = spearman([table[v]["calib_kl"] for v in table], means)
            entry["spearman_proxy_vs_final"] = spearman([table[v]["proxy_loss"] for v in table],
                                                        means)
            # the default selection's score (proxy + kl_weight x KL, docs/SEARCH.md); runs
            # from before it existed are scored with today's default weight
            w = srch["settings"].get("kl_weight", DEFAULT_KL_WEIGHT)
            entry["kl_weight"] = w
            entry["spearman_score_vs_final"] = spearman(
                [table[v]["proxy_loss"] + w * table[v]["calib_kl"] for v in table], means)
            step = statistics.mean(t["step_seconds"] for t in table.values())
            steps_per_epoch = srch["finetune_blocks"] / srch["settings"]["batch"]
            entry["finetune_epoch_seconds"] = step * steps_per_epoch
            entry["search_over_epoch"] = (srch["search_seconds_all_runs"] or 0) / \
                entry["finetune_epoch_seconds"]
            if "searched" in table:
                s = table["searched"]
                spread = max(t["heldout_loss_after_spread"] for t in table.values())
                entry["max_seed_spread"] = spread
                entry["margins"] = {v: t["heldout_loss_after_mean"] - s["heldout_loss_after_mean"]
                                    for v, t in table.items() if v != "searched"}
        out[budget] = entry
    return out


def format_summary(summary: Dict[str, dict]) -> str:
    lines = []
    for budget, e in summary.items():
        lines.append(f"budget {budget} bits ({e['budget_MiB']:.2f} MiB); search "
                     f"{(e.get('search_seconds') or 0) / 60:.1f} min = "
                     f"{e.get('search_over_epoch', float('nan')):.2f} of a fine-tune epoch "
                     f"({e.get('finetune_epoch_seconds', float('nan')) / 60:.1f} min)")
        lines.append(f"  {'allocation':<15}{'MiB':>8}{'of T':>7}{'KL':>8}{'proxy':>8}"
                     f"{'before':>8}{'after (mean ± spread)':>24}{'seeds':>6}")
        for v, t in sorted(e["variants"].items(), key=lambda kv: kv[1]["heldout_loss_after_mean"]):
            lines.append(f"  {v:<15}{t['memory_MiB']:>8.2f}{t['memory_ratio_to_budget']:>7.3f}"
                         f"{t['calib_kl']:>8.3f}{t['proxy_loss']:>8.3f}"
                         f"{t['heldout_loss_before']:>8.3f}"
                         f"{t['heldout_loss_after_mean']:>15.4f} ± {t['heldout_loss_after_spread']:.4f}"
                         f"{t['seeds']:>6}")
        if "margins" in e:
            lines.append("  searched beats: " + ", ".join(
                f"{v} by {m:+.4f}" for v, m in sorted(e["margins"].items())) +
                f" (largest seed spread {e['max_seed_spread']:.4f})")
        def rho(k):
            v = e.get(k)
            return "n/a" if v is None else f"{v:.2f}"
        lines.append(f"  Spearman vs final loss: KL {rho('spearman_kl_vs_final')}, "
                     f"proxy {rho('spearman_proxy_vs_final')}, proxy + "
                     f"{e.get('kl_weight', DEFAULT_KL_WEIGHT):g} x KL {rho('spearman_score_vs_final')}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
