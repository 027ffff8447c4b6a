"""``SearchConfig``: every setting of a search, checked in one place.

The CLI builds one from its options (:func:`qra_search.cli`), ``run_search`` takes one (or
keyword overrides of the defaults), and the archive header is built from it
(:meth:`SearchConfig.identity`), so the three can never disagree about a setting.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Optional, Tuple

from qra_kernels.allocation import MAX_RANK
from qra_kernels.format import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

GRANULARITIES = ("block", "module")
METHODS = ("recommended", "rtn", "hqq", "gptq")
SELECTIONS = ("proxy+kl", "proxy-near-kl", "kl", "proxy")

# Fields that change what an archived evaluation *means*: a resumed search must agree on
# them. Everything else (budget, effort, choices) may change between runs of one archive —
# the evaluations it holds stay valid and are reused; that is how a finished search is
# extended with more evaluations.
IDENTITY_FIELDS = ("group_size", "method", "lora_init", "proxy_steps", "proxy_lr", "seed",
                   "seq_len", "hessian_blocks", "proxy_blocks")


@dataclass(frozen=True)
class SearchConfig:
    # --- budget (one or more apply) --------------------------------------------------------
    budget_bits: Optional[float] = 4.0
    budget_mb: Optional[float] = None
    budget_latency_us: Optional[float] = None
    latency_table: Optional[str] = None  # device name, JSON path or "measure"
    latency_m: int = 1
    training_memory: bool = False
    # --- search space ----------------------------------------------------------------------
    bits_choices: Tuple[int, ...] = (2, 3, 4, 8)
    rank_choices: Tuple[int, ...] = (0, 4, 8, 16, 32, 64)
    default_rank: int = 16
    granularity: str = "block"
    group_size: int = 64
    method: str = "recommended"
    lora_init: str = "svd"
    # --- effort ----------------------------------------------------------------------------
    seed: int = 0
    evaluations: int = 48
    popsize: Optional[int] = None
    refine_steps: int = 8
    # Stage IV (:mod:`qra_search.descent`): rounds of measured descent around the best
    # candidate, each about 4 KL passes per group.
    descent_rounds: int = 2
    # How the result is chosen (docs/SEARCH.md, "Which candidate is chosen"):
    # "proxy+kl" — the finalist with the lowest proxy fine-tune loss + kl_weight × KL. The
    # proxy trains and validates on calibration text: its gain is mostly fit to that text,
    # and only a fraction k of it carries to other text after a long fine-tune, while the
    # KL (what quantization took) stays. Predicted loss elsewhere ~ KL - k·gain
    # = k·(proxy + (1-k)/k · KL) + const, so kl_weight = (1-k)/k (2.5: k = 0.29).
    # "proxy-near-kl" — among the finalists whose KL is at most kl_slack times the lowest
    # measured KL, the lowest proxy loss (the default until 2026-12-04: it failed on
    # Gemma-3, where the lowest KL was a rank-0 outlier that left no other finalist
    # eligible); "kl" — the lowest measured KL; "proxy" — the lowest proxy loss among all
    # finalists. Without proxy fine-tunes (proxy_top=0) every rule but "kl" is "kl".
    select: str = "proxy+kl"
    kl_weight: float = 2.5
    kl_slack: float = 2.0
    proxy_top: int = 2
    proxy_steps: int = 10
    proxy_lr: float = 5e-4
    # Blocks the proxy fine-tune trains on, beyond (and disjoint from) the KL blocks; 0: it
    # trains on the KL blocks themselves (a few blocks: it measures memorisation as much as
    # learning).
    proxy_blocks: int = 0
    # --- calibration data (texts → blocks) -------------------------------------------------
    seq_len: int = 128
    n_blocks: int = 8
    # GPTQ's Hessians: calibration blocks of seq_len tokens (one forward pass; more tokens
    # than the KL needs — a 1536-wide layer's Hessian needs far more than 384 tokens)
    hessian_blocks: int = 128
    extra: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "bits_choices", tuple(self.bits_choices))
        object.__setattr__(self, "rank_choices", tuple(self.rank_choices))
        self.validate()

    def replace(self, **changes) -> "SearchConfig":
        return replace(self, **changes)

    @classmethod
    def from_kwargs(cls, base: Optional["SearchConfig"] = None, **kwargs) -> "SearchConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown search setting(s) {unknown}; SearchConfig has "
                            f"{sorted(names - {'extra'})}")
        return replace(base, **kwargs) if base is not None else cls(**kwargs)

    def validate(self) -> "SearchConfig":
        bits, ranks = self.bits_choices, self.rank_choices
        if not bits:
            raise ValueError("bits choices must not be empty")
        for b in bits:
            if isinstance(b, bool) or b not in SUPPORTED_BITS:
                raise ValueError(f"bits choice {b!r} is not supported; choose from {SUPPORTED_BITS}")
        if not ranks:
            raise ValueError("rank choices must not be empty")
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_RANK:
                raise ValueError(f"rank choice {r!r} is not supported; ranks are ints in "
                                 f"[0, {MAX_RANK}]")
        if self.default_rank not in ranks and self.default_rank != 0:
            raise ValueError(f"default_rank {self.default_rank} is not among the rank choices "
                             f"{list(ranks)}")
        if self.budget_bits is None and self.budget_mb is None and self.budget_latency_us is None:
            raise ValueError("give a budget: budget_bits, budget_mb or budget_latency_us")
        for name in ("budget_bits", "budget_mb", "budget_latency_us"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v <= 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got "
                             f"{self.group_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.lora_init not in ("svd", "zeros"):
            raise ValueError(f"lora_init must be 'svd' or 'zeros', got {self.lora_init!r}")
        for name in ("evaluations", "seq_len", "n_blocks", "latency_m", "hessian_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("refine_steps", "descent_rounds", "proxy_top", "proxy_steps", "seed", "proxy_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.select == "proxy" and self.proxy_top < 1:
            raise ValueError("select='proxy' needs proxy_top >= 1 (the finalists it fine-tunes)")
        if (isinstance(self.kl_slack, bool) or not isinstance(self.kl_slack, (int, float))
                or not math.isfinite(self.kl_slack) or self.kl_slack < 1):
            raise ValueError(f"kl_slack must be a number >= 1, got {self.kl_slack!r}")
        if (isinstance(self.kl_weight, bool) or not isinstance(self.kl_weight, (int, float))
                or not math.isfinite(self.kl_weight) or self.kl_weight < 0):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {self.kl_weight!r}")
        if self.popsize is not None and (not isinstance(self.popsize, int) or self.popsize < 2):
            raise ValueError(f"popsize must be an int >= 2 or None, got {self.popsize!r}")
        if not (isinstance(self.proxy_lr, (int, float)) and self.proxy_lr > 0):
            raise ValueError(f"proxy_lr must be a positive number, got {self.proxy_lr!r}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["bits_choices"], d["rank_choices"] = list(self.bits_choices), list(self.rank_choices)
        return d

    @property
    def uses_gptq(self) -> bool:
        from qra_kernels.quantizers import method_for_bits
        return any(method_for_bits(b, self.method) == "gptq" for b in self.bits_choices)

    def identity(self) -> Dict[str, Any]:
        """The settings an archive's evaluations depend on (see :data:`IDENTITY_FIELDS`)."""
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}
