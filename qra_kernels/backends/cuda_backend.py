"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/`` — the decode kernel for M <= 16
(tensor cores, magic-number dequant, cp.async ring, LoRA x·Aᵀ in the same launch; fp32 x
at any M in passes of 16 rows), the tensor-core GEMM for more rows of fp16/bf16 x, and the
dX kernel of the backward — reached through ``qra_kernels._C`` with raw pointers, sizes and
the current torch CUDA stream: the extension links no torch, so one wheel serves any torch
version.

Available when the extension was compiled with nvcc and a CUDA device of sm_80 or newer is
visible to both torch and the extension's own (statically linked) CUDA runtime.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..validate import check_grad_out, check_packed_call
from . import Backend, register_backend

# The decode kernel's split-K and LoRA arrival counters: int32, zero before a call and left
# zero by it, so one zeroed buffer per (device, stream) serves every call on that stream
# (calls on one stream never overlap; another stream gets its own buffer). Grown on demand.
_COUNTERS = {}


def _counters(ext, device: torch.device, stream: int, n: int) -> torch.Tensor:
    need = ext.cuda_forward_counter_ints(n)
    key = (device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < need:
        buf = torch.zeros(max(need, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        self._available = None

    def available(self):
        if self._available is None:  # fixed for the process: answer once
            self._available = self._probe()
        return self._available

    @staticmethod
    def _probe():
        ext = _ext.extension()
        if ext is None:
            return False, ("the compiled extension qra_kernels._C is not installed (built "
                           "without a C++ compiler or with QRA_NO_EXTENSION=1)")
        if not ext.build_info().get("cuda_compiled", False):
            return False, ("qra_kernels._C was built without CUDA (no nvcc at build time, "
                           "or QRA_NO_CUDA=1)")
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        if ext.cuda_device_count() <= 0:
            return False, ("the CUDA runtime of qra_kernels._C finds no device (is the driver "
                           "older than the CUDA version the extension was built with?)")
        return True, ""

    def supports(self, x):
        if x.device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, x is on {x.device}"
        if x.dtype not in _ext.DTYPE_CODES:
            return False, f"x must be float32, float16 or bfloat16, got {x.dtype}"
        major, minor = torch.cuda.get_device_capability(x.device)
        if major < 8:
            return False, (f"the qra CUDA kernels need an sm_80 or newer GPU (mma.m16n8k16, "
                           f"cp.async); this one is sm_{major}{minor}")
        archs = [int(a) for a in _ext.extension().build_info().get("cuda_archs", [])
                 if str(a).isdigit()]
        # Each arch is built as SASS + PTX, so any arch <= the device's runs (PTX is JIT-ed).
        if archs and min(archs) > 10 * major + minor:
            return False, (f"qra_kernels._C was built for sm {archs}; this GPU is sm_"
                           f"{major}{minor} (rebuild with QRA_CUDA_ARCHS)")
        return True, ""

    def forward(self, x, qweight, scales, zeros, bits, group_size, out_features, lora_A,
                lora_B, scaling, bias):
        ext = _ext.extension()
        k = x.shape[-1]
        kp, rank = check_packed_call(x, qweight, scales, zeros, bits, group_size,
                                     out_features, lora_A, lora_B, bias)
        x2 = x.reshape(-1, k).contiguous()
        m = x2.shape[0]
        y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
        if m:
            a = lora_A.contiguous() if rank else None
            # One dtype code serves both factors.
            b = lora_B.to(lora_A.dtype).contiguous() if rank else None
            bias32 = bias.to(torch.float32).contiguous() if bias is not None else None
            q, s, z = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
            x_code = _ext.DTYPE_CODES[x.dtype]
            workspace = torch.empty(
                ext.cuda_forward_workspace_floats(m, out_features, kp, bits, group_size, rank,
                                                  x_code, x.device.index),
                dtype=torch.float32, device=x.device)
            stream = torch.cuda.current_stream(x.device).cuda_stream
            counters = _counters(ext, x.device, stream, out_features)
            ext.cuda_forward(
                _ext.data_ptr(x2), _ext.DTYPE_CODES[x.dtype], _ext.data_ptr(q),
                _ext.data_ptr(s), _ext.data_ptr(z), _ext.DTYPE_CODES[scales.dtype], bits,
                group_size, m, out_features, k, kp, _ext.data_ptr(a), _ext.data_ptr(b),
                _ext.DTYPE_CODES[a.dtype] if rank else 0, rank, float(scaling),
                _ext.data_ptr(bias32), _ext.data_ptr(y), _ext.data_ptr(workspace),
                _ext.data_ptr(counters), stream, x.device.index)
        return y.reshape(*x.shape[:-1], out_features)

    def backward(self, grad_out, x, qweight, scales, zeros, bits, group_size, out_features,
                 lora_A, lora_B, scaling, need_x, need_lora):
        ext = _ext.extension()
        k = x.shape[-1]
        kp, rank = check_packed_call(x, qweight, scales, zeros, bits, group_size,
                                     out_features, lora_A, lora_B, None)
        check_grad_out(grad_out, x, out_features)
        g2 = grad_out.reshape(-1, out_features).contiguous()
        m = g2.shape[0]
        g32 = g2.to(torch.float32)
        x2 = x.reshape(-1, k).to(torch.float32) if need_lora else None
        gx_lora, grad_A, grad_B = _ext.lora_backward(g32, x2, lora_A, lora_B, scaling, rank)
        grad_x = None
        if need_x:
            gx = torch.empty(m, kp, dtype=torch.float32, device=x.device)
            if m:
                q, s, z = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
                stream = torch.cuda.current_stream(x.device).cuda_stream
                ext.cuda_backward_dx(
                    _ext.data_ptr(g2), _ext.DTYPE_CODES[g2.dtype], _ext.data_ptr(q),
                    _ext.data_ptr(s), _ext.data_ptr(z), _ext.DTYPE_CODES[scales.dtype], bits,
                    group_size, m, out_features, kp, _ext.data_ptr(gx), stream,
                    x.device.index)
            gx = gx[:, :k]
            if gx_lora is not None:
                gx = gx + gx_lora
            grad_x = gx.to(x.dtype).reshape(x.shape)
        if not need_lora:
            grad_A = grad_B = None
        return grad_x, grad_A, grad_B


register_backend(CudaBackend())
