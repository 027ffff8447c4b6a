"""Ahead-of-time compilation of the kernels for a GPU target — no GPU needed.

:func:`variants` runs the launch wrappers (forward and backward) on small CPU tensors with
launches recorded instead of run (:func:`.runtime.record_launches`), so what it returns is
exactly what a GPU call would launch: the same constexprs, launch options (from the JSON
configs) and argument types. :func:`compile_variant` compiles one of them for a
``GPUTarget`` down to a cubin with Triton's bundled ``ptxas``. The tests do this for
sm_80 and sm_90 so that a kernel that would fail to build on hardware fails CI on a CPU.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .runtime import Launch, record_launches

__all__ = ["Variant", "variants", "covering", "compile_variant", "compile_all"]

_OPTIONS = ("num_warps", "num_stages")


class Variant:
    """One compiled form of a kernel: its argument types, constexprs and launch options.

    The specialization is the one Triton's JIT derives from the argument *values* of the
    launch (``native_specialize_impl``, what ``JITFunction.run`` calls): pointers and ints
    divisible by 16 get ``tt.divisibility = 16`` (which is what lets a 16-byte vector load
    be emitted), an int equal to 1 becomes a constant, and parameters in
    ``do_not_specialize`` get neither. So the compiled variant is the one a GPU call with
    the same shapes would run — not a variant with hints the runtime never gives.
    """

    def __init__(self, launch: Launch):
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl

        kernel = launch.kernel
        self.kernel = kernel
        self.signature: Dict[str, str] = {}
        self.constexprs: Dict[str, object] = {}
        self.attrs: Dict[Tuple[int, ...], list] = {}
        self.specialized: Dict[str, object] = {}  # runtime args the JIT made constants
        values = dict(zip([p.name for p in kernel.params], launch.args))
        values.update({k: v for k, v in launch.kwargs.items() if k not in _OPTIONS})
        for i, param in enumerate(kernel.params):
            value = values[param.name]
            if param.is_constexpr:
                self.signature[param.name] = "constexpr"
                self.constexprs[param.name] = value
                continue
            kind, spec = native_specialize_impl(
                BaseBackend, value, param.is_const, not param.do_not_specialize,
                not param.do_not_specialize_on_alignment)
            if kind == "constexpr":
                self.signature[param.name] = "constexpr"
                self.constexprs[param.name] = spec
                self.specialized[param.name] = spec
            else:
                self.signature[param.name] = kind
                if spec == "D":
                    self.attrs[(i,)] = [["tt.divisibility", 16]]
        self.options = {k: launch.kwargs[k] for k in _OPTIONS if k in launch.kwargs}

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self):
        return (self.name, tuple(self.signature.items()),
                tuple((k, str(v)) for k, v in self.constexprs.items()),
                tuple(sorted(self.attrs)), tuple(self.options.items()))

    def __repr__(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        types = ",".join(v for v in self.signature.values() if v.startswith("*"))
        names = [p.name for p in self.kernel.params]
        div16 = ",".join(names[i[0]] for i in sorted(self.attrs))
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}[{types}][{flags}][div16:{div16}][{opts}]"


def _packed(bits: int, group_size: int, n: int, k: int, scale_dtype: torch.dtype):
    kp = -(-k // group_size) * group_size
    qweight = torch.zeros(kp * bits // 32, n, dtype=torch.int32)
    scales = torch.ones(kp // group_size, n, dtype=scale_dtype)
    return qweight, scales, scales.clone()


def _record(bits: int, x_dtype: torch.dtype, lora_dtype: torch.dtype,
            scale_dtype: torch.dtype, group_size: int, with_rank0: bool,
            config: Optional[dict]) -> List[Launch]:
    from . import backward, forward

    n = k = 256  # several K blocks at every group size, so split-K can split
    qweight, scales, zeros = _packed(bits, group_size, n, k, scale_dtype)
    rank = 16
    lora_A = torch.zeros(rank, k, dtype=lora_dtype)
    lora_B = torch.zeros(n, rank, dtype=lora_dtype)
    bias = torch.zeros(n, dtype=x_dtype)
    config = dict(config or {})
    packed = (qweight, scales, zeros, bits, group_size, n)
    with record_launches() as launches:
        # Decode: one row and 2-16 rows, finished in one pass and split over K.
        for m in (1, 5):
            x = torch.zeros(m, k, dtype=x_dtype)
            for split_k in (1, 2):
                forward(x, *packed, lora_A, lora_B, 0.5, bias,
                        config=dict(config, split_k=split_k))
        # GEMM forward and the backward.
        x = torch.zeros(64, k, dtype=x_dtype)
        dy = torch.zeros(64, n, dtype=x_dtype)
        forward(x, *packed, lora_A, lora_B, 0.5, bias, config=config)
        backward(dy, x, *packed, lora_A, lora_B, 0.5, True, True, config=config)
        if with_rank0:
            for m in (1, 5, 64):
                forward(torch.zeros(m, k, dtype=x_dtype), *packed, config=dict(config, split_k=1))
            backward(dy, x, *packed, None, None, 1.0, True, False, config=config)
    return launches


def variants(combos: Iterable[Tuple[int, torch.dtype, torch.dtype]] = None,
             group_sizes: Iterable[int] = (32, 64, 128),
             scale_dtype: Optional[torch.dtype] = None,
             config: Optional[dict] = None) -> List[Variant]:
    """The distinct kernel variants launched for each ``(bits, x_dtype, lora_dtype)`` and
    group size.

    ``combos`` defaults to every bit-width × every activation dtype with fp32 adapters;
    the rank-0 (no LoRA, no bias) variants are included for the first combo of each
    bit-width. Scales are ``scale_dtype``, by default bf16 beside bf16 activations and
    fp16 otherwise. ``config`` is a per-regime override as for :func:`..forward`.
    """
    if combos is None:
        combos = [(b, d, torch.float32) for b in (2, 3, 4, 8)
                  for d in (torch.bfloat16, torch.float16, torch.float32)]
    seen, out, bits_seen = set(), [], set()
    for bits, x_dtype, lora_dtype in combos:
        for group_size in group_sizes:
            scales = scale_dtype or (torch.bfloat16 if x_dtype == torch.bfloat16
                                     else torch.float16)
            for launch in _record(bits, x_dtype, lora_dtype, scales, group_size,
                                  bits not in bits_seen, config):
                v = Variant(launch)
                if v.key() not in seen:
                    seen.add(v.key())
                    out.append(v)
        bits_seen.add(bits)
    return out


def _features(v: Variant):
    pointers = [t for t in v.signature.values() if t.startswith("*")]
    yield v.name, "activation", pointers[0]
    if v.name in ("gemv_kernel", "gemm_kernel", "grad_input_kernel"):
        yield v.name, "scales", pointers[2]
    for name, value in v.constexprs.items():
        yield v.name, name, str(value)
    # Pairs whose code paths interact: the low-precision dot with each tile height, and
    # the LoRA epilogue with each dot.
    if "IEEE_DOT" in v.constexprs:
        for other in ("HAS_LORA", "BLOCK_M"):
            if other in v.constexprs:
                yield v.name, other + " x dot", (v.constexprs[other], v.constexprs["IEEE_DOT"])


def covering(all_variants: List[Variant]) -> List[Variant]:
    """A small subset in which every kernel meets every value of each of its constexprs
    (bit-width, flags, tile sizes) and every activation dtype at least once.

    Greedy set cover: the full product of every variant is ~100 compilations per target
    (minutes); the code a variant generates is the sum of these independent choices.
    """
    todo = {f for v in all_variants for f in _features(v)}
    chosen = []
    while todo:
        best = max(all_variants, key=lambda v: len(todo.intersection(_features(v))))
        chosen.append(best)
        todo.difference_update(_features(best))
    return chosen


def compile_variant(variant: Variant, capability: int, warp_size: int = 32):
    """Compile for ``GPUTarget("cuda", capability, warp_size)``; returns the CompiledKernel
    (``.asm`` holds ttir, ttgir, llir, ptx and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(variant.kernel, variant.signature, constexprs=variant.constexprs,
                       attrs=variant.attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, warp_size),
                          options=dict(variant.options))


