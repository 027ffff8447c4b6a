"""Routed experts (qra_kernels/moe.py): the grouped op against its reference on every
bit-width, odd expert counts, experts without tokens, backward; QRAExperts against the
transformers experts class it replaces (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS layout);
memory accounting; quantize_model / Allocation with expert groups; bad input."""
import logging

import pytest
import torch

import qra_kernels as qk
from qra_kernels import backends
from qra_kernels.backends.reference import ReferenceBackend
from qra_kernels.format import experts_packed_nbytes, pack, padded_in_features
from qra_kernels.moe import (QRAExperts, QuantizedExperts, expert_shapes, grouped_linear,
                             quantize_experts, qra_experts)

REFERENCE = ReferenceBackend()


@pytest.fixture(autouse=True)
def _restore_backend():
    saved = backends._selected
    yield
    backends._selected = saved


def random_experts(bits, n, k, group_size=32, seed=0, scale_dtype=torch.float16):
    """Random codes of every value (not quantized weights) with random scales/zeros."""
    g = torch.Generator().manual_seed(seed)
    kp = padded_in_features(k, group_size)
    codes = [pack(torch.randint(0, 1 << b, (n, kp), generator=g, dtype=torch.uint8), b)
             for b in bits]
    e = len(bits)
    scales = (torch.rand(e, kp // group_size, n, generator=g) * 0.2 + 0.05).to(scale_dtype)
    zeros = (torch.rand(e, kp // group_size, n, generator=g) * 3).to(scale_dtype)
    return QuantizedExperts(torch.cat(codes), scales, zeros, bits, group_size, (e, n, k))


def dense_grouped(x, counts, qe):
    """The op written out: each run of rows times its expert's dequantized matrix."""
    w = qe.dequantize()
    out, row = [], 0
    for e, c in enumerate(counts.tolist()):
        out.append(x[row:row + c].float() @ w[e].t())
        row += c
    return torch.cat(out)


CASES = [  # (bits per expert, tokens per expert): odd counts, empty experts, mixed bits
    ((2, 2, 2), (3, 0, 4)),
    ((3, 3, 3, 3, 3), (1, 2, 0, 0, 6)),
    ((4,), (5,)),
    ((8, 8, 8, 8, 8, 8, 8), (0, 1, 1, 3, 0, 2, 0)),
    ((2, 3, 4, 8, 3), (2, 1, 0, 3, 1)),
    ((4, 4, 4), (0, 0, 0)),  # no rows at all
]


@pytest.mark.parametrize("bits,tokens", CASES)
def test_reference_is_the_op_written_out(bits, tokens):
    qe = random_experts(bits, n=24, k=96)
    counts = torch.tensor(tokens)
    x = torch.randn(int(counts.sum()), 96)
    y = REFERENCE.grouped_forward(x, counts, qe.qweight, qe.scales, qe.zeros, list(bits), 32, 24)
    torch.testing.assert_close(y, dense_grouped(x, counts, qe), rtol=1e-5, atol=1e-5)
    # Each expert's rows equal one qra::linear call on that expert's matrix.
    row = 0
    for e, c in enumerate(tokens):
        if c:
            torch.testing.assert_close(y[row:row + c], qk.qra_linear(x[row:row + c], qe.expert(e)),
                                       rtol=1e-4, atol=1e-4)
        row += c


def _backend_names():
    names = ["reference", "auto"]
    backends._ensure_loaded()
    if backends._REGISTRY["cpu"].available()[0]:
        names.append("cpu")
    return names


@pytest.mark.parametrize("backend", _backend_names())
@pytest.mark.parametrize("bits,tokens", CASES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_op_forward_backward_match_reference(backend, bits, tokens, dtype):
    qe = random_experts(bits, n=40, k=64)
    counts = torch.tensor(tokens)
    x = torch.randn(int(counts.sum()), 64).to(dtype).requires_grad_()
    qk.set_backend(backend)
    y = grouped_linear(x, counts, qe)
    assert y.dtype == dtype and y.shape == (x.shape[0], 40)
    g = torch.randn_like(y)
    y.backward(g)
    want = REFERENCE.grouped_forward(x.detach(), counts, qe.qweight, qe.scales, qe.zeros,
                                     list(bits), 32, 40)
    want_gx = REFERENCE.grouped_backward(g, x.detach(), counts, qe.qweight, qe.scales, qe.zeros,
                                         list(bits), 32, 40)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.5)
    torch.testing.assert_close(y.detach(), want, **tol)
    torch.testing.assert_close(x.grad, want_gx, **tol)
    # grad_x is the transposed product: dL/dx = g · W_e per run of rows.
    w = qe.dequantize()
    row, expected = 0, []
    for e, c in enumerate(tokens):
        expected.append(g[row:row + c].float() @ w[e])
        row += c
    torch.testing.assert_close(x.grad.float(), torch.cat(expected), **tol)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_op_through_the_triton_kernels(bits, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qe = random_experts((bits,) * 3, n=24, k=64)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 64, requires_grad=True)
    qk.set_backend("triton")
    y = grouped_linear(x, counts, qe)
    y.sum().backward()
    want = dense_grouped(x.detach(), counts, qe)
    torch.testing.assert_close(y.detach(), want, rtol=1e-4, atol=1e-3)
    w = qe.dequantize()
    torch.testing.assert_close(x.grad, torch.cat([w[0].sum(0).expand(2, -1),
                                                  w[2].sum(0).expand(3, -1)]),
                               rtol=1e-4, atol=1e-3)


def test_op_traces_under_compile_without_graph_break():
    torch._dynamo.reset()
    qe = random_experts((4, 2, 8), n=16, k=32)
    counts = torch.tensor([1, 3, 2])
    x = torch.randn(6, 32, requires_grad=True)

    def step(t):
        return grouped_linear(t, counts, qe).square().sum()

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0
    torch.compile(step, fullgraph=True, backend="aot_eager")(x).backward()
    gx = x.grad.clone()
    x.grad = None
    step(x).backward()
    torch.testing.assert_close(gx, x.grad)


def test_quantize_experts_is_quantize_weight_per_expert():
    torch.manual_seed(0)
    w = torch.randn(3, 24, 64)
    qe = quantize_experts(w, [2, 4, 8], 32, "rtn")
    for e, b in enumerate((2, 4, 8)):
        one = qk.quantize_weight(w[e], b, 32, "rtn")
        got = qe.expert(e)
        assert got.bits == b
        assert torch.equal(got.qweight, one.qweight) and torch.equal(got.scales, one.scales)
    assert qe.nbytes == experts_packed_nbytes(24, 64, [2, 4, 8], 32)
    assert torch.equal(qe.dequantize()[1], qk.quantize_weight(w[1], 4, 32, "rtn").dequantize())


@pytest.mark.parametrize("call,exc,match", [
    (lambda qe, x, c: grouped_linear(x, torch.tensor([1, 1]), qe), TypeError, "tokens_per_expert"),
    (lambda qe, x, c: grouped_linear(x, torch.tensor([1, 1, 0]), qe), ValueError, "sum to"),
    (lambda qe, x, c: grouped_linear(x, torch.tensor([4, -1, 0]), qe), ValueError, ">= 0"),
    (lambda qe, x, c: grouped_linear(x[:, :16], c, qe), ValueError, "x must have shape"),
    (lambda qe, x, c: grouped_linear(x.double(), c, qe), TypeError, "float32"),
    (lambda qe, x, c: grouped_linear(x, c.float(), qe), TypeError, "tokens_per_expert"),
    (lambda qe, x, c: grouped_linear(x, c, qe.expert(0)), TypeError, "QuantizedExperts"),
    (lambda qe, x, c: quantize_experts(torch.randn(2, 8, 32), [4], 32), ValueError, "one entry"),
    (lambda qe, x, c: quantize_experts(torch.randn(8, 32), 4, 32), ValueError, "3-d"),
    (lambda qe, x, c: quantize_experts(torch.randn(2, 8, 32), 5, 32), ValueError, "bits"),
])
def test_bad_input_is_refused_by_name(call, exc, match):
    qe = random_experts((4, 4, 4), n=8, k=32)
    with pytest.raises(exc, match=match):
        call(qe, torch.randn(3, 32), torch.tensor([1, 2, 0]))


# --- QRAExperts in transformers' own MoE blocks ---------------------------------------------
def _moe_config(family):
    import transformers as tf
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=96, num_local_experts=5, num_experts_per_tok=2,
                                **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64, num_experts=3,
                                 num_experts_per_tok=2, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=7,
                                 num_experts_per_tok=3, head_dim=16, **common)
    if family == "gpt_oss":  # transposed [E, in, out] weights, biases, its own clamped gate
        return tf.GptOssConfig(intermediate_size=64, num_local_experts=3, num_experts_per_tok=2,
                               head_dim=16, **common)
    raise KeyError(family)


def _experts_module(family, seed=0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_moe_config(family))
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():  # biases start at zero: random values exercise every term
        for p in experts.parameters():
            p.normal_(0, 0.2)
    return experts


@pytest.mark.parametrize("family", ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"))
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_qra_experts_computes_what_its_float_class_computes(family, bits):
    experts = _experts_module(family)
    q = QRAExperts.from_experts(experts, bits, 32, "rtn")
    dense = q.dequantize()  # the same class, the dequantized weights
    assert type(dense) is type(experts)
    e = q.num_experts
    tokens, top_k = 11, experts.config.num_experts_per_tok
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 64, generator=gen)
    idx = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(tokens)])
    idx[:, 0] = 0  # expert e-1 may get nothing; expert 0 gets every token
    w = torch.rand(tokens, top_k, generator=gen)
    for impl in ("eager", "grouped_mm", "batched_mm"):
        dense.config._experts_implementation = impl
        torch.testing.assert_close(q(x, idx, w), dense(x, idx, w), rtol=1e-4, atol=1e-4)
    err = (q(x, idx, w) - experts(x, idx, w)).norm() / experts(x, idx, w).norm()
    assert err < {2: 0.9, 3: 0.5, 4: 0.25, 8: 0.02}[bits]


def test_qra_experts_backward_for_the_hidden_states():
    experts = _experts_module("mixtral")
    q = QRAExperts.from_experts(experts, {"gate_up_proj": [2, 3, 4, 8, 4], "down_proj": 4}, 32)
    dense = q.dequantize()
    x = torch.randn(6, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 3], [3, 1], [1, 0]])  # expert 4: no tokens
    w = torch.rand(6, 2)
    q(x, idx, w).square().sum().backward()
    dense(x2, idx, w).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in q.parameters())


