"""``Allocation``: which (bits, rank) each linear layer gets, and what that costs.

It is the one vocabulary for mixed settings, shared by :func:`qra_kernels.quantize_model`,
the transformers ``QraConfig`` (``QraConfig.from_allocation``), PEFT
(:meth:`Allocation.to_lora_config`) and the search (``qra_search`` returns them).

``allocation.json`` is plain JSON::

    {"format": "qra-allocation", "version": 2, "group_size": 64,
     "lora_dtype": "float32", "scale_dtype": "float16",
     "method": "rtn", "lora_init": "svd",
     "layers": {"model.layers.0.self_attn.q_proj":
                    {"bits": 4, "rank": 8, "shape": [576, 576]}, ...},
     "objectives": {"quality": ..., "memory_bytes": ..., "latency_us": ...},
     "meta": {...}}

``method`` (the quantizer) and ``lora_init`` (how adapters start, :mod:`qra_kernels.lora_init`)
are optional: ``quantize_model`` uses them when it is not told otherwise, so an allocation
saved by the search quantizes to exactly what the search scored. Version 1 files (without
them) still load.

``shape`` is ``[out_features, in_features]``; with it, :attr:`Allocation.memory_bytes` is
computed from the same byte formulas the packed tensors obey, so it equals the sum of
``QRALinear.memory_bytes()`` over the quantized layers exactly (tested).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional

from ._io import atomic_write
from .format import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, lora_nbytes, packed_nbytes

FORMAT_NAME = "qra-allocation"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
METHOD_NAMES = ("rtn", "hqq", "gptq", "recommended")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_RANK = 4096


def _fail(msg: str):
    raise ValueError(msg)


@dataclass
class Allocation:
    layers: Dict[str, Dict[str, Any]]
    group_size: int = 64
    objectives: Dict[str, float] = field(default_factory=dict)
    lora_dtype: str = "float32"
    scale_dtype: str = "float16"
    meta: Dict[str, Any] = field(default_factory=dict)
    method: Optional[str] = None
    lora_init: Optional[str] = None

    def __post_init__(self):
        self.validate()

    # --- validation ----------------------------------------------------------------------
    def validate(self, model=None) -> "Allocation":
        """Raise ValueError naming the offending entry; with ``model``, also check that every
        name is an ``nn.Linear`` of it with the recorded shape."""
        if not isinstance(self.layers, dict):
            _fail(f"layers must be a dict {{module name: {{bits, rank}}}}, got "
                  f"{type(self.layers).__name__}")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or self.group_size not in SUPPORTED_GROUP_SIZES):
            _fail(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size!r}")
        for key, allowed in (("lora_dtype", DTYPE_BYTES), ("scale_dtype", ("float16", "bfloat16"))):
            if getattr(self, key) not in allowed:
                _fail(f"{key} must be one of {sorted(allowed)}, got {getattr(self, key)!r}")
        if self.method is not None and self.method not in METHOD_NAMES:
            _fail(f"method must be one of {METHOD_NAMES} or absent, got {self.method!r}")
        if self.lora_init is not None and self.lora_init not in ("zeros", "svd"):
            _fail(f"lora_init must be 'zeros', 'svd' or absent, got {self.lora_init!r}")
        for name, spec in self.layers.items():
            if not isinstance(name, str) or not name:
                _fail(f"layer names must be non-empty strings, got {name!r}")
            if not isinstance(spec, dict):
                _fail(f"layer {name!r}: entry must be an object with bits and rank, got {spec!r}")
            unknown = set(spec) - {"bits", "rank", "alpha", "shape"}
            if unknown:
                _fail(f"layer {name!r}: unknown field(s) {sorted(unknown)}")
            bits = spec.get("bits")
            if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
                _fail(f"layer {name!r}: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
            rank = spec.get("rank", 0)
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
                _fail(f"layer {name!r}: rank must be an int in [0, {MAX_RANK}], got {rank!r}")
            alpha = spec.get("alpha")
            if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
                _fail(f"layer {name!r}: alpha must be a number, got {alpha!r}")
            shape = spec.get("shape")
            if shape is not None and not (
                    isinstance(shape, (list, tuple)) and len(shape) == 2
                    and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
                _fail(f"layer {name!r}: shape must be [out_features, in_features], got {shape!r}")
        if model is not None:
            from .modules import QRALinear, dense_weight, is_conv1d
            import torch.nn as nn
            modules = dict(model.named_modules())
            for name, spec in self.layers.items():
                mod = modules.get(name)
                if mod is None:
                    _fail(f"layer {name!r} is not a module of the model")
                if isinstance(mod, QRALinear):
                    actual = [mod.out_features, mod.in_features]
                elif isinstance(mod, nn.Linear) or is_conv1d(mod):
                    actual = list(dense_weight(mod).shape)
                else:
                    _fail(f"layer {name!r} is a {type(mod).__name__}, not a linear layer")
                shape = spec.get("shape")
                if shape is not None and list(shape) != actual:
                    _fail(f"layer {name!r}: allocation shape {list(shape)} != model's {actual}")
        return self

    # --- costs ---------------------------------------------------------------------------
    @property
    def memory_bytes(self) -> int:
        """Bytes of every listed layer's packed base + adapter (needs each layer's shape)."""
        return sum(self.layer_bytes(name) for name in self.layers)

    def layer_bytes(self, name: str) -> int:
        spec = self.layers[name]
        if spec.get("shape") is None:
            raise ValueError(f"layer {name!r} has no shape; build the allocation with "
                             "Allocation.uniform(model, ...) or add 'shape'")
        n, k = spec["shape"]
        return (packed_nbytes(n, k, spec["bits"], self.group_size, DTYPE_BYTES[self.scale_dtype])
                + lora_nbytes(n, k, spec.get("rank", 0), DTYPE_BYTES[self.lora_dtype]))

    @property
    def average_bits(self) -> float:
        """Parameter-weighted mean bit-width of the codes (scales/zeros not included)."""
        num = den = 0
        for spec in self.layers.values():
            n, k = spec["shape"]
            num += spec["bits"] * n * k
            den += n * k
        return num / den if den else 0.0

    # --- construction --------------------------------------------------------------------
    @classmethod
    def uniform(cls, model_or_shapes, bits: int, rank: int = 0, group_size: int = 64,
                names: Optional[Iterable[str]] = None, **kwargs) -> "Allocation":
        """Every linear layer (or the given names) at the same bits and rank. Accepts a
        model or a ``{name: (out_features, in_features)}`` mapping."""
        shapes = linear_shapes(model_or_shapes) if not isinstance(model_or_shapes, dict) \
            else dict(model_or_shapes)
        if names is not None:
            names = list(names)
            missing = [n for n in names if n not in shapes]
            if missing:
                _fail(f"layer {missing[0]!r} is not a linear layer of the model")
            shapes = {n: shapes[n] for n in names}
        layers = {n: {"bits": bits, "rank": rank, "shape": list(s)} for n, s in shapes.items()}
        return cls(layers=layers, group_size=group_size, **kwargs)

    # --- files ---------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "group_size": self.group_size,
             "lora_dtype": self.lora_dtype, "scale_dtype": self.scale_dtype}
        if self.method is not None:
            d["method"] = self.method
        if self.lora_init is not None:
            d["lora_init"] = self.lora_init
        d.update({"layers": {n: dict(s) for n, s in self.layers.items()},
                  "objectives": dict(self.objectives), "meta": dict(self.meta)})
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Allocation":
        if not isinstance(d, dict):
            _fail(f"allocation must be a JSON object, got {type(d).__name__}")
        if d.get("format", FORMAT_NAME) != FORMAT_NAME:
            _fail(f"format must be {FORMAT_NAME!r}, got {d.get('format')!r}")
        if d.get("version", FORMAT_VERSION) not in READS_VERSIONS:
            _fail(f"version {d.get('version')!r} is not supported (this qra reads "
                  f"{list(READS_VERSIONS)})")
        if "layers" not in d:
            _fail("allocation is missing 'layers'")
        unknown = set(d) - {"format", "version", "group_size", "lora_dtype", "scale_dtype",
                            "layers", "objectives", "meta", "method", "lora_init"}
        if unknown:
            _fail(f"allocation has unknown field(s) {sorted(unknown)}")
        layers = d["layers"]
        if isinstance(layers, dict):
            layers = {n: dict(s) if isinstance(s, dict) else s for n, s in layers.items()}
            for s in layers.values():
                if isinstance(s, dict) and isinstance(s.get("shape"), list):
                    s["shape"] = list(s["shape"])
        return cls(layers=layers, group_size=d.get("group_size", 64),
                   objectives=dict(d.get("objectives") or {}),
                   lora_dtype=d.get("lora_dtype", "float32"),
                   scale_dtype=d.get("scale_dtype", "float16"), meta=dict(d.get("meta") or {}),
                   method=d.get("method"), lora_init=d.get("lora_init"))

    def save(self, path) -> None:
        with atomic_write(path) as f:  # a killed save never leaves a truncated file
            json.dump(self.to_dict(), f, indent=1, sort_keys=False)
            f.write("\n")

    @classmethod
    def load(cls, path) -> "Allocation":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except FileNotFoundError:
            raise ValueError(f"{path}: no such allocation file") from None
        return cls.from_dict(d)

    # --- PEFT ----------------------------------------------------------------------------
    def to_lora_config(self, **lora_kwargs):
        """A ``peft.LoraConfig`` with exact target names and per-layer rank/alpha patterns.

        Layers with rank 0 get no adapter. Patterns use full module names, which PEFT
        matches as whole dotted suffixes, so ``layers.1.`` never also matches ``layers.11.``.
        """
        from peft import LoraConfig
        targets = {n: s for n, s in self.layers.items() if s.get("rank", 0) > 0}
        if not targets:
            _fail("no layer has rank > 0; a LoRA config needs at least one adapter")
        ranks = [s["rank"] for s in targets.values()]
        r = max(set(ranks), key=ranks.count)  # the most common rank is the default
        rank_pattern = {n: s["rank"] for n, s in targets.items() if s["rank"] != r}
        alpha_pattern = {n: s.get("alpha", s["rank"]) for n, s in targets.items()
                         if s.get("alpha", s["rank"]) != r}
        kwargs = dict(r=r, lora_alpha=r, target_modules=sorted(targets),
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        kwargs.update(lora_kwargs)
        return LoraConfig(**kwargs)

    def __repr__(self) -> str:
        bits = {}
        for s in self.layers.values():
            bits[s["bits"]] = bits.get(s["bits"], 0) + 1
        return (f"Allocation({len(self.layers)} layers, group_size={self.group_size}, "
                f"bits histogram={dict(sorted(bits.items()))})")


def linear_shapes(model) -> Dict[str, tuple]:
    """``{name: (out_features, in_features)}`` of every quantizable layer of ``model``
    (:func:`qra_kernels.modules.quantizable_layers`: ``nn.Linear``, ``Conv1D``, already
    quantized layers), without the output head — it is tied to the embeddings in many models
    and is left in floating point."""
    from .modules import quantizable_layers
    return {name: (m.out_features, m.in_features) if hasattr(m, "out_features")
            else (m.weight.shape[1], m.weight.shape[0])  # Conv1D stores [in, out]
            for name, m in quantizable_layers(model).items()}
