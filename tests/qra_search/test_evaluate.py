import math

import pytest
import torch

from qra_search.evaluate import Evaluator, layer_groups, linear_modules
from qra_search.store import quant_store


def _store(model, cache_dir=None, method="rtn"):
    return quant_store(model, linear_modules(model), group_size=64, method=method,
                       cache_dir=cache_dir)


def _ev(model, tokens, cache_dir=None):
    return Evaluator(model, _store(model, cache_dir), tokens[:3], tokens[3:])


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
    from qra_search.quantize import apply_allocation
    from qra_search import Allocation
    lin = linear_modules(model)
    store = _store(model)
    name = "model.layers.0.mlp.down_proj"
    x = torch.randn(3, lin[name].in_features)
    want = x @ store.effective_weight(name, 3, 4).t()
    alloc = Allocation.uniform(model, 3, 4, names=[name])
    apply_allocation(model, alloc, method="rtn", cache_dir=None, store=store)
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


@pytest.mark.parametrize("store_ref", [True, False])
def test_chunked_head_matches_the_whole_logits(model, tokens, monkeypatch, store_ref):
    """KL, loss and a fine-tune through the head in chunks (a few positions at a time,
    checkpointed in training) equal the whole-logits forward of the model."""
    import qra_search.evaluate as evaluate
    cfg = {n: (2, 8) for n in linear_modules(model)}
    whole = _ev(model, tokens)
    whole._blocks = None  # the model's own forward, whole logits
    want = (whole.kl(cfg), whole.loss(cfg, whole.valid),
            whole.proxy_finetune(cfg, steps=3, lr=3e-3, seed=0))
    whole.restore()
    monkeypatch.setattr(evaluate, "_HEAD_CHUNK_BYTES", 4 * 7 * model.config.vocab_size)
    chunked = _ev(model, tokens)
    assert chunked._blocks is not None and chunked._head_rows() == 7
    if not store_ref:
        chunked._ref = [chunked._head_input(b) for b in chunked._batches(chunked.calib)]
        chunked._store_ref = False
    got = (chunked.kl(cfg), chunked.loss(cfg, chunked.valid),
           chunked.proxy_finetune(cfg, steps=3, lr=3e-3, seed=0))
    assert got == pytest.approx(want, rel=1e-4)


def test_head_check_falls_back_when_the_model_scales_its_logits(model, tokens):
    """A model whose forward changes the logits after the head (Granite's logit scale, say)
    is evaluated through its own forward, not the body → head shortcut."""
    orig = model.forward

    def scaled(*a, **k):
        out = orig(*a, **k)
        out.logits = out.logits * 0.5
        return out
    model.forward = scaled
    assert _ev(model, tokens)._blocks is None


def test_proxy_finetune_lowers_validation_loss_and_restores(model, tokens):
    ev = _ev(model, tokens)
    cfg = {n: (2, 8) for n in ev.linears}
    before = ev.loss(cfg, ev.valid)
    after = ev.proxy_finetune(cfg, steps=6, lr=3e-3, seed=0, eval_tokens=ev.calib)
    assert math.isfinite(after)
    assert after < ev.loss(cfg, ev.calib)  # trained on calib: its loss must drop
    assert ev.loss(cfg, ev.valid) == pytest.approx(before, rel=1e-6)  # adapters removed
    assert all(p.requires_grad for p in model.parameters())


def test_finetune_checkpoints_blocks_with_the_same_result(model, tokens):
    """Per-block activation checkpointing recomputes every decoder block in the backward
    (two forwards of each block a step instead of one), gives the same losses, and is off
    again afterwards. (Counted on a module inside the block: transformers 5 checkpoints the
    block's ``forward``, so the block's own hooks run once.)"""
    ev = _ev(model, tokens)
    cfg = {n: (4, 8) for n in ev.linears}
    blk = model.model.layers[0].self_attn  # not the last: the recompute stops early
    calls = []
    hook = blk.register_forward_hook(lambda *a: calls.append(1))
    try:
        logs = {}
        counts = {}
        for ck in (False, True):
            calls.clear()
            logs[ck] = []
            ev.finetune(cfg, 2, 3e-3, seed=0, checkpoint_blocks=ck, eval_tokens=ev.calib[:1],
                        log=logs[ck])
            counts[ck] = len(calls)
    finally:
        hook.remove()
    assert logs[True] == pytest.approx(logs[False], rel=1e-6, abs=1e-7)
    # 2 steps + 1 evaluation: 3 forwards of the block without, 2 more with checkpointing
    assert counts[False] == 3 and counts[True] == 5
    assert not model.is_activation_checkpointing
    assert ev.finetune(cfg, 1, 3e-3, seed=0) == pytest.approx(
        ev.finetune(cfg, 1, 3e-3, seed=0, checkpoint_blocks=False), rel=1e-6)


def test_quant_store_on_disk_is_reused_and_consolidated(model, tmp_path):
    name = "model.layers.0.self_attn.q_proj"
    s1 = _store(model, str(tmp_path))
    e1 = s1.get(name, 3)
    parts = list((tmp_path / "quant" / "parts").iterdir())
    assert len(parts) == 1
    s2 = _store(model, str(tmp_path))
    e2 = s2.get(name, 3)
    assert torch.equal(e1["qw"].qweight, e2["qw"].qweight) and torch.equal(e1["B"], e2["B"])
    s2.fill([3])  # every layer at 3 bits, then one file for the bit-width
    assert not list((tmp_path / "quant" / "parts").iterdir())
    bundles = [p for p in (tmp_path / "quant").iterdir() if p.suffix == ".safetensors"]
    assert len(bundles) == 1
    e3 = _store(model, str(tmp_path)).get(name, 3)
    assert torch.equal(e1["qw"].qweight, e3["qw"].qweight) and torch.equal(e1["A"], e3["A"])
    with pytest.raises(ValueError, match="gptq"):
        _store(model, method="gptq")


def test_factors_do_not_depend_on_how_many_were_kept():
    """Exact SVD with fixed signs: the leading factors are the same whatever the cap (the
    search and `qra quantize` may ask for different maximum ranks)."""
    from qra_kernels import quantize_weight
    from qra_kernels.lora_init import error_factors
    w = torch.randn(96, 128)
    d = quantize_weight(w, 2, 64, "rtn").dequantize()
    B8, A8, s8 = error_factors(w, d, 8)
    B64, A64, s64 = error_factors(w, d, 64)
    assert B8.shape == (96, 8) and A64.shape == (64, 128)
    assert torch.equal(B8, B64[:, :8]) and torch.equal(A8, A64[:8]) and torch.equal(s8, s64)
    # and B·A is the best rank-r approximation of the error (Eckart–Young)
    err = w - d
    best = torch.linalg.matrix_norm(err - B8 @ A8) ** 2
    assert best == pytest.approx(float((s8[8:] ** 2).sum()), rel=1e-4)


def test_evaluation_leaves_one_copy_of_the_weights(model, tokens, tmp_path):
    """Float originals live in the store's file, not in memory: after any evaluation the
    model's linear weights are the only dense copies, and restore() is exact."""
    before = {n: m.weight.detach().clone() for n, m in linear_modules(model).items()}
    ev = _ev(model, tokens, str(tmp_path))
    assert not ev.floats._ram  # on disk
    ev.kl({n: (2, 8) for n in ev.linears})
    ev.restore()
    for n, m in linear_modules(model).items():
        assert torch.equal(m.weight, before[n]), n
