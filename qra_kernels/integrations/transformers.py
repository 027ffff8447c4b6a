"""The ``"qra"`` quantization method for transformers: ``QraConfig`` and its quantizer.

Two ways in, one way out:

* **quantize on load** — ``from_pretrained(float_checkpoint, quantization_config=QraConfig(...))``
  loads the float weights as usual, then replaces every ``nn.Linear`` (except
  ``modules_to_not_convert``, the output head by default) by a ``QRALinear`` with the bits
  of ``layer_bits`` (or the default ``bits``). Quantizing after the load keeps the loader
  untouched at the cost of holding the float model once; transformers' per-parameter
  conversion hooks change between releases, a whole-model pass does not.
* **pre-quantized load** — a directory written by ``save_pretrained`` carries
  ``quantization_config`` (``quant_method: "qra"``, every layer's bits) in ``config.json``
  and, in each safetensors file's metadata, ``qra_layers``: every quantized layer's bits,
  group size, shape, adapter rank and alpha. Before the weights load, the listed
  ``nn.Linear`` modules become empty (meta) ``QRALinear`` of that description, so the packed
  tensors load into them as they are — no float weight is ever materialised.
* **save** — ``save_pretrained`` writes the packed tensors (codes as int32, ``scales``,
  ``zeros``) plus that metadata; the file alone describes its layers. The packed codes are
  stored under the layer's ``weight`` key (``QRALinear.qweight`` in memory): a
  transformers that does not know ``"qra"`` (qra_kernels not imported) then meets an int32
  ``weight`` of the wrong shape and raises a size-mismatch error, instead of reporting the
  packed keys as "unexpected" and silently initialising every projection at random.

``model.dequantize()`` turns every ``QRALinear`` back into an ``nn.Linear`` (adapter held in
the layer merged in). ``model.to(dtype)`` leaves the stored scales alone
(``QRALinear._apply``).
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn
from transformers.quantizers import auto as _auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format import FORMAT_VERSION, check_bits, check_group_size
from ..modules import (QRALinear, dense_weight, is_conv1d, qra_layers, quantizable_layers,
                       quantize_model, replace_module)

__all__ = ["QraConfig", "QraHfQuantizer", "register", "METHOD", "layer_metadata",
           "attach_quantizer"]

METHOD = "qra"
METADATA_KEY = "qra_layers"
PACKED_KEY = "weight"  # checkpoint key of QRALinear.qweight (see the module docstring)
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_CONFIG_FIELDS = ("bits", "group_size", "layer_bits", "modules_to_not_convert", "method",
                  "scale_dtype", "pad")
_METHODS = ("hqq", "rtn", "gptq", "recommended")


class QraConfig(QuantizationConfigMixin):
    """Configuration of the ``"qra"`` quantization method.

    Args:
        bits: default bit-width (2, 3, 4 or 8) of every ``nn.Linear`` not named in
            ``layer_bits``; ``None`` quantizes only the layers named in ``layer_bits``.
        group_size: 32, 64 or 128 input features per scale/zero.
        layer_bits: ``{exact module name: bits}`` — e.g. from an allocation
            (:meth:`from_allocation`). Names that are not linear layers of the model raise.
        modules_to_not_convert: module names, or runs of whole dotted components of them
            (``"mlp"``, ``"layers.0"``), left in floating point; ``["lm_head"]`` by default (often tied to the embeddings).
        method: ``"hqq"`` (default), ``"rtn"``, ``"gptq"`` (needs ``calibration``) or
            ``"recommended"`` (the measured best per bit-width), see
            :func:`qra_kernels.quantize_weight`.
        scale_dtype: ``"float16"`` or ``"bfloat16"`` for the stored scales and zeros.
        pad: pad the input dimension up to a multiple of ``group_size`` where it is not one.
        calibration: for ``method="gptq"``: token ids ``[n_blocks, seq_len]`` (a LongTensor
            or lists of ints) the Hessians are measured on. Used while loading only; not
            saved with the config.
    """

    def __init__(self, bits: Optional[int] = 4, group_size: int = 64,
                 layer_bits: Optional[Mapping[str, int]] = None,
                 modules_to_not_convert: Optional[Iterable[str]] = None, method: str = "hqq",
                 scale_dtype: str = "float16", pad: bool = False, calibration=None,
                 **kwargs: Any):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"QraConfig got unknown argument(s) {sorted(kwargs)}; "
                            f"expected some of {list(_CONFIG_FIELDS)}")
        self.quant_method = METHOD
        if bits is not None:
            check_bits(bits, "bits")
        check_group_size(group_size, "group_size")
        if layer_bits is None:
            layer_bits = {}
        if not isinstance(layer_bits, Mapping):
            raise TypeError(f"layer_bits must be a mapping {{module name: bits}}, got "
                            f"{type(layer_bits).__name__}")
        for name, b in layer_bits.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"layer_bits keys must be module names, got {name!r}")
            check_bits(b, f"layer_bits[{name!r}]")
        if bits is None and not layer_bits:
            raise ValueError("bits=None quantizes only the layers in layer_bits, which is empty")
        if modules_to_not_convert is None:
            modules_to_not_convert = ["lm_head"]
        if isinstance(modules_to_not_convert, str) or not all(
                isinstance(m, str) for m in modules_to_not_convert):
            raise TypeError("modules_to_not_convert must be a list of module names")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be 'float16' or 'bfloat16', got {scale_dtype!r}")
        if not isinstance(pad, bool):
            raise TypeError(f"pad must be a bool, got {type(pad).__name__}")
        self.bits = bits
        self.group_size = group_size
        self.layer_bits = dict(layer_bits)
        self.modules_to_not_convert = list(modules_to_not_convert)
        self.method = method
        self.scale_dtype = scale_dtype
        self.pad = pad
        self.calibration = calibration

    @classmethod
    def from_allocation(cls, allocation, **kwargs) -> "QraConfig":
        """Per-layer bits and the group size of a ``qra_search.Allocation`` (or its dict);
        only the allocation's layers are quantized unless ``bits=`` is given."""
        layers = allocation["layers"] if isinstance(allocation, Mapping) else allocation.layers
        group_size = (allocation.get("group_size", 64) if isinstance(allocation, Mapping)
                      else allocation.group_size)
        kwargs.setdefault("bits", None)
        kwargs.setdefault("group_size", group_size)
        return cls(layer_bits={n: s["bits"] for n, s in layers.items()}, **kwargs)

    @classmethod
    def from_model(cls, model: nn.Module) -> "QraConfig":
        """The config describing a model already quantized with ``quantize_model``: exactly
        its ``QRALinear`` layers (their bits), the most common group size."""
        layers = qra_layers(model)
        if not layers:
            raise ValueError("the model has no QRALinear layer to describe")
        sizes = [m.group_size for m in layers.values()]
        dtypes = {str(m.scales.dtype).removeprefix("torch.") for m in layers.values()}
        return cls(bits=None, group_size=max(set(sizes), key=sizes.count),
                   layer_bits={n: m.bits for n, m in layers.items()},
                   scale_dtype=dtypes.pop() if len(dtypes) == 1 else "float16")

    def to_allocation(self, model: nn.Module) -> Dict[str, Any]:
        """The allocation :func:`qra_kernels.quantize_model` takes (rank 0 everywhere:
        adapters come from PEFT)."""
        return {"layers": {n: {"bits": b} for n, b in self.plan(model).items()},
                "group_size": self.group_size, "method": self.method,
                "scale_dtype": self.scale_dtype}

    def to_dict(self) -> Dict[str, Any]:
        d = {"quant_method": METHOD}
        d.update({k: getattr(self, k) for k in _CONFIG_FIELDS})
        d["layer_bits"] = dict(self.layer_bits)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return d

    # --- which layer gets what ---------------------------------------------------------
    def skips(self, name: str) -> bool:
        # A skip entry matches whole dotted components anywhere in the name: "lm_head",
        # "mlp" (every MLP projection), "layers.0" — but "proj" never matches "q_proj".
        dotted = f".{name}."
        return any(f".{m}." in dotted for m in self.modules_to_not_convert)

    def plan(self, model: nn.Module) -> Dict[str, int]:
        """``{module name: bits}`` for every layer this config quantizes in ``model``
        (``nn.Linear`` and ``Conv1D``). A config that quantizes nothing raises."""
        linears = {n: m for n, m in quantizable_layers(model, include_head=True).items()
                   if not isinstance(m, QRALinear)}
        for name in self.layer_bits:
            if name not in linears:
                raise ValueError(f"layer_bits names {name!r}, which is not an nn.Linear or "
                                 f"Conv1D of the model (e.g. {next(iter(linears), None)!r})")
        out = {}
        for name in linears:
            if name in self.layer_bits:
                out[name] = self.layer_bits[name]
            elif self.bits is not None and not self.skips(name):
                out[name] = self.bits
        if not out:
            kinds = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
            raise ValueError("QraConfig quantizes no layer of this model: it has no nn.Linear "
                             "or Conv1D outside modules_to_not_convert "
                             f"{self.modules_to_not_convert} (its leaf modules: {kinds[:8]})")
        return out


