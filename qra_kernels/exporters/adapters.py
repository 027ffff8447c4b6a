"""What each linear layer of a qra model holds, for the exporters.

A layer of a fine-tuned qra model can carry several low-rank terms at once: the adapter in
``QRALinear``'s own slot (``lora_A``/``lora_B``, scaling ``alpha / rank``), any PEFT LoRA
adapters stacked on it by a ``QraLoraLinear`` (active and not merged), and, in the GPTQ
export, a correction term for zero points the GPTQ layout cannot hold (see
:mod:`.gptq`). Their sum is one adapter of the summed rank: ``Σ sᵢ·Bᵢ·Aᵢ = [s₁B₁, s₂B₂, …] ·
[A₁; A₂; …]`` — concatenate along the rank with each scaling folded into its ``B``, and the
result has scaling 1. That is what both exporters use: the GPTQ export writes it as a PEFT
adapter, the GGUF export merges it into the float weight.

:func:`linear_layers` walks a model (a qra model, a transformers model with qra layers, or
a ``PeftModel`` of one) and returns, for every linear layer, its name *as the base model
names it* (PEFT's ``base_model.model.`` prefix and ``.base_layer`` wrappers removed), the
base module, and its adapter terms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..modules import QRALinear

__all__ = ["AdapterTerm", "LinearLayer", "linear_layers", "unwrap", "stack_terms"]


@dataclass
class AdapterTerm:
    """One low-rank term ``scaling · B @ A`` of a layer (``A [r, in]``, ``B [out, r]``)."""
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    source: str  # "qra slot", "peft:<adapter name>", "zero-point remainder"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LinearLayer:
    """A linear layer of the base model: a ``QRALinear`` or a float ``nn.Linear``."""
    name: str
    module: nn.Module
    terms: List[AdapterTerm] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return isinstance(self.module, QRALinear)

    @property
    def rank(self) -> int:
        return sum(t.rank for t in self.terms)


def unwrap(model: nn.Module) -> nn.Module:
    """The base model under a ``PeftModel`` (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        return get_base()
    return model


def _peft_terms(layer: nn.Module, name: str) -> List[AdapterTerm]:
    """The active, unmerged LoRA adapters of a PEFT LoRA layer, as terms."""
    from peft.tuners.lora.layer import LoraLayer
    if not isinstance(layer, LoraLayer):
        raise ValueError(f"model: layer {name!r} is a PEFT {type(layer).__name__}; only LoRA "
                         "adapters can be exported")
    if getattr(layer, "disable_adapters", False):
        return []
    terms = []
    merged = set(getattr(layer, "merged_adapters", []))
    for a in layer.active_adapters:
        if a not in layer.lora_A or a in merged:
            continue  # merged adapters already live in the base layer (its qra slot)
        if a in getattr(layer, "lora_variant", {}):
            raise ValueError(f"model: adapter {a!r} of {name!r} is a LoRA variant (DoRA, ...); "
                             "only plain LoRA can be exported")
        if getattr(layer, "lora_bias", {}).get(a, False):
            raise ValueError(f"model: adapter {a!r} of {name!r} has a LoRA bias; not exportable")
        terms.append(AdapterTerm(layer.lora_A[a].weight.detach(), layer.lora_B[a].weight.detach(),
                                 float(layer.scaling[a]), f"peft:{a}"))
    return terms


def linear_layers(model: nn.Module) -> Dict[str, LinearLayer]:
    """Every linear layer of ``model`` (see the module docstring), in module order.

    Raises ``ValueError`` for what the exporters cannot represent: PEFT tuners other than
    LoRA, LoRA variants, ``modules_to_save`` copies.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    root = unwrap(model)
    out: Dict[str, LinearLayer] = {}
    skip_prefixes: List[str] = []
    for name, m in root.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(m, ModulesToSaveWrapper):
            raise ValueError(f"model: {name!r} is a PEFT modules_to_save copy; merge or drop it "
                             "before exporting (only LoRA adapters are exported)")
        if isinstance(m, BaseTunerLayer):
            base = m.get_base_layer()
            terms = []
            if isinstance(base, QRALinear) and base.rank:
                terms.append(AdapterTerm(base.lora_A.detach(), base.lora_B.detach(), base.scaling,
                                         "qra slot"))
            terms += _peft_terms(m, name)
            if isinstance(base, (QRALinear, nn.Linear)):
                out[name] = LinearLayer(name, base, terms)
            else:
                raise ValueError(f"model: PEFT layer {name!r} wraps a {type(base).__name__}; only "
                                 "linear layers can be exported")
            skip_prefixes.append(name + ".")
        elif isinstance(m, QRALinear):
            terms = ([AdapterTerm(m.lora_A.detach(), m.lora_B.detach(), m.scaling, "qra slot")]
                     if m.rank else [])
            out[name] = LinearLayer(name, m, terms)
            skip_prefixes.append(name + ".")
        elif isinstance(m, nn.Linear):
            out[name] = LinearLayer(name, m, [])
    return out


def stack_terms(terms: List[AdapterTerm], dtype: torch.dtype = torch.float32
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(A [R, in], B [out, R])`` with every scaling folded into B (scaling 1), or None."""
    terms = [t for t in terms if t.rank]
    if not terms:
        return None
    A = torch.cat([t.A.to(dtype) for t in terms], dim=0)
    B = torch.cat([t.B.to(dtype) * t.scaling for t in terms], dim=1)
    return A.contiguous(), B.contiguous()
