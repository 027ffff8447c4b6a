"""The float weights the search swaps, read and written in one orientation.

A searched layer is either a linear layer (``nn.Linear``, or transformers' ``Conv1D``, which
stores ``[in, out]``), seen as ``[out_features, in_features]``, or an expert group (one
projection of a MoE experts module, a 3-D parameter), seen as ``[experts, out_features,
in_features]`` whatever the module's ``is_transposed`` says. Names are those of
:func:`qra_kernels.linear_shapes`. The evaluator writes candidates through :meth:`WeightSlot.set`
and the stores snapshot the float weights through :meth:`WeightSlot.get`, so no other search
module needs to know which kind a layer is.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn

from qra_kernels.modules import QRALinear, is_conv1d
from qra_kernels.moe import QRAExperts, expert_layer, is_experts


class WeightSlot:
    """Where a searched layer's float weight lives: ``get()`` it (a view, fp32 not implied)
    and ``set(w)`` it in place, both in the searched orientation."""

    def __init__(self, name: str, module: nn.Module, param: str = "weight",
                 transposed: bool = False, experts: bool = False):
        self.name, self.module, self.param = name, module, param
        self.transposed, self.experts = transposed, experts

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    def get(self) -> torch.Tensor:
        t = self.tensor.detach()
        if self.transposed:
            return t.transpose(-1, -2)
        return t

    @torch.no_grad()
    def set(self, w: torch.Tensor) -> None:
        self.tensor.copy_(w.transpose(-1, -2) if self.transposed else w)

    @property
    def shape(self):
        return tuple(self.get().shape)

    @property
    def adaptable(self) -> bool:
        """Whether the layer can carry a LoRA adapter (routed experts cannot yet)."""
        return not self.experts


def weight_slots(model: nn.Module, names: Optional[Iterable[str]] = None) -> Dict[str, WeightSlot]:
    """``{name: WeightSlot}`` of ``names`` (default: every layer the search allocates, as
    :func:`qra_kernels.linear_shapes` lists them). Raises ``ValueError`` naming a layer that
    is neither a float linear layer nor a float expert group of the model."""
    if names is None:
        from qra_kernels.allocation import linear_shapes
        names = list(linear_shapes(model))
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        m = mods.get(n)
        if isinstance(m, nn.Linear):
            out[n] = WeightSlot(n, m)
            continue
        if m is not None and is_conv1d(m):
            out[n] = WeightSlot(n, m, transposed=True)
            continue
        found = expert_layer(model, n) if m is None or is_experts(m) else None
        if found is not None and len(found[2]) == 1:
            module = found[1]
            if isinstance(module, QRAExperts):
                raise ValueError(f"expert group {n!r} is already quantized; the search needs "
                                 "the float model")
            out[n] = WeightSlot(n, module, found[2][0], transposed=bool(module.is_transposed),
                                experts=True)
            continue
        if isinstance(m, QRALinear):
            raise ValueError(f"layer {n!r} is already quantized; the search needs the float "
                             "model")
        what = "an experts module (name one projection)" if found is not None else (
            type(m).__name__ if m is not None else "not a module or expert group")
        raise ValueError(f"layer {n!r} is not an nn.Linear, Conv1D or expert group of the model "
                         f"({what})")
    return out


__all__ = ["WeightSlot", "weight_slots"]
