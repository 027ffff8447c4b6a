"""The backward: ``dX = dY·dequant(W) + s·(dY·B)·A``, ``dA = s·(dY·B)ᵀ·X``, ``dB = s·dYᵀ·(X·Aᵀ)``.

:func:`grad_input` reads the *same* packed buffer as the forward — a ``[BLOCK_K, BLOCK_N]``
tile of W is dequantized and used transposed in the dot — so there is neither a
transposed nor a dequantized copy of W. ``g = dY·B`` (fp32 ``[M, r]``) is computed once
and added in the dX epilogue; dA and dB are small reductions over the M rows done by one
kernel, :func:`lora_grad_kernel`, that also applies the scaling and casts to the adapter's
dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import dequant_tile
from .gemm import block_k_for
from .lora import BLOCK_R, lora_down, lora_epilogue
from .runtime import ieee_dot, jit, launcher, mma


@jit(do_not_specialize=["rank"])
def grad_input_kernel(dy_ptr, qw_ptr, scales_ptr, zeros_ptr, g_ptr, a_ptr, dx_ptr,
                      M, N, K, Kp, rank, scaling, stride_dym,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_LORA: tl.constexpr,
                      IEEE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = dequant_tile(qw_ptr, scales_ptr, zeros_ptr, N, Kp, k0, offs_n, mask_n, BLOCK_K,
                         BLOCK_N, BITS, GROUP)  # [BLOCK_K, BLOCK_N]
        acc = mma(dy, tl.trans(w), acc, IEEE_DOT)
    if HAS_LORA:
        # U = A [rank, K]: U[r, k] at a_ptr + r*K + k.
        acc = lora_epilogue(acc, offs_m, mask_m, offs_k, mask_k, g_ptr, rank, a_ptr, K, 1,
                            scaling, BLOCK_M, BLOCK_R)
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@jit(do_not_specialize=["P", "Q"])
def lora_grad_kernel(l_ptr, r_ptr, out_ptr, M, P, Q, stride_lm, stride_lp, stride_rm,
                     stride_rq, scaling, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_Q: tl.constexpr):
    """``out[P, Q] = scaling · Σ_m L[m, p] · R[m, q]`` in fp32, stored in out's dtype."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    acc = tl.full((BLOCK_P, BLOCK_Q), 0.0, tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        lt = tl.load(l_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_p[None, :] * stride_lp,
                     mask=mask_m[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        rt = tl.load(r_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_q[None, :] * stride_rq,
                     mask=mask_m[:, None] & mask_q[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision="ieee")
    tl.store(out_ptr + offs_p[:, None] * Q + offs_q[None, :],
             (scaling * acc).to(out_ptr.dtype.element_ty),
             mask=mask_p[:, None] & mask_q[None, :])


def grad_input(dy2, qweight, scales, zeros, bits, group_size, in_features, g=None,
               lora_A=None, scaling=1.0, config=None):
    """``dX2 [M, K] = dy2·dequant(W) + scaling·g·lora_A`` (``g = dy2·lora_B``, fp32)."""
    from .config import launch_config
    cfg = dict(launch_config("grad_input", dy2.device, dy2.dtype), **(config or {}))
    m, n = dy2.shape
    k = in_features
    kp = scales.shape[0] * group_size
    dx = torch.empty((m, k), dtype=dy2.dtype, device=dy2.device)
    if m == 0:
        return dx
    has_lora = g is not None and g.shape[1] > 0
    rank = g.shape[1] if has_lora else 0
    block_k = block_k_for(group_size, cfg["BLOCK_K"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(k, block_k))
    launcher(grad_input_kernel, dy2.device)[grid](
        dy2, qweight, scales, zeros, g if has_lora else dy2, lora_A if has_lora else dy2, dx,
        m, n, k, kp, rank, float(scaling), dy2.stride(0), BITS=bits, GROUP=group_size,
        HAS_LORA=has_lora, IEEE_DOT=ieee_dot(dy2), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, BLOCK_R=BLOCK_R, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return dx


def lora_grad(left, right, scaling, out_dtype, config=None):
    """``scaling · leftᵀ · right`` for ``left [M, P]``, ``right [M, Q]`` (any float dtypes)."""
    from .config import launch_config
    cfg = dict(launch_config("lora_grad", left.device), **(config or {}))
    m, p = left.shape
    q = right.shape[1]
    out = torch.empty((p, q), dtype=out_dtype, device=left.device)
    if p == 0 or q == 0:
        return out
    grid = (triton.cdiv(p, cfg["BLOCK_P"]), triton.cdiv(q, cfg["BLOCK_Q"]))
    launcher(lora_grad_kernel, left.device)[grid](
        left, right, out, m, p, q, left.stride(0), left.stride(1), right.stride(0),
        right.stride(1), float(scaling), BLOCK_M=cfg["BLOCK_M"], BLOCK_P=cfg["BLOCK_P"],
        BLOCK_Q=cfg["BLOCK_Q"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def backward(dy2, x2, qweight, scales, zeros, bits, group_size, lora_A=None, lora_B=None,
             scaling=1.0, need_x=True, need_lora=True, config=None):
    """(dX2, dA, dB) for 2-d ``dy2 [M, N]``, ``x2 [M, K]``; None where not asked for."""
    k = x2.shape[1]
    has_lora = lora_A is not None and lora_A.shape[0] > 0
    g = lora_down(dy2, lora_B, transposed=True) if has_lora and (need_x or need_lora) else None
    dx = da = db = None
    if need_x:
        dx = grad_input(dy2, qweight, scales, zeros, bits, group_size, k, g, lora_A, scaling,
                        config=(config or {}).get("grad_input"))
    if need_lora and lora_A is not None:
        if has_lora:
            lg_cfg = (config or {}).get("lora_grad")
            xa = lora_down(x2, lora_A)
            da = lora_grad(g, x2, scaling, lora_A.dtype, lg_cfg)
            db = lora_grad(dy2, xa, scaling, lora_B.dtype, lg_cfg)
        else:
            da, db = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    return dx, da, db
