"""The C++ CPU kernel (csrc/cpu) against the reference backend: forward and backward, every
bit-width and group size, odd shapes, ranks 0/7/16, fp32/bf16 activations, the AVX-512 (with and
without BF16), AVX2 and portable builds, one threaded shape, and its validation."""
import pytest
import torch

import qra_kernels as qk
from qra_kernels import _ext
from qra_kernels.backends import BackendUnavailableError, _REGISTRY, _ensure_loaded, set_backend

_ensure_loaded()
pytestmark = pytest.mark.skipif(_ext.extension() is None,
                                reason="qra_kernels._C was not built (pure-Python install)")

BITS = (2, 3, 4, 8)


def _backends():
    return _REGISTRY["cpu"], _REGISTRY["reference"]


def _case(n, k, g, bits, rank, m, x_dtype=torch.float32, lora_dtype=torch.float32,
          scale_dtype=torch.float16, lead=()):
    w = torch.randn(n, k)
    qw = qk.quantize_weight(w, bits, group_size=g, method="rtn", scale_dtype=scale_dtype,
                            pad=k % g != 0)
    x = torch.randn(*lead, m, k).to(x_dtype)
    a = (torch.randn(rank, k) / k ** 0.5).to(lora_dtype)
    b = torch.randn(n, rank).to(lora_dtype)
    bias = torch.randn(n)
    return x, qw, a, b, bias


def _close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.numel() == 0:
        return
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= tol, f"max error {err:.3g} (relative to {scale:.3g}) > {tol}"


