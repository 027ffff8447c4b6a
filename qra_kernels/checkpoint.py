"""The one checkpoint writer, and what a directory on disk is.

:func:`save_quantized` is how every path saves a quantized model — ``qra quantize``,
``qra demo``, the exporters' inputs, and a user's own ``quantize_model`` call. It writes
exactly what ``save_pretrained`` of a model loaded with ``QraConfig`` writes (the packed
tensors plus the ``qra_layers`` metadata in the safetensors header, ``quantization_config``
in ``config.json``; see :mod:`qra_kernels.integrations.transformers`), so
``import qra_kernels; AutoModelForCausalLM.from_pretrained(dir)`` reloads it with identical
outputs. ``allocation.json`` beside it records what was chosen and how it was quantized.

:func:`inspect_checkpoint` tells what a model path holds before anything heavy is loaded
(the CLI refuses bad paths with it), and :func:`upgrade_checkpoint` rewrites a directory of
qra's first layout (``*.qweight`` keys and no ``quantization_config``, which transformers
would load as randomly initialised projections) into the current one.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from ._io import atomic_write

__all__ = ["save_quantized", "inspect_checkpoint", "upgrade_checkpoint",
           "LegacyCheckpointError", "WEIGHT_FILES"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


class LegacyCheckpointError(ValueError):
    """A directory in qra's first checkpoint layout (see :func:`upgrade_checkpoint`)."""


def save_quantized(model, out_dir, tokenizer=None, allocation=None) -> Dict[str, Any]:
    """Save a model holding ``QRALinear`` layers so that ``from_pretrained(out_dir)`` (with
    ``qra_kernels`` imported) reloads it as it is. Returns ``{"dir", "linear_bytes",
    "file_bytes"}``: the measured bytes of the quantized layers and of the weight files."""
    from .integrations.transformers import attach_quantizer
    from .modules import qra_layers
    if not hasattr(model, "save_pretrained"):
        raise TypeError("save_quantized needs a transformers PreTrainedModel; for a plain "
                        "nn.Module save model.state_dict() (QRALinear's tensors are plain)")
    layers = qra_layers(model)
    if not layers:
        raise ValueError("the model has no QRALinear layer: quantize it first "
                         "(qra_kernels.quantize_model)")
    out_dir = os.fspath(out_dir)
    if os.path.isfile(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a file, not a directory")
    attach_quantizer(model)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if allocation is not None:
        allocation.save(os.path.join(out_dir, "allocation.json"))
    files = [f for f in os.listdir(out_dir) if f.endswith((".safetensors", ".bin"))]
    return {"dir": out_dir, "linear_bytes": sum(m.memory_bytes() for m in layers.values()),
            "file_bytes": sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)}


def _safetensors_files(path: str) -> List[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f).get("weight_map", {}).values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.exists(single) else []


def _safetensors_keys(file: str) -> List[str]:
    # The header alone: 8 bytes of length, then JSON. No tensor is read.
    import struct
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def inspect_checkpoint(path) -> Dict[str, Any]:
    """What ``path`` holds, from file names and headers only: ``{"kind": "gguf" | "float" |
    "qra" | "qra-legacy" | "quantized", "quant_method": str | None, "missing": [what a
    loadable model directory lacks]}``. Raises ``ValueError`` for a path that does not
    exist or is neither a directory nor a ``.gguf`` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"model path {path!r} does not exist")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model path {path!r} is a file but not a .gguf file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"model path {path!r} is not a GGUF file (bad magic bytes)")
        return {"kind": "gguf", "quant_method": None, "missing": []}
    missing = []
    config = None
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e.msg})") from None
    else:
        missing.append("config.json")
    if not any(os.path.exists(os.path.join(path, w)) for w in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any(os.path.exists(os.path.join(path, t)) for t in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    qc = (config or {}).get("quantization_config") or {}
    method = qc.get("quant_method")
    kind = "float"
    if method == "qra":
        kind = "qra"
    elif method is not None:
        kind = "quantized"
    else:
        files = _safetensors_files(path)
        if files and any(k.endswith(".qweight") for k in _safetensors_keys(files[0])) \
                and os.path.exists(os.path.join(path, "allocation.json")):
            kind = "qra-legacy"
    return {"kind": kind, "quant_method": method, "missing": missing}


def refuse_legacy(path) -> None:
    """Raise :class:`LegacyCheckpointError` if ``path`` is a directory of qra's first
    layout, which ``from_pretrained`` would otherwise load with random projections."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return
    try:
        kind = inspect_checkpoint(path)["kind"]
    except ValueError:
        return  # not ours to judge: transformers reports what is wrong with it
    if kind == "qra-legacy":
        raise LegacyCheckpointError(
            f"{path} was written by qra 0.1's `qra quantize`/`qra demo` (packed '*.qweight' "
            "keys without a quantization_config): transformers would load its projections "
            "as random weights. Rewrite it once with qra_kernels.checkpoint."
            f"upgrade_checkpoint({path!r}, <new dir>), then load the new directory")


def upgrade_checkpoint(src, dst) -> str:
    """Rewrite a qra 0.1 directory (``src``) in the current layout at ``dst``: packed keys
    renamed, ``qra_layers`` metadata and ``quantization_config`` added, every other file
    copied. Tensors are copied bit for bit."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from .allocation import Allocation
    from .format import FORMAT_VERSION
    from .integrations.transformers import METADATA_KEY, PACKED_KEY, QraConfig

    src, dst = os.fspath(src), os.fspath(dst)
    if inspect_checkpoint(src)["kind"] != "qra-legacy":
        raise ValueError(f"{src!r} is not a qra 0.1 checkpoint directory")
    if os.path.exists(dst) and os.listdir(dst):
        raise ValueError(f"dst {dst!r} exists and is not empty")
    alloc = Allocation.load(os.path.join(src, "allocation.json"))
    tensors = {}
    with safe_open(os.path.join(src, "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    layers = {}
    for name, spec in alloc.layers.items():
        q = tensors.pop(f"{name}.qweight")
        tensors[f"{name}.{PACKED_KEY}"] = q
        n, k = spec.get("shape") or (q.shape[1], tensors[f"{name}.lora_A"].shape[1])
        rank = tensors[f"{name}.lora_A"].shape[0]
        layers[name] = {"bits": spec["bits"], "group_size": alloc.group_size,
                        "shape": [n, k], "rank": rank,
                        "alpha": float(spec.get("alpha", rank)),
                        "bias": f"{name}.bias" in tensors,
                        "scale_dtype": str(tensors[f"{name}.scales"].dtype).removeprefix("torch."),
                        "lora_dtype": str(tensors[f"{name}.lora_A"].dtype).removeprefix("torch.")}
    os.makedirs(dst, exist_ok=True)
    for entry in os.listdir(src):
        if entry not in ("model.safetensors", "config.json"):
            s = os.path.join(src, entry)
            (shutil.copytree if os.path.isdir(s) else shutil.copy2)(s, os.path.join(dst, entry))
    save_file(tensors, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt", METADATA_KEY: json.dumps(layers, sort_keys=True),
                        "qra_format_version": str(FORMAT_VERSION)})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    qc = QraConfig(bits=None, group_size=alloc.group_size,
                   layer_bits={n: s["bits"] for n, s in alloc.layers.items()})
    config["quantization_config"] = qc.to_dict()
    with atomic_write(os.path.join(dst, "config.json")) as f:
        json.dump(config, f, indent=2)
    return dst
