"""GPTQ export: the packing against an unpacking written here from the format's spec, the
dynamic per-module overrides resolved by the loaders' matching rule, the PEFT adapter
(qra slot + PEFT adapters + zero-point remainders), refusals, and — where gptqmodel is
installed (the ``export`` extra) — a real load with its torch kernel.

CI without gptqmodel still runs everything but the ``gptqmodel`` tests: the exported
tensors are checked against ``independent_dequantize`` below, and a float model rebuilt from
the exported files alone (codes, zeros, scales, adapter) must give the fine-tuned qra model's
logits.
"""
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import qra_kernels as qk
from qra_kernels import QRALinear
from qra_kernels.exporters import NotExportableError, export_gptq, to_gptq
from qra_kernels.exporters.gptq import pack_stream, quantize_config, unpack_stream
from qra_kernels.integrations import peft as qp

from .conftest import (IDS, linear_names, mixed_allocation, quantized, randomize_adapters,
                       tiny_llama, tiny_tokenizer)


# --- the spec, written independently of the exporter ---------------------------------------
def spec_unpack(words: torch.Tensor, bits: int, count: int) -> np.ndarray:
    """GPTQ layout, field by field: code i of a column sits at bit i·bits of the column's
    little-endian stream of 32-bit words (a 3-bit code may straddle two words)."""
    u = words.numpy().astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((count, u.shape[1]), dtype=np.int64)
    for i in range(count):
        word, off = divmod(i * bits, 32)
        v = u[word] >> off
        if off + bits > 32:
            v = v | (u[word + 1] << (32 - off))
        out[i] = v & ((1 << bits) - 1)
    return out


