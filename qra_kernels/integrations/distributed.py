"""torch.distributed with qra models: DDP and FSDP2 (``fully_shard``).

Nothing special is needed for DDP: the packed tensors are frozen parameters
(``requires_grad=False``), so DDP broadcasts them once at construction and never
all-reduces them; only the LoRA gradients travel.

For FSDP2, :func:`shard_model` applies ``fully_shard`` to every decoder block and then to
the root, the layout FSDP2 wants for overlap. The packed ``qweight`` (int32) and the
fp16/bf16 ``scales``/``zeros`` are sharded along their first dimension like any other
parameter and all-gathered as they are — never cast: a ``MixedPrecisionPolicy`` applies
to floating-point parameters that train, and is refused here for the frozen packed ones
(casting scales would corrupt the layout, see ``QRALinear._apply``).
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Type

from torch import nn

from ..modules import QRALinear

__all__ = ["shard_model", "decoder_blocks", "check_packed_frozen"]


def check_packed_frozen(model: nn.Module) -> None:
    """Raise if any packed tensor of a ``QRALinear`` would receive a gradient."""
    for name, m in model.named_modules():
        if isinstance(m, QRALinear):
            for t in ("qweight", "scales", "zeros"):
                if getattr(m, t).requires_grad:
                    raise ValueError(f"{name}.{t} requires grad; the packed base must stay "
                                     "frozen (requires_grad=False) under DDP/FSDP")


def decoder_blocks(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks of a transformers causal LM (``model.layers`` and the like):
    the members of the largest ``nn.ModuleList`` in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=len))


def shard_model(model: nn.Module, blocks: Optional[Iterable[nn.Module]] = None,
                block_type: Optional[Type[nn.Module]] = None, **fully_shard_kwargs: Any
                ) -> nn.Module:
    """``fully_shard`` each block (``blocks``, else modules of ``block_type``, else
    :func:`decoder_blocks`) and the root; returns the root (sharded in place).

    ``fully_shard_kwargs`` go to ``torch.distributed.fsdp.fully_shard`` (``mesh``,
    ``reshard_after_forward``, ...). Needs an initialised process group.
    """
    from torch.distributed.fsdp import fully_shard
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if "mp_policy" in fully_shard_kwargs:
        raise ValueError("mp_policy: a mixed-precision policy would cast the packed scales; "
                         "keep the model in its training dtype instead")
    check_packed_frozen(model)
    if blocks is None:
        blocks = ([m for m in model.modules() if isinstance(m, block_type)]
                  if block_type is not None else decoder_blocks(model))
    for block in blocks:
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
