"""PEFT LoRA on ``QRALinear``: the layer type, per-layer configs, loading, merge, export.

* :class:`QraLoraLinear` — PEFT's LoRA layer for a ``QRALinear`` base. Its forward is ONE
  call of the fused ``qra::linear`` op: the active adapters (and any adapter the base layer
  holds itself) are stacked along the rank dimension, their scalings folded into B, so
  ``y = x·Wqᵀ + x·[A₁;A₂]ᵀ·[s₁B₁, s₂B₂]ᵀ`` is computed in one pass and nothing dequantized
  is kept for backward. (With LoRA dropout active in training the adapter sees a different
  input than the base, so it runs beside the fused base op instead.)
* It is registered through PEFT's custom-module dispatch (``LoraConfig._register_custom_module``),
  which PEFT does not save with the adapter: a plain ``PeftModel.from_pretrained`` on a qra
  model therefore fails with "Target module QRALinear(...) is not supported" — loudly, never
  silently — and :func:`load` is the way back in.
* **Merging into a packed base.** Requantizing ``W + s·B·A`` would change the packed codes,
  lose the adapter's precision, and make unmerge approximate. Instead ``merge`` folds the
  adapter into the base layer's own adapter slot (``QRALinear.lora_A/lora_B``, which the fused
  kernel computes at almost no cost) and keeps the slot's previous tensors; ``unmerge`` puts
  those back. The packed ``qweight/scales/zeros`` are never written, so unmerge restores
  every tensor bit for bit, and ``merge_and_unload()`` yields a qra model whose layers carry
  the adapter. :func:`export_dense` is the other exit: a dense (bf16 by default) model with
  every adapter merged into dequantized weights.
"""
from __future__ import annotations

import warnings
from typing import Any, List, Optional

import torch
from torch import nn

from ..modules import QRALinear, replace_module
from ..ops import check_linear_args, linear_packed

__all__ = ["QraLoraLinear", "register", "lora_config", "load", "export_dense",
           "dispatch_qra"]

try:
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as e:  # pragma: no cover - peft is a dependency
    raise ImportError("qra_kernels.integrations.peft needs peft: pip install peft") from e


class QraLoraLinear(nn.Module, LoraLayer):
    """LoRA on a ``QRALinear`` base, running the fused quantized matmul + LoRA op."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 r: int = 0, lora_alpha: int = 1, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, QRALinear):
            raise TypeError(f"QraLoraLinear wraps a QRALinear, got {type(base).__name__}")
        for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
            if getattr(config, flag, False):
                raise ValueError(f"LoraConfig.{flag}=True is not supported on QRALinear layers")
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        # The base layer's own adapter is part of the frozen base here; its parameter names
        # contain "lora_", which PEFT's "only adapters are trainable" rule would miss.
        base.lora_A.requires_grad_(False)
        base.lora_B.requires_grad_(False)
        self._merge_stash: Optional[tuple] = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module):
        module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        return None  # plain LoRA only (DoRA and friends are rejected in __init__)

    # --- forward -----------------------------------------------------------------------
    def _stacked_adapters(self, adapters: List[str], dtype: torch.dtype):
        """(A, B, scaling) with every adapter (the base's own first) stacked on the rank."""
        base = self.get_base_layer()
        parts = []
        if base.rank:
            parts.append((base.lora_A, base.lora_B, base.scaling))
        for a in adapters:
            parts.append((self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a]))
        if not parts:
            return None, None, 0.0
        if len(parts) == 1:
            A, B, s = parts[0]
            return A.to(dtype), B.to(dtype), float(s)
        A = torch.cat([p[0].to(dtype) for p in parts], dim=0)
        B = torch.cat([p[1].to(dtype) * p[2] for p in parts], dim=1)
        return A, B, 1.0

    def _fused(self, x: torch.Tensor, adapters: List[str]) -> torch.Tensor:
        base = self.get_base_layer()
        A, B, s = self._stacked_adapters(adapters, x.dtype)
        check_linear_args(x, base.out_features, base.in_features, base.qweight.device, A, B, s,
                          base.bias)
        return linear_packed(x, base.qweight, base.scales, base.zeros, base.bits,
                             base.group_size, base.out_features, A, B, s, base.bias)

    def _unfused_lora(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        A, B = self.lora_A[adapter], self.lora_B[adapter]
        h = self.lora_dropout[adapter](x.to(A.weight.dtype))
        return (B(A(h)) * self.scaling[adapter]).to(x.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        dropout_on = self.training and any(
            not isinstance(self.lora_dropout[a], nn.Identity) and self.lora_dropout[a].p > 0
            for a in active)
        if not dropout_on:
            return self._fused(x, active)
        result = self._fused(x, [])
        for a in active:
            result = result + self._unfused_lora(x, a)
        return result

    def _mixed_batch_forward(self, x, *args, adapter_names, **kwargs):
        result = self._fused(x, [])
        for adapter in set(adapter_names):
            if adapter == "__base__" or adapter not in self.lora_A:
                continue
            idx = [i for i, a in enumerate(adapter_names) if a == adapter]
            result[idx] = result[idx] + self._unfused_lora(x[idx], adapter)
        return result

    # --- merge / unmerge ---------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Fold adapters into the base layer's adapter slot (see the module docstring)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if self._merge_stash is None:
            self._merge_stash = (base.lora_A, base.lora_B, base.rank, base.alpha)
        dtype = base.lora_A.dtype
        parts = [(base.lora_A.data, base.lora_B.data * base.scaling)] if base.rank else []
        parts += [(self.lora_A[a].weight.data.to(dtype),
                   self.lora_B[a].weight.data.to(dtype) * self.scaling[a]) for a in adapter_names]
        A = torch.cat([p[0] for p in parts], dim=0)
        B = torch.cat([p[1] for p in parts], dim=1)
        if safe_merge and not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"NaN or Inf in adapter(s) {adapter_names}; nothing was merged")
        rank = A.shape[0]
        base.lora_A = nn.Parameter(A.detach().clone(), requires_grad=False)
        base.lora_B = nn.Parameter(B.detach().clone(), requires_grad=False)
        base.rank, base.alpha = rank, float(rank)  # scaling 1: the scalings live in B now
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the base layer's adapter slot exactly as it was before the first merge."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        lora_A, lora_B, rank, alpha = self._merge_stash
        dev = base.qweight.device
        base.lora_A, base.lora_B = (nn.Parameter(lora_A.data.to(dev), requires_grad=False),
                                    nn.Parameter(lora_B.data.to(dev), requires_grad=False))
        base.rank, base.alpha = rank, alpha
        self._merge_stash = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_qra(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
    """PEFT dispatcher signature: a QraLoraLinear for a QRALinear target, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QRALinear):
        return QraLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def register(config: LoraConfig) -> LoraConfig:
    """Teach ``config`` to put :class:`QraLoraLinear` on ``QRALinear`` layers (in place)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QRALinear: QraLoraLinear})
    return config


