"""Static check of the GPU kernels, on a CPU: what the machine code says before any GPU runs it.

For every kernel of a CUDA binary (the built extension or a cubin) and every Triton variant
that real calls launch, per architecture, this reads ``cuobjdump -res-usage`` and
``cuobjdump -sass`` (Triton ships both under ``triton/backends/nvidia/bin``) and reports:

* registers, shared memory, stack frame and local memory (spills and dynamically indexed
  arrays): the gate fails on any local memory in a forward/backward kernel, or registers
  above the kernel's budget;
* the main loop — the innermost loop that streams global memory (``LDG``/``LDGSTS``), found
  from the backward branches of the SASS — its instruction count, the bytes its global loads
  bring per thread, and so the SASS instructions per loaded byte (per thread: divide by 32
  for warp instructions), with the count of each instruction class;
* which of ``LDG.128`` (16-byte loads), ``LDGSTS`` (cp.async), ``LDSM`` (ldmatrix), ``HMMA``
  (mma.sync) and ``HGMMA`` (wgmma) the kernel uses at all.

:mod:`qra_kernels.bench.model` turns these counts into predicted times
(``benches/results/static-*.json``, explained in ``benches/README.md``).

Command line::

    python -m qra_kernels.bench.static --cuda-binary qra_kernels/_C*.so --triton \\
        --capabilities 80,90 --out static.json [--check]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["tool", "Instruction", "parse_sass", "analyze", "KernelStats", "cuda_binary_stats",
           "cubin_stats", "triton_stats", "check", "main"]


# ---- tools -------------------------------------------------------------------------------

def tool(name: str) -> str:
    """Path of ``cuobjdump``/``nvdisasm``: Triton's bundled copy, else the CUDA toolkit's."""
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).exists():
            return str(Path(home) / "bin" / name)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found (install triton or the CUDA toolkit)")


def _run(args: Sequence[str]) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()[:500]}")
    return out.stdout


# ---- SASS ---------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


@dataclass
class Instruction:
    address: int
    predicate: str
    opcode: str        # with modifiers, e.g. "LDG.E.128.CONSTANT"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def branch_target(self) -> Optional[int]:
        if self.base not in ("BRA", "BRX", "JMP"):
            return None
        m = re.search(r"0x([0-9a-f]+)\s*$", self.operands)
        return int(m.group(1), 16) if m else None

    def global_load_bytes(self) -> int:
        """Bytes per thread brought from global memory (0 if not a global load)."""
        if self.base not in ("LDG", "LDGSTS"):
            return 0
        mods = self.opcode.split(".")[1:]
        for width, nbytes in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1),
                              ("S8", 1)):
            if width in mods:
                return nbytes
        return 4


def parse_sass(text: str) -> Dict[str, Dict[str, List[Instruction]]]:
    """``cuobjdump -sass`` output -> {arch: {function: [instructions]}}."""
    out: Dict[str, Dict[str, List[Instruction]]] = {}
    arch, fn = "unknown", None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(".target") or s.startswith("code for sm_"):
            arch = s.split()[-1]
            out.setdefault(arch, {})
            continue
        if s.startswith("Function :"):
            fn = s.split(":", 1)[1].strip()
            out.setdefault(arch, {})[fn] = []
            continue
        m = _LINE.search(line)
        if m and fn is not None:
            body = m.group(2).strip()
            pred = ""
            if body.startswith("@"):
                pred, body = body.split(None, 1)
            parts = body.split(None, 1)
            out[arch][fn].append(Instruction(int(m.group(1), 16), pred, parts[0],
                                             parts[1] if len(parts) > 1 else ""))
    return out


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_res_usage(text: str) -> Dict[str, Dict[str, Dict[str, int]]]:
    """``cuobjdump -res-usage`` -> {arch: {function: {registers, stack, shared, local}}}."""
    out: Dict[str, Dict[str, Dict[str, int]]] = {}
    arch, fn = "unknown", None
    for line in text.splitlines():
        s = line.strip()
        m = re.search(r"arch = (sm_\d+a?)", s)
        if m:
            arch = m.group(1)
            continue
        if s.startswith("Function "):
            fn = s[len("Function "):].rstrip(":")
            continue
        m = _RES.search(s)
        if m and fn is not None:
            reg, stack, shared, local = map(int, m.groups())
            out.setdefault(arch, {})[fn] = dict(registers=reg, stack=stack, shared=shared,
                                                local=local)
    return out


# Instruction classes reported per main loop.
_CLASSES = {
    "global_load": ("LDG", "LDGSTS"), "shared_load": ("LDS", "LDSM"), "shared_store": ("STS",),
    "tensor": ("HMMA", "HGMMA", "IMMA"), "lop3": ("LOP3",), "prmt": ("PRMT",),
    "half2": ("HADD2", "HFMA2", "HMUL2"), "fp32": ("FADD", "FFMA", "FMUL", "FMNMX"),
    "convert": ("I2F", "F2F", "F2FP", "F2I", "I2FP"), "shift": ("SHF", "SHL", "SHR"),
    "integer": ("IADD3", "IMAD", "LEA", "IADD", "ISETP", "SEL", "MOV", "IABS", "LOP"),
    "sync": ("BAR", "DEPBAR", "WARPSYNC", "LDGDEPBAR", "ARRIVES", "SYNCS", "BSYNC", "BSSY"),
    "branch": ("BRA", "EXIT", "RET", "CALL"), "local": ("LDL", "STL"),
    "uniform": ("ULDC", "UMOV", "UIADD3", "ULEA", "USHF", "ULOP3", "UIMAD", "UISETP", "S2UR",
                "R2UR", "USEL", "UPRMT"),
}
FEATURES = ("LDG.128", "LDGSTS", "LDSM", "HMMA", "HGMMA")


def _classify(base: str) -> str:
    for name, bases in _CLASSES.items():
        if base in bases:
            return name
    return "other"


def loops(instrs: List[Instruction]) -> List[Tuple[int, int]]:
    """(first, last) instruction indices of each loop: a backward branch and its target."""
    index = {ins.address: i for i, ins in enumerate(instrs)}
    found = []
    for i, ins in enumerate(instrs):
        t = ins.branch_target()
        if t is not None and t <= ins.address and t in index:
            found.append((index[t], i))
    return sorted(set(found))


_MATH = ("tensor", "lop3", "prmt", "half2", "fp32", "convert", "shift")


def main_loop(instrs: List[Instruction]) -> Optional[Tuple[int, int]]:
    """The kernel's main loop: among the innermost loops that read global memory, the one
    with tensor-core instructions if any has them; then the one reading the most bytes in
    16-byte loads (the fast path: copies of a loop for unaligned shapes use narrower loads);
    then the one with the most arithmetic (dequantization and multiply-adds)."""
    ranges = loops(instrs)
    innermost = [r for r in ranges
                 if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    best, key = None, None
    for a, b in innermost:
        body = instrs[a:b + 1]
        nbytes = sum(ins.global_load_bytes() for ins in body)
        if nbytes == 0:
            continue
        classes = [_classify(i.base) for i in body]
        tensor = classes.count("tensor") > 0
        math = sum(classes.count(c) for c in _MATH)
        wide = sum(ins.global_load_bytes() for ins in body if ins.global_load_bytes() == 16)
        k = (tensor, wide, math, nbytes)
        if key is None or k > key:
            best, key = (a, b), k
    return best


def _enclosing(ranges, inner):
    outer = [r for r in ranges if r != inner and r[0] <= inner[0] and inner[1] <= r[1]]
    return min(outer, key=lambda r: r[1] - r[0]) if outer else None


@dataclass
class KernelStats:
    name: str
    arch: str
    registers: int = 0
    shared_bytes: int = 0          # static shared memory (dynamic comes at launch)
    stack_bytes: int = 0
    local_bytes: int = 0
    local_instructions: int = 0    # LDL/STL anywhere in the kernel
    features: Dict[str, bool] = field(default_factory=dict)
    instructions: int = 0
    loop_instructions: Optional[int] = None
    loop_branches: Optional[int] = None      # branches inside the loop body (besides the back edge)
    loop_load_bytes: Optional[int] = None    # global bytes loaded per thread per iteration
    instructions_per_byte: Optional[float] = None
    loop_mix: Dict[str, int] = field(default_factory=dict)
    outer_loop_instructions: Optional[int] = None
    # Per thread and main-loop iteration: packed weight bytes the iteration consumes (from the
    # kernel's tile, see packed_bytes_per_iteration) and SASS instructions per such byte.
    packed_bytes_per_iteration: Optional[float] = None
    instructions_per_packed_byte: Optional[float] = None
    meta: Dict[str, object] = field(default_factory=dict)


def analyze(name: str, arch: str, instrs: List[Instruction], res: Optional[dict]) -> KernelStats:
    st = KernelStats(name=name, arch=arch)
    if res:
        st.registers, st.stack_bytes = res["registers"], res["stack"]
        st.shared_bytes, st.local_bytes = res["shared"], res["local"]
    st.instructions = len([i for i in instrs if i.base != "NOP"])
    st.local_instructions = sum(1 for i in instrs if i.base in ("LDL", "STL"))
    ops = [i.opcode for i in instrs]
    st.features = {
        "LDG.128": any(o.startswith("LDG") and ".128" in o for o in ops),
        "LDGSTS": any(o.startswith("LDGSTS") for o in ops),
        "LDSM": any(o.startswith("LDSM") for o in ops),
        "HMMA": any(o.startswith("HMMA") for o in ops),
        "HGMMA": any(o.startswith("HGMMA") for o in ops),
    }
    ml = main_loop(instrs)
    if ml is not None:
        a, b = ml
        body = [i for i in instrs[a:b + 1] if i.base != "NOP"]
        st.loop_instructions = len(body)
        st.loop_branches = sum(1 for i in body[:-1] if i.base in ("BRA", "BRX", "JMP"))
        st.loop_load_bytes = sum(i.global_load_bytes() for i in body)
        st.instructions_per_byte = round(st.loop_instructions / st.loop_load_bytes, 3)
        mix: Dict[str, int] = {}
        for i in body:
            c = _classify(i.base)
            mix[c] = mix.get(c, 0) + 1
        st.loop_mix = dict(sorted(mix.items()))
        outer = _enclosing(loops(instrs), ml)
        if outer is not None:
            st.outer_loop_instructions = len([i for i in instrs[outer[0]:outer[1] + 1]
                                              if i.base != "NOP"])
    return st


def _short_arch(arch: str) -> str:
    return arch.replace("sm_", "").rstrip("a")


def cubin_stats(path: str, meta: Optional[Dict[str, Dict[str, object]]] = None,
                arch: Optional[str] = None) -> List[KernelStats]:
    """Every kernel of a cubin, fatbin or host binary with embedded device code; with
    ``arch`` (e.g. ``"sm_90"``) only that architecture's code (cuobjdump ``-arch``)."""
    cuobjdump = tool("cuobjdump")
    select = ["-arch", arch] if arch else []
    sass = parse_sass(_run([cuobjdump, *select, "-sass", path]))
    res = parse_res_usage(_run([cuobjdump, *select, "-res-usage", path]))
    out = []
    for arch, fns in sass.items():
        res_arch = res.get(arch) or next(
            (v for k, v in res.items() if _short_arch(k) == _short_arch(arch)), None)
        if res_arch is None:  # a cubin: one architecture, not named in -res-usage
            res_arch = res.get("unknown", {}) if len(sass) == 1 else {}
        for fn, instrs in fns.items():
            st = analyze(fn, arch, instrs, res_arch.get(fn))
            if meta and fn in meta:
                st.meta.update(meta[fn])
            out.append(st)
    return out


