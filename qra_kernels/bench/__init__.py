"""``qra bench``: kernel microbenchmarks of every qra backend against the peers and the
hardware limit, plus end-to-end decode and training numbers; writes JSON + PNG.

The CLI (``qra bench``) calls :func:`add_arguments` and :func:`main_from_args`;
``python -m qra_kernels.bench`` runs the same thing on its own.

Modules: :mod:`.shapes` (real projection shapes), :mod:`.impls` (qra backends and peers),
:mod:`.timing` (cache protocol, timers, memory), :mod:`.machine` (machine description and
measured copy bandwidth), :mod:`.runner` (the sweep), :mod:`.report` (table, speed-ups,
PNG), :mod:`.end_to_end` (SmolLM2-135M decode and training step; Llama-3-8B-shaped GPU
stack).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import sys
import time
from typing import Optional, Sequence

from ..cli_common import Parser, int_list, positive, run_command, str_list

__all__ = ["add_arguments", "main_from_args", "main", "build_config"]

_int_list, _str_list = int_list(), str_list()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``qra bench``'s options to ``parser``."""
    parser.add_argument("--quick", action="store_true",
                        help="the small sweep (SmolLM2-135M projections, M 1 and 64, ranks 0 "
                             "and 16): a few minutes on a 2-core CPU")
    parser.add_argument("--out", default="bench-results", metavar="DIR",
                        help="directory for the JSON and PNG (default: %(default)s)")
    parser.add_argument("--name", default=None,
                        help="file stem of the outputs (default: <device>-<UTC date>)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (auto: cuda when a GPU is visible)")
    parser.add_argument("--models", type=_str_list, default=None,
                        help="comma-separated: SmolLM2-135M, Qwen3-4B, Llama-3-8B, tiny")
    parser.add_argument("--layers", type=_str_list, default=None,
                        help="only these projections (q_proj, k_proj, o_proj, gate_proj, "
                             "down_proj)")
    parser.add_argument("--bits", type=_int_list, default=None, help="e.g. 2,3,4,8")
    parser.add_argument("--ranks", type=_int_list, default=None, help="LoRA ranks, e.g. 0,16")
    parser.add_argument("--ms", type=_int_list, default=None,
                        help="rows of x (tokens), e.g. 1,16,256")
    parser.add_argument("--group-size", type=int, default=None, help="32, 64 or 128")
    parser.add_argument("--implementations", type=_str_list, default=None,
                        help="only these (e.g. qra:reference,torch_dense_fp32)")
    parser.add_argument("--no-peers", action="store_true", help="qra backends only")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timed passes per case")
    parser.add_argument("--max-copies", type=int, default=None,
                        help="cap on operand copies of the cache protocol")
    e2e = parser.add_mutually_exclusive_group()
    e2e.add_argument("--e2e", dest="e2e", action="store_true", default=None,
                     help="also run the end-to-end model measurements (default for the full "
                          "suite; SmolLM2-135M on a CPU, a Llama-3-8B-shaped stack on a GPU)")
    e2e.add_argument("--no-e2e", dest="e2e", action="store_false",
                     help="skip them (default for --quick)")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-png", action="store_true", help="write the JSON only")
    return parser


def build_config(args: argparse.Namespace):
    """The :class:`~qra_kernels.bench.runner.SuiteConfig` the options describe."""
    import torch
    from .runner import FULL, QUICK, with_overrides
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = QUICK if args.quick else FULL
    cfg = with_overrides(
        base, device=device,
        models=tuple(args.models) if args.models else None,
        # --models without --layers: every projection (QUICK's list is SmolLM2's).
        layers=tuple(args.layers) if args.layers else (() if args.models else None),
        bits=tuple(args.bits) if args.bits else None,
        ranks=tuple(args.ranks) if args.ranks else None,
        ms=tuple(args.ms) if args.ms else None,
        group_size=args.group_size,
        implementations=tuple(args.implementations) if args.implementations else None,
        peers=False if args.no_peers else None,
        min_time_s=args.min_time,
        max_copies=args.max_copies,
        activation_dtype="bfloat16" if device == "cuda" else None,
    )
    return cfg


