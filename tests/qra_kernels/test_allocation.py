"""Allocation: validation with clear errors, JSON round trip, exact memory accounting,
LoRA config with per-layer ranks."""
import json

import pytest
import torch
from torch import nn

import qra_kernels as qk
from qra_kernels.modules import qra_layers
from qra_search import Allocation, linear_shapes


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(64, 64), "down_proj": nn.Linear(128, 64)})
            for _ in range(12))
        self.lm_head = nn.Linear(64, 100)


def mixed(model):
    alloc = Allocation.uniform(model, 4, 8, group_size=32)
    for i, (name, spec) in enumerate(alloc.layers.items()):
        spec["bits"] = (2, 3, 4, 8)[i % 4]
        spec["rank"] = (0, 7, 16, 64)[(i // 4) % 4]
    return alloc


def test_linear_shapes_excludes_the_head():
    shapes = linear_shapes(Tiny())
    assert "lm_head" not in shapes and len(shapes) == 24
    assert shapes["layers.0.down_proj"] == (64, 128)


def test_memory_bytes_equals_the_quantized_layers():
    model = Tiny()
    alloc = mixed(model)
    alloc.validate(model)
    qk.quantize_model(model, alloc, method="rtn")
    layers = qra_layers(model)
    assert set(layers) == set(alloc.layers)
    assert alloc.memory_bytes == sum(m.memory_bytes() for m in layers.values())
    for name, m in layers.items():
        assert alloc.layer_bytes(name) == m.memory_bytes()
        assert (m.bits, m.rank) == (alloc.layers[name]["bits"], alloc.layers[name]["rank"])
    # A quantized model still validates (QRALinear counts as a linear layer).
    alloc.validate(model)


def test_bf16_adapters_and_scales_are_counted():
    model = Tiny()
    alloc = Allocation.uniform(model, 3, 16, group_size=64, lora_dtype="bfloat16",
                               scale_dtype="bfloat16")
    qk.quantize_model(model, alloc, method="rtn", scale_dtype=torch.bfloat16,
                      lora_dtype=torch.bfloat16)
    assert alloc.memory_bytes == sum(m.memory_bytes() for m in qra_layers(model).values())


def test_average_bits():
    alloc = Allocation(layers={"a": {"bits": 2, "rank": 0, "shape": [10, 64]},
                               "b": {"bits": 8, "rank": 0, "shape": [30, 64]}})
    assert alloc.average_bits == pytest.approx((2 * 10 + 8 * 30) / 40)


def test_save_load_round_trip(tmp_path):
    alloc = mixed(Tiny())
    alloc.objectives = {"quality": 1.25, "memory_bytes": alloc.memory_bytes}
    alloc.meta = {"seed": 3}
    path = tmp_path / "allocation.json"
    alloc.save(path)
    again = Allocation.load(path)
    assert again.to_dict() == alloc.to_dict()
    assert json.loads(path.read_text())["format"] == "qra-allocation"
    assert not (tmp_path / "allocation.json.tmp").exists()


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["layers"]["layers.0.q_proj"].update(bits=5), "layers.0.q_proj.*bits"),
    (lambda d: d["layers"]["layers.0.q_proj"].update(bits=True), "bits"),
    (lambda d: d["layers"]["layers.0.q_proj"].update(rank=-1), "layers.0.q_proj.*rank"),
    (lambda d: d["layers"]["layers.0.q_proj"].update(rank=4.5), "rank"),
    (lambda d: d["layers"]["layers.0.q_proj"].update(shape=[64]), "shape"),
    (lambda d: d["layers"]["layers.0.q_proj"].update(colour=1), "unknown field"),
    (lambda d: d["layers"].update({"layers.0.q_proj": 4}), "entry must be an object"),
    (lambda d: d.update(group_size=48), "group_size"),
    (lambda d: d.update(lora_dtype="int8"), "lora_dtype"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.pop("layers"), "missing 'layers'"),
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d.update(layers=[1, 2]), "layers must be a dict"),
])
def test_malformed_allocation_names_the_entry(tmp_path, mutate, match):
    d = Allocation.uniform(Tiny(), 4, 8).to_dict()
    mutate(d)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        Allocation.load(path)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no such allocation file"):
        Allocation.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Allocation.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Allocation.load(bad)


def test_validate_against_model():
    model = Tiny()
    alloc = Allocation.uniform(model, 4, 0)
    alloc.layers["layers.99.q_proj"] = {"bits": 4, "rank": 0}
    with pytest.raises(ValueError, match="layers.99.q_proj.*not a module"):
        alloc.validate(model)
    alloc = Allocation.uniform(model, 4, 0)
    alloc.layers["layers.0.q_proj"]["shape"] = [64, 65]
    with pytest.raises(ValueError, match="layers.0.q_proj.*shape"):
        alloc.validate(model)
    alloc = Allocation(layers={"layers.0": {"bits": 4}})
    with pytest.raises(ValueError, match="ModuleDict, not a linear layer"):
        alloc.validate(model)
    with pytest.raises(ValueError, match="not a linear layer"):
        Allocation.uniform(model, 4, names=["lm_head.bias"])
    with pytest.raises(ValueError, match="has no shape"):
        Allocation(layers={"x": {"bits": 4}}).memory_bytes


def test_to_lora_config_per_layer_ranks():
    peft = pytest.importorskip("peft")
    model = Tiny()
    alloc = mixed(model)
    # layers.1.q_proj's pattern must not leak onto layers.11.q_proj (rank 7) or vice versa.
    alloc.layers["layers.1.q_proj"].update(rank=64, alpha=3.0)
    assert alloc.layers["layers.11.q_proj"]["rank"] == 7
    cfg = alloc.to_lora_config(lora_dropout=0.0)
    with_adapter = {n for n, s in alloc.layers.items() if s["rank"] > 0}
    assert set(cfg.target_modules) == with_adapter
    wrapped = peft.get_peft_model(model, cfg)
    seen = {}
    for name, mod in wrapped.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            short = name.removeprefix("base_model.model.")
            seen[short] = (mod.lora_A["default"].weight.shape[0], mod.scaling["default"])
    assert set(seen) == with_adapter
    for name in with_adapter:
        spec = alloc.layers[name]
        assert seen[name][0] == spec["rank"], name  # layers.1. never matches layers.11.
        assert seen[name][1] == pytest.approx(spec.get("alpha", spec["rank"]) / spec["rank"])
    with pytest.raises(ValueError, match="rank > 0"):
        Allocation.uniform(model, 4, 0).to_lora_config()
