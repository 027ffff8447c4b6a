"""The ``cpu`` backend: the C++ CPU kernel of ``csrc/cpu`` (AVX-512 BF16 / AVX-512 / AVX2
builds with a portable fallback, chosen at run time; threaded), for calls with few rows of
activations — decoding and small batches, where reading the packed weights once is what
costs. Its work grows with the rows while dense matmul's does not grow as fast, so
``supports`` declines calls above :data:`MAX_ROWS`: "auto" then goes on to the next
backend, and ``set_backend("cpu")`` makes such a call raise rather than run slowly.

Arithmetic is fp32 whatever the activation dtype (the reference's too); the result is cast
to x's dtype. The dX of the backward runs in the kernel (re-dequantizing W, nothing
dequantized is kept); the LoRA gradients are small matmuls done here with torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from . import Backend, register_backend

# Rows of x (the product of its leading dimensions) up to which the kernel is used. Its cost
# grows with M (about 0.6 ms per row at 4096x4096, 4-bit, 2 threads), while the reference
# pays ~1 s to dequantize W and then one dense matmul: measured on the 2-core development
# machine (fp32 x), M = 128 took 73 ms here against 1230 ms for the reference. Up to 256
# rows the kernel is far ahead; beyond, large (training) batches go to the other backends.
MAX_ROWS = 256


class CpuBackend(Backend):
    name = "cpu"

    def available(self):
        ext = _ext.extension()
        if ext is None:
            return False, ("the compiled extension qra_kernels._C is not installed (the "
                           "package was built without a C++ compiler or with "
                           "QRA_NO_EXTENSION=1)")
        return True, ""

    def supports(self, x):
        if x.device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, x is on {x.device}"
        if x.dtype not in _ext.DTYPE_CODES:
            return False, f"x must be float32, float16 or bfloat16, got {x.dtype}"
        rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
        if rows > MAX_ROWS:
            return False, (f"the cpu kernel handles up to {MAX_ROWS} rows of x (decode and "
                           f"small batches), got {rows}; use 'auto' or 'reference'")
        return True, ""

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _padded_rows(x2: torch.Tensor, kp: int) -> torch.Tensor:
        """x as contiguous fp32 [M, Kp], zero in the padding columns the kernel reads."""
        x2 = x2.to(torch.float32)
        if x2.shape[1] < kp:
            x2 = F.pad(x2, (0, kp - x2.shape[1]))
        return x2.contiguous()

    def forward(self, x, qweight, scales, zeros, bits, group_size, out_features, lora_A,
                lora_B, scaling, bias):
        k = x.shape[-1]
        kp = _ext.check_packed(qweight, scales, zeros, bits, group_size, out_features, k,
                               x.device)
        rank = _ext.check_lora(lora_A, lora_B, out_features, k, x.device)
        _ext.check_bias(bias, out_features, x.device)
        x2 = self._padded_rows(x.reshape(-1, k), kp)
        m = x2.shape[0]
        y = torch.empty(m, out_features, dtype=torch.float32)
        if m:
            a = lora_A.to(torch.float32).contiguous() if rank else None
            b = lora_B.to(torch.float32).contiguous() if rank else None
            bias32 = bias.to(torch.float32).contiguous() if bias is not None else None
            q = qweight.contiguous()
            s, z = scales.contiguous(), zeros.contiguous()
            _ext.extension().cpu_forward(
                _ext.data_ptr(x2), _ext.data_ptr(q), _ext.data_ptr(s), _ext.data_ptr(z),
                _ext.DTYPE_CODES[scales.dtype], bits, group_size, m, out_features, k, kp,
                _ext.data_ptr(a), _ext.data_ptr(b), rank, float(scaling),
                _ext.data_ptr(bias32), _ext.data_ptr(y), torch.get_num_threads())
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)

    def backward(self, grad_out, x, qweight, scales, zeros, bits, group_size, out_features,
                 lora_A, lora_B, scaling, need_x, need_lora):
        k = x.shape[-1]
        kp = _ext.check_packed(qweight, scales, zeros, bits, group_size, out_features, k,
                               x.device)
        rank = _ext.check_lora(lora_A, lora_B, out_features, k, x.device)
        _ext.check_grad_out(grad_out, x, out_features)
        g2 = grad_out.reshape(-1, out_features).to(torch.float32).contiguous()
        m = g2.shape[0]
        x2 = x.reshape(-1, k).to(torch.float32) if need_lora else None
        gx_lora, grad_A, grad_B = _ext.lora_backward(g2, x2, lora_A, lora_B, scaling, rank)
        grad_x = None
        if need_x:
            gx = torch.empty(m, kp, dtype=torch.float32)
            if m:
                q = qweight.contiguous()
                s, z = scales.contiguous(), zeros.contiguous()
                _ext.extension().cpu_backward_dx(
                    _ext.data_ptr(g2), _ext.data_ptr(q), _ext.data_ptr(s), _ext.data_ptr(z),
                    _ext.DTYPE_CODES[scales.dtype], bits, group_size, m, out_features, kp,
                    _ext.data_ptr(gx), torch.get_num_threads())
            gx = gx[:, :k]
            if gx_lora is not None:
                gx = gx + gx_lora
            grad_x = gx.to(x.dtype).reshape(x.shape)
        if not need_lora:
            grad_A = grad_B = None
        return grad_x, grad_A, grad_B


register_backend(CpuBackend())
