"""Routed MoE experts, quantized per expert: ``QuantizedExperts``, ``QRAExperts`` and the
model-level helpers :func:`qra_kernels.quantize_model` dispatches experts to.

transformers 5 stores the routed experts of Mixtral, Qwen2/3-MoE, DeepSeek, OLMoE, GPT-OSS,
... not as ``nn.Linear`` modules but as 3-D parameters of one experts module
(``mlp.experts.gate_up_proj [E, 2·I, H]``, ``mlp.experts.down_proj [E, H, I]``), whose class is
decorated with ``use_experts_implementation``: the decorator records the layout
(``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``,
``has_post_expert_norm``) and every experts implementation transformers ships
(``eager``, ``batched_mm``, ``grouped_mm``) computes the same thing from it::

    for each (token, slot) routed to expert e with weight w:
        h = x · W_gate_up[e]ᵀ (+ b[e]);  h = _apply_gate(h)  (or act_fn(h) without a gate)
        y = h · W_down[e]ᵀ (+ b[e]);     (post_expert_norm(y))
        out[token] += w · y

:class:`QRAExperts` replaces such a module (the MoE block, its router and shared experts are
untouched and keep calling ``self.experts(hidden_states, top_k_index, top_k_weights)``). It
stores each projection's E matrices in the packed format of one linear layer, stacked
(:func:`qra_kernels.format.expert_code_rows`, bits may differ per expert), and runs each
projection as one call of the grouped op ``qra::grouped_linear`` on the tokens sorted by
expert. The gate function is the source class's own ``_apply_gate`` (so GPT-OSS's clamped
SwiGLU stays GPT-OSS's).

In an :class:`~qra_kernels.Allocation`, ``quantize_model`` and ``QraConfig.layer_bits`` a
projection is named like the float parameter it replaces (``model.layers.0.mlp.experts.gate_up_proj``,
shape ``[E, out, in]``); naming the experts module (``model.layers.0.mlp.experts``) means all
its projections. An experts module is quantized whole. LoRA on experts is not supported yet
(rank must be 0): PEFT's ``target_parameters`` adds ``B·A`` to a float 3-D parameter, which a
packed module does not have (see docs/INTEGRATIONS.md, "Models").
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .format import (SCALE_DTYPES, QuantizedWeight, check_bits, check_group_size,
                     expert_code_rows, experts_packed_nbytes, padded_in_features)
from .modules import apply_keeping_packed
from .ops import grouped_linear_packed
from .quantizers import quantize_weight
from .validate import ACTIVATION_DTYPES, check_float

__all__ = ["QuantizedExperts", "quantize_experts", "grouped_linear", "QRAExperts",
           "is_experts", "quantizable_experts", "qra_experts", "expert_shapes",
           "expert_layer", "expert_census"]

logger = logging.getLogger("qra_kernels")

# The projections an experts module may hold, in the order they run.
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
EXPERT_QUANTIZERS = ("rtn", "hqq")  # what experts can be quantized with (no calibration per expert)

Bits = Union[int, Sequence[int]]


def _bits_list(bits: Bits, n_experts: int, name: str) -> List[int]:
    """``bits`` (one int for every expert, or one per expert) as a checked list."""
    if isinstance(bits, (list, tuple)):
        if len(bits) != n_experts:
            raise ValueError(f"{name} must have one entry per expert ({n_experts}), got "
                             f"{len(bits)}")
        return [check_bits(b, f"{name}[{e}]") for e, b in enumerate(bits)]
    return [check_bits(bits, name)] * n_experts


def _compact(bits: Sequence[int]) -> Bits:
    """One int when every expert has the same bits (how configs and metadata store it)."""
    return bits[0] if len(set(bits)) == 1 else list(bits)


# --- one projection's experts, packed ----------------------------------------------------------
class QuantizedExperts:
    """E packed ``[N, K]`` matrices of one projection: ``qweight [Σₑ Kp·bitsₑ/32, N]``
    (int32, each expert's codes as :class:`~qra_kernels.QuantizedWeight` stores them,
    stacked), ``scales``/``zeros [E, Kp/g, N]``, ``bits`` (one per expert), ``shape = (E, N, K)``.
    """

    __slots__ = ("qweight", "scales", "zeros", "bits", "group_size", "shape")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: Sequence[int], group_size: int, shape):
        check_group_size(group_size)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (experts, out_features, in_features) >= 1, got "
                             f"{shape}")
        e, n, k = shape
        bits = _bits_list(list(bits), e, "bits")
        kp = padded_in_features(k, group_size)
        rows = expert_code_rows(bits, kp)[-1][1]
        if qweight.dtype != torch.int32 or tuple(qweight.shape) != (rows, n):
            raise ValueError(f"qweight must be int32 of shape {(rows, n)}, got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t.dtype not in SCALE_DTYPES:
                raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")
            if tuple(t.shape) != (e, kp // group_size, n):
                raise ValueError(f"{name} must have shape {(e, kp // group_size, n)}, got "
                                 f"{tuple(t.shape)}")
        if scales.dtype != zeros.dtype:
            raise TypeError(f"scales and zeros must share a dtype, got {scales.dtype}, "
                            f"{zeros.dtype}")
        self.qweight, self.scales, self.zeros = qweight, scales, zeros
        self.bits, self.group_size, self.shape = tuple(bits), group_size, shape

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def expert(self, e: int) -> QuantizedWeight:
        """Expert ``e``'s matrix (views of the stacked tensors, no copy)."""
        kp = padded_in_features(self.shape[2], self.group_size)
        r0, r1 = expert_code_rows(self.bits, kp)[e]
        return QuantizedWeight(self.qweight[r0:r1], self.scales[e], self.zeros[e],
                               self.bits[e], self.group_size, self.shape[1:])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[E, N, K]`` weights."""
        return torch.stack([self.expert(e).dequantize(dtype) for e in range(self.shape[0])])

    def __repr__(self) -> str:
        return (f"QuantizedExperts(shape={self.shape}, bits={_compact(self.bits)}, "
                f"group_size={self.group_size}, nbytes={self.nbytes})")


def quantize_experts(weight: torch.Tensor, bits: Bits, group_size: int = 64,
                     method: Union[str, Sequence[str]] = "hqq", *,
                     scale_dtype: torch.dtype = torch.float16, pad: bool = False
                     ) -> QuantizedExperts:
    """Quantize ``weight [E, out_features, in_features]`` expert by expert (each exactly as
    :func:`qra_kernels.quantize_weight` quantizes one matrix); ``bits`` is one int or one
    per expert, ``method`` (``"rtn"`` or ``"hqq"``) one name or one per expert."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 3:
        raise ValueError(f"weight must be 3-d [experts, out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    n_experts = weight.shape[0]
    per_expert = _bits_list(bits, n_experts, "bits")
    methods = [method] * n_experts if isinstance(method, str) else list(method)
    if len(methods) != n_experts or any(m not in EXPERT_QUANTIZERS for m in methods):
        raise ValueError(f"method must be one of {EXPERT_QUANTIZERS} (or one per expert) for "
                         f"experts, got {method!r}")
    qws = [quantize_weight(weight[e], b, group_size, m, scale_dtype=scale_dtype, pad=pad)
           for e, (b, m) in enumerate(zip(per_expert, methods))]
    return QuantizedExperts(torch.cat([q.qweight for q in qws]).contiguous(),
                            torch.stack([q.scales for q in qws]),
                            torch.stack([q.zeros for q in qws]), per_expert, group_size,
                            tuple(weight.shape))


def _expert_methods(bits: Sequence[int], method: str, where: str) -> List[str]:
    """The quantizer of each expert for ``method`` (``"recommended"`` per bit-width)."""
    from .quantizers import method_for_bits
    methods = [method_for_bits(b, method) for b in bits]
    if any(m not in EXPERT_QUANTIZERS for m in methods):
        # GPTQ needs each expert's Hessian from the tokens routed to it: not measured yet.
        logger.warning("qra: %s quantized with 'hqq': method %r does not handle routed "
                       "experts yet", where, method)
        methods = [m if m in EXPERT_QUANTIZERS else "hqq" for m in methods]
    return methods


def grouped_linear(x: torch.Tensor, tokens_per_expert: torch.Tensor,
                   experts: QuantizedExperts) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] · dequant(W_e)ᵀ`` for rows of ``x [S, K]`` sorted by
    expert, ``tokens_per_expert[e]`` (int, ``[E]``, summing to S) of them for expert ``e``.
    Differentiable in ``x``; the result has x's dtype."""
    if not isinstance(experts, QuantizedExperts):
        raise TypeError(f"experts must be a QuantizedExperts, got {type(experts).__name__}")
    e, n, k = experts.shape
    check_float("x", x)
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must have shape [rows, {k}], got {tuple(x.shape)}")
    if x.device != experts.device:
        raise ValueError(f"x is on {x.device} but the experts are on {experts.device}")
    if not isinstance(tokens_per_expert, torch.Tensor) or tokens_per_expert.dtype not in (
            torch.int32, torch.int64) or tuple(tokens_per_expert.shape) != (e,):
        raise TypeError(f"tokens_per_expert must be an int32/int64 tensor of shape [{e}]")
    return grouped_linear_packed(x, tokens_per_expert, experts.qweight, experts.scales,
                                 experts.zeros, experts.bits, experts.group_size, n)


