"""Projection shapes of the models the benchmarks sweep, from each model's published config.

A shape is ``(out_features N, in_features K)`` of one ``nn.Linear``, the way the packed
format stores it. Only the distinct projections of one decoder layer are listed: every
layer of these models has the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    out_features: int
    in_features: int

    @property
    def name(self) -> str:
        return f"{self.model}.{self.layer}[{self.out_features}x{self.in_features}]"


def _decoder(model: str, hidden: int, intermediate: int, heads: int, kv_heads: int,
             head_dim: int) -> List[Shape]:
    q, kv = heads * head_dim, kv_heads * head_dim
    return [
        Shape(model, "q_proj", q, hidden),
        Shape(model, "k_proj", kv, hidden),  # v_proj has the same shape
        Shape(model, "o_proj", hidden, q),
        Shape(model, "gate_proj", intermediate, hidden),  # up_proj has the same shape
        Shape(model, "down_proj", hidden, intermediate),
    ]


# hidden, intermediate, attention heads, key/value heads, head dim (config.json of each).
MODELS: Dict[str, List[Shape]] = {
    "SmolLM2-135M": _decoder("SmolLM2-135M", 576, 1536, 9, 3, 64),
    "Qwen3-4B": _decoder("Qwen3-4B", 2560, 9728, 32, 8, 128),
    "Llama-3-8B": _decoder("Llama-3-8B", 4096, 14336, 32, 8, 128),
}

# Shapes small enough to run every implementation in well under a second on a CPU: the
# runner's own tests and the microbenchmarks' smoke mode use them.
TINY: List[Shape] = [Shape("tiny", "proj", 96, 128), Shape("tiny", "proj_wide", 64, 192)]


def shapes_for(models: Sequence[str], layers: Sequence[str] = ()) -> List[Shape]:
    """The shapes of ``models`` (names of :data:`MODELS` or ``"tiny"``), optionally only
    the named ``layers``."""
    out: List[Shape] = []
    for m in models:
        if m == "tiny":
            pool = TINY
        elif m in MODELS:
            pool = MODELS[m]
        else:
            raise ValueError(f"unknown model {m!r}; choose from {sorted(MODELS)} or 'tiny'")
        chosen = [s for s in pool if not layers or s.layer in layers]
        if layers and not chosen:
            raise ValueError(f"none of layers {list(layers)} is a projection of {m!r}")
        out.extend(chosen)
    return out
