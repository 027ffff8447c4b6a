"""``QRALinear`` (packed base + LoRA of any rank) and model-level quantization."""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .format import (SCALE_DTYPES, QuantizedWeight, check_bits, check_group_size,
                     lora_nbytes, packed_nbytes, padded_in_features)
from .ops import check_linear_args, linear_packed
from .quantizers import quantize_weight

__all__ = ["QRALinear", "quantize_model", "qra_layers"]

LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int >= 0, got {type(rank).__name__}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return rank


class QRALinear(nn.Module):
    """A linear layer whose weight is stored packed (see docs/FORMAT.md), with a LoRA
    adapter ``y = x·Wqᵀ + (alpha / rank)·(x·Aᵀ)·Bᵀ + bias``.

    The packed tensors are frozen parameters (``requires_grad=False``) so that FSDP shards
    them and optimizers never touch them; ``lora_A``/``lora_B`` are trainable, initialised
    as PEFT does (A Kaiming-uniform, B zero, so the adapter starts as the identity).
    ``module.to(dtype)`` never changes the stored scales and zeros (a cast would corrupt
    them); it moves them between devices only.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64,
                 rank: int = 0, alpha: Optional[float] = None, bias: bool = False, *,
                 scale_dtype: torch.dtype = torch.float16,
                 lora_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        check_bits(bits)
        check_group_size(group_size)
        _check_rank(rank)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
        if lora_dtype not in LORA_DTYPES:
            raise TypeError(f"lora_dtype must be float32, bfloat16 or float16, got {lora_dtype}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
            raise TypeError(f"alpha must be a number or None, got {type(alpha).__name__}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.rank = bits, group_size, rank
        # alpha=None means alpha = rank, i.e. scaling 1 (PEFT's scaling is alpha / r).
        self.alpha = float(rank if alpha is None else alpha)
        kp = padded_in_features(in_features, group_size)
        frozen = dict(requires_grad=False)
        self.qweight = nn.Parameter(
            torch.zeros(kp * bits // 32, out_features, dtype=torch.int32, device=device), **frozen)
        self.scales = nn.Parameter(
            torch.ones(kp // group_size, out_features, dtype=scale_dtype, device=device), **frozen)
        self.zeros = nn.Parameter(
            torch.zeros(kp // group_size, out_features, dtype=scale_dtype, device=device), **frozen)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=lora_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=lora_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device))
        else:
            self.register_parameter("bias", None)
        self.reset_lora_parameters()

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64, rank: int = 0,
                    alpha: Optional[float] = None, method: str = "hqq", *,
                    scale_dtype: torch.dtype = torch.float16,
                    lora_dtype: torch.dtype = torch.float32, pad: bool = False) -> "QRALinear":
        """Quantize an ``nn.Linear`` (on its own device) and attach a fresh adapter."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight.detach(), bits, group_size, method,
                             scale_dtype=scale_dtype, pad=pad)
        return cls.from_quantized(qw, rank=rank, alpha=alpha,
                                  bias=None if linear.bias is None else linear.bias.detach(),
                                  lora_dtype=lora_dtype)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, rank: int = 0, alpha: Optional[float] = None,
                       bias: Optional[torch.Tensor] = None,
                       lora_dtype: torch.dtype = torch.float32) -> "QRALinear":
        if not isinstance(qw, QuantizedWeight):
            raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
        n, k = qw.shape
        layer = cls(k, n, qw.bits, qw.group_size, rank, alpha, bias=bias is not None,
                    scale_dtype=qw.scales.dtype, lora_dtype=lora_dtype, device="meta")
        layer.qweight = nn.Parameter(qw.qweight, requires_grad=False)
        layer.scales = nn.Parameter(qw.scales, requires_grad=False)
        layer.zeros = nn.Parameter(qw.zeros, requires_grad=False)
        dev = qw.device
        layer.lora_A = nn.Parameter(torch.empty(rank, k, dtype=lora_dtype, device=dev))
        layer.lora_B = nn.Parameter(torch.empty(n, rank, dtype=lora_dtype, device=dev))
        layer.reset_lora_parameters()
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(dev).clone())
        return layer

    def reset_lora_parameters(self) -> None:
        """PEFT's LoRA init: A ~ Kaiming-uniform(a=√5), B = 0."""
        if self.rank == 0 or self.lora_A.is_meta:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    # --- what it stores ------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight.data, self.scales.data, self.zeros.data, self.bits,
                               self.group_size, (self.out_features, self.in_features))

    def memory_bytes(self) -> int:
        """Bytes of the packed base (codes, scales, zeros) plus the adapter, as stored."""
        base = sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))
        return base + sum(t.numel() * t.element_size() for t in (self.lora_A, self.lora_B))

    def expected_memory_bytes(self) -> int:
        """The same figure from the formulas (docs/FORMAT.md) — equal by construction."""
        return (packed_nbytes(self.out_features, self.in_features, self.bits, self.group_size,
                              self.scales.element_size())
                + lora_nbytes(self.out_features, self.in_features, self.rank,
                              self.lora_A.element_size()))

    def dequantize(self, dtype: torch.dtype = torch.float32, merge_lora: bool = False
                   ) -> nn.Linear:
        """A dense ``nn.Linear`` of this layer (with the adapter merged if asked)."""
        w = self.quantized_weight.dequantize(torch.float32)
        if merge_lora and self.rank:
            w = w + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    # --- compute -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_args(x, self.out_features, self.in_features, self.qweight.device,
                          self.lora_A, self.lora_B, self.scaling, self.bias)
        if self.rank:
            return linear_packed(x, self.qweight, self.scales, self.zeros, self.bits,
                                 self.group_size, self.out_features, self.lora_A, self.lora_B,
                                 self.scaling, self.bias)
        return linear_packed(x, self.qweight, self.scales, self.zeros, self.bits,
                             self.group_size, self.out_features, None, None, 0.0, self.bias)

    def _apply(self, fn, recurse=True):
        # Keep the stored scale dtype through module.to(dtype)/.half()/.bfloat16(): apply
        # only the device part of fn to scales and zeros, from the untouched original.
        keep = (self.scales, self.zeros)

        def guarded(t):
            out = fn(t)
            if any(t is k for k in keep) and out.dtype != t.dtype:
                out = t.to(out.device)
            return out

        return super()._apply(guarded, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, rank={self.rank}, "
                f"alpha={self.alpha:g}, bias={self.bias is not None}")


