"""The CUDA kernels (csrc/cuda/decode.cuh, tc_gemm.cuh, backward.cu) against the reference
backend on the GPU: forward and backward, every bit-width and group size, decode (M <= 16:
tensor cores, split-K, LoRA x·Aᵀ in the same launch) and larger M (tensor-core kernel for
fp16/bf16, decode passes for fp32), odd and real shapes (N % 8 != 0 takes the unaligned
copies), ranks 0/1/7/16/17/64, 3-d x, every activation and scale dtype, determinism.

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
          lead=(), pad=None):
    dev = "cuda"
    w = torch.randn(n, k, device=dev)
    qw = qk.quantize_weight(w, bits, group_size=g, method="rtn", scale_dtype=scale_dtype,
                            pad=k % g != 0 if pad is None else pad)
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
def test_repeated_calls_are_deterministic_and_reuse_no_stale_state():
    # The split-K partials are summed in slice order and the counters are left zero by every
    # call: the same input twice gives bitwise the same output, also after other shapes ran
    # on the same counters.
    x, qw, a, b, bias = _case(4096, 4096, 64, 4, 16, 1, torch.float16)
    cuda = _REGISTRY["cuda"]
    args = (x, qw.qweight, qw.scales, qw.zeros, 4, 64, 4096, a, b, 1.0, bias)
    y1 = cuda.forward(*args)
    x2, qw2, a2, b2, _ = _case(1000, 1000, 32, 3, 7, 3, torch.bfloat16)
    cuda.forward(x2, qw2.qweight, qw2.scales, qw2.zeros, 3, 32, 1000, a2, b2, 0.5, None)
    y2 = cuda.forward(*args)
    assert torch.equal(y1, y2)


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rank", (0, 1, 7, 16, 17, 64))
@pytest.mark.parametrize("m", (1, 5, 16, 33))
def test_every_rank(bits, rank, m):
    # Ranks that are not a multiple of 16 (and 64: x·Aᵀ over many blocks) on the decode kernel
    # (M <= 16, LoRA in the same launch) and the tensor-core kernel (M = 33).
    _run_both(*_case(520, 768, 64, bits, rank, m, torch.bfloat16, lead=(1,)))


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", (37, 1001, 264))
def test_odd_columns_take_the_unaligned_copies(bits, n):
    # N % 8 != 0: 4-byte copies and synchronous scale loads; N = 264: the 16-byte path with a
    # partial last column tile.
    for m in (1, 9, 40):
        for x_dtype in (torch.float16, torch.float32):
            _run_both(*_case(n, 200, 32, bits, 5, m, x_dtype, pad=True))


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("bits", BITS)
def test_split_k_and_x_a_blocks_over_long_k(bits):
    # A narrow, long matrix: many K slices, many x·Aᵀ blocks, every group size.
    for g in (32, 64, 128):
        _run_both(*_case(128, 14336, g, bits, 64, 2, torch.bfloat16), backward=False)


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


# ---- the kernels' bit tricks and launch plans, host-compiled: run on every machine ----------
# csrc/cuda/magic.cuh (magic-number dequant: LOP3 masks, PRMT selectors, the packed-FMA
# constants) and csrc/cuda/plan.h are compiled by the host compiler into every build of _C
# (csrc/cuda/host_check.cpp), so these tests run the very functions the GPU kernels call,
# exhaustively: every code value at every position of a word, each bit-width, fp16 and bf16.
import numpy as np  # noqa: E402

from qra_kernels.format import pack  # noqa: E402

needs_host_check = pytest.mark.skipif(
    _ext.extension() is None or not hasattr(_ext.extension(), "cuda_host"),
    reason="qra_kernels._C is not built")
HALF = {False: torch.float16, True: torch.bfloat16}


def _host():
    return _ext.extension().cuda_host


def _codes_covering(bits, seed=0, extra=200):
    """[columns, 32] codes: every value at every k (column c, k -> (c + 7k) mod 2^bits), then
    random columns (random neighbours of every field)."""
    q = 1 << bits
    c = torch.arange(q)[:, None]
    k = torch.arange(32)[None, :]
    ordered = (c + 7 * k) % q
    rand = torch.randint(0, q, (extra, 32), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ordered, rand]).to(torch.uint8)


def _half_lanes(words: bytes, bf16: bool) -> torch.Tensor:
    """uint32 words holding half2 -> float values [..., 2] (low lane first)."""
    u16 = np.frombuffer(words, dtype=np.uint16).copy()
    return torch.from_numpy(u16.view(np.int16)).view(HALF[bf16]).float().reshape(-1, 4, 2)


def _words(qweight: torch.Tensor, rows) -> bytes:
    """The chunk words `rows` (chunk_word_row order) of every column, column-major."""
    sel = qweight[list(rows)].t().contiguous()  # [columns, len(rows)]
    return sel.numpy().astype(np.uint32).tobytes()


@needs_host_check
@pytest.mark.parametrize("bf16", (False, True), ids=("fp16", "bf16"))
@pytest.mark.parametrize("bits", BITS)
def test_decode_pairs_give_every_code_exactly(bits, bf16):
    codes = _codes_covering(bits)
    qweight = pack(codes, bits)  # one 32-k chunk: [bits, columns]
    for tig in range(4):
        rows, ks, _ = _host().decode_layout(bits, tig)
        got = _half_lanes(_host().decode_chunk(bits, bf16, _words(qweight, rows), tig), bf16)
        want = codes[:, ks].float().reshape(-1, 4, 2)
        assert torch.equal(got, want), (bits, bf16, tig)


@needs_host_check
@pytest.mark.parametrize("bf16", (False, True), ids=("fp16", "bf16"))
@pytest.mark.parametrize("bits", BITS)
def test_raw_decode_pairs_are_magic_plus_shifted_code(bits, bf16):
    # The decode kernel's fast form: M + q·2^s per pair, the packed FMA left out.
    codes = _codes_covering(bits, seed=2)
    qweight = pack(codes, bits)
    shifts, magic = _host().decode_raw_form(bits, bf16)
    for tig in range(4):
        rows, ks, _ = _host().decode_layout(bits, tig)
        got = _half_lanes(_host().decode_chunk(bits, bf16, _words(qweight, rows), tig, raw=True), bf16)
        scale = torch.tensor([2.0 ** s for s in shifts])[None, :, None]
        want = magic + codes[:, ks].float().reshape(-1, 4, 2) * scale
        assert torch.equal(got, want), (bits, bf16, tig)


@needs_host_check
@pytest.mark.parametrize("bits", BITS)
def test_decode_pairs_cover_each_k_of_a_chunk_once(bits):
    seen = sorted(k for tig in range(4) for k in _host().decode_layout(bits, tig)[1])
    assert seen == list(range(32))
    # ... and x of chunk position k is staged where thread tig reads pair i, lane l.
    for tig in range(4):
        _, ks, slots = _host().decode_layout(bits, tig)
        assert slots == [8 * tig + s for s in range(8)], (tig, ks, slots)


@needs_host_check
@pytest.mark.parametrize("bf16", (False, True), ids=("fp16", "bf16"))
@pytest.mark.parametrize("bits", BITS)
def test_natural_pairs_give_every_code_exactly(bits, bf16):
    codes = _codes_covering(bits, seed=1)
    qweight = pack(codes, bits)
    words = _words(qweight, range(bits))
    for oct_ in range(4):
        got = _half_lanes(_host().natural8(bits, bf16, words, oct_), bf16)
        want = codes[:, 8 * oct_: 8 * oct_ + 8].float().reshape(-1, 4, 2)
        assert torch.equal(got, want), (bits, bf16, oct_)


@needs_host_check
@pytest.mark.parametrize("raw", (False, True), ids=("exact", "raw"))
@pytest.mark.parametrize("bf16", (False, True), ids=("fp16", "bf16"))
@pytest.mark.parametrize("bits", BITS)
def test_decode_fragments_compute_the_dot_product_on_an_emulated_mma(bits, bf16, raw):
    # One warp, one 32-k chunk, two m16n8k16 column tiles (32 output columns) and 8 rows of
    # x: fragments built as the decode kernel builds them, the mma emulated from the PTX
    # ISA's fragment layout (independent of the C++ mapping), the result mapped back through
    # the kernel's output mapping. Any mismatch between the A side (which k a weight pair
    # holds) and the B side (where x is staged) breaks the sum. Raw pairs (M + q·2^s) go
    # with x·2^-s and an accumulator started at -M·sum(x·2^-s), as in the kernel.
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (32, 32), generator=g, dtype=torch.uint8)  # [n, k]
    x = torch.randint(-8, 8, (8, 32), generator=g).double()                        # [m, k]
    qweight = pack(codes, bits)
    frag = _host().fragments()
    shifts, magic = _host().decode_raw_form(bits, bf16) if raw else ([0] * 4, 0.0)
    pairs = {}  # (lane, column c) -> ([4 pairs][2 lanes], ks)
    for lane in range(32):
        grp, tig = lane // 4, lane % 4
        rows, ks, _ = _host().decode_layout(bits, tig)
        cols = [4 * grp + c for c in range(4)]
        words = qweight[list(rows)][:, cols].t().contiguous().numpy().astype(np.uint32).tobytes()
        vals = _half_lanes(_host().decode_chunk(bits, bf16, words, tig, raw=raw), bf16)
        for c in range(4):
            pairs[lane, c] = (vals[c].double(), ks)
    # x as staged: slot (tig, pair i, lane l) holds x[k] · 2^-s(i).
    xs = torch.zeros(8, 32, dtype=torch.float64)  # [m, k], scaled
    for tig in range(4):
        _, ks, _ = _host().decode_layout(bits, tig)
        for i in range(4):
            for l in range(2):
                xs[:, ks[2 * i + l]] = x[:, ks[2 * i + l]] * 2.0 ** -shifts[i]
    y = torch.zeros(32, 8, dtype=torch.float64)  # [n, m]
    for tile in range(2):
        acc = (-magic * xs.sum(1))[None, :].repeat(16, 1)
        for step in range(2):
            a = torch.zeros(16, 16, dtype=torch.float64)
            b = torch.zeros(16, 8, dtype=torch.float64)
            for lane in range(32):
                grp, tig = lane // 4, lane % 4
                for reg in range(4):  # PTX: a0 (grp, 2tig..), a1 (grp+8, ..), a2 (grp, 2tig+8..), a3
                    row, col0 = grp + 8 * (reg & 1), 2 * tig + 8 * (reg >> 1)
                    vals, _ = pairs[lane, frag["a_col"][reg][tile]]
                    a[row, col0:col0 + 2] = vals[frag["a_pair"][reg][step]]
                for reg in range(2):  # PTX: b0 (2tig.., col grp), b1 (2tig+8.., col grp)
                    row0 = 2 * tig + 8 * reg
                    _, ks = pairs[lane, 0]
                    i = frag["b_pair"][reg][step]
                    b[row0:row0 + 2, grp] = xs[grp, [ks[2 * i], ks[2 * i + 1]]]
            acc += a @ b
        for lane in range(32):
            grp, tig = lane // 4, lane % 4
            for reg in range(4):  # PTX: c0 (grp, 2tig), c1 (grp, 2tig+1), c2 (grp+8, ..), c3
                row, col = grp + 8 * (reg >> 1), 2 * tig + (reg & 1)
                n = 4 * grp + frag["c_col"][reg][tile]
                m = 2 * tig + frag["c_row"][reg]
                assert m == col
                y[n, m] = acc[row, col]
    want = codes.double() @ x.t()
    assert torch.equal(y, want)


@needs_host_check
def test_fp32_splits_into_three_bf16_exactly():
    # Exact for every fp32 below bf16's largest finite value (3.39e38: beyond it the high
    # part rounds to inf) and above ~1e-36 (below, the low part falls under bf16's normals).
    g = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.randn(2000, generator=g) * 10.0 ** torch.randint(-30, 30, (2000,), generator=g),
                    torch.tensor([0.0, -0.0, 1.0, -3.0, 65504.0, 1e-30, 3.0e38, -3.3e38])])
    for x in xs.tolist():
        parts = _host().split_bf16x3(float(np.float32(x)))
        vals = [torch.tensor([p], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double().item()
                for p in parts]
        assert sum(vals) == float(np.float32(x)), (x, parts)


@needs_host_check
def test_lop3_and_prmt_follow_the_ptx_definitions():
    rng = np.random.default_rng(0)
    for a, b, c in rng.integers(0, 2 ** 32, (500, 3), dtype=np.uint64).tolist():
        assert _host().lop3(0xEA, a, b, c) == ((a & b) | c)
        assert _host().lop3(0xE2, a, b, c) == ((a & b) | (c & ~b & 0xFFFFFFFF))
        for sel in (0x4240, 0x3210, 0x7654, 0x5140, 0x1234 | 0x8000, int(rng.integers(0, 2 ** 16))):
            src = a | (b << 32)
            want = 0
            for i in range(4):
                s = (sel >> (4 * i)) & 0xF
                byte = (src >> (8 * (s & 7))) & 0xFF
                if s & 8:
                    byte = 0xFF if byte & 0x80 else 0
                want |= byte << (8 * i)
            assert _host().prmt(a, b, sel) == want, hex(sel)


@needs_host_check
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("x_dtype", (0, 1, 2), ids=("fp32", "fp16", "bf16"))
def test_decode_plan_partitions_k_and_fits_shared_memory(bits, x_dtype):
    for m in (1, 3, 8, 9, 16):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1000, 1000), (129, 200), (37, 96)):
            for g in (32, 64, 128):
                kp = -(-k // g) * g
                for rank in (0, 1, 16, 17, 64):
                    p = _host().decode_plan(m, n, kp, bits, g, rank, x_dtype, 132, 4)
                    groups = kp // g
                    assert p["splits"] * p["groups_per_split"] >= groups
                    assert (p["splits"] - 1) * p["groups_per_split"] < groups  # none empty
                    assert p["tiles"] * 128 >= n
                    assert p["smem_bytes"] <= 227 * 1024, p
                    if rank:
                        assert p["k_per_xa_block"] % 32 == 0
                        assert p["xa_blocks"] * p["k_per_xa_block"] >= kp
                        assert (p["xa_blocks"] - 1) * p["k_per_xa_block"] < kp
                    else:
                        assert p["xa_blocks"] == 0
