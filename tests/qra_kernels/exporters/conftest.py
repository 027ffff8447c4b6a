"""Tiny qra models for the exporter tests: random Llama configs (no download), a byte-level
tokenizer built in memory (GPTQ and llama.cpp loaders want one), mixed allocations."""
import pytest
import torch
from torch import nn

import qra_kernels as qk

# 256 byte tokens, one merge and <|endoftext|>, padded (tests the GGUF vocabulary padding)
VOCAB = 272
IDS = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(2))


def tiny_llama(seed=0, layers=2, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, bos_token_id=256, eos_token_id=256, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def mixed_allocation(model):
    """Every bit-width, every group size, ranks including 0 and odd ones, one float layer."""
    layers = {}
    cycle = [(2, 5), (3, 0), (4, 8), (8, 3)]
    for i, name in enumerate(linear_names(model)):
        bits, rank = cycle[i % len(cycle)]
        layers[name] = {"bits": bits, "rank": rank}
    del layers["model.layers.1.mlp.up_proj"]  # stays float
    return {"layers": layers, "group_size": 32}


def quantized(bits=None, allocation=None, method="rtn", seed=0, group_size=32, **kw):
    model = tiny_llama(seed)
    if allocation is None:
        allocation = {"layers": {n: {"bits": bits, "rank": 0} for n in linear_names(model)},
                      "group_size": group_size}
    return qk.quantize_model(model, allocation, method=method, **kw)


def randomize_adapters(model, seed=3, scale=0.05):
    """Stand-in for a fine-tune: every adapter B (qra slot and PEFT) gets random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["he"] = len(vocab)  # one merge: llama.cpp refuses a BPE vocabulary without merges
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