def _command_line() -> str:
    """How this run was started, for the report: ``qra bench ...`` when the CLI ran it."""
    argv = list(sys.argv)
    if "bench" in argv[1:]:
        rest = argv[argv.index("bench", 1) + 1:]
        return " ".join(["qra bench", *map(shlex.quote, rest)])
    return " ".join(shlex.quote(a) for a in argv)


def _device_slug(report: dict) -> str:
    gpu = report["machine"].get("gpu")
    if gpu:
        return re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-")
    return "cpu"


def main_from_args(args: argparse.Namespace) -> int:
    """Run the benchmarks the parsed options ask for. Bad input raises ``ValueError``
    (the ``qra`` command turns it into its one-line error and exit status 2)."""
    import torch
    from . import report as report_mod
    from .runner import run_suite

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = build_config(args)
    config.validate()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU")

    command = getattr(args, "bench_command_line", None) or _command_line()
    t0 = time.perf_counter()
    bar = _Progress()
    try:
        result = run_suite(config, progress=bar.update, command=command)
    finally:
        bar.close()
    result["summary"] = report_mod.summarize(result["rows"])

    run_e2e = (not args.quick) if args.e2e is None else args.e2e
    if run_e2e:
        result["end_to_end"] = _end_to_end(config, args.quick)
    result["wall_s"] = time.perf_counter() - t0

    stem = args.name or f"{_device_slug(result)}-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{stem}.json")
    result["outputs"] = {"json": json_path}
    if not args.no_png:
        png_path = os.path.join(args.out, f"{stem}.png")
        report_mod.write_png(result, png_path)
        result["outputs"]["png"] = png_path
    report_mod.write_json(result, json_path)

    print(report_mod.format_table(result))
    if "end_to_end" in result:
        print()
        print(_format_e2e(result["end_to_end"]))
    print(f"\nwrote {', '.join(result['outputs'].values())} in {result['wall_s']:.0f} s")
    return 0


def _end_to_end(config, quick: bool) -> dict:
    from . import end_to_end
    out: dict = {}
    say = lambda s: print(f"[e2e] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if config.device == "cpu":
        try:
            out["smollm2_135m_cpu"] = end_to_end.smollm2_end_to_end(
                new_tokens=8 if quick else 32, seq_len=64 if quick else 128, progress=say)
        except Exception as e:  # noqa: BLE001 - e.g. the model package is not installed
            out["smollm2_135m_cpu"] = {"error": f"{type(e).__name__}: {e}"}
    else:
        try:
            out["llama3_8b_stack_gpu"] = end_to_end.llama3_8b_stack(device=config.device)
        except Exception as e:  # noqa: BLE001
            out["llama3_8b_stack_gpu"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _format_e2e(e2e: dict) -> str:
    lines = []
    for name, res in e2e.items():
        if "error" in res:
            lines.append(f"{name}: not run ({res['error']})")
            continue
        if "variants" in res:
            lines.append(f"{name}: {res['model']}, {res['bits']}-bit, LoRA rank {res['rank']}")
            lines.append(f"  {'variant':<30}{'decode tok/s':>13}{'train step s':>14}"
                         f"{'step peak MiB':>15}{'proj MiB':>10}")
            for v, r in res["variants"].items():
                if "error" in r:
                    lines.append(f"  {v:<30}failed: {r['error']}")
                    continue
                dec, step = r["decode"], r["train_step"]
                peak = step.get("peak_memory_rise_bytes")
                lines.append(
                    f"  {v:<30}"
                    f"{'failed' if 'error' in dec else format(dec['decode_tokens_per_s'], '.2f'):>13}"
                    f"{'failed' if 'error' in step else format(step['step_s'], '.2f'):>14}"
                    f"{'n/a' if peak is None else f'{peak / 2**20:.0f}':>15}"
                    f"{r['stored_projection_bytes'] / 2**20:>10.1f}")
                for phase in (dec, step):
                    if "error" in phase:
                        lines.append(f"    {phase['error']}")
        else:
            lines.append(f"{name}: {res}")
    return "\n".join(lines)


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self):
        self._bar = None

    def update(self, done: int, total: int, label: str) -> None:
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
        self._bar.set_postfix_str(label[-60:], refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = Parser(prog="qra bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.bench_command_line = " ".join(["python -m qra_kernels.bench", *map(shlex.quote, argv)])
    return run_command("bench", main_from_args, args)
