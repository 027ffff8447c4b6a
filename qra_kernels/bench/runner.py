"""The sweep: every implementation × shape × bits × rank × M, timed and memory-measured
under one protocol (:mod:`qra_kernels.bench.timing`) against one hardware limit
(:mod:`qra_kernels.bench.machine`).

A row's ``bytes_read`` is what the operation cannot avoid reading: the stored weight in
that implementation's own format (packed codes + scales + zeros, or the float matrix),
the activations, and the adapter when there is one. ``achieved_GBps = bytes_read / time``
and ``bandwidth_fraction = achieved_GBps / copy_bandwidth``. At small M this says how
close a kernel is to the memory system; at large M the work is compute-bound and the
fraction falls, as it should.
"""
from __future__ import annotations

import datetime
import gc
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..backends import BackendUnavailableError
from . import impls as impls_mod
from . import machine, timing
from .shapes import Shape, shapes_for

__all__ = ["SuiteConfig", "QUICK", "FULL", "run_suite", "ProgressFn"]

ProgressFn = Callable[[int, int, str], None]


@dataclass
class SuiteConfig:
    models: Tuple[str, ...]
    layers: Tuple[str, ...] = ()          # empty: every distinct projection of each model
    bits: Tuple[int, ...] = (2, 3, 4, 8)
    ranks: Tuple[int, ...] = (0, 16)
    ms: Tuple[int, ...] = (1, 16, 256)
    group_size: int = 64
    device: str = "cpu"
    activation_dtype: str = "float32"     # the run's x dtype (peers with a fixed one override)
    min_time_s: float = 0.1               # per timed case, at least this many seconds of passes
    max_rounds: int = 15
    max_copies: int = 1024                # cache protocol caps (timing.make_copies)
    copies_memory_budget: int = 256 << 20
    max_pass_s: float = 1.0               # ... and a pass over the copies takes at most this
    implementations: Tuple[str, ...] = () # empty: every qra backend and every peer
    peers: bool = True
    seed: int = 0

    def validate(self) -> None:
        from ..format import check_bits, check_group_size
        for b in self.bits:
            check_bits(b, "bits")
        check_group_size(self.group_size)
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise ValueError(f"ranks must be ints >= 0, got {r!r}")
        for m in self.ms:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"ms (rows of x) must be ints >= 1, got {m!r}")
        if self.activation_dtype not in _DTYPES:
            raise ValueError(f"activation_dtype must be one of {sorted(_DTYPES)}, "
                             f"got {self.activation_dtype!r}")
        if self.min_time_s <= 0 or self.max_rounds < 1 or self.max_pass_s <= 0:
            raise ValueError("min_time_s and max_pass_s must be > 0 and max_rounds >= 1")
        if self.max_copies < 1:
            raise ValueError(f"max_copies must be >= 1, got {self.max_copies}")
        shapes_for(self.models, self.layers)  # raises on unknown names


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# --quick: the SmolLM2-135M projections, decode and a small batch, ranks 0 and 16 — a few
# minutes on a shared 2-core CPU with every CPU peer.
QUICK = SuiteConfig(models=("SmolLM2-135M",), layers=("q_proj", "gate_proj", "down_proj"),
                    ranks=(0, 16), ms=(1, 64), min_time_s=0.05, max_rounds=7, max_pass_s=0.15)
# The full sweep (what a GPU session runs): all three models, ranks 0/8/16/64, M 1..4096.
FULL = SuiteConfig(models=("SmolLM2-135M", "Qwen3-4B", "Llama-3-8B"),
                   ranks=(0, 8, 16, 64), ms=(1, 4, 16, 64, 256, 1024, 4096))


def _cases(config: SuiteConfig, impl_list: Sequence[impls_mod.Impl], shapes: Sequence[Shape],
           device: torch.device, peer_info: Dict[str, dict]
           ) -> List[Tuple[Shape, impls_mod.Impl, Optional[int]]]:
    """(shape, implementation, bits) triples that can run here; a float-weight peer runs
    once per shape. What cannot run (device, bit-width) is noted once in ``peer_info``
    instead of filling the report with empty rows."""
    out = []
    for impl in impl_list:
        for bits in ((None,) if impl.float_weight else config.bits):
            reason = impl.why_not(bits, device)
            if reason:
                if impl.name in peer_info:
                    _note_cannot_run(peer_info[impl.name], bits, reason)
                continue
            out.extend((shape, impl, bits) for shape in shapes)
    # Shape-major order: one weight matrix alive at a time, progress reads naturally.
    order = {s: i for i, s in enumerate(shapes)}
    out.sort(key=lambda c: order[c[0]])
    return out


def _select(all_impls: List[impls_mod.Impl], names: Sequence[str]) -> List[impls_mod.Impl]:
    if not names:
        return all_impls
    known = {i.name: i for i in all_impls}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; choose from {sorted(known)}")
    return [known[n] for n in names]


