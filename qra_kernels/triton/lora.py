"""The LoRA pieces shared by every kernel: the down projection and the fused epilogue.

``xa = x·Aᵀ`` (``[M, r]``, fp32) is computed once per call by :func:`lora_down`; the main
kernels then add ``scaling·xa·U`` to their fp32 accumulator in the same output tile
(:func:`lora_epilogue`) before the single store of the output. The rank is a runtime
argument everywhere (looped over in masked chunks of ``BLOCK_R`` = 16 and excluded from
Triton's integer specialisation), so no rank ever compiles a kernel of its own.

LoRA math is fp32 ("ieee" dots): the adapters are fp32 or bf16, the products are small,
and a tf32 or bf16 rounding of ``xa`` would be the largest error of the whole op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import jit, launcher, sum_axis

BLOCK_R = 16


@jit
def lora_epilogue(acc, offs_m, mask_m, offs_c, mask_c, t_ptr, rank, u_ptr, stride_ur,
                  stride_uc, scaling, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """``acc + scaling · T[offs_m, :rank] · U[:rank, offs_c]``; T is fp32 ``[M, rank]``.

    The product accumulates straight into ``acc`` (``scaling`` applied to T's small tile): a
    second tile-sized accumulator would double the registers of the tile and spill."""
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        t = tl.load(t_ptr + offs_m[:, None] * rank + offs_r[None, :],
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0) * scaling
        u = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_c[None, :] * stride_uc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        if BLOCK_M >= 16:
            acc = tl.dot(t, u, acc, input_precision="ieee")
        else:  # decode: too few rows for a dot
            acc += sum_axis(t[:, :, None] * u[None, :, :], 1)
    return acc


@jit(do_not_specialize=["rank"])
def lora_down_kernel(x_ptr, u_ptr, t_ptr, M, K, rank, stride_xm, stride_ur, stride_uk,
                     k_per_split, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    """``T[M, rank] (+)= X[M, K] · U[rank, K]ᵀ`` in fp32; split-K slabs add atomically."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < rank
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_k[None, :] * stride_uk,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        if BLOCK_M >= 16:
            acc = tl.dot(x, tl.trans(u), acc, input_precision="ieee")
        else:
            acc += sum_axis(x[:, None, :] * u[None, :, :], 2)
    ptrs = t_ptr + offs_m[:, None] * rank + offs_r[None, :]
    mask = mask_m[:, None] & mask_r[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


def lora_down(x2: torch.Tensor, u: torch.Tensor, transposed: bool = False,
              block_k: int = 128, split_k: int = 0) -> torch.Tensor:
    """fp32 ``x2 · Uᵀ`` for ``U [rank, K]`` (``transposed``: ``u`` is stored ``[K, rank]``).

    ``x2 [M, K]`` with unit stride along K. ``split_k`` 0 picks one from the shape: decode
    (few rows) splits K so that enough programs stream the adapter.
    """
    m, k = x2.shape
    rank = u.shape[1] if transposed else u.shape[0]
    out = torch.zeros((m, rank), dtype=torch.float32, device=x2.device)
    if m == 0 or rank == 0:
        return out
    stride_ur, stride_uk = (u.stride(1), u.stride(0)) if transposed else u.stride()
    block_m = 1 if m == 1 else 16
    k_blocks = triton.cdiv(k, block_k)
    if split_k <= 0:
        split_k = min(k_blocks, 32) if m <= 16 else 1
    split_k = max(1, min(split_k, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(m, block_m), triton.cdiv(rank, BLOCK_R), split_k)
    launcher(lora_down_kernel, x2.device)[grid](
        x2, u, out, m, k, rank, x2.stride(0), stride_ur, stride_uk, k_per_split,
        BLOCK_M=block_m, BLOCK_R=BLOCK_R, BLOCK_K=block_k, ATOMIC=split_k > 1)
    return out
