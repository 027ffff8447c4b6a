"""PEFT LoRA on QRALinear: dispatch, per-layer ranks, fused forward, exact unmerge, saving,
loading, dense export, and the unregistered-layer trap."""
import pytest
import torch
from torch import nn

import qra_kernels as qk
from qra_kernels import QRALinear
from qra_kernels.integrations import peft as qp

from .conftest import tiny_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from qra_search import Allocation  # noqa: E402

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))


def qra_model(layers=2, bits=4, seed=0, family="llama"):
    model = tiny_model(family, seed=seed, num_hidden_layers=layers)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    qk.quantize_model(model, {"layers": {n: {"bits": bits} for n in names}, "group_size": 32},
                      method="rtn")  # rtn: fast, and the method does not matter here
    return model


def randomize_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def twelve_layer_allocation(model):
    """Ranks that differ between layers.1 and layers.11 (a suffix-matching trap)."""
    alloc = Allocation.uniform(model, bits=4, rank=4, group_size=32)
    alloc.layers["model.layers.1.mlp.up_proj"].update(rank=12, alpha=6)
    alloc.layers["model.layers.11.mlp.up_proj"].update(rank=2)
    alloc.layers["model.layers.1.self_attn.q_proj"]["rank"] = 0
    alloc.layers["model.layers.10.self_attn.v_proj"].update(rank=7, alpha=21)
    return alloc


def test_lora_config_follows_allocation_per_layer():
    model = qra_model(layers=12)
    alloc = twelve_layer_allocation(model)
    pm = get_peft_model(model, qp.lora_config(model, alloc))
    seen = {}
    for name, m in pm.base_model.model.named_modules():
        if isinstance(m, qp.QraLoraLinear):
            seen[name] = (m.r["default"], m.scaling["default"])
    expected = {n: (s["rank"], s.get("alpha", s["rank"]) / s["rank"])
                for n, s in alloc.layers.items() if s["rank"] > 0}
    assert seen == expected
    assert "model.layers.1.self_attn.q_proj" not in seen  # rank 0: no adapter
    assert isinstance(pm.base_model.model.model.layers[1].self_attn.q_proj, QRALinear)


def test_lora_config_accepts_path_dict_and_rejects_bad_input(tmp_path):
    model = qra_model()
    alloc = Allocation.uniform(model, bits=4, rank=8, group_size=32)
    alloc.save(tmp_path / "allocation.json")
    for a in (alloc, alloc.to_dict(), str(tmp_path / "allocation.json")):
        cfg = qp.lora_config(model, a)
        assert set(cfg.target_modules) == set(alloc.layers) and cfg.r == 8
    with pytest.raises(ValueError, match="allocation"):
        qp.lora_config(model, alloc, r=16)
    bad = Allocation(layers={"model.layers.7.mlp.up_proj": {"bits": 4, "rank": 4}}, group_size=32)
    with pytest.raises(ValueError, match="model.layers.7.mlp.up_proj"):
        qp.lora_config(model, bad)
    with pytest.raises(ValueError, match="QRALinear"):
        qp.lora_config(tiny_model())
    with pytest.raises(TypeError, match="model"):
        qp.lora_config("model")
    cfg = qp.lora_config(model, r=4, lora_dropout=0.1)
    assert cfg.r == 4 and cfg.lora_dropout == 0.1 and len(cfg.target_modules) == 14


def test_forward_is_one_fused_call_and_matches_reference(monkeypatch):
    model = qra_model()
    pm = get_peft_model(model, qp.lora_config(model, r=8, lora_alpha=16))
    randomize_adapters(pm)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    calls = []
    real = qp.linear_packed

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(qp, "linear_packed", spy)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    y = layer(x)
    assert len(calls) == 1 and calls[0][7] is not None and calls[0][7].shape[0] == 8
    base = layer.get_base_layer()
    w = base.quantized_weight.dequantize(torch.float32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = x @ w.T + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    # gradients flow to the adapter and the input, never to the packed base
    y.square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    Ar, Br = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    (xr @ w.T + 2.0 * (xr @ Ar.T) @ Br.T).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(A.grad, Ar.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(B.grad, Br.grad, atol=1e-3, rtol=1e-4)
    assert base.qweight.grad is None and not base.qweight.requires_grad


def test_two_active_adapters_are_stacked_in_one_call(monkeypatch):
    model = qra_model()
    pm = get_peft_model(model, qp.lora_config(model, r=4))
    pm.add_adapter("second", qp.lora_config(model, r=6, lora_alpha=3))
    randomize_adapters(pm)
    pm.base_model.set_adapter(["default", "second"])
    layer = pm.base_model.model.model.layers[1].self_attn.o_proj
    calls = []
    real = qp.linear_packed
    monkeypatch.setattr(qp, "linear_packed", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(4, layer.in_features)
    y = layer(x)
    assert len(calls) == 1 and calls[0][7].shape[0] == 10
    w = layer.get_base_layer().quantized_weight.dequantize(torch.float32)
    ref = x @ w.T
    for a in ("default", "second"):
        ref = ref + layer.scaling[a] * (x @ layer.lora_A[a].weight.T) @ layer.lora_B[a].weight.T
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


def test_dropout_path_matches_fused_path_in_eval():
    model = qra_model()
    pm = get_peft_model(model, qp.lora_config(model, r=4, lora_dropout=0.5))
    randomize_adapters(pm)
    pm.eval()
    with torch.no_grad():
        y_eval = pm(IDS).logits
    pm.train()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, layer.in_features)
    torch.manual_seed(0)
    y_train = layer(x)  # dropout active: adapter beside the fused base
    assert torch.isfinite(y_train).all()
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS).logits, y_eval)


