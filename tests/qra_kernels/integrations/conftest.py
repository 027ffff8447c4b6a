"""Tiny random causal LMs of several families, built from configs (no download)."""
import pytest
import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "phi")

# Every projection's input dimension is a multiple of 32 (the group size the tests use).
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_config(family: str = "llama", **overrides):
    import transformers as tf
    kw = dict(_COMMON)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "mistral": tf.MistralConfig, "gemma": tf.GemmaConfig, "phi3": tf.Phi3Config,
           "phi": tf.PhiConfig}[family]
    if family in ("qwen3", "gemma"):
        kw["head_dim"] = 16
    if family == "phi3":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return cls(**kw)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return model.eval()


@pytest.fixture
def make_tiny():
    return tiny_model


@pytest.fixture
def float_checkpoint(tmp_path):
    """A saved tiny float Llama checkpoint directory (and the model it came from)."""
    model = tiny_model("llama")
    path = tmp_path / "float"
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run tiny ops by the thousand: on a shared 2-core machine, torch's
    thread pool makes each one wait for busy cores (measured: torch.round on a 32x64
    tensor 3 ms instead of 20 µs). One thread here, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
