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


__all__ = ["extension", "DTYPE_CODES", "dtype_code", "data_ptr"]

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
