"""Exporters: serve a qra model where qra does not run.

* :func:`export_gptq` (:mod:`.gptq`) — a lossless GPTQ checkpoint (GPTQModel's ``gptq_v2``
  layout) with per-module bits and group size in ``dynamic``, and the adapters as a PEFT
  adapter directory beside it.
* :func:`export_gguf` (:mod:`.gguf`) — a GGUF file for llama.cpp, adapters merged, each
  tensor quantized by the ``gguf`` package to the llama.cpp type its bit-width maps to
  (lossy; the loss is measured in docs/EXPORT.md).
* :mod:`.cli` — ``qra export --format gptq|gguf --model DIR --out OUT``.

See docs/EXPORT.md.
"""
from __future__ import annotations

import importlib

# Names resolve on first use, so ``qra export --help`` does not import torch.
_EXPORTS = {"AdapterTerm": ".adapters", "LinearLayer": ".adapters", "linear_layers": ".adapters",
            "stack_terms": ".adapters", "NotExportableError": ".gptq", "export_gptq": ".gptq",
            "to_gptq": ".gptq", "export_gguf": ".gguf"}  # .gguf imports the gguf package
__all__ = ["export_gptq", "export_gguf", "to_gptq", "NotExportableError", "linear_layers",
           "stack_terms", "AdapterTerm", "LinearLayer"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
