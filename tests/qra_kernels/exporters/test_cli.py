"""``qra export``: a qra checkpoint directory (with a fine-tune's PEFT adapter) to GPTQ and
GGUF, and every bad argument refused with a ValueError naming it before any model loads."""
import argparse
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import qra_kernels as qk
from qra_kernels.exporters import cli

from .conftest import IDS, randomize_adapters, tiny_llama, tiny_tokenizer


def parse(*argv):
    return cli.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A qra checkpoint (quantize-on-load, saved, tokenizer beside it) and a PEFT adapter
    saved after a (simulated) fine-tune on it; returns the paths and the fine-tuned logits."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from qra_kernels.integrations import peft as qp
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "float")
    cfg = qk.QraConfig(bits=4, group_size=32, method="rtn",
                       layer_bits={"model.layers.0.mlp.down_proj": 8,
                                   "model.layers.1.self_attn.o_proj": 2})
    model = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=cfg)
    model.save_pretrained(root / "qra")
    tiny_tokenizer().save_pretrained(root / "qra")
    pm = randomize_adapters(get_peft_model(model, qp.lora_config(model, r=4)))
    pm.save_pretrained(root / "adapter")
    with torch.no_grad():
        logits = pm.eval()(IDS).logits
    return str(root / "qra"), str(root / "adapter"), logits


def test_gptq_export_from_a_checkpoint_with_an_adapter(checkpoint, tmp_path, capsys):
    qra, adapter, logits = checkpoint
    out = str(tmp_path / "gptq")
    assert cli.main_from_args(parse("--format", "gptq", "--model", qra, "--out", out,
                                    "--adapter", adapter, "--dtype", "float32")) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.load(open(os.path.join(out, "qra_export.json")))
    assert report["layers"]["model.layers.0.mlp.down_proj"] == {"bits": 8, "group_size": 32}
    assert report["layers"]["model.layers.1.self_attn.o_proj"]["bits"] == 2
    assert set(report["adapter"]["ranks"].values()) == {4}
    for f in ("model.safetensors", "quantize_config.json", "tokenizer.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert os.path.exists(os.path.join(out, f)), f
    # The rebuilt model (tests' own unpacking) gives the fine-tuned logits.
    from .test_gptq import _float_copy_from_export
    ref, _, _ = _float_copy_from_export(out)
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, logits, rtol=1e-4, atol=1e-4)


def test_gguf_export_from_a_checkpoint(checkpoint, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    qra, adapter, _ = checkpoint
    out = str(tmp_path / "m.gguf")
    assert cli.main_from_args(parse("--format", "gguf", "--model", qra, "--out", out,
                                    "--adapter", adapter, "--gguf-type", "8=q5_1")) == 0
    assert "re-quantization weight error" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q5_1" and types["blk.1.attn_output.weight"] == "Q4_0"
    assert types["blk.0.attn_q.weight"] == "Q4_1"


def test_bad_arguments_are_refused_before_loading(checkpoint, tmp_path, monkeypatch):
    qra, adapter, _ = checkpoint

    def no_load(args):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "_load", no_load)
    tiny_llama().save_pretrained(tmp_path / "float")
    (tmp_path / "file").write_text("x")
    g, q = "gptq", qra
    cases = [
        (("--format", g, "--model", str(tmp_path / "nope"), "--out", "o"),
         "--model: .* not a directory"),
        (("--format", g, "--model", str(tmp_path), "--out", "o"), "--model: .* no config.json"),
        (("--format", g, "--model", str(tmp_path / "float"), "--out", "o"), "not a qra checkpoint"),
        (("--format", g, "--model", q, "--out", "o", "--adapter", str(tmp_path)), "--adapter:"),
        (("--format", g, "--model", q, "--out", "o", "--gguf-type", "3=Q4_0"),
         "--gguf-type applies"),
        (("--format", "gguf", "--model", q, "--out", "o.gguf", "--dtype", "float32"),
         "--dtype applies"),
        (("--format", g, "--model", q, "--out", str(tmp_path / "file")), "--out: .* is a file"),
        (("--format", "gguf", "--model", q, "--out", "o.bin"), r"--out: .* must end in \.gguf"),
        (("--format", "gguf", "--model", q, "--out", "o.gguf", "--gguf-type", "3"),
         "--gguf-type: expected BITS=TYPE"),
        (("--format", "gguf", "--model", q, "--out", "o.gguf", "--gguf-type", "5=Q5_0"),
         "--gguf-type: bits"),
        (("--format", "gguf", "--model", q, "--out", "o.gguf", "--gguf-type", "3=Q3_K"),
         "cannot be produced"),
        (("--format", "gguf", "--model", q, "--out", "o.gguf", "--float-type", "Q4_0"),
         "--float-type"),
        (("--format", "gguf", "--model", q, "--out", "o.gguf", "--vocab-from", "x.gguf"),
         "--vocab-from"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            cli.main_from_args(parse(*argv))


def test_standalone_entry_point_exits_with_a_one_line_reason(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--format", "gptq", "--model", str(tmp_path / "nope"), "--out", "o"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--model" in err
