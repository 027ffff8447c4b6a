"""From an allocation to a saved quantized model — what ``qra quantize`` and ``qra demo``
run.

The packed weights come from the search's store (:func:`qra_search.store.quant_store`, the
same factory the search uses, keyed by the weights and the quantizer settings, not by the
search's effort settings): an entry the search scored is reused bit for bit, a missing one is
computed by the same function. Adapters start from the error's SVD (the allocation's
``lora_init``, ``svd`` unless it says otherwise), as the search scored them. The model is
swapped by :func:`qra_kernels.quantize_model` and saved by
:func:`qra_kernels.save_quantized`, so the directory reloads with ``from_pretrained``.
"""
from __future__ import annotations

from typing import Optional

from qra_kernels.allocation import Allocation
from qra_kernels.checkpoint import save_quantized
from qra_kernels.modules import quantize_model

from .store import allocation_store, quant_store


def apply_allocation(model, alloc: Allocation, *, method: str, cache_dir: Optional[str],
                     store=None, progress: bool = False):
    """Swap ``model``'s layers for the allocation's ``QRALinear`` layers, in place."""
    if store is None:
        ranks = [s.get("rank", 0) for s in alloc.layers.values()]
        store = quant_store(model, alloc.layers, group_size=alloc.group_size, method=method,
                            cache_dir=cache_dir, max_rank=max(ranks + [0]))
    quantize_model(model, alloc, method=method, lora_init=alloc.lora_init or "svd",
                   store=allocation_store(store), progress=progress)
    return model


def quantize_allocation(model, tokenizer, alloc: Allocation, out_dir: str, *, method: str,
                        cache_dir: Optional[str], calib_blocks: int = 8, seq_len: int = 128,
                        store=None, progress: bool = False) -> dict:
    """Quantize ``model`` as ``alloc`` says and save it (with the tokenizer and the
    allocation) to ``out_dir``."""
    apply_allocation(model, alloc, method=method, cache_dir=cache_dir, store=store,
                     progress=progress)
    saved = Allocation.from_dict(alloc.to_dict())
    saved.method = method
    saved.lora_init = alloc.lora_init or "svd"
    return save_quantized(model, out_dir, tokenizer, saved)
