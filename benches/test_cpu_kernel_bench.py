"""CPU microbenchmark, M = 1, 4096 x 4096 (pytest-benchmark; measures, asserts nothing about
speed): the C++ CPU kernel (``cpu`` backend, group 64, rank 0) at 2/3/4/8 bits against
torch's own CPU kernels on the same shape, all in one run and one process:
``torch._weight_int4pack_mm_for_cpu`` (4-bit, group 64), ``torch._weight_int8pack_mm``
(8-bit, per-channel) and dense ``torch.nn.functional.linear`` in fp32 and bf16.

    python -m pytest benches/test_cpu_kernel_bench.py --benchmark-only \
        --benchmark-columns=min,median,mean,rounds --benchmark-sort=name

Threads: torch's default (``torch.get_num_threads()``), used by every entry alike.
"""
import pytest
import torch

import qra_kernels as qk
from qra_kernels import _ext
from qra_kernels.backends import _REGISTRY, _ensure_loaded

_ensure_loaded()
N = K = 4096
GROUP = 64
pytestmark = pytest.mark.skipif(_ext.extension() is None, reason="qra_kernels._C not built")


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    return torch.randn(N, K) / K ** 0.5


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_qra_cpu_kernel(benchmark, weight, bits, x_dtype):
    qw = qk.quantize_weight(weight, bits, group_size=GROUP, method="rtn")
    x = torch.randn(1, K).to(x_dtype)
    cpu = _REGISTRY["cpu"]
    benchmark.group = "M=1 4096x4096"
    benchmark.extra_info.update(bits=bits, x_dtype=str(x_dtype), weight_bytes=qw.nbytes)
    y = benchmark(cpu.forward, x, qw.qweight, qw.scales, qw.zeros, bits, GROUP, N, None, None,
                  1.0, None)
    ref = _REGISTRY["reference"].forward(x, qw.qweight, qw.scales, qw.zeros, bits, GROUP, N,
                                         None, None, 1.0, None)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_torch_int4pack_mm_for_cpu(benchmark, weight, x_dtype):
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scales_zeros = torch.rand(K // GROUP, N, 2).to(x_dtype)
    x = torch.randn(1, K).to(x_dtype)
    benchmark.group = "M=1 4096x4096"
    benchmark(torch._weight_int4pack_mm_for_cpu, x, packed, GROUP, scales_zeros)


@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_torch_int8pack_mm(benchmark, weight, x_dtype):
    w8 = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N).to(x_dtype)
    x = torch.randn(1, K).to(x_dtype)
    benchmark.group = "M=1 4096x4096"
    benchmark(torch._weight_int8pack_mm, x, w8, scales)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_torch_dense(benchmark, weight, dtype):
    w = weight.to(dtype)
    x = torch.randn(1, K).to(dtype)
    benchmark.group = "M=1 4096x4096"
    benchmark(torch.nn.functional.linear, x, w)
