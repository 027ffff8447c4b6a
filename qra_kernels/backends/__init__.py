"""The registry of implementations of the ``qra::linear`` op.

Each backend is a class answering ``available()`` (can it run on this machine at all, and
if not, why) and ``supports(x)`` (can it run this call: device, dtype), and implementing
``forward`` and ``backward`` on plain tensors. The op (:mod:`qra_kernels.ops`) asks the
registry which backend to use for each call.

Selection: ``set_backend(name)`` or the environment variable ``QRA_BACKEND``. ``"auto"``
(the default) picks the first backend in :data:`AUTO_ORDER` that is available and supports
the call — falling through is what "auto" means. A backend asked for *by name* that cannot
run a call raises :class:`BackendUnavailableError`; it never falls back silently.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["Backend", "BackendUnavailableError", "register_backend", "set_backend",
           "get_backend", "backend_names", "available_backends", "select_backend"]


class BackendUnavailableError(RuntimeError):
    """A backend requested by name cannot run here (or cannot run this call)."""


class Backend:
    """Base class. Subclasses set ``name`` and implement the four methods."""

    name: str = ""

    def available(self) -> Tuple[bool, str]:
        """(True, "") when usable on this machine, else (False, reason)."""
        raise NotImplementedError

    def supports(self, x: torch.Tensor) -> Tuple[bool, str]:
        """Whether this call (device, dtype of x) can run here; (False, reason) if not."""
        return True, ""

    def forward(self, x, qweight, scales, zeros, bits, group_size, out_features, lora_A,
                lora_B, scaling, bias):
        raise NotImplementedError

    def backward(self, grad_out, x, qweight, scales, zeros, bits, group_size, out_features,
                 lora_A, lora_B, scaling, need_x, need_lora):
        """Returns (grad_x or None, grad_A or None, grad_B or None)."""
        raise NotImplementedError


_REGISTRY: Dict[str, Backend] = {}
# Preference order for "auto": fastest first; reference last since it runs everywhere.
AUTO_ORDER = ("cuda", "triton", "cpu", "reference")
_lock = threading.Lock()
_selected: Optional[str] = None


def register_backend(backend: Backend) -> None:
    if not backend.name:
        raise ValueError("backend.name must be a non-empty string")
    with _lock:
        _REGISTRY[backend.name] = backend


def backend_names() -> List[str]:
    return ["auto", *_REGISTRY]


def available_backends() -> List[str]:
    """Names of the registered backends that can run on this machine."""
    _ensure_loaded()
    return [name for name, b in _REGISTRY.items() if b.available()[0]]


def _check_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    _ensure_loaded()
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {backend_names()}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every later call; a named backend must be usable here."""
    name = _check_name(name)
    if name != "auto":
        ok, why = _REGISTRY[name].available()
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} cannot run here: {why}")
    global _selected
    _selected = name


def get_backend() -> str:
    """The selected name: set_backend's, else $QRA_BACKEND, else "auto"."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get("QRA_BACKEND", "auto") or "auto")


def select_backend(x: torch.Tensor) -> Backend:
    """The backend that will run a call with activations ``x``."""
    name = get_backend()
    if name != "auto":
        backend = _REGISTRY[name]
        for ok, why in (backend.available(), backend.supports(x)):
            if not ok:
                raise BackendUnavailableError(f"backend {name!r} cannot run this call: {why}")
        return backend
    for candidate in AUTO_ORDER:
        backend = _REGISTRY.get(candidate)
        # supports() first: it only looks at x (device, dtype), while available() may probe
        # packages and devices; on a CPU call the GPU backends are ruled out by x alone.
        if backend is not None and backend.supports(x)[0] and backend.available()[0]:
            return backend
    raise BackendUnavailableError("no registered backend supports this call")  # unreachable


_loaded = False


def _ensure_loaded() -> None:
    """Import the built-in backends once (each registers itself on import)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import reference  # noqa: F401  always present
    for module in ("triton_backend", "cuda_backend", "cpu_backend"):
        try:
            __import__(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            # Only a missing backend module is tolerated; a broken one must surface.
            if e.name != f"{__name__}.{module}":
                raise
