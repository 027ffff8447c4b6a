"""The op against the dense formula, forward and backward; opcheck; torch.compile; bad input.

The dense formula is computed independently in float64 from the dequantized weight
(``QuantizedWeight.dequantize`` is itself tested against an independent RTN in
test_format/test_quantizers), with gradients from float64 autograd.
"""
import pytest
import torch

import qra_kernels as qk
from qra_kernels.ops import linear_packed

BITS = (2, 3, 4, 8)
RANKS = (0, 1, 7, 16, 64)


def make_case(bits, rank, m, k=128, n=48, group_size=64, x_dtype=torch.float32,
              lora_dtype=torch.float32, bias=True, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qw = qk.quantize_weight(w, bits, group_size, "rtn")
    x = torch.randn(*lead, m, k, generator=g).to(x_dtype)
    a = (torch.randn(rank, k, generator=g) * 0.1).to(lora_dtype) if rank else None
    b = (torch.randn(n, rank, generator=g) * 0.1).to(lora_dtype) if rank else None
    bb = torch.randn(n, generator=g) if bias else None
    return qw, x, a, b, bb


def dense(qw, x, a, b, scaling, bias):
    """float64 y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias."""
    w = qw.dequantize(torch.float64)
    y = x.double() @ w.t()
    if a is not None:
        y = y + scaling * (x.double() @ a.double().t()) @ b.double().t()
    if bias is not None:
        y = y + bias.double()
    return y


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close(got, want, dtype):
    # Relative to the largest entry: cancellation makes per-element relative error meaningless.
    t = TOLERANCE[dtype]
    scale = want.abs().max().item() + 1e-12
    torch.testing.assert_close(got.double(), want, rtol=t, atol=t * scale)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("m", (1, 5, 33))
def test_forward_backward_match_dense_fp32(bits, rank, m):
    qw, x, a, b, bias = make_case(bits, rank, m, seed=bits * 100 + rank + m)
    scaling = 0.75
    xr = x.clone().requires_grad_()
    ar = a.clone().requires_grad_() if rank else None
    br = b.clone().requires_grad_() if rank else None
    biasr = bias.clone().requires_grad_()
    y = qk.qra_linear(xr, qw, ar, br, scaling, biasr)
    assert y.dtype == x.dtype and y.shape == (m, 48)

    xd = x.double().requires_grad_()
    ad = a.double().requires_grad_() if rank else None
    bd = b.double().requires_grad_() if rank else None
    biasd = bias.double().requires_grad_()
    yd = dense(qw, xd, ad, bd, scaling, biasd)
    assert_close(y, yd, torch.float32)

    gy = torch.randn_like(yd)
    y.backward(gy.float())
    yd.backward(gy)
    assert_close(xr.grad, xd.grad, torch.float32)
    assert_close(biasr.grad, biasd.grad, torch.float32)
    if rank:
        assert_close(ar.grad, ad.grad, torch.float32)
        assert_close(br.grad, bd.grad, torch.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("x_dtype,lora_dtype", [(torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16),
                                                (torch.float16, torch.float32)])
def test_half_activations_3d(bits, x_dtype, lora_dtype):
    qw, x, a, b, bias = make_case(bits, 16, 5, x_dtype=x_dtype, lora_dtype=lora_dtype,
                                  lead=(3,), group_size=32, seed=bits)
    xr, ar, br = (t.clone().requires_grad_() for t in (x, a, b))
    y = qk.qra_linear(xr, qw, ar, br, 2.0, bias)
    assert y.dtype == x_dtype and y.shape == (3, 5, 48)
    xd, ad, bd = (t.double().requires_grad_() for t in (x, a, b))
    yd = dense(qw, xd, ad, bd, 2.0, bias)
    assert_close(y, yd, x_dtype)
    gy = torch.randn_like(yd)
    y.backward(gy.to(x_dtype))
    yd.backward(gy.to(x_dtype).double())
    assert xr.grad.dtype == x_dtype and ar.grad.dtype == lora_dtype
    assert_close(xr.grad, xd.grad, x_dtype)
    assert_close(ar.grad, ad.grad, lora_dtype if lora_dtype != torch.float32 else x_dtype)
    assert_close(br.grad, bd.grad, lora_dtype if lora_dtype != torch.float32 else x_dtype)


@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_padded_input_dimension(group_size):
    # K = 80 is not a multiple of the group: quantize with pad=True; the op masks the pad.
    w = torch.randn(24, 80) * 0.05
    qw = qk.quantize_weight(w, 4, group_size, "rtn", pad=True)
    x = torch.randn(3, 80, requires_grad=True)
    y = qk.qra_linear(x, qw)
    xd = x.detach().double().requires_grad_()
    yd = dense(qw, xd, None, None, 1.0, None)
    assert_close(y, yd, torch.float32)
    y.sum().backward()
    yd.sum().backward()
    assert_close(x.grad, xd.grad, torch.float32)


def test_no_grad_needed_for_frozen_lora():
    qw, x, a, b, _ = make_case(4, 8, 4, bias=False)
    xr = x.clone().requires_grad_()
    y = qk.qra_linear(xr, qw, a, b, 1.0)  # a, b do not require grad
    y.sum().backward()
    assert xr.grad is not None and a.grad is None and b.grad is None


def test_backward_saves_no_dense_weight():
    # What autograd keeps for backward is the packed tensors (and x, A, B): nothing of the
    # size of a dense fp32 W.
    qw, x, a, b, _ = make_case(4, 8, 2, k=512, n=256, bias=False)
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        qk.qra_linear(x, qw, a.requires_grad_(), b.requires_grad_(), 1.0)
    assert max(saved) < 256 * 512 * 4 / 4  # a quarter of dense fp32 W


@pytest.mark.parametrize("bits,rank", [(2, 0), (3, 7), (4, 16), (8, 1)])
def test_opcheck(bits, rank):
    qw, x, a, b, bias = make_case(bits, rank, 3, bias=rank % 2 == 0, seed=bits)
    args = (x.requires_grad_(), qw.qweight, qw.scales, qw.zeros, bits, 64, 48,
            a.requires_grad_() if rank else None, b.requires_grad_() if rank else None, 0.5,
            bias)
    torch.library.opcheck(torch.ops.qra.linear.default, args)
    gy = torch.randn(3, 48)
    bwd = (gy, x.detach(), qw.qweight, qw.scales, qw.zeros, bits, 64, 48,
           None if a is None else a.detach(), None if b is None else b.detach(), 0.5, True, True)
    torch.library.opcheck(torch.ops.qra.linear_backward.default, bwd)


def test_linear_packed_matches_qra_linear():
    qw, x, a, b, bias = make_case(3, 7, 4)
    y1 = qk.qra_linear(x, qw, a, b, 0.3, bias)
    y2 = linear_packed(x, qw.qweight, qw.scales, qw.zeros, 3, 64, 48, a, b, 0.3, bias)
    assert torch.equal(y1, y2)


class _OpsSeen(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_direct_cpu_call_is_the_op_bit_for_bit(monkeypatch):
    """Inference on the CPU skips the dispatcher (ops._direct_call_ok) and returns the op's
    result exactly; with autograd to record, a dispatch mode, or tracing, the op runs."""
    from qra_kernels import ops
    qw, x, a, b, bias = make_case(4, 7, 5)
    args = (qw.qweight, qw.scales, qw.zeros, 4, 64, 48, a, b, 0.3, bias)
    want = torch.ops.qra.linear(x, *args)
    calls = []
    real = torch.ops.qra.linear
    monkeypatch.setattr(torch.ops.qra, "linear", lambda *c: calls.append(1) or real(*c))
    with torch.no_grad():
        assert torch.equal(linear_packed(x, *args), want)
    assert torch.equal(linear_packed(x, *args), want)  # grad mode on, nothing requires grad
    assert calls == []
    xg = x.clone().requires_grad_()
    y = linear_packed(xg, *args)
    assert calls == [1] and y.grad_fn is not None and torch.equal(y.detach(), want)
    ag = a.clone().requires_grad_()
    assert linear_packed(x, *args[:6], ag, *args[7:]).grad_fn is not None and len(calls) == 2
    monkeypatch.setattr(torch.ops.qra, "linear", real)
    with _OpsSeen() as seen, torch.no_grad():  # a mode must see the op, not its insides
        assert torch.equal(linear_packed(x, *args), want)
    assert any("qra.linear" in op for op in seen.ops), seen.ops
    assert ops._direct_call_ok(x, None, None, None)
    assert not ops._direct_call_ok(x.to("meta"), None, None, None)


def bad_cases():
    qw, x, a, b, bias = make_case(4, 4, 2)
    yield "qw", dict(qw=torch.zeros(3)), TypeError
    yield "x", dict(x=[[1.0]]), TypeError
    yield "x", dict(x=x.int()), TypeError
    yield r"x must have shape \[\.\.\., 128\]", dict(x=torch.randn(2, 127)), ValueError
    yield "lora_A and lora_B", dict(lora_B=None), ValueError
    yield "lora_A", dict(lora_A=torch.randn(4, 127)), ValueError
    yield "lora_B", dict(lora_B=torch.randn(48, 5)), ValueError
    yield "lora_B", dict(lora_B=torch.randn(47, 4)), ValueError
    yield "lora_A", dict(lora_A=a.long()), TypeError
    yield "scaling", dict(scaling="1"), TypeError
    yield "bias", dict(bias=torch.randn(47)), ValueError
    yield "bias", dict(bias=torch.ones(48, dtype=torch.int64)), TypeError


@pytest.mark.parametrize("match,override,exc", list(bad_cases()))
def test_bad_input(match, override, exc):
    qw, x, a, b, bias = make_case(4, 4, 2)
    args = dict(x=x, qw=qw, lora_A=a, lora_B=b, scaling=1.0, bias=bias)
    args.update(override)
    with pytest.raises(exc, match=match):
        qk.qra_linear(args.pop("x"), args.pop("qw"), **args)
