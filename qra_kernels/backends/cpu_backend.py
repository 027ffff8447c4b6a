"""The ``cpu`` backend: the C++ CPU kernel of ``csrc/cpu`` (AVX-512 BF16 / AVX-512 VNNI /
AVX-512 / AVX-VNNI / AVX2 builds with a portable fallback, chosen at run time; threaded on
torch's OpenMP pool), for any number of rows of activations.

Three paths compute the op (``csrc/cpu/linear_cpu.h``):

* ``gemv`` — the float GEMV: reads each packed word once per block of rows, fp32
  arithmetic (the reference's numbers up to summation order). Decode, small batches.
* ``int8`` — x quantized per row and group to int8, integer dot products of the codes
  (VNNI ``vpdpbusd``, AVX2 ``vpmaddubsw``): the least work per code, so 2/3-bit beat 4-bit.
  Its numbers differ from the reference by the int8 rounding of x (bounded in
  ``csrc/cpu/int8.h``), more than floating-point tolerance, so ``auto`` takes it only when
  allowed (:func:`set_path` ``int8=True`` or ``QRA_CPU_INT8=1``). Forward only.
* ``gemm`` — panels of W dequantized to fp32 inside the kernel and multiplied by a blocked
  GEMM, LoRA as an extra K-slab; exact like ``gemv``. Prefill, training, backward dX.
* ``torch`` — panels of W (``_PANEL`` columns, or rows for dX; fewer for wide layers)
  dequantized by the kernel into x's dtype (bf16, else fp32) and multiplied by torch's own
  GEMM (oneDNN), the LoRA up-projection and bias as the ``addmm`` input of each panel. For
  bf16 x this is where the CPU's bf16 dot product pays (``vdpbf16ps``: 2x the fp32 FMA
  rate); the price is W rounded to bf16 before the product (as bitsandbytes and torch's int4
  kernel do), an error of the order of the bf16 rounding of y itself (bound tested in
  tests/.../test_cpu_backend.py). With fp32 x it is exact up to summation order. Only a panel
  of W is ever dequantized.

``auto`` (the default) picks, per call, the fastest allowed path for (instruction set,
activation dtype, bit-width, rows) from the measured table
``qra_kernels/configs/cpu_dispatch.json`` (written by ``benches/cpu_dispatch_tune.py``;
``QRA_CPU_DISPATCH`` names another file). ``QRA_CPU_PATH`` or :func:`set_path` forces one.

The dX of the backward runs in the kernel (re-dequantizing W: nothing dequantized is kept),
with the adapter's term fused; grad_A / grad_B are small matmuls done here with torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from .. import _ext
from ..validate import check_grad_out, check_packed_call
from . import Backend, register_backend

PATHS = ("auto", "gemv", "int8", "gemm", "torch")
# Columns (forward) or reduction rows (dX) per dequantized panel of the torch path (a
# multiple of every group size). Measured at M = 256 on 4096 x 4096, bf16, Zen 4: panels of
# 128 / 256 / 1024 / 2048 took 30.9 / 29.8 / 26.1 / 27.3 ms forward (dense bf16 20.8 ms);
# fewer, larger panels pay the dequantization's thread start-up and torch's per-call set-up
# less often. K x 1024 bf16 is 8 MiB at K = 4096. Re-measured with the forward's rows
# layout (2026-12-03): 256 / 512 / 1024 / 2048 within the VM's noise of each other
# (24.5-26.7 ms, dense 21.7), so 1024 stays.
_PANEL = 1024
# The most values one panel holds: K x _PANEL at K = 4096 (8 MiB of bf16). A wider layer gets
# fewer columns (forward) or reduction rows (dX) a panel, so the kept buffer below stays this
# size: without the cap a 49k-row lm_head's dX panel of _PANEL x N would keep 100 MiB.
_PANEL_VALUES = 4096 * _PANEL


def _panel_columns(kp: int) -> int:
    """Output columns a forward panel of reduction length ``kp`` takes."""
    return max(16, min(_PANEL, _PANEL_VALUES // kp) // 16 * 16)


def _panel_rows(n_out: int, group_size: int) -> int:
    """Reduction rows a dX panel of ``n_out`` columns takes: a multiple of the group size,
    where the kernel's dequantization starts and ends."""
    return max(group_size, min(_PANEL, _PANEL_VALUES // n_out) // group_size * group_size)


# The panel buffer of the torch path, kept per thread and dtype between calls: a fresh 8 MiB
# torch.empty is fresh pages from the OS each call, and touching them cost ~2 ms of a 26 ms
# call (4096², M = 256, Zen 4). Held per thread and dtype: the largest panel a call needed,
# at most _PANEL_VALUES values (more only where one group's rows or 16 columns exceed it).
_scratch_tls = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    bufs = _scratch_tls.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf


DISPATCH_PATH = Path(__file__).resolve().parent.parent / "configs" / "cpu_dispatch.json"

# Used where the table has no entry for this machine's build (it lists every build the
# development machine runs; see the file's "machine"): the GEMV up to this many rows, then
# the GEMM; the int8 path, when allowed, up to _FALLBACK_INT8_ROWS.
_FALLBACK_GEMV_ROWS = 4
_FALLBACK_INT8_ROWS = 8

_state = threading.local()


def _env_path() -> str:
    name = os.environ.get("QRA_CPU_PATH", "auto") or "auto"
    if name not in PATHS:
        raise ValueError(f"QRA_CPU_PATH must be one of {PATHS}, got {name!r}")
    return name


def _env_int8() -> bool:
    value = os.environ.get("QRA_CPU_INT8", "0") or "0"
    if value not in ("0", "1"):
        raise ValueError(f"QRA_CPU_INT8 must be 0 or 1, got {value!r}")
    return value == "1"


def set_path(name: str, int8: Optional[bool] = None) -> None:
    """Force the CPU kernel's path (``"gemv"``, ``"int8"``, ``"gemm"``) or let the table
    choose (``"auto"``); ``int8`` says whether ``auto`` may take the int8 path (None: keep
    the current setting). Per thread, like torch's grad mode; ``QRA_CPU_PATH`` and
    ``QRA_CPU_INT8`` give the defaults."""
    if not isinstance(name, str) or name not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {name!r}")
    if int8 is not None and not isinstance(int8, bool):
        raise TypeError(f"int8 must be a bool or None, got {type(int8).__name__}")
    _state.path = name
    if int8 is not None:
        _state.int8 = int8


def get_path() -> str:
    return getattr(_state, "path", None) or _env_path()


def int8_allowed() -> bool:
    value = getattr(_state, "int8", None)
    return _env_int8() if value is None else value


@contextlib.contextmanager
def path(name: str, int8: Optional[bool] = None):
    """``with path("gemm"): ...`` — :func:`set_path` for a block, restored after."""
    saved = (getattr(_state, "path", None), getattr(_state, "int8", None))
    set_path(name, int8)
    try:
        yield
    finally:
        _state.path, _state.int8 = saved


# --- the measured table ---------------------------------------------------------------------
_table_cache: dict = {}


def dispatch_table() -> dict:
    """The measured thresholds (``QRA_CPU_DISPATCH`` or the packaged file), parsed once."""
    source = os.environ.get("QRA_CPU_DISPATCH") or str(DISPATCH_PATH)
    if source not in _table_cache:
        try:
            with open(source) as f:
                table = json.load(f)
        except FileNotFoundError:
            if source != str(DISPATCH_PATH):
                raise ValueError(f"QRA_CPU_DISPATCH names a missing file: {source}") from None
            table = {}
        except json.JSONDecodeError as e:
            raise ValueError(f"the CPU dispatch table {source} is not valid JSON: {e}") from None
        _table_cache[source] = _check_table(table, source)
    return _table_cache[source]


def _check_table(table: dict, source: str) -> dict:
    rules = table.get("rules", {})
    for isa, by_dtype in rules.items():
        for dtype, by_kind in by_dtype.items():
            for kind, by_bits in by_kind.items():
                for bits, steps in by_bits.items():
                    where = f"{source}: rules.{isa}.{dtype}.{kind}.{bits}"
                    if not steps or steps[-1][0] is not None:
                        raise ValueError(f"{where} must end with [null, path]")
                    for m_max, p in steps:
                        allowed = ("gemv", "gemm", "torch") + (("int8",) if kind == "int8" else ())
                        if p not in allowed or not (m_max is None or isinstance(m_max, int)):
                            raise ValueError(f"{where}: bad step {[m_max, p]}")
    return table


def _rule(isa: str, dtype: torch.dtype, kind: str, bits: int):
    rules = dispatch_table().get("rules", {}).get(isa, {})
    by_kind = rules.get("bfloat16" if dtype == torch.bfloat16 else "float32", {})
    return by_kind.get(kind, {}).get(str(bits))


def choose_path(m: int, bits: int, dtype: torch.dtype, backward: bool = False) -> str:
    """The path ``auto`` takes for ``m`` rows on this machine's build."""
    forced = get_path()
    if forced != "auto" and not (backward and forced == "int8"):
        return forced
    isa = _ext.extension().cpu_isa()
    kind = "backward" if backward else ("int8" if int8_allowed() else "exact")
    steps = _rule(isa, dtype, kind, bits)
    if steps is None:
        limit = _FALLBACK_INT8_ROWS if kind == "int8" else _FALLBACK_GEMV_ROWS
        small = "int8" if kind == "int8" else "gemv"
        return small if m <= limit else "gemm"
    for m_max, p in steps:
        if m_max is None or m <= m_max:
            return p
    raise AssertionError("unreachable: a rule ends with [null, path]")


def _torch_forward(x2, qweight, scales, zeros, bits, group_size, n_out, k, kp, lora_A,
                   lora_B, rank, scaling, bias):
    """The ``torch`` path's forward: ``y = x2 @ dequant(W).T (+ LoRA, bias)`` in panels of
    :func:`_panel_columns` output columns."""
    ext = _ext.extension()
    dt = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32
    xx = x2.to(dt).contiguous()
    m = xx.shape[0]
    y = torch.empty(m, n_out, dtype=dt)
    xa = (xx.float() @ lora_A.float().t()).mul_(scaling).to(dt) if rank else None
    cols = _panel_columns(kp)
    buf = _scratch(kp * min(cols, n_out), dt)
    q, s, z = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    threads = torch.get_num_threads()
    for n0 in range(0, n_out, cols):
        n1 = min(n0 + cols, n_out)
        w = n1 - n0
        # rows n0..n1 of dequant(W), [w, kp]: the layout of F.linear's weight, which oneDNN
        # multiplies faster than the transposed panel (benches/README.md)
        ext.cpu_dequantize_rows(_ext.data_ptr(q), _ext.data_ptr(s), _ext.data_ptr(z),
                                _ext.DTYPE_CODES[scales.dtype], bits, group_size, n_out, kp,
                                0, kp, n0, n1, _ext.data_ptr(buf), _ext.DTYPE_CODES[dt], kp,
                                threads)
        panel = buf[:kp * w].view(w, kp)[:, :k].t()
        base = None
        if xa is not None:
            base = xa @ lora_B[n0:n1].to(dt).t()
        if bias is not None:
            b = bias[n0:n1].to(dt)
            base = b if base is None else base.add_(b)
        # straight into y's columns (its row stride is the GEMM's ldc): no temporary
        if base is None:
            torch.mm(xx, panel, out=y[:, n0:n1])
        else:
            torch.addmm(base, xx, panel, out=y[:, n0:n1])
    return y


def _torch_backward_dx(g2, qweight, scales, zeros, bits, group_size, n_out, k, kp):
    """The ``torch`` path's dX without LoRA: ``grad_x = g2 @ dequant(W)`` (fp32 [M, k]) in
    panels of :func:`_panel_rows` reduction rows of W."""
    ext = _ext.extension()
    dt = torch.bfloat16 if g2.dtype == torch.bfloat16 else torch.float32
    gg = g2.to(dt).contiguous()
    gx = torch.empty(gg.shape[0], k, dtype=torch.float32)
    rows = _panel_rows(n_out, group_size)
    buf = _scratch(min(rows, kp) * n_out, dt)
    q, s, z = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    threads = torch.get_num_threads()
    for k0 in range(0, k, rows):
        k1 = min(k0 + rows, kp)
        ext.cpu_dequantize_panel(_ext.data_ptr(q), _ext.data_ptr(s), _ext.data_ptr(z),
                                 _ext.DTYPE_CODES[scales.dtype], bits, group_size, n_out, kp,
                                 k0, k1, 0, n_out, _ext.data_ptr(buf), _ext.DTYPE_CODES[dt],
                                 n_out, threads)
        kk = min(k1, k) - k0
        panel = buf[:(k1 - k0) * n_out].view(k1 - k0, n_out)[:kk]
        gx[:, k0:k0 + kk] = torch.mm(gg, panel.t())
    return gx


def _path_code(name: str) -> int:
    ext = _ext.extension()
    return {"gemv": ext.cpu_path_gemv, "int8": ext.cpu_path_int8, "gemm": ext.cpu_path_gemm}[name]


class CpuBackend(Backend):
    name = "cpu"

    def available(self):
        ext = _ext.extension()
        if ext is None:
            return False, ("the compiled extension qra_kernels._C is not installed (the "
                           "package was built without a C++ compiler or with "
                           "QRA_NO_EXTENSION=1)")
        if not hasattr(ext, "cpu_isa"):
            return False, "qra_kernels._C is from an older build: rebuild the package"
        return True, ""

    def supports(self, x):
        if x.device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, x is on {x.device}"
        if x.dtype not in _ext.DTYPE_CODES:
            return False, f"x must be float32, float16 or bfloat16, got {x.dtype}"
        return True, ""

    def forward(self, x, qweight, scales, zeros, bits, group_size, out_features, lora_A,
                lora_B, scaling, bias):
        k = x.shape[-1]
        kp, rank = check_packed_call(x, qweight, scales, zeros, bits, group_size,
                                     out_features, lora_A, lora_B, bias)
        x2 = _ext.rows_view(x, k)
        m = x2.shape[0]
        y = torch.empty(m, out_features, dtype=x.dtype)
        chosen = choose_path(m, bits, x.dtype) if m else "gemm"
        if m and chosen == "torch":
            y = _torch_forward(x2, qweight, scales, zeros, bits, group_size, out_features, k,
                               kp, lora_A, lora_B, rank, scaling, bias).to(x.dtype)
        elif m:
            a = lora_A.to(torch.float32).contiguous() if rank else None
            b = lora_B.to(torch.float32).contiguous() if rank else None
            bias32 = bias.to(torch.float32).contiguous() if bias is not None else None
            q = qweight.contiguous()
            s, z = scales.contiguous(), zeros.contiguous()
            code = _ext.DTYPE_CODES[x.dtype]
            _ext.extension().cpu_forward(
                _ext.data_ptr(x2, strided=True), code, _ext.row_stride(x2), _ext.data_ptr(q),
                _ext.data_ptr(s), _ext.data_ptr(z), _ext.DTYPE_CODES[scales.dtype], bits,
                group_size, m, out_features, k, kp, _ext.data_ptr(a), _ext.data_ptr(b), rank,
                float(scaling), _ext.data_ptr(bias32), _ext.data_ptr(y), code,
                _path_code(chosen), torch.get_num_threads())
        return y.reshape(*x.shape[:-1], out_features)

    def backward(self, grad_out, x, qweight, scales, zeros, bits, group_size, out_features,
                 lora_A, lora_B, scaling, need_x, need_lora):
        k = x.shape[-1]
        kp, rank = check_packed_call(x, qweight, scales, zeros, bits, group_size,
                                     out_features, lora_A, lora_B, None)
        check_grad_out(grad_out, x, out_features)
        g2 = grad_out.reshape(-1, out_features).contiguous()
        m = g2.shape[0]
        grad_x = grad_A = grad_B = None
        with_lora = need_lora and lora_A is not None
        gb = torch.empty(m, rank, dtype=torch.float32) if with_lora and rank else None
        if need_x:
            chosen = choose_path(m, bits, grad_out.dtype, backward=True) if m else "gemm"
            if m and chosen == "torch":
                gx = _torch_backward_dx(g2, qweight, scales, zeros, bits, group_size,
                                        out_features, k, kp)
                if rank:  # the adapter's term, as the kernel adds it (gb kept for grad_A)
                    gbb = g2.to(torch.float32) @ lora_B.to(torch.float32)
                    gx.add_(gbb @ lora_A.to(torch.float32), alpha=float(scaling))
                    if gb is not None:
                        gb = gbb
            elif m:
                gx = torch.empty(m, k, dtype=torch.float32)
                a = lora_A.to(torch.float32).contiguous() if rank else None
                b = lora_B.to(torch.float32).contiguous() if rank else None
                q = qweight.contiguous()
                s, z = scales.contiguous(), zeros.contiguous()
                _ext.extension().cpu_backward_dx(
                    _ext.data_ptr(g2), _ext.DTYPE_CODES[g2.dtype], _ext.data_ptr(q),
                    _ext.data_ptr(s), _ext.data_ptr(z), _ext.DTYPE_CODES[scales.dtype], bits,
                    group_size, m, out_features, k, kp, _ext.data_ptr(a), _ext.data_ptr(b),
                    rank, float(scaling), _ext.data_ptr(gb), _ext.data_ptr(gx),
                    _path_code(chosen), torch.get_num_threads())
            else:
                gx = torch.empty(m, k, dtype=torch.float32)
                if gb is not None:
                    gb.zero_()
            grad_x = gx.to(x.dtype).reshape(x.shape)
        elif gb is not None:
            gb = g2.to(torch.float32) @ lora_B.to(torch.float32)
        if with_lora:
            if rank == 0:
                grad_A, grad_B = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
            else:
                grad_A, grad_B = _ext.lora_grads_from_gb(g2, x.reshape(-1, k), gb, lora_A,
                                                         lora_B, scaling)
        return grad_x, grad_A, grad_B


register_backend(CpuBackend())