def test_qra_experts_compiles_without_graph_break():
    torch._dynamo.reset()
    q = QRAExperts.from_experts(_experts_module("qwen3_moe"), 4, 32)
    x = torch.randn(5, 64, requires_grad=True)
    idx = torch.tensor([[0, 1, 2], [6, 5, 4], [0, 2, 4], [1, 3, 5], [6, 0, 3]])
    w = torch.rand(5, 3)
    explanation = torch._dynamo.explain(q)(x, idx, w)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    compiled(x, idx, w).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    q(x, idx, w).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(compiled(x, idx, w), q(x, idx, w))


def test_memory_is_what_is_stored_and_what_the_allocation_counts():
    experts = _experts_module("qwen3_moe")
    bits = {"gate_up_proj": [2, 3, 4, 8, 2, 3, 4], "down_proj": 3}
    q = QRAExperts.from_experts(experts, bits, 32)
    stored = sum(t.numel() * t.element_size() for t in q.parameters())
    assert q.memory_bytes() == q.expected_memory_bytes() == stored
    alloc = qk.Allocation(layers={
        "gate_up_proj": {"bits": bits["gate_up_proj"], "shape": [7, 64, 64]},
        "down_proj": {"bits": 3, "shape": [7, 64, 32]}}, group_size=32)
    assert alloc.memory_bytes == q.memory_bytes()
    assert alloc.average_bits == pytest.approx((sum(bits["gate_up_proj"]) * 64 * 64
                                                + 3 * 7 * 64 * 32) / (7 * 64 * 96))


