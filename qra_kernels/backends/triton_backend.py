"""The ``triton`` backend: the fused kernels of :mod:`qra_kernels.triton`.

Runs on CUDA tensors (compiled kernels). On CPU tensors the same kernels run in Triton's
interpreter, which is only useful for testing (it is orders of magnitude slower than the
reference), so the backend offers the CPU only when ``TRITON_INTERPRET=1`` is set: "auto"
never picks the interpreter on an ordinary CPU run, and CI (which sets the variable)
exercises the real kernel code without a GPU.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import Backend, register_backend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreter_requested() -> bool:
    # Read at call time, not import time: tests switch it per test.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(Backend):
    name = "triton"

    def available(self):
        if importlib.util.find_spec("triton") is None:
            return False, "the triton package is not installed"
        try:
            import qra_kernels.triton  # noqa: F401
        except ImportError as e:  # e.g. a triton too old for the kernels
            return False, f"the triton kernels failed to import: {e}"
        if torch.cuda.is_available() or _interpreter_requested():
            return True, ""
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"

    def supports(self, x):
        if x.dtype not in _DTYPES:
            return False, f"x must be float32, float16 or bfloat16, got {x.dtype}"
        if x.device.type == "cuda":
            return True, ""
        if x.device.type == "cpu":
            if _interpreter_requested():
                return True, ""
            return False, ("x is on the CPU: the triton kernels run there only under "
                           "TRITON_INTERPRET=1 (for testing)")
        return False, f"the triton kernels run on CUDA tensors, x is on {x.device}"

    def forward(self, x, qweight, scales, zeros, bits, group_size, out_features, lora_A,
                lora_B, scaling, bias):
        from .. import triton as kernels
        return kernels.forward(x, qweight, scales, zeros, bits, group_size, out_features,
                               lora_A, lora_B, scaling, bias)

    def backward(self, grad_out, x, qweight, scales, zeros, bits, group_size, out_features,
                 lora_A, lora_B, scaling, need_x, need_lora):
        from .. import triton as kernels
        return kernels.backward(grad_out, x, qweight, scales, zeros, bits, group_size,
                                out_features, lora_A, lora_B, scaling, need_x, need_lora)


register_backend(TritonBackend())
