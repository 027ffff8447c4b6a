"""The CUDA kernels (csrc/gemv.cu, gemm_mma.cu, backward.cu) against the reference backend on
the GPU: forward and backward, every bit-width and group size, decode (M <= 16: GEMV with
split-K and the fused LoRA epilogue) and larger M (tensor-core kernel for fp16/bf16, GEMV
passes for fp32), odd and real shapes, ranks 0/7/16, every activation and scale dtype.

Marked ``gpu``: skipped without CUDA (tests/conftest.py). The tests that need no GPU —
the backend reporting why it cannot run — are at the end and always run.
"""
import pytest
import torch

import qra_kernels as qk
from qra_kernels import _ext
from qra_kernels.backends import BackendUnavailableError, _REGISTRY, _ensure_loaded, set_backend

_ensure_loaded()
BITS = (2, 3, 4, 8)
needs_cuda_build = pytest.mark.skipif(
    _ext.extension() is None or not _ext.extension().build_info()["cuda_compiled"],
    reason="qra_kernels._C was built without CUDA")


def _case(n, k, g, bits, rank, m, x_dtype, lora_dtype=torch.float32, scale_dtype=torch.float16,
          lead=()):
    dev = "cuda"
    w = torch.randn(n, k, device=dev)
    qw = qk.quantize_weight(w, bits, group_size=g, method="rtn", scale_dtype=scale_dtype,
                            pad=k % g != 0)
    x = torch.randn(*lead, m, k, device=dev).to(x_dtype)
    a = (torch.randn(rank, k, device=dev) / k ** 0.5).to(lora_dtype)
    b = torch.randn(n, rank, device=dev).to(lora_dtype)
    bias = torch.randn(n, device=dev)
    return x, qw, a, b, bias


def _close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device
    if want.numel() == 0:
        return
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = want.float().abs().max().clamp_min(1.0)
    err = ((got.float() - want.float()).abs().max() / scale).item()
    assert err <= tol, f"max error {err:.3g} (relative to {scale.item():.3g}) > {tol}"


def _run_both(x, qw, a, b, bias, scaling=0.5, backward=True):
    cuda, ref = _REGISTRY["cuda"], _REGISTRY["reference"]
    n = qw.out_features
    args = (qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size, n, a, b, scaling)
    _close(cuda.forward(x, *args, bias), ref.forward(x, *args, bias), x.dtype)
    if backward:
        go = torch.randn(*x.shape[:-1], n, device=x.device).to(x.dtype)
        for got, want in zip(cuda.backward(go, x, *args, True, True),
                             ref.backward(go, x, *args, True, True)):
            _close(got, want, x.dtype if got is not None and got.shape == x.shape else a.dtype)


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", (1, 3, 16))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=("fp32", "fp16", "bf16"))
@pytest.mark.parametrize("n,k,g,rank", [(4096, 4096, 64, 16), (1000, 1000, 32, 7),
                                        (129, 200, 128, 0), (14336, 4096, 128, 16)])
def test_decode_matches_reference(bits, m, x_dtype, n, k, g, rank):
    _run_both(*_case(n, k, g, bits, rank, m, x_dtype))


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", (17, 64, 300))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=("fp32", "fp16", "bf16"))
@pytest.mark.parametrize("n,k,g,rank", [(4096, 4096, 64, 16), (1000, 1000, 32, 7),
                                        (130, 96, 32, 0)])
def test_larger_m_matches_reference(bits, m, x_dtype, n, k, g, rank):
    _run_both(*_case(n, k, g, bits, rank, m, x_dtype))


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scale_dtype", (torch.float16, torch.bfloat16), ids=("s16", "sbf16"))
@pytest.mark.parametrize("lora_dtype", (torch.float32, torch.bfloat16), ids=("lora32", "lorabf16"))
def test_dtypes_and_3d_inputs(bits, scale_dtype, lora_dtype):
    for m in (2, 40):
        _run_both(*_case(520, 384, 64, bits, 16, m, torch.bfloat16, lora_dtype, scale_dtype,
                         lead=(3,)))


@pytest.mark.gpu
@needs_cuda_build
def test_through_the_op_autograd_and_compile():
    x, qw, a, b, bias = _case(512, 640, 64, 3, 7, 5, torch.bfloat16, lead=(2,))
    results = {}
    for name in ("cuda", "reference"):
        set_backend(name)
        try:
            xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
            y = qk.qra_linear(xs, qw, as_, bs, scaling=0.5, bias=bias)
            y.float().square().sum().backward()
            results[name] = (y.detach(), xs.grad, as_.grad, bs.grad)
        finally:
            set_backend("auto")
    for got, want in zip(results["cuda"], results["reference"]):
        _close(got, want, got.dtype)
    set_backend("cuda")
    try:
        f = torch.compile(lambda t: qk.qra_linear(t, qw, a, b, scaling=0.5), fullgraph=True)
        _close(f(x), _REGISTRY["reference"].forward(x, qw.qweight, qw.scales, qw.zeros, 3, 64,
                                                     512, a, b, 0.5, None), x.dtype)
    finally:
        set_backend("auto")


@pytest.mark.gpu
@needs_cuda_build
def test_repeated_calls_reuse_no_stale_state():
    # The split-K partials and arrival counters are reset every call: the same input twice
    # must give the same output.
    x, qw, a, b, bias = _case(4096, 4096, 64, 4, 16, 1, torch.float16)
    cuda = _REGISTRY["cuda"]
    args = (x, qw.qweight, qw.scales, qw.zeros, 4, 64, 4096, a, b, 1.0, bias)
    y1, y2 = cuda.forward(*args), cuda.forward(*args)
    _close(y1, y2, torch.float16)


@pytest.mark.gpu
@needs_cuda_build
def test_auto_picks_cuda_on_gpu_and_rejects_cpu_tensors():
    from qra_kernels.backends import select_backend
    assert select_backend(torch.randn(2, 8, device="cuda")).name == "cuda"
    set_backend("cuda")
    try:
        with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
            select_backend(torch.randn(2, 8))
    finally:
        set_backend("auto")


def test_unavailable_cuda_backend_says_why():
    ok, why = _REGISTRY["cuda"].available()
    if ok:
        pytest.skip("the cuda backend is usable here")
    assert why
    with pytest.raises(BackendUnavailableError, match="cuda"):
        set_backend("cuda")
    assert "cuda" not in qk.build_info()["backends"]
