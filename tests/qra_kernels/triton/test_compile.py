"""Every kernel variant compiles for sm_80 and sm_90 on this CPU-only machine, and passes
the static gate.

The variants are those the launch wrappers actually launch (recorded, not run: see
qra_kernels/triton/aot.py) for every bit-width, activation dtype, group size, LoRA or not,
decode (1 and 2-16 rows, split-K or not), GEMM and backward — with the specialization the
JIT gives real arguments (16-divisible ints and pointers, ints equal to 1), so the cubin is
the one a GPU call runs. CI compiles a covering subset (every kernel meets every value of
each of its compile-time choices and every dtype) down to a cubin with Triton's bundled
ptxas and reads its SASS (qra_kernels/bench/static.py): no variant may use local memory
(spills or stack), and the decode and GEMM kernels must use 16-byte loads.
``python -m qra_kernels.triton.aot`` compiles the whole product (see the README for its time).
"""
import pytest
import torch

from qra_kernels.bench import static
from qra_kernels.triton import aot

TARGETS = {80: "sm_80", 90: "sm_90a"}


@pytest.fixture(scope="module")
def subset():
    found = aot.variants()
    chosen = aot.covering(found)
    return found, chosen


def test_the_subset_covers_every_choice(subset):
    found, chosen = subset
    names = {v.name for v in found}
    assert names == {"gemv_kernel", "splitk_reduce_kernel", "gemm_kernel", "grad_input_kernel",
                     "lora_down_kernel", "lora_grad_kernel"}
    for name in ("gemv_kernel", "gemm_kernel", "grad_input_kernel"):
        mine = [v for v in chosen if v.name == name]
        assert {v.constexprs["BITS"] for v in mine} == {2, 3, 4, 8}, name
        assert {v.constexprs["GROUP"] for v in mine} == {32, 64, 128}, name
        assert {v.signature["x_ptr" if name != "grad_input_kernel" else "dy_ptr"]
                for v in mine} == {"*fp16", "*bf16", "*fp32"}, name
        assert {v.constexprs["HAS_LORA"] for v in mine} == {True, False}, name
    gemv = [v for v in chosen if v.name == "gemv_kernel"]
    assert {v.constexprs["SPLIT"] for v in gemv} == {True, False}
    assert {v.constexprs["BLOCK_M"] for v in gemv if not v.constexprs["IEEE_DOT"]} == {1, 16}


def test_variants_carry_the_runtime_specialization(subset):
    # What Triton's JIT would give these arguments: 16-divisible sizes and pointers get the
    # divisibility hint (16-byte loads), one row of x becomes the constant M = 1.
    found, _ = subset
    gemv = [v for v in found if v.name == "gemv_kernel"]
    names = [p.name for p in gemv[0].kernel.params]
    for v in gemv:
        hinted = {names[i[0]] for i in v.attrs}
        assert {"qw_ptr", "x_ptr", "N", "Kp"} <= hinted, v
        if v.constexprs["BLOCK_M"] == 1:
            assert v.constexprs.get("M") == 1, v


def test_rank_is_never_a_compile_time_value(subset):
    found, _ = subset
    for v in found:
        assert "rank" not in v.constexprs, v
        if "rank" in v.signature:
            assert v.signature["rank"] == "i32"


@pytest.mark.parametrize("capability", TARGETS)
def test_compiles_for_gpu_target_and_passes_the_static_gate(subset, capability, tmp_path,
                                                           monkeypatch):
    # A fresh cache: compile here, not reuse an earlier run's binaries. Each variant is
    # compiled once; its PTX is checked, then its SASS: no stack frame, no spill, no LDL/STL,
    # and the streaming kernels read packed words with 16-byte loads (LDG.128 or LDGSTS).
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    _, chosen = subset
    failures, stats = [], []
    for i, v in enumerate(chosen):
        try:
            compiled = aot.compile_variant(v, capability)
        except Exception as e:  # noqa: BLE001 - one report lists every failure
            failures.append(f"{v!r}: {type(e).__name__}: {e}"[:2000])
            continue
        ptx = compiled.asm.get("ptx", "")
        target = next((line.split()[1] for line in ptx.splitlines() if line.startswith(".target")),
                      None)
        assert target == TARGETS[capability], (v, target)
        assert f".entry {v.name}" in ptx, v
        assert len(compiled.asm.get("cubin", b"")) > 0, v
        # The dequantize-in-the-main-loop kernels must still run on tensor cores.
        if v.name in ("gemm_kernel", "grad_input_kernel") and not v.constexprs.get("IEEE_DOT", 1):
            assert "mma.sync" in ptx or "wgmma" in ptx, v
        path = tmp_path / f"v{i}.cubin"
        path.write_bytes(compiled.asm["cubin"])
        for st in static.cubin_stats(str(path)):
            st.name = repr(v)
            st.meta.update(kernel="triton:" + v.name, register_budget=255)
            stats.append((v, st))
    assert not failures, "\n".join(failures)
    gate = static.check([st for _, st in stats])
    assert not gate, "\n".join(gate)
    for v, st in stats:
        if v.name in ("gemv_kernel", "gemm_kernel", "grad_input_kernel"):
            assert st.features["LDG.128"] or st.features["LDGSTS"], (repr(v), st.features)
