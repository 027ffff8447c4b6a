"""qra_kernels: packed 2/3/4/8-bit group-quantized weights with fused LoRA kernels.

Public API (see the README and docs/): :func:`quantize_weight`, :class:`QuantizedWeight`,
:func:`qra_linear`, :class:`QRALinear`, :class:`Allocation`, :func:`quantize_model`,
:func:`save_quantized`, :func:`set_backend`, :func:`build_info`, ``QraConfig``.

Names resolve on first use (PEP 562), so ``import qra_kernels`` costs milliseconds and does
not import torch: the command line's ``--help`` stays fast. Importing the package still
registers the ``"qra"`` quantization method with transformers whenever transformers is
imported (:mod:`qra_kernels.integrations`). The ``qra::linear`` operator is registered with
torch when :mod:`qra_kernels.ops` is first imported — by any of the names above; code that
calls ``torch.ops.qra.linear`` directly (e.g. a loaded ``torch.export`` program) should
``import qra_kernels.ops`` first.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> submodule that defines it
_EXPORTS = {
    "BackendUnavailableError": "backends", "available_backends": "backends",
    "get_backend": "backends", "set_backend": "backends",
    "SUPPORTED_BITS": "format", "SUPPORTED_GROUP_SIZES": "format",
    "QuantizedWeight": "format", "lora_nbytes": "format", "packed_nbytes": "format",
    "Allocation": "allocation", "linear_shapes": "allocation",
    "QRALinear": "modules", "quantize_model": "modules",
    "save_quantized": "checkpoint",
    "qra_linear": "ops",
    "quantize_weight": "quantizers",
}

__all__ = ["__version__", "build_info", *_EXPORTS, "QraConfig"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qra_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def build_info() -> dict:
    """What this installation was built with and which backends can run here."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        triton_version = None
    ext = _extension_info()
    from .backends import available_backends
    return {
        "version": __version__,
        "cuda_compiled": ext.get("cuda_compiled", False),
        "cuda_archs": ext.get("cuda_archs", []),
        "cpu_extension": ext.get("cpu_extension", False),
        "triton": triton_version,
        "backends": available_backends(),
    }


def _extension_info() -> dict:
    """Build facts of the compiled extension, if one was built (see setup.py)."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return dict(_C.build_info())


# Registers "qra" with transformers when transformers is imported (torch-free here).
from . import integrations  # noqa: E402,F401