# (N, K, group, rank, M): odd N (vector tail), K not a multiple of the group (padding),
# rank 0 / 7 / 16, M covering the 4-, 2- and 1-row blocks and two 8-row passes of the
# backward.
SHAPES = [(37, 100, 32, 7, 3), (64, 256, 64, 0, 1), (130, 200, 128, 16, 11),
          (16, 128, 32, 16, 1), (9, 64, 64, 7, 2)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g,rank,m", SHAPES)
@pytest.mark.parametrize("isa", ["native", "avx512", "avx2", "generic"])
def test_forward_backward_match_reference(bits, n, k, g, rank, m, isa, monkeypatch):
    if isa != "native":  # caps the build the C++ dispatcher picks, read at every call
        monkeypatch.setenv("QRA_CPU_ISA", isa)
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(n, k, g, bits, rank, m)
    args = (qw.qweight, qw.scales, qw.zeros, bits, g, n, a, b, 0.75)
    _close(cpu.forward(x, *args, bias), ref.forward(x, *args, bias), x.dtype)
    go = torch.randn(m, n)
    got = cpu.backward(go, x, *args, True, True)
    want = ref.backward(go, x, *args, True, True)
    for gt, wt in zip(got, want):
        _close(gt, wt, torch.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("x_dtype,lora_dtype,scale_dtype",
                         [(torch.bfloat16, torch.bfloat16, torch.bfloat16),
                          (torch.bfloat16, torch.float32, torch.float16),
                          (torch.float16, torch.float32, torch.bfloat16)])
def test_low_precision_activations(bits, x_dtype, lora_dtype, scale_dtype):
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(48, 96, 32, bits, 7, 2, x_dtype, lora_dtype, scale_dtype,
                              lead=(2,))
    args = (qw.qweight, qw.scales, qw.zeros, bits, 32, 48, a, b, 2.0)
    _close(cpu.forward(x, *args, bias.to(x_dtype)), ref.forward(x, *args, bias.to(x_dtype)),
           x_dtype)
    go = torch.randn(2, 2, 48).to(x_dtype)
    for gt, wt in zip(cpu.backward(go, x, *args, True, True),
                      ref.backward(go, x, *args, True, True)):
        _close(gt, wt, x_dtype)


@pytest.mark.parametrize("bits", (3, 4))
def test_threaded_shape(bits):
    # N * Kp >= 2^20 takes the threaded path (threads split the columns / the groups).
    torch.set_num_threads(2)
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(1040, 1024, 64, bits, 16, 5)
    args = (qw.qweight, qw.scales, qw.zeros, bits, 64, 1040, a, b, 0.5)
    _close(cpu.forward(x, *args, bias), ref.forward(x, *args, bias), x.dtype)
    go = torch.randn(5, 1040)
    _close(cpu.backward(go, x, *args, True, False)[0], ref.backward(go, x, *args, True, False)[0],
           torch.float32)


def test_through_the_op_with_autograd():
    x, qw, a, b, bias = _case(40, 72, 32, 3, 7, 3, lead=(2,))
    grads = {}
    for name in ("cpu", "reference"):
        set_backend(name)
        try:
            xs, as_, bs, biass = (t.clone().requires_grad_() for t in (x, a, b, bias))
            y = qk.qra_linear(xs, qw, as_, bs, scaling=0.5, bias=biass)
            (y * torch.linspace(-1, 1, 40)).sum().backward()
            grads[name] = (y.detach(), xs.grad, as_.grad, bs.grad, biass.grad)
        finally:
            set_backend("auto")
    for got, want in zip(grads["cpu"], grads["reference"]):
        _close(got, want, torch.float32)


def test_zero_rows_and_rank_zero_gradients():
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(16, 64, 32, 4, 0, 0)
    args = (qw.qweight, qw.scales, qw.zeros, 4, 32, 16, a, b, 1.0)
    assert cpu.forward(x, *args, None).shape == (0, 16)
    gx, ga, gb = cpu.backward(torch.randn(0, 16), x, *args, True, True)
    assert gx.shape == (0, 64) and ga.shape == (0, 64) and gb.shape == (16, 0)


def test_auto_routes_small_calls_here_and_large_ones_elsewhere():
    from qra_kernels.backends import select_backend
    from qra_kernels.backends.cpu_backend import MAX_ROWS
    assert select_backend(torch.randn(MAX_ROWS, 8)).name == "cpu"
    assert select_backend(torch.randn(MAX_ROWS + 1, 8)).name != "cpu"
    set_backend("cpu")
    try:
        with pytest.raises(BackendUnavailableError, match="rows"):
            select_backend(torch.randn(2, MAX_ROWS, 8))
    finally:
        set_backend("auto")


def test_bad_packed_tensors_raise_clear_errors():
    cpu, _ = _backends()
    x, qw, a, b, bias = _case(16, 64, 32, 4, 2, 1)
    with pytest.raises(ValueError, match="qweight"):
        cpu.forward(x, qw.qweight[:-1], qw.scales, qw.zeros, 4, 32, 16, a, b, 1.0, None)
    with pytest.raises(ValueError, match="qweight"):  # wrong bits for the stored words
        cpu.forward(x, qw.qweight, qw.scales, qw.zeros, 8, 32, 16, a, b, 1.0, None)
    with pytest.raises(ValueError, match="scales"):
        cpu.forward(x, qw.qweight, qw.scales[:, :8], qw.zeros, 4, 32, 16, a, b, 1.0, None)
    with pytest.raises(TypeError, match="zeros"):
        cpu.forward(x, qw.qweight, qw.scales, qw.zeros.float(), 4, 32, 16, a, b, 1.0, None)
    with pytest.raises(ValueError, match="lora_B"):
        cpu.forward(x, qw.qweight, qw.scales, qw.zeros, 4, 32, 16, a, b[:, :1], 1.0, None)
    with pytest.raises(ValueError, match="bias"):
        cpu.forward(x, qw.qweight, qw.scales, qw.zeros, 4, 32, 16, a, b, 1.0, bias[:3])
    with pytest.raises(ValueError, match="group_size"):
        cpu.forward(x, qw.qweight, qw.scales, qw.zeros, 4, 48, 16, a, b, 1.0, None)


def test_build_info_reports_the_cpu_extension():
    info = qk.build_info()
    assert info["cpu_extension"] is True
    assert "cpu" in info["backends"]
    assert _ext.extension().build_info()["cpu_isa"] in ("avx512bf16", "avx512", "avx2", "generic")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g,rank,m", SHAPES)
def test_bf16_activations_on_odd_shapes(bits, n, k, g, rank, m):
    # bf16 x takes the AVX-512 BF16 dot-product path where the CPU has it (2/3/4-bit).
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(n, k, g, bits, rank, m, torch.bfloat16)
    args = (qw.qweight, qw.scales, qw.zeros, bits, g, n, a, b, 0.75)
    _close(cpu.forward(x, *args, bias), ref.forward(x, *args, bias), x.dtype)
    # And the exact fp32 result of the kernel itself, before the cast to bf16.
    x32 = x.float()
    _close(cpu.forward(x32, *args, bias), ref.forward(x32, *args, bias), torch.float32)