def _layers_of(allocation) -> tuple[Mapping[str, Mapping[str, Any]], int]:
    """Accept an Allocation-like object (``.layers``, ``.group_size``) or a plain dict."""
    if isinstance(allocation, Mapping):
        layers, group_size = allocation.get("layers"), allocation.get("group_size", 64)
    else:
        layers = getattr(allocation, "layers", None)
        group_size = getattr(allocation, "group_size", None)
    if not isinstance(layers, Mapping):
        raise TypeError("allocation must have a 'layers' mapping {module name: {bits, rank}}")
    check_group_size(group_size, "allocation.group_size")
    return layers, group_size


def quantize_model(model: nn.Module, allocation, *, method: str = "hqq",
                   scale_dtype: torch.dtype = torch.float16,
                   lora_dtype: torch.dtype = torch.float32, pad: bool = False,
                   progress: bool = False) -> nn.Module:
    """Replace each ``nn.Linear`` named in ``allocation`` by a ``QRALinear``, in place.

    ``allocation``: a ``qra_search.Allocation`` or ``{"layers": {name: {"bits": b,
    "rank": r, "alpha": a (optional)}}, "group_size": g}``. Every name is checked before
    anything is replaced, so a bad allocation leaves the model untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers, group_size = _layers_of(allocation)
    modules = dict(model.named_modules())
    plan = []
    for name, spec in layers.items():
        if name not in modules:
            raise ValueError(f"allocation names {name!r}, which is not a module of the model")
        if not isinstance(modules[name], nn.Linear):
            raise ValueError(f"allocation names {name!r}, a {type(modules[name]).__name__}, "
                             "not an nn.Linear")
        if not isinstance(spec, Mapping) or "bits" not in spec:
            raise ValueError(f"allocation entry {name!r} must be a mapping with 'bits'")
        check_bits(spec["bits"], f"bits of {name!r}")
        _check_rank(spec.get("rank", 0))
        if not pad and modules[name].in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features="
                             f"{modules[name].in_features} of {name!r}; pass pad=True")
        plan.append((name, spec))
    iterator = plan
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(plan, desc="quantizing", unit="layer")
    for name, spec in iterator:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        layer = QRALinear.from_linear(linear, spec["bits"], group_size, spec.get("rank", 0),
                                      spec.get("alpha"), method, scale_dtype=scale_dtype,
                                      lora_dtype=lora_dtype, pad=pad)
        setattr(parent, child, layer)
    return model


def qra_layers(model: nn.Module) -> Dict[str, QRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QRALinear)}
