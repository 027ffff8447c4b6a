"""CPU kernel benchmark: qra's ``cpu`` backend (each path, each bit-width) against torch's
CPU kernels and bitsandbytes NF4 on one projection shape, every implementation measured in
this one process, interleaved round by round (so a slow phase of a shared machine hits all
of them alike); it reports medians and the ratios issue 18 asks for. A benchmark, not a
test: it asserts nothing.

    flock /tmp/cpu.lock python benches/cpu_bench.py --ms 1,16 --out benches/results/cpu-DATE-small.json
    flock /tmp/cpu.lock python benches/cpu_bench.py --ms 256,4096 --caches hot ...

Implementations (every call goes through the public op, ``qk.qra_linear``, for qra):
  qra:<path>:<bits>b[:fp32x]   the cpu backend forced to one path (gemv, int8, gemm), bf16 x
                               (fp32 x with the suffix); qra:auto is the exact-numbers
                               policy, qra:auto+int8 the one that may take the int8 path;
  dense_bf16 / dense_fp32      F.linear on a float weight;
  int4pack                     torch._weight_int4pack_mm_for_cpu (4-bit, group 64, bf16 x);
  int8pack                     torch._weight_int8pack_mm (8-bit per channel, bf16 x);
  bnb_nf4                      bitsandbytes.matmul_4bit, NF4, blocksize 64, bf16 x (its CPU
                               path: a fused bf16 GEMV at M = 1, dequantize + matmul above).

Caches: ``hot`` — every implementation's operands stay resident (this machine's L3 holds
all of them), as in decoding a model that fits the cache; ``cold`` — before each timed
call a buffer of twice the L3 is read, so the weights come from DRAM, as in decoding a
model larger than the cache. Timer: perf_counter around one call, Python dispatch
included; median over rounds.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import time

# Run as a script from a checkout: import this checkout's qra_kernels, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import qra_kernels as qk
from qra_kernels import _ext
from qra_kernels.backends import cpu_backend
from qra_kernels.bench.impls import peer_impls, selected_backend


def l3_bytes() -> int:
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KM")) * mult)
    return best or 32 << 20


def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ext = _ext.extension()
    return {"cpu": model, "logical_cpus": os.cpu_count(), "l3_bytes": l3_bytes(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "qra_cpu_isa": ext.cpu_isa(),
            "runnable_isas": ext.cpu_runnable_isas()}


def qra_impl(qw, bits, path, x_dtype, int8=False):
    n = qw.out_features

    def call(x):
        with selected_backend("cpu"), cpu_backend.path(path, int8=int8):
            return qk.qra_linear(x, qw)
    return call


def build(m, n, k, bits_list, paths, group):
    torch.manual_seed(0)
    w = torch.randn(n, k) / k ** 0.5
    xs = {torch.bfloat16: torch.randn(m, k).bfloat16()}
    xs[torch.float32] = xs[torch.bfloat16].float()
    impls = {}
    for bits in bits_list:
        qw = qk.quantize_weight(w, bits, group_size=group, method="rtn")
        for path in paths:
            if (path == "int8" and m > 64) or (path == "torch" and m < 64):
                continue
            impls[f"qra:{path}:{bits}b"] = (qra_impl(qw, bits, path, torch.bfloat16),
                                           xs[torch.bfloat16], qw.nbytes)
            impls[f"qra:{path}:{bits}b:fp32x"] = (qra_impl(qw, bits, path, torch.float32),
                                                 xs[torch.float32], qw.nbytes)
        impls[f"qra:auto+int8:{bits}b"] = (qra_impl(qw, bits, "auto", torch.bfloat16, True),
                                          xs[torch.bfloat16], qw.nbytes)
    peers, info = peer_impls(torch.device("cpu"))
    wanted = {"torch_dense_bf16": "dense_bf16", "torch_dense_fp32": "dense_fp32",
              "torch_int4pack_cpu": "int4pack", "torch_int8pack": "int8pack",
              "bitsandbytes_nf4": "bnb_nf4"}
    skipped = {}
    for impl in peers:
        short = wanted.get(impl.name)
        if short is None:
            continue
        bits = impl.bits[0] if impl.bits else None
        act = impl.activation_dtype or torch.bfloat16
        if short == "dense_fp32":
            act = torch.float32
        try:
            base = impl.prepare(w, bits, group, act)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            skipped[short] = str(e)
            continue
        prepared = impl.bind(base, xs[act], None)
        state = prepared.state
        impls[short] = (lambda x, s=state, c=prepared.call: c(dict(s, x=x)), xs[act],
                        prepared.weight_bytes)
    return impls, skipped, info


def measure(impls, rounds, cache, min_round_s=0.0):
    flush = torch.empty(2 * l3_bytes() // 4, dtype=torch.float32).fill_(1.0) if cache == "cold" else None
    times = {name: [] for name in impls}
    names = list(impls)
    with torch.no_grad():
        for name in names:  # warm-up (first-call allocations, lazy init)
            fn, x, _ = impls[name]
            fn(x)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                fn, x, _ = impls[name]
                if flush is not None:
                    flush.sum()
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    return times


def summarize(times, impls):
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        out[name] = {"median_ms": 1e3 * statistics.median(ts),
                     "p10_ms": 1e3 * ts[len(ts) // 10], "p90_ms": 1e3 * ts[(9 * len(ts)) // 10],
                     "calls": len(ts), "weight_bytes": impls[name][2]}
    return out


EXACT_PATHS = ("gemv", "gemm", "torch", "auto")
INT8_PATHS = ("int8", "auto+int8")


def ratios(res, m):
    """The comparisons of issue 18 (time of qra ÷ time of the peer; < 1 means qra faster),
    for the fastest exact-numbers qra entry and the fastest one allowed the int8 path, per
    bit-width (bf16 x, as the peers)."""
    def best(bits, paths):
        cands = [(v["median_ms"], k) for k, v in res.items()
                 if k.split(":")[0] == "qra" and k.split(":")[1] in paths
                 and k.split(":")[2] == f"{bits}b" and len(k.split(":")) == 3]
        return min(cands) if cands else None

    r = {}
    for policy, paths in (("exact", EXACT_PATHS), ("int8", EXACT_PATHS + INT8_PATHS)):
        top = {b: best(b, paths) for b in (2, 3, 4, 8)}
        for bits, entry in top.items():
            if entry is None:
                continue
            ms, name = entry
            for peer in ("dense_bf16", "int4pack", "int8pack", "bnb_nf4", "dense_fp32"):
                if peer in res:
                    r[f"{policy}: {name} / {peer}"] = ms / res[peer]["median_ms"]
        for a in (2, 3):
            if top.get(a) and top.get(4):
                r[f"{policy}: best {a}-bit / best 4-bit"] = top[a][0] / top[4][0]
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", default="1,16,256,4096")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--paths", default="gemv,int8,gemm,torch,auto")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--caches", default="hot,cold")
    p.add_argument("--rounds", type=int, default=0, help="0: by M (30 at M<=16, 7 at 256, 3 above)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "date": datetime.date.today().isoformat(), "machine": machine(),
              "shape": [args.n, args.k], "group_size": args.group, "rank": 0, "cases": []}
    for m in [int(v) for v in args.ms.split(",")]:
        impls, skipped, info = build(m, args.n, args.k, [int(b) for b in args.bits.split(",")],
                                     args.paths.split(","), args.group)
        report["peers"] = info
        for cache in args.caches.split(","):
            if cache == "cold" and m > 16:
                continue  # compute-bound: where the weights come from does not matter
            rounds = args.rounds or (30 if m <= 16 else 7 if m <= 256 else 3)
            res = summarize(measure(impls, rounds, cache), impls)
            case = {"M": m, "cache": cache, "rounds": rounds, "results": res,
                    "skipped": skipped, "ratios": ratios(res, m)}
            report["cases"].append(case)
            print(f"\n== M={m} cache={cache} ({rounds} rounds), median ms", flush=True)
            for name, v in sorted(res.items(), key=lambda kv: kv[1]["median_ms"]):
                print(f"  {name:28s} {v['median_ms']:9.3f}   (p10 {v['p10_ms']:.3f}, "
                      f"p90 {v['p90_ms']:.3f})")
            for k, v in case["ratios"].items():
                print(f"  ratio {k:48s} {v:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
