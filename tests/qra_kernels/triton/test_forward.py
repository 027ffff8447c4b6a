"""The forward kernels (decode GEMV/split-K, GEMM) against the reference, interpreted on CPU.

Paths by rows of x: M = 1 (GEMV, one row per program), M = 5 (decode with a 16-row dot
tile), M = 33 (GEMM tiles). K = 100 is padded to a multiple of every group size; N = 37
is odd and not a multiple of any tile.
"""
import pytest
import torch

import qra_kernels.triton as qt

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
RANKS = (0, 1, 7, 16, 17, 64)
PATHS = {"gemv": 1, "decode16": 5, "gemm": 33}
# Small GEMM tiles so that M = 33 and N = 37 span several masked tiles in both directions.
SMALL_GEMM = {"gemm": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4,
                       "num_stages": 1}}


@pytest.fixture
def check(reference, assert_scaled):
    def check(case, config=None):
        y = qt.forward(case.x, *case.packed, case.lora_A, case.lora_B, case.scaling,
                       case.bias, config=config)
        want = reference.forward(case.x, *case.packed, case.lora_A, case.lora_B,
                                 case.scaling, case.bias)
        assert y.dtype == case.x.dtype
        assert_scaled(y, want, case.magnitude(), case.x.dtype, "y")
        return y
    return check


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_every_bits_and_group(make_case, check, bits, group_size, path):
    case = make_case(bits, group_size, PATHS[path], 100, 37, 17, bias=True,
                     scale_dtype=torch.bfloat16 if bits == 3 else torch.float16)
    check(case, SMALL_GEMM if group_size == 64 else None)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rank", RANKS)
def test_ranks(make_case, check, rank, path):
    check(make_case(3, 64, PATHS[path], 96, 45, rank, seed=rank))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lora_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("x_dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_dtypes(make_case, check, x_dtype, lora_dtype, path):
    check(make_case(4, 32, PATHS[path], 64, 29, 16, x_dtype=x_dtype, lora_dtype=lora_dtype,
                    bias=True))


@pytest.mark.parametrize("lead", [(3,), (2, 2)])
def test_leading_dimensions(make_case, check, lead):
    # 3 x 1 = 3 rows (decode), 2 x 2 x 9 = 36 rows (GEMM).
    m = 1 if len(lead) == 1 else 9
    y = check(make_case(2, 32, m, 70, 21, 7, lead=lead, bias=True))
    assert y.shape == (*lead, m, 21)


@pytest.mark.parametrize("split_k", (1, 2, 3, 50))
def test_split_k_is_exact_partition(make_case, check, split_k):
    # K = 300 with BLOCK_K 32: 10 K-blocks; 3 slabs of 4, 4, 2 blocks; 50 clamps to 10.
    check(make_case(8, 32, 2, 300, 19, 7, bias=True), {"split_k": split_k})


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_decode_tiles_spanning_groups(make_case, check, bits, group_size):
    # BLOCK_K 256 spans 8, 4 or 2 groups; K = 300 (Kp 320 or 384) ends mid-tile.
    long_k = {"decode": {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1,
                         "programs_per_sm": 4}}
    case = make_case(bits, group_size, 3, 300, 37, 7, bias=True)
    check(case, dict(long_k, split_k=1))
    check(case, dict(long_k, split_k=2))


def test_no_lora_at_all(make_case, reference, assert_scaled):
    case = make_case(4, 64, 4, 128, 40, 0)
    y = qt.forward(case.x, *case.packed)
    want = reference.forward(case.x, *case.packed, None, None, 1.0, None)
    assert_scaled(y, want, case.magnitude(), case.x.dtype, "y")


@pytest.mark.parametrize("m", (1, 16, 17))
def test_decode_threshold_from_config(make_case, check, m, monkeypatch):
    # Rows up to decode_max_m take the decode kernel; one more row takes the GEMM.
    calls = []
    for name in ("gemv", "gemm"):
        original = getattr(qt, name)
        monkeypatch.setattr(qt, name, lambda *a, _o=original, _n=name, **kw:
                            (calls.append(_n), _o(*a, **kw))[1])
    check(make_case(2, 32, m, 64, 24, 1))
    assert calls == (["gemv"] if m <= 16 else ["gemm"])


def test_empty_x(make_case):
    case = make_case(4, 32, 0, 64, 24, 3)
    y = qt.forward(case.x, *case.packed, case.lora_A, case.lora_B, 1.0)
    assert y.shape == (0, 24)


def test_lora_down_ranks(make_case):
    # The LoRA down projection alone, every rank chunking, fp32 vs fp32 matmul.
    from qra_kernels.triton import lora_down
    for m, rank in ((1, 64), (5, 17), (40, 1)):
        case = make_case(2, 32, m, 200, 8, rank, x_dtype=torch.float16)
        got = lora_down(case.x, case.lora_A)
        want = case.x.float() @ case.lora_A.float().t()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


BAD = [
    ("bits", dict(bits=5), ValueError, "bits"),
    ("group", dict(group_size=48), ValueError, "group_size"),
    ("qweight shape", dict(qweight=torch.zeros(3, 24, dtype=torch.int32)), ValueError, "qweight"),
    ("qweight dtype", dict(qweight=torch.zeros(8, 24, dtype=torch.int64)), ValueError, "qweight"),
    ("scales shape", dict(scales=torch.ones(3, 24, dtype=torch.float16)), ValueError, "scales"),
    ("scales dtype", dict(scales=torch.ones(2, 24)), TypeError, "scales"),
    ("x dtype", dict(x=torch.ones(2, 64, dtype=torch.float64)), TypeError, "x"),
    ("x int", dict(x=torch.ones(2, 64, dtype=torch.int32)), TypeError, "x"),
    ("lora_A shape", dict(lora_A=torch.ones(3, 63)), ValueError, "lora_A"),
    ("lora_B shape", dict(lora_B=torch.ones(24, 2)), ValueError, "lora_B"),
    ("lora half given", dict(lora_B=None), ValueError, "lora_A and lora_B"),
    ("bias shape", dict(bias=torch.ones(23)), ValueError, "bias"),
    ("out_features", dict(out_features=0), ValueError, "out_features"),
]


@pytest.mark.parametrize("name,change,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(make_case, name, change, error, match):
    case = make_case(4, 32, 2, 64, 24, 3)
    args = dict(x=case.x, qweight=case.qweight, scales=case.scales, zeros=case.zeros, bits=4,
                group_size=32, out_features=24, lora_A=case.lora_A, lora_B=case.lora_B,
                scaling=1.0, bias=None)
    args.update(change)
    with pytest.raises(error, match=match):
        qt.forward(**args)
