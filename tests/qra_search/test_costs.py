import json

import pytest

from qra_search import Allocation
from qra_kernels.allocation import linear_shapes
from qra_search.costs import CostModel, LatencyTable, measure_latency_table


def test_memory_matches_qralinear_and_allocation_exactly(model):
    from qra_kernels.modules import qra_layers, quantize_model
    shapes = linear_shapes(model)
    names = sorted(shapes)
    layers = {n: {"bits": (2, 3, 4, 8)[i % 4], "rank": (0, 4, 16)[i % 3], "shape": list(shapes[n])}
              for i, n in enumerate(names)}
    alloc = Allocation(layers=layers, group_size=64)
    costs = CostModel(shapes, 64)
    cfg = {n: (s["bits"], s["rank"]) for n, s in layers.items()}
    quantize_model(model, alloc, method="rtn")
    measured = sum(m.memory_bytes() for m in qra_layers(model).values())
    assert costs.memory_bytes(cfg) == alloc.memory_bytes == measured


def test_uniform_budget_and_its_inverse(model):
    shapes = linear_shapes(model)
    costs = CostModel(shapes, 64)
    for bits in (2, 3, 4, 8):
        for rank in (0, 16):
            cfg = {n: (bits, rank) for n in shapes}
            assert costs.uniform_bytes(bits, rank) == costs.memory_bytes(cfg)
            assert costs.bits_for_bytes(costs.memory_bytes(cfg), rank) == pytest.approx(bits)
    assert costs.uniform_bytes(3, 0) < costs.uniform_bytes(3.25, 0) < costs.uniform_bytes(4, 0)


def test_training_memory_adds_grads_and_adam_state(model):
    shapes = linear_shapes(model)
    n, (o, i) = next(iter(shapes.items()))
    plain, train = CostModel(shapes, 64), CostModel(shapes, 64, training=True)
    assert train.layer_bytes(n, 4, 0) == plain.layer_bytes(n, 4, 0)
    assert train.layer_bytes(n, 4, 8) - plain.layer_bytes(n, 4, 8) == 3 * 8 * (o + i) * 4


def test_latency_table_lookup_interpolates_and_round_trips(tmp_path):
    t = LatencyTable("testdev", [{"n": 8, "k": 64, "bits": 4, "rank": 0, "m": 1, "us": 10.0},
                                 {"n": 8, "k": 64, "bits": 4, "rank": 16, "m": 1, "us": 18.0}])
    assert t.lookup(8, 64, 4, 8, 1) == pytest.approx(14.0)
    assert t.lookup(8, 64, 4, 32, 1) == pytest.approx(26.0)  # extrapolated from the last two
    with pytest.raises(ValueError, match="no timing"):
        t.lookup(8, 64, 3, 0, 1)
    p = tmp_path / "lat.json"
    t.save(str(p))
    assert LatencyTable.load(str(p)).entries == t.entries
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not a latency table"):
        LatencyTable.load(str(p))
    with pytest.raises(ValueError, match="no latency table"):
        LatencyTable.load("no-such-device")


def test_measured_latency_table_is_positive_and_usable():
    t = measure_latency_table([(16, 64)], bits=[2, 4], ranks=[0, 8], m=1, repeats=3)
    assert len(t.entries) == 4 and all(e["us"] > 0 for e in t.entries)
    costs = CostModel({"a": (16, 64)}, 64, latency=t, latency_m=1)
    assert costs.latency_us({"a": (4, 8)}) == pytest.approx(t.lookup(16, 64, 4, 8, 1))


def test_shipped_cpu_table_covers_smollm2_shapes():
    t = LatencyTable.load("cpu")
    for n, k in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        for b in (2, 3, 4, 8):
            for r in (0, 4, 8, 16, 32, 64):
                assert t.lookup(n, k, b, r, 1) > 0


def _tiny_mixtral():
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
        num_experts_per_tok=2)).eval()


def test_expert_groups_cost_what_qra_experts_store():
    from qra_kernels.modules import qra_layers, quantize_model
    from qra_kernels.moe import qra_experts
    model = _tiny_mixtral()
    shapes = linear_shapes(model)
    groups = [n for n, s in shapes.items() if len(s) == 3]
    assert groups and all(n.endswith(("experts.gate_up_proj", "experts.down_proj"))
                          for n in groups)
    layers = {}
    for i, (n, s) in enumerate(shapes.items()):
        if len(s) == 3:  # per-expert bits on one group, one int on the others
            bits = [2, 4, 8] if n == groups[0] else (3, 4)[i % 2]
            layers[n] = {"bits": bits, "rank": 0, "shape": list(s)}
        else:
            layers[n] = {"bits": (2, 4, 8)[i % 3], "rank": (0, 8)[i % 2], "shape": list(s)}
    alloc = Allocation(layers=layers, group_size=32)
    costs = CostModel(shapes, 32)
    cfg = {n: (s["bits"], s["rank"]) for n, s in layers.items()}
    quantize_model(model, alloc, method="rtn")
    measured = (sum(m.memory_bytes() for m in qra_layers(model).values())
                + sum(m.memory_bytes() for m in qra_experts(model).values()))
    assert costs.memory_bytes(cfg) == alloc.memory_bytes == measured
    # Uniform: the rank goes to the 2-D layers only.
    for rank in (0, 16):
        uni = {n: (4, 0 if len(s) == 3 else rank) for n, s in shapes.items()}
        assert costs.uniform_bytes(4, rank) == costs.memory_bytes(uni)
    with pytest.raises(ValueError, match="expert group.*no LoRA"):
        costs.layer_bytes(groups[0], 4, 8)
