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

from .adapters import AdapterTerm, LinearLayer, linear_layers, stack_terms
from .gptq import NotExportableError, export_gptq, to_gptq

__all__ = ["export_gptq", "export_gguf", "to_gptq", "NotExportableError", "linear_layers",
           "stack_terms", "AdapterTerm", "LinearLayer"]


def __getattr__(name):
    if name == "export_gguf":  # imports the gguf package only when asked for
        from .gguf import export_gguf
        return export_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
