"""The benchmark runner on tiny shapes: every backend and peer shows up, the byte counts
and bandwidth fractions follow their definitions, and the timing/memory protocol
measures what it claims."""
import math

import pytest
import torch

import qra_kernels as qk
from qra_kernels.bench import impls, machine, report, runner, timing
from qra_kernels.bench.shapes import MODELS, shapes_for

TINY = runner.SuiteConfig(models=("tiny",), layers=("proj",), bits=(2, 3), ranks=(0, 5),
                          ms=(1, 3), group_size=32, min_time_s=0.005, max_rounds=2,
                          max_copies=4, max_pass_s=0.05)


@pytest.fixture(scope="module")
def tiny_report():
    torch.manual_seed(0)
    return runner.run_suite(TINY)


def test_every_backend_and_usable_peer_is_measured(tiny_report):
    rows = tiny_report["rows"]
    measured = {r["implementation"] for r in rows if r["status"] == "ok"}
    for name in qk.available_backends():
        assert f"qra:{name}" in measured
        assert tiny_report["backends"][name]["usable_here"]
    peers, _ = impls.peer_impls(torch.device("cpu"))
    for p in peers:
        info = tiny_report["peers"][p.name]
        assert info["installed"] == (impls.package_version(p.package) is not None)
        if p.unavailable is None and (p.float_weight or set(p.bits) & set(TINY.bits)):
            assert p.name in measured, info
        elif p.unavailable is not None:
            assert p.name not in measured
            assert info["could_not_run"], "an unusable peer must say why"
    # A bit-width a peer does not implement is noted, never silently dropped.
    if "torch_int8pack" in tiny_report["peers"] and tiny_report["peers"]["torch_int8pack"][
            "usable_here"]:
        notes = tiny_report["peers"]["torch_int8pack"]["could_not_run"]
        assert {n["bits"] for n in notes} == {2, 3}


