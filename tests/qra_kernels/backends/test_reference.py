"""The reference backend keeps nothing dequantized between calls and handles rank 0 with a
trainable (empty) adapter."""
import torch

import qra_kernels as qk
from qra_kernels.backends import _REGISTRY


def test_rank_zero_adapter_gets_empty_gradients():
    qw = qk.quantize_weight(torch.randn(8, 64), 2, 32, "rtn")
    a = torch.zeros(0, 64, requires_grad=True)
    b = torch.zeros(8, 0, requires_grad=True)
    x = torch.randn(3, 64, requires_grad=True)
    qk.qra_linear(x, qw, a, b, 1.0).sum().backward()
    assert a.grad.shape == (0, 64) and b.grad.shape == (8, 0)
    torch.testing.assert_close(x.grad, torch.ones(3, 8) @ qw.dequantize())


def test_reference_output_dtype_follows_x():
    ref = _REGISTRY["reference"]
    qw = qk.quantize_weight(torch.randn(8, 64), 8, 64, "rtn")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        y = ref.forward(torch.randn(2, 64, dtype=dt), qw.qweight, qw.scales, qw.zeros, 8, 64, 8,
                        None, None, 0.0, None)
        assert y.dtype == dt
