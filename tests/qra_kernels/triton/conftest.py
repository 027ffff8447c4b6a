"""Shared cases for the Triton kernel tests.

The kernels run here in Triton's interpreter on CPU tensors. No ``TRITON_INTERPRET``
variable is needed: :mod:`qra_kernels.triton.runtime` builds the interpreted form of each
kernel on demand for CPU tensors, whatever the import order of the suite (which is why
this folder sets nothing before triton is imported).

Cases are random codes and random scales/zeros packed with :func:`qra_kernels.format.pack`
(not quantized weights: every code value of every plane occurs, including the top bit of
a word, which exercises the sign-extending shift). Expected values come from the
reference backend, the spec.
"""
import pytest
import torch

from qra_kernels.backends.reference import ReferenceBackend
from qra_kernels.format import dequantize, pack, padded_in_features

REFERENCE = ReferenceBackend()

# Relative tolerance against |x|·|W|ᵀ + s·|x·Aᵀ|·|B| (the magnitude of what is summed):
# a wrong code, plane, group or rank chunk errs by O(1) of it; rounding of x's dtype by
# a few units of its epsilon (W is rounded to x's dtype for the tensor-core dot).
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class Case:
    """One call's tensors: x [*lead, M, K], packed W [N, K], LoRA of a rank, bias."""

    def __init__(self, bits, group_size, m, k, n, rank, x_dtype=torch.bfloat16,
                 lora_dtype=torch.float32, scale_dtype=torch.float16, bias=False, lead=(),
                 scaling=0.5, seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        kp = padded_in_features(k, group_size)
        codes = torch.randint(0, 1 << bits, (n, kp), generator=g, dtype=torch.uint8)
        self.qweight = pack(codes.to(device), bits)
        self.scales = (torch.rand(kp // group_size, n, generator=g) * 0.2 + 0.05).to(scale_dtype)
        self.zeros = (torch.rand(kp // group_size, n, generator=g) * ((1 << bits) - 1)).to(scale_dtype)
        self.x = torch.randn(*lead, m, k, generator=g).to(x_dtype)
        self.lora_A = (torch.randn(rank, k, generator=g) * 0.2).to(lora_dtype)
        self.lora_B = (torch.randn(n, rank, generator=g) * 0.2).to(lora_dtype)
        self.bias = torch.randn(n, generator=g).to(x_dtype) if bias else None
        self.bits, self.group_size, self.n, self.k, self.scaling = bits, group_size, n, k, scaling
        self.grad_out = torch.randn(*lead, m, n, generator=g).to(x_dtype)
        for name in ("scales", "zeros", "x", "lora_A", "lora_B", "bias", "grad_out"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))

    def weight(self):
        """The dense fp32 W [N, K] (format.dequantize, the reference's own)."""
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                          (self.n, self.k))

    @property
    def packed(self):
        return (self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.n)

    def magnitude(self):
        """|x|·|W|ᵀ + s·|x·Aᵀ|·|B| (+|bias|), fp32, the scale of the forward's sums."""
        x = self.x.reshape(-1, self.k).float().abs()
        w = self.weight().abs()
        mag = x @ w.t()
        if self.lora_A.shape[0]:
            mag += abs(self.scaling) * (x @ self.lora_A.float().abs().t()) @ self.lora_B.float().abs().t()
        if self.bias is not None:
            mag += self.bias.float().abs()
        return mag.reshape(*self.x.shape[:-1], self.n)


def assert_close_scaled(got, want, magnitude, dtype, what):
    """|got - want| <= RTOL[dtype] * magnitude + tiny, elementwise, readable on failure."""
    rtol = RTOL[dtype]
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.float() - want.float()).abs()
    bound = rtol * magnitude.float() + 1e-6
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst "
                           f"error {err.max().item():.3g} (bound there "
                           f"{bound.flatten()[err.argmax()].item():.3g})")


@pytest.fixture
def make_case():
    """``make_case(bits, group_size, m, k, n, rank, **options)`` -> :class:`Case`."""
    return Case


@pytest.fixture
def assert_scaled():
    return assert_close_scaled


@pytest.fixture
def reference():
    return REFERENCE
