"""The performance model (qra_kernels/bench/model.py): its bounds, on synthetic counts.

The model is arithmetic on static counts and assumptions; these tests pin the arithmetic
(not any GPU number): which bound limits, the HBM cap, the fixed costs, the LoRA overhead
and the measured-vs-predicted pairing.
"""
import pytest

from qra_kernels import _ext
from qra_kernels.bench import model

needs_host = pytest.mark.skipif(_ext.extension() is None or not hasattr(_ext.extension(), "cuda_host"),
                                reason="qra_kernels._C is not built")


def _kernel(loop, hmma=8, registers=96):
    return {"loop_instructions": loop, "loop_mix": {"tensor": hmma}, "registers": registers,
            "meta": {"kernel": "decode"}, "features": {}}


@needs_host
def test_memory_bound_kernel_reaches_the_hbm_cap_and_no_more():
    plan = _ext.extension().cuda_host.decode_plan(1, 14336, 4096, 4, 64, 0, 2, 132, 2)
    p = model.predict_cuda_decode(_kernel(150), plan, "H100-SXM", 1, 14336, 4096, 4, 64, 0)
    assert p["limiter"] == "hbm"
    assert p["hbm_fraction_steady"] == pytest.approx(model.ASSUMPTIONS["hbm_efficiency"], abs=1e-3)
    assert p["hbm_fraction_call"] < p["hbm_fraction_steady"]
    assert p["bytes"] == model.decode_bytes(1, 14336, 4096, 4, 64, 0, splits=plan["splits"])
    # Fixed costs: launch gap + first-byte latency (+ the split-K finish).
    lat, gap = model.ASSUMPTIONS["dram_latency_us"], model.ASSUMPTIONS["launch_gap_us"]
    assert p["fixed_us"] == pytest.approx(gap + lat + (lat if plan["splits"] > 1 else 0))


@needs_host
def test_too_many_instructions_make_it_issue_bound():
    plan = _ext.extension().cuda_host.decode_plan(1, 4096, 4096, 2, 64, 0, 2, 132, 2)
    fast = model.predict_cuda_decode(_kernel(100), plan, "H200", 1, 4096, 4096, 2, 64, 0)
    slow = model.predict_cuda_decode(_kernel(1000), plan, "H200", 1, 4096, 4096, 2, 64, 0)
    assert slow["limiter"] == "issue" and slow["time_us"] > fast["time_us"]
    assert slow["hbm_fraction_steady"] < fast["hbm_fraction_steady"]
    # Issue time: the loop's instructions (linear) plus the x staging (the same for both).
    assert 9 < slow["bounds_us"]["issue"] / fast["bounds_us"]["issue"] < 10


def test_lora_overhead_and_compare_pair_the_right_cases():
    base = dict(device="H100-SXM", kernel="cuda:decode", m=1, n=4096, k=4096, bits=4,
                group_size=64, time_us=10.0, fixed_us=3.0, hbm_fraction_call=0.5)
    preds = [dict(base, rank=0), dict(base, rank=16, time_us=10.5)]
    (o,) = model.lora_overheads(preds)
    assert o["overhead"] == pytest.approx(0.05, abs=1e-3)
    assert o["overhead_steady"] == pytest.approx(0.5 / 7, abs=1e-3)
    rows = [{"status": "ok", "implementation": "qra:cuda", "M": 1, "out_features": 4096,
             "in_features": 4096, "bits": 4, "rank": 16, "median_us": 21.0,
             "achieved_GBps": 1000.0},
            {"status": "ok", "implementation": "torch_dense_bf16", "M": 1, "out_features": 4096,
             "in_features": 4096, "bits": 4, "rank": 16, "median_us": 5.0, "achieved_GBps": 1.0}]
    (c,) = model.compare(preds, rows, "NVIDIA H100 80GB HBM3")
    assert c["measured_over_predicted"] == pytest.approx(2.0) and c["predicted_device"] == "H100-SXM"
    assert c["measured_hbm_fraction"] == pytest.approx(1000e9 / 3.35e12, abs=1e-3)
    assert model.compare(preds, rows, "NVIDIA H200")[0:0] == []  # no H200 predictions here
