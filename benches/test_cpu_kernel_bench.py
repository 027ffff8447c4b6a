"""CPU microbenchmark, M = 1, 4096 x 4096 (pytest-benchmark; measures, asserts nothing about
speed): the C++ CPU kernel (``cpu`` backend, group 64, rank 0) at 2/3/4/8 bits against
torch's own CPU kernels on the same shape, all in one run and one process:
``torch._weight_int4pack_mm_for_cpu`` (4-bit, group 64), ``torch._weight_int8pack_mm``
(8-bit, per-channel) and dense ``torch.nn.functional.linear`` in fp32 and bf16.

    python -m pytest benches/test_cpu_kernel_bench.py --benchmark-only \
        --benchmark-columns=min,median,mean,rounds --benchmark-sort=name

Threads: torch's default (``torch.get_num_threads()``), used by every entry alike.

Cache protocol, both reported (``cache`` in the test id):
* ``hot``: the same operands every call — the weights stay in the last-level cache when
  they fit (4096x4096 at 4 bits is 8 MiB), so this measures compute;
* ``cold``: each call takes the next of several copies of the weights, enough copies to
  touch twice the L3 (read from /sys) per cycle, so every call reads its weights from
  memory — the decode situation, where a layer was last touched a whole forward pass ago.
"""
import glob
import math

import pytest
import torch

import qra_kernels as qk
from qra_kernels import _ext
from qra_kernels.backends import _REGISTRY, _ensure_loaded

_ensure_loaded()
N = K = 4096
GROUP = 64
pytestmark = pytest.mark.skipif(_ext.extension() is None, reason="qra_kernels._C not built")


CACHES = ("hot", "cold")


def _l3_bytes() -> int:
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KM")) * mult)
    return best or 32 << 20


def _copies(cache: str, nbytes: int) -> int:
    if cache == "hot":
        return 1
    return max(2, min(64, math.ceil(2 * _l3_bytes() / nbytes)))


def _rotating(fn, states):
    """fn(*state) on the next state each call."""
    it = [0]

    def call():
        i = it[0] = (it[0] + 1) % len(states)
        return fn(*states[i])
    return call


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    return torch.randn(N, K) / K ** 0.5


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_qra_cpu_kernel(benchmark, weight, bits, x_dtype, cache):
    qw = qk.quantize_weight(weight, bits, group_size=GROUP, method="rtn")
    x = torch.randn(1, K).to(x_dtype)
    cpu = _REGISTRY["cpu"]
    benchmark.group = f"M=1 4096x4096 {cache}"
    benchmark.extra_info.update(bits=bits, x_dtype=str(x_dtype), weight_bytes=qw.nbytes)
    states = [(x, qw.qweight.clone(), qw.scales.clone(), qw.zeros.clone(), bits, GROUP, N,
               None, None, 1.0, None) for _ in range(_copies(cache, qw.nbytes))]
    y = benchmark(_rotating(cpu.forward, states))
    ref = _REGISTRY["reference"].forward(x, qw.qweight, qw.scales, qw.zeros, bits, GROUP, N,
                                         None, None, 1.0, None)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_torch_int4pack_mm_for_cpu(benchmark, weight, x_dtype, cache):
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scales_zeros = torch.rand(K // GROUP, N, 2).to(x_dtype)
    x = torch.randn(1, K).to(x_dtype)
    benchmark.group = f"M=1 4096x4096 {cache}"
    nbytes = packed.numel() + scales_zeros.numel() * scales_zeros.element_size()
    states = [(x, packed.clone(), GROUP, scales_zeros.clone())
              for _ in range(_copies(cache, nbytes))]
    benchmark(_rotating(torch._weight_int4pack_mm_for_cpu, states))


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_torch_int8pack_mm(benchmark, weight, x_dtype, cache):
    w8 = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N).to(x_dtype)
    x = torch.randn(1, K).to(x_dtype)
    benchmark.group = f"M=1 4096x4096 {cache}"
    states = [(x, w8.clone(), scales) for _ in range(_copies(cache, w8.numel()))]
    benchmark(_rotating(torch._weight_int8pack_mm, states))


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_torch_dense(benchmark, weight, dtype, cache):
    w = weight.to(dtype)
    x = torch.randn(1, K).to(dtype)
    benchmark.group = f"M=1 4096x4096 {cache}"
    states = [(x, w.clone()) for _ in range(_copies(cache, w.numel() * w.element_size()))]
    benchmark(_rotating(torch.nn.functional.linear, states))
