"""The operator: ``y = x·dequant(W)ᵀ + scaling·(x·Aᵀ)·Bᵀ + bias``.

One schema, declared once here with ``torch.library.custom_op``:

* ``qra::linear`` — the forward;
* ``qra::linear_backward`` — grad_x, grad_A, grad_B in one call, so a backend can fuse
  them and re-dequantize W inside its kernel (nothing dequantized is saved for backward:
  the autograd context keeps only the packed tensors);
* ``qra::grouped_linear`` / ``qra::grouped_linear_backward`` — the routed experts of a MoE
  layer: rows of ``x`` sorted by expert, ``tokens_per_expert[e]`` of them for expert ``e``,
  each multiplied by its own packed matrix (``y_e = x_e·dequant(W_e)ᵀ``; bits may differ
  per expert; the stacked layout is :func:`qra_kernels.format.expert_code_rows`). Forward
  and grad_x; the experts are frozen and carry no adapter.

Both carry fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces them
without graph breaks. The implementation of each call comes from the backend registry
(:mod:`qra_kernels.backends`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .backends import select_backend
from .format import QuantizedWeight
from .validate import check_linear_args

__all__ = ["qra_linear", "linear_packed", "grouped_linear_packed"]



@torch.library.custom_op("qra::linear", mutates_args=())
def _linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int,
            group_size: int, out_features: int, lora_A: Optional[Tensor],
            lora_B: Optional[Tensor], scaling: float, bias: Optional[Tensor]) -> Tensor:
    return select_backend(x).forward(x, qweight, scales, zeros, bits, group_size, out_features,
                                     lora_A, lora_B, scaling, bias)


@_linear.register_fake
def _linear_fake(x, qweight, scales, zeros, bits, group_size, out_features, lora_A, lora_B,
                 scaling, bias):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("qra::linear_backward", mutates_args=())
def _linear_backward(grad_out: Tensor, x: Tensor, qweight: Tensor, scales: Tensor,
                     zeros: Tensor, bits: int, group_size: int, out_features: int,
                     lora_A: Optional[Tensor], lora_B: Optional[Tensor], scaling: float,
                     need_x: bool, need_lora: bool) -> Tuple[Tensor, Tensor, Tensor]:
    gx, ga, gb = select_backend(x).backward(grad_out, x, qweight, scales, zeros, bits,
                                            group_size, out_features, lora_A, lora_B, scaling,
                                            need_x, need_lora)
    # Outputs are always tensors; gradients not asked for come back empty (a fresh tensor
    # each: custom-op outputs may not alias one another).
    return (x.new_empty(0) if gx is None else gx, x.new_empty(0) if ga is None else ga,
            x.new_empty(0) if gb is None else gb)


@_linear_backward.register_fake
def _linear_backward_fake(grad_out, x, qweight, scales, zeros, bits, group_size, out_features,
                          lora_A, lora_B, scaling, need_x, need_lora):
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    with_lora = need_lora and lora_A is not None
    ga = torch.empty_like(lora_A) if with_lora else x.new_empty(0)
    gb = torch.empty_like(lora_B) if with_lora else x.new_empty(0)
    return gx, ga, gb


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bits, group_size, out_features, lora_A, lora_B, scaling, bias = inputs
    ctx.save_for_backward(x, qweight, scales, zeros, lora_A, lora_B)
    ctx.meta = (bits, group_size, out_features, scaling)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    x, qweight, scales, zeros, lora_A, lora_B = ctx.saved_tensors
    bits, group_size, out_features, scaling = ctx.meta
    need = ctx.needs_input_grad
    need_x = bool(need[0])
    need_lora = bool(need[7] or need[8])
    gx, ga, gb = torch.ops.qra.linear_backward(grad_out, x, qweight, scales, zeros, bits,
                                               group_size, out_features, lora_A, lora_B,
                                               scaling, need_x, need_lora)
    gbias = None
    if ctx.bias_dtype is not None and need[10]:
        gbias = grad_out.reshape(-1, out_features).sum(0).to(ctx.bias_dtype)
    return (gx if need_x else None, None, None, None, None, None, None,
            ga if need_lora and lora_A is not None else None,
            gb if need_lora and lora_B is not None else None, None, gbias)


_linear.register_autograd(_backward, setup_context=_setup_context)


def _direct_call_ok(x: Tensor, lora_A, lora_B, bias) -> bool:
    """Whether a call may skip torch's op dispatch and run the backend directly: plain eager
    CPU tensors, nothing to record for autograd, no tracing, no mode or transform that would
    have to see the op. Then the dispatcher would only forward to the very same
    ``select_backend(x).forward``; skipping it saves 30-60 µs a call, measured at M = 1 on a
    4096 x 4096 4-bit weight as 210 -> 154 µs on a 2-core Zen 4 (the kernel itself: 125 µs),
    which is what decode pays per projection (benches/README.md). Anything else keeps the
    op, so torch.compile, torch.export, FakeTensor, vmap and autograd see ``qra::linear``."""
    if type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(
            t is not None and t.requires_grad for t in (lora_A, lora_B, bias))):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active())


def linear_packed(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                  group_size: int, out_features: int, lora_A: Optional[Tensor] = None,
                  lora_B: Optional[Tensor] = None, scaling: float = 1.0,
                  bias: Optional[Tensor] = None) -> Tensor:
    """The op on raw packed tensors (what QRALinear calls). No validation beyond the op's.
    Inference on the CPU calls the backend without the dispatcher (:func:`_direct_call_ok`);
    the result is the op's, bit for bit (tests/qra_kernels/test_ops.py)."""
    if _direct_call_ok(x, lora_A, lora_B, bias):
        return select_backend(x).forward(x, qweight, scales, zeros, bits, group_size,
                                         out_features, lora_A, lora_B, float(scaling), bias)
    return torch.ops.qra.linear(x, qweight, scales, zeros, bits, group_size, out_features,
                                lora_A, lora_B, float(scaling), bias)


