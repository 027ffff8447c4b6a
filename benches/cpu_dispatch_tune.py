"""Measure the CPU kernel's paths and write the thresholds ``auto`` reads
(``qra_kernels/configs/cpu_dispatch.json``, see ``qra_kernels/backends/cpu_backend.py``).

For every build of the kernel this CPU runs (forced with ``QRA_CPU_ISA``), activation dtype
(fp32, bf16), bit-width and number of rows M on a grid, it times each path — forward:
``gemv``, ``gemm``, ``torch`` and ``int8``; backward dX: ``gemv``, ``gemm``, ``torch`` — on a few projection
shapes (operands hot, median of interleaved calls, 2 torch threads), and keeps for each M
the path with the smallest geometric-mean time over the shapes. Rules are the resulting
steps ``[[m_max, path], ..., [null, path]]`` for three policies: ``exact`` (float paths
only, auto's default), ``int8`` (the int8 path allowed, forward) and ``backward``.

    flock /tmp/cpu.lock python benches/cpu_dispatch_tune.py --isas avx512bf16 --out /tmp/t1.json
    ...  (one build per call keeps each locked run short)
    python benches/cpu_dispatch_tune.py --merge /tmp/t*.json --out qra_kernels/configs/cpu_dispatch.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

# Run as a script from a checkout: import this checkout's qra_kernels, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import qra_kernels as qk
from qra_kernels import _ext
from qra_kernels.backends import _REGISTRY, _ensure_loaded, cpu_backend

MS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
# The GEMV and int8 paths cost ~linear in M (they re-read the packed words per block of a
# few rows); above this many rows they are not timed (each call would cost seconds on the
# 4096² shape) and the rule takes the GEMM. Whether the GEMM already wins at SMALL_MAX is in
# the table's measured_s (checked by the README's figures), not assumed.
SMALL_MAX = 64
SHAPES = ((4096, 4096), (1536, 576), (576, 1536))  # (N, K): Llama-sized, SmolLM2 MLP
BITS = (2, 3, 4, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


PATHS = ("gemv", "int8", "gemm", "torch")


def measure_isa(isa, reps, ms, small_max=SMALL_MAX, paths=PATHS):
    os.environ["QRA_CPU_ISA"] = isa
    if _ext.extension().cpu_isa() != isa:
        raise SystemExit(f"this CPU cannot run the {isa} build")
    cpu = _REGISTRY["cpu"]
    out = {}
    torch.manual_seed(0)
    for (n, k) in SHAPES:
        w = torch.randn(n, k) / k ** 0.5
        for bits in BITS:
            qw = qk.quantize_weight(w, bits, group_size=64, method="rtn")
            args = (qw.qweight, qw.scales, qw.zeros, bits, 64, n, None, None, 1.0)
            for dname, dtype in DTYPES.items():
                for m in ms:
                    x = torch.randn(m, k).to(dtype)
                    go = torch.randn(m, n).to(dtype)
                    row = {}
                    for path in paths:
                        if path in ("gemv", "int8") and m > small_max:
                            continue
                        with cpu_backend.path(path):
                            row[f"fwd:{path}"] = _time(lambda: cpu.forward(x, *args, None), reps)
                            if path != "int8":
                                row[f"bwd:{path}"] = _time(
                                    lambda: cpu.backward(go, x, *args, True, False), reps)
                    out[f"{dname}|{bits}|{n}x{k}|{m}"] = row
            print(f"{isa} {n}x{k} {bits}-bit done", flush=True)
    return out


def rules_from(measured, isas, ms):
    rules = {}
    for isa in isas:
        data = measured[isa]
        rules[isa] = {}
        for dname in DTYPES:
            rules[isa][dname] = {}
            for kind, keys in (("exact", ("fwd:gemv", "fwd:gemm", "fwd:torch")),
                               ("int8", ("fwd:gemv", "fwd:gemm", "fwd:torch", "fwd:int8")),
                               ("backward", ("bwd:gemv", "bwd:gemm", "bwd:torch"))):
                rules[isa][dname][kind] = {}
                for bits in BITS:
                    best = []
                    for m in ms:
                        rows = [data[f"{dname}|{bits}|{n}x{k}|{m}"] for (n, k) in SHAPES]
                        score = {key: sum(math.log(row[key]) for row in rows)
                                 for key in keys if all(key in row for row in rows)}
                        best.append(min(score, key=score.get).split(":")[1])
                    steps = []
                    for i, m in enumerate(ms):
                        last = i == len(ms) - 1
                        if last or best[i + 1] != best[i]:
                            steps.append([None if last else m, best[i]])
                    rules[isa][dname][kind][str(bits)] = steps
    return rules


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isas", default=None, help="comma-separated builds (default: all but generic)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--small-max", type=int, default=SMALL_MAX,
                   help="the most rows at which the gemv and int8 paths are timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", default=",".join(PATHS),
                   help="paths to time (default all); a path left out is no candidate of the "
                        "rules (on an AVX2-only CPU torch's bf16 GEMM takes seconds a call)")
    p.add_argument("--merge", nargs="*", default=None, help="combine earlier outputs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    ms = [int(v) for v in args.ms.split(",")]
    if args.merge:
        measured, meta = {}, None
        for path in args.merge:
            with open(path) as f:
                part = json.load(f)
            measured.update(part["measured_s"])
            meta = meta or part
        table = {**{k: meta[k] for k in ("machine", "threads", "group_size", "shapes", "ms")},
                 "about": "Thresholds of the cpu backend's paths, measured by "
                          "benches/cpu_dispatch_tune.py (median seconds per call in "
                          "measured_s; rules: the fastest path per M, geometric mean over "
                          "the shapes).",
                 "commands": [part_cmd for path in args.merge
                              for part_cmd in [json.load(open(path))["command"]]],
                 "date": datetime.date.today().isoformat(),
                 "rules": rules_from(measured, list(measured), meta["ms"]),
                 "measured_s": measured}
    else:
        _ensure_loaded()
        torch.set_num_threads(args.threads)
        isas = (args.isas.split(",") if args.isas else
                [i for i in _ext.extension().cpu_runnable_isas().split(",") if i != "generic"])
        cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                          if line.startswith("model name")), "")
        paths = tuple(v for v in args.paths.split(",") if v)
        unknown = set(paths) - set(PATHS)
        if unknown or "gemm" not in paths:
            p.error(f"--paths: choose from {','.join(PATHS)}, gemm included; got {args.paths!r}")
        measured = {isa: measure_isa(isa, args.reps, ms, args.small_max, paths) for isa in isas}
        table = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                 "machine": {"cpu": cpu_model, "logical_cpus": os.cpu_count(),
                             "torch": torch.__version__},
                 "threads": args.threads, "group_size": 64,
                 "shapes": [list(s) for s in SHAPES], "ms": ms,
                 "rules": rules_from(measured, isas, ms), "measured_s": measured}
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
