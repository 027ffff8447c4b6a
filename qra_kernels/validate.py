"""The argument checks of the ``qra::linear`` op, in one place.

Every entry point validates with these: :func:`qra_kernels.qra_linear` and ``QRALinear``
(:func:`check_linear_args`), and the compiled cpu/cuda backends and the Triton functions
(:func:`check_packed_call`). The kernels index raw pointers, so a wrong shape
would read out of bounds rather than fail; each check raises ``TypeError`` (wrong type or
dtype) or ``ValueError`` (wrong shape, device or value) naming the argument.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .format import SCALE_DTYPES, check_bits, check_group_size, padded_in_features

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["ACTIVATION_DTYPES", "check_float", "check_out_features", "check_packed",
           "check_lora", "check_scaling", "check_bias", "check_grad_out", "check_linear_args",
           "check_packed_call"]


def check_float(name: str, t, device=None, where: str = "x") -> None:
    """``t`` is an fp32/fp16/bf16 tensor (on ``device`` when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {where} is on {device}")


def check_out_features(out_features) -> int:
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features must be a positive int, got {out_features!r}")
    return out_features


def check_packed(qweight, scales, zeros, bits: int, group_size: int, out_features: int,
                 in_features: int, device, where: str = "x") -> int:
    """The packed tensors of one ``[out_features, in_features]`` matrix against
    :mod:`.format`; returns the padded ``Kp``."""
    check_bits(bits)
    check_group_size(group_size)
    check_out_features(out_features)
    kp = padded_in_features(in_features, group_size)
    want = (kp * bits // 32, out_features)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or \
            tuple(qweight.shape) != want:
        got = (f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor)
               else type(qweight).__name__)
        raise ValueError(f"qweight must be int32 of shape {want} for bits={bits}, "
                         f"in_features={in_features}, group_size={group_size}; got {got}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor) or t.dtype not in SCALE_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a float16 or bfloat16 tensor, got {got}")
        if tuple(t.shape) != (kp // group_size, out_features):
            raise ValueError(f"{name} must have shape {(kp // group_size, out_features)}, got "
                             f"{tuple(t.shape)}")
    if scales.dtype != zeros.dtype:
        raise TypeError(f"scales and zeros must share a dtype, got {scales.dtype}, {zeros.dtype}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {where} is on {device}")
    return kp


def check_lora(lora_A, lora_B, out_features: int, in_features: int, device,
               where: str = "x") -> int:
    """The adapter (both factors or neither); returns its rank (0 without one)."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together (or neither)")
    if lora_A is None:
        return 0
    check_float("lora_A", lora_A, device, where)
    check_float("lora_B", lora_B, device, where)
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape [r, {in_features}], got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must have shape [{out_features}, {rank}] to match lora_A, "
                         f"got {tuple(lora_B.shape)}")
    return rank


def check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
    return float(scaling)


def check_bias(bias, out_features: int, device, where: str = "x") -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise TypeError(f"bias must be a floating-point torch.Tensor or None, got {got}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but {where} is on {device}")


def check_grad_out(grad_out, x: torch.Tensor, out_features: int) -> None:
    """``grad_out [..., out_features]`` with as many rows as ``x``, on x's device."""
    check_float("grad_out", grad_out, x.device)
    k = x.shape[-1]
    if grad_out.shape[-1] != out_features or grad_out.numel() // out_features != \
            x.numel() // max(k, 1):
        raise ValueError(f"grad_out must have shape [..., {out_features}] with as many rows "
                         f"as x, got {tuple(grad_out.shape)}")


def check_linear_args(x, out_features: int, in_features: int, device, lora_A, lora_B, scaling,
                      bias) -> None:
    """The float arguments of one call on an already validated quantized weight
    (``qra_linear``, ``QRALinear``, the PEFT layer): x, the adapter, scaling, bias."""
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the quantized weight is on {device}")
    check_lora(lora_A, lora_B, out_features, in_features, device, "the weight")
    check_scaling(scaling)
    check_bias(bias, out_features, device, "the weight")


def check_packed_call(x, qweight, scales, zeros, bits: int, group_size: int, out_features: int,
                      lora_A, lora_B, bias: Optional[torch.Tensor]) -> Tuple[int, int]:
    """One whole call on raw packed tensors (the backends, the plain-function kernels);
    returns ``(Kp, rank)``."""
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., in_features >= 1], got {tuple(x.shape)}")
    k = x.shape[-1]
    kp = check_packed(qweight, scales, zeros, bits, group_size, out_features, k, x.device)
    rank = check_lora(lora_A, lora_B, out_features, k, x.device)
    if bias is not None:
        check_float("bias", bias, x.device)
    check_bias(bias, out_features, x.device)
    return kp, rank
