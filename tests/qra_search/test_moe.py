"""The search on a MoE model: routed-expert groups are layers of the search (bits per group,
rank 0), scored, costed and saved exactly as ``QRAExperts`` stores them."""
import logging

import pytest
import torch

from qra_kernels.allocation import linear_shapes
from qra_search import run_search
from qra_search.costs import CostModel, LatencyTable
from qra_search.evaluate import Evaluator
from qra_search.genes import Budget, GeneSpace
from qra_search.store import quant_store

pytest.importorskip("transformers")

KW = dict(bits_choices=(2, 4, 8), rank_choices=(0, 4), default_rank=4, method="rtn",
          group_size=32, evaluations=6, popsize=4, refine_steps=1, descent_rounds=1,
          proxy_top=1, proxy_steps=2, n_blocks=6, seq_len=16, progress=False)


def tiny_mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
        num_experts_per_tok=2, initializer_range=0.05)).eval()


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))


def groups_of(model):
    return [n for n, s in linear_shapes(model).items() if len(s) == 3]


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_search_places_expert_groups(granularity, tokens, tmp_path):
    model = tiny_mixtral()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = run_search(model, tokens, 3.0, cache_dir=str(tmp_path), granularity=granularity, **KW)
    groups = groups_of(model)
    assert len(groups) == 4
    for n in groups:  # every expert group allocated, at rank 0
        assert r.best.layers[n]["rank"] == 0 and r.best.layers[n]["bits"] in (2, 4, 8)
        assert r.best.layers[n]["shape"] == list(linear_shapes(model)[n])
    assert r.best.memory_bytes <= r.budget["memory_bytes"]
    costs = CostModel(linear_shapes(model), 32)
    assert costs.memory_bytes({n: (s["bits"], s["rank"]) for n, s in r.best.layers.items()}) \
        == r.best.memory_bytes == r.best.objectives["memory_bytes"]
    for n, p in model.named_parameters():  # the float experts are back after the search
        assert torch.equal(p, before[n]), n


def test_expert_only_genes_have_one_rank():
    model = tiny_mixtral()
    shapes = linear_shapes(model)
    groups = {n: [n] for n in shapes}
    space = GeneSpace(groups, (2, 4), (0, 4, 8), CostModel(shapes, 32), Budget())
    g = groups_of(model)[0]
    a, b = space.uniform(4, 0), space.uniform(4, 0)
    b[g] = (4, 8)
    assert space.key(a) == space.key(b) and space.memory(a) == space.memory(b)
    assert space.layers(b)[g] == (4, 0)
    lin = next(n for n, s in shapes.items() if len(s) == 2)
    b[lin] = (4, 8)
    assert space.key(a) != space.key(b) and space.memory(b) > space.memory(a)


def test_scored_experts_are_what_the_saved_model_holds(tokens, tmp_path):
    """The evaluator's effective expert weights, the store's packed entries and the
    QRAExperts of the quantized (and reloaded) model agree."""
    import transformers as tf

    from qra_kernels import Allocation
    from qra_kernels.moe import qra_experts
    from qra_search.quantize import apply_allocation
    model = tiny_mixtral()
    shapes = linear_shapes(model)
    store = quant_store(model, shapes, group_size=32, method="hqq", cache_dir=str(tmp_path))
    store.fill((2, 4))
    ev = Evaluator(model, store, tokens[:6], tokens[6:])
    cfg = {n: ((2 if i % 2 else 4), 0 if len(s) == 3 else 4)
           for i, (n, s) in enumerate(shapes.items())}
    ev.apply(cfg)
    with torch.no_grad():
        scored = model(tokens).logits
    ev.restore()
    alloc = Allocation(layers={n: {"bits": b, "rank": r, "shape": list(shapes[n])}
                               for n, (b, r) in cfg.items()}, group_size=32)
    apply_allocation(model, alloc, method="hqq", cache_dir=str(tmp_path))
    packed = qra_experts(model)
    assert len(packed) == 2
    for name, m in packed.items():
        for p in m.projections:
            e = store.get(f"{name}.{p}", cfg[f"{name}.{p}"][0])["qw"]
            assert torch.equal(m.quantized(p).qweight, e.qweight)
            assert torch.equal(m.quantized(p).scales, e.scales)
    with torch.no_grad():
        got = model(tokens).logits
    assert torch.allclose(got, scored, atol=1e-4, rtol=1e-4)
    from qra_kernels import save_quantized
    save_quantized(model, str(tmp_path / "packed"))
    again = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "packed")).eval()
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, got)


def test_experts_take_hqq_under_gptq_and_say_so(tokens, tmp_path, caplog):
    model = tiny_mixtral()
    with caplog.at_level(logging.WARNING, logger="qra_search"):
        r = run_search(model, tokens, 4.0, cache_dir=str(tmp_path),
                       **{**KW, "method": "gptq", "hessian_blocks": 4})
    assert "quantized with 'hqq'" in caplog.text and "experts.gate_up_proj" in caplog.text
    assert all(r.best.layers[n]["rank"] == 0 for n in groups_of(model))


def test_latency_budget_names_the_expert_groups(tokens):
    model = tiny_mixtral()
    table = LatencyTable("t", [{"n": n, "k": k, "bits": b, "rank": r, "m": 1, "us": 1.0}
                               for n, k in {(s[0], s[1]) for s in linear_shapes(model).values()
                                            if len(s) == 2}
                               for b in (2, 4, 8) for r in (0, 4)])
    with pytest.raises(ValueError, match="no latency is measured for expert groups"):
        run_search(model, tokens, latency_table=table, budget_latency_us=100.0,
                   **{k: v for k, v in KW.items()})
