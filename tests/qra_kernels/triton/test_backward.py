"""The backward kernels against the reference, interpreted on CPU.

dX = dY·dequant(W) + s·(dY·B)·A comes from the packed buffer (grad_input); dA and dB from
the fused LoRA reductions (lora_grad). Same odd shapes as the forward tests.
"""
import pytest
import torch

import qra_kernels.triton as qt

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
RANKS = (0, 1, 7, 16, 17, 64)
ROWS = (1, 5, 33)
# Small tiles: several masked tiles along M and K, and more than one N step.
SMALL = {"grad_input": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4,
                        "num_stages": 1},
         "lora_grad": {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16, "num_warps": 4,
                       "num_stages": 1}}


def grad_magnitudes(case):
    """Scales of the sums behind dX, dA and dB (see conftest.RTOL)."""
    k, n, s = case.k, case.n, abs(case.scaling)
    dy = case.grad_out.reshape(-1, n).float().abs()
    x = case.x.reshape(-1, k).float().abs()
    a, b = case.lora_A.float().abs(), case.lora_B.float().abs()
    mag_x = dy @ case.weight().abs() + s * (dy @ b) @ a
    mag_a = s * (dy @ b).t() @ x
    mag_b = s * dy.t() @ (x @ a.t())
    return mag_x.reshape(case.x.shape), mag_a, mag_b


@pytest.fixture
def check(reference, assert_scaled):
    def check(case, need_x=True, need_lora=True, config=None):
        got = qt.backward(case.grad_out, case.x, *case.packed, case.lora_A, case.lora_B,
                          case.scaling, need_x, need_lora, config=config)
        want = reference.backward(case.grad_out, case.x, *case.packed, case.lora_A,
                                  case.lora_B, case.scaling, need_x, need_lora)
        mags = grad_magnitudes(case)
        for name, g, w, mag, dtype in zip(
                ("dX", "dA", "dB"), got, want, mags,
                (case.x.dtype, case.lora_A.dtype, case.lora_B.dtype)):
            assert (g is None) == (w is None), name
            if g is not None:
                assert g.dtype == w.dtype, name
                # dA/dB are fp32 sums of products of x's dtype: x's rounding bounds them too.
                tol_dtype = dtype if name == "dX" else (
                    torch.float32 if dtype == torch.float32 else torch.bfloat16)
                assert_scaled(g, w, mag, tol_dtype, name)
        return got
    return check


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_every_bits_and_group(make_case, check, bits, group_size, m):
    case = make_case(bits, group_size, m, 100, 37, 17,
                     scale_dtype=torch.bfloat16 if bits == 2 else torch.float16)
    check(case, config=SMALL if group_size == 32 else None)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("rank", RANKS)
def test_ranks(make_case, check, rank, m):
    check(make_case(3, 64, m, 96, 45, rank, seed=rank), config=SMALL)


@pytest.mark.parametrize("lora_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("x_dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_dtypes(make_case, check, x_dtype, lora_dtype):
    check(make_case(4, 32, 19, 64, 29, 16, x_dtype=x_dtype, lora_dtype=lora_dtype))


@pytest.mark.parametrize("need_x,need_lora", [(True, False), (False, True), (False, False)])
def test_only_what_is_asked(make_case, check, need_x, need_lora):
    got = check(make_case(8, 128, 3, 130, 17, 7), need_x, need_lora)
    assert (got[0] is not None) == need_x
    assert (got[1] is not None) == need_lora and (got[2] is not None) == need_lora


def test_leading_dimensions(make_case, check):
    got = check(make_case(2, 32, 5, 70, 21, 7, lead=(2, 3)))
    assert got[0].shape == (2, 3, 5, 70)


def test_rank_zero_lora_grads_are_zero(make_case):
    case = make_case(4, 32, 3, 64, 24, 0)
    dx, da, db = qt.backward(case.grad_out, case.x, *case.packed, case.lora_A, case.lora_B)
    assert da.shape == (0, 64) and db.shape == (24, 0)


def test_grad_out_shape_is_checked(make_case):
    case = make_case(4, 32, 3, 64, 24, 2)
    with pytest.raises(ValueError, match="grad_out"):
        qt.backward(case.grad_out[:, :-1], case.x, *case.packed, case.lora_A, case.lora_B)
