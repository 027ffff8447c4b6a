"""How a LoRA adapter on a quantized base starts.

* ``"zeros"`` — PEFT's initialisation: A Kaiming-uniform, B = 0, so the adapter starts as
  the identity and the model starts as the quantized base.
* ``"svd"`` — the top-r singular triplets of the quantization error ``W − dequant(Wq)``
  (LoftQ's first iteration): ``B·A`` is the best rank-r approximation of what quantization
  lost, so a rank buys quality before any training. The search scores allocations with it,
  and a saved allocation keeps it, so what was scored is what is saved.

The SVD is exact (``torch.linalg.svd``), not randomised: the leading r factors are then the
same whatever larger rank was computed first, so a cache that stored 64 factors serves rank
16 with exactly the factors a rank-16 computation gives.
"""
from __future__ import annotations

from typing import Tuple

import torch

LORA_INITS = ("zeros", "svd")


def check_lora_init(lora_init, name: str = "lora_init") -> str:
    if lora_init not in LORA_INITS:
        raise ValueError(f"{name} must be one of {LORA_INITS}, got {lora_init!r}")
    return lora_init


def error_factors(weight: torch.Tensor, dequantized: torch.Tensor, rank: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B [out, r], A [r, in], singular values)`` with ``B·A`` the best rank-``r``
    approximation of ``weight − dequantized`` (fp32; ``B = U·√S``, ``A = √S·Vᵀ``). Fewer than
    ``rank`` factors come back when the matrix is smaller; all singular values come back."""
    err = weight.to(torch.float32) - dequantized.to(torch.float32)
    u, s, vh = torch.linalg.svd(err, full_matrices=False)
    # Fix each factor's sign (largest |entry| of u's column positive): LAPACK's signs are
    # arbitrary, and a deterministic choice keeps cached and recomputed factors equal.
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True))).squeeze(0)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    u, vh = u * sign, vh * sign[:, None]
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous(), s.contiguous()