def test_merge_unmerge_is_bit_exact():
    model = qra_model(layers=12)
    pm = get_peft_model(model, qp.lora_config(model, twelve_layer_allocation(model)))
    randomize_adapters(pm)
    pm.eval()
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with torch.no_grad():
        y = pm(IDS).logits
    pm.merge_adapter()
    packed = [k for k in before if k.endswith((".qweight", ".scales", ".zeros"))]
    assert packed and all(torch.equal(pm.state_dict()[k], before[k]) for k in packed)
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS).logits, y, atol=1e-5, rtol=1e-5)
    pm.unmerge_adapter()
    after = pm.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    with torch.no_grad():
        assert torch.equal(pm(IDS).logits, y)
    # merge twice / unmerge twice keeps the same invariant
    pm.merge_adapter()
    pm.merge_adapter()
    pm.unmerge_adapter()
    assert all(torch.equal(pm.state_dict()[k], before[k]) for k in before)


def test_merge_and_unload_gives_a_qra_model_with_the_adapter():
    model = qra_model()
    pm = get_peft_model(model, qp.lora_config(model, r=4))
    randomize_adapters(pm)
    pm.eval()
    with torch.no_grad():
        y = pm(IDS).logits
    merged = pm.merge_and_unload()
    layer = merged.model.layers[0].mlp.up_proj
    assert type(layer) is QRALinear and layer.rank == 4
    assert not any(isinstance(m, qp.QraLoraLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, y, atol=1e-5, rtol=1e-5)


def test_save_and_load_restore_per_layer_ranks(tmp_path):
    model = qra_model(layers=12)
    alloc = twelve_layer_allocation(model)
    pm = get_peft_model(model, qp.lora_config(model, alloc))
    randomize_adapters(pm)
    pm.eval()
    with torch.no_grad():
        y = pm(IDS).logits
    pm.save_pretrained(tmp_path / "adapter")

    fresh = qra_model(layers=12)  # same seed: the same packed base
    # The trap: PEFT does not save custom-module registrations; a plain load fails loudly.
    with pytest.raises(ValueError, match="QRALinear"):
        PeftModel.from_pretrained(qra_model(layers=12), tmp_path / "adapter")
    loaded = qp.load(fresh, str(tmp_path / "adapter"))
    ranks = {n: m.r["default"] for n, m in loaded.base_model.model.named_modules()
             if isinstance(m, qp.QraLoraLinear)}
    assert ranks == {n: s["rank"] for n, s in alloc.layers.items() if s["rank"]}
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, y)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = qp.load(qra_model(layers=12), str(tmp_path / "adapter"), is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_trap_unregistered_lora_on_qra_layer_fails_loudly():
    model = qra_model()
    with pytest.raises(ValueError, match="QRALinear"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_unsupported_lora_options_are_rejected():
    model = qra_model()
    for flag in ("use_dora", "lora_bias"):
        with pytest.raises(ValueError, match=flag):
            get_peft_model(qra_model(), qp.lora_config(model, r=4, **{flag: True}))


def test_export_dense_bf16():
    model = qra_model()
    pm = get_peft_model(model, qp.lora_config(model, r=4))
    randomize_adapters(pm)
    pm.eval()
    with torch.no_grad():
        y = pm(IDS).logits
    dense = qp.export_dense(pm)
    assert not any(isinstance(m, (QRALinear, qp.QraLoraLinear)) for m in dense.modules())
    assert all(p.dtype == torch.bfloat16 for p in dense.parameters())
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits.float(), y, atol=0.05, rtol=0.05)
    # exactness of the merge itself, in float32
    model = qra_model()
    pm = get_peft_model(model, qp.lora_config(model, r=4))
    randomize_adapters(pm)
    pm.eval()
    dense32 = qp.export_dense(pm, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(dense32(IDS).logits, y, atol=1e-4, rtol=1e-4)