# --- transformers' experts modules ---------------------------------------------------------
def is_experts(module: nn.Module) -> bool:
    """A transformers experts module with the interface of ``use_experts_implementation``
    (its layout flags and 3-D projection parameters), float or already packed."""
    if isinstance(module, QRAExperts):
        return True
    if not all(hasattr(module, f) for f in _FLAGS):
        return False
    down = module._parameters.get("down_proj")
    return isinstance(down, torch.Tensor) and down.dim() == 3


def _source_projections(module: nn.Module) -> Dict[str, Tuple[int, int, int]]:
    """``{projection: (E, out_features, in_features)}`` of a float experts module."""
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    out = {}
    for p in names:
        w = module._parameters.get(p)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"{type(module).__name__} has no 3-D parameter {p!r}; its layout "
                             "is not the one transformers' experts interface describes")
        e, a, b = w.shape
        out[p] = (e, b, a) if module.is_transposed else (e, a, b)
    return out


def _dense(module: nn.Module, proj: str) -> torch.Tensor:
    """The ``[E, out, in]`` float weight of a projection of a float experts module."""
    w = module._parameters[proj].detach()
    return w.transpose(1, 2) if module.is_transposed else w


def _check_source(module: nn.Module, name: str = "experts") -> Dict[str, Tuple[int, int, int]]:
    if not is_experts(module) or isinstance(module, QRAExperts):
        raise TypeError(f"{name} must be a transformers experts module (a class decorated with "
                        f"use_experts_implementation), got {type(module).__name__}")
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(f"{name}: expert-parallel experts modules cannot be quantized")
    shapes = _source_projections(module)
    known = set(shapes) | ({f"{p}_bias" for p in shapes} if module.has_bias else set())
    for pname, p in module._parameters.items():
        if p is not None and pname not in known:
            raise ValueError(f"{name} ({type(module).__name__}) holds parameter {pname!r}, which "
                             "the experts interface does not describe; it cannot be quantized")
    sizes = {s[0] for s in shapes.values()}
    if len(sizes) != 1:
        raise ValueError(f"{name}: projections disagree on the number of experts: {shapes}")
    return shapes


