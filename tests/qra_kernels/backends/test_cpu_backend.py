"""The C++ CPU kernel (csrc/cpu) against the reference backend: every path (the float GEMV,
the panel GEMM, the int8 dot products) on every build this CPU runs (generic, AVX2,
AVX-VNNI, AVX-512, AVX-512 VNNI, AVX-512 BF16), forward and backward, every bit-width and
group size, odd shapes (N and K off the tiles, K padded), ranks 0/1/7/16/17/64, 3-d and
strided x, fp32/bf16/fp16 activations, threaded shapes; the path selection and its table;
validation.

Tolerances: the float paths compute what the reference computes in fp32 up to summation
order, so fp32 results agree to 1e-4 of the largest output (2e-2 after a cast to bf16/fp16).
The int8 path replaces x by its per-(row, group) int8 rounding; its error is bounded by
sum_k |W[n, k]| · d[m, g(k)] / 2 (csrc/cpu/int8.h), which is checked element-wise, and it is
exact (to fp32 tolerance) on activations that are already int8 multiples of d.
The torch path (dequantized panels, torch's GEMM) is exact like the float paths with fp32 x;
with bf16 x it rounds W to bf16 first, and its error is checked against that bound.
"""
import json

import pytest
import torch

import qra_kernels as qk
from qra_kernels import _ext
from qra_kernels.backends import BackendUnavailableError, _REGISTRY, _ensure_loaded, set_backend
from qra_kernels.backends import cpu_backend
from qra_kernels.format import dequantize

_ensure_loaded()
pytestmark = pytest.mark.skipif(_ext.extension() is None,
                                reason="qra_kernels._C was not built (pure-Python install)")

