"""Triton kernels of the ``qra::linear`` op (the ``triton`` backend).

Plain functions, one per kernel, callable directly on 2-d tensors (benchmarks do):

* :func:`gemv`          — decode forward (M ≤ 16): GEMV / split-K, each packed word read once;
* :func:`gemm`          — forward for larger M: tensor-core tiles, dequant in the main loop;
* :func:`lora_down`     — ``x·Aᵀ`` (fp32), computed once per call, fused into the above's epilogue;
* :func:`grad_input`    — ``dY·dequant(W) + s·(dY·B)·A`` from the same packed buffer;
* :func:`lora_grad`     — the dA / dB reductions;
* :func:`forward`, :func:`backward` — the whole op on any-rank x, as the backend runs it.

On CUDA tensors the kernels are compiled; on CPU tensors they run in Triton's interpreter
(slow; it is how the tests exercise them without a GPU). See :mod:`.runtime`.
Launch configurations and the decode/GEMM row threshold are data
(``qra_kernels/configs/triton_configs.json``, :mod:`.config`); :mod:`.aot` compiles every
launched variant for a GPU target without a GPU.
"""
from __future__ import annotations

import torch

from ..validate import check_float, check_grad_out, check_packed_call
from .backward import backward as _backward_2d
from .backward import grad_input, lora_grad
from .config import decode_max_m
from .gemm import gemm
from .gemv import gemv
from .lora import lora_down

__all__ = ["forward", "backward", "gemv", "gemm", "lora_down", "grad_input", "lora_grad"]


def _check(x, qweight, scales, zeros, bits, group_size, out_features, lora_A, lora_B, bias):
    """One call against format.py and the op contract (:mod:`..validate`); returns the rank."""
    check_float("x", x)
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"x: the triton kernels run on cuda (or cpu, interpreted), not {x.device}")
    return check_packed_call(x, qweight, scales, zeros, bits, group_size, out_features,
                             lora_A, lora_B, bias)[1]


def _contiguous_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def forward(x, qweight, scales, zeros, bits, group_size, out_features, lora_A=None,
            lora_B=None, scaling=1.0, bias=None, config=None):
    """``x·dequant(W)ᵀ + scaling·(x·Aᵀ)·Bᵀ + bias`` for ``x [..., K]``; y has x's dtype.

    ``config`` overrides the JSON: ``{"decode_max_m": int, "decode": {...}, "gemm": {...},
    "split_k": int}``.
    """
    config = config or {}
    rank = _check(x, qweight, scales, zeros, bits, group_size, out_features, lora_A, lora_B,
                  bias)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    k = x.shape[-1]
    x2 = _contiguous_rows(x, k)
    m = x2.shape[0]
    xa = None
    if rank > 0 and m > 0:
        xa = lora_down(x2, lora_A.contiguous())
        lora_B = lora_B.contiguous()
    threshold = config.get("decode_max_m", decode_max_m(x2.device))
    if m <= min(threshold, 16):
        y2 = gemv(x2, qweight, scales, zeros, bits, group_size, out_features, xa, lora_B,
                  scaling, bias, config=config.get("decode"), split_k=config.get("split_k"))
    else:
        y2 = gemm(x2, qweight, scales, zeros, bits, group_size, out_features, xa, lora_B,
                  scaling, bias, config=config.get("gemm"))
    return y2.reshape(*x.shape[:-1], out_features)


def backward(grad_out, x, qweight, scales, zeros, bits, group_size, out_features, lora_A=None,
             lora_B=None, scaling=1.0, need_x=True, need_lora=True, config=None):
    """(grad_x, grad_A, grad_B) of :func:`forward`; None for what is not asked for."""
    _check(x, qweight, scales, zeros, bits, group_size, out_features, lora_A, lora_B, None)
    check_grad_out(grad_out, x, out_features)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    k = x.shape[-1]
    x2 = _contiguous_rows(x, k)
    dy2 = _contiguous_rows(grad_out, out_features)
    if lora_A is not None:
        lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
    dx, da, db = _backward_2d(dy2, x2, qweight, scales, zeros, bits, group_size, lora_A,
                              lora_B, scaling, need_x, need_lora, config)
    if dx is not None:
        dx = dx.to(x.dtype).reshape(x.shape)
    return dx, da, db
