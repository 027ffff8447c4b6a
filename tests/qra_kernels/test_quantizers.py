"""Quantizers: RTN against an independent implementation, HQQ never worse than RTN,
bounded memory, and every bad input."""
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qra_kernels as qk
from qra_kernels import quantizers

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)


def independent_rtn(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Min-max asymmetric RTN written group by group with Python loops (a second,
    unrelated implementation of the same definition), returning the dequantized weight."""
    qmax = 2 ** bits - 1
    out = torch.empty_like(w)
    for n in range(w.shape[0]):
        for start in range(0, w.shape[1], g):
            grp = w[n, start:start + g].double()
            lo, hi = grp.min().item(), grp.max().item()
            scale = (hi - lo) / qmax if hi > lo else (abs(lo) if lo != 0 else 1.0)
            # Stored in fp16, rounded up where nearest-rounding would shrink the grid below
            # the group's range (the definition in quantizers.py).
            s16 = torch.tensor(scale, dtype=torch.float64).half()
            if hi > lo and s16.item() < scale:
                s16 = torch.nextafter(s16, torch.tensor(float("inf"), dtype=torch.float16))
            scale = s16.item()
            zero = min(max(round(-lo / scale), 0), qmax)
            q = torch.clamp(torch.round(grp / scale + zero), 0, qmax)
            out[n, start:start + g] = ((q - zero) * scale).float()
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_rtn_matches_independent_implementation(bits, group_size):
    w = torch.randn(5, 2 * group_size) * torch.linspace(0.01, 3, 2 * group_size)
    got = qk.quantize_weight(w, bits, group_size, "rtn").dequantize()
    want = independent_rtn(w, bits, group_size)
    # Identical up to float rounding of w/s (a tie may round either way: allow one step).
    step = (w.max() - w.min()).item() / (2 ** bits - 1)
    assert (got - want).abs().max() <= step + 1e-5
    assert (got - want).abs().gt(1e-5).float().mean() < 0.01


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), group_size=st.sampled_from(GROUPS), rows=st.integers(1, 7),
       scale=st.sampled_from([1e-4, 1e-2, 1.0, 100.0, 3e3]), seed=st.integers(0, 10**6))
def test_rtn_error_bounded_by_one_step(bits, group_size, rows, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, group_size * 2, generator=g) * scale
    qw = qk.quantize_weight(w, bits, group_size, "rtn")
    err = (qw.dequantize() - w).abs()
    grp = w.view(rows, 2, group_size)
    step = ((grp.amax(-1) - grp.amin(-1)) / (2 ** bits - 1)).repeat_interleave(group_size, 1)
    step = step.view(rows, -1)
    # RTN with an integer zero: at most one step (half a step + half a step of zero shift),
    # plus fp16 rounding of the scale over up to 2^bits codes.
    assert bool((err <= step * (1 + 2 ** bits * 1e-3) + 1e-6 * scale).all())


@pytest.mark.parametrize("bits", BITS)
def test_hqq_never_worse_than_rtn_per_group(bits):
    # Heavy-tailed rows like real LLM weights, plus a few outlier columns.
    w = torch.distributions.StudentT(4.0).sample((48, 512)) * 0.02
    w[:, ::97] *= 20
    for g in GROUPS:
        e_rtn = (qk.quantize_weight(w, bits, g, "rtn").dequantize() - w).square()
        e_hqq = (qk.quantize_weight(w, bits, g, "hqq").dequantize() - w).square()
        per_rtn = e_rtn.view(48, -1, g).sum(-1)
        per_hqq = e_hqq.view(48, -1, g).sum(-1)
        assert bool((per_hqq <= per_rtn * (1 + 1e-6)).all())
        assert per_hqq.sum() < per_rtn.sum()  # and it does improve something


@pytest.mark.slow
def test_hqq_not_worse_than_rtn_on_real_weights(smollm2):
    model, _ = smollm2
    names = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj",
             "model.layers.29.mlp.gate_proj"]
    for name in names:
        w = model.get_submodule(name).weight.detach()
        for bits in BITS:
            e = {m: (qk.quantize_weight(w, bits, 64, m).dequantize() - w).square().sum().item()
                 for m in ("rtn", "hqq")}
            assert e["hqq"] <= e["rtn"], (name, bits, e)


def test_constant_and_zero_groups_are_exact():
    w = torch.cat([torch.zeros(2, 32), torch.full((2, 32), 0.37), torch.full((2, 32), -5.0)], 1)
    h = torch.eye(96) + 0.5  # correlated inputs: GPTQ moves error across columns
    for method in ("rtn", "hqq", "gptq"):
        for bits in BITS:
            back = qk.quantize_weight(w, bits, 32, method,
                                      h if method == "gptq" else None).dequantize()
            assert torch.allclose(back, w, rtol=1e-3, atol=0)


@pytest.mark.parametrize("method", quantizers.METHODS)
def test_padding_codes_are_zero(method):
    # docs/FORMAT.md: the padding columns K..Kp-1 hold code 0 (kernels mask them).
    w = torch.randn(5, 70)
    h = torch.eye(70) if method == "gptq" else None
    for bits in BITS:
        qw = qk.quantize_weight(w, bits, 64, method, h, pad=True)
        assert qw.padded_in_features == 128
        assert int(qw.codes()[:, 70:].max()) == 0
        assert int(qw.codes()[:, :70].max()) > 0


def test_tiny_values_do_not_vanish_or_nan():
    w = torch.randn(4, 64) * 1e-7
    for dtype in (torch.float16, torch.bfloat16):
        back = qk.quantize_weight(w, 4, 64, "hqq", scale_dtype=dtype).dequantize()
        assert torch.isfinite(back).all()
        assert (back - w).abs().max() < 1e-7


def test_bf16_scales_and_padding():
    w = torch.randn(6, 100)
    qw = qk.quantize_weight(w, 4, 64, "hqq", scale_dtype=torch.bfloat16, pad=True)
    assert qw.scales.dtype == torch.bfloat16 and qw.padded_in_features == 128
    assert qw.shape == (6, 100)
    assert (qw.dequantize() - w).abs().max() < 0.5


def test_chunking_does_not_change_results(monkeypatch):
    w = torch.randn(40, 256)
    whole = qk.quantize_weight(w, 3, 64, "hqq")
    monkeypatch.setattr(quantizers, "_CHUNK_ELEMENTS", 256 * 7)  # 7 rows per chunk
    chunked = qk.quantize_weight(w, 3, 64, "hqq")
    for a, b in zip(whole.to_dict().values(), chunked.to_dict().values()):
        assert torch.equal(a, b)


def test_peak_memory_is_a_few_times_the_weight():
    # A fresh process so the measurement is this quantization's alone.
    code = textwrap.dedent("""
        import resource, torch, qra_kernels as qk
        torch.set_num_threads(1)
        w = torch.randn(4096, 4096)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        qw = qk.quantize_weight(w, 4, 64, "hqq")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024 / (w.numel() * 4))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, check=True)
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio < 3.0, f"quantization peaked at {ratio:.2f}x the fp32 weight size"


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weight=[[1.0]]), TypeError, "weight"),
    (dict(weight=torch.ones(4, 64, dtype=torch.int32)), TypeError, "floating"),
    (dict(weight=torch.ones(64)), ValueError, "2-d"),
    (dict(weight=torch.ones(0, 64)), ValueError, "empty"),
    (dict(bits=5), ValueError, "bits"),
    (dict(bits=4.0), TypeError, "bits"),
    (dict(group_size=48), ValueError, "group_size"),
    (dict(method="awq"), ValueError, "method"),
    (dict(method="gptq"), ValueError, "hessian is required"),
    (dict(hessian=torch.eye(64)), ValueError, "hessian is only used by method='gptq'"),
    (dict(scale_dtype=torch.float32), TypeError, "scale_dtype"),
    (dict(weight=torch.ones(4, 96)), ValueError, "does not divide"),
    (dict(weight=torch.tensor([[float("nan")] * 64])), ValueError, "NaN"),
    (dict(weight=torch.tensor([[float("inf")] * 64])), ValueError, "Inf"),
    (dict(weight=torch.tensor([[-1e5, 1e5] * 32]), bits=2), ValueError, "bfloat16"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(weight=torch.randn(4, 64), bits=4, group_size=64, method="rtn")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        qk.quantize_weight(args.pop("weight"), args.pop("bits"), **args)
