"""The reference backend: plain torch, fp32 arithmetic. It is the spec every kernel is
tested against, and runs on any device torch runs on.

It dequantizes W into a temporary for each call (forward and backward alike) and frees
it; nothing dequantized is kept between calls. ``grouped_forward``/``grouped_backward`` are
the spec of the routed-experts op (``qra::grouped_linear``): the same arithmetic, one
expert's matrix for each run of rows.
"""
from __future__ import annotations

import torch

from ..format import dequantize, expert_code_rows
from . import Backend, register_backend


def _lora_input(x2, lora_A):
    return x2 @ lora_A.to(torch.float32).t()  # [M, r]


class ReferenceBackend(Backend):
    name = "reference"

    def available(self):
        return True, ""

    def forward(self, x, qweight, scales, zeros, bits, group_size, out_features, lora_A,
                lora_B, scaling, bias):
        k = x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.float32)
        w = dequantize(qweight, scales, zeros, bits, group_size, (out_features, k))
        y = x2 @ w.t()
        del w
        if lora_A is not None and lora_A.shape[0] > 0:
            y = y + scaling * (_lora_input(x2, lora_A) @ lora_B.to(torch.float32).t())
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)

    def backward(self, grad_out, x, qweight, scales, zeros, bits, group_size, out_features,
                 lora_A, lora_B, scaling, need_x, need_lora):
        k = x.shape[-1]
        g2 = grad_out.reshape(-1, out_features).to(torch.float32)
        has_lora = lora_A is not None and lora_A.shape[0] > 0
        grad_x = grad_A = grad_B = None
        if need_x:
            w = dequantize(qweight, scales, zeros, bits, group_size, (out_features, k))
            gx = g2 @ w
            del w
            if has_lora:
                gx = gx + scaling * ((g2 @ lora_B.to(torch.float32)) @ lora_A.to(torch.float32))
            grad_x = gx.to(x.dtype).reshape(x.shape)
        if need_lora and lora_A is not None:
            if has_lora:
                x2 = x.reshape(-1, k).to(torch.float32)
                gb = g2 @ lora_B.to(torch.float32)  # [M, r]
                grad_A = (scaling * gb.t() @ x2).to(lora_A.dtype)
                grad_B = (scaling * g2.t() @ _lora_input(x2, lora_A)).to(lora_B.dtype)
            else:
                grad_A, grad_B = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
        return grad_x, grad_A, grad_B

    # --- routed experts (qra::grouped_linear) -------------------------------------------
    @staticmethod
    def _experts(tokens_per_expert, qweight, scales, zeros, bits, group_size, out_features,
                 in_features):
        """(first row, rows, dense fp32 W_e) of every expert that receives rows."""
        kp = scales.shape[1] * group_size
        row = 0
        for e, ((r0, r1), count) in enumerate(zip(expert_code_rows(bits, kp),
                                                  tokens_per_expert.tolist())):
            if count:
                yield row, count, dequantize(qweight[r0:r1], scales[e], zeros[e], bits[e],
                                             group_size, (out_features, in_features))
            row += count

    def grouped_forward(self, x, tokens_per_expert, qweight, scales, zeros, bits, group_size,
                        out_features):
        y = torch.zeros(x.shape[0], out_features, dtype=torch.float32, device=x.device)
        for row, count, w in self._experts(tokens_per_expert, qweight, scales, zeros, bits,
                                           group_size, out_features, x.shape[1]):
            y[row:row + count] = x[row:row + count].to(torch.float32) @ w.t()
        return y.to(x.dtype)

    def grouped_backward(self, grad_out, x, tokens_per_expert, qweight, scales, zeros, bits,
                         group_size, out_features):
        gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for row, count, w in self._experts(tokens_per_expert, qweight, scales, zeros, bits,
                                           group_size, out_features, x.shape[1]):
            gx[row:row + count] = grad_out[row:row + count].to(torch.float32) @ w
        return gx.to(x.dtype)


register_backend(ReferenceBackend())
