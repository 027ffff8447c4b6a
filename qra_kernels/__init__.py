"""qra_kernels: packed 2/3/4/8-bit group-quantized weights with fused LoRA kernels.

Public API (see the README and docs/): :func:`quantize_weight`, :class:`QuantizedWeight`,
:func:`qra_linear`, :class:`QRALinear`, :func:`quantize_model`, :func:`set_backend`,
:func:`build_info`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .backends import (BackendUnavailableError, available_backends, get_backend,  # noqa: E402
                       set_backend)
from .format import (SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantizedWeight,  # noqa: E402
                     lora_nbytes, packed_nbytes)
from .modules import QRALinear, quantize_model  # noqa: E402
from .ops import qra_linear  # noqa: E402
from .quantizers import quantize_weight  # noqa: E402
from . import integrations  # noqa: E402,F401 - registers "qra" with transformers when it is imported

__all__ = [
    "__version__", "build_info", "set_backend", "get_backend", "available_backends",
    "BackendUnavailableError", "QuantizedWeight", "quantize_weight", "packed_nbytes",
    "qra_linear", "QRALinear", "quantize_model", "lora_nbytes", "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
]


def build_info() -> dict:
    """What this installation was built with and which backends can run here."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        triton_version = None
    ext = _extension_info()
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
