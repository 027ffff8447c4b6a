"""``QRALinear`` (packed base + LoRA of any rank) and model-level quantization.

:func:`quantize_model` is the one place a model's layers are swapped for quantized ones:
the CLI, the search's saved models, the transformers quantizer (``QraConfig``) and the
exporters all come through it.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .format import (SCALE_DTYPES, QuantizedWeight, check_bits, check_group_size,
                     lora_nbytes, packed_nbytes, padded_in_features)
from .lora_init import check_lora_init, error_factors
from .ops import linear_packed
from .validate import check_linear_args
from .quantizers import quantize_weight

__all__ = ["QRALinear", "quantize_model", "qra_layers", "quantizable_layers", "is_conv1d",
           "dense_weight", "replace_module"]

logger = logging.getLogger("qra_kernels")

LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int >= 0, got {type(rank).__name__}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return rank


def apply_keeping_packed(module: nn.Module, fn, recurse: bool, packed) -> nn.Module:
    """``nn.Module._apply`` for a module holding packed tensors (``QRALinear``,
    ``QRAExperts``): ``module.to(dtype)`` / ``.half()`` / ``.bfloat16()`` move ``packed``
    (scales and zeros) but never cast them -- their dtype is part of the stored format -- so
    only the device part of ``fn`` is applied to them, from the untouched original; the
    module's ``compute_dtype`` follows a floating cast."""
    keep = {id(t) for t in packed}

    def guarded(t):
        out = fn(t)
        if id(t) in keep and out.dtype != t.dtype:
            out = t.to(out.device)
        return out

    probe = fn(torch.empty(0, dtype=module.compute_dtype))
    if probe.is_floating_point() and probe.dtype in LORA_DTYPES:
        module.compute_dtype = probe.dtype
    return nn.Module._apply(module, guarded, recurse)


class QRALinear(nn.Module):
    """A linear layer whose weight is stored packed (see docs/FORMAT.md), with a LoRA
    adapter ``y = x·Wqᵀ + (alpha / rank)·(x·Aᵀ)·Bᵀ + bias``.

    The packed tensors are frozen parameters (``requires_grad=False``) so that FSDP shards
    them and optimizers never touch them; ``lora_A``/``lora_B`` are trainable, initialised
    as PEFT does (A Kaiming-uniform, B zero, so the adapter starts as the identity).
    ``module.to(dtype)`` never changes the stored scales and zeros (a cast would corrupt
    them); it moves them between devices only.

    It stands in for an ``nn.Linear`` where modeling code looks: ``in_features``,
    ``out_features``, ``bias`` and ``weight``. ``weight`` is a value-less placeholder with the
    layer's compute dtype (the dtype of the linear it replaced, following ``.to(dtype)``),
    its device and the logical shape ``[out_features, in_features]`` (a 0-stride view of one
    element: no memory), so code such as T5's ``hidden.to(self.wo.weight.dtype)`` runs. Its
    values mean nothing — :meth:`dequantize` gives the weight. (bitsandbytes' ``Linear4bit``
    keeps a ``weight`` for the same reason.)
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64,
                 rank: int = 0, alpha: Optional[float] = None, bias: bool = False, *,
                 scale_dtype: torch.dtype = torch.float16,
                 lora_dtype: torch.dtype = torch.float32, device=None,
                 dtype: Optional[torch.dtype] = None):
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
        if dtype is not None and dtype not in LORA_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.rank = bits, group_size, rank
        # What ``weight.dtype`` reports (see the class docstring); follows module.to(dtype).
        self.compute_dtype = dtype or torch.get_default_dtype()
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
    def from_linear(cls, linear: nn.Module, bits: int = 4, group_size: int = 64, rank: int = 0,
                    alpha: Optional[float] = None, method: str = "hqq", *,
                    scale_dtype: torch.dtype = torch.float16,
                    lora_dtype: torch.dtype = torch.float32, pad: bool = False,
                    lora_init: str = "zeros", hessian: Optional[torch.Tensor] = None
                    ) -> "QRALinear":
        """Quantize an ``nn.Linear`` (or a transformers ``Conv1D``, a linear stored
        transposed) on its own device and attach a rank-``rank`` adapter initialised by
        ``lora_init`` (:mod:`qra_kernels.lora_init`)."""
        check_lora_init(lora_init)
        w = dense_weight(linear)
        qw = quantize_weight(w, bits, group_size, method, scale_dtype=scale_dtype, pad=pad,
                             **({"hessian": hessian} if hessian is not None else {}))
        factors = None
        if lora_init == "svd" and rank:
            B, A, _ = error_factors(w, qw.dequantize(torch.float32), rank)
            factors = (B, A)
        return cls.from_quantized(qw, rank=rank, alpha=alpha,
                                  bias=None if linear.bias is None else linear.bias.detach(),
                                  lora_dtype=lora_dtype, factors=factors, dtype=w.dtype)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, rank: int = 0, alpha: Optional[float] = None,
                       bias: Optional[torch.Tensor] = None,
                       lora_dtype: torch.dtype = torch.float32,
                       factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                       dtype: Optional[torch.dtype] = None) -> "QRALinear":
        """A layer around an already packed weight. ``factors = (B, A)`` (at least ``rank``
        columns/rows) sets the adapter so that ``scaling·B·A`` equals ``B[:, :r]·A[:r]``
        whatever ``alpha`` is; without them the adapter gets PEFT's initialisation."""
        if not isinstance(qw, QuantizedWeight):
            raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
        n, k = qw.shape
        if dtype is not None and dtype not in LORA_DTYPES:
            dtype = None  # e.g. a float64 source weight: report the default dtype instead
        layer = cls(k, n, qw.bits, qw.group_size, rank, alpha, bias=bias is not None,
                    scale_dtype=qw.scales.dtype, lora_dtype=lora_dtype, device="meta",
                    dtype=dtype)
        layer.qweight = nn.Parameter(qw.qweight, requires_grad=False)
        layer.scales = nn.Parameter(qw.scales, requires_grad=False)
        layer.zeros = nn.Parameter(qw.zeros, requires_grad=False)
        dev = qw.device
        layer.lora_A = nn.Parameter(torch.empty(rank, k, dtype=lora_dtype, device=dev))
        layer.lora_B = nn.Parameter(torch.empty(n, rank, dtype=lora_dtype, device=dev))
        layer.reset_lora_parameters()
        if factors is not None and rank:
            B, A = factors
            if B.shape[1] < rank or A.shape[0] < rank:
                raise ValueError(f"factors hold rank {min(B.shape[1], A.shape[0])}, fewer "
                                 f"than the layer's rank {rank}")
            with torch.no_grad():
                layer.lora_B.copy_(B[:, :rank] / layer.scaling)
                layer.lora_A.copy_(A[:rank])
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
    def weight(self) -> torch.Tensor:
        """A value-less stand-in for ``nn.Linear.weight`` (class docstring)."""
        packed = self._parameters.get("weight")
        if packed is not None:  # transformers is loading the packed codes under this key
            return packed
        return torch.empty((), dtype=self.compute_dtype,
                           device=self.qweight.device).expand(self.out_features, self.in_features)

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
        return apply_keeping_packed(self, fn, recurse, (self.scales, self.zeros))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, rank={self.rank}, "
                f"alpha={self.alpha:g}, bias={self.bias is not None}")


