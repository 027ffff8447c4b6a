import math

import pytest
import torch

from qra_search.evaluate import Evaluator, QuantCache, layer_groups, linear_modules


def _ev(model, tokens, cache_dir=None, max_rank=8):
    cache = QuantCache(linear_modules(model), 64, max_rank, "rtn", cache_dir)
    return Evaluator(model, cache, tokens[:3], tokens[3:])


def test_groups_per_block_and_module(model):
    names = list(linear_modules(model))
    blocks = layer_groups(names, "block")
    assert list(blocks) == ["model.layers.0", "model.layers.1"]
    assert all(len(v) == 7 for v in blocks.values())
    assert list(layer_groups(names, "module")) == names
    with pytest.raises(ValueError, match="granularity"):
        layer_groups(names, "row")


def test_effective_weight_is_qralinear_forward(model):
    """The dense swap the search evaluates is what QRALinear computes."""
    from qra_kernels.modules import QRALinear
    from qra_search.export import quantize_allocation
    from qra_search import Allocation
    lin = linear_modules(model)
    cache = QuantCache(lin, 64, 8, "rtn")
    name = "model.layers.0.mlp.down_proj"
    x = torch.randn(3, lin[name].in_features)
    want = x @ cache.effective_weight(name, 3, 4).t()
    alloc = Allocation.uniform(model, 3, 4, names=[name])
    quantize_allocation(model, alloc, cache)
    layer = model.get_submodule(name)
    assert isinstance(layer, QRALinear)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_kl_is_zero_for_float_and_grows_as_bits_drop(model, tokens):
    ev = _ev(model, tokens)
    names = list(ev.linears)
    assert abs(ev.kl({})) < 1e-6
    kls = [ev.kl({n: (b, 0) for n in names}) for b in (8, 4, 3, 2)]
    assert kls == sorted(kls) and kls[0] < 1e-3 < kls[-1]
    # the SVD-initialised adapter recovers part of the quantization error
    assert ev.kl({n: (2, 8) for n in names}) < kls[-1]


def test_kl_from_a_later_block_matches_a_full_pass(model, tokens):
    ev = _ev(model, tokens)
    cfg = {n: (2, 0) for n in ev.linears if ".layers.1." in n}
    assert ev.first_changed_block(cfg) == 1
    fast = ev.kl(cfg)
    ev._blocks = None  # force the full forward pass
    assert ev.kl(cfg) == pytest.approx(fast, rel=1e-5)


def test_proxy_finetune_lowers_validation_loss_and_restores(model, tokens):
    ev = _ev(model, tokens)
    cfg = {n: (2, 8) for n in ev.linears}
    before = ev.loss(cfg, ev.valid)
    after = ev.proxy_finetune(cfg, steps=6, lr=3e-3, seed=0, eval_tokens=ev.calib)
    assert math.isfinite(after)
    assert after < ev.loss(cfg, ev.calib)  # trained on calib: its loss must drop
    assert ev.loss(cfg, ev.valid) == pytest.approx(before, rel=1e-6)  # adapters removed
    assert all(p.requires_grad for p in model.parameters())


def test_quant_cache_on_disk_is_reused(model, tmp_path):
    lin = linear_modules(model)
    c1 = QuantCache(lin, 64, 8, "rtn", str(tmp_path))
    e1 = c1.get("model.layers.0.self_attn.q_proj", 3)
    files = list((tmp_path / "quant").iterdir())
    assert len(files) == 1
    c2 = QuantCache(lin, 64, 8, "rtn", str(tmp_path))
    e2 = c2.get("model.layers.0.self_attn.q_proj", 3)
    assert torch.equal(e1["dense"], e2["dense"]) and torch.equal(e1["B"], e2["B"])
    with pytest.raises(ValueError, match="method"):
        QuantCache(lin, 64, 8, "gptq")
