"""qra_search: the QR-Adaptor search over per-layer (bits, rank) allocations.

Talks to the model only through "evaluate this allocation" and to the kernels only
through the cost model ("what does this allocation cost", in bytes and microseconds).
"""
from .allocation import Allocation, linear_shapes
from .search import SearchResult, run_search

__all__ = ["Allocation", "linear_shapes", "run_search", "SearchResult"]
