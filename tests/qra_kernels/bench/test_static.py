"""The static check (qra_kernels/bench/static.py): SASS parsing, main-loop detection, the gate.

On canned ``cuobjdump`` output, then on two tiny kernels compiled with nvcc for sm_90 (about
ten seconds): one that streams with 16-byte loads in a loop (no local memory) and one that
indexes a register array with a runtime value (local memory: the gate must fail it).
"""
import os
import shutil
import subprocess

import pytest

from qra_kernels.bench import static

SASS = """
	code for sm_90
		Function : _ZN3qra4cuda6decode13decode_kernelILi4ELi1ELi1ELi2EEEvNS1_6ParamsE
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x0 */
        /*0010*/                   S2R R0, SR_TID.X ;                      /* 0x0 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;        /* 0x0 */
        /*0030*/                   LDGSTS.E.BYPASS.128 [R7], desc[UR4][R8.64], P0 ;   /* 0x0 */
        /*0040*/                   LDS.128 R12, [R7] ;                     /* 0x0 */
        /*0050*/                   LOP3.LUT R16, R12, 0xf000f, R9, 0xea, !PT ;   /* 0x0 */
        /*0060*/                   HFMA2 R16, R16, R10.H0_H0, -1024, -1024 ;     /* 0x0 */
        /*0070*/                   HMMA.16816.F32 R20, R16, R24, R20 ;      /* 0x0 */
        /*0080*/                   ISETP.GE.AND P0, PT, R0, R5, PT ;         /* 0x0 */
        /*0090*/               @!P0 BRA 0x30 ;                               /* 0x0 */
        /*00a0*/                   LDG.E R4, desc[UR4][R2.64] ;             /* 0x0 */
        /*00b0*/                   FADD R4, R4, R4 ;                         /* 0x0 */
        /*00c0*/               @!P0 BRA 0xa0 ;                               /* 0x0 */
        /*00d0*/                   STL [R1], R4 ;                            /* 0x0 */
        /*00e0*/                   EXIT ;                                    /* 0x0 */
"""
RES = """
Resource usage:
 Common:
  GLOBAL:0
 Function _ZN3qra4cuda6decode13decode_kernelILi4ELi1ELi1ELi2EEEvNS1_6ParamsE:
  REG:96 STACK:8 SHARED:1040 LOCAL:0 CONSTANT[0]:752 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
NAME = "_ZN3qra4cuda6decode13decode_kernelILi4ELi1ELi1ELi2EEEvNS1_6ParamsE"


def test_sass_is_parsed_by_arch_and_function():
    parsed = static.parse_sass(SASS)
    ins = parsed["sm_90"][NAME]
    assert [i.opcode for i in ins[:3]] == ["LDC", "S2R", "LDG.E.128"]
    assert ins[9].predicate == "@!P0" and ins[9].branch_target() == 0x30
    assert ins[2].global_load_bytes() == 16 and ins[3].global_load_bytes() == 16
    assert ins[10].global_load_bytes() == 4 and ins[4].global_load_bytes() == 0
    assert static.parse_res_usage(RES)["unknown"][NAME] == dict(registers=96, stack=8,
                                                               shared=1040, local=0)


def test_main_loop_is_the_tensor_core_loop():
    ins = static.parse_sass(SASS)["sm_90"][NAME]
    assert static.loops(ins) == [(3, 9), (10, 12)]
    assert static.main_loop(ins) == (3, 9)
    st = static.analyze(NAME, "sm_90", ins, static.parse_res_usage(RES)["unknown"][NAME])
    assert st.loop_instructions == 7 and st.loop_load_bytes == 16
    assert st.instructions_per_byte == round(7 / 16, 3)
    assert st.loop_mix["tensor"] == 1 and st.loop_mix["lop3"] == 1 and st.loop_mix["half2"] == 1
    assert st.features == {"LDG.128": True, "LDGSTS": True, "LDSM": False, "HMMA": True,
                           "HGMMA": False}
    assert st.local_instructions == 1


def test_the_gate_fails_local_memory_and_register_overruns():
    ins = static.parse_sass(SASS)["sm_90"][NAME]
    st = static.analyze(NAME, "sm_90", ins, static.parse_res_usage(RES)["unknown"][NAME])
    st.meta.update(static.cuda_kernel_meta(NAME))
    assert st.meta["kernel"] == "decode" and st.meta["bits"] == 4 and st.meta["x"] == "bf16"
    assert st.meta["rows"] == 8 and st.meta["group_size"] == 64
    failures = static.check([st])
    assert len(failures) == 1 and "local memory" in failures[0]
    st.stack_bytes, st.local_instructions = 0, 0
    st.registers = 200  # budget 128 (four blocks of 128 threads per SM)
    assert "registers" in static.check([st])[0]
    st.registers = 96
    assert static.check([st]) == []


HAS_NVCC = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")

KERNELS = r"""
extern "C" __global__ void stream(const float4* __restrict__ a, float* out, int n) {
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float4 v = __ldg(a + i);
    s = fmaf(v.x, v.y, s) + fmaf(v.z, v.w, s);
  }
  out[threadIdx.x] = s;
}
extern "C" __global__ void spills(const float* a, float* out, int n, int j) {
  float t[64];
  for (int i = 0; i < 64; ++i) t[i] = a[i * n + threadIdx.x];
  // Data-dependent read-modify-writes: the array must live in local memory.
  for (int i = 0; i < 64; ++i) t[(int)a[n * 64 + i] & 63] += 1.f;
  float s = 0.f;
  for (int i = 0; i < 64; ++i) s = fmaf(t[i], a[i], s);
  out[threadIdx.x] = s;
}
"""


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed")
def test_real_cubin(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(KERNELS)
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-O3", "-o", str(tmp_path / "k.cubin"),
                    str(src)], check=True, timeout=300)
    stats = {s.name: s for s in static.cubin_stats(str(tmp_path / "k.cubin"))}
    stream, spills = stats["stream"], stats["spills"]
    assert stream.features["LDG.128"] and stream.loop_load_bytes and stream.loop_load_bytes % 16 == 0
    assert stream.registers > 0 and stream.stack_bytes == 0 and stream.local_instructions == 0
    assert static.check([stream]) == []
    assert spills.stack_bytes > 0 or spills.local_instructions > 0
    assert static.check([spills])
