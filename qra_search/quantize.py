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


def search_config_of(alloc: Allocation, method: str, hessian_blocks=None, seq_len=None):
    """The :class:`SearchConfig` an allocation was searched with (from its metadata), with
    the quantizer settings that decide which entries it reads."""
    from .config import SearchConfig
    recorded = dict((alloc.meta or {}).get("search") or {})
    fields = {k: recorded[k] for k in ("seq_len", "n_blocks", "hessian_blocks", "group_size",
                                       "bits_choices") if k in recorded}
    fields["method"] = method
    if hessian_blocks is not None:
        fields["hessian_blocks"] = hessian_blocks
    if seq_len is not None:
        fields["seq_len"] = seq_len
    bits = sorted({s["bits"] for s in alloc.layers.values()})
    fields["bits_choices"] = tuple(sorted(set(fields.get("bits_choices", ())) | set(bits)))
    fields.setdefault("group_size", alloc.group_size)
    return SearchConfig(**fields)


def apply_allocation(model, alloc: Allocation, *, method: str, cache_dir: Optional[str],
                     store=None, tokenizer=None, hessian_blocks=None, seq_len=None,
                     progress: bool = False):
    """Swap ``model``'s layers for the allocation's ``QRALinear`` layers, in place."""
    if store is None:
        ranks = [s.get("rank", 0) for s in alloc.layers.values()]
        hessian = None
        config = search_config_of(alloc, method, hessian_blocks, seq_len)
        if config.uses_gptq:
            if tokenizer is None:
                raise ValueError("method 'gptq' needs the tokenizer for its calibration text")
            from .models import search_calibration
            _, hessian = search_calibration(tokenizer, config)
        store = quant_store(model, alloc.layers, group_size=alloc.group_size, method=method,
                            cache_dir=cache_dir, max_rank=max(ranks + [0]),
                            hessian_tokens=hessian, progress=progress)
    quantize_model(model, alloc, method=method, lora_init=alloc.lora_init or "svd",
                   store=allocation_store(store), progress=progress)
    return model


def quantize_allocation(model, tokenizer, alloc: Allocation, out_dir: str, *, method: str,
                        cache_dir: Optional[str], hessian_blocks=None, seq_len=None,
                        store=None, progress: bool = False) -> dict:
    """Quantize ``model`` as ``alloc`` says and save it (with the tokenizer and the
    allocation) to ``out_dir``."""
    apply_allocation(model, alloc, method=method, cache_dir=cache_dir, store=store,
                     tokenizer=tokenizer, hessian_blocks=hessian_blocks, seq_len=seq_len,
                     progress=progress)
    saved = Allocation.from_dict(alloc.to_dict())
    saved.method = method
    saved.lora_init = alloc.lora_init or "svd"
    return save_quantized(model, out_dir, tokenizer, saved)