def _summary(variant: Variant, capability: int) -> dict:
    """Compile one variant and describe the result (or the error) in plain data."""
    out = {"variant": repr(variant), "kernel": variant.name, "capability": capability,
           "uses_tensor_cores_expected": (variant.name in ("gemm_kernel", "grad_input_kernel")
                                          and not variant.constexprs.get("IEEE_DOT", True))}
    try:
        compiled = compile_variant(variant, capability)
    except Exception as e:  # reported, not raised: one report lists every failure
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        return out
    ptx = compiled.asm.get("ptx", "")
    out.update(
        cubin_bytes=len(compiled.asm.get("cubin", b"")),
        ptx_target=next((line.split()[1] for line in ptx.splitlines()
                         if line.startswith(".target")), None),
        ptx_entry=f".entry {variant.name}" in ptx,
        mma="mma.sync" in ptx or "wgmma" in ptx,
        shared_bytes=getattr(compiled.metadata, "shared", None),
    )
    return out


def _selection(combos, group_sizes, subset):
    found = variants(combos, group_sizes)
    return covering(found) if subset else found


def _worker(args):
    combos, group_sizes, subset, index, capability = args
    return _summary(_selection(combos, group_sizes, subset)[index], capability)


def compile_all(combos=None, capabilities=(80, 90), group_sizes=(32, 64, 128),
                covering_only: bool = False, workers: int = 1) -> List[dict]:
    """Compile every variant of ``combos`` (or only a :func:`covering` subset of them) for
    each capability; one summary dict each.

    ``workers`` > 1 compiles in that many spawned processes (compilation is CPU-bound and
    holds the GIL).
    """
    if combos is not None:
        combos = [tuple(c) for c in combos]
    group_sizes = tuple(group_sizes)
    count = len(_selection(combos, group_sizes, covering_only))
    jobs = [(combos, group_sizes, covering_only, i, cap) for cap in capabilities
            for i in range(count)]
    if workers <= 1:
        return [_worker(job) for job in jobs]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_worker, jobs))


if __name__ == "__main__":  # python -m qra_kernels.triton.aot [--covering] [capability ...]
    import json
    import os
    import sys

    caps = [int(c) for c in sys.argv[1:] if c.isdigit()] or [80, 90]
    results = compile_all(capabilities=caps, covering_only="--covering" in sys.argv,
                          workers=os.cpu_count() or 1)
    failed = [r for r in results if "error" in r]
    print(json.dumps(results if failed else {"compiled": len(results)}, indent=1))
    sys.exit(1 if failed else 0)