def layer_metadata(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """What a reader needs to rebuild each ``QRALinear`` of ``model`` before loading it."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QRALinear):
            out[name] = {"bits": m.bits, "group_size": m.group_size,
                         "shape": [m.out_features, m.in_features], "rank": m.rank,
                         "alpha": m.alpha, "bias": m.bias is not None,
                         "scale_dtype": str(m.scales.dtype).removeprefix("torch."),
                         "lora_dtype": str(m.lora_A.dtype).removeprefix("torch.")}
    return out


def _read_layer_metadata(checkpoint_files) -> Optional[Dict[str, Dict[str, Any]]]:
    if not checkpoint_files:
        return None
    first = checkpoint_files[0]
    if not str(first).endswith(".safetensors"):
        return None
    from safetensors import safe_open
    with safe_open(first, framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        return None
    version = int(meta.get("qra_format_version", FORMAT_VERSION))
    if version != FORMAT_VERSION:
        raise ValueError(f"{first}: packed format version {version} is not supported by this "
                         f"qra_kernels (format version {FORMAT_VERSION})")
    return json.loads(meta[METADATA_KEY])


def _rename_param(module: nn.Module, old: str, new: str) -> None:
    """Rename a parameter in place, keeping the order of ``module._parameters``."""
    module._parameters = {(new if k == old else k): v for k, v in module._parameters.items()}


def attach_quantizer(model: nn.Module) -> "QraHfQuantizer":
    """Make a model quantized by :func:`qra_kernels.quantize_model` look to transformers
    like one loaded with ``QraConfig``, so ``save_pretrained`` writes the packed checkpoint
    (used by :func:`qra_kernels.save_quantized`)."""
    q = getattr(model, "hf_quantizer", None)
    if isinstance(q, QraHfQuantizer):
        q.quantization_config.layer_bits = {n: m.bits for n, m in qra_layers(model).items()}
        return q
    cfg = QraConfig.from_model(model)
    q = QraHfQuantizer(cfg, pre_quantized=True)
    model.hf_quantizer = q
    model.config.quantization_config = cfg
    return q


class QraHfQuantizer(HfQuantizer):
    """transformers' hooks for the ``"qra"`` method (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: QraConfig, **kwargs):
        if not isinstance(quantization_config, QraConfig):
            raise TypeError(f"the 'qra' quantizer needs a QraConfig, got "
                            f"{type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, Mapping) and "disk" in device_map.values():
            raise ValueError("device_map: the 'qra' method cannot offload layers to disk")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # weights load as they are; quantization happens on whole modules

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        cfg = self.quantization_config
        meta = _read_layer_metadata(checkpoint_files)
        if meta is None:
            # Without the file's metadata (e.g. a .bin checkpoint), the config lists the bits.
            meta = {n: {"bits": b, "group_size": cfg.group_size} for n, b in cfg.plan(model).items()}
        modules = dict(model.named_modules())
        for name, spec in meta.items():
            linear = modules.get(name)
            if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
                raise ValueError(f"the checkpoint quantizes {name!r}, which is not an nn.Linear "
                                 f"or Conv1D of this model ({type(linear).__name__})")
            if name in cfg.layer_bits and cfg.layer_bits[name] != spec["bits"]:
                raise ValueError(f"config.json says {name!r} has {cfg.layer_bits[name]} bits, "
                                 f"the checkpoint's metadata says {spec['bits']}")
            n, k = dense_weight(linear).shape
            dtype = linear.weight.dtype if linear.weight.is_floating_point() else None
            layer = QRALinear(k, n, spec["bits"], spec["group_size"], spec.get("rank", 0),
                              spec.get("alpha"), bias=linear.bias is not None,
                              scale_dtype=_SCALE_DTYPES[spec.get("scale_dtype", cfg.scale_dtype)],
                              lora_dtype=getattr(torch, spec.get("lora_dtype", "float32")),
                              device="meta",
                              dtype=dtype if dtype in (torch.float32, torch.float16,
                                                       torch.bfloat16) else None)
            _rename_param(layer, "qweight", PACKED_KEY)  # loads from the file's key
            replace_module(model, name, layer)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized:
            for m in model.modules():
                if isinstance(m, QRALinear) and PACKED_KEY in m._parameters:
                    _rename_param(m, PACKED_KEY, "qweight")
        else:
            quantize_model(model, cfg, calibration=cfg.calibration, pad=cfg.pad)
        # The config saved with the model names every quantized layer's bits.
        cfg.layer_bits = {n: m["bits"] for n, m in layer_metadata(model).items()}
        return model

    def get_state_dict_and_metadata(self, model):
        layers = layer_metadata(model)
        self.quantization_config.layer_bits = {n: m["bits"] for n, m in layers.items()}
        packed = {f"{n}.qweight" for n in layers}
        state_dict = {(k[:-len("qweight")] + PACKED_KEY if k in packed else k): v
                      for k, v in model.state_dict().items()}
        return state_dict, {METADATA_KEY: json.dumps(layers, sort_keys=True),
                      "qra_format_version": str(FORMAT_VERSION)}

    def _dequantize(self, model, dtype=None):
        for name, m in list(model.named_modules()):
            if isinstance(m, QRALinear):
                replace_module(model, name, m.dequantize(dtype or torch.float32, merge_lora=True))
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False  # the packed base is frozen; train adapters (PEFT) on top

    @property
    def is_compileable(self) -> bool:
        return True


def _guard_from_pretrained() -> None:
    """Refuse, loudly, a directory of qra's first checkpoint layout in ``from_pretrained``
    (transformers would load it with random projections: its config has no
    ``quantization_config``, so no quantizer of ours is ever asked).

    ``from_pretrained`` resolves its quantizer through ``get_hf_quantizer`` with the loaded
    config, whose ``name_or_path`` is the directory: wrapping that function sees every load
    (direct model classes and Auto classes alike) at the cost of a stat and a header read
    for local directories. It is wrapped where it is defined (``quantizers.auto``, which
    triggers this registration, so ``modeling_utils`` binds the wrapper if it is still
    importing) and, if ``modeling_utils`` already bound it, there too."""
    import functools
    import os
    import sys

    original = _auto.get_hf_quantizer
    if getattr(original, "_qra_guarded", False):
        return

    @functools.wraps(original)
    def get_hf_quantizer(config, *args, **kwargs):
        path = getattr(config, "name_or_path", None)
        if not path:
            # A model class's own from_pretrained sets name_or_path only later; its argument
            # is a local of the calling frame (transformers' name for it since v2).
            path = sys._getframe(1).f_locals.get("pretrained_model_name_or_path")
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if isinstance(path, str) and path and kwargs.get("gguf_file") is None \
                and os.path.isdir(path):
            from ..checkpoint import refuse_legacy
            refuse_legacy(path)
        return original(config, *args, **kwargs)

    get_hf_quantizer._qra_guarded = True
    _auto.get_hf_quantizer = get_hf_quantizer
    mu = sys.modules.get("transformers.modeling_utils")
    if mu is not None and getattr(mu, "get_hf_quantizer", None) is original:
        mu.get_hf_quantizer = get_hf_quantizer


def register() -> None:
    """Make ``"qra"`` known to transformers' quantization registries (idempotent).

    A re-imported module (``importlib.reload``) replaces the entries, so the registry always
    holds the classes of the live module."""
    for mapping, cls, reg in ((_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QraConfig,
                               _auto.register_quantization_config),
                              (_auto.AUTO_QUANTIZER_MAPPING, QraHfQuantizer,
                               _auto.register_quantizer)):
        if mapping.get(METHOD) is cls:
            continue
        if METHOD in mapping:
            mapping[METHOD] = cls
        else:
            reg(METHOD)(cls)
    _guard_from_pretrained()


register()
