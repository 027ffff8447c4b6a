"""QRALinear and quantize_model: construction, PEFT init, memory accounting, dtype moves,
torch.compile without graph breaks, state_dict round trip, bad input."""
import math

import pytest
import torch
from torch import nn

import qra_kernels as qk
from qra_kernels.format import lora_nbytes, packed_nbytes
from qra_kernels.modules import qra_layers


def linear(k=128, n=40, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3)
    return lin


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("rank", (0, 7, 16))
def test_from_linear_matches_dequantized_linear(bits, rank):
    lin = linear()
    layer = qk.QRALinear.from_linear(lin, bits=bits, group_size=32, rank=rank, method="rtn")
    assert (layer.bits, layer.group_size, layer.rank) == (bits, 32, rank)
    x = torch.randn(2, 3, 128)
    # B = 0 at init, so the adapter adds nothing: the output is the dequantized linear's.
    dense = layer.dequantize()
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-4)
    # Quantization error is bounded: closer to the float layer at more bits.
    err = (layer(x) - lin(x)).abs().mean() / lin(x).abs().mean()
    assert err < {2: 0.8, 3: 0.4, 4: 0.2, 8: 0.02}[bits]


def test_peft_initialisation_and_scaling():
    layer = qk.QRALinear.from_linear(linear(), bits=4, rank=8, alpha=32)
    assert layer.scaling == 4.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(128)  # kaiming_uniform(a=√5) on fan_in=128 → U(-1/√fan_in, +)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert not any(p.requires_grad for p in (layer.qweight, layer.scales, layer.zeros))
    assert qk.QRALinear.from_linear(linear(), rank=8).scaling == 1.0  # alpha=None → rank
    assert qk.QRALinear.from_linear(linear(), rank=0).scaling == 0.0


def test_trainable_lora_changes_output_and_gets_gradients():
    layer = qk.QRALinear.from_linear(linear(), bits=3, rank=4)
    x = torch.randn(5, 128)
    y0 = layer(x).detach()
    layer(x).square().mean().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.lora_A.grad is not None  # zero at init (B = 0), but computed
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.allclose(layer(x), y0)
    merged = layer.dequantize(merge_lora=True)
    torch.testing.assert_close(layer(x), merged(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group_size,rank,scale_dtype,lora_dtype", [
    (2, 32, 0, torch.float16, torch.float32), (3, 64, 7, torch.bfloat16, torch.float32),
    (4, 128, 16, torch.float16, torch.bfloat16), (8, 64, 64, torch.bfloat16, torch.bfloat16)])
def test_memory_bytes_is_the_formula(bits, group_size, rank, scale_dtype, lora_dtype):
    layer = qk.QRALinear.from_linear(linear(k=256, n=72), bits=bits, group_size=group_size,
                                     rank=rank, scale_dtype=scale_dtype, lora_dtype=lora_dtype)
    es, el = torch.finfo(scale_dtype).bits // 8, torch.finfo(lora_dtype).bits // 8
    want = packed_nbytes(72, 256, bits, group_size, es) + lora_nbytes(72, 256, rank, el)
    # The formula written out (docs/FORMAT.md) as an independent check of packed_nbytes.
    assert want == 72 * 256 * bits // 8 + 2 * es * 72 * 256 // group_size + el * rank * (72 + 256)
    assert layer.memory_bytes() == want == layer.expected_memory_bytes()
    assert layer.memory_bytes() == layer.quantized_weight.nbytes + el * rank * (72 + 256)


def test_to_dtype_keeps_scales_and_zeros():
    layer = qk.QRALinear.from_linear(linear(), bits=4, rank=4)
    scales, zeros, qweight = layer.scales.clone(), layer.zeros.clone(), layer.qweight.clone()
    x = torch.randn(3, 128)
    y = layer(x)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(),
                 lambda m: m.double()):
        cast(layer)
        assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
        assert torch.equal(layer.zeros, zeros) and torch.equal(layer.qweight, qweight)
    layer.float()
    # Only bias and adapter went through bf16 and back (~3 significant digits); the base is
    # bit-identical (checked above), so the output stays within bf16 rounding of the bias.
    torch.testing.assert_close(layer(x), y, rtol=1e-2, atol=1e-3)
    layer.to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16  # the adapter follows the cast
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_state_dict_round_trip():
    layer = qk.QRALinear.from_linear(linear(), bits=3, group_size=64, rank=5)
    with torch.no_grad():
        layer.lora_B.normal_()
    sd = layer.state_dict()
    assert sd["qweight"].dtype == torch.int32
    fresh = qk.QRALinear(128, 40, bits=3, group_size=64, rank=5, bias=True)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))