def test_dtype_moves_keep_scales_and_the_stand_in_follows():
    experts = _experts_module("gpt_oss")
    q = QRAExperts.from_experts(experts, 4, 32)
    assert q.gate_up_proj.shape == experts.gate_up_proj.shape  # [E, in, out]: transposed layout
    assert q.down_proj.dtype == torch.float32
    q = q.to(torch.bfloat16)
    assert q.down_proj.dtype == torch.bfloat16 and q.gate_up_proj_bias.dtype == torch.bfloat16
    assert q.gate_up_proj_scales.dtype == torch.float16
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    out = q(x, torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]]), torch.rand(4, 2))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with pytest.raises(AttributeError):
        q.up_proj  # gated: there is no up_proj


def test_state_dict_round_trip_into_an_empty_module():
    experts = _experts_module("mixtral")
    q = QRAExperts.from_experts(experts, {"gate_up_proj": [2, 3, 4, 8, 4], "down_proj": 8}, 32)
    empty = QRAExperts(experts, {"gate_up_proj": [2, 3, 4, 8, 4], "down_proj": 8}, 32)
    empty.load_state_dict(q.state_dict())
    x, idx, w = torch.randn(3, 64), torch.tensor([[0, 4], [1, 2], [3, 0]]), torch.rand(3, 2)
    assert torch.equal(empty(x, idx, w), q(x, idx, w))
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in q.state_dict())