# ---- the qra CUDA kernels: names, budgets ---------------------------------------------------

_TEMPLATE_INT = re.compile(r"L[ib](\d+)")


def cuda_kernel_meta(mangled: str) -> Dict[str, object]:
    """Kind and template arguments of a qra CUDA kernel from its mangled name."""
    head = mangled.split("EEEv")[0]
    args = [int(v) for v in _TEMPLATE_INT.findall(head[head.find("EI") + 1:] if "EI" in head else head)]
    if "decode13decode_kernel" in mangled:
        bits, xt, nt, cpg = args[:4]
        return dict(kernel="decode", bits=bits, x=("fp16", "bf16", "fp32")[xt],
                    rows=8 * nt, group_size=32 * cpg, threads=128, min_blocks=4,
                    register_budget=128, pass_="forward")
    if "tc9tc_kernel" in mangled:
        bits, bf16, bwd = args[:3]
        return dict(kernel="tc_backward" if bwd else "tc_forward", bits=bits,
                    x="bf16" if bf16 else "fp16", threads=256, min_blocks=2, register_budget=128,
                    pass_="backward" if bwd else "forward")
    if "backward_dx_kernel" in mangled:
        return dict(kernel="backward_fp32", bits=args[0] if args else None, threads=256,
                    register_budget=255, pass_="backward")
    if "lora_xa_kernel" in mangled:
        return dict(kernel="lora_xa", threads=128, register_budget=255, pass_="forward")
    return dict(kernel="other", register_budget=255)


