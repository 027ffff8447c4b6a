"""The backend registry: selection by name and by QRA_BACKEND, and loud failures."""
import subprocess
import sys
import textwrap

import pytest
import torch

import qra_kernels as qk
from qra_kernels import backends
from qra_kernels.backends import Backend, BackendUnavailableError


@pytest.fixture(autouse=True)
def restore_backend():
    saved = backends._selected
    yield
    backends._selected = saved


class Unavailable(Backend):
    name = "test-unavailable"

    def available(self):
        return False, "it is a test double that never runs"


class NoBf16(Backend):
    """Runs fp32 only, by delegating to the reference; counts its calls."""
    name = "test-fp32-only"
    calls = 0

    def available(self):
        return True, ""

    def supports(self, x):
        return (x.dtype == torch.float32, "fp32 only")

    def forward(self, *args):
        type(self).calls += 1
        return backends._REGISTRY["reference"].forward(*args)

    def backward(self, *args):
        type(self).calls += 1
        return backends._REGISTRY["reference"].backward(*args)


@pytest.fixture(autouse=True, scope="module")
def test_doubles():
    backends.register_backend(Unavailable())
    backends.register_backend(NoBf16())
    yield
    for name in (Unavailable.name, NoBf16.name):
        backends._REGISTRY.pop(name)


def qw_and_x(dtype=torch.float32):
    qw = qk.quantize_weight(torch.randn(16, 64), 4, 64, "rtn")
    return qw, torch.randn(2, 64, dtype=dtype)


def test_reference_always_available_and_listed():
    assert "reference" in qk.available_backends()
    assert "reference" in qk.build_info()["backends"]
    qk.set_backend("reference")
    assert qk.get_backend() == "reference"


def test_unknown_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        qk.set_backend("nope")
    with pytest.raises(TypeError, match="backend name"):
        qk.set_backend(3)


def test_named_backend_that_cannot_run_raises_at_selection():
    with pytest.raises(BackendUnavailableError, match="never runs"):
        qk.set_backend("test-unavailable")


def test_named_backend_never_falls_back_per_call():
    qw, x = qw_and_x(torch.bfloat16)
    qk.set_backend("test-fp32-only")
    with pytest.raises(BackendUnavailableError, match="fp32 only"):
        qk.qra_linear(x, qw)
    NoBf16.calls = 0
    y = qk.qra_linear(x.float().requires_grad_(), qw)
    y.sum().backward()
    assert NoBf16.calls == 2  # forward and backward both went to the named backend


def test_auto_picks_a_backend_that_supports_the_call():
    qw, x = qw_and_x(torch.bfloat16)
    qk.set_backend("auto")
    assert backends.select_backend(x).supports(x)[0]
    ref = backends._REGISTRY["reference"].forward(x, qw.qweight, qw.scales, qw.zeros, 4, 64, 16,
                                                   None, None, 0.0, None)
    torch.testing.assert_close(qk.qra_linear(x, qw), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("value,ok", [("reference", True), ("nope", False)])
def test_environment_variable(value, ok):
    code = textwrap.dedent("""
        import qra_kernels as qk
        print(qk.get_backend())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "QRA_BACKEND": value}, timeout=300)
    if ok:
        assert out.returncode == 0 and out.stdout.strip() == value
    else:
        assert out.returncode != 0 and "unknown backend 'nope'" in out.stderr


def test_register_backend_needs_a_name():
    with pytest.raises(ValueError, match="name"):
        backends.register_backend(Backend())