def independent_dequantize(sd, name, bits, group_size, fmt="gptq_v2"):
    qweight, qzeros, scales, g_idx = (sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales",
                                                                  "g_idx"))
    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32
    assert scales.dtype == torch.float16 and tuple(scales.shape) == (k // group_size, n)
    assert torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // group_size)
    q = spec_unpack(qweight, bits, k)                        # [K, N]
    z = spec_unpack(qzeros.t().contiguous(), bits, n).T      # [G, N]
    z = z + (1 if fmt == "gptq" else 0)
    w = (q - z[g_idx.numpy()]) * scales.float().numpy()[g_idx.numpy()]
    return torch.from_numpy(w.T.astype(np.float32))          # [N, K]


def resolve(dynamic, name, default):
    """The matching rule of GPTQModel, vLLM and SGLang: the first pattern that
    ``re.match``es the module name wins; ``-:`` means not quantized."""
    for pattern, override in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return (override.get("bits", default[0]), override.get("group_size", default[1]))
    return default


# --- packing ---------------------------------------------------------------------------------
def test_three_bit_codes_straddle_words_as_gptq_packs_them():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b100  # bits 30, 31 of word 0 and bit 0 of word 1: only the high bit is set
    assert pack_stream(codes, 3, 0)[:, 0].tolist() == [0, 1, 0]
    codes[10], codes[21] = 0, 0b110  # bit 63 (word 1) is 0, bits 64-65 are word 2's bits 0-1
    assert pack_stream(codes, 3, 0)[:, 0].tolist() == [0, 0, 3]
    codes[21], codes[0], codes[31] = 0, 0b101, 0b111  # code 31: bits 93-95 of word 2
    assert pack_stream(codes, 3, 0)[:, 0].tolist() == [5, 0, (0b111 << 29) - 2**32]  # int32 bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_stream_matches_the_spec_on_both_dimensions(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (64, 96), generator=g)
    along_k = pack_stream(codes, bits, 0)
    assert along_k.shape == (64 * bits // 32, 96) and along_k.dtype == torch.int32
    assert np.array_equal(spec_unpack(along_k, bits, 64), codes.numpy())
    along_n = pack_stream(codes, bits, 1)
    assert along_n.shape == (64, 96 * bits // 32)
    assert np.array_equal(spec_unpack(along_n.t().contiguous(), bits, 96).T, codes.numpy())
    assert torch.equal(unpack_stream(along_k, bits, 0), codes)
    assert torch.equal(unpack_stream(along_n, bits, 1), codes)


def test_four_bit_words_are_the_usual_nibbles():
    codes = torch.arange(8, dtype=torch.int64).view(8, 1)
    assert pack_stream(codes, 4, 0).item() == 0x76543210


# --- one layer -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_layer_repack_is_exact(bits, group_size):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(bits + group_size))
    qw = qk.quantize_weight(w, bits, group_size, "rtn")
    tensors, remainder = to_gptq(qw, "x")
    assert remainder is None
    sd = {f"x.{k}": v for k, v in tensors.items()}
    assert torch.equal(independent_dequantize(sd, "x", bits, group_size), qw.dequantize())


def test_v1_layout_stores_zero_minus_one_and_refuses_a_zero_of_zero():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    w[0, :32] = torch.linspace(0.0, 1.0, 32)  # a group whose minimum is 0: zero point 0
    qw = qk.quantize_weight(w, 4, 32, "rtn")
    assert float(qw.zeros.min()) == 0.0
    with pytest.raises(NotExportableError, match=r"x: 1 zero points outside \[1, 15\]"):
        to_gptq(qw, "x", checkpoint_format="gptq")
    # Without that group, v1 is exact too.
    qw1 = qk.quantize_weight(torch.randn(32, 64, generator=torch.Generator().manual_seed(5)),
                             4, 32, "rtn")
    assert float(qw1.zeros.min()) >= 1.0
    tensors, _ = to_gptq(qw1, "x", checkpoint_format="gptq")
    sd = {f"x.{k}": v for k, v in tensors.items()}
    assert torch.equal(independent_dequantize(sd, "x", 4, 32, fmt="gptq"), qw1.dequantize())


def test_fractional_zeros_are_refused_or_folded_exactly():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    qw = qk.quantize_weight(w, 3, 32, "hqq")
    assert bool((qw.zeros.float() != qw.zeros.float().round()).any())
    with pytest.raises(NotExportableError, match=r"^layers\.7\.mlp: \d+ non-integer zero points"):
        to_gptq(qw, "layers.7.mlp")
    tensors, rem = to_gptq(qw, "x", fractional_zeros="fold")
    assert rem is not None and rem.scaling == 1.0 and 1 <= rem.rank <= 4
    base = independent_dequantize({f"x.{k}": v for k, v in tensors.items()}, "x", 3, 32)
    # base + B·A is qra's weight: exact in fp32 up to the rounding of one addition.
    torch.testing.assert_close(base + rem.B @ rem.A, qw.dequantize(), rtol=0, atol=1e-6)
    assert not torch.equal(base, qw.dequantize())


def test_bf16_scales_are_exported_when_exactly_fp16_and_refused_otherwise():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    qw = qk.quantize_weight(w, 4, 32, "rtn", scale_dtype=torch.bfloat16)
    tensors, _ = to_gptq(qw, "x")
    assert torch.equal(tensors["scales"].float(), qw.scales.float())
    qw.scales[0, 0] = 2.0 ** -30  # a bf16 number below fp16's resolution
    with pytest.raises(NotExportableError, match=r"x: 1 of 64 bfloat16 scales are not exactly"):
        to_gptq(qw, "x")


def test_bad_arguments_are_value_errors_naming_them():
    qw = qk.quantize_weight(torch.randn(32, 64), 4, 32, "rtn")
    with pytest.raises(ValueError, match="checkpoint_format"):
        to_gptq(qw, checkpoint_format="gptq_v3")
    with pytest.raises(ValueError, match="fractional_zeros"):
        to_gptq(qw, fractional_zeros="round")
    padded = qk.quantize_weight(torch.randn(32, 40), 4, 32, "rtn", pad=True)
    with pytest.raises(NotExportableError, match="padded"):
        to_gptq(padded, "p")
    odd = qk.quantize_weight(torch.randn(20, 64), 3, 32, "rtn")
    with pytest.raises(NotExportableError, match="out_features=20 at 3 bits"):
        to_gptq(odd, "o")


def test_quantize_config_names_fused_layers_for_vllm():
    specs = {f"m.layers.0.self_attn.{p}": (4, 64) for p in ("q_proj", "k_proj", "v_proj")}
    specs.update({"m.layers.0.mlp.gate_proj": (3, 32), "m.layers.0.mlp.up_proj": (3, 32),
                  "m.layers.0.mlp.down_proj": (8, 64), "m.layers.1.self_attn.q_proj": (2, 64),
                  "m.layers.1.self_attn.k_proj": (4, 64), "m.layers.1.self_attn.v_proj": (4, 64)})
    cfg, mismatched = quantize_config(specs, ["m.layers.1.mlp.up_proj"])
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (4, 64, False, False)
    assert cfg["checkpoint_format"] == cfg["format"] == "gptq_v2"
    dyn = cfg["dynamic"]
    assert resolve(dyn, "m.layers.0.mlp.gate_up_proj", (4, 64)) == (3, 32)
    assert resolve(dyn, "m.layers.0.self_attn.qkv_proj", (4, 64)) == (4, 64)
    assert resolve(dyn, "m.layers.1.mlp.up_proj", (4, 64)) is None
    assert mismatched == ["m.layers.1.mlp.gate_up_proj", "m.layers.1.self_attn.qkv_proj"]


# --- a whole model ---------------------------------------------------------------------------
def finetuned_peft_model():
    """A mixed-precision qra model with its own adapters and PEFT adapters on top (on the
    quantized layers and on the float one), all with random B: a stand-in for a fine-tune."""
    from peft import LoraConfig, get_peft_model
    names = linear_names(tiny_llama())
    model = quantized(allocation=mixed_allocation(tiny_llama()))
    config = qp.register(LoraConfig(r=4, lora_alpha=8, target_modules=names,
                                    rank_pattern={names[1]: 6}, alpha_pattern={names[1]: 3}))
    pm = get_peft_model(model, config)
    return randomize_adapters(pm).eval()


def _float_copy_from_export(out, fmt="gptq_v2", **overrides):
    """A float Llama built only from the exported files (independent unpacking + adapter)."""
    sd = load_file(os.path.join(out, "model.safetensors"))
    qcfg = json.load(open(os.path.join(out, "quantize_config.json")))
    acfg, ad = {"target_modules": []}, {}
    if os.path.isdir(os.path.join(out, "adapter")):
        acfg = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
        ad = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    ref = tiny_llama(seed=99, **overrides)
    state = {}
    for name in linear_names(ref) + ["lm_head"]:
        spec = resolve(qcfg.get("dynamic", {}), name, (qcfg["bits"], qcfg["group_size"]))
        if f"{name}.qweight" in sd and spec is not None:
            w = independent_dequantize(sd, name, *spec, fmt=fmt)
        else:
            w = sd[f"{name}.weight"].float()
        if name in acfg["target_modules"]:
            r = acfg["rank_pattern"].get(name, acfg["r"])
            alpha = acfg["alpha_pattern"].get(name, acfg["lora_alpha"])
            A = ad[f"base_model.model.{name}.lora_A.weight"]
            B = ad[f"base_model.model.{name}.lora_B.weight"]
            assert A.shape[0] == r
            w = w + (alpha / r) * (B @ A)
        state[f"{name}.weight"] = w
    for k, v in sd.items():
        if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) and k not in state:
            state[k] = v.float()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ref, qcfg, acfg


def test_model_export_round_trip_without_a_loader(tmp_path):
    pm = finetuned_peft_model()
    alloc = mixed_allocation(tiny_llama())
    out = str(tmp_path / "gptq")
    report = export_gptq(pm, out, dtype=torch.float32, tokenizer=tiny_tokenizer())
    ref, qcfg, acfg = _float_copy_from_export(out)
    # Per-module bits and group size are what the allocation said, through `dynamic`.
    default = (qcfg["bits"], qcfg["group_size"])
    for name in linear_names(ref):
        want = alloc["layers"].get(name)
        got = resolve(qcfg.get("dynamic", {}), name, default)
        assert got == (None if want is None else (want["bits"], 32)), name
    assert report["float_layers"] == ["lm_head", "model.layers.1.mlp.up_proj"]
    # The adapter: qra slot rank + PEFT rank per layer; scaling 1 everywhere.
    q0 = "model.layers.0.self_attn.q_proj"  # qra slot rank 5 + PEFT rank 4
    assert report["adapter"]["ranks"][q0] == 9
    assert report["adapter"]["sources"][q0] == ["qra slot", "peft:default"]
    assert report["adapter"]["ranks"]["model.layers.1.mlp.up_proj"] == 4  # float layer: PEFT only
    assert acfg["r"] == acfg["lora_alpha"] and acfg["rank_pattern"] == acfg["alpha_pattern"]
    # The whole model rebuilt from the files alone gives the fine-tuned model's logits.
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, pm(IDS).logits, rtol=1e-4, atol=1e-4)
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"] == qcfg


def test_biases_are_exported(tmp_path):
    model = tiny_llama(attention_bias=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape))
    qk.quantize_model(model, {"layers": {n: {"bits": 4} for n in linear_names(model)},
                              "group_size": 32}, method="rtn")
    out = str(tmp_path / "b")
    export_gptq(model, out, dtype=torch.float32)
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert sd["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16  # as GPTQ stores it
    ref, _, _ = _float_copy_from_export(out, attention_bias=True)
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, model(IDS).logits, rtol=1e-3, atol=1e-3)


