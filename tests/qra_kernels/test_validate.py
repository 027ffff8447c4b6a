"""One validator for every entry point: the same bad call fails with the same error through
the validator itself, a compiled backend (via ``_ext``) and the Triton functions."""
import pytest
import torch

import qra_kernels as qk
from qra_kernels import validate
from qra_kernels.backends import _REGISTRY, _ensure_loaded


def _call():
    w = torch.randn(16, 64)
    qw = qk.quantize_weight(w, 4, group_size=32, method="rtn")
    return dict(x=torch.randn(3, 64), qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros,
                bits=4, group_size=32, out_features=16, lora_A=torch.randn(2, 64) / 8,
                lora_B=torch.randn(16, 2), bias=torch.randn(16))


BAD = [
    ("qweight", dict(qweight=torch.zeros(7, 16, dtype=torch.int32)), ValueError),
    ("qweight", dict(bits=8), ValueError),
    ("scales", dict(scales=torch.zeros(2, 8, dtype=torch.float16)), ValueError),
    ("zeros", dict(zeros=torch.zeros(2, 16)), TypeError),
    ("lora_A and lora_B", dict(lora_B=None), ValueError),
    ("lora_A", dict(lora_A=torch.randn(2, 63)), ValueError),
    ("lora_B", dict(lora_B=torch.randn(16, 3)), ValueError),
    ("lora_B", dict(lora_B=torch.ones(16, 2, dtype=torch.int64)), TypeError),
    ("bias", dict(bias=torch.randn(15)), ValueError),
    ("x must be", dict(x=torch.ones(3, 64, dtype=torch.int64)), TypeError),
    ("group_size", dict(group_size=48), ValueError),
    ("out_features", dict(out_features=0), ValueError),
]


def _entry_points():
    yield "validate", lambda a: validate.check_packed_call(
        a["x"], a["qweight"], a["scales"], a["zeros"], a["bits"], a["group_size"],
        a["out_features"], a["lora_A"], a["lora_B"], a["bias"])
    _ensure_loaded()
    cpu = _REGISTRY.get("cpu")
    if cpu is not None and cpu.available()[0]:
        yield "cpu", lambda a: cpu.forward(
            a["x"], a["qweight"], a["scales"], a["zeros"], a["bits"], a["group_size"],
            a["out_features"], a["lora_A"], a["lora_B"], 1.0, a["bias"])
    try:
        from qra_kernels import triton as qt
    except ImportError:
        return
    yield "triton", lambda a: qt.forward(
        a["x"], a["qweight"], a["scales"], a["zeros"], a["bits"], a["group_size"],
        a["out_features"], a["lora_A"], a["lora_B"], 1.0, a["bias"])


@pytest.mark.parametrize("match,override,exc", BAD)
def test_every_entry_point_raises_the_same_error(match, override, exc):
    errors = {}
    for name, call in _entry_points():
        args = {**_call(), **override}
        with pytest.raises(exc, match=match) as info:
            call(args)
        errors[name] = str(info.value)
    assert len(errors) >= 2, f"only {sorted(errors)} could be exercised"
    assert len(set(errors.values())) == 1, errors