BITS = (2, 3, 4, 8)
ISAS = _ext.extension().cpu_runnable_isas().split(",") if _ext.extension() else []
FLOAT_PATHS = ("gemv", "gemm")


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


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Runs the test on one build of the kernel, and checks that build is the one running."""
    monkeypatch.setenv("QRA_CPU_ISA", request.param)
    assert _ext.extension().cpu_isa() == request.param
    return request.param


# (N, K, group, rank, M): odd N (vector and tile tails), K not a multiple of the group
# (padding), K > 512 (two reduction blocks of the GEMM), N > 512 (two reduction blocks of
# its backward), ranks 0/1/7/16/17/64, M covering the 1/2/4-row blocks of the GEMV and the
# 4/6/8-row tiles of the GEMM.
SHAPES = [(37, 100, 32, 7, 3), (64, 256, 64, 0, 1), (130, 200, 128, 16, 11),
          (16, 128, 32, 1, 1), (9, 64, 64, 17, 2), (100, 576, 64, 64, 20),
          (600, 96, 32, 5, 9)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g,rank,m", SHAPES)
@pytest.mark.parametrize("path", FLOAT_PATHS)
def test_float_paths_match_reference(bits, n, k, g, rank, m, path, isa):
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(n, k, g, bits, rank, m)
    args = (qw.qweight, qw.scales, qw.zeros, bits, g, n, a, b, 0.75)
    with cpu_backend.path(path):
        _close(cpu.forward(x, *args, bias), ref.forward(x, *args, bias), x.dtype)
        go = torch.randn(m, n)
        got = cpu.backward(go, x, *args, True, True)
    want = ref.backward(go, x, *args, True, True)
    for gt, wt in zip(got, want):
        _close(gt, wt, torch.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g,rank,m", SHAPES)
def test_torch_path_matches_reference(bits, n, k, g, rank, m, isa):
    """fp32 x: the panels are dequantized exactly, so forward, dX (with the adapter's term)
    and the LoRA gradients agree with the reference to fp32 tolerance."""
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(n, k, g, bits, rank, m)
    args = (qw.qweight, qw.scales, qw.zeros, bits, g, n, a, b, 0.75)
    with cpu_backend.path("torch"):
        _close(cpu.forward(x, *args, bias), ref.forward(x, *args, bias), x.dtype)
        go = torch.randn(m, n)
        got = cpu.backward(go, x, *args, True, True)
        got_no_lora = cpu.backward(go, x, *args, True, False)
    want = ref.backward(go, x, *args, True, True)
    for gt, wt in zip(got, want):
        _close(gt, wt, torch.float32)
    _close(got_no_lora[0], want[0], torch.float32)  # dX keeps the adapter's term


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("n,k,g,rank,m", [(130, 200, 64, 7, 5), (600, 96, 32, 0, 3)])
def test_torch_path_panels_capped_for_wide_layers(bits, n, k, g, rank, m, monkeypatch):
    """A layer wider than the panel cap is split into more, smaller panels (16-column
    multiples forward, group multiples for dX) and gives the same numbers."""
    cpu, ref = _backends()
    monkeypatch.setattr(cpu_backend, "_PANEL_VALUES", 40 * max(n, k))
    cols, rows = cpu_backend._panel_columns(k + (-k) % g), cpu_backend._panel_rows(n, g)
    assert cols % 16 == 0 and cols < n and rows % g == 0 and rows < k
    x, qw, a, b, bias = _case(n, k, g, bits, rank, m)
    args = (qw.qweight, qw.scales, qw.zeros, bits, g, n, a, b, 0.75)
    with cpu_backend.path("torch"):
        _close(cpu.forward(x, *args, bias), ref.forward(x, *args, bias), x.dtype)
        go = torch.randn(m, n)
        got = cpu.backward(go, x, *args, True, True)
    for gt, wt in zip(got, ref.backward(go, x, *args, True, True)):
        _close(gt, wt, torch.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g,m", [(37, 100, 32, 3), (300, 576, 64, 20), (1030, 256, 128, 9)])
def test_torch_path_bf16_within_its_bound(bits, n, k, g, m, isa):
    """bf16 x: W is rounded to bf16 (half an ulp, 2^-9 relative) before the product, and y
    is rounded to bf16 once, so |y − y_ref| <= 2^-9·(|x|·|W|ᵀ) + 2^-8·|y_ref| (+ fp32)."""
    cpu, ref = _backends()
    x, qw, _, _, _ = _case(n, k, g, bits, 0, m, x_dtype=torch.bfloat16)
    args = (qw.qweight, qw.scales, qw.zeros, bits, g, n, None, None, 1.0, None)
    with cpu_backend.path("torch"):
        got = cpu.forward(x, *args)
    assert got.dtype == torch.bfloat16
    want = ref.forward(x.float(), *args).double()
    w = dequantize(qw.qweight, qw.scales, qw.zeros, bits, g, (n, k)).double()
    bound = 2.0 ** -9 * (x.double().abs() @ w.abs().t()) + 2.0 ** -8 * want.abs()
    err = (got.double() - want).abs()
    assert (err <= bound * (1 + 1e-3) + 1e-5).all(), f"max excess {(err - bound).max():.3g}"
    # and dX the same way: W rounded once, the fp32 result rounded by nobody
    go = torch.randn(m, n).bfloat16()
    with cpu_backend.path("torch"):
        gx = cpu.backward(go, x, *args[:-1], True, False)[0]
    gwant = go.double() @ w
    gbound = 2.0 ** -9 * (go.double().abs() @ w.abs()) + 2.0 ** -8 * gwant.abs()
    assert ((gx.double() - gwant).abs() <= gbound * (1 + 1e-3) + 1e-5).all()


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_panel_is_the_format_dequantization(bits, isa):
    """The panel kernel of the torch path: fp32 panels equal format.dequantize (transposed)
    on every sub-range, bf16 panels are its round-to-nearest-even, and bad ranges raise."""
    ext = _ext.extension()
    n, k, g = 83, 256, 64
    qw = qk.quantize_weight(torch.randn(n, k), bits, group_size=g, method="rtn")
    wt = dequantize(qw.qweight, qw.scales, qw.zeros, bits, g, (n, k)).t().contiguous()
    code = _ext.DTYPE_CODES
    ptrs = (qw.qweight.data_ptr(), qw.scales.data_ptr(), qw.zeros.data_ptr(),
            code[qw.scales.dtype], bits, g, n, k)
    for (k0, k1, n0, n1) in [(0, k, 0, n), (64, 192, 5, 70), (128, 256, 80, 83), (0, 64, 0, 0),
                             (0, k, 3, 51)]:
        for dt in (torch.float32, torch.bfloat16):
            out = torch.full((k1 - k0, n1 - n0 + 3), -7.0, dtype=dt)  # ldo > width
            ext.cpu_dequantize_panel(*ptrs, k0, k1, n0, n1, out.data_ptr(), code[dt],
                                     out.shape[1], 2)
            assert torch.equal(out[:, :n1 - n0], wt[k0:k1, n0:n1].to(dt))
            assert (out[:, n1 - n0:] == -7).all()  # nothing written past the panel
            # the same values as rows of dequant(W) (the forward's layout)
            rows = torch.full((n1 - n0, k1 - k0 + 5), -7.0, dtype=dt)
            ext.cpu_dequantize_rows(*ptrs, k0, k1, n0, n1, rows.data_ptr(), code[dt],
                                    rows.shape[1], 2)
            assert torch.equal(rows[:, :k1 - k0], wt[k0:k1, n0:n1].t().to(dt))
            assert (rows[:, k1 - k0:] == -7).all()
    out = torch.empty(k * n)
    for bad, match in [((1, 64, 0, n), "group-aligned"), ((0, k + 64, 0, n), "group-aligned"),
                       ((0, 64, 0, n + 1), "within"), ((0, 64, 10, 5), "within")]:
        with pytest.raises(ValueError, match=match):
            ext.cpu_dequantize_panel(*ptrs, *bad, out.data_ptr(), code[torch.float32], n, 1)
    with pytest.raises(ValueError, match="ldo"):
        ext.cpu_dequantize_panel(*ptrs, 0, 64, 0, n, out.data_ptr(), code[torch.float32], 8, 1)
    with pytest.raises(ValueError, match="ldo must be >= k1 - k0"):
        ext.cpu_dequantize_rows(*ptrs, 0, 128, 0, n, out.data_ptr(), code[torch.float32], 64, 1)
    with pytest.raises(ValueError, match="group-aligned"):
        ext.cpu_dequantize_rows(*ptrs, 1, 64, 0, n, out.data_ptr(), code[torch.float32], k, 1)
    with pytest.raises(ValueError, match="out_dtype"):
        ext.cpu_dequantize_panel(*ptrs, 0, 64, 0, n, out.data_ptr(), code[torch.float16], n, 1)


def _int8_bound(x, qw, bits, g, n, k):
    """Element-wise bound on |int8 path − reference|: sum_k |W| · d / 2 (see int8.h)."""
    w = dequantize(qw.qweight, qw.scales, qw.zeros, bits, g, (n, k)).double()
    x2 = x.reshape(-1, k).double()
    kp = -(-k // g) * g
    xp = torch.nn.functional.pad(x2, (0, kp - k)).reshape(x2.shape[0], kp // g, g)
    d = xp.abs().amax(-1) / 127  # [M, G]
    d_k = d.repeat_interleave(g, dim=1)[:, :k]
    return (d_k / 2) @ w.abs().t()  # [M, N]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g,rank,m", SHAPES)
def test_int8_path_within_its_bound(bits, n, k, g, rank, m, isa):
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(n, k, g, bits, rank, m)
    args = (qw.qweight, qw.scales, qw.zeros, bits, g, n, a, b, 0.75)
    with cpu_backend.path("int8"):
        got = cpu.forward(x, *args, bias)
    want = ref.forward(x, *args, bias)
    bound = _int8_bound(x, qw, bits, g, n, k)
    slack = 1e-4 * want.abs().max().clamp_min(1.0)  # fp32 rounding of both sides
    err = (got.double() - want.double()).abs()
    assert (err <= bound * (1 + 1e-5) + slack).all(), \
        f"max excess {(err - bound).max():.3g} over the int8 bound"
    # The bound (a worst case: every rounding error aligned) stays a fraction of y, and the
    # actual error, a sum of independent roundings, far below it.
    assert bound.max() < 0.2 * want.abs().max()
    assert err.max() < 0.02 * want.abs().max()


@pytest.mark.parametrize("bits", BITS)
def test_int8_path_exact_on_int8_activations(bits, isa):
    # x = d·(integers with max |.| = 127 in every group): its int8 rounding is itself.
    cpu, ref = _backends()
    n, k, g, m = 70, 192, 64, 5
    _, qw, a, b, bias = _case(n, k, g, bits, 7, m)
    ints = torch.randint(-127, 128, (m, k)).float()
    ints[:, ::g] = 127  # every group reaches 127, so d is exactly the chosen step
    d = 2.0 ** torch.randint(-6, 2, (m, k // g)).float()
    x = ints * d.repeat_interleave(g, dim=1)
    args = (qw.qweight, qw.scales, qw.zeros, bits, g, n, a, b, 0.5)
    with cpu_backend.path("int8"):
        _close(cpu.forward(x, *args, bias), ref.forward(x, *args, bias), torch.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("path", FLOAT_PATHS + ("int8",))
@pytest.mark.parametrize("x_dtype,lora_dtype,scale_dtype",
                         [(torch.bfloat16, torch.bfloat16, torch.bfloat16),
                          (torch.bfloat16, torch.float32, torch.float16),
                          (torch.float16, torch.float32, torch.bfloat16),
                          (torch.float16, torch.float16, torch.float16)])
def test_low_precision_activations(bits, path, x_dtype, lora_dtype, scale_dtype, isa):
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(48, 96, 32, bits, 7, 2, x_dtype, lora_dtype, scale_dtype,
                              lead=(2,))
    args = (qw.qweight, qw.scales, qw.zeros, bits, 32, 48, a, b, 2.0)
    go = torch.randn(2, 2, 48).to(x_dtype)
    with cpu_backend.path(path):
        got_y = cpu.forward(x, *args, bias.to(x_dtype))
        got = cpu.backward(go, x, *args, True, True)
    want_y = ref.forward(x, *args, bias.to(x_dtype))
    if path == "int8":  # bf16/fp16 output rounding (2^-8) dominates the int8 error here
        assert got_y.shape == want_y.shape and got_y.dtype == want_y.dtype
        scale = want_y.float().abs().max()
        assert ((got_y.float() - want_y.float()).abs().max() / scale) <= 3e-2
    else:
        _close(got_y, want_y, x_dtype)
    for gt, wt in zip(got, ref.backward(go, x, *args, True, True)):
        _close(gt, wt, x_dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g,rank,m", SHAPES[:4])
def test_bf16_activations_on_odd_shapes(bits, n, k, g, rank, m, isa):
    # bf16 x takes the AVX-512 BF16 dot-product GEMV on that build (2/3/4-bit).
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(n, k, g, bits, rank, m, torch.bfloat16)
    args = (qw.qweight, qw.scales, qw.zeros, bits, g, n, a, b, 0.75)
    for path in FLOAT_PATHS:
        with cpu_backend.path(path):
            _close(cpu.forward(x, *args, bias), ref.forward(x, *args, bias), x.dtype)
            # And the exact fp32 result of the kernel itself, before the cast to bf16.
            x32 = x.float()
            _close(cpu.forward(x32, *args, bias), ref.forward(x32, *args, bias), torch.float32)


@pytest.mark.parametrize("path", FLOAT_PATHS + ("int8",))
def test_strided_rows_of_x(path):
    # Rows of x read with their stride (a column slice of a wider tensor), no copy.
    cpu, ref = _backends()
    _, qw, a, b, bias = _case(40, 96, 32, 4, 3, 6)
    wide = torch.randn(6, 130)
    x = wide[:, 10:106]
    assert not x.is_contiguous() and _ext.rows_view(x, 96).data_ptr() == x.data_ptr()
    args = (qw.qweight, qw.scales, qw.zeros, 4, 32, 40, a, b, 1.5)
    with cpu_backend.path(path):
        got = cpu.forward(x, *args, bias)
    want = ref.forward(x.contiguous(), *args, bias)
    tol = 2e-2 if path == "int8" else 1e-4
    assert ((got - want).abs().max() / want.abs().max()) <= tol


@pytest.mark.parametrize("bits", (3, 4))
@pytest.mark.parametrize("path,m", [("gemv", 5), ("int8", 5), ("gemm", 40)])
def test_threaded_shape(bits, path, m):
    # N * Kp >= 2^20 takes the threaded GEMV / int8 path; the GEMM splits its columns.
    torch.set_num_threads(2)
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(1040, 1024, 64, bits, 16, m)
    args = (qw.qweight, qw.scales, qw.zeros, bits, 64, 1040, a, b, 0.5)
    with cpu_backend.path(path):
        got = cpu.forward(x, *args, bias)
        go = torch.randn(m, 1040)
        gx = cpu.backward(go, x, *args, True, False)[0]
    want = ref.forward(x, *args, bias)
    if path == "int8":
        assert ((got - want).abs().max() / want.abs().max()) <= 2e-2
    else:
        _close(got, want, x.dtype)
    _close(gx, ref.backward(go, x, *args, True, False)[0], torch.float32)


@pytest.mark.parametrize("path", FLOAT_PATHS)
def test_through_the_op_with_autograd(path):
    x, qw, a, b, bias = _case(40, 72, 32, 3, 7, 3, lead=(2,))
    grads = {}
    for name in ("cpu", "reference"):
        set_backend(name)
        try:
            with cpu_backend.path(path):
                xs, as_, bs, biass = (t.clone().requires_grad_() for t in (x, a, b, bias))
                y = qk.qra_linear(xs, qw, as_, bs, scaling=0.5, bias=biass)
                (y * torch.linspace(-1, 1, 40)).sum().backward()
                grads[name] = (y.detach(), xs.grad, as_.grad, bs.grad, biass.grad)
        finally:
            set_backend("auto")
    for got, want in zip(grads["cpu"], grads["reference"]):
        _close(got, want, torch.float32)


@pytest.mark.parametrize("path", FLOAT_PATHS)
def test_zero_rows_and_rank_zero_gradients(path):
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(16, 64, 32, 4, 0, 0)
    args = (qw.qweight, qw.scales, qw.zeros, 4, 32, 16, a, b, 1.0)
    with cpu_backend.path(path):
        assert cpu.forward(x, *args, None).shape == (0, 16)
        gx, ga, gb = cpu.backward(torch.randn(0, 16), x, *args, True, True)
    assert gx.shape == (0, 64) and ga.shape == (0, 64) and gb.shape == (16, 0)


def test_lora_gradients_without_grad_x():
    cpu, ref = _backends()
    x, qw, a, b, bias = _case(24, 64, 32, 4, 5, 7)
    args = (qw.qweight, qw.scales, qw.zeros, 4, 32, 24, a, b, 0.25)
    go = torch.randn(7, 24)
    got = cpu.backward(go, x, *args, False, True)
    want = ref.backward(go, x, *args, False, True)
    assert got[0] is None
    for gt, wt in zip(got[1:], want[1:]):
        _close(gt, wt, torch.float32)


def test_auto_runs_every_row_count_here():
    # The GEMM path takes the large (prefill, training) calls: no row limit any more.
    from qra_kernels.backends import select_backend
    assert select_backend(torch.randn(4096, 8)).name == "cpu"
    assert select_backend(torch.randn(2, 3, 8, dtype=torch.bfloat16)).name == "cpu"


def test_auto_follows_the_measured_table(tmp_path, monkeypatch):
    isa_now = _ext.extension().cpu_isa()
    table = {"rules": {isa_now: {
        "float32": {"exact": {"4": [[3, "gemv"], [100, "gemm"], [None, "torch"]]},
                    "int8": {"4": [[2, "int8"], [9, "gemv"], [None, "gemm"]]},
                    "backward": {"4": [[5, "gemv"], [None, "gemm"]]}}}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("QRA_CPU_DISPATCH", str(path))
    choose = cpu_backend.choose_path
    assert [choose(m, 4, torch.float32) for m in (1, 3, 4, 99)] == ["gemv"] * 2 + ["gemm"] * 2
    assert choose(101, 4, torch.float32) == "torch"
    assert choose(5, 4, torch.float32, backward=True) == "gemv"
    assert choose(6, 4, torch.float32, backward=True) == "gemm"
    with cpu_backend.path("auto", int8=True):
        assert [choose(m, 4, torch.float32) for m in (2, 3, 10)] == ["int8", "gemv", "gemm"]
        assert choose(1, 4, torch.float32, backward=True) == "gemv"  # int8 is forward only
    with cpu_backend.path("gemm"):
        assert choose(1, 4, torch.float32) == "gemm"
    with cpu_backend.path("int8"):
        assert choose(1, 4, torch.float32) == "int8"
        assert choose(1, 4, torch.float32, backward=True) == "gemv"
    # A bit-width the table does not list falls back to the documented default.
    assert choose(1, 8, torch.float32) == "gemv" and choose(500, 8, torch.float32) == "gemm"


def test_the_packaged_table_covers_this_machine():
    table = cpu_backend.dispatch_table()
    rules = table["rules"]
    for isa_name in ISAS:
        if isa_name == "generic":
            continue
        assert isa_name in rules, f"no measured thresholds for the {isa_name} build"
        for dtype in ("float32", "bfloat16"):
            for kind in ("exact", "int8", "backward"):
                assert set(rules[isa_name][dtype][kind]) == {"2", "3", "4", "8"}


def test_bad_tables_and_paths_raise(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="path"):
        cpu_backend.set_path("fast")
    with pytest.raises(TypeError, match="int8"):
        cpu_backend.set_path("auto", int8="yes")
    monkeypatch.setenv("QRA_CPU_PATH", "gemv2")
    with pytest.raises(ValueError, match="QRA_CPU_PATH"):
        cpu_backend.get_path()
    monkeypatch.delenv("QRA_CPU_PATH")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rules": {"avx2": {"float32": {"exact": {"4": [[3, "gemv"]]}}}}}))
    monkeypatch.setenv("QRA_CPU_DISPATCH", str(bad))
    with pytest.raises(ValueError, match="must end with"):
        cpu_backend.dispatch_table()
    monkeypatch.setenv("QRA_CPU_DISPATCH", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="missing"):
        cpu_backend.dispatch_table()


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


def test_the_binding_rejects_a_bad_path():
    ext = _ext.extension()
    x, qw, a, b, bias = _case(16, 64, 32, 4, 0, 1)
    y = torch.empty(1, 16)
    with pytest.raises(ValueError, match="path"):
        ext.cpu_forward(x.data_ptr(), 0, 64, qw.qweight.data_ptr(), qw.scales.data_ptr(),
                        qw.zeros.data_ptr(), 1, 4, 32, 1, 16, 64, 64, 0, 0, 0, 1.0, 0,
                        y.data_ptr(), 0, 7, 1)
    gx = torch.empty(1, 64)
    with pytest.raises(ValueError, match="forward only"):
        ext.cpu_backward_dx(y.data_ptr(), 0, qw.qweight.data_ptr(), qw.scales.data_ptr(),
                            qw.zeros.data_ptr(), 1, 4, 32, 1, 16, 64, 64, 0, 0, 0, 1.0, 0,
                            gx.data_ptr(), ext.cpu_path_int8, 1)


def test_build_info_reports_the_cpu_extension():
    info = qk.build_info()
    assert info["cpu_extension"] is True
    assert "cpu" in info["backends"]
    ext = _ext.extension()
    assert ext.build_info()["cpu_isa"] in ISAS
    assert ext.cpu_isa() == ISAS[0]  # no QRA_CPU_ISA: the widest build this CPU runs
