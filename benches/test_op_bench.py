"""pytest-benchmark microbenchmarks of ``y = x·dequant(W)ᵀ + s·(x·Aᵀ)·Bᵀ``: every qra
backend usable here and every installed peer × projection shape × bits × rank × M.

    python -m pytest benches/test_op_bench.py --benchmark-only \\
        --benchmark-group-by=param:shape,param:M --benchmark-columns=min,median,rounds

The sweep is chosen by environment variables (defaults in brackets):
``QRA_BENCH_MODELS`` [SmolLM2-135M] (also Qwen3-4B, Llama-3-8B, tiny),
``QRA_BENCH_BITS`` [2,3,4,8], ``QRA_BENCH_RANKS`` [0,16], ``QRA_BENCH_MS`` [1,16,256],
``QRA_BENCH_GROUP`` [64], ``QRA_BENCH_DEVICE`` [cuda if available, else cpu].

Each benchmarked call takes the next of several copies of its operands, enough to cycle
through twice the last-level cache (the protocol of :mod:`qra_kernels.bench.timing`), so
weights come from memory as they do in decoding. ``extra_info`` of every entry holds the
bytes read, the achieved GB/s, its fraction of the measured copy bandwidth (computed
from the median) and the call's peak memory. ``qra bench`` runs the same sweep with its
own report; this file is for pytest-benchmark's comparison and history tools.
"""
import itertools
import math
import os

import pytest
import torch

from qra_kernels.bench import impls, machine, timing
from qra_kernels.bench.shapes import shapes_for


def _env_list(name, default, cast=str):
    return [cast(v) for v in os.environ.get(name, default).split(",") if v.strip()]


DEVICE = torch.device(os.environ.get("QRA_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
ACT_DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
MODELS = _env_list("QRA_BENCH_MODELS", "SmolLM2-135M")
BITS = _env_list("QRA_BENCH_BITS", "2,3,4,8", int)
RANKS = _env_list("QRA_BENCH_RANKS", "0,16", int)
MS = _env_list("QRA_BENCH_MS", "1,16,256", int)
GROUP = int(os.environ.get("QRA_BENCH_GROUP", "64"))

SHAPES = shapes_for(MODELS)
PEERS, PEER_INFO = impls.peer_impls(DEVICE)
IMPLS = [i for i in impls.qra_impls() + PEERS if i.unavailable is None]


def _cases():
    for impl in IMPLS:
        for bits in ((None,) if impl.float_weight else BITS):
            if impl.why_not(bits, DEVICE) is None:
                tag = "float" if bits is None else f"{bits}b"
                yield pytest.param(impl, bits, id=f"{impl.name}-{tag}")


@pytest.fixture(scope="session")
def copy_bandwidth():
    return machine.copy_bandwidth(DEVICE)


@pytest.fixture(scope="session")
def cache_bytes():
    return (machine.gpu_l2_bytes(DEVICE) if DEVICE.type == "cuda"
            else machine.last_level_cache_bytes())


_BASES = {}


def _base(impl, shape, bits):
    """The implementation's stored weight for this shape, prepared once per session."""
    key = (impl.name, shape, bits)
    if key not in _BASES:
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(shape.out_features, shape.in_features, generator=gen)
             / math.sqrt(shape.in_features)).to(DEVICE)
        _BASES[key] = impl.prepare(w, bits, GROUP, impl.activation_dtype or ACT_DTYPE)
    return _BASES[key]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@pytest.mark.parametrize("impl,bits", list(_cases()))
def test_linear(benchmark, impl, bits, shape, rank, M, copy_bandwidth, cache_bytes):
    try:
        base = _base(impl, shape, bits)
    except impls.CannotRun as e:
        pytest.skip(f"{impl.name} cannot run this case: {e}")
    dtype = impl.activation_dtype or ACT_DTYPE
    k, n = shape.in_features, shape.out_features
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, k, generator=gen).to(DEVICE, dtype)
    lora = None
    if rank:
        lora = ((torch.randn(rank, k, generator=gen) / math.sqrt(k)).to(DEVICE, dtype),
                (torch.randn(n, rank, generator=gen) / math.sqrt(rank)).to(DEVICE, dtype), 0.5)
    p = impl.bind(base, x, lora)
    y = p.call(p.state)
    assert tuple(y.shape) == (M, n)
    adapter = 0 if lora is None else sum(t.numel() * t.element_size() for t in lora[:2])
    bytes_read = p.weight_bytes + x.numel() * x.element_size() + adapter
    memory = timing.peak_call_memory(p.call, p.state, DEVICE)
    states = timing.make_copies(p.state, bytes_read, cache_bytes, max_copies=1024,
                                memory_budget=256 << 20,
                                call_s=timing.one_call_s(p.call, p.state, DEVICE),
                                max_pass_s=0.05)
    it = itertools.cycle(states)

    def call():
        out = p.call(next(it))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out

    benchmark.group = f"{shape.name} M={M} r={rank}"
    benchmark(call)
    median = benchmark.stats.stats.median
    achieved = bytes_read / median / 1e9
    benchmark.extra_info.update(
        implementation=impl.name, bits=bits, rank=rank, M=M, shape=shape.name,
        weight_bytes=p.weight_bytes, bytes_read=bytes_read, achieved_GBps=achieved,
        bandwidth_fraction=achieved / copy_bandwidth["copy_bandwidth_GBps"],
        copies=len(states), cold_cache=len(states) * bytes_read >= 2 * cache_bytes,
        peak_call_memory_bytes=memory, device=str(DEVICE),
        package_version=impls.package_version(impl.package))
