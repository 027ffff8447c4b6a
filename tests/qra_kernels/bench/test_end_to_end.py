"""End-to-end measurements on a tiny random Llama (the real SmolLM2-135M run takes
minutes; it is what ``qra bench`` without ``--quick`` does)."""
import pytest
import torch

import qra_kernels as qk
from qra_kernels.bench import end_to_end
from qra_kernels.bench.impls import package_version


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_every_variant_decodes_and_trains(tiny_llama):
    before = {n: p.clone() for n, p in tiny_llama.state_dict().items()}
    res = end_to_end.model_end_to_end(tiny_llama, bits=4, rank=4, group_size=32, new_tokens=3,
                                      prompt_tokens=5, batch=2, seq_len=8)
    variants = res["variants"]
    expected = {"float+peft_lora", "qra:auto", *(f"qra:{b}" for b in qk.available_backends())}
    if package_version("bitsandbytes") is not None:
        expected.add("bitsandbytes_nf4+peft_lora")
    assert set(variants) == expected
    assert res["projections"] == 2 * 7
    for name in ("float+peft_lora", "qra:auto", "qra:reference"):
        v = variants[name]
        assert v["decode"]["new_tokens"] == 3 and v["decode"]["decode_tokens_per_s"] > 0
        step = v["train_step"]
        assert step["step_s"] > 0 and torch.isfinite(torch.tensor(step["loss"]))
        # Only adapters train: rank 4 on every projection (q, o: 64->64; k, v: 64->32;
        # gate, up: 64->128; down: 128->64) of both layers.
        assert step["trainable_params"] == 2 * 4 * (2 * 128 + 2 * 96 + 3 * 192)
    # A packed 4-bit base plus adapter stores less than the float base plus adapter.
    assert (variants["qra:auto"]["stored_projection_bytes"]
            < variants["float+peft_lora"]["stored_projection_bytes"] / 2)
    # The caller's model is untouched.
    for n, p in tiny_llama.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_llama_stack_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the stack is exercised by qra bench there")
    with pytest.raises(ValueError, match="CUDA GPU"):
        end_to_end.llama3_8b_stack(device="cpu")