def test_model_with_hqq_zeros_is_refused_naming_the_layer_or_folded(tmp_path):
    model = quantized(bits=3, method="hqq")
    with pytest.raises(NotExportableError, match=r"^model\.layers\.0\.self_attn\.q_proj: .*"
                                                  r"non-integer zero points.*more layers"):
        export_gptq(model, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a")  # refused before anything was written
    report = export_gptq(model, str(tmp_path / "b"), fractional_zeros="fold", dtype=torch.float32)
    assert report["zero_point_remainder_ranks"]
    ref, _, _ = _float_copy_from_export(str(tmp_path / "b"))
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


def test_model_without_adapters_writes_no_adapter_and_rejects_non_models(tmp_path):
    model = quantized(bits=4)
    report = export_gptq(model, str(tmp_path / "g"))
    assert report["adapter"] is None and not os.path.exists(tmp_path / "g" / "adapter")
    with pytest.raises(NotExportableError, match="no QRALinear"):
        export_gptq(tiny_llama(), str(tmp_path / "f"))
    with pytest.raises(ValueError, match="transformers model"):
        export_gptq(QRALinear(64, 32), str(tmp_path / "m"))
    with pytest.raises(ValueError, match="adapter_dir=None"):
        export_gptq(randomize_adapters(quantized(allocation=mixed_allocation(tiny_llama()))),
                    str(tmp_path / "n"), adapter_dir=None)


# --- real loaders: GPTQModel's torch kernel, transformers' GPTQ integration --------------
# They run in one subprocess (_loader_worker.py): loading with GPTQModel changes
# process-wide state that the rest of the suite must not inherit.
def _qra_layers(model):
    from qra_kernels.exporters import linear_layers
    return {n: l.module for n, l in linear_layers(model).items() if l.quantized}


# gptqmodel 7.6.0 (the last release that accepts torch 2.13) and what it needs, installed
# without its other dependencies (its pins would replace numpy; see docs/EXPORT.md).
LOADER_PACKAGES = ["gptqmodel==7.6.0", "pypcre==0.6.4", "logbar==0.4.15", "device-smi==0.5.7",
                   "tokenicer==0.0.14", "threadpoolctl==3.8.0", "defuser==0.0.28",
                   "optimum==2.3.0"]


def _loader_python(root):
    """A Python that can import gptqmodel: this one if it can, else a side environment
    that sees this one's packages (a .pth file) and adds the loader packages — so CI runs
    the real loader while the suite's own process never imports gptqmodel (PEFT would pick
    it up process-wide)."""
    import importlib.util
    import site
    import subprocess
    import sys
    import sysconfig
    if importlib.util.find_spec("gptqmodel") is not None:
        return sys.executable
    env_dir = root / "loader-env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    py = str(env_dir / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    paths = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
             if os.path.isdir(p)]
    with open(os.path.join(purelib, "_qra_parent.pth"), "w") as f:
        # addsitedir (not a bare path) so the parent's own .pth files run too (editable
        # installs put their import hooks there)
        for p in dict.fromkeys(paths):
            f.write(f"import site; site.addsitedir({p!r})\n")
    env = {**os.environ, "BUILD_CUDA_EXT": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # The loader packages are sdists built without isolation: with the parent's setuptools
    # (torch requires one). The side environment's own (ensurepip's, 65.x on Python 3.11)
    # would shadow it and cannot read their PEP 639 `project.license` strings.
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], env=env,
                   capture_output=True, timeout=300)
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           *LOADER_PACKAGES], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"installing the GPTQ loader failed:\n{proc.stderr[-3000:]}"
    return py


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Exports of every kind, loaded by the real loaders in a separate process."""
    import subprocess
    root = tmp_path_factory.mktemp("loaders")
    python = _loader_python(root)
    jobs, refs = {}, {}
    for bits in (2, 3, 4, 8):
        model = quantized(bits=bits, group_size=64 if bits != 3 else 32)
        path = str(root / f"u{bits}")
        export_gptq(model, path, tokenizer=tiny_tokenizer())
        jobs[f"u{bits}"] = {"kind": "gptqmodel", "path": path, "ids": IDS}
        refs[f"u{bits}"] = model
    pm = finetuned_peft_model()
    path = str(root / "mixed")
    export_gptq(pm, path, tokenizer=tiny_tokenizer())
    jobs["mixed"] = {"kind": "gptqmodel", "path": path, "ids": IDS,
                     "adapter": os.path.join(path, "adapter")}
    refs["mixed"] = pm
    jobs["hf_uniform"] = {"kind": "transformers", "path": str(root / "u3"), "ids": IDS}
    jobs["hf_mixed"] = {"kind": "transformers", "path": path, "ids": IDS}
    jobs["config"] = {"kind": "quantize_config", "kwargs": dict(
        bits=4, group_size=64, sym=False, desc_act=False, format="gptq_v2",
        dynamic={r"+:^m\.a$": {"bits": 8, "group_size": 32}, r"-:^m\.b$": {}})}
    torch.save(jobs, root / "jobs.pt")
    worker = os.path.join(os.path.dirname(__file__), "_loader_worker.py")
    proc = subprocess.run([python, worker, str(root)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "results.pt", weights_only=False), refs


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptqmodel_loads_the_export_with_the_same_weights_and_logits(loaded, bits):
    results, refs = loaded
    got, model = results[f"u{bits}"], refs[f"u{bits}"]
    assert "error" not in got, got.get("error")
    qra = _qra_layers(model)
    assert set(got["modules"]) == set(qra)
    for name, (b, g, w) in got["modules"].items():
        assert (b, g) == (qra[name].bits, qra[name].group_size), name
        # GPTQModel's own unpacking, in fp16: one rounding of the exact (q - z)·s, as ours.
        assert torch.equal(w, qra[name].quantized_weight.dequantize(torch.float16)), name
    with torch.no_grad():
        ref = model(IDS).logits
    torch.testing.assert_close(got["logits"], ref, rtol=1e-2, atol=3e-3)


def test_gptqmodel_mixed_allocation_and_peft_adapter_give_the_finetuned_logits(loaded):
    results, refs = loaded
    got, pm = results["mixed"], refs["mixed"]
    assert "error" not in got, got.get("error")
    qra = _qra_layers(pm)
    assert {n: (b, g) for n, (b, g, _) in got["modules"].items()} == \
        {n: (m.bits, m.group_size) for n, m in qra.items()}
    assert "model.layers.1.mlp.up_proj" in got["float_linears"]  # "-:" in dynamic
    with torch.no_grad():
        ref = pm(IDS).logits
    torch.testing.assert_close(got["adapter_logits"], ref, rtol=1e-2, atol=3e-3)
    base_gap = (got["logits"] - ref).abs().max()
    assert base_gap > 10 * (got["adapter_logits"] - ref).abs().max()  # the adapter closes it


def test_quantize_config_has_the_keys_gptqmodel_writes(loaded):
    theirs = loaded[0]["config"]["config"]
    ours, _ = quantize_config({"m.a": (8, 32), "m.c": (4, 64), "m.d": (4, 64)}, ["m.b"])
    assert set(ours) == set(theirs)
    for key in ("bits", "group_size", "desc_act", "sym", "lm_head", "method", "quant_method",
                "format", "checkpoint_format", "pack_dtype", "dynamic"):
        assert ours[key] == theirs[key], key


def test_transformers_gptq_integration_loads_uniform_bits_and_refuses_mixed_loudly(loaded):
    """transformers' GPTQ path (optimum + gptqmodel) builds every layer at the default bits:
    it ignores `dynamic`, so a mixed export fails with a size mismatch instead of loading
    wrong weights. Uniform exports load and match."""
    results, refs = loaded
    assert "error" not in results["hf_uniform"], results["hf_uniform"].get("error")
    with torch.no_grad():
        ref = refs["u3"](IDS).logits
    torch.testing.assert_close(results["hf_uniform"]["logits"], ref, rtol=1e-2, atol=3e-3)
    assert "ignore_mismatched_sizes" in results["hf_mixed"].get("error", "")