# --- finding and replacing layers ----------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): a linear layer storing its weight as
    ``[in, out]``. Matched by name and attributes so this module need not import
    transformers."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out_features, in_features]`` float weight of an ``nn.Linear`` or ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if is_conv1d(module):
        return module.weight.detach().t()
    raise TypeError(f"linear must be a torch.nn.Linear or a transformers Conv1D, got "
                    f"{type(module).__name__}")


def _is_head(name: str, module: nn.Module, head: Optional[nn.Module]) -> bool:
    return module is head or name == "lm_head" or name.endswith(".lm_head")


def quantizable_layers(model: nn.Module, include_head: bool = False) -> Dict[str, nn.Module]:
    """``{name: module}`` of every layer that can be stored packed: ``nn.Linear``,
    ``Conv1D`` and layers already quantized (``QRALinear``), in module order. The output head
    (``model.get_output_embeddings()``, or a module named ``lm_head``) is left out unless
    ``include_head``: it is often tied to the input embeddings, and quantizing it costs far
    more quality per byte saved than any projection."""
    head = None
    if not include_head and hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
    out = {}
    for name, m in model.named_modules():
        if not name or not (isinstance(m, (nn.Linear, QRALinear)) or is_conv1d(m)):
            continue
        if not include_head and _is_head(name, m, head):
            continue
        out[name] = m
    return out


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` (``nn.Module.set_submodule`` where torch has
    it: one place for the swap every path shares)."""
    if hasattr(model, "set_submodule"):
        model.set_submodule(name, module)
        return
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# --- model-level quantization --------------------------------------------------------------
# (name, module, bits) -> (QuantizedWeight, (B, A) factors or None): precomputed weights a
# caller already holds (the search's cache), so the saved model is what was scored. For an
# expert group (name "<experts module>.<projection>", module the experts module) it returns
# (QuantizedExperts, None).
WeightStore = Callable[[str, nn.Module, int], Tuple[QuantizedWeight, Optional[Tuple[torch.Tensor, torch.Tensor]]]]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Calibration texts become this many blocks of this many tokens for GPTQ's Hessians
# (token ids are used as given).
GPTQ_SEQ_LEN, GPTQ_BLOCKS = 256, 128


def _as_allocation(model: nn.Module, allocation):
    """An Allocation-like view ``(layers, group_size, settings)`` of what was passed: an
    ``Allocation``, its dict form, or a config with ``to_allocation(model)`` (``QraConfig``)."""
    if hasattr(allocation, "to_allocation"):
        allocation = allocation.to_allocation(model)
    if isinstance(allocation, Mapping):
        layers, group_size = allocation.get("layers"), allocation.get("group_size", 64)
        settings = {k: allocation.get(k) for k in ("method", "lora_init", "scale_dtype",
                                                   "lora_dtype")}
    else:
        layers = getattr(allocation, "layers", None)
        group_size = getattr(allocation, "group_size", None)
        settings = {k: getattr(allocation, k, None) for k in ("method", "lora_init",
                                                              "scale_dtype", "lora_dtype")}
    if not isinstance(layers, Mapping):
        raise TypeError("allocation must have a 'layers' mapping {module name: {bits, rank}}")
    check_group_size(group_size, "allocation.group_size")
    return layers, group_size, settings


def _resolve_dtype(value, default: torch.dtype, name: str) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, str):
        if value not in _DTYPES:
            raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {value!r}")
        return _DTYPES[value]
    return value


def quantize_model(model: nn.Module, allocation, *, method: Optional[str] = None,
                   calibration=None, tokenizer=None, lora_init: Optional[str] = None,
                   scale_dtype=None, lora_dtype=None, pad: bool = False,
                   store: Optional[WeightStore] = None, progress: bool = False) -> nn.Module:
    """Replace each layer named in ``allocation`` by a ``QRALinear``, in place.

    ``allocation``: a :class:`qra_kernels.Allocation`, its dict form ``{"layers": {name:
    {"bits": b, "rank": r, "alpha": a}}, "group_size": g}``, or a ``QraConfig``. Every entry
    is checked before anything is replaced, so a bad allocation leaves the model untouched.
    ``method`` (``"rtn"``, ``"hqq"``, ``"gptq"`` or ``"recommended"``: the measured best per
    bit-width), ``lora_init`` (``"zeros"`` or ``"svd"``), ``scale_dtype`` and ``lora_dtype``
    default to what the allocation records, else ``"hqq"``, ``"zeros"``, fp16, fp32.
    ``calibration`` (token ids ``[n, seq]`` or texts with ``tokenizer``) is what ``"gptq"``
    measures its Hessians on. ``store`` supplies precomputed packed weights (see
    :data:`WeightStore`). Logs one summary line; warns when most of the model's linear
    weights stay float.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers, group_size, settings = _as_allocation(model, allocation)
    method = method or settings.get("method") or "hqq"
    lora_init = check_lora_init(lora_init or settings.get("lora_init") or "zeros")
    scale_dtype = _resolve_dtype(scale_dtype or settings.get("scale_dtype"), torch.float16,
                                 "scale_dtype")
    lora_dtype = _resolve_dtype(lora_dtype or settings.get("lora_dtype"), torch.float32,
                                "lora_dtype")
    from .quantizers import METHODS, method_for_bits
    if method not in METHODS + ("recommended",):
        raise ValueError(f"method must be one of {METHODS + ('recommended',)}, got {method!r}")
    if not layers:
        raise ValueError("the allocation quantizes no layer (its 'layers' is empty)")
    # Routed experts (entries naming an experts module or one of its projections) go to
    # qra_kernels.moe; what is left are linear layers.
    from .moe import plan_experts, quantize_planned_experts
    layers, expert_plan = plan_experts(model, layers, group_size, pad)
    candidates = dict(model.named_modules())
    plan = []
    for name, spec in layers.items():
        if name not in candidates:
            raise ValueError(f"allocation names {name!r}, which is not a module of the model")
        mod = candidates[name]
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            raise ValueError(f"allocation names {name!r}, a {type(mod).__name__}, "
                             "not an nn.Linear, Conv1D or experts module")
        if not isinstance(spec, Mapping) or "bits" not in spec:
            raise ValueError(f"allocation entry {name!r} must be a mapping with 'bits'")
        check_bits(spec["bits"], f"bits of {name!r}")
        _check_rank(spec.get("rank", 0))
        k = dense_weight(mod).shape[1]
        if not pad and k % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={k} of "
                             f"{name!r}; pass pad=True")
        if not bool(torch.isfinite(dense_weight(mod)).all()):
            raise ValueError(f"weight of {name!r} contains NaN or Inf")
        plan.append((name, spec))
    gptq_plan = {n: s["bits"] for n, s in plan
                 if store is None and method_for_bits(s["bits"], method) == "gptq"}
    if calibration is not None and method != "gptq" and not gptq_plan:
        raise ValueError(f"calibration is only used by method='gptq' (got method={method!r})")
    precomputed: Dict[str, QuantizedWeight] = {}
    if gptq_plan:
        if calibration is None:
            raise ValueError("method='gptq' needs calibration= (token ids [n_blocks, seq_len], "
                             "or texts with tokenizer=)")
        from .calibration import quantize_layers
        from .text import calibration_tokens
        tokens = calibration_tokens(calibration, tokenizer, seq_len=GPTQ_SEQ_LEN,
                                    n_blocks=GPTQ_BLOCKS)
        # Sequential inputs: each block sees the already quantized blocks before it, the
        # measured better choice when one allocation is quantized (docs/QUANTIZERS.md).
        precomputed = quantize_layers(model, gptq_plan, tokens, group_size=group_size,
                                      inputs="sequential", scale_dtype=scale_dtype,
                                      progress=progress)

    before = _linear_census(model)
    iterator = plan
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(plan, desc="quantizing", unit="layer")
    for name, spec in iterator:
        mod = candidates[name]
        bits, rank = spec["bits"], spec.get("rank", 0)
        bias = None if mod.bias is None else mod.bias.detach()
        w = dense_weight(mod)
        if store is not None:
            qw, factors = store(name, mod, bits)
        elif name in precomputed:
            qw, factors = precomputed.pop(name), None
        else:
            qw = quantize_weight(w, bits, group_size, method_for_bits(bits, method),
                                 scale_dtype=scale_dtype, pad=pad)
            factors = None
        if lora_init == "svd" and rank and factors is None:
            B, A, _ = error_factors(w, qw.dequantize(torch.float32), rank)
            factors = (B, A)
        layer = QRALinear.from_quantized(qw, rank=rank, alpha=spec.get("alpha"), bias=bias,
                                         lora_dtype=lora_dtype,
                                         factors=factors if lora_init == "svd" else None,
                                         dtype=w.dtype)
        replace_module(model, name, layer)
    quantize_planned_experts(model, expert_plan, group_size, method, scale_dtype=scale_dtype,
                             pad=pad, store=store)
    _log_summary(model, before)
    return model


def _linear_census(model: nn.Module) -> Tuple[int, int]:
    """(parameters in linear-like layers and routed experts, their float bytes) before
    quantization."""
    from .moe import expert_census
    groups = expert_census(model)
    params = sum(n for _, n, _, _ in groups)
    nbytes = sum(n * 4 if q else b for _, n, b, q in groups)
    for m in quantizable_layers(model, include_head=True).values():
        if isinstance(m, QRALinear):
            params += m.in_features * m.out_features
            nbytes += m.in_features * m.out_features * 4
        else:
            params += m.weight.numel()
            nbytes += m.weight.numel() * m.weight.element_size()
    return params, nbytes


def _log_summary(model: nn.Module, before: Tuple[int, int]) -> None:
    from .moe import expert_census
    total = quantized = packed = 0
    floats = []
    groups = expert_census(model)
    for name, n, nbytes, is_packed in groups:  # routed experts count as weights too
        total += n
        if is_packed:
            quantized += n
            packed += nbytes
        else:
            floats.append((n, name))
    for name, m in quantizable_layers(model, include_head=True).items():
        n = m.in_features * m.out_features if isinstance(m, QRALinear) else m.weight.numel()
        total += n
        if isinstance(m, QRALinear):
            quantized += n
            packed += m.memory_bytes()
        else:
            floats.append((n, name))
    share = quantized / total if total else 0.0
    n_groups = sum(1 for g in groups if g[3])
    logger.info("qra: %d layers quantized%s, %.1f%% of the model's %.1fM linear%s weights, "
                "%.2f MiB packed with adapters (they were %.2f MiB)",
                len(qra_layers(model)),
                f" and {n_groups} expert groups" if n_groups else "",
                100 * share, total / 1e6, " and expert" if groups else "", packed / 2**20,
                before[1] * share / 2**20 if total else 0.0)
    if share < 0.8:
        big = ", ".join(n for _, n in sorted(floats, reverse=True)[:3])
        logger.warning("qra: %.0f%% of the model's linear%s weights stay float (largest: %s)",
                       100 * (1 - share), " and expert" if groups else "", big)


def qra_layers(model: nn.Module) -> Dict[str, QRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QRALinear)}
