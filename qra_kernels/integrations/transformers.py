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
from ..modules import QRALinear, quantize_model

__all__ = ["QraConfig", "QraHfQuantizer", "register", "METHOD", "layer_metadata"]

METHOD = "qra"
METADATA_KEY = "qra_layers"
PACKED_KEY = "weight"  # checkpoint key of QRALinear.qweight (see the module docstring)
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_CONFIG_FIELDS = ("bits", "group_size", "layer_bits", "modules_to_not_convert", "method",
                  "scale_dtype", "pad")


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
        method: ``"hqq"`` (default) or ``"rtn"``, see :func:`qra_kernels.quantize_weight`.
        scale_dtype: ``"float16"`` or ``"bfloat16"`` for the stored scales and zeros.
        pad: pad the input dimension up to a multiple of ``group_size`` where it is not one.
    """

    def __init__(self, bits: Optional[int] = 4, group_size: int = 64,
                 layer_bits: Optional[Mapping[str, int]] = None,
                 modules_to_not_convert: Optional[Iterable[str]] = None, method: str = "hqq",
                 scale_dtype: str = "float16", pad: bool = False, **kwargs: Any):
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
        if method not in ("hqq", "rtn"):
            raise ValueError(f"method must be 'hqq' or 'rtn', got {method!r}")
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
        """``{module name: bits}`` for every layer this config quantizes in ``model``."""
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        for name in self.layer_bits:
            if name not in linears:
                raise ValueError(f"layer_bits names {name!r}, which is not an nn.Linear of "
                                 f"the model (e.g. {next(iter(linears), None)!r})")
        out = {}
        for name in linears:
            if name in self.layer_bits:
                out[name] = self.layer_bits[name]
            elif self.bits is not None and not self.skips(name):
                out[name] = self.bits
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


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"the checkpoint quantizes {name!r}, which is not an nn.Linear "
                                 f"of this model ({type(linear).__name__})")
            if name in cfg.layer_bits and cfg.layer_bits[name] != spec["bits"]:
                raise ValueError(f"config.json says {name!r} has {cfg.layer_bits[name]} bits, "
                                 f"the checkpoint's metadata says {spec['bits']}")
            layer = QRALinear(linear.in_features, linear.out_features, spec["bits"],
                              spec["group_size"], spec.get("rank", 0), spec.get("alpha"),
                              bias=linear.bias is not None,
                              scale_dtype=_SCALE_DTYPES[spec.get("scale_dtype", cfg.scale_dtype)],
                              lora_dtype=getattr(torch, spec.get("lora_dtype", "float32")),
                              device="meta")
            _rename_param(layer, "qweight", PACKED_KEY)  # loads from the file's key
            _set_module(model, name, layer)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized:
            for m in model.modules():
                if isinstance(m, QRALinear) and PACKED_KEY in m._parameters:
                    _rename_param(m, PACKED_KEY, "qweight")
        else:
            plan = cfg.plan(model)
            quantize_model(model, {"layers": {n: {"bits": b} for n, b in plan.items()},
                                   "group_size": cfg.group_size},
                           method=cfg.method, scale_dtype=_SCALE_DTYPES[cfg.scale_dtype],
                           pad=cfg.pad)
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
                _set_module(model, name, m.dequantize(dtype or torch.float32, merge_lora=True))
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


register()
