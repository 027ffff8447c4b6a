"""How a kernel of this package is launched: compiled on a GPU, interpreted on the CPU.

Triton decides between compiling and interpreting when ``@triton.jit`` *decorates* a
function (it reads ``TRITON_INTERPRET`` at that moment). That makes one process unable to
hold both forms, and makes the result depend on import order. Here every kernel is always
a compiled-form :class:`JITFunction` (so it can also be compiled ahead of time for a GPU
target, see the tests), and :func:`launcher` builds the interpreted form on demand for
tensors on the CPU: a copy of the Python function whose globals name the interpreted
copies of the helpers it calls.
"""
from __future__ import annotations

import contextlib
import types
from typing import Dict, List, Optional

import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["jit", "launcher", "interpreted", "sum_axis", "mma", "ieee_dot", "record_launches",
           "Launch"]


def jit(fn=None, **kwargs):
    """``triton.jit`` that always yields the compiled form, whatever TRITON_INTERPRET says."""
    if fn is None:
        return lambda f: JITFunction(f, **kwargs)
    return JITFunction(fn, **kwargs)


_INTERPRETED: Dict[JITFunction, object] = {}


# Kernels here call no ``@triton.jit`` function of triton.language itself (``tl.sum``,
# ``tl.zeros``, ...): those were built in one form when triton was imported and fail in the
# other. ``tl.full`` and ``tl.reduce`` are builtins and work in both; the sum below is
# ``tl.reduce`` with our own combine function.
@jit
def _add(a, b):
    return a + b


@jit
def sum_axis(x, AXIS: tl.constexpr):
    """``tl.sum(x, AXIS)`` for fp32 ``x``, usable compiled and interpreted."""
    return tl.reduce(x, AXIS, _add)


@jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """``acc + a·b`` in fp32 with ``b`` first rounded to ``a``'s dtype (fp16/bf16/fp32).

    ``IEEE`` (see :func:`ieee_dot`): 0 multiplies fp16/bf16 on the tensor cores; 2 is fp32
    activations compiled for a GPU, as three tf32 products on the tensor cores ("tf32x3":
    each operand split into a tf32 high and low part, fp32 accuracy); 1 multiplies in plain
    fp32 FMAs — the interpreter, for fp32, and for bf16, whose interpreted ``tl.dot``
    multiplies the raw uint16 bits of bf16 tiles. A product of two bf16 values is exact in
    fp32, so the emulated dot gives the tensor-core result up to summation order. (An fp32
    FMA dot compiled for a GPU has no register layout of its own: at 64 x 128 tiles it
    lives in local memory, kilobytes of it — hence tf32x3.)
    """
    b = b.to(a.dtype)
    if IEEE == 2:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    elif IEEE == 1:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def ieee_dot(t: torch.Tensor) -> int:
    """The ``IEEE`` flag of :func:`mma` for activations ``t`` (0, 1 or 2; see there)."""
    device_type = _recording_for or t.device.type
    if device_type == "cpu":
        return int(t.dtype in (torch.float32, torch.bfloat16))
    return 2 if t.dtype == torch.float32 else 0


def interpreted(kernel: JITFunction):
    """The interpreter form of ``kernel`` (cached), with its jit helpers interpreted too."""
    done = _INTERPRETED.get(kernel)
    if done is not None:
        return done
    from triton.runtime.interpreter import InterpretedFunction

    fn = kernel.fn
    namespace = dict(fn.__globals__)
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    result = InterpretedFunction(copy)
    _INTERPRETED[kernel] = result  # before recursing: helpers may refer to each other
    for name, value in list(namespace.items()):
        if value is _add:
            # The interpreter reduces with numpy only for triton's own sum combine
            # (identity check); any other combine runs element by element in Python.
            namespace[name] = tl.standard._sum_combine
        elif isinstance(value, JITFunction):
            namespace[name] = interpreted(value)
    return result


class Launch:
    """One recorded kernel launch: the kernel, its grid, arguments and launch options."""

    def __init__(self, kernel: JITFunction, grid, args, kwargs):
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs

    def __repr__(self) -> str:
        consts = {k: v for k, v in self.kwargs.items() if k not in ("num_warps", "num_stages")}
        return f"Launch({self.kernel.fn.__name__}, grid={self.grid}, {consts})"


class _Recorder:
    def __init__(self, kernel: JITFunction, sink: List[Launch]):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.kernel, grid, args, kwargs))


_recording: Optional[List[Launch]] = None
_recording_for: Optional[str] = None


@contextlib.contextmanager
def record_launches(for_device: str = "cuda"):
    """Within the block, kernel launches are recorded instead of run (outputs stay unset).

    The launch wrappers then run on CPU tensors without computing anything, choosing
    their variants as they would for ``for_device`` tensors; :mod:`.aot` uses this to
    compile, for a GPU target, exactly what the wrappers would launch there.
    """
    global _recording, _recording_for
    previous = _recording, _recording_for
    _recording, _recording_for = [], for_device
    try:
        yield _recording
    finally:
        _recording, _recording_for = previous


def launcher(kernel: JITFunction, device: torch.device):
    """The form of ``kernel`` that runs on ``device``: compiled for CUDA, interpreted on CPU."""
    if _recording is not None:
        return _Recorder(kernel, _recording)
    if device.type == "cuda":
        return kernel
    if device.type == "cpu":
        return interpreted(kernel)
    raise ValueError(f"the triton kernels run on cuda (or cpu, interpreted), not {device}")