def qra_linear(x: Tensor, qw: QuantizedWeight, lora_A: Optional[Tensor] = None,
               lora_B: Optional[Tensor] = None, scaling: float = 1.0,
               bias: Optional[Tensor] = None) -> Tensor:
    """``x @ dequant(W).T + scaling * (x @ lora_A.T) @ lora_B.T + bias``.

    ``x [..., in_features]`` (fp32/fp16/bf16); ``lora_A [r, in_features]``,
    ``lora_B [out_features, r]``, ``r >= 0`` (both or neither); ``bias [out_features]``.
    Differentiable in x, lora_A, lora_B and bias; the result has x's dtype.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    check_linear_args(x, qw.out_features, qw.in_features, qw.device, lora_A, lora_B, scaling,
                      bias)
    return linear_packed(x, qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size,
                         qw.out_features, lora_A, lora_B, scaling, bias)


# --- routed experts ------------------------------------------------------------------------
@torch.library.custom_op("qra::grouped_linear", mutates_args=())
def _grouped_linear(x: Tensor, tokens_per_expert: Tensor, qweight: Tensor, scales: Tensor,
                    zeros: Tensor, bits: List[int], group_size: int,
                    out_features: int) -> Tensor:
    from .backends.grouped import grouped_forward
    return grouped_forward(x, tokens_per_expert, qweight, scales, zeros, bits, group_size,
                           out_features)


@_grouped_linear.register_fake
def _grouped_linear_fake(x, tokens_per_expert, qweight, scales, zeros, bits, group_size,
                         out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("qra::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward(grad_out: Tensor, x: Tensor, tokens_per_expert: Tensor,
                             qweight: Tensor, scales: Tensor, zeros: Tensor, bits: List[int],
                             group_size: int, out_features: int) -> Tensor:
    from .backends.grouped import grouped_backward
    return grouped_backward(grad_out, x, tokens_per_expert, qweight, scales, zeros, bits,
                            group_size, out_features)


@_grouped_linear_backward.register_fake
def _grouped_linear_backward_fake(grad_out, x, tokens_per_expert, qweight, scales, zeros, bits,
                                  group_size, out_features):
    return torch.empty_like(x)


def _grouped_setup_context(ctx, inputs, output):
    x, tokens_per_expert, qweight, scales, zeros, bits, group_size, out_features = inputs
    # x is kept (as qra::linear keeps it) so every backend gets the call it already knows.
    ctx.save_for_backward(x, tokens_per_expert, qweight, scales, zeros)
    ctx.meta = (list(bits), group_size, out_features)


def _grouped_backward(ctx, grad_out):
    x, tokens_per_expert, qweight, scales, zeros = ctx.saved_tensors
    bits, group_size, out_features = ctx.meta
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.qra.grouped_linear_backward(grad_out, x, tokens_per_expert, qweight,
                                                   scales, zeros, bits, group_size,
                                                   out_features)
    return gx, None, None, None, None, None, None, None


_grouped_linear.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)


def grouped_linear_packed(x: Tensor, tokens_per_expert: Tensor, qweight: Tensor,
                          scales: Tensor, zeros: Tensor, bits, group_size: int,
                          out_features: int) -> Tensor:
    """The grouped op on raw packed tensors (what ``QRAExperts`` calls); no validation
    beyond the op's (:func:`qra_kernels.moe.grouped_linear` checks its arguments)."""
    return torch.ops.qra.grouped_linear(x, tokens_per_expert, qweight, scales, zeros,
                                        [int(b) for b in bits], group_size, out_features)