def run_suite(config: SuiteConfig, progress: Optional[ProgressFn] = None,
              command: str = "") -> dict:
    """Run the sweep on this machine; returns the report (a JSON-ready dict)."""
    config.validate()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    act_dtype = _DTYPES[config.activation_dtype]
    started = datetime.datetime.now(datetime.timezone.utc)

    qra = impls_mod.qra_impls()
    peers, peer_info = impls_mod.peer_impls(device) if config.peers else ([], {})
    impl_list = _select(qra + peers, config.implementations)
    shapes = shapes_for(config.models, config.layers)
    cases = _cases(config, impl_list, shapes, device, peer_info)

    limit = machine.copy_bandwidth(device)
    bw = limit["copy_bandwidth_GBps"]
    cache_bytes = (machine.gpu_l2_bytes(device) if device.type == "cuda"
                   else machine.last_level_cache_bytes())
    gen = torch.Generator(device="cpu").manual_seed(config.seed)

    rows: List[dict] = []
    total = len(cases) * len(config.ranks) * len(config.ms)
    done = 0
    for shape, impl, bits in cases:
        n, k = shape.out_features, shape.in_features
        x_dtype = impl.activation_dtype or act_dtype
        common = dict(implementation=impl.name, family=impl.family, model=shape.model,
                      layer=shape.layer, out_features=n, in_features=k, bits=bits,
                      group_size=None if impl.float_weight else config.group_size,
                      activation_dtype=str(x_dtype).replace("torch.", ""))
        # Weights at the scale of a trained projection (std ~ 1/sqrt(K)).
        weight = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device)
        try:
            base = impl.prepare(weight, bits, config.group_size, x_dtype)
            prep_error = None
        except impls_mod.CannotRun as e:
            base, prep_error = None, str(e)
        del weight
        for rank in config.ranks:
            lora = None
            if rank:
                a = (torch.randn(rank, k, generator=gen) / math.sqrt(k)).to(device, x_dtype)
                b = (torch.randn(n, rank, generator=gen) / math.sqrt(rank)).to(device, x_dtype)
                lora = (a, b, 0.5)
            for m in config.ms:
                done += 1
                label = f"{impl.name} {shape.name} bits={bits} r={rank} M={m}"
                if progress:
                    progress(done, total, label)
                row = dict(common, rank=rank, M=m)
                if base is None:
                    rows.append(dict(row, status="cannot_run", reason=prep_error))
                    if impl.family == "peer" and peer_info.get(impl.name) is not None:
                        _note_cannot_run(peer_info[impl.name], bits, prep_error)
                    continue
                x = torch.randn(m, k, generator=gen).to(device, x_dtype)
                rows.append(dict(row, **_measure(impl, base, x, n, lora, device, cache_bytes, bw,
                                                 config)))
                if rows[-1]["status"] != "ok" and impl.family == "peer":
                    _note_cannot_run(peer_info[impl.name], bits, rows[-1]["reason"])
        del base
        gc.collect()

    backends = {}
    for impl in qra:
        declined = sorted({(r["M"], r["reason"]) for r in rows
                           if r["implementation"] == impl.name and r["status"] != "ok"})
        backends[impl.name.split(":", 1)[1]] = {
            "usable_here": impl.unavailable is None, "unavailable_reason": impl.unavailable,
            "could_not_run": [{"M": m, "reason": why} for m, why in declined]}
    return {
        "schema": "qra-bench/1",
        "command": command,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "machine": machine.describe(device),
        "hardware_limit": limit,
        "cache_protocol": {
            "last_level_cache_bytes": cache_bytes,
            "rule": "each timed pass cycles through enough independent copies of the operands "
                    "to touch >= 2x the last-level cache, so weights come from memory",
        },
        "bytes_read": "stored weight (its own format) + x + LoRA A and B; output not counted",
        "backends": backends,
        "peers": peer_info,
        "rows": rows,
    }


def _note_cannot_run(info: dict, bits, reason) -> None:
    entry = {"bits": bits, "reason": reason}
    if entry not in info["could_not_run"]:
        info["could_not_run"].append(entry)


def _measure(impl, base, x, n, lora, device, cache_bytes, bw_GBps, config) -> dict:
    prepared = impl.bind(base, x, lora)
    adapter_bytes = 0 if lora is None else sum(t.numel() * t.element_size() for t in lora[:2])
    bytes_read = prepared.weight_bytes + x.numel() * x.element_size() + adapter_bytes
    try:
        out = prepared.call(prepared.state)  # first call: compile/autotune/lazy init
        if tuple(out.shape) != (x.shape[0], n):
            raise RuntimeError(f"output has shape {tuple(out.shape)}, expected "
                               f"{(x.shape[0], n)}")
        del out
        memory = timing.peak_call_memory(prepared.call, prepared.state, device)
        call_s = timing.one_call_s(prepared.call, prepared.state, device)
        states = timing.make_copies(prepared.state, bytes_read, cache_bytes,
                                    max_copies=config.max_copies,
                                    memory_budget=config.copies_memory_budget,
                                    call_s=call_s, max_pass_s=config.max_pass_s)
        t = timing.time_calls(prepared.call, states, device, bytes_read, cache_bytes,
                              min_time_s=config.min_time_s, max_rounds=config.max_rounds)
        del states
    except BackendUnavailableError as e:
        # A backend that declines this call (e.g. a decode kernel asked for large M) is a
        # limit of that backend, not a failure.
        return {"status": "cannot_run", "reason": impls_mod._one_line(e)}
    except Exception as e:  # noqa: BLE001 - a failing implementation is a result, not a crash
        return {"status": "error", "reason": impls_mod._one_line(e)}
    achieved = bytes_read / t.median_s / 1e9
    return {
        "status": "ok",
        "median_us": t.median_s * 1e6,
        "min_us": t.min_s * 1e6,
        "rounds": t.rounds,
        "copies": t.copies,
        "cold_cache": t.cold_cache,
        "timer": t.timer,
        "weight_bytes": prepared.weight_bytes,
        "bytes_read": bytes_read,
        "achieved_GBps": achieved,
        "bandwidth_fraction": achieved / bw_GBps,
        "peak_call_memory_bytes": memory,
    }


def with_overrides(config: SuiteConfig, **kw) -> SuiteConfig:
    """``config`` with the given fields replaced (``None`` values ignored)."""
    return replace(config, **{k: v for k, v in kw.items() if v is not None})