def test_bad_experts_input():
    experts = _experts_module("mixtral")
    with pytest.raises(TypeError, match="experts module"):
        QRAExperts.from_experts(torch.nn.Linear(4, 4), 4)
    with pytest.raises(ValueError, match="one entry per expert"):
        QRAExperts.from_experts(experts, [4, 4], 32)
    with pytest.raises(ValueError, match="bits must map"):
        QRAExperts(experts, {"down_proj": 4}, 32)
    q = QRAExperts.from_experts(experts, 4, 32)
    with pytest.raises(ValueError, match="expert ids"):
        q(torch.randn(2, 64), torch.tensor([[0, 5], [1, 2]]), torch.rand(2, 2))
    with torch.no_grad():
        experts.down_proj[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        QRAExperts.from_experts(experts, 4, 32)


# --- whole models --------------------------------------------------------------------------
def _moe_model(family="qwen2_moe", layers=2):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = _moe_config(family)
    cfg.num_hidden_layers = layers
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = cfg.layer_types[:1] * layers
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_quantize_model_names_experts_modules_and_projections(caplog):
    model = _moe_model()
    shapes = expert_shapes(model)
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (3, 64, 64)
    assert shapes["model.layers.1.mlp.experts.down_proj"] == (3, 64, 32)
    assert "model.layers.0.mlp.experts.gate_up_proj" in qk.linear_shapes(model)
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
    alloc = {"group_size": 32, "layers": {
        "model.layers.0.mlp.experts": {"bits": 8},
        "model.layers.1.mlp.experts.gate_up_proj": {"bits": [8, 4, 8]},
        "model.layers.1.mlp.experts.down_proj": {"bits": 8},
        "model.layers.0.self_attn.q_proj": {"bits": 8, "rank": 4}}}
    with caplog.at_level(logging.INFO, logger="qra_kernels"):
        qk.quantize_model(model, alloc)
    assert "1 layers quantized and 4 expert groups" in caplog.text
    packed = qra_experts(model)
    assert sorted(packed) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert packed["model.layers.1.mlp.experts"].bits["gate_up_proj"] == [8, 4, 8]
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.05
    # The allocation the search would build counts exactly what is stored.
    full = qk.Allocation.uniform(model, 4, group_size=32)
    assert full.layers["model.layers.0.mlp.experts.gate_up_proj"]["shape"] == [3, 64, 64]
    full.validate(model)
    # A uniform rank goes to the linear layers; expert groups take no adapter.
    ranked = qk.Allocation.uniform(_moe_model(), 4, rank=8, group_size=32)
    ranks = {n: s["rank"] for n, s in ranked.layers.items()}
    assert ranks["model.layers.0.mlp.experts.down_proj"] == 0
    assert ranks["model.layers.0.self_attn.q_proj"] == 8


@pytest.mark.parametrize("layers,match", [
    ({"model.layers.0.mlp.experts": {"bits": 4, "rank": 8}}, "LoRA on routed experts"),
    ({"model.layers.0.mlp.experts.gate_up_proj": {"bits": 4}}, "quantized whole"),
    ({"model.layers.0.mlp.experts": {"bits": [4, 4]}}, "one entry per expert"),
    ({"model.layers.0.mlp.experts.down_proj": {"bits": 4},
      "model.layers.0.mlp.experts.gate_up_proj": {"bits": 6}}, "bits"),
])
def test_quantize_model_refuses_bad_expert_entries_and_changes_nothing(layers, match):
    model = _moe_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        qk.quantize_model(model, {"group_size": 32, "layers": layers})
    assert not qra_experts(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec,match", [
    ({"bits": 4, "rank": 2, "shape": [3, 8, 32]}, "no LoRA"),
    ({"bits": [4, 4], "shape": [3, 8, 32]}, "2 entries for 3 experts"),
    ({"bits": [4, 4], "shape": [8, 32]}, "list of bits is for expert groups"),
    ({"bits": [4, 5], "shape": [2, 8, 32]}, "bits must be one of"),
])
def test_allocation_refuses_bad_expert_groups(spec, match):
    with pytest.raises(ValueError, match=match):
        qk.Allocation(layers={"m.experts.down_proj": spec}, group_size=32)


