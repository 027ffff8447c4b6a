"""qra_search: the QR-Adaptor search over per-layer (bits, rank) allocations.

It talks to the model through "evaluate this allocation" (:mod:`.evaluate`, on weights the
store quantized once, :mod:`.store`), to the kernels' costs through the cost model
(:mod:`.costs`: bytes from the packed format's formulas, microseconds from measured
tables), and hands its result over as a :class:`qra_kernels.Allocation`.

Names resolve on first use, so ``qra --help`` does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"Allocation": "qra_kernels.allocation", "linear_shapes": "qra_kernels.allocation",
            "run_search": "qra_search.search", "SearchResult": "qra_search.search",
            "SearchConfig": "qra_search.config"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qra_search' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
