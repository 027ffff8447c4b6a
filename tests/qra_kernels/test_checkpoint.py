"""The one checkpoint writer and what a directory holds: save_quantized → from_pretrained
with identical outputs; qra 0.1's layout refused loudly, then upgraded bit for bit."""
import json
import os

import pytest
import torch

import qra_kernels as qk
from qra_kernels.checkpoint import (LegacyCheckpointError, inspect_checkpoint,
                                    upgrade_checkpoint)
from qra_kernels.modules import qra_layers


def tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def mixed(model, rank=4):
    alloc = qk.Allocation.uniform(model, 4, rank, group_size=32)
    for i, spec in enumerate(alloc.layers.values()):
        spec["bits"] = (2, 3, 4, 8)[i % 4]
    return alloc


def test_save_quantized_reloads_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM
    model = tiny()
    alloc = mixed(model)
    qk.quantize_model(model, alloc, method="rtn", lora_init="svd")
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
    info = qk.save_quantized(model, tmp_path / "m", allocation=alloc)
    assert info["linear_bytes"] == alloc.memory_bytes
    assert inspect_checkpoint(tmp_path / "m")["kind"] == "qra"
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == "qra"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert set(qra_layers(back)) == set(alloc.layers)
    with torch.no_grad():
        got = back(ids).logits
    assert torch.equal(got, want)
    for n, m in qra_layers(back).items():
        assert (m.bits, m.rank) == (alloc.layers[n]["bits"], alloc.layers[n]["rank"])


def _legacy_dir(path, model, alloc):
    """What qra 0.1's `qra quantize` wrote: the whole state dict (packed `qweight` keys),
    allocation.json and config.json without a quantization_config."""
    from safetensors.torch import save_model
    os.makedirs(path)
    save_model(model, os.path.join(path, "model.safetensors"))
    alloc.save(os.path.join(path, "allocation.json"))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(model.config.to_json_string())


def test_legacy_layout_is_refused_then_upgraded(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    model = tiny(1)
    alloc = mixed(model)
    qk.quantize_model(model, alloc, method="rtn", lora_init="svd")
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        want = model(ids).logits
    legacy = str(tmp_path / "legacy")
    _legacy_dir(legacy, model, alloc)
    assert inspect_checkpoint(legacy)["kind"] == "qra-legacy"
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):
        with pytest.raises(LegacyCheckpointError, match="upgrade_checkpoint"):
            cls.from_pretrained(legacy)
    new = upgrade_checkpoint(legacy, tmp_path / "new")
    back = AutoModelForCausalLM.from_pretrained(new)
    assert set(qra_layers(back)) == set(alloc.layers)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)
    with pytest.raises(ValueError, match="not a qra 0.1"):
        upgrade_checkpoint(new, tmp_path / "again")


def test_inspect_checkpoint_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        inspect_checkpoint(tmp_path / "f.bin")
    (tmp_path / "x.gguf").write_bytes(b"NOPE")
    with pytest.raises(ValueError, match="magic"):
        inspect_checkpoint(tmp_path / "x.gguf")
    d = tmp_path / "d"
    d.mkdir()
    info = inspect_checkpoint(d)
    assert len(info["missing"]) == 3 and "config.json" in info["missing"]


def test_save_quantized_bad_input(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        qk.save_quantized(torch.nn.Linear(4, 4), tmp_path)
    with pytest.raises(ValueError, match="no QRALinear"):
        qk.save_quantized(tiny(), tmp_path / "x")
