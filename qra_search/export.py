"""From an allocation to a saved quantized model.

Each listed linear becomes a ``QRALinear`` holding the packed weight the search evaluated
(the same :class:`~qra_search.evaluate.QuantCache` entry, so nothing is quantized twice)
and a rank-``r`` adapter initialised from the quantization error's top singular triplets,
exactly as the search scored it. The directory gets ``model.safetensors`` (the whole state
dict: packed ``qweight``/``scales``/``zeros``, adapters, float rest), ``allocation.json``,
the model's ``config.json`` and its tokenizer.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from .allocation import Allocation
from .evaluate import QuantCache


def quantize_allocation(model: nn.Module, allocation: Allocation, cache: QuantCache,
                        progress: bool = False) -> nn.Module:
    """Replace each linear named in ``allocation`` by a ``QRALinear`` in place."""
    from qra_kernels.modules import QRALinear  # the module layer, not a kernel backend
    allocation.validate(model)
    items = list(allocation.layers.items())
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="packing", unit="layer")
    for name, spec in items:
        bits, rank = spec["bits"], spec.get("rank", 0)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        e = cache.get(name, bits)
        layer = QRALinear.from_quantized(
            e["qweight"], rank=rank, alpha=spec.get("alpha"),
            bias=None if linear.bias is None else linear.bias.detach())
        if rank:
            if rank > e["B"].shape[1]:
                raise ValueError(f"layer {name!r}: rank {rank} exceeds the cached factors "
                                 f"({e['B'].shape[1]}); raise max_rank")
            with torch.no_grad():
                # QRALinear adds (alpha / rank)·B·A: undo the scaling so B·A is the error's
                # best rank-r approximation whatever alpha is.
                layer.lora_B.copy_(e["B"][:, :rank] / layer.scaling)
                layer.lora_A.copy_(e["A"][:rank])
        setattr(parent, child, layer)
    return model


def save_quantized(model: nn.Module, allocation: Allocation, out_dir: str, tokenizer=None) -> dict:
    from safetensors.torch import save_model
    os.makedirs(out_dir, exist_ok=True)
    save_model(model, os.path.join(out_dir, "model.safetensors"))
    allocation.save(os.path.join(out_dir, "allocation.json"))
    if getattr(model, "config", None) is not None:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write(model.config.to_json_string())
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    from qra_kernels.modules import qra_layers
    measured = sum(m.memory_bytes() for m in qra_layers(model).values())
    return {"dir": out_dir, "linear_bytes": measured,
            "file_bytes": os.path.getsize(os.path.join(out_dir, "model.safetensors"))}
