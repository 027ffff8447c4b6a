"""The forward for larger M: tensor-core tiles with the dequantization in the main loop.

Each program owns a ``BLOCK_M × BLOCK_N`` tile of ``y``; per ``BLOCK_K`` step it loads an
x tile and the packed words of the W tile, dequantizes them in registers (never a
dequantized W in memory), and runs one ``tl.dot``. The LoRA term and the bias are added to
the fp32 accumulator before the single store of the tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import dequant_tile
from .lora import BLOCK_R, lora_epilogue
from .runtime import ieee_dot, jit, launcher, mma


@jit
def output_epilogue(acc, offs_m, mask_m, offs_n, mask_n, xa_ptr, b_ptr, rank, scaling,
                    bias_ptr, y_ptr, N, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Add ``scaling·xa·Bᵀ`` and the bias to the fp32 tile, cast, store ``y`` once."""
    if HAS_LORA:
        # U = Bᵀ: U[r, n] = B[n, r] with B stored [N, rank].
        acc = lora_epilogue(acc, offs_m, mask_m, offs_n, mask_n, xa_ptr, rank, b_ptr, 1, rank,
                            scaling, BLOCK_M, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@jit(do_not_specialize=["rank"])
def gemm_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
                M, N, K, Kp, rank, scaling, stride_xm,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_LORA: tl.constexpr,
                HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # Columns K..Kp-1 of W exist (padding) but x has none: masking x zeroes them.
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        w = dequant_tile(qw_ptr, scales_ptr, zeros_ptr, N, Kp, k0, offs_n, mask_n, BLOCK_K,
                         BLOCK_N, BITS, GROUP)
        acc = mma(x, w, acc, IEEE_DOT)
    output_epilogue(acc, offs_m, mask_m, offs_n, mask_n, xa_ptr, b_ptr, rank, scaling, bias_ptr,
                    y_ptr, N, HAS_LORA, HAS_BIAS, BLOCK_M, BLOCK_R)


def block_k_for(group_size: int, block_k: int, span_groups: bool = False) -> int:
    """The BLOCK_K a kernel uses: a multiple of 32 (whole words of every plane) that
    divides the group (one scale row per tile) — or, with ``span_groups``, that may also
    be a multiple of it (see :func:`.dequant.dequant_tile`)."""
    if block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"BLOCK_K must be a power of two >= 32, got {block_k}")
    return block_k if span_groups else min(block_k, group_size)


def gemm(x2, qweight, scales, zeros, bits, group_size, out_features, xa=None, lora_B=None,
         scaling=1.0, bias=None, config=None):
    """``y2 = x2·dequant(W)ᵀ + scaling·xa·lora_Bᵀ + bias`` for ``x2 [M, K]``.

    ``xa`` is the fp32 ``x2·lora_Aᵀ`` from :func:`qra_kernels.triton.lora.lora_down` (or
    None for rank 0). ``config`` keys: BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages.
    """
    from .config import launch_config
    cfg = dict(launch_config("gemm", x2.device, x2.dtype), **(config or {}))
    m, k = x2.shape
    n = out_features
    kp = scales.shape[0] * group_size
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    has_lora = xa is not None and xa.shape[1] > 0
    rank = xa.shape[1] if has_lora else 0
    block_k = block_k_for(group_size, cfg["BLOCK_K"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    launcher(gemm_kernel, x2.device)[grid](
        x2, qweight, scales, zeros, xa if has_lora else x2, lora_B if has_lora else x2,
        bias if bias is not None else x2, y, m, n, k, kp, rank, float(scaling), x2.stride(0),
        BITS=bits, GROUP=group_size, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        IEEE_DOT=ieee_dot(x2), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=block_k, BLOCK_R=BLOCK_R, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return y
