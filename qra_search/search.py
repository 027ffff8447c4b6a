"""``run_search``: the three QR-Adaptor stages end to end, against measured costs.

Order of work (each timed; see ``SearchResult.timings``):

0. ``quantize`` — every (layer, bits) quantized once (cached on disk with ``cache_dir``).
1. ``sensitivity`` — stage I (:mod:`qra_search.sensitivity`).
2. ``exploration`` — uniform baselines and sensitivity-greedy seeds (at the budget and at
   each baseline's memory, so the front is populated where it is compared), then CMA-ES
   (:mod:`qra_search.evolution`), all at the cheap fidelity (KL).
3. ``refinement`` — stage III, GP + constrained EI (:mod:`qra_search.refinement`).
4. ``proxy`` — the costly fidelity for the promising few: the ``proxy_top`` best feasible
   candidates and the uniform allocation at the budget get the same short LoRA fine-tune;
   ``best`` is the feasible one with the lowest validation loss.

Every evaluation goes through the :class:`~qra_search.archive.Archive` first, so a resumed
search recomputes nothing it has already measured.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from qra_kernels.format import SUPPORTED_BITS

from .allocation import Allocation, MAX_RANK, linear_shapes
from .archive import Archive, pareto_front
from .costs import CostModel, LatencyTable
from .evaluate import Evaluator, QuantCache, layer_groups, linear_modules, method_for
from .evolution import Budget, GeneSpace, explore
from .refinement import refine
from .sensitivity import Sensitivity, profile

MIB = 1 << 20


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


def check_choices(bits_choices: Sequence[int], rank_choices: Sequence[int]) -> None:
    if not bits_choices:
        raise ValueError("bits choices must not be empty")
    for b in bits_choices:
        if isinstance(b, bool) or b not in SUPPORTED_BITS:
            raise ValueError(f"bits choice {b!r} is not supported; choose from {SUPPORTED_BITS}")
    if not rank_choices:
        raise ValueError("rank choices must not be empty")
    for r in rank_choices:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_RANK:
            raise ValueError(f"rank choice {r!r} is not supported; ranks are ints in [0, {MAX_RANK}]")


def tokens_from(calibration, tokenizer=None, seq_len: int = 128, n_blocks: int = 8) -> torch.Tensor:
    """Token blocks ``[n, seq_len]`` from a LongTensor, a list of token-id lists, or texts."""
    if isinstance(calibration, torch.Tensor):
        t = calibration
        if t.dim() == 1:
            t = t[: (t.numel() // seq_len) * seq_len].view(-1, seq_len)
        if t.dim() != 2 or t.dtype != torch.long or t.shape[0] == 0 or t.shape[1] < 2:
            raise ValueError("calibration tokens must be a non-empty LongTensor [n_blocks, seq_len]")
        return t
    if isinstance(calibration, (list, tuple)) and calibration:
        if all(isinstance(x, str) for x in calibration):
            if tokenizer is None:
                raise ValueError("calibration texts need tokenizer=...")
            from .models import token_blocks
            return token_blocks(tokenizer, calibration, seq_len, n_blocks)
        if all(isinstance(x, (list, tuple)) for x in calibration):
            ids = [int(i) for x in calibration for i in x]
            return tokens_from(torch.tensor(ids, dtype=torch.long), None, seq_len)
    raise ValueError("calibration must be token ids (LongTensor or lists of ints) or a list of texts")


def _fingerprint(cache: QuantCache, tokens: torch.Tensor) -> Tuple[str, str]:
    h = hashlib.sha1()
    for n in cache.linears:
        h.update(n.encode() + cache.weight_hash(n).encode())
    return h.hexdigest()[:16], hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:16]


def run_search(model, calibration, budget_bits: Optional[float] = 4.0, *,
               budget_mb: Optional[float] = None, budget_latency_us: Optional[float] = None,
               tokenizer=None, bits_choices: Sequence[int] = (2, 3, 4, 8),
               rank_choices: Sequence[int] = (0, 4, 8, 16, 32, 64), default_rank: int = 16,
               granularity: str = "block", group_size: int = 64, method: str = "recommended",
               seed: int = 0, evaluations: int = 48, popsize: Optional[int] = None,
               refine_steps: int = 8, proxy_top: int = 2, proxy_steps: int = 10,
               proxy_lr: float = 5e-4, latency_table: Optional[Union[str, LatencyTable]] = None,
               latency_m: int = 1, training_memory: bool = False, archive: Optional[str] = None,
               resume: bool = False, cache_dir: Optional[str] = None, seq_len: int = 128,
               n_blocks: int = 8, progress: bool = True) -> SearchResult:
    """Search per-layer (bits, rank) for ``model`` under the given budget(s).

    ``budget_bits`` B: the quantized layers and adapters may use at most the bytes of the
    same layers stored uniformly at B bits (scales and zeros included) with rank
    ``default_rank`` adapters. ``budget_mb`` (MiB) is absolute; ``budget_latency_us`` sums
    the table's per-layer timings at ``latency_m`` rows. Given together, all apply.
    Calibration blocks: the first three quarters calibrate (KL, proxy training), the rest
    validate the proxy fine-tune.
    """
    check_choices(bits_choices, rank_choices)
    if default_rank not in rank_choices and default_rank != 0:
        raise ValueError(f"default_rank {default_rank} is not among the rank choices {list(rank_choices)}")
    if budget_bits is None and budget_mb is None and budget_latency_us is None:
        raise ValueError("give a budget: budget_bits, budget_mb or budget_latency_us")
    for name, v in (("budget_bits", budget_bits), ("budget_mb", budget_mb),
                    ("budget_latency_us", budget_latency_us)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not math.isfinite(v) or v <= 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if budget_latency_us is not None and latency_table is None:
        raise ValueError("budget_latency_us needs latency_table (a device name or a JSON path)")
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()

    tokens = tokens_from(calibration, tokenizer, seq_len, n_blocks)
    n_valid = max(1, tokens.shape[0] // 4) if tokens.shape[0] >= 2 else 0
    calib, valid = (tokens[:-n_valid], tokens[-n_valid:]) if n_valid else (tokens, tokens)
    shapes = linear_shapes(model)
    if not shapes:
        raise ValueError("the model has no linear layers to quantize")
    for n, (o, k) in shapes.items():
        if k % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={k} of {n!r}")
    if isinstance(latency_table, str):
        latency_table = LatencyTable.load(latency_table)
    costs = CostModel(shapes, group_size, training=training_memory, latency=latency_table,
                      latency_m=latency_m)
    groups = layer_groups(list(shapes), granularity)
    space0 = GeneSpace(groups, bits_choices, rank_choices, costs, Budget())

    # --- the budget, and whether anything fits it ------------------------------------------
    mem_limit = None
    if budget_bits is not None:
        mem_limit = costs.uniform_bytes(budget_bits, default_rank)
    if budget_mb is not None:
        b = int(budget_mb * MIB)
        mem_limit = b if mem_limit is None else min(mem_limit, b)
    budget = Budget(mem_limit, budget_latency_us)
    smallest = space0.cheapest()
    if mem_limit is not None and space0.memory(smallest) > mem_limit:
        need = space0.memory(smallest)
        bits_need = math.ceil(costs.bits_for_bytes(need, default_rank) * 100) / 100
        raise ValueError(
            f"the budget ({mem_limit / MIB:.2f} MiB) is infeasible: the smallest allocation "
            f"(all {min(bits_choices)}-bit, rank {min(rank_choices)}) needs {need / MIB:.2f} MiB; "
            f"the smallest feasible budget is --budget-bits {bits_need:.2f} "
            f"(--budget-mb {math.ceil(need / MIB * 100) / 100:.2f})")
    if budget_latency_us is not None:
        fastest = min(space0.latency(space0.uniform(b, r)) for b in space0.bits for r in space0.ranks)
        if fastest > budget_latency_us:
            raise ValueError(f"the latency budget {budget_latency_us:g} us is infeasible: the "
                             f"smallest feasible budget is --budget-latency-us {math.ceil(fastest):d}")

    # --- stage 0: quantize every (layer, bits) once ------------------------------------------
    linears = linear_modules(model, shapes)
    cache = QuantCache(linears, group_size, max(rank_choices), method, cache_dir, seed=0)
    jobs = [(n, b) for n in linears for b in sorted(set(bits_choices))]
    it = jobs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc="quantizing", unit="layer×bits")
    for n, b in it:
        cache.get(n, b)
    model.eval()
    ev = Evaluator(model, cache, calib, valid)
    timings["quantize"] = time.perf_counter() - t0

    model_fp, tok_fp = _fingerprint(cache, tokens)
    header = {"model": model_fp, "tokens": tok_fp, "budget_bytes": mem_limit,
              "budget_latency_us": budget_latency_us, "latency_m": latency_m,
              "latency_device": latency_table.device if latency_table else None,
              "bits": sorted(set(bits_choices)), "ranks": sorted(set(rank_choices)),
              "default_rank": default_rank, "granularity": granularity,
              "group_size": group_size, "method": method, "seed": seed,
              "evaluations": evaluations, "popsize": popsize, "refine_steps": refine_steps,
              "proxy_top": proxy_top, "proxy_steps": proxy_steps, "proxy_lr": proxy_lr,
              "training_memory": training_memory}
    arch = Archive(archive, header, resume=resume)
    counts = {"cheap": 0, "proxy": 0, "reused": 0}

    # --- stage I ---------------------------------------------------------------------------
    t = time.perf_counter()
    sens = profile(ev, groups, bits_choices, rank_choices, cache_dir, progress)
    timings["sensitivity"] = time.perf_counter() - t
    space = GeneSpace(groups, bits_choices, rank_choices, costs, budget, sens)

    def record(cfg, fidelity, stage, value):
        return arch.append({"key": space.key(cfg), "fidelity": fidelity, "stage": stage,
                            "quality": value, "memory_bytes": space.memory(cfg),
                            "latency_us": space.latency(cfg),
                            "config": {g: list(o) for g, o in cfg.items()}})

    def cheap(stage):
        def score(cfg):
            rec = arch.get(space.key(cfg), "cheap")
            if rec is not None:
                counts["reused"] += 1
                return rec["quality"]
            counts["cheap"] += 1
            return record(cfg, "cheap", stage, ev.kl(space.layers(cfg)))["quality"]
        return score

    # --- stage II: baselines, seeds, CMA-ES ------------------------------------------------
    t = time.perf_counter()
    baselines = [space.uniform(b, r) for b in space.bits
                 for r in sorted({space.ranks[0], default_rank} & set(space.ranks))]
    seeds = [space.greedy()]
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
    score_seed = cheap("seed")
    for cfg in baselines:
        cheap("uniform")(cfg)
    for cfg in seeds:
        score_seed(cfg)
    explored = explore(space, seeds[0], cheap("cma-es"), evaluations, seed, popsize,
                       progress=progress)
    timings["exploration"] = time.perf_counter() - t

    # --- stage III ------------------------------------------------------------------------
    t = time.perf_counter()
    # Only what stage II produced: on --resume the archive already holds this stage's own
    # evaluations, and seeing them early would change the GP's proposals.
    history = [(_cfg(r), r["quality"]) for r in arch.records
               if r["fidelity"] == "cheap" and r["stage"] != "gp"]
    refine(space, history, cheap("gp"), refine_steps, seed, progress=progress)
    timings["refinement"] = time.perf_counter() - t

    # --- costly fidelity for the promising few ----------------------------------------------
    t = time.perf_counter()
    cheap_recs = [r for r in arch.records if r["fidelity"] == "cheap"]
    feasible = sorted((r for r in cheap_recs if space.feasible(_cfg(r))),
                      key=lambda r: (r["quality"], r["key"]))
    finalists = [_cfg(r) for r in feasible[:max(1, proxy_top)]]
    for cfg in plastic:
        if space.key(cfg) not in {space.key(c) for c in finalists}:
            finalists.append(cfg)
    if budget_bits is not None and float(budget_bits).is_integer() and int(budget_bits) in space.bits:
        u = space.uniform(int(budget_bits), default_rank if default_rank in space.ranks else space.ranks[0])
        if space.feasible(u) and space.key(u) not in {space.key(c) for c in finalists}:
            finalists.append(u)
    proxy_loss = {}
    if proxy_top > 0 and proxy_steps >= 0:
        for cfg in finalists:
            k = space.key(cfg)
            rec = arch.get(k, "proxy")
            if rec is None:
                counts["proxy"] += 1
                loss = ev.proxy_finetune(space.layers(cfg), proxy_steps, proxy_lr, seed=seed,
                                         progress=progress)
                rec = record(cfg, "proxy", "proxy", loss)
            else:
                counts["reused"] += 1
            proxy_loss[k] = rec["quality"]
    ev.restore()
    timings["proxy"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    if proxy_loss:
        best_cfg = min(finalists, key=lambda c: (proxy_loss[space.key(c)], space.key(c)))
    else:
        best_cfg = finalists[0]

    meta = {"search": header, "method_per_bits": {str(b): method_for(b, method) for b in space.bits},
            "lora_init": "svd_of_quantization_error", "quality_metric": "kl_per_token"}

    def to_alloc(cfg, rec=None):
        layers = {n: {"bits": b, "rank": r, "shape": list(shapes[n])}
                  for n, (b, r) in space.layers(cfg).items()}
        obj = _objectives(space, cfg, arch)
        return Allocation(layers=layers, group_size=group_size, objectives=obj, meta=meta), obj

    # Pareto front over every cheap evaluation: (quality, memory[, latency]) all minimised.
    recs = {r["key"]: r for r in cheap_recs}
    keys = sorted(recs)
    pts = [[recs[k]["quality"], recs[k]["memory_bytes"]] +
           ([recs[k]["latency_us"]] if latency_table is not None else []) for k in keys]
    front = [to_alloc(_cfg(recs[keys[i]])) for i in pareto_front(pts)]
    front.sort(key=lambda ao: ao[1]["memory_bytes"])
    best, _ = to_alloc(best_cfg)
    budget_info = {"memory_bytes": mem_limit, "latency_us": budget_latency_us,
                   "budget_bits": budget_bits, "default_rank": default_rank, "latency_m": latency_m}
    return SearchResult(front, best, timings, sens, budget_info,
                        [to_alloc(c) for c in baselines], counts, archive)


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
