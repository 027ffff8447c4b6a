"""``run_search``: the QR-Adaptor stages (and a measured descent after them) end to end,
against measured costs.

Order of work (each timed, with the process's peak resident memory after it; see
``SearchResult.timings`` and ``SearchResult.resources``):

0. ``quantize`` — every (layer, bits) quantized once (:mod:`qra_search.store`: on disk,
   one layer at a time; a killed run resumes at the layer in flight).
1. ``sensitivity`` — stage I (:mod:`qra_search.sensitivity`), resumable pass by pass.
2. ``exploration`` — uniform baselines and sensitivity-greedy seeds (at the budget, the
   first spending all of it; and at each baseline's memory, so the front is populated where
   it is compared), then CMA-ES from the first seed (:mod:`qra_search.evolution`), all at
   the cheap fidelity (KL).
3. ``refinement`` — stage III, GP + constrained EI (:mod:`qra_search.refinement`).
4. ``descent`` — stage IV, measured descent around the best candidate: one-level changes
   measured in context, then budget-neutral exchanges built from them
   (:mod:`qra_search.descent`); what the additive sensitivity model cannot see.
5. ``proxy`` — the costly fidelity for the promising few: the ``proxy_top`` best feasible
   candidates, the greedy and plasticity seeds and the uniform allocation at the budget get
   the same short LoRA fine-tune.

``best`` (``select``, :func:`select_finalist`): by default the finalist with the lowest
proxy validation loss + ``kl_weight`` (2.5) × KL (``"proxy+kl"``); or the lowest proxy loss
among the finalists whose KL is at most ``kl_slack`` times the lowest (``"proxy-near-kl"``);
or the feasible candidate with the lowest KL (``"kl"``); or the finalist with the lowest
proxy loss (``"proxy"``).

Every evaluation goes through the :class:`~qra_search.archive.Archive` first, so a resumed
search recomputes nothing it has already measured, and a finished search run again with
more ``evaluations`` continues from its archive (the archive header holds only the settings
evaluations depend on, :data:`qra_search.config.IDENTITY_FIELDS`). Everything the result
is built from is what *this* run visited (answered from the archive or computed), so a
resumed or extended run returns what an uninterrupted run with the same settings returns.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from qra_kernels.allocation import Allocation, linear_shapes

from .archive import Archive, pareto_front
from .config import SearchConfig
from .costs import CostModel, LatencyTable
from .descent import descend
from .evaluate import Evaluator, layer_groups, method_for
from .evolution import explore
from .genes import Budget, GeneSpace
from .refinement import refine
from .resources import StageClock
from .sensitivity import Sensitivity, profile
from .store import quant_store

MIB = 1 << 20
_UNSET = object()
logger = logging.getLogger("qra_search")


@dataclass
class SearchResult:
    pareto: List[Tuple[Allocation, Dict[str, Any]]]
    best: Allocation
    timings: Dict[str, float]
    sensitivity: Sensitivity
    budget: Dict[str, Any]
    baselines: List[Tuple[Allocation, Dict[str, Any]]] = field(default_factory=list)
    evaluations: Dict[str, int] = field(default_factory=dict)
    archive_path: Optional[str] = None
    config: Optional[SearchConfig] = None
    # {stage: {"peak_rss_mb", "rss_mb"}} of this run, and the seconds of every run of this
    # archive (resumed ones included) per stage.
    resources: Dict[str, Dict[str, float]] = field(default_factory=dict)
    total_timings: Dict[str, float] = field(default_factory=dict)


def check_choices(bits_choices, rank_choices) -> None:
    SearchConfig(bits_choices=tuple(bits_choices), rank_choices=tuple(rank_choices),
                 default_rank=0)


def tokens_from(calibration, tokenizer=None, seq_len: int = 128, n_blocks: int = 8) -> torch.Tensor:
    """Token blocks ``[n, seq_len]`` (:func:`qra_kernels.text.calibration_tokens`)."""
    from qra_kernels.text import calibration_tokens
    return calibration_tokens(calibration, tokenizer, seq_len, n_blocks)


def _tokens_fingerprint(tokens: torch.Tensor) -> str:
    return hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:16]


def run_search(model, calibration, budget_bits=_UNSET, *, config: Optional[SearchConfig] = None,
               tokenizer=None, latency_table=None, archive: Optional[str] = None,
               resume: bool = False, cache_dir: Optional[str] = None, progress: bool = True,
               hessian_calibration=None, **settings) -> SearchResult:
    """Search per-layer (bits, rank) for ``model`` under the configured budget(s).

    ``config``: a :class:`~qra_search.config.SearchConfig`; keyword ``settings`` (any of its
    fields, e.g. ``evaluations=24``) and ``budget_bits`` override it. ``budget_bits`` B: the
    quantized layers and adapters may use at most the bytes of the same layers stored
    uniformly at B bits (scales and zeros included) with rank ``default_rank`` adapters.
    ``budget_mb`` (MiB) is absolute; ``budget_latency_us`` sums the latency table's
    per-layer timings at ``latency_m`` rows. Given together, all apply. Calibration blocks:
    the first three quarters calibrate (KL, proxy training), the rest validate the proxy
    fine-tune. ``latency_table`` may be a :class:`LatencyTable` (else ``config``'s name or
    path is loaded). With a GPTQ method, ``hessian_calibration`` (token ids or texts, default
    the calibration blocks) is what its Hessians are measured on.
    """
    if budget_bits is not _UNSET:
        settings["budget_bits"] = budget_bits
    config = SearchConfig.from_kwargs(config, **settings)
    clock = StageClock()

    tokens = tokens_from(calibration, tokenizer, config.seq_len,
                         config.n_blocks + config.proxy_blocks)
    proxy_train = None
    if config.proxy_blocks:
        if tokens.shape[0] < config.n_blocks + config.proxy_blocks:
            raise ValueError(f"proxy_blocks={config.proxy_blocks} needs {config.n_blocks} + "
                             f"{config.proxy_blocks} calibration blocks, got {tokens.shape[0]}")
        proxy_train = tokens[config.n_blocks:config.n_blocks + config.proxy_blocks]
        tokens = tokens[:config.n_blocks]
    n_valid = max(1, tokens.shape[0] // 4) if tokens.shape[0] >= 2 else 0
    calib, valid = (tokens[:-n_valid], tokens[-n_valid:]) if n_valid else (tokens, tokens)
    shapes = linear_shapes(model)
    if not shapes:
        raise ValueError("the model has no linear layers to quantize")
    experts = [n for n, s in shapes.items() if len(s) == 3]
    if experts and config.uses_gptq:
        # GPTQ needs each expert's Hessian from the tokens routed to it: not measured yet.
        logger.warning("qra: the %d routed-expert groups (e.g. %s) are quantized with 'hqq' "
                       "where method %r asks for GPTQ (no per-expert Hessians yet)",
                       len(experts), experts[0], config.method)
    for n, s in shapes.items():
        if s[-1] % config.group_size:
            raise ValueError(f"group_size={config.group_size} does not divide "
                             f"in_features={s[-1]} of {n!r}")
    if latency_table is None and config.latency_table is not None:
        latency_table = config.latency_table
    if isinstance(latency_table, str):
        latency_table = LatencyTable.load(latency_table)
    if config.budget_latency_us is not None and latency_table is None:
        raise ValueError("budget_latency_us needs latency_table (a device name or a JSON path)")
    costs = CostModel(shapes, config.group_size, training=config.training_memory,
                      latency=latency_table, latency_m=config.latency_m)
    groups = layer_groups(list(shapes), config.granularity)
    space0 = GeneSpace(groups, config.bits_choices, config.rank_choices, costs, Budget())

    # --- the budget, and whether anything fits it ------------------------------------------
    mem_limit = None
    if config.budget_bits is not None:
        mem_limit = costs.uniform_bytes(config.budget_bits, config.default_rank)
    if config.budget_mb is not None:
        b = int(config.budget_mb * MIB)
        mem_limit = b if mem_limit is None else min(mem_limit, b)
    budget = Budget(mem_limit, config.budget_latency_us)
    smallest = space0.cheapest()
    if mem_limit is not None and space0.memory(smallest) > mem_limit:
        need = space0.memory(smallest)
        bits_need = math.ceil(costs.bits_for_bytes(need, config.default_rank) * 100) / 100
        raise ValueError(
            f"the budget ({mem_limit / MIB:.2f} MiB) is infeasible: the smallest allocation "
            f"(all {min(config.bits_choices)}-bit, rank {min(config.rank_choices)}) needs "
            f"{need / MIB:.2f} MiB; the smallest feasible budget is --budget-bits "
            f"{bits_need:.2f} (--budget-mb {math.ceil(need / MIB * 100) / 100:.2f})")
    if config.budget_latency_us is not None:
        fastest = min(space0.latency(space0.uniform(b, r))
                      for b in space0.bits for r in space0.ranks)
        if fastest > config.budget_latency_us:
            raise ValueError(f"the latency budget {config.budget_latency_us:g} us is infeasible: "
                             f"the smallest feasible budget is --budget-latency-us "
                             f"{math.ceil(fastest):d}")

    # --- stage 0: quantize every (layer, bits) once ----------------------------------------
    clock.start("quantize")
    hessian_tokens = None
    if config.uses_gptq:
        hessian_tokens = tokens if hessian_calibration is None else tokens_from(
            hessian_calibration, tokenizer, config.seq_len, config.hessian_blocks)
    store = quant_store(model, shapes, group_size=config.group_size, method=config.method,
                        cache_dir=cache_dir, max_rank=max(config.rank_choices),
                        hessian_tokens=hessian_tokens, progress=progress)
    header = {"model": store.floats.fingerprint, "tokens": _tokens_fingerprint(tokens),
              **config.identity()}
    if proxy_train is not None:
        header["proxy_tokens"] = _tokens_fingerprint(proxy_train)
    if hessian_tokens is not None:
        header["hessian_tokens"] = _tokens_fingerprint(hessian_tokens)
    arch = Archive(archive, header, resume=resume)
    clock.archive = arch
    counts = {"cheap": 0, "proxy": 0, "reused": 0}
    ev = None
    try:
        store.fill(config.bits_choices, progress=progress)
        model.eval()
        ev = Evaluator(model, store, calib, valid)
        clock.stop()

        # --- stage I -------------------------------------------------------------------------
        clock.start("sensitivity")
        sens = profile(ev, groups, config.bits_choices, config.rank_choices, cache_dir, progress)
        clock.stop()
        space = GeneSpace(groups, config.bits_choices, config.rank_choices, costs, budget, sens)
        visited: Dict[str, Dict[str, Any]] = {}  # key -> record, what this run looked at

        def record(cfg, fidelity, stage, value, seconds):
            return arch.append({"key": space.key(cfg), "fidelity": fidelity, "stage": stage,
                                "quality": value, "memory_bytes": space.memory(cfg),
                                "latency_us": space.latency(cfg), "seconds": round(seconds, 3),
                                "config": {g: list(o) for g, o in cfg.items()}})

        def cheap(stage):
            def score(cfg):
                k = space.key(cfg)
                rec = arch.get(k, "cheap")
                if rec is not None:
                    counts["reused"] += 1
                else:
                    counts["cheap"] += 1
                    t = time.perf_counter()
                    q = ev.kl(space.layers(cfg))
                    rec = record(cfg, "cheap", stage, q, time.perf_counter() - t)
                visited.setdefault(k, {**rec, "stage": stage})
                return rec["quality"]
            return score

        # --- stage II: baselines, seeds, CMA-ES --------------------------------------------
        clock.start("exploration")
        default_rank = config.default_rank
        baselines = [space.uniform(b, r) for b in space.bits
                     for r in sorted({space.ranks[0], default_rank} & set(space.ranks))]
        # The greedy seed spends the whole budget (fill): greedy alone stops where no move
        # is predicted to help, and the allocation a practitioner would build from the same
        # profile (qra_search.compare's "greedy") is where the search must start, not below.
        greedy = space.greedy()
        seeds = [space.fill(greedy)]
        if space.key(greedy) != space.key(seeds[0]):
            seeds.append(greedy)
        # Plasticity seeds: the same greedy with every adapter at least r, for each rank choice
        # 0 < r <= default_rank, so the costly fidelity also sees allocations that keep
        # training capacity (the cheap KL values an adapter only at its initialisation).
        plastic = []
        for floor in sorted(r for r in space.ranks if 0 < r <= default_rank):
            try:
                plastic.append(space.greedy(min_rank=floor))
            except ValueError:
                pass
        seeds += plastic
        for u in baselines:  # greedy at each baseline's memory: where the front is compared
            try:
                seeds.append(space.greedy(Budget(space.memory(u), None)))
            except ValueError:
                pass
        first = [("uniform", c) for c in baselines] + [("seed", c) for c in seeds]
        it = first
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(first, desc="uniform + seeds", unit="cand")
        for stage, cfg in it:
            cheap(stage)(cfg)
        explore(space, seeds[0], cheap("cma-es"), config.evaluations, config.seed,
                config.popsize, progress=progress)
        clock.stop()

        # --- stage III ---------------------------------------------------------------------
        clock.start("refinement")
        history = [(_cfg(r), r["quality"]) for r in visited.values()]
        refine(space, history, cheap("gp"), config.refine_steps, config.seed, progress=progress)
        clock.stop()

        # --- stage IV ----------------------------------------------------------------------
        clock.start("descent")
        feasible = sorted((r for r in visited.values() if space.feasible(_cfg(r))),
                          key=lambda r: (r["quality"], r["key"]))
        if feasible and config.descent_rounds:
            descend(space, _cfg(feasible[0]), feasible[0]["quality"], cheap("descent"),
                    config.descent_rounds, progress=progress)
        clock.stop()

        # --- costly fidelity for the promising few -------------------------------------------
        clock.start("proxy")
        feasible = sorted((r for r in visited.values() if space.feasible(_cfg(r))),
                          key=lambda r: (r["quality"], r["key"]))
        finalists = [_cfg(r) for r in feasible[:max(1, config.proxy_top)]]
        for cfg in [seeds[0]] + plastic:  # the greedy seed competes too
            if space.key(cfg) not in {space.key(c) for c in finalists}:
                finalists.append(cfg)
        bb = config.budget_bits
        if bb is not None and float(bb).is_integer() and int(bb) in space.bits:
            u = space.uniform(int(bb), default_rank if default_rank in space.ranks else space.ranks[0])
            if space.feasible(u) and space.key(u) not in {space.key(c) for c in finalists}:
                finalists.append(u)
        proxy_loss = {}
        if config.proxy_top > 0:
            for cfg in finalists:
                k = space.key(cfg)
                rec = arch.get(k, "proxy")
                if rec is None:
                    counts["proxy"] += 1
                    t = time.perf_counter()
                    loss = ev.finetune(space.layers(cfg), config.proxy_steps, config.proxy_lr,
                                       seed=config.seed, train_tokens=proxy_train,
                                       progress=progress)
                    rec = record(cfg, "proxy", "proxy", loss, time.perf_counter() - t)
                else:
                    counts["reused"] += 1
                proxy_loss[k] = rec["quality"]
        ev.restore()
        clock.stop()
    finally:
        if ev is not None:
            ev.restore()
        clock.close()

    kl_of = {space.key(c): arch.get(space.key(c), "cheap")["quality"] for c in finalists}
    best_cfg = select_finalist(finalists, space.key, kl_of, proxy_loss, config)
    meta = {"search": config.to_dict(),
            "method_per_bits": {str(b): method_for(b, config.method) for b in space.bits},
            "lora_init": config.lora_init, "quality_metric": "kl_per_token",
            "model_fingerprint": store.floats.fingerprint}

    def to_alloc(cfg):
        layers = {n: {"bits": b, "rank": r, "shape": list(shapes[n])}
                  for n, (b, r) in space.layers(cfg).items()}
        obj = _objectives(space, cfg, arch)
        return Allocation(layers=layers, group_size=config.group_size, objectives=obj,
                          meta=meta, method=config.method, lora_init=config.lora_init), obj

    # Pareto front over every cheap evaluation this run visited: (quality, memory[, latency]).
    keys = sorted(visited)
    pts = [[visited[k]["quality"], space.memory(_cfg(visited[k]))] +
           ([space.latency(_cfg(visited[k]))] if latency_table is not None else []) for k in keys]
    front = [to_alloc(_cfg(visited[keys[i]])) for i in pareto_front(pts)]
    front.sort(key=lambda ao: ao[1]["memory_bytes"])
    best, _ = to_alloc(best_cfg)
    budget_info = {"memory_bytes": mem_limit, "latency_us": config.budget_latency_us,
                   "budget_bits": config.budget_bits, "default_rank": default_rank,
                   "latency_m": config.latency_m}
    return SearchResult(front, best, clock.timings, sens, budget_info,
                        [to_alloc(c) for c in baselines], counts, archive, config,
                        clock.resources, arch.stage_seconds())


def select_finalist(finalists, key, kl_of: Dict[str, float], proxy_loss: Dict[str, float],
                    config: SearchConfig):
    """The chosen finalist under ``config.select`` (``finalists[0]`` is the feasible
    candidate with the lowest measured KL; ``kl_of`` and ``proxy_loss`` are keyed by
    ``key(cfg)``). Ties go to the smaller key, so the choice is deterministic."""
    if not proxy_loss or config.select == "kl":
        return finalists[0]
    eligible = [c for c in finalists if key(c) in proxy_loss]
    if config.select == "proxy+kl":
        return min(eligible, key=lambda c: (proxy_loss[key(c)] + config.kl_weight * kl_of[key(c)],
                                            key(c)))
    if config.select == "proxy-near-kl":
        floor = min(kl_of[key(c)] for c in eligible)
        eligible = [c for c in eligible if kl_of[key(c)] <= config.kl_slack * floor]
    return min(eligible, key=lambda c: (proxy_loss[key(c)], key(c)))


def _cfg(rec: dict) -> Dict[str, Tuple[int, int]]:
    return {g: (int(o[0]), int(o[1])) for g, o in rec["config"].items()}


def _objectives(space: GeneSpace, cfg, arch: Archive) -> Dict[str, Any]:
    k = space.key(cfg)
    cheap, proxy = arch.get(k, "cheap"), arch.get(k, "proxy")
    obj = {"quality": cheap["quality"] if cheap else None, "memory_bytes": space.memory(cfg),
           "latency_us": space.latency(cfg), "within_budget": space.feasible(cfg)}
    if proxy is not None:
        obj["proxy_loss"] = proxy["quality"]
    return obj