def test_qra_config_skips_experts_whole_or_refuses_half():
    from qra_kernels.integrations.transformers import QraConfig
    model = _moe_model()
    plan = QraConfig(bits=4, group_size=32, modules_to_not_convert=["lm_head", "experts"]).plan(model)
    assert not any("experts" in n for n in plan) and "model.layers.0.mlp.shared_expert_gate" in plan
    with pytest.raises(ValueError, match="quantized whole"):
        QraConfig(bits=4, group_size=32, modules_to_not_convert=["lm_head", "down_proj"]).plan(model)
    with pytest.raises(ValueError, match="not an nn.Linear, Conv1D or expert group"):
        QraConfig(bits=4, layer_bits={"model.layers.0.mlp.experts.w9": 4}).plan(model)
    plan = QraConfig(bits=None, group_size=32,
                     layer_bits={"model.layers.1.mlp.experts": [2, 3, 4]}).plan(model)
    assert plan == {"model.layers.1.mlp.experts.gate_up_proj": [2, 3, 4],
                    "model.layers.1.mlp.experts.down_proj": [2, 3, 4]}


def test_summary_warns_when_experts_stay_float(caplog):
    from qra_kernels.integrations.transformers import QraConfig
    model = _moe_model("mixtral")
    with caplog.at_level(logging.INFO, logger="qra_kernels"):
        qk.quantize_model(model, QraConfig(bits=4, group_size=32,
                                           modules_to_not_convert=["lm_head", "experts"]))
    assert "stay float" in caplog.text and "experts.gate_up_proj" in caplog.text


def test_lora_on_experts_is_refused_out_loud():
    from qra_kernels.integrations import peft as qp
    model = _moe_model()
    qk.quantize_model(model, qk.Allocation.uniform(model, 4, group_size=32))
    cfg = qp.lora_config(model, r=4)
    assert not any("experts" in t for t in cfg.target_modules)
    with pytest.raises(ValueError, match="routed experts"):
        qp.lora_config(model, r=4, target_parameters=["mlp.experts.gate_up_proj"])
    # An allocation's rank-0 expert groups get no adapter; its linear layers get theirs.
    model = _moe_model()
    alloc = qk.Allocation.uniform(model, 4, rank=8, group_size=32)
    qk.quantize_model(model, alloc)
    cfg = qp.lora_config(model, allocation=alloc)
    assert cfg.r == 8 and not any("experts" in t for t in cfg.target_modules)
    assert "model.layers.0.self_attn.q_proj" in cfg.target_modules


def test_quantize_model_gptq_quantizes_experts_with_hqq_and_says_so(caplog):
    # method='gptq' (main's calibrated path) on a MoE model: the linear layers get GPTQ from
    # the calibration tokens, the routed experts hqq (per-expert Hessians are not measured
    # yet), with a warning naming them.
    model = _moe_model("mixtral")
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    with caplog.at_level(logging.INFO, logger="qra_kernels"):
        qk.quantize_model(model, qk.Allocation.uniform(model, 8, group_size=32),
                          method="gptq", calibration=ids)
    assert "does not handle routed experts" in caplog.text
    assert len(qra_experts(model)) == 2
    from qra_kernels.modules import qra_layers
    assert qra_layers(model)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.05


def test_gptq_export_refuses_packed_experts(tmp_path):
    pytest.importorskip("peft")
    from qra_kernels.exporters.gptq import NotExportableError, export_gptq
    model = _moe_model("mixtral")
    qk.quantize_model(model, qk.Allocation.uniform(model, 4, group_size=32))
    with pytest.raises(NotExportableError, match="routed experts"):
        export_gptq(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
