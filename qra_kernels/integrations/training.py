"""Preparing a qra model for (LoRA) training.

:func:`prepare_for_training` is what ``peft.prepare_model_for_kbit_training`` does for
bitsandbytes models, minus its memory blow-up: that function casts *every* fp16/bf16
parameter to float32 — embeddings and output head included (for SmolLM2-135M, +57 MB of
frozen weights that never receive a gradient) — and, on a qra model, it writes
``param.data`` directly, which bypasses ``QRALinear._apply`` and turns the packed layers'
fp16 scales and zeros into float32 (a format the kernels do not accept). Here nothing is
upcast unless asked for: frozen weights stay in their dtype, the packed tensors are never
touched, and only the normalisation weights may be kept in float32 (``upcast_norms``),
which costs kilobytes.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..modules import QRALinear

__all__ = ["prepare_for_training", "trainable_parameters"]


def _is_norm(module: nn.Module) -> bool:
    # transformers' RMSNorm classes (LlamaRMSNorm, Qwen2RMSNorm, GemmaRMSNorm, ...) are not
    # torch.nn.RMSNorm subclasses; their class names are the stable part.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or \
        type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True,
                         gradient_checkpointing_kwargs: Optional[Dict[str, Any]] = None,
                         upcast_norms: bool = False) -> nn.Module:
    """Freeze every parameter, optionally turn on gradient checkpointing, and return the
    model (modified in place). Call it before ``peft.get_peft_model``.

    * ``gradient_checkpointing``: uses transformers' ``gradient_checkpointing_enable`` with
      ``use_reentrant=False`` by default (works with frozen inputs and with
      ``torch.compile``); with ``use_reentrant=True`` the input embeddings are made to
      require grad, which the reentrant variant needs to see any gradient at all.
    * ``upcast_norms``: keep the (tiny) normalisation weights in float32.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError("gradient_checkpointing must be a bool")
    if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs,
                                                                    dict):
        raise TypeError("gradient_checkpointing_kwargs must be a dict or None")
    for p in model.parameters():
        p.requires_grad_(False)
    if upcast_norms:
        for m in model.modules():
            if _is_norm(m) and not isinstance(m, QRALinear):
                m.float()
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                            "pass gradient_checkpointing=False and wrap layers in "
                            "torch.utils.checkpoint yourself")
        kwargs = {"use_reentrant": False}
        kwargs.update(gradient_checkpointing_kwargs or {})
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"] and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if getattr(getattr(model, "config", None), "use_cache", None):
            model.config.use_cache = False  # a KV cache is useless (and warned about) here
    return model


def trainable_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The parameters an optimizer should see (``requires_grad=True``), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
