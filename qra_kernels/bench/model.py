"""A performance model of the decode kernels from their static counts — a prediction, not a
measurement: no GPU number here was measured.

For one call (device, M rows, N x K weight, bits, group size, LoRA rank) it takes the
kernel's main-loop SASS counts (:mod:`.static`: instructions and tensor-core instructions
per iteration, registers) and the launch plan (``_C.cuda_host.decode_plan``, the very code
the launcher runs), and bounds the time four ways; the largest bound wins:

* ``t_hbm``      = bytes moved / (peak HBM bandwidth x ``hbm_efficiency``);
* ``t_issue``    = warp instructions / (SMs x 4 schedulers x clock);
* ``t_tensor``   = mma.sync instructions / (SMs x ``mma_per_sm_clock`` x clock);
* ``t_inflight`` = bytes moved / (bytes the resident warps keep in flight / DRAM latency)
  (Little's law: too few bytes in flight cannot fill the bus);

then adds the fixed costs of a call: the launch gap inside a CUDA graph, one DRAM latency
to fill the pipeline, one latency more for the split-K finish (partials written, counted,
read back) and, with no split, one for the LoRA epilogue's reads (with a split they share
the partials' round trip). The fraction of HBM bandwidth is ``bytes / t / peak``, reported
with and without the fixed costs. Every constant is an assumption written in
:data:`ASSUMPTIONS` and in the output, to be replaced by measurements
(``benches/gpu_run.sh``).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

DEVICES = {
    # SMs, peak HBM bandwidth (vendor figures), shared memory per SM.
    "H100-SXM": dict(sms=132, hbm_TBps=3.35, smem_per_sm=228 * 1024),
    "H200": dict(sms=132, hbm_TBps=4.8, smem_per_sm=228 * 1024),
}

ASSUMPTIONS = {
    "clock_GHz": 1.755,          # sustained SM clock (boost is 1.98 GHz: a margin)
    "hbm_efficiency": 0.90,      # best streaming-read fraction of peak (copy kernels reach ~0.9)
    "dram_latency_us": 1.0,      # loaded DRAM round trip (unloaded ~0.6-0.8 us)
    "launch_gap_us": 1.0,        # between kernels replayed in a CUDA graph
    "issue_per_sm_clock": 4,     # warp instructions: one per scheduler per clock
    "mma_per_sm_clock": 0.5,     # mma.sync.m16n8k16 per SM per clock (half the wgmma rate)
    "per_sm_GBps": 50.0,         # what one SM's loads alone can stream (the x·Aᵀ blocks)
    "registers_per_sm": 65536,
    "max_warps_per_sm": 64,
}

SHAPES = {"4096x4096": (4096, 4096), "4096x14336": (4096, 14336), "14336x4096": (14336, 4096)}


def _blocks_per_sm(registers: int, threads: int, smem: int, min_blocks: int, dev: dict) -> int:
    regs = max(8, -(-registers // 8) * 8)  # allocated in units of 8 per thread
    by_regs = ASSUMPTIONS["registers_per_sm"] // (regs * threads)
    by_smem = dev["smem_per_sm"] // max(1, smem + 1024)  # 1 KiB reserved per block
    by_warps = ASSUMPTIONS["max_warps_per_sm"] // (threads // 32)
    return max(1, min(by_regs, by_smem, by_warps, 32))


def decode_bytes(m: int, n: int, k: int, bits: int, group_size: int, rank: int,
                 x_bytes: int = 2, lora_bytes: int = 2, splits: int = 1) -> int:
    """HBM bytes of one decode call: packed weight + scales/zeros + x + y + adapter, and the
    split-K partials (written and read once)."""
    kp = -(-k // group_size) * group_size
    weight = n * kp * bits // 8 + 2 * 2 * n * kp // group_size
    act = m * k * x_bytes + m * n * x_bytes
    lora = rank * (k + n) * lora_bytes + m * rank * 4
    partial = 2 * 4 * m * n * splits if splits > 1 else 0
    return weight + act + lora + partial


def predict_cuda_decode(kernel: dict, plan: dict, dev_name: str, m: int, n: int, k: int,
                        bits: int, group_size: int, rank: int) -> dict:
    """Predicted time of the CUDA decode kernel (csrc/cuda/decode.cuh) for one call.

    ``kernel``: the static stats of the variant that runs (loop instructions per group per
    thread, HMMA per iteration, registers); ``plan``: ``_C.cuda_host.decode_plan(...)``.
    """
    dev = DEVICES[dev_name]
    clock = ASSUMPTIONS["clock_GHz"] * 1e9
    sms = dev["sms"]
    kp = -(-k // group_size) * group_size
    groups = kp // group_size
    bytes_moved = decode_bytes(m, n, k, bits, group_size, rank, splits=plan["splits"])
    # One main-loop iteration: one group of 32 columns for one warp.
    warp_iters = math.ceil(n / 32) * groups
    loop = kernel["loop_instructions"]
    hmma = kernel["loop_mix"].get("tensor", 0)
    # x staging before the loop: ~6 instructions per value per thread-item (overlapped with
    # the prologue's memory latency, but it takes issue slots).
    staging = plan["tiles"] * plan["splits"] * m * plan["groups_per_split"] * group_size * 6 / 32
    t_hbm = bytes_moved / (dev["hbm_TBps"] * 1e12 * ASSUMPTIONS["hbm_efficiency"])
    t_issue = (warp_iters * loop + staging) / (sms * ASSUMPTIONS["issue_per_sm_clock"] * clock)
    t_tensor = warp_iters * hmma / (sms * ASSUMPTIONS["mma_per_sm_clock"] * clock)
    # Bytes in flight: each resident warp keeps (stages - 1) groups of its slice in flight.
    bpsm = _blocks_per_sm(kernel["registers"], 128, plan["smem_bytes"], 4, dev)
    blocks = plan["tiles"] * plan["splits"]
    resident = min(blocks, bpsm * sms)
    ring_chunks = {2: 32, 3: 16, 4: 16, 8: 8}[bits]
    stages = ring_chunks // (group_size // 32)
    group_bytes = 32 * group_size * bits // 8 + 128
    inflight_groups = min(stages - 1, plan["groups_per_split"])
    inflight = resident * 4 * inflight_groups * group_bytes
    t_inflight = bytes_moved / (inflight / (ASSUMPTIONS["dram_latency_us"] * 1e-6))
    bounds = {"hbm": t_hbm, "issue": t_issue, "tensor": t_tensor, "inflight": t_inflight}
    t_main = max(bounds.values())
    lat = ASSUMPTIONS["dram_latency_us"] * 1e-6
    fixed = ASSUMPTIONS["launch_gap_us"] * 1e-6 + lat
    if plan["splits"] > 1:
        fixed += lat
    elif rank > 0:
        fixed += lat
    # x·Aᵀ blocks run beside the stream (first in the grid): x staged, A streamed, partials
    # counted, summed by the last, flag raised — about three round trips plus their share of
    # A. The epilogue waits only if that is longer than the stream itself.
    xa_wait = 0.0
    if rank > 0 and plan["xa_blocks"]:
        a_bytes = rank * k * 2
        t_xa = 3 * lat + a_bytes / (plan["xa_blocks"] * ASSUMPTIONS["per_sm_GBps"] * 1e9)
        xa_wait = max(0.0, t_xa - (lat + t_main))
    fixed += xa_wait
    t = t_main + fixed
    peak = dev["hbm_TBps"] * 1e12
    return dict(
        device=dev_name, kernel="cuda:decode", m=m, n=n, k=k, bits=bits, group_size=group_size,
        rank=rank, bytes=bytes_moved, splits=plan["splits"], blocks=blocks + plan["xa_blocks"],
        blocks_per_sm=bpsm, waves=round(blocks / (bpsm * sms), 2),
        bounds_us={k_: round(v * 1e6, 3) for k_, v in bounds.items()}, limiter=max(bounds, key=bounds.get),
        fixed_us=round(fixed * 1e6, 3), xa_wait_us=round(xa_wait * 1e6, 3),
        time_us=round(t * 1e6, 3),
        hbm_fraction_steady=round(bytes_moved / t_main / peak, 3),
        hbm_fraction_call=round(bytes_moved / t / peak, 3),
        instructions_per_packed_byte=round(loop / (group_size * bits / 8), 2),
        registers=kernel["registers"],
    )


def predict_triton_decode(kernel: dict, dev_name: str, m: int, n: int, k: int, bits: int,
                          group_size: int, rank: int, block_n: int, block_k: int,
                          num_warps: int, split_k: int, num_stages: int = 2) -> dict:
    """The same bounds for the Triton decode kernel (one iteration: a BLOCK_N x BLOCK_K tile
    per program; no cp.async ring on the M = 1 path: one iteration of loads in flight)."""
    dev = DEVICES[dev_name]
    clock = ASSUMPTIONS["clock_GHz"] * 1e9
    sms = dev["sms"]
    threads = 32 * num_warps
    programs = math.ceil(n / block_n) * split_k
    iters = math.ceil(n / block_n) * math.ceil(k / block_k)
    bytes_moved = decode_bytes(m, n, k, bits, group_size, rank, splits=split_k)
    t_hbm = bytes_moved / (dev["hbm_TBps"] * 1e12 * ASSUMPTIONS["hbm_efficiency"])
    t_issue = iters * num_warps * kernel["loop_instructions"] / (
        sms * ASSUMPTIONS["issue_per_sm_clock"] * clock)
    t_tensor = iters * num_warps * kernel["loop_mix"].get("tensor", 0) / (
        sms * ASSUMPTIONS["mma_per_sm_clock"] * clock)
    bpsm = _blocks_per_sm(kernel["registers"], threads,
                          kernel.get("meta", {}).get("shared_bytes_launch") or 0, 1, dev)
    resident = min(programs, bpsm * sms)
    # A pipelined loop (cp.async, LDGSTS in the SASS) keeps num_stages - 1 tiles ahead; a plain
    # one (the M = 1 FMA path) only the tile it is loading.
    ahead = max(1, num_stages - 1) if kernel.get("features", {}).get("LDGSTS") else 1
    inflight = resident * ahead * block_n * block_k * bits // 8
    t_inflight = bytes_moved / (inflight / (ASSUMPTIONS["dram_latency_us"] * 1e-6))
    bounds = {"hbm": t_hbm, "issue": t_issue, "tensor": t_tensor, "inflight": t_inflight}
    t_main = max(bounds.values())
    lat = ASSUMPTIONS["dram_latency_us"] * 1e-6
    # Split-K: a second kernel (reduce); LoRA: a pre-pass kernel (x·Aᵀ).
    launches = 1 + (split_k > 1) + (rank > 0)
    fixed = launches * (ASSUMPTIONS["launch_gap_us"] * 1e-6 + lat)
    t = t_main + fixed
    peak = dev["hbm_TBps"] * 1e12
    return dict(
        device=dev_name, kernel="triton:gemv", m=m, n=n, k=k, bits=bits, group_size=group_size,
        rank=rank, bytes=bytes_moved, splits=split_k, blocks=programs, blocks_per_sm=bpsm,
        bounds_us={k_: round(v * 1e6, 3) for k_, v in bounds.items()}, limiter=max(bounds, key=bounds.get),
        fixed_us=round(fixed * 1e6, 3), time_us=round(t * 1e6, 3),
        hbm_fraction_steady=round(bytes_moved / t_main / peak, 3),
        hbm_fraction_call=round(bytes_moved / t / peak, 3),
        instructions_per_packed_byte=round(
            kernel["loop_instructions"] * threads / (block_n * block_k * bits / 8), 2),
    )


def find_decode_kernel(stats: Iterable[dict], bits: int, x: str, rows: int, group_size: int,
                       arch: str = "sm_90") -> Optional[dict]:
    for st in stats:
        meta = st.get("meta", {})
        if (meta.get("kernel") == "decode" and meta.get("bits") == bits and meta.get("x") == x
                and meta.get("rows") == rows and meta.get("group_size") == group_size
                and st.get("arch", "").startswith(arch)):
            return st
    return None


def lora_overheads(predictions: List[dict]) -> List[dict]:
    """(t(rank) - t(rank 0)) / t(rank 0) for each prediction with a rank-0 twin."""
    base = {(p["device"], p["kernel"], p["m"], p["n"], p["k"], p["bits"], p["group_size"]): p
            for p in predictions if p["rank"] == 0}
    out = []
    for p in predictions:
        if p["rank"] == 0:
            continue
        b = base.get((p["device"], p["kernel"], p["m"], p["n"], p["k"], p["bits"], p["group_size"]))
        if b:
            out.append(dict(device=p["device"], kernel=p["kernel"], m=p["m"], n=p["n"], k=p["k"],
                            bits=p["bits"], rank=p["rank"],
                            overhead=round(p["time_us"] / b["time_us"] - 1, 3),
                            overhead_steady=round((p["time_us"] - p["fixed_us"]) /
                                                  (b["time_us"] - b["fixed_us"]) - 1, 3)))
    return out


def predict_all(stats: List[dict], plan_fn, devices=("H100-SXM", "H200"), shapes=SHAPES,
                ms=(1, 16), bits_list=(2, 3, 4, 8), ranks=(0, 16), group_size: int = 64,
                x: str = "bf16", triton_config: Optional[dict] = None) -> Dict[str, list]:
    """Predictions for every (device, shape, M, bits, rank) of the CUDA decode kernel and, where
    its static counts are in ``stats``, the Triton decode kernel.

    ``plan_fn(M, N, Kp, bits, group_size, rank, x_dtype_code, sm_count, blocks_per_sm)`` is
    ``_C.cuda_host.decode_plan``; ``shapes`` maps names to (N, K) = (out, in) features.
    """
    from ..triton.config import launch_config
    import torch
    cfg = triton_config or launch_config("decode", torch.device("cpu"))
    x_code = {"fp32": 0, "fp16": 1, "bf16": 2}[x]
    preds, missing = [], []
    for dev in devices:
        for name, (n, k) in shapes.items():
            for m in ms:
                for bits in bits_list:
                    for rank in ranks:
                        kern = find_decode_kernel(stats, bits, x, 8 if m <= 8 else 16, group_size)
                        if kern is None:
                            missing.append(f"cuda decode bits={bits} x={x} rows={m} g={group_size}")
                        else:
                            kp = -(-k // group_size) * group_size
                            plan = plan_fn(m, n, kp, bits, group_size, rank, x_code,
                                           DEVICES[dev]["sms"], DECODE_SPLIT_BLOCKS_PER_SM)
                            p = predict_cuda_decode(kern, plan, dev, m, n, k, bits, group_size, rank)
                            p["shape"] = name
                            preds.append(p)
                        tri = _find_triton(stats, bits, m, group_size, rank > 0)
                        if tri is not None:
                            from ..triton.gemv import choose_split_k
                            split = choose_split_k(n, k, cfg["BLOCK_N"], cfg["BLOCK_K"],
                                                   DEVICES[dev]["sms"] * cfg["programs_per_sm"])
                            p = predict_triton_decode(tri, dev, m, n, k, bits, group_size, rank,
                                                      cfg["BLOCK_N"], cfg["BLOCK_K"],
                                                      cfg["num_warps"], split, cfg["num_stages"])
                            p["shape"] = name
                            preds.append(p)
    return {"predictions": preds, "lora_overhead": lora_overheads(preds),
            "missing": sorted(set(missing))}


# Split-K target of the CUDA decode launcher (csrc/linear_cuda.cu, kDecodeSplitBlocksPerSm).
DECODE_SPLIT_BLOCKS_PER_SM = 2


def _find_triton(stats, bits, m, group_size, lora):
    for st in stats:
        meta = st.get("meta", {})
        if (meta.get("kernel") == "triton:gemv_kernel" and meta.get("BITS") == bits
                and meta.get("GROUP") == group_size and meta.get("BLOCK_M") == (1 if m == 1 else 16)
                and meta.get("HAS_LORA") == lora and not meta.get("SPLIT", False)
                and st.get("arch", "").startswith("sm_90")):
            return st
    return None


def compare(predictions: List[dict], rows: List[dict], gpu_name: str) -> List[dict]:
    """Each measured qra row (``qra bench`` JSON) beside the prediction of the same case on the
    device the GPU's name matches (H200, else H100): time and fraction of HBM bandwidth."""
    dev = "H200" if "H200" in gpu_name else "H100-SXM"
    kernels = {"qra:cuda": "cuda:decode", "qra:triton": "triton:gemv"}
    index = {(p["kernel"], p["m"], p["n"], p["k"], p["bits"], p["rank"]): p
             for p in predictions if p["device"] == dev}
    out = []
    for r in rows:
        if r.get("status") != "ok" or r.get("implementation") not in kernels:
            continue
        key = (kernels[r["implementation"]], r["M"], r.get("out_features"), r.get("in_features"),
               r.get("bits"), r.get("rank"))
        p = index.get(key)
        if p is None:
            continue
        out.append(dict(implementation=r["implementation"], m=r["M"], n=key[2], k=key[3],
                        bits=key[4], rank=key[5], measured_us=round(r["median_us"], 3),
                        predicted_us=p["time_us"],
                        measured_over_predicted=round(r["median_us"] / p["time_us"], 3),
                        measured_hbm_fraction=round(r["achieved_GBps"] * 1e9 /
                                                    (DEVICES[dev]["hbm_TBps"] * 1e12), 3),
                        predicted_hbm_fraction=p["hbm_fraction_call"], predicted_device=dev))
    return out
