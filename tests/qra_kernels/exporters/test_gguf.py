"""GGUF export: per-tensor types follow the allocation, adapters are merged, q/k rows are in
llama.cpp's RoPE order, and — where llama-cpp-python is installed (the ``export`` extra) —
llama.cpp loads the file and computes what the file says.

Without llama-cpp-python (CI) the file is read back with ``gguf.GGUFReader``, dequantized
with ``gguf.quants`` and un-permuted here, and the model rebuilt from it is compared with
the fine-tuned qra model: close when every layer is Q8_0, and far off if the RoPE
permutation is skipped (the attention is made sharp so that it matters).
"""
import numpy as np
import pytest
import torch

import qra_kernels as qk
from qra_kernels.exporters.gguf import DEFAULT_TYPES, QUANTIZABLE_TYPES, export_gguf

from .conftest import IDS, VOCAB, linear_names, mixed_allocation, randomize_adapters, tiny_tokenizer

gguf = pytest.importorskip("gguf")

FAMILY_HEADS = {"llama": (4, 2), "qwen2": (4, 2), "qwen3": (4, 2)}


def tiny(family="llama", seed=0, **overrides):
    import transformers as tf
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
    if family == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cls(**kw)).eval()
    with torch.no_grad():  # sharp attention, so a wrong q/k row order shows in the logits
        for n, p in model.named_parameters():
            if "q_proj.weight" in n or "k_proj.weight" in n:
                p.mul_(15)
    return model


def finetuned(family="llama", allocation=None, **overrides):
    model = tiny(family, **overrides)
    alloc = allocation or mixed_allocation(model)
    return randomize_adapters(qk.quantize_model(model, alloc, method="rtn"))


def unpermute(w, n_head):
    """llama.cpp's interleaved RoPE rows back to transformers' rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def model_from_gguf(path, family="llama", permuted=True, **overrides):
    """A transformers model whose every tensor is read (and dequantized) from the GGUF."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
            "qwen3": gguf.MODEL_ARCH.QWEN3}[family]
    names = gguf.get_tensor_name_map(arch, 2)
    ref = tiny(family, seed=7, **overrides)
    state = {}
    n_head, n_kv = FAMILY_HEADS[family]
    for name, p in ref.state_dict().items():
        if "rotary" in name:
            continue
        t = tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                      dtype=np.float32).reshape(p.shape))
        if family == "llama" and permuted and ".self_attn.q_proj." in name:
            w = unpermute(w, n_head)
        if family == "llama" and permuted and ".self_attn.k_proj." in name:
            w = unpermute(w, n_kv)
        state[name] = w
    ref.load_state_dict(state, strict=False)
    return ref, reader


def gap(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_gguf_package_produces_exactly_the_types_we_offer():
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    for name in QUANTIZABLE_TYPES:
        qt = getattr(gguf.GGMLQuantizationType, name)
        back = gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt)
        assert np.abs(back - x).mean() < 0.1, name
    for name in ("Q2_K", "Q3_K", "Q4_K", "IQ3_S"):  # what llama.cpp has at 2-3 bits
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, name))


def test_types_follow_the_allocation_and_adapters_are_merged(tmp_path):
    model = finetuned()
    alloc = mixed_allocation(tiny())
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path, tokenizer=tiny_tokenizer())
    rebuilt, reader = model_from_gguf(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name in linear_names(tiny()):
        gg = names.get_name(name + ".weight", try_suffixes=(".weight",))
        spec = alloc["layers"].get(name)
        assert types[gg] == (DEFAULT_TYPES[spec["bits"]] if spec else "F16"), name
        assert report["tensors"][name + ".weight"]["type"] == types[gg]
    assert types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "F16"
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == VOCAB  # padded to the rows
    with torch.no_grad():
        want = model(IDS).logits
        assert gap(rebuilt(IDS).logits, want) < 0.5  # lossy: 2/3-bit layers become Q4_0


@pytest.mark.parametrize("bias", [False, True])
def test_q8_everywhere_reproduces_the_finetuned_model_and_needs_the_rope_permutation(tmp_path,
                                                                                     bias):
    model = finetuned(attention_bias=bias)
    if bias:
        with torch.no_grad():  # biases that matter (zero at init)
            for n, p in model.named_parameters():
                if n.endswith(("q_proj.bias", "k_proj.bias")):
                    p.copy_(torch.randn(p.shape) * 2)
    path = str(tmp_path / "q8.gguf")
    export_gguf(model, path, types={b: "Q8_0" for b in DEFAULT_TYPES}, float_type="F32")
    rebuilt, _ = model_from_gguf(path, attention_bias=bias)
    unpermuted, _ = model_from_gguf(path, permuted=False, attention_bias=bias)
    # Each weight is the qra base plus its adapter, to Q8_0's precision.
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, qk.QRALinear):
                base = m.quantized_weight.dequantize()
                merged = base + m.scaling * (m.lora_B @ m.lora_A) if m.rank else base
                err = (rebuilt.get_submodule(name).weight - merged).norm()
                assert float(err / merged.norm()) < 0.01, name
                if m.rank:  # the merged adapter is in there, not just the base
                    assert float(err) < 0.5 * float((merged - base).norm()), name
    with torch.no_grad():
        want = model(IDS).logits
        good, bad = gap(rebuilt(IDS).logits, want), gap(unpermuted(IDS).logits, want)
    # The sharp attention amplifies Q8_0's 0.3% weight error; a wrong q/k order is far worse.
    assert good < 0.1 and bad > 10 * good, (good, bad)


def test_bad_input_is_refused_naming_it(tmp_path):
    model = finetuned(allocation={"layers": {n: {"bits": 4} for n in linear_names(tiny())},
                                  "group_size": 32})
    with pytest.raises(ValueError, match=r"types\[3\]: 'Q3_K' cannot be produced"):
        export_gguf(model, str(tmp_path / "a.gguf"), types={3: "Q3_K"})
    with pytest.raises(ValueError, match="types: bits must be one of"):
        export_gguf(model, str(tmp_path / "a.gguf"), types={5: "Q5_0"})
    with pytest.raises(ValueError, match="float_type"):
        export_gguf(model, str(tmp_path / "a.gguf"), float_type="Q4_0")
    with pytest.raises(ValueError, match="vocab_from"):
        export_gguf(model, str(tmp_path / "a.gguf"), vocab_from=str(tmp_path / "missing.gguf"))
    import transformers as tf
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="architecture 'gpt2' is not exported"):
        export_gguf(gpt2, str(tmp_path / "g.gguf"))
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_llama_cpp_loads_the_file_and_computes_what_it_says(tmp_path, family):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = finetuned(family)
    path = str(tmp_path / f"{family}.gguf")
    export_gguf(model, path, tokenizer=tiny_tokenizer())
    rebuilt, _ = model_from_gguf(path, family)
    llm = llama_cpp.Llama(path, n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    for row in IDS:
        llm.reset()
        llm.eval(row.tolist())
        got = torch.from_numpy(np.array(llm.scores[:len(row)], dtype=np.float32))
        with torch.no_grad():
            want = rebuilt(row[None]).logits[0]
        # llama.cpp multiplies Q4/Q8 weights with activations quantized to 8 bits.
        assert gap(got, want) < 0.1, family
    assert llm.n_vocab() == VOCAB
    # The vocabulary (converted from tokenizer.json) tokenizes as the tokenizer does.
    want_ids = tiny_tokenizer()("hello there")["input_ids"]
    assert llm.tokenize(b"hello there", add_bos=False, special=False) == want_ids