class QRAExperts(nn.Module):
    """A transformers experts module with every projection's E matrices stored packed (see
    the module docstring), run by the grouped op ``qra::grouped_linear``.

    Built from the float module it replaces (:meth:`from_experts`), or empty for loading a
    packed checkpoint (``QRAExperts(source, bits, group_size, device="meta")``). Per
    projection ``p`` it holds ``{p}_qweight``, ``{p}_scales``, ``{p}_zeros`` (frozen; those
    names keep transformers' checkpoint conversions, which rename ``experts.gate_up_proj``
    itself, away from them) and ``{p}_bias`` if the source had biases. It keeps the source's
    layout flags, activation and plain attributes, and calls the source class's
    ``_apply_gate``. ``module.to(dtype)`` never changes the stored scales and zeros.
    ``experts.gate_up_proj`` (etc.) is a value-less stand-in with the source's shape and the
    compute dtype, as ``QRALinear.weight`` is; :meth:`dequantize` gives the weights.
    """

    def __init__(self, source: nn.Module, bits: Mapping[str, Bits], group_size: int = 64, *,
                 scale_dtype: torch.dtype = torch.float16, device=None,
                 dtype: Optional[torch.dtype] = None):
        shapes = _check_source(source, "source")
        check_group_size(group_size)
        if scale_dtype not in SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
        if not isinstance(bits, Mapping) or set(bits) != set(shapes):
            raise ValueError(f"bits must map each projection {sorted(shapes)} to its bits, got "
                             f"{bits!r}")
        super().__init__()
        # The source's plain attributes (num_experts, config, GPT-OSS's alpha and limit, ...)
        # and children (act_fn, post_expert_norm): its _apply_gate reads them from self.
        for key, value in vars(source).items():
            if not key.startswith("_") and key != "training" and not isinstance(
                    value, (torch.Tensor, nn.Module)):
                setattr(self, key, value)
        for key, child in source.named_children():
            self.add_module(key, child)
        self.source_class = type(source)
        self.has_post_expert_norm = bool(getattr(source, "has_post_expert_norm", False))
        self.group_size = group_size
        self.num_experts = next(iter(shapes.values()))[0]
        self.projections = dict(shapes)
        self.bits = {p: _bits_list(bits[p], self.num_experts, f"bits[{p!r}]") for p in shapes}
        if dtype is None:
            w = source._parameters["down_proj"]
            dtype = w.dtype if w.dtype in ACTIVATION_DTYPES else torch.get_default_dtype()
        self.compute_dtype = dtype
        frozen = dict(requires_grad=False)
        for p, (e, n, k) in shapes.items():
            kp = padded_in_features(k, group_size)
            rows = expert_code_rows(self.bits[p], kp)[-1][1]
            self.register_parameter(f"{p}_qweight", nn.Parameter(
                torch.zeros(rows, n, dtype=torch.int32, device=device), **frozen))
            self.register_parameter(f"{p}_scales", nn.Parameter(
                torch.ones(e, kp // group_size, n, dtype=scale_dtype, device=device), **frozen))
            self.register_parameter(f"{p}_zeros", nn.Parameter(
                torch.zeros(e, kp // group_size, n, dtype=scale_dtype, device=device), **frozen))
            if self.has_bias:
                b = source._parameters[f"{p}_bias"]
                self.register_parameter(f"{p}_bias", nn.Parameter(
                    torch.zeros(e, n, dtype=b.dtype, device=device), requires_grad=b.requires_grad))

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_experts(cls, source: nn.Module, bits: Union[Bits, Mapping[str, Bits]],
                     group_size: int = 64, method: str = "hqq", *,
                     scale_dtype: torch.dtype = torch.float16, pad: bool = False,
                     name: str = "experts",
                     quantized: Optional[Mapping[str, QuantizedExperts]] = None
                     ) -> "QRAExperts":
        """Quantize a float experts module (on its own device), expert by expert. ``bits``:
        one int, one per expert, or ``{projection: either}``; ``method``: ``"rtn"``,
        ``"hqq"`` or ``"recommended"`` (per bit-width). ``quantized``: projections already
        quantized (e.g. the search's store entries), installed as they are."""
        shapes = _check_source(source, name)
        if not isinstance(bits, Mapping):
            bits = {p: bits for p in shapes}
        layer = cls(source, bits, group_size, scale_dtype=scale_dtype, device="meta")
        quantized = dict(quantized or {})
        for p in shapes:
            if p in quantized:
                layer.set_quantized(p, quantized[p])
            else:
                w = _dense(source, p)
                if not bool(torch.isfinite(w).all()):
                    raise ValueError(f"the weights of {name}.{p} contain NaN or Inf")
                methods = _expert_methods(layer.bits[p], method, f"{name}.{p}")
                layer.set_quantized(p, quantize_experts(w, layer.bits[p], group_size, methods,
                                                        scale_dtype=scale_dtype, pad=pad))
            if layer.has_bias:
                b = source._parameters[f"{p}_bias"]
                setattr(layer, f"{p}_bias", nn.Parameter(b.detach().clone(),
                                                         requires_grad=b.requires_grad))
        return layer

    def set_quantized(self, proj: str, qe: QuantizedExperts) -> None:
        """Install packed weights for projection ``proj`` (shape, bits, group size must match)."""
        if proj not in self.projections:
            raise ValueError(f"{proj!r} is not a projection of this module "
                             f"({sorted(self.projections)})")
        if tuple(qe.shape) != tuple(self.projections[proj]) or list(qe.bits) != self.bits[proj] \
                or qe.group_size != self.group_size:
            raise ValueError(f"{proj}: expected shape {self.projections[proj]}, bits "
                             f"{_compact(self.bits[proj])}, group_size {self.group_size}; got "
                             f"{qe!r}")
        for suffix, t in (("qweight", qe.qweight), ("scales", qe.scales), ("zeros", qe.zeros)):
            setattr(self, f"{proj}_{suffix}", nn.Parameter(t, requires_grad=False))

    # --- what it stores ----------------------------------------------------------------
    def quantized(self, proj: str) -> QuantizedExperts:
        return QuantizedExperts(getattr(self, f"{proj}_qweight").data,
                                getattr(self, f"{proj}_scales").data,
                                getattr(self, f"{proj}_zeros").data, self.bits[proj],
                                self.group_size, self.projections[proj])

    def __getattr__(self, name: str):
        projections = self.__dict__.get("projections")
        if projections is not None and name in projections:
            # The value-less stand-in for the float parameter (class docstring).
            e, n, k = projections[name]
            shape = (e, k, n) if self.is_transposed else (e, n, k)
            device = self._parameters[f"{name}_qweight"].device
            return torch.empty((), dtype=self.compute_dtype, device=device).expand(*shape)
        return super().__getattr__(name)

    def memory_bytes(self) -> int:
        """Bytes of the packed tensors (codes, scales, zeros) of every projection, as stored."""
        return sum(self.quantized(p).nbytes for p in self.projections)

    def expected_memory_bytes(self) -> int:
        """The same figure from the formulas (docs/FORMAT.md) — equal by construction."""
        sb = self._parameters[f"{next(iter(self.projections))}_scales"].element_size()
        return sum(experts_packed_nbytes(n, k, self.bits[p], self.group_size, sb)
                   for p, (_, n, k) in self.projections.items())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The float experts module (the source class, weights dequantized, in ``dtype``)."""
        with torch.device("meta"):
            dense = self.source_class(self.config)
        dev = self._parameters["down_proj_qweight"].device
        dense = dense.to_empty(device=dev)
        with torch.no_grad():
            for p in self.projections:
                w = self.quantized(p).dequantize(torch.float32)
                w = w.transpose(1, 2) if self.is_transposed else w
                setattr(dense, p, nn.Parameter(w.to(dtype).contiguous()))
                if self.has_bias:
                    setattr(dense, f"{p}_bias",
                            nn.Parameter(getattr(self, f"{p}_bias").detach().to(dtype).clone()))
            for key, child in self.named_children():
                setattr(dense, key, child)
        return dense

    # --- compute -----------------------------------------------------------------------
    def _project(self, proj: str, x: torch.Tensor, counts: torch.Tensor,
                 expert_ids: torch.Tensor) -> torch.Tensor:
        _, n, _ = self.projections[proj]
        y = grouped_linear_packed(x, counts, getattr(self, f"{proj}_qweight"),
                                  getattr(self, f"{proj}_scales"), getattr(self, f"{proj}_zeros"),
                                  self.bits[proj], self.group_size, n)
        if self.has_bias:
            y = y + getattr(self, f"{proj}_bias")[expert_ids].to(y.dtype)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden_states [T, H]``, the router's ``top_k_index``/``top_k_weights [T, k]``
        → ``[T, H]``: the experts interface of transformers."""
        if hidden_states.dim() != 2:
            raise ValueError(f"hidden_states must be [tokens, hidden], got "
                             f"{tuple(hidden_states.shape)}")
        tokens, hidden = hidden_states.shape
        top_k = top_k_index.shape[-1]
        ids = top_k_index.reshape(-1)
        # Sort the (token, slot) pairs by expert: each expert then reads one run of rows.
        ids_sorted, perm = torch.sort(ids, stable=True)
        # A histogram of fixed size [E] (bincount's size depends on the data, which
        # torch.compile cannot trace); ids outside [0, E) fall out of it, hence the check.
        # (Integer input on CUDA, float on CPU: what each supports deterministically.)
        hist_in = ids_sorted.float() if ids.device.type in ("cpu", "mps") else ids_sorted.int()
        counts = torch.histc(hist_in, bins=self.num_experts, min=0,
                             max=self.num_experts - 1).to(torch.int64)
        if not torch.compiler.is_compiling() and int(counts.sum()) != ids.numel():
            raise ValueError(f"top_k_index holds expert ids outside [0, {self.num_experts}) "
                             "(expert-parallel sentinels are not supported)")
        x = hidden_states[perm // top_k]
        first = "gate_up_proj" if self.has_gate else "up_proj"
        h = self._project(first, x, counts, ids_sorted)
        h = self.source_class._apply_gate(self, h) if self.has_gate else self.act_fn(h)
        y = self._project("down_proj", h, counts, ids_sorted)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        # Back to (token, slot) order, then the sum over slots (in y's dtype: fp32 when the
        # routing weights are, as transformers' own implementations accumulate).
        y = torch.zeros_like(y).index_copy(0, perm, y)
        return y.view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)

    def _apply(self, fn, recurse=True):
        return apply_keeping_packed(self, fn, recurse, [
            self._parameters[f"{p}_{s}"] for p in self.projections for s in ("scales", "zeros")])

    def extra_repr(self) -> str:
        parts = ", ".join(f"{p}={list(s)}@{_compact(self.bits[p])}b"
                          for p, s in self.projections.items())
        return (f"{self.source_class.__name__}, experts={self.num_experts}, {parts}, "
                f"group_size={self.group_size}")


# --- model level ---------------------------------------------------------------------------
def quantizable_experts(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every experts module of ``model`` (float or packed)."""
    return {n: m for n, m in model.named_modules() if n and is_experts(m)}


def qra_experts(model: nn.Module) -> Dict[str, QRAExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QRAExperts)}


def _projections_of(module: nn.Module) -> Dict[str, Tuple[int, int, int]]:
    return dict(module.projections) if isinstance(module, QRAExperts) \
        else _source_projections(module)


def expert_shapes(model: nn.Module) -> Dict[str, Tuple[int, int, int]]:
    """``{"<experts module>.<projection>": (E, out_features, in_features)}``: what the
    allocation, the memory accounting and the search see as one layer (an expert group)."""
    return {f"{name}.{p}": s for name, m in quantizable_experts(model).items()
            for p, s in _projections_of(m).items()}


def expert_layer(model: nn.Module, name: str) -> Optional[Tuple[str, nn.Module, List[str]]]:
    """``(experts module name, module, [projections])`` that ``name`` refers to — an experts
    module (all its projections) or one projection of one — else None."""
    modules = dict(model.named_modules())
    m = modules.get(name)
    if m is not None and is_experts(m):
        return name, m, list(_projections_of(m))
    parent, _, proj = name.rpartition(".")
    m = modules.get(parent)
    if m is not None and is_experts(m) and proj in _projections_of(m):
        return parent, m, [proj]
    return None


def plan_experts(model: nn.Module, layers: Mapping[str, Mapping], group_size: int,
                 pad: bool = False) -> Tuple[Dict[str, Mapping], Dict[str, Dict[str, List[int]]]]:
    """Split an allocation's layers into (the linear entries, ``{experts module: {projection:
    bits per expert}}``), checking every expert entry; raises before anything is changed."""
    linear, experts = {}, {}
    for name, spec in layers.items():
        found = expert_layer(model, name)
        if found is None:
            linear[name] = spec
            continue
        module_name, module, projs = found
        if isinstance(module, QRAExperts):
            raise ValueError(f"allocation names {name!r}, which is already quantized")
        if not isinstance(spec, Mapping) or "bits" not in spec:
            raise ValueError(f"allocation entry {name!r} must be a mapping with 'bits'")
        if spec.get("rank", 0):
            raise ValueError(f"allocation entry {name!r}: LoRA on routed experts is not "
                             "supported yet (rank must be 0); adapt the attention and shared "
                             "projections instead")
        shapes = _check_source(module, module_name)
        for p in projs:
            e, _, k = shapes[p]
            if not pad and k % group_size:
                raise ValueError(f"group_size={group_size} does not divide in_features={k} of "
                                 f"{module_name}.{p}; pass pad=True")
            if not bool(torch.isfinite(_dense(module, p)).all()):
                raise ValueError(f"weight of {module_name}.{p} contains NaN or Inf")
            experts.setdefault(module_name, {})[p] = _bits_list(spec["bits"], e,
                                                                f"bits of {name!r}")
    for module_name, projs in experts.items():
        missing = set(_source_projections(dict(model.named_modules())[module_name])) - set(projs)
        if missing:
            raise ValueError(f"allocation quantizes {sorted(projs)} of {module_name!r} but not "
                             f"{sorted(missing)}: an experts module is quantized whole (name "
                             "the module, or every projection)")
    return linear, experts


def quantize_planned_experts(model: nn.Module, plan: Mapping[str, Mapping[str, List[int]]],
                             group_size: int, method: str, *,
                             scale_dtype: torch.dtype = torch.float16, pad: bool = False,
                             store=None) -> None:
    """Replace each experts module of ``plan`` (from :func:`plan_experts`) by a QRAExperts.
    ``store`` (a :data:`qra_kernels.modules.WeightStore`, called with the expert group's
    name, the experts module and the bits) supplies the packed projections whose experts
    all have the same bits."""
    from .modules import replace_module
    modules = dict(model.named_modules())
    for module_name, bits in plan.items():
        given = {}
        if store is not None:
            for p, per_expert in bits.items():
                if len(set(per_expert)) == 1:
                    qe, _ = store(f"{module_name}.{p}", modules[module_name], per_expert[0])
                    if not isinstance(qe, QuantizedExperts):
                        raise TypeError(f"store returned {type(qe).__name__} for expert group "
                                        f"{module_name}.{p}, not QuantizedExperts")
                    given[p] = qe
        layer = QRAExperts.from_experts(modules[module_name], bits, group_size, method,
                                        scale_dtype=scale_dtype, pad=pad, name=module_name,
                                        quantized=given)
        replace_module(model, module_name, layer)


def expert_census(model: nn.Module) -> List[Tuple[str, int, int, bool]]:
    """``[(name, weights, bytes, quantized)]`` for every expert group of ``model`` (bytes as
    stored: packed, or the float parameter's), plus 3-D parameters of modules whose class
    name says "Expert" that no interface describes (they cannot be quantized; listed so the
    summary counts them as float)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QRAExperts):
            for p, (e, n, k) in m.projections.items():
                out.append((f"{name}.{p}", e * n * k, m.quantized(p).nbytes, True))
            continue
        if not name:
            continue
        describes = is_experts(m)
        for pname, t in m._parameters.items():
            if t is None or t.dim() != 3:
                continue
            if describes or "expert" in type(m).__name__.lower():
                out.append((f"{name}.{pname}", t.numel(), t.numel() * t.element_size(), False))
    return out
