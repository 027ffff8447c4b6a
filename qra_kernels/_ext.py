"""The compiled extension ``qra_kernels._C`` seen from torch: loading it, and turning
tensors into the raw pointers, sizes and dtype codes its functions take.

The extension has no torch headers (one wheel works with any torch version), so every
check that protects it from out-of-bounds reads — shapes, dtypes, devices, contiguity —
is done here, before a pointer is handed over. A bad call raises ``ValueError`` or
``TypeError`` naming the argument; it never reaches C++.
"""
from __future__ import annotations

from typing import Optional

import torch

from .format import SCALE_DTYPES, check_bits, check_group_size, padded_in_features

__all__ = ["extension", "DTYPE_CODES", "dtype_code", "check_packed", "data_ptr"]

# Must match enum qra::DType in csrc/dequant.cuh.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_UNSET = object()
_ext = _UNSET


def extension():
    """The ``qra_kernels._C`` module, or ``None`` when the package was installed without it."""
    global _ext
    if _ext is _UNSET:
        try:
            from . import _C  # type: ignore[attr-defined]
            _ext = _C
        except ImportError:
            _ext = None
    return _ext


def dtype_code(t: torch.Tensor, name: str) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}") from None


def data_ptr(t: Optional[torch.Tensor], strided: bool = False) -> int:
    """The address of a contiguous tensor, 0 for None (the C++ side reads 0 as "absent").
    ``strided=True`` also accepts a 2-D tensor of unit-stride rows (:func:`rows_view`),
    passed with its :func:`row_stride`."""
    if t is None:
        return 0
    if strided and t.dim() == 2 and (t.shape[0] <= 1 or t.stride(1) == 1 or t.shape[1] <= 1):
        return t.data_ptr()
    assert t.is_contiguous(), "internal error: only contiguous tensors may be passed to _C"
    return t.data_ptr()


def check_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, out_features: int, in_features: int, device) -> int:
    """Validates the packed tensors of one matrix against format.py; returns ``Kp``."""
    check_bits(bits)
    check_group_size(group_size)
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features must be a positive int, got {out_features!r}")
    kp = padded_in_features(in_features, group_size)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (kp * bits // 32, out_features):
        raise ValueError(f"qweight must be int32 of shape {(kp * bits // 32, out_features)} for "
                         f"bits={bits}, K={in_features}, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype not in SCALE_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")
        if tuple(t.shape) != (kp // group_size, out_features):
            raise ValueError(f"{name} must have shape {(kp // group_size, out_features)}, got "
                             f"{tuple(t.shape)}")
    if scales.dtype != zeros.dtype:
        raise TypeError(f"scales and zeros must share a dtype, got {scales.dtype}, {zeros.dtype}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
    return kp


def check_lora(lora_A, lora_B, out_features: int, in_features: int, device) -> int:
    """Validates the adapter (both or neither); returns its rank (0 without one)."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together (or neither)")
    if lora_A is None:
        return 0
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        dtype_code(t, name)
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape [r, {in_features}], got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must have shape [{out_features}, {rank}], got "
                         f"{tuple(lora_B.shape)}")
    return rank


def check_bias(bias, out_features: int, device) -> None:
    if bias is None:
        return
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but x is on {device}")


def check_grad_out(grad_out, x, out_features: int) -> None:
    k = x.shape[-1]
    if grad_out.shape[-1] != out_features or grad_out.numel() // out_features != \
            x.numel() // max(k, 1):
        raise ValueError(f"grad_out must have shape [..., {out_features}] with as many rows "
                         f"as x, got {tuple(grad_out.shape)}")
    if grad_out.device != x.device:
        raise ValueError(f"grad_out is on {grad_out.device} but x is on {x.device}")


def lora_backward(g2: torch.Tensor, x2, lora_A, lora_B, scaling: float, rank: int):
    """The small products of the backward that the compiled backends leave to torch (fp32):
    returns (the LoRA term of grad_x or None, grad_A, grad_B); ``g2 [M, N]``, ``x2 [M, K]``
    fp32 (``x2`` may be None when only the grad_x term is wanted)."""
    if lora_A is None:
        return None, None, None
    if rank == 0:
        return None, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    a, b = lora_A.to(torch.float32), lora_B.to(torch.float32)
    gb = g2 @ b  # [M, r]
    gx_term = scaling * (gb @ a)
    if x2 is None:
        return gx_term, None, None
    grad_A = (scaling * gb.t() @ x2).to(lora_A.dtype)
    grad_B = (scaling * g2.t() @ (x2 @ a.t())).to(lora_B.dtype)
    return gx_term, grad_A, grad_B


def rows_view(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, cols]`` tensor whose rows are unit-stride (a view when the
    layout allows it, else a contiguous copy): what the CPU kernel reads with a row stride."""
    t2 = t.reshape(-1, cols)
    if t2.shape[0] and t2.shape[1] and (t2.stride(1) != 1 or t2.stride(0) < cols):
        t2 = t2.contiguous()
    return t2


def row_stride(t2: torch.Tensor) -> int:
    """The row stride, in elements, of a 2-D tensor from :func:`rows_view`."""
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def lora_grads_from_gb(g2: torch.Tensor, x2: torch.Tensor, gb: torch.Tensor, lora_A, lora_B,
                       scaling: float):
    """grad_A and grad_B of the adapter given ``gb = g2 @ lora_B`` (fp32, ``[M, r]``, e.g. from
    the CPU kernel's backward), ``g2 [M, N]`` and ``x2 [M, K]`` (any float dtype)."""
    x32 = x2.to(torch.float32)
    grad_A = (scaling * gb.t() @ x32).to(lora_A.dtype)
    xa = x32 @ lora_A.to(torch.float32).t()
    grad_B = (scaling * g2.to(torch.float32).t() @ xa).to(lora_B.dtype)
    return grad_A, grad_B