_ALLOCATION_OWNS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")


def lora_config(model: nn.Module, allocation=None, **kwargs: Any) -> LoraConfig:
    """A ``LoraConfig`` for ``model`` (a qra model, or a PeftModel of one) with exact
    target names, registered for ``QRALinear``.

    With an ``allocation`` (``qra_search.Allocation``, its dict, or a path to
    ``allocation.json``), each layer gets the allocation's rank (and alpha, default the
    rank, i.e. scaling 1) through ``rank_pattern``/``alpha_pattern``; rank-0 layers get no
    adapter; ``r``, ``lora_alpha`` and the patterns come from the allocation and may not
    be passed. Without one, every ``QRALinear`` is targeted with ``kwargs`` (``r=8`` by
    default). Other ``kwargs`` (``lora_dropout``, ``task_type``, ...) go to ``LoraConfig``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    layers = {n: (m.get_base_layer() if isinstance(m, BaseTunerLayer) else m)
              for n, m in model.named_modules()}
    qra = {n for n, m in layers.items() if isinstance(m, QRALinear)}
    if allocation is None:
        if not qra:
            raise ValueError("model has no QRALinear layer; quantize it first "
                             "(qra_kernels.quantize_model or from_pretrained with QraConfig)")
        kwargs.setdefault("r", 8)
        kwargs.setdefault("lora_alpha", kwargs["r"])
        kwargs.setdefault("target_modules", sorted(qra))
        return register(LoraConfig(**kwargs))
    clash = [k for k in _ALLOCATION_OWNS if k in kwargs]
    if clash:
        raise ValueError(f"{clash} are set by the allocation; change the allocation instead "
                         "(per-layer 'rank' and 'alpha')")
    if isinstance(allocation, (str, bytes)) or hasattr(allocation, "__fspath__"):
        from ..allocation import Allocation
        allocation = Allocation.load(allocation)
    elif isinstance(allocation, dict):
        from ..allocation import Allocation
        allocation = Allocation.from_dict(allocation)
    for name, spec in allocation.layers.items():
        if spec.get("rank", 0) <= 0:
            continue
        if name not in layers:
            raise ValueError(f"allocation layer {name!r} is not a module of the model")
        if not isinstance(layers[name], (QRALinear, nn.Linear)):
            raise ValueError(f"allocation layer {name!r} is a {type(layers[name]).__name__}, "
                             "not a linear layer")
    return register(allocation.to_lora_config(**kwargs))


def load(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False,
         **kwargs: Any) -> "PeftModel":
    """``PeftModel.from_pretrained`` for a qra model: re-registers :class:`QraLoraLinear`
    (PEFT does not save custom-module registrations) and loads the adapter at ``path``
    with the per-layer ranks it was saved with."""
    config = register(LoraConfig.from_pretrained(path))
    config.inference_mode = not is_trainable
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, config=config,
                                     is_trainable=is_trainable, **kwargs)


@torch.no_grad()
def export_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A dense model: every ``QRALinear`` (with its LoRA adapters, base-held and PEFT's
    active ones) becomes an ``nn.Linear`` of ``dequant(W) + Σ s·B·A`` in ``dtype``.

    Takes a PeftModel (returns its unwrapped base model) or a plain qra model; modifies it
    in place. A transformers model loses its ``quantization_config``, so
    ``save_pretrained`` then writes an ordinary dense checkpoint.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    done: List[str] = []
    for name, m in list(root.named_modules()):
        if any(name.startswith(d + ".") for d in done):
            continue  # the base layer of a QraLoraLinear already exported
        if isinstance(m, QraLoraLinear):
            dense = m.get_base_layer().dequantize(torch.float32, merge_lora=True)
            if not m.merged:
                for a in m.active_adapters:
                    if a in m.lora_A:
                        dense.weight += m.get_delta_weight(a).float()
            replace_module(root, name, dense.to(dtype))
            done.append(name)
        elif isinstance(m, QRALinear):
            replace_module(root, name, m.dequantize(dtype, merge_lora=True))
    if isinstance(model, PeftModel):
        root = model.merge_and_unload()  # any LoRA layers on ordinary nn.Linear modules
    hf_quantizer = getattr(root, "hf_quantizer", None)
    if hf_quantizer is not None:
        hf_quantizer.remove_quantization_config(root)
    return root.to(dtype)

