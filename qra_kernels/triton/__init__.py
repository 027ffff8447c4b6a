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

from ..format import SCALE_DTYPES, check_bits, check_group_size, padded_in_features
from .backward import backward as _backward_2d
from .backward import grad_input, lora_grad
from .config import decode_max_m
from .gemm import gemm
from .gemv import gemv
from .lora import lora_down

__all__ = ["forward", "backward", "gemv", "gemm", "lora_down", "grad_input", "lora_grad"]


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_float(name, t, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check(x, qweight, scales, zeros, bits, group_size, out_features, lora_A, lora_B, bias):
    """Validates one call against format.py and the op contract; returns the rank.

    The kernels index raw pointers, so a wrong shape here would read out of bounds rather
    than fail: every plain-function entry point checks first.
    """
    check_bits(bits)
    check_group_size(group_size)
    _check_float("x", x, x.device)
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"x: the triton kernels run on cuda (or cpu, interpreted), not {x.device}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., in_features >= 1], got {tuple(x.shape)}")
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features must be a positive int, got {out_features!r}")
    k = x.shape[-1]
    kp = padded_in_features(k, group_size)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or \
            tuple(qweight.shape) != (kp * bits // 32, out_features):
        got = (f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor)
               else type(qweight).__name__)
        raise ValueError(f"qweight must be int32 of shape {(kp * bits // 32, out_features)} "
                         f"for bits={bits}, in_features={k}, group_size={group_size}; got {got}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor) or t.dtype not in SCALE_DTYPES:
            raise TypeError(f"{name} must be a float16 or bfloat16 tensor")
        if tuple(t.shape) != (kp // group_size, out_features):
            raise ValueError(f"{name} must have shape {(kp // group_size, out_features)}, "
                             f"got {tuple(t.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together (or neither)")
    rank = 0
    if lora_A is not None:
        _check_float("lora_A", lora_A, x.device)
        _check_float("lora_B", lora_B, x.device)
        if lora_A.dim() != 2 or lora_A.shape[1] != k:
            raise ValueError(f"lora_A must have shape [r, {k}], got {tuple(lora_A.shape)}")
        rank = lora_A.shape[0]
        if tuple(lora_B.shape) != (out_features, rank):
            raise ValueError(f"lora_B must have shape [{out_features}, {rank}], got "
                             f"{tuple(lora_B.shape)}")
    if bias is not None:
        _check_float("bias", bias, x.device)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
    return rank


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
    _check_float("grad_out", grad_out, x.device)
    if tuple(grad_out.shape) != (*x.shape[:-1], out_features):
        raise ValueError(f"grad_out must have shape {(*x.shape[:-1], out_features)}, got "
                         f"{tuple(grad_out.shape)}")
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
