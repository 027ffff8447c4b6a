"""Lossless export of a qra model to the GPTQ checkpoint layout (GPTQModel's ``gptq_v2``).

What a GPTQ checkpoint stores for a linear layer ``W [N, K]`` (out, in) with ``b`` bits and
groups of ``g`` input columns (GPTQModel's ``PackableQuantLinear``, vLLM's
``GPTQLinearMethod``):

* ``qweight`` int32 ``[K·b/32, N]`` — for each output column ``n`` the codes ``q[n, 0..K)``
  form a little-endian bit stream, code ``k`` in bits ``[k·b, (k+1)·b)``, cut into 32-bit
  words along ``K``. For 2/4/8 bits that is ``32/b`` whole codes per word; for 3 bits it is
  GPTQ's own packing where 32 codes fill 3 words and codes 10 and 21 straddle a word boundary.
* ``qzeros`` int32 ``[K/g, N·b/32]`` — the zero points, the same bit stream along ``N``.
* ``scales`` fp16 ``[K/g, N]``, ``g_idx`` int32 ``[K]`` = ``k // g`` (no act-order).
* dequantization ``W[n, k] = (q[n, k] − z[k//g, n]) · scales[k//g, n]`` where ``z`` is the
  stored zero in ``checkpoint_format: "gptq_v2"`` and the stored value + 1 in ``"gptq"``
  (v1, the original AutoGPTQ layout).

qra stores the same ``(q, s, z)`` triple (docs/FORMAT.md), so the repacking is exact when
three conditions hold, checked per layer:

1. **The zero is an integer the layout can hold.** v2 holds ``z ∈ [0, 2^b − 1]``; v1 holds
   ``z ∈ [1, 2^b − 1]`` (a stored ``z − 1 = −1`` wraps to ``2^b − 1``, and GPTQModel's v1→v2
   conversion adds 1 with a carry into the neighbouring field). qra's ``rtn`` zeros are
   integers in ``[0, 2^b − 1]`` and include 0, so v2 is the default. ``hqq`` moves zeros off
   the integers and GPTQ has no per-group offset that could carry the fraction. The only
   exact route is outside the base: ``(q − z)·s = (q − ẑ)·s + (ẑ − z)·s`` with ``ẑ`` the
   nearest storable integer, and the second term is constant over each group, i.e. the
   rank-``K/g`` matrix ``B·A`` with ``A[j, k] = [k // g = j]`` and ``B[n, j] = (ẑ − z)·s`` —
   exact in fp32 (a difference of two fp16 values times an fp16 value fits 24 bits).
   ``fractional_zeros="fold"`` writes it into the exported PEFT adapter (only the groups
   that need it); the default ``"refuse"`` raises, naming the layers.
2. **The scale is exactly an fp16 number.** GPTQ scales are fp16; a bf16 scale converts
   exactly unless it is below fp16's subnormal resolution (2^-24) at its 8 significant bits
   or above 65504. Checked value by value; such a layer is refused.
3. **The shapes pack into whole words**: ``K % g == 0`` (GPTQ has no padded groups) and
   ``N·b % 32 == 0`` (``qzeros`` packs along ``N``).

Per-module bits and group size go into ``quantize_config.json``'s ``dynamic``: the most
common ``(bits, group_size)`` is the default and every other layer gets an exact-name
override ``"+:^name$"``; linear layers inside the blocks that qra left in floating point get
``"-:^name$"``. vLLM and SGLang match these patterns against *their* layer names, in which
``q/k/v_proj`` are fused into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj``; where
the shards agree, the fused name gets the same override, and where they differ the report
lists the layer (those engines need one precision per fused layer).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..format import QuantizedWeight
from .adapters import AdapterTerm, linear_layers, stack_terms, unwrap

__all__ = ["CHECKPOINT_FORMATS", "FRACTIONAL_ZEROS", "NotExportableError", "pack_stream",
           "unpack_stream", "to_gptq", "quantize_config", "export_gptq", "write_peft_adapter"]

CHECKPOINT_FORMATS = ("gptq_v2", "gptq")
FRACTIONAL_ZEROS = ("refuse", "fold")

# vLLM's and SGLang's fused linear layers of the Llama/Mistral/Qwen families
# (``packed_modules_mapping``): the dynamic patterns must name these too.
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                "gate_up_proj": ("gate_proj", "up_proj")}


class NotExportableError(ValueError):
    """A layer (or model) that the format cannot hold exactly."""


# --- the bit stream -------------------------------------------------------------------------
def pack_stream(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along ``dim`` (0 or 1) into int32 words.

    Code ``i`` along ``dim`` occupies bits ``[i·bits, (i+1)·bits)`` of a little-endian bit
    stream cut into 32-bit words — GPTQ's layout for every bit-width (for 3 bits, 32 codes
    fill 3 words). The length along ``dim`` times ``bits`` must be a multiple of 32.
    """
    if codes.dim() != 2 or dim not in (0, 1):
        raise ValueError(f"codes must be 2-d and dim 0 or 1, got {tuple(codes.shape)}, dim={dim}")
    c = codes.to(torch.int64)
    if dim == 1:
        c = c.t()
    length, width = c.shape
    if (length * bits) % 32:
        raise ValueError(f"codes: {length} codes of {bits} bits do not fill whole 32-bit words")
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    shifts = torch.arange(bits, dtype=torch.int64, device=c.device)
    stream = ((c.unsqueeze(1) >> shifts.view(1, bits, 1)) & 1).reshape(length * bits, width)
    weights = (torch.ones(32, dtype=torch.int64, device=c.device)
               << torch.arange(32, dtype=torch.int64, device=c.device))
    words = (stream.view(length * bits // 32, 32, width) * weights.view(1, 32, 1)).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return (words if dim == 0 else words.t()).contiguous()


def unpack_stream(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_stream`: int32 words → int64 codes along ``dim``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 1:
        w = w.t()
    rows, width = w.shape
    bit_index = torch.arange(32, dtype=torch.int64, device=w.device)
    stream = ((w.unsqueeze(1) >> bit_index.view(1, 32, 1)) & 1).reshape(rows * 32, width)
    n = rows * 32 // bits
    place = (torch.ones(bits, dtype=torch.int64, device=w.device)
             << torch.arange(bits, dtype=torch.int64, device=w.device))
    codes = (stream[:n * bits].view(n, bits, width) * place.view(1, bits, 1)).sum(dim=1)
    return codes if dim == 0 else codes.t().contiguous()


# --- one layer ------------------------------------------------------------------------------
def _fp16_scales(name: str, scales: torch.Tensor) -> torch.Tensor:
    s16 = scales.to(torch.float16)
    exact = torch.isfinite(s16) & (s16.to(torch.float32) == scales.to(torch.float32))
    if not bool(exact.all()):
        bad = int((~exact).sum())
        raise NotExportableError(
            f"{name}: {bad} of {exact.numel()} {str(scales.dtype).removeprefix('torch.')} scales "
            "are not exactly fp16 numbers (GPTQ stores fp16 scales); quantize with "
            "scale_dtype=float16")
    return s16


def to_gptq(qw: QuantizedWeight, name: str = "layer", checkpoint_format: str = "gptq_v2",
            fractional_zeros: str = "refuse"
            ) -> Tuple[Dict[str, torch.Tensor], Optional[AdapterTerm]]:
    """GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) of one packed weight.

    Returns the tensors and, with ``fractional_zeros="fold"``, the rank-(groups) term that
    carries the zero points' remainder (None when every zero was storable). Raises
    :class:`NotExportableError` naming ``name`` for what cannot be stored exactly.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, "
                         f"got {checkpoint_format!r}")
    if fractional_zeros not in FRACTIONAL_ZEROS:
        raise ValueError(f"fractional_zeros must be one of {FRACTIONAL_ZEROS}, "
                         f"got {fractional_zeros!r}")
    n, k = qw.shape
    b, g = qw.bits, qw.group_size
    if k % g:
        raise NotExportableError(f"{name}: in_features={k} is padded to a multiple of "
                                 f"group_size={g}; GPTQ has no padded groups")
    if (n * b) % 32:
        raise NotExportableError(f"{name}: out_features={n} at {b} bits does not fill whole "
                                 "32-bit words of qzeros (GPTQ needs out_features·bits % 32 == 0)")
    scales = _fp16_scales(name, qw.scales)
    z = qw.zeros.to(torch.float32)
    low = 0.0 if checkpoint_format == "gptq_v2" else 1.0
    z_int = torch.round(z).clamp(low, float((1 << b) - 1))
    off = z_int != z
    remainder = None
    if bool(off.any()):
        if fractional_zeros == "refuse":
            frac = int((torch.round(z) != z).sum())
            reason = (f"{frac} non-integer zero points" if frac else
                      f"{int(off.sum())} zero points outside [{int(low)}, {(1 << b) - 1}]")
            raise NotExportableError(
                f"{name}: {reason} of {off.numel()} groups; the {checkpoint_format} layout "
                "stores integer zeros only (quantize with method='rtn', or pass "
                "fractional_zeros='fold' to carry the remainder in the adapter)")
        # (q - z)·s = (q - ẑ)·s + (ẑ - z)·s; the second term is constant per group.
        groups = off.any(dim=1).nonzero().flatten()  # groups needing a correction
        A = torch.zeros(len(groups), k, dtype=torch.float32, device=z.device)
        for row, j in enumerate(groups.tolist()):
            A[row, j * g:(j + 1) * g] = 1.0
        B = ((z_int - z) * qw.scales.to(torch.float32))[groups].t().contiguous()
        remainder = AdapterTerm(A, B, 1.0, "zero-point remainder")
    stored = z_int - (0 if checkpoint_format == "gptq_v2" else 1)
    codes = qw.codes()[:, :k]  # [N, K]
    tensors = {
        "qweight": pack_stream(codes.t(), b, dim=0),              # [K·b/32, N]
        "qzeros": pack_stream(stored.to(torch.int64), b, dim=1),  # [K/g, N·b/32]
        "scales": scales.contiguous(),                             # [K/g, N]
        "g_idx": (torch.arange(k, dtype=torch.int32) // g).to(qw.device),
    }
    return tensors, remainder


# --- the config -----------------------------------------------------------------------------
def _exact(name: str) -> str:
    return "^" + re.escape(name) + "$"


def quantize_config(specs: Dict[str, Tuple[int, int]], float_layers: Iterable[str],
                    checkpoint_format: str = "gptq_v2", meta: Optional[dict] = None
                    ) -> Tuple[Dict[str, Any], List[str]]:
    """GPTQModel's ``quantize_config.json`` for layers ``{name: (bits, group_size)}``.

    Returns the config and the fused layers vLLM/SGLang cannot serve (differing shards).
    """
    if not specs:
        raise NotExportableError("model has no quantized layer to export")
    (bits, group_size), _ = Counter(specs.values()).most_common(1)[0]
    float_layers = sorted(set(float_layers))
    dynamic: Dict[str, Dict[str, int]] = {}
    for name in float_layers:
        dynamic["-:" + _exact(name)] = {}
    for name, (b, g) in specs.items():
        if (b, g) != (bits, group_size):
            dynamic["+:" + _exact(name)] = {"bits": b, "group_size": g}
    # The fused names vLLM/SGLang match against.
    mismatched = []
    parents = sorted({n.rpartition(".")[0] for n in list(specs) + float_layers})
    for parent in parents:
        for fused, shards in FUSED_SHARDS.items():
            names = [f"{parent}.{s}" if parent else s for s in shards]
            present = [x for x in names if x in specs or x in float_layers]
            if not present:
                continue
            kinds = {("float",) if x in float_layers else specs[x] for x in present}
            fused_name = f"{parent}.{fused}" if parent else fused
            if len(present) != len(names) or len(kinds) != 1:
                mismatched.append(fused_name)
                continue
            kind = kinds.pop()
            if kind == ("float",):
                dynamic["-:" + _exact(fused_name)] = {}
            elif kind != (bits, group_size):
                dynamic["+:" + _exact(fused_name)] = {"bits": kind[0], "group_size": kind[1]}
    cfg = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": False,
        "lm_head": False,
        "quant_method": "gptq",
        "method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": dict(meta or {}),
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg, mismatched


# --- the adapter ----------------------------------------------------------------------------
def write_peft_adapter(layers: Dict[str, Tuple[torch.Tensor, torch.Tensor]], out_dir: str,
                       base_model_name_or_path: Optional[str] = None,
                       task_type: Optional[str] = "CAUSAL_LM") -> Dict[str, int]:
    """A standard PEFT LoRA directory for ``{module name: (A [r, in], B [out, r])}``.

    Every scaling is already folded into ``B``, so each module gets ``lora_alpha = r``
    (scaling 1) through ``rank_pattern``/``alpha_pattern``; the global ``r`` and
    ``lora_alpha`` are equal too, so a loader that ignores the patterns and applies one
    ``lora_alpha / r`` to all modules (vLLM's ``PEFTHelper``) still scales by 1. Returns the
    ranks.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not layers:
        raise ValueError("layers: no adapter to write")
    ranks = {n: int(A.shape[0]) for n, (A, _) in layers.items()}
    r, _ = Counter(ranks.values()).most_common(1)[0]
    others = {n: v for n, v in ranks.items() if v != r}
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks),
                        rank_pattern=dict(others), alpha_pattern=dict(others),
                        lora_dropout=0.0, bias="none", task_type=task_type,
                        base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = {}
    for name, (A, B) in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().contiguous().cpu()
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return ranks


# --- the model ------------------------------------------------------------------------------
def _float_state(root: nn.Module, skip: Iterable[str], dtype: torch.dtype
                 ) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers outside the exported layers, PEFT wrappers removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    skip = tuple(s + "." for s in skip)
    out: Dict[str, torch.Tensor] = {}
    seen: Dict[int, str] = {}
    tuner_prefixes: List[str] = []
    for mname, m in root.named_modules():
        if isinstance(m, BaseTunerLayer):
            tuner_prefixes.append(mname + ".")
        tensors = list(m._parameters.items()) + [
            (k, v) for k, v in m._buffers.items() if k not in m._non_persistent_buffers_set]
        for pname, t in tensors:
            if t is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            inside_tuner = next((p for p in tuner_prefixes if full.startswith(p)), None)
            if inside_tuner is not None:
                rest = full[len(inside_tuner):]
                if not rest.startswith("base_layer."):
                    continue  # the adapters' own tensors (lora_A, lora_B, ...)
                full = inside_tuner + rest[len("base_layer."):]
            if full.startswith(skip):
                continue
            # Tied weights (embeddings = output head) share storage: store the first name.
            key = t.data_ptr() if t.numel() else id(t)
            if key in seen and t.numel():
                continue
            seen[key] = full
            t = t.detach()
            out[full] = (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu()
    return out


def export_gptq(model: nn.Module, out_dir: str, *, checkpoint_format: str = "gptq_v2",
                fractional_zeros: str = "refuse", dtype: torch.dtype = torch.float16,
                adapter_dir: Optional[str] = "adapter", tokenizer=None) -> Dict[str, Any]:
    """Write ``model`` (qra layers, optionally under PEFT adapters) as a GPTQ checkpoint.

    ``out_dir`` gets ``model.safetensors``, ``config.json`` (with ``quantization_config``),
    ``quantize_config.json``, the tokenizer if given, and ``qra_export.json`` (this report).
    The adapters of every layer (qra slot, PEFT's active adapters, zero-point remainders
    with ``fractional_zeros="fold"``) go to ``adapter_dir`` (relative to ``out_dir`` unless
    absolute; ``None`` refuses a model that has adapters rather than dropping them).
    Unquantized tensors and biases are written in ``dtype`` (fp16 by default: GPTQ
    kernels compute in fp16; the packed weights are bit-exact whatever it is).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, "
                         f"got {checkpoint_format!r}")
    if fractional_zeros not in FRACTIONAL_ZEROS:
        raise ValueError(f"fractional_zeros must be one of {FRACTIONAL_ZEROS}, "
                         f"got {fractional_zeros!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    root = unwrap(model)
    config = getattr(root, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("model must be a transformers model (it needs a config for config.json)")
    layers = linear_layers(model)
    quantized = {n: l for n, l in layers.items() if l.quantized}
    if not quantized:
        raise NotExportableError("model has no QRALinear layer to export")
    if any(n == "lm_head" or n.endswith(".lm_head") for n in quantized):
        raise NotExportableError("lm_head: a quantized output head is not exported by this "
                                 "exporter (keep it in modules_to_not_convert)")

    # Convert every layer first, so all refusals are reported at once.
    gptq: Dict[str, Dict[str, torch.Tensor]] = {}
    errors: List[str] = []
    remainders: Dict[str, int] = {}
    for name, layer in quantized.items():
        try:
            tensors, rem = to_gptq(layer.module.quantized_weight, name, checkpoint_format,
                                   fractional_zeros)
        except NotExportableError as e:
            errors.append(str(e))
            continue
        if layer.module.bias is not None:
            tensors["bias"] = layer.module.bias.detach().to(torch.float16)
        gptq[name] = tensors
        if rem is not None:
            layer.terms.append(rem)
            remainders[name] = rem.rank
    if errors:
        more = f" (and {len(errors) - 1} more layers)" if len(errors) > 1 else ""
        raise NotExportableError(errors[0] + more)

    adapters = {n: s for n, l in layers.items() if (s := stack_terms(l.terms)) is not None}
    if adapters and adapter_dir is None:
        raise ValueError(f"adapter_dir=None, but {len(adapters)} layers carry adapters "
                         f"(e.g. {next(iter(adapters))!r}); they would be lost")

    # In-block float linears must be listed, or GPTQ loaders would build them quantized.
    in_blocks = re.compile(r"(^|\.)(layers|h|blocks)\.\d+\.")
    float_layers = [n for n, l in layers.items() if not l.quantized and in_blocks.search(n)]
    specs = {n: (l.module.bits, l.module.group_size) for n, l in quantized.items()}
    from .. import __version__
    qcfg, mismatched = quantize_config(
        specs, float_layers, checkpoint_format,
        meta={"quantizer": [f"qra:{__version__}"], "uri": "qra_kernels.exporters.gptq"})

    state = _float_state(root, skip=list(quantized), dtype=dtype)
    for name, tensors in gptq.items():
        for k, t in tensors.items():
            state[f"{name}.{k}"] = t.contiguous().cpu()

    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "quantize_config.json"), "w") as f:
        json.dump(qcfg, f, indent=2)
    gen = getattr(root, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)

    report: Dict[str, Any] = {
        "format": "gptq", "checkpoint_format": checkpoint_format,
        "layers": {n: {"bits": b, "group_size": g} for n, (b, g) in specs.items()},
        "float_layers": sorted(n for n, l in layers.items() if not l.quantized),
        "default": {"bits": qcfg["bits"], "group_size": qcfg["group_size"]},
        "vllm_fused_mismatch": mismatched,
        "zero_point_remainder_ranks": remainders,
        "adapter": None,
    }
    if adapters:
        path = adapter_dir if os.path.isabs(adapter_dir) else os.path.join(out_dir, adapter_dir)
        ranks = write_peft_adapter(adapters, path, base_model_name_or_path=os.path.abspath(out_dir))
        report["adapter"] = {"dir": path, "ranks": ranks,
                             "sources": {n: [t.source for t in layers[n].terms] for n in adapters}}
    with open(os.path.join(out_dir, "qra_export.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    return report