def test_compile_fullgraph_forward_backward_no_graph_break():
    torch._dynamo.reset()
    layer = qk.QRALinear.from_linear(linear(), bits=4, rank=8)
    x = torch.randn(3, 128, requires_grad=True)

    def step(x):
        return layer(x).square().sum()

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    gx, ga = x.grad.clone(), layer.lora_A.grad.clone()
    x.grad = None
    layer.lora_A.grad = None
    step(x).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(ga, layer.lora_A.grad)


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    layer = qk.QRALinear.from_linear(linear(), bits=2, rank=3)
    x = torch.randn(2, 128, requires_grad=True)
    compiled = torch.compile(lambda t: layer(t).sum(), fullgraph=True)
    compiled(x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.block = nn.Sequential(nn.Linear(96, 128, bias=False), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.block(self.up(x)))


def test_quantize_model_follows_allocation():
    torch.manual_seed(0)
    model = Tiny()
    alloc = {"group_size": 32, "layers": {"up": {"bits": 8, "rank": 4, "alpha": 8},
                                          "block.0": {"bits": 3, "rank": 0}}}
    x = torch.randn(2, 64)
    y = model(x)
    qk.quantize_model(model, alloc, method="rtn")
    layers = qra_layers(model)
    assert set(layers) == {"up", "block.0"} and isinstance(model.head, nn.Linear)
    assert (layers["up"].bits, layers["up"].rank, layers["up"].scaling) == (8, 4, 2.0)
    assert (layers["block.0"].bits, layers["block.0"].rank) == (3, 0)
    assert (model(x) - y).abs().max() < 0.2 * y.abs().max()


@pytest.mark.parametrize("alloc,exc,match", [
    ({"group_size": 32, "layers": {"nope": {"bits": 4}}}, ValueError, "nope"),
    ({"group_size": 32, "layers": {"block": {"bits": 4}}}, ValueError, "not an nn.Linear"),
    ({"group_size": 32, "layers": {"up": {"rank": 4}}}, ValueError, "bits"),
    ({"group_size": 32, "layers": {"up": {"bits": 5}}}, ValueError, "bits"),
    ({"group_size": 32, "layers": {"up": {"bits": 4, "rank": -1}}}, ValueError, "rank"),
    ({"group_size": 32, "layers": {"up": {"bits": 4, "rank": 2.5}}}, TypeError, "rank"),
    ({"group_size": 48, "layers": {"up": {"bits": 4}}}, ValueError, "group_size"),
    ({"group_size": 128, "layers": {"up": {"bits": 4}}}, ValueError, "does not divide"),
    ({"group_size": 32}, TypeError, "layers"),
])
def test_quantize_model_bad_allocation_leaves_model_untouched(alloc, exc, match):
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # A valid first entry: the check must happen before anything is replaced.
    if "layers" in alloc and "up" not in alloc["layers"]:
        alloc["layers"] = {"head": {"bits": 4}, **alloc["layers"]}
    with pytest.raises(exc, match=match):
        qk.quantize_model(model, alloc)
    assert not qra_layers(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bits=5), ValueError, "bits"), (dict(group_size=16), ValueError, "group_size"),
    (dict(rank=-2), ValueError, "rank"), (dict(rank=True), TypeError, "rank"),
    (dict(alpha="x"), TypeError, "alpha"), (dict(scale_dtype=torch.float32), TypeError,
                                            "scale_dtype"),
    (dict(lora_dtype=torch.int8), TypeError, "lora_dtype"),
])
def test_constructor_bad_input(kwargs, exc, match):
    args = dict(in_features=64, out_features=32)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        qk.QRALinear(**args)


