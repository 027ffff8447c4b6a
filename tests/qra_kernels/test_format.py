"""The packed layout: exact round trips, the byte formula, the worked example of
docs/FORMAT.md, serialization, and validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qra_kernels.format import (PLANES, QuantizedWeight, dequantize, pack, packed_nbytes,
                                padded_in_features, unpack)

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), rows=st.integers(1, 9), words=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1), extreme=st.sampled_from(["random", "zeros", "max",
                                                                "alternate"]))
def test_pack_unpack_roundtrip(bits, rows, words, seed, extreme):
    kp = 32 * words
    qmax = (1 << bits) - 1
    g = torch.Generator().manual_seed(seed)
    if extreme == "random":
        codes = torch.randint(0, qmax + 1, (rows, kp), generator=g)
    elif extreme == "zeros":
        codes = torch.zeros(rows, kp, dtype=torch.int64)
    elif extreme == "max":  # every bit set: exercises the sign bit of the int32 words
        codes = torch.full((rows, kp), qmax, dtype=torch.int64)
    else:
        codes = (torch.arange(kp) % 2 * qmax).expand(rows, kp).clone()
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (kp * bits // 32, rows)
    assert torch.equal(unpack(packed, bits, kp).to(torch.int64), codes)


def test_pack_bit_positions_match_the_documented_layout():
    # docs/FORMAT.md worked example: 3-bit codes 0..7 repeated, one output row.
    codes = torch.arange(32).remainder(8).unsqueeze(0)  # k -> k % 8
    packed = pack(codes, 3)
    assert packed.shape == (3, 1)  # two words of the 2-bit plane, one of the 1-bit plane
    low = [int(c) & 3 for c in codes[0]]
    high = [int(c) >> 2 for c in codes[0]]
    word0 = sum(v << (2 * j) for j, v in enumerate(low[:16]))
    word1 = sum(v << (2 * j) for j, v in enumerate(low[16:]))
    word2 = sum(v << j for j, v in enumerate(high))
    as_u32 = [int(w) & 0xFFFFFFFF for w in packed[:, 0]]
    assert as_u32 == [word0, word1, word2]
    assert as_u32 == [0xE4E4E4E4, 0xE4E4E4E4, 0xF0F0F0F0]  # the values FORMAT.md prints


@pytest.mark.parametrize("bits", BITS)
def test_planes_cover_every_bit_once(bits):
    covered = sorted(off + i for width, off in PLANES[bits] for i in range(width))
    assert covered == list(range(bits))
    assert all(32 % width == 0 for width, _ in PLANES[bits])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("n,k", [(1, 128), (7, 256), (13, 384), (5, 200)])
def test_nbytes_matches_formula(bits, group_size, n, k):
    from qra_kernels import quantize_weight
    w = torch.randn(n, k)
    qw = quantize_weight(w, bits, group_size, "rtn", pad=True)
    kp = padded_in_features(k, group_size)
    assert qw.nbytes == n * kp * bits // 8 + 2 * 2 * n * (kp // group_size)
    assert qw.nbytes == packed_nbytes(n, k, bits, group_size)
    assert qw.shape == (n, k)
    assert qw.dequantize().shape == (n, k)


def test_dict_roundtrip_and_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from qra_kernels import quantize_weight
    qw = quantize_weight(torch.randn(9, 64), 3, 32)
    save_file(qw.to_dict(), str(tmp_path / "w.safetensors"))
    back = QuantizedWeight.from_dict(load_file(str(tmp_path / "w.safetensors")))
    assert (back.bits, back.group_size, back.shape) == (3, 32, (9, 64))
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_dequantize_formula():
    # (q - z) * s per group, checked element by element from the codes.
    from qra_kernels import quantize_weight
    qw = quantize_weight(torch.randn(3, 64), 4, 32, "hqq")
    codes = qw.codes().float()
    s, z = qw.scales.float(), qw.zeros.float()
    expect = torch.empty(3, 64)
    for n in range(3):
        for k in range(64):
            expect[n, k] = (codes[n, k] - z[k // 32, n]) * s[k // 32, n]
    assert torch.allclose(qw.dequantize(), expect, rtol=0, atol=1e-6)
    assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_validation_errors():
    qw_args = dict(bits=4, group_size=32, shape=(2, 64))
    good = (torch.zeros(8, 2, dtype=torch.int32), torch.ones(2, 2, dtype=torch.float16),
            torch.zeros(2, 2, dtype=torch.float16))
    QuantizedWeight(*good, **qw_args)
    with pytest.raises(ValueError, match="qweight"):
        QuantizedWeight(torch.zeros(7, 2, dtype=torch.int32), *good[1:], **qw_args)
    with pytest.raises(TypeError, match="scales"):
        QuantizedWeight(good[0], good[1].float(), good[2], **qw_args)
    with pytest.raises(ValueError, match="zeros"):
        QuantizedWeight(*good[:2], torch.zeros(3, 2, dtype=torch.float16), **qw_args)
    with pytest.raises(ValueError, match="bits"):
        QuantizedWeight(*good, bits=5, group_size=32, shape=(2, 64))
    with pytest.raises(TypeError, match="group_size"):
        QuantizedWeight(*good, bits=4, group_size=32.0, shape=(2, 64))
    with pytest.raises(ValueError, match="codes"):
        pack(torch.full((1, 32), 4), 2)
    with pytest.raises(ValueError, match="meta"):
        QuantizedWeight.from_dict({"qweight": good[0], "scales": good[1], "zeros": good[2],
                                   "meta": torch.tensor([99, 4, 32, 2, 64])})
    with pytest.raises(ValueError, match="missing"):
        QuantizedWeight.from_dict({"qweight": good[0]})


def test_to_device_keeps_everything():
    from qra_kernels import quantize_weight
    qw = quantize_weight(torch.randn(4, 64), 2, 64)
    moved = qw.to("cpu")
    assert moved.nbytes == qw.nbytes and torch.equal(moved.qweight, qw.qweight)
    assert torch.equal(dequantize(qw.qweight, qw.scales, qw.zeros, 2, 64, (4, 64)),
                       moved.dequantize())
