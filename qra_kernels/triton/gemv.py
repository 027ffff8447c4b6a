"""The forward for decode (M ≤ ``decode_max_m``, a few tokens): memory-bound GEMV/split-K.

All rows of x live in one program (``BLOCK_M`` is 1, or 16 for 2–16 rows), so every packed
word of W is read from memory exactly once. The grid is ``N / BLOCK_N`` column blocks times
``SPLIT_K`` slabs of K, enough programs to keep every SM streaming even when N is small.
With one slab the kernel finishes the tile itself (LoRA, bias, store); with several, each
slab writes an fp32 partial and :func:`splitk_reduce_kernel` sums them — deterministic,
unlike atomics — and applies the same epilogue, so ``y`` is still written once.

One row (``BLOCK_M`` = 1) runs on the FMA units (:func:`.dequant.dot_rows`: codes expanded
in the registers of the thread that loaded them, reduced per word row, summed once at the
end); 2–16 rows run one ``tl.dot`` per tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import dequant_tile, dot_rows
from .gemm import block_k_for, output_epilogue
from .lora import BLOCK_R
from .runtime import ieee_dot, jit, launcher, mma, sum_axis


@jit(do_not_specialize=["rank"])
def gemv_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
                partial_ptr, M, N, K, Kp, rank, scaling, stride_xm, k_per_split,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_LORA: tl.constexpr,
                HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr, SPLIT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    if BLOCK_M == 1:
        W0: tl.constexpr = 2 if BITS == 3 else BITS
        part = tl.full((BLOCK_K * W0 // 32, BLOCK_N), 0.0, tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            part += dot_rows(x_ptr, qw_ptr, scales_ptr, zeros_ptr, N, K, Kp, k0, offs_n, mask_n,
                             BLOCK_K, BLOCK_N, BITS, GROUP)
        acc = sum_axis(part, 0)[None, :]
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            w = dequant_tile(qw_ptr, scales_ptr, zeros_ptr, N, Kp, k0, offs_n, mask_n, BLOCK_K,
                             BLOCK_N, BITS, GROUP)
            acc = mma(x, w, acc, IEEE_DOT)
    if SPLIT:
        tl.store(partial_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        output_epilogue(acc, offs_m, mask_m, offs_n, mask_n, xa_ptr, b_ptr, rank, scaling,
                        bias_ptr, y_ptr, N, HAS_LORA, HAS_BIAS, BLOCK_M, BLOCK_R)


@jit(do_not_specialize=["rank"])
def splitk_reduce_kernel(partial_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, M, N, rank, scaling,
                         split_k, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for s in range(0, split_k):
        acc += tl.load(partial_ptr + (s * M + offs_m[:, None]) * N + offs_n[None, :], mask=mask,
                       other=0.0)
    output_epilogue(acc, offs_m, mask_m, offs_n, mask_n, xa_ptr, b_ptr, rank, scaling, bias_ptr,
                    y_ptr, N, HAS_LORA, HAS_BIAS, BLOCK_M, BLOCK_R)


def choose_split_k(n: int, k: int, block_n: int, block_k: int, target_programs: int) -> int:
    """Enough K slabs that ``N/BLOCK_N × SPLIT_K`` reaches the target program count."""
    n_blocks = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    return max(1, min(k_blocks, triton.cdiv(target_programs, n_blocks)))


def gemv(x2, qweight, scales, zeros, bits, group_size, out_features, xa=None, lora_B=None,
         scaling=1.0, bias=None, config=None, split_k=None):
    """Decode forward for ``x2 [M, K]``, ``M ≤ 16``; same contract as :func:`..gemm.gemm`.

    ``split_k`` None picks it from the shape and the device's SM count.
    """
    from .config import launch_config, num_programs_target
    m, k = x2.shape
    # fp32 with 2-16 rows runs tf32x3 dots: the smaller fp32 tiles (one row uses no dot).
    cfg = dict(launch_config("decode", x2.device, x2.dtype if m > 1 else None), **(config or {}))
    if m > 16:
        raise ValueError(f"x: the decode kernel takes at most 16 rows, got {m}")
    n = out_features
    kp = scales.shape[0] * group_size
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    block_n = cfg["BLOCK_N"]
    # Decode streams W: long K tiles (spanning groups) keep more bytes in flight.
    block_k = block_k_for(group_size, cfg["BLOCK_K"], span_groups=True)
    if split_k is None:
        split_k = choose_split_k(n, k, block_n, block_k,
                                 num_programs_target(x2.device, cfg["programs_per_sm"]))
    k_blocks = triton.cdiv(k, block_k)
    split_k = max(1, min(int(split_k), k_blocks))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty slab
    block_m = 1 if m == 1 else 16
    has_lora = xa is not None and xa.shape[1] > 0
    rank = xa.shape[1] if has_lora else 0
    partial = (torch.empty((split_k, m, n), dtype=torch.float32, device=x2.device)
               if split_k > 1 else y)
    lora_args = (xa if has_lora else x2, lora_B if has_lora else x2,
                 bias if bias is not None else x2)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launcher(gemv_kernel, x2.device)[(triton.cdiv(n, block_n), split_k)](
        x2, qweight, scales, zeros, *lora_args, y, partial, m, n, k, kp, rank, float(scaling),
        x2.stride(0), k_per_split, BITS=bits, GROUP=group_size, HAS_LORA=has_lora,
        HAS_BIAS=bias is not None, IEEE_DOT=ieee_dot(x2), SPLIT=split_k > 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=BLOCK_R, **launch)
    if split_k > 1:
        launcher(splitk_reduce_kernel, x2.device)[(triton.cdiv(n, block_n),)](
            partial, *lora_args, y, m, n, rank, float(scaling), split_k, HAS_LORA=has_lora,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=BLOCK_R,
            num_warps=4)
    return y