def packed_bytes_per_iteration(meta: Dict[str, object]) -> Optional[float]:
    """Packed weight bytes one thread's main-loop iteration consumes, from the kernel's tile:
    decode — one group of 32 columns per warp (group·bits/8 per thread); tensor-core GEMMs —
    32 k x 128 columns per 256 threads; Triton — the program's BLOCK_N x BLOCK_K tile."""
    kind, bits = meta.get("kernel"), meta.get("bits") or meta.get("BITS")
    if not bits:
        return None
    if kind == "decode":
        return meta["group_size"] * bits / 8
    if kind in ("tc_forward", "tc_backward"):
        return 32 * 128 * bits / 8 / 256
    if kind in ("triton:gemv_kernel", "triton:gemm_kernel", "triton:grad_input_kernel"):
        bn, bk = meta.get("BLOCK_N"), meta.get("BLOCK_K")
        if bn and bk:
            return bn * bk * bits / 8 / meta.get("threads", 128)
    return None


def _set_packed(st: KernelStats) -> None:
    st.packed_bytes_per_iteration = packed_bytes_per_iteration(st.meta)
    if st.packed_bytes_per_iteration and st.loop_instructions:
        st.instructions_per_packed_byte = round(st.loop_instructions / st.packed_bytes_per_iteration, 2)


