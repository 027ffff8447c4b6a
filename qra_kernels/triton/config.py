"""Launch configurations as data: ``qra_kernels/configs/triton_configs.json``.

One small, fixed configuration per regime (decode GEMV/split-K, GEMM, grad-input, LoRA
gradients) and the M threshold between decode and GEMM, per GPU name with a ``default``.
Nothing is autotuned at first call; a benchmark session measures and writes the entries.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Dict

import torch

CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "triton_configs.json"
REGIMES = ("decode", "gemm", "grad_input", "lora_grad")


@functools.lru_cache(maxsize=None)
def _table() -> Dict[str, Any]:
    with open(CONFIG_PATH) as f:
        table = json.load(f)
    if "default" not in table:
        raise ValueError(f"{CONFIG_PATH}: needs a 'default' entry")
    for name, entry in table.items():
        if name.startswith("_"):
            continue
        missing = [k for k in ("decode_max_m", *REGIMES) if k not in entry]
        if missing:
            raise ValueError(f"{CONFIG_PATH}: entry {name!r} lacks {missing}")
    return table


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "default"


def configs_for(device: torch.device) -> Dict[str, Any]:
    """The entry of this device's GPU, else the default one."""
    table = _table()
    return table.get(device_name(device), table["default"])


def launch_config(regime: str, device: torch.device, dtype: torch.dtype = None) -> Dict[str, int]:
    """The regime's configuration; for fp32 activations its ``<regime>_fp32`` entry if any."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    entry = configs_for(device)
    if dtype == torch.float32 and f"{regime}_fp32" in entry:
        return dict(entry[f"{regime}_fp32"])
    return dict(entry[regime])


def decode_max_m(device: torch.device) -> int:
    """Calls with at most this many rows of x take the decode (GEMV/split-K) path."""
    return int(configs_for(device)["decode_max_m"])


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_target(device: torch.device, programs_per_sm: int) -> int:
    """How many programs keep the device's memory system busy (CPU: a few, interpreted)."""
    if device.type == "cuda":
        return sm_count(device.index if device.index is not None else
                        torch.cuda.current_device()) * programs_per_sm
    return 4
