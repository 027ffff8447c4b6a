"""A tiny random Llama built from a config (no download), token blocks and a tiny tokenizer."""
import pytest
import torch


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      initializer_range=0.05)  # sharper than the default: quantization shows
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer():
    """A 256-token byte-level BPE trained in milliseconds on CPython's docs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from qra_search.models import documentation_texts
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:200])
    tok.train_from_iterator(documentation_texts()[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 32), generator=g)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_model():
    """The tiny-model factory (test modules cannot import conftest in importlib mode)."""
    return tiny_llama


@pytest.fixture
def make_tokenizer():
    return tiny_tokenizer


@pytest.fixture
def tiny_search(model, tokens, tmp_path):
    """(evaluator, block groups, cost model, cache dir) of the tiny Llama, rtn, group 64:
    what the stage tests and the descent tests build their gene spaces on."""
    from qra_kernels.allocation import linear_shapes
    from qra_search.costs import CostModel
    from qra_search.evaluate import Evaluator, layer_groups, linear_modules
    from qra_search.store import quant_store
    lin = linear_modules(model)
    store = quant_store(model, lin, group_size=64, method="rtn", cache_dir=str(tmp_path))
    ev = Evaluator(model, store, tokens[:3], tokens[3:])
    groups = layer_groups(list(lin), "block")
    costs = CostModel(linear_shapes(model), 64)
    return ev, groups, costs, tmp_path
