"""The ``triton`` backend in the registry: when it runs, and the op through it.

On this CPU-only machine the kernels run interpreted, which the backend offers only under
TRITON_INTERPRET=1 (read at call time, so each test sets it with monkeypatch).
"""
import pytest
import torch

import qra_kernels as qk
from qra_kernels import backends
from qra_kernels.backends import BackendUnavailableError, select_backend

pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def restore_backend():
    saved = backends._selected
    yield
    backends._selected = saved


@pytest.fixture
def triton_backend():
    backends._ensure_loaded()
    return backends._REGISTRY["triton"]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_registered_and_listed(triton_backend, interpret):
    assert triton_backend.name == "triton"
    assert "triton" in backends.available_backends()


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_cpu_without_interpreter_is_unavailable_and_loud(triton_backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = triton_backend.available()
    assert not ok and "TRITON_INTERPRET" in why
    with pytest.raises(BackendUnavailableError, match="triton"):
        qk.set_backend("triton")
    # "auto" never picks the (slow) interpreter on an ordinary CPU run.
    backends._selected = None
    monkeypatch.delenv("QRA_BACKEND", raising=False)
    assert select_backend(torch.ones(2, 8)).name != "triton"


def test_supports(triton_backend, interpret):
    assert triton_backend.supports(torch.ones(2, 8, dtype=torch.bfloat16))[0]
    ok, why = triton_backend.supports(torch.ones(2, 8, dtype=torch.float64))
    assert not ok and "float64" in why


def _case(bits, rank, lead, k=72, n=33, x_dtype=torch.bfloat16, lora_dtype=torch.float32):
    g = torch.Generator().manual_seed(bits * 100 + rank)
    qw = qk.quantize_weight(torch.randn(n, k, generator=g) * 0.05, bits, 32, method="rtn",
                            pad=True)
    x = torch.randn(*lead, k, generator=g).to(x_dtype)
    a = (torch.randn(rank, k, generator=g) * 0.1).to(lora_dtype)
    b = (torch.randn(n, rank, generator=g) * 0.1).to(lora_dtype)
    bias = torch.randn(n, generator=g)
    return qw, x, a, b, bias


def _run(name, qw, x, a, b, bias, scaling):
    qk.set_backend(name)
    x, a, b, bias = (t.detach().clone().requires_grad_(True) for t in (x, a, b, bias))
    y = qk.qra_linear(x, qw, a, b, scaling, bias)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad, bias.grad


@pytest.mark.parametrize("bits,rank,lead", [(2, 17, (3, 5)), (3, 1, (1,)), (4, 0, (2, 20)),
                                            (8, 16, (33,))])
def test_op_through_triton_matches_reference(interpret, bits, rank, lead):
    qw, x, a, b, bias = _case(bits, rank, lead)
    got = _run("triton", qw, x, a, b, bias, 0.75)
    want = _run("reference", qw, x, a, b, bias, 0.75)
    for name, g, w in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if w.numel() == 0:  # rank 0: empty adapter gradients
            continue
        scale = w.float().abs().max().item() + 1e-6
        err = (g.float() - w.float()).abs().max().item()
        assert err <= 3e-2 * scale, f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"


def test_fp16_x_with_bf16_adapters(interpret):
    qw, x, a, b, bias = _case(3, 7, (4, 6), x_dtype=torch.float16, lora_dtype=torch.bfloat16)
    got = _run("triton", qw, x, a, b, bias, 2.0)
    want = _run("reference", qw, x, a, b, bias, 2.0)
    assert got[2].dtype == torch.bfloat16 and got[1].dtype == torch.float16
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        scale = w.float().abs().max().item() + 1e-6
        assert (g.float() - w.float()).abs().max().item() <= 2e-2 * scale, name


def test_bad_input_raises_before_any_kernel(interpret):
    qw, x, a, b, _ = _case(4, 3, (2,))
    qk.set_backend("triton")
    with pytest.raises(ValueError, match="lora_B"):
        qk.qra_linear(x, qw, a, b[:-1])