def test_from_linear_and_forward_bad_input():
    with pytest.raises(TypeError, match="linear"):
        qk.QRALinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="does not divide"):
        qk.QRALinear.from_linear(nn.Linear(100, 8), group_size=64)
    layer = qk.QRALinear.from_linear(nn.Linear(100, 8), group_size=64, pad=True)
    assert layer(torch.randn(2, 100)).shape == (2, 8)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 128))
    with pytest.raises(TypeError, match="x must be"):
        layer(torch.ones(2, 100, dtype=torch.int64))
    bad = nn.Linear(64, 8)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        qk.QRALinear.from_linear(bad)


def test_weight_stands_in_for_nn_linear():
    """Modeling code reads `.weight` (dtype, device, shape); it is value-less and follows
    module.to(dtype)."""
    layer = qk.QRALinear.from_linear(linear(), bits=4, rank=2)
    w = layer.weight
    assert w.shape == (40, 128) and w.dtype == torch.float32 and w.device == layer.qweight.device
    assert w.untyped_storage().nbytes() <= 8  # no memory behind the view
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.scales.dtype == torch.float16
    assert "weight" not in layer.state_dict() and "weight" not in dict(layer.named_parameters())
    bf = nn.Linear(128, 40).to(torch.bfloat16)
    assert qk.QRALinear.from_linear(bf, bits=8).weight.dtype == torch.bfloat16


def test_conv1d_is_quantized_as_the_linear_it_is():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs; weight [64, 48]
    nn.init.normal_(conv.weight, std=0.1)
    nn.init.normal_(conv.bias, std=0.1)
    model = nn.Sequential(conv)
    x = torch.randn(3, 64)
    y = model(x)
    qk.quantize_model(model, {"group_size": 32, "layers": {"0": {"bits": 8, "rank": 3}}},
                      method="rtn", lora_init="svd")
    layer = model[0]
    assert isinstance(layer, qk.QRALinear) and (layer.in_features, layer.out_features) == (64, 48)
    torch.testing.assert_close(model(x), y, rtol=0.02, atol=0.02)


def test_svd_init_adapter_is_the_error_best_approximation():
    lin = linear()
    layer = qk.QRALinear.from_linear(lin, bits=2, group_size=32, rank=8, alpha=16,
                                     method="rtn", lora_init="svd")
    err = lin.weight.detach() - layer.quantized_weight.dequantize()
    approx = (layer.scaling * layer.lora_B @ layer.lora_A).detach()
    s = torch.linalg.svdvals(err)
    assert float(torch.linalg.matrix_norm(err - approx)) ** 2 == pytest.approx(
        float((s[8:] ** 2).sum()), rel=1e-3)
    with pytest.raises(ValueError, match="lora_init"):
        qk.QRALinear.from_linear(lin, rank=2, lora_init="loftq")


def test_quantize_model_says_what_it_did(caplog):
    import logging
    model = Tiny()
    with caplog.at_level(logging.INFO, logger="qra_kernels"):
        qk.quantize_model(model, {"group_size": 32, "layers": {"up": {"bits": 4}}})
    text = caplog.text
    assert "1 layers quantized" in text
    assert "stay float" in text and "head" in text  # most weights left float: a warning
    with pytest.raises(ValueError, match="quantizes no layer"):
        qk.quantize_model(Tiny(), {"group_size": 32, "layers": {}})


def test_quantize_model_with_gptq_needs_calibration_and_beats_rtn():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))

    def fresh():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()
    ref = fresh()
    with torch.no_grad():
        want = ref(ids).logits.log_softmax(-1)
    alloc = qk.Allocation.uniform(ref, 3, 0, group_size=32)
    with pytest.raises(ValueError, match="calibration"):
        qk.quantize_model(fresh(), alloc, method="gptq")
    with pytest.raises(ValueError, match="only used by method='gptq'"):
        qk.quantize_model(fresh(), alloc, method="rtn", calibration=ids)
    kl = {}
    for method in ("rtn", "gptq"):
        m = qk.quantize_model(fresh(), alloc, method=method,
                              calibration=ids if method == "gptq" else None)
        assert len(qra_layers(m)) == 14
        with torch.no_grad():
            got = m(ids).logits.log_softmax(-1)
        kl[method] = float(torch.nn.functional.kl_div(got, want, log_target=True,
                                                      reduction="batchmean"))
    assert kl["gptq"] < kl["rtn"]