def test_rows_cover_the_sweep_and_follow_the_definitions(tiny_report):
    bw = tiny_report["hardware_limit"]["copy_bandwidth_GBps"]
    assert bw > 0
    ok = [r for r in tiny_report["rows"] if r["status"] == "ok"]
    qra_rows = [r for r in ok if r["implementation"] == "qra:reference"]
    assert {(r["bits"], r["rank"], r["M"]) for r in qra_rows} == {
        (b, r, m) for b in TINY.bits for r in TINY.ranks for m in TINY.ms}
    n, k = 96, 128
    for r in qra_rows:
        expected = (qk.packed_nbytes(n, k, r["bits"], 32) + r["M"] * k * 4
                    + qk.lora_nbytes(n, k, r["rank"], 4))
        assert r["bytes_read"] == expected
        assert r["weight_bytes"] == qk.packed_nbytes(n, k, r["bits"], 32)
    for r in ok:
        assert r["median_us"] > 0 and r["min_us"] <= r["median_us"]
        assert math.isclose(r["achieved_GBps"], r["bytes_read"] / (r["median_us"] * 1e-6) / 1e9,
                            rel_tol=1e-9)
        assert math.isclose(r["bandwidth_fraction"], r["achieved_GBps"] / bw, rel_tol=1e-9)
        assert 1 <= r["copies"] <= TINY.max_copies
        assert r["cold_cache"] is False  # 4 tiny copies never exceed the LLC
        assert r["timer"] == "perf_counter"
    # The report is what the CLI writes: JSON-ready and with the machine described.
    m = tiny_report["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "last_level_cache_bytes", "qra"):
        assert key in m


def test_bench_call_path_computes_the_op():
    """What the runner times for a qra backend is the op itself, adapter fused."""
    w = torch.randn(40, 64)
    x = torch.randn(3, 64)
    a, b = torch.randn(4, 64), torch.randn(40, 4)
    for impl in impls.qra_impls():
        if impl.unavailable:
            continue
        base = impl.prepare(w, 4, 32, torch.float32)
        p = impl.bind(base, x, (a, b, 0.5))
        qw = qk.quantize_weight(w, 4, 32, method="rtn")
        want = x @ qw.dequantize().t() + 0.5 * (x @ a.t()) @ b.t()
        torch.testing.assert_close(p.call(p.state), want, rtol=1e-3, atol=1e-3)


def test_peers_add_the_adapter_unfused():
    peers, _ = impls.peer_impls(torch.device("cpu"))
    dense = next(p for p in peers if p.name == "torch_dense_fp32")
    w, x = torch.randn(24, 32), torch.randn(2, 32)
    a, b = torch.randn(3, 32), torch.randn(24, 3)
    p = dense.bind(dense.prepare(w, None, 32, torch.float32), x, (a, b, 2.0))
    torch.testing.assert_close(p.call(p.state), x @ w.t() + 2.0 * (x @ a.t()) @ b.t())


def test_peer_that_cannot_run_says_why():
    peers, _ = impls.peer_impls(torch.device("cpu"))
    int8 = next(p for p in peers if p.name == "torch_int8pack")
    with pytest.raises(impls.CannotRun, match="8-bit only"):
        int8.prepare(torch.randn(8, 32), 4, 32, torch.float32)
    gemlite = next(p for p in peers if p.name == "gemlite")
    with pytest.raises(impls.CannotRun):
        gemlite.prepare(torch.randn(8, 32), 4, 32, torch.float32)


def test_speedups_pair_only_comparable_rows():
    base = dict(model="m", layer="l", out_features=8, in_features=8, rank=0, M=1,
                status="ok", weight_bytes=10)
    rows = [dict(base, implementation="qra:x", family="qra", bits=4, median_us=10.0),
            dict(base, implementation="qra:x", family="qra", bits=2, median_us=5.0),
            dict(base, implementation="p4", family="peer", bits=4, median_us=30.0),
            dict(base, implementation="dense", family="peer", bits=None, median_us=20.0,
                 weight_bytes=40),
            dict(base, implementation="p4", family="peer", bits=4, median_us=1.0, M=2),
            dict(base, implementation="broken", family="peer", bits=4, status="error")]
    s = report.speedups(rows)
    pairs = {(i["peer"], i["bits"]): i["speedup"] for i in s}
    assert pairs == {("p4", 4): 3.0, ("dense", 4): 2.0, ("dense", 2): 4.0}
    summary = report.summarize(rows)
    assert summary["qra:x vs dense"]["cases"] == 2
    assert math.isclose(summary["qra:x vs dense"]["geomean_speedup"], math.sqrt(8.0))
    assert summary["qra:x vs p4"]["ahead_in"] == 1


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        runner.with_overrides(TINY, bits=(5,)).validate()
    with pytest.raises(ValueError, match="ranks"):
        runner.with_overrides(TINY, ranks=(-1,)).validate()
    with pytest.raises(ValueError, match="ms"):
        runner.with_overrides(TINY, ms=(0,)).validate()
    with pytest.raises(ValueError, match="unknown model"):
        runner.with_overrides(TINY, models=("GPT-9",)).validate()
    with pytest.raises(ValueError, match="unknown implementations"):
        runner.run_suite(runner.with_overrides(TINY, implementations=("nope",)))


def test_shapes_are_the_published_projections():
    llama = {s.layer: (s.out_features, s.in_features) for s in MODELS["Llama-3-8B"]}
    assert llama == {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "o_proj": (4096, 4096),
                     "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
    qwen = {s.layer: (s.out_features, s.in_features) for s in MODELS["Qwen3-4B"]}
    assert qwen["q_proj"] == (4096, 2560) and qwen["down_proj"] == (2560, 9728)
    assert [s.layer for s in shapes_for(["SmolLM2-135M"], ["down_proj"])] == ["down_proj"]


def test_make_copies_honours_every_cap():
    state = {"w": torch.zeros(256)}  # 1 KiB
    assert len(timing.make_copies(state, 1024, cache_bytes=4096, max_copies=100)) == 8
    assert len(timing.make_copies(state, 1024, cache_bytes=1 << 20, max_copies=5)) == 5
    assert len(timing.make_copies(state, 1024, 1 << 20, memory_budget=3 * 1024)) == 3
    assert len(timing.make_copies(state, 1024, 1 << 20, call_s=0.01, max_pass_s=0.05)) == 5
    copies = timing.make_copies(state, 1024, cache_bytes=2048)
    assert copies[0] is state and copies[1]["w"].data_ptr() != state["w"].data_ptr()


def test_peak_call_memory_sees_a_temporary():
    n = 2 << 20  # 8 MiB of float32, freed before the call returns

    def call(_):
        t = torch.ones(n)
        return float(t.sum())

    peak = timing.peak_call_memory(call, None, torch.device("cpu"))
    if peak is None:
        pytest.skip("this platform cannot measure a call's resident-set peak")
    assert 0.9 * 4 * n <= peak <= 1.5 * 4 * n


def test_copy_bandwidth_is_measured():
    limit = machine.copy_bandwidth(torch.device("cpu"), nbytes=16 << 20, repeats=2)
    assert limit["copy_bandwidth_GBps"] > 0.1
    assert limit["copy_bandwidth_GBps"] >= limit["median_copy_bandwidth_GBps"]


@pytest.mark.gpu
def test_gpu_suite_times_with_cuda_graphs_and_a_cold_l2():
    cfg = runner.with_overrides(TINY, device="cuda", activation_dtype="bfloat16",
                                max_copies=4096, max_pass_s=1.0, ranks=(0,), ms=(1,))
    rep = runner.run_suite(cfg)
    assert rep["machine"]["gpu"]["name"]
    assert "CUDA graph" in rep["hardware_limit"]["method"]
    qra_rows = [r for r in rep["rows"] if r["family"] == "qra" and r["status"] == "ok"]
    assert qra_rows
    for r in qra_rows:
        assert r["timer"] == "cuda-graph", r
        assert r["cold_cache"], r
        assert r["peak_call_memory_bytes"] is not None
