"""Integrations with transformers, PEFT, training loops and torch.distributed.

``import qra_kernels`` imports this package, which registers the quantization method
``"qra"`` with transformers *when transformers is imported* (or at once if it already is):
importing transformers' quantizer machinery costs ~2.6 s, and most users of the kernels
never need it. ``qra_kernels.QraConfig`` is resolved lazily for the same reason.

Submodules: :mod:`.transformers` (``QraConfig`` and the ``"qra"`` quantizer),
:mod:`.peft` (the LoRA layer for ``QRALinear``, ``lora_config``, ``load``, merge and dense
export), :mod:`.training` (preparing a quantized model for training).
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

__all__ = ["register_with_transformers", "QraConfig", "QraHfQuantizer"]

_TRIGGER = "transformers.quantizers.auto"  # where transformers keeps its quantizer registry
_LAZY = {"QraConfig": "transformers", "QraHfQuantizer": "transformers"}


def register_with_transformers() -> None:
    """Register ``"qra"`` (config and quantizer) with transformers now; safe to repeat."""
    module = sys.modules.get(f"{__name__}.transformers")
    if module is not None and not hasattr(module, "register"):
        # Our own module is mid-import (it imports transformers' registry, which fired the
        # hook); it registers itself as its last statement.
        return
    from .transformers import register
    register()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs callbacks right after matching modules have executed, however they get imported
    (user code, Trainer, PEFT): ``transformers.quantizers.auto`` → register ``"qra"``; the
    first transformers modeling module → guard ``from_pretrained`` (by then
    ``transformers.modeling_utils`` is complete; see
    :func:`qra_kernels.integrations.transformers._guard_from_pretrained`)."""

    _busy = False
    watchers: list = []  # [(predicate(fullname) -> bool, callback)], each fires once

    def find_spec(self, fullname, path, target=None):
        if self._busy:
            return None
        hits = [w for w in self.watchers if w[0](fullname)]
        if not hits:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        inner = spec.loader
        for w in hits:
            self.watchers.remove(w)

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                inner.exec_module(module)
                if not _RegisterOnImport.watchers:
                    _remove_hook()
                for _, callback in hits:
                    callback()

        spec.loader = _Loader()
        return spec


def after_import(predicate, callback) -> None:
    """Call ``callback`` once right after the next import of a module ``predicate``
    accepts (a module name or a function of it)."""
    if isinstance(predicate, str):
        name = predicate
        predicate = lambda fullname: fullname == name  # noqa: E731
    _RegisterOnImport.watchers.append((predicate, callback))
    if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]


def _install() -> None:
    if _TRIGGER in sys.modules:
        register_with_transformers()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        after_import(_TRIGGER, register_with_transformers)


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _package_getattr(previous):
    """``qra_kernels.QraConfig`` without importing transformers at ``import qra_kernels``."""
    def __getattr__(name):
        if name in _LAZY:
            return globals()["__getattr__"](name)
        if previous is not None:
            return previous(name)
        raise AttributeError(f"module 'qra_kernels' has no attribute {name!r}")
    return __getattr__


_install()
_parent = sys.modules.get(__name__.rpartition(".")[0])
if _parent is not None and not getattr(_parent, "_qra_lazy_integrations", False):
    _parent.__getattr__ = _package_getattr(getattr(_parent, "__getattr__", None))
    _parent._qra_lazy_integrations = True