def cuda_binary_stats(path: str, arch: Optional[str] = None) -> List[KernelStats]:
    stats = cubin_stats(path, arch=arch)
    for st in stats:
        st.meta.update(cuda_kernel_meta(st.name))
        _set_packed(st)
    return stats


# ---- Triton variants --------------------------------------------------------------------------

def triton_stats(capabilities: Iterable[int] = (90,), covering_only: bool = True,
                 combos=None, group_sizes=(32, 64, 128), names=None,
                 predicate=None) -> List[KernelStats]:
    """Compile the Triton variants real launches use (:mod:`qra_kernels.triton.aot`, with the
    specialization the JIT gives real arguments) and analyze their cubins. ``names`` /
    ``predicate`` select variants (by kernel name / by a function of the variant)."""
    from qra_kernels.triton import aot
    found = aot.variants(combos, group_sizes)
    chosen = aot.covering(found) if covering_only else found
    if names:
        chosen = [v for v in chosen if v.name in names]
    if predicate:
        chosen = [v for v in chosen if predicate(v)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for cap in capabilities:
            for i, v in enumerate(chosen):
                compiled = aot.compile_variant(v, cap)
                path = Path(tmp) / f"v{cap}_{i}.cubin"
                path.write_bytes(compiled.asm["cubin"])
                for st in cubin_stats(str(path)):
                    st.name = repr(v)
                    consts = {k: (val if isinstance(val, (int, float, bool)) else str(val))
                              for k, val in v.constexprs.items()}
                    st.meta.update(consts)
                    st.meta.update(kernel="triton:" + v.name, register_budget=255,
                                   threads=32 * v.options.get("num_warps", 4),
                                   shared_bytes_launch=getattr(compiled.metadata, "shared", None),
                                   x=v.signature.get("x_ptr", v.signature.get("dy_ptr", "")).lstrip("*"),
                                   pass_="backward" if v.name in ("grad_input_kernel",
                                                                  "lora_grad_kernel")
                                   else "forward")
                    _set_packed(st)
                    out.append(st)
    return out


def triton_model_variants(v) -> bool:
    """The Triton decode variants the performance model reads: bf16 x, no split."""
    return (v.name == "gemv_kernel" and v.signature.get("x_ptr") == "*bf16"
            and not v.constexprs.get("SPLIT", False))


# ---- the gate -------------------------------------------------------------------------------

def check(stats: Iterable[KernelStats]) -> List[str]:
    """Failures: local memory in any kernel, registers above the kernel's budget."""
    failures = []
    for st in stats:
        where = f"{st.meta.get('kernel', '?')} {st.name[:120]} [{st.arch}]"
        if st.local_bytes or st.stack_bytes or st.local_instructions:
            failures.append(f"{where}: local memory (stack {st.stack_bytes} B, local "
                            f"{st.local_bytes} B, {st.local_instructions} LDL/STL)")
        budget = st.meta.get("register_budget")
        if budget and st.registers > budget:
            failures.append(f"{where}: {st.registers} registers > budget {budget}")
    return failures


def table(stats: Iterable[KernelStats]) -> str:
    rows = ["| kernel | arch | regs | smem | local | loop instr | loop load B/thread | "
            "instr/packed B | features |", "|---|---|---|---|---|---|---|---|---|"]
    for st in stats:
        feats = " ".join(k for k, v in st.features.items() if v)
        meta = st.meta
        label = meta.get("kernel", "?")
        for key in ("bits", "x", "rows", "group_size", "BITS", "BLOCK_M", "GROUP"):
            if key in meta:
                label += f" {key}={meta[key]}"
        rows.append(f"| {label} | {st.arch} | {st.registers} | {st.shared_bytes} | "
                    f"{st.stack_bytes + st.local_bytes} | {st.loop_instructions} | "
                    f"{st.loop_load_bytes} | {st.instructions_per_packed_byte} | {feats} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuda-binary", action="append", default=[],
                    help="the built extension (_C*.so) or a cubin; repeatable")
    ap.add_argument("--cuda-arch", default=None,
                    help="read only this architecture of --cuda-binary, e.g. sm_90 "
                         "(default: every architecture it holds)")
    ap.add_argument("--triton", choices=("none", "covering", "all", "model"), default="none",
                    help="Triton variants to compile and read: a covering subset, all of "
                         "them, or the decode variants the model needs")
    ap.add_argument("--capabilities", default="90", help="Triton targets, e.g. 80,90")
    ap.add_argument("--model", action="store_true",
                    help="add the performance model's predictions (qra_kernels.bench.model)")
    ap.add_argument("--group-size", type=int, default=64, help="group size of the predictions")
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--check", action="store_true", help="exit 1 on a failure of the gate")
    ap.add_argument("--table", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    stats: List[KernelStats] = []
    for path in args.cuda_binary:
        stats += cuda_binary_stats(path, arch=args.cuda_arch)
    caps = [int(c) for c in args.capabilities.split(",") if c]
    if args.triton == "covering":
        stats += triton_stats(caps)
    elif args.triton == "all":
        stats += triton_stats(caps, covering_only=False)
    elif args.triton == "model":
        stats += triton_stats([90], covering_only=False, group_sizes=(args.group_size,),
                              combos=[(b, __import__("torch").bfloat16, __import__("torch").float32)
                                      for b in (2, 3, 4, 8)],
                              predicate=triton_model_variants)
    failures = check(stats)
    doc = {"tool": "python -m qra_kernels.bench.static " + " ".join(sys.argv[1:] if argv is None else argv),
           "kernels": [asdict(s) for s in stats], "failures": failures}
    if args.model:
        from . import model
        from .. import _ext
        ext = _ext.extension()
        if ext is None or not hasattr(ext, "cuda_host"):
            raise SystemExit("--model needs qra_kernels._C (the launch plans are its code)")
        doc["model"] = {"assumptions": model.ASSUMPTIONS, "devices": model.DEVICES,
                        "group_size": args.group_size,
                        **model.predict_all(doc["kernels"], ext.cuda_host.decode_plan,
                                            group_size=args.group_size)}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    if args.table:
        print(table(stats))
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    print(f"static: {len(stats)} kernels, {len(failures)} failures")
    return 1 if (failures and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
