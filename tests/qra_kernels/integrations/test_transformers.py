"""The "qra" quantization method in transformers: config, quantize on load, packed save,
identical reload, dequantize, dtype casts, several model families, and the traps."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import qra_kernels as qk
from qra_kernels import QRALinear
from qra_kernels.integrations import transformers as qtf

from .conftest import FAMILIES, tiny_model

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,  # noqa: E402
                                          AUTO_QUANTIZER_MAPPING)

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)


# --- registration ------------------------------------------------------------------------
def test_import_registers_qra_and_stays_cheap():
    # In a fresh interpreter: importing qra_kernels must not import transformers, and the
    # registration must happen as soon as transformers' quantizer registry is imported.
    r = _run("import sys, qra_kernels\n"
             "assert 'transformers' not in sys.modules, 'import qra_kernels imported transformers'\n"
             "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q, "
             "AUTO_QUANTIZATION_CONFIG_MAPPING as C\n"
             "print(Q['qra'].__name__, C['qra'].__name__, qra_kernels.QraConfig.__name__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["QraHfQuantizer", "QraConfig", "QraConfig"]


def test_registration_when_transformers_was_imported_first():
    r = _run("from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q\n"
             "assert 'qra' not in Q\n"
             "import qra_kernels\n"
             "print(Q['qra'].__name__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "QraHfQuantizer"


def test_registration_is_idempotent_and_survives_reload():
    qtf.register()
    qtf.register()
    reloaded = importlib.reload(qtf)
    try:
        assert AUTO_QUANTIZER_MAPPING["qra"] is reloaded.QraHfQuantizer
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["qra"] is reloaded.QraConfig
    finally:
        importlib.reload(qtf)  # leave the module's classes what the rest of the tests use


# --- QraConfig -----------------------------------------------------------------------------
def test_config_to_dict_round_trip():
    cfg = qk.QraConfig(bits=3, group_size=32, layer_bits={"model.layers.0.mlp.up_proj": 8},
                       modules_to_not_convert=["lm_head", "gate"], method="rtn")
    d = cfg.to_dict()
    assert d["quant_method"] == "qra"
    json.dumps(d)  # must be JSON-serialisable for config.json
    again = qk.QraConfig.from_dict(d)
    assert again.to_dict() == d
    assert qk.QraConfig().modules_to_not_convert == ["lm_head"]


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(bits=5), ValueError, "bits"),
    (dict(group_size=48), ValueError, "group_size"),
    (dict(layer_bits={"a": 7}), ValueError, "layer_bits"),
    (dict(layer_bits=[("a", 4)]), TypeError, "layer_bits"),
    (dict(method="awq"), ValueError, "method"),
    (dict(scale_dtype="float32"), ValueError, "scale_dtype"),
    (dict(modules_to_not_convert="lm_head"), TypeError, "modules_to_not_convert"),
    (dict(bits=None), ValueError, "layer_bits"),
    (dict(bitz=4), TypeError, "bitz"),
])
def test_config_rejects_bad_input(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        qk.QraConfig(**kwargs)


def test_config_from_allocation():
    from qra_search import Allocation
    model = tiny_model()
    alloc = Allocation.uniform(model, bits=4, rank=8, group_size=32)
    alloc.layers["model.layers.1.self_attn.v_proj"]["bits"] = 2
    cfg = qk.QraConfig.from_allocation(alloc)
    assert cfg.group_size == 32 and cfg.bits is None
    plan = cfg.plan(model)
    assert plan == {n: s["bits"] for n, s in alloc.layers.items()}
    with pytest.raises(ValueError, match="not an nn.Linear"):
        qk.QraConfig(layer_bits={"model.layers.0.mlp": 4}, group_size=32).plan(model)


# --- quantize on load, save, reload ----------------------------------------------------------
def test_quantize_on_load_with_gptq_and_calibration(tmp_path):
    """QraConfig(method="gptq", calibration=ids): Hessians measured on load, the result
    saved and reloaded identical; the calibration itself is not saved with the config."""
    model = tiny_model(FAMILIES[0])
    model.save_pretrained(tmp_path / "float")
    ids = torch.randint(0, model.config.vocab_size, (6, 16),
                        generator=torch.Generator().manual_seed(4))
    cfg = qk.QraConfig(bits=3, group_size=32, method="gptq", calibration=ids)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    assert all(m.bits == 3 for m in q.modules() if isinstance(m, QRALinear))
    q.save_pretrained(tmp_path / "packed")
    saved = json.load(open(tmp_path / "packed" / "config.json"))["quantization_config"]
    assert saved["method"] == "gptq" and "calibration" not in saved
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, q(IDS).logits)
    with pytest.raises(ValueError, match="calibration"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "float", quantization_config=qk.QraConfig(bits=3, method="gptq"))



@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_on_load_save_reload_identical(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "float")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    special = {linears[0]: 2, linears[-1]: 8, linears[len(linears) // 2]: 3}
    cfg = qk.QraConfig(bits=4, group_size=32, layer_bits=special)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QRALinear)}
    assert sorted(layers) == sorted(linears)
    for n, m in layers.items():
        assert m.bits == special.get(n, 4), n
        assert m.qweight.dtype == torch.int32 and not m.qweight.requires_grad
    assert type(q.lm_head) is nn.Linear  # not converted by default
    assert q.is_quantized and q.hf_quantizer.is_trainable
    assert q.hf_quantizer.is_serializable()
    with torch.no_grad():
        ref = model(IDS).logits
        y = q(IDS).logits
    # 2/3/4/8-bit HQQ on a random init: close to, not equal to, the float model.
    assert 0 < (y - ref).abs().max() < 0.5 * ref.abs().max()

    q.save_pretrained(tmp_path / "packed")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "packed" / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["qra_layers"])
        packed = f.get_tensor(f"{linears[0]}.weight")
    assert {n: v["bits"] for n, v in meta.items()} == {n: m.bits for n, m in layers.items()}
    assert meta[linears[0]]["shape"] == [layers[linears[0]].out_features,
                                         layers[linears[0]].in_features]
    assert torch.equal(packed, layers[linears[0]].qweight)
    saved_cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert saved_cfg["quantization_config"]["quant_method"] == "qra"
    assert saved_cfg["quantization_config"]["layer_bits"][linears[0]] == 2

    r = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    r_layers = {n: m for n, m in r.named_modules() if isinstance(m, QRALinear)}
    assert sorted(r_layers) == sorted(layers)
    for n, m in layers.items():
        for t in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(m, t), getattr(r_layers[n], t)), (n, t)
    with torch.no_grad():
        assert torch.equal(r(IDS).logits, y)


def test_no_float_weight_is_materialised_on_prequantized_load(tmp_path, float_checkpoint):
    path, _ = float_checkpoint
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.QraConfig(
        bits=2, group_size=32))
    q.save_pretrained(tmp_path / "packed")
    size = os.path.getsize(tmp_path / "packed" / "model.safetensors")
    assert size < os.path.getsize(os.path.join(path, "model.safetensors"))
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    for m in r.modules():
        if isinstance(m, QRALinear):
            assert set(m._parameters) >= {"qweight", "scales", "zeros"}
            assert "weight" not in m._parameters


def test_model_to_dtype_keeps_scales(float_checkpoint):
    path, _ = float_checkpoint
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.QraConfig(
        bits=4, group_size=32))
    layer = q.model.layers[0].self_attn.q_proj
    scales, zeros = layer.scales.clone(), layer.zeros.clone()
    with torch.no_grad():
        y32 = q(IDS).logits
    q.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert torch.equal(layer.zeros, zeros) and layer.qweight.dtype == torch.int32
    assert q.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        y16 = q(IDS).logits
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)
    q.model.layers[0].half()  # (transformers forbids .half() on a quantized *model*)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)


def test_dequantize(float_checkpoint):
    path, _ = float_checkpoint
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.QraConfig(
        bits=4, group_size=32))
    with torch.no_grad():
        y = q(IDS).logits
    d = q.dequantize()
    assert not any(isinstance(m, QRALinear) for m in d.modules())
    assert getattr(d.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(d(IDS).logits, y, atol=1e-4, rtol=1e-4)


def test_modules_to_not_convert_and_bad_layer_bits(float_checkpoint):
    path, _ = float_checkpoint
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.QraConfig(
        bits=4, group_size=32, modules_to_not_convert=["lm_head", "mlp"]))
    assert type(q.model.layers[0].mlp.up_proj) is nn.Linear
    assert isinstance(q.model.layers[0].self_attn.o_proj, QRALinear)
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.QraConfig(
            bits=4, group_size=32, layer_bits={"model.layers.9.mlp.up_proj": 4}))


# --- the traps ---------------------------------------------------------------------------------
@pytest.fixture
def packed_checkpoint(tmp_path, float_checkpoint):
    path, _ = float_checkpoint
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.QraConfig(
        bits=4, group_size=32))
    q.save_pretrained(tmp_path / "packed")
    return str(tmp_path / "packed")


LOAD = ("import transformers\ntransformers.logging.set_verbosity_error()\n"
        "from transformers import AutoModelForCausalLM\n"
        "AutoModelForCausalLM.from_pretrained({!r})\nprint('LOADED')")


def test_trap_loading_without_importing_qra_fails_loudly(packed_checkpoint):
    # transformers only warns "Unknown quantization type, got qra ... we will skip the
    # quantization" and carries on; the packed codes, stored under each layer's "weight"
    # key, then do not fit the float Linear and the load fails instead of initialising
    # the projections at random.
    r = _run(LOAD.format(packed_checkpoint))
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "mismatch" in r.stderr.lower()
    ok = _run("import qra_kernels\n" + LOAD.format(packed_checkpoint))
    assert ok.returncode == 0 and "LOADED" in ok.stdout, ok.stderr


def test_trap_stripped_quantization_config_fails_loudly(packed_checkpoint):
    cfg_path = os.path.join(packed_checkpoint, "config.json")
    cfg = json.load(open(cfg_path))
    del cfg["quantization_config"]
    json.dump(cfg, open(cfg_path, "w"))
    r = _run("import qra_kernels\n" + LOAD.format(packed_checkpoint))
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "mismatch" in r.stderr.lower()


def test_quantizer_rejects_disk_offload():
    q = qtf.QraHfQuantizer(qk.QraConfig())
    with pytest.raises(ValueError, match="device_map"):
        q.validate_environment(device_map={"model": "disk"})
    with pytest.raises(TypeError, match="QraConfig"):
        qtf.QraHfQuantizer(object())
