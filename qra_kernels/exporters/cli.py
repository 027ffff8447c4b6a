"""``qra export --format gptq|gguf --model DIR --out OUT``.

The lead CLI registers this as a subcommand: :func:`add_arguments` fills its parser and
:func:`main_from_args` runs it (returns the exit status). Bad input raises ``ValueError``
with a one-line message naming the argument, before anything heavy (no model is loaded
until every argument has been checked).

``DIR`` is a qra checkpoint (what ``save_pretrained`` writes for a model loaded with
``quantization_config=QraConfig(...)``, or ``qra quantize``); ``--adapter`` stacks a saved
PEFT adapter of a fine-tune on it. Its tokenizer, if the directory has one, goes with the
export.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Optional

__all__ = ["add_arguments", "main_from_args", "main"]

_DTYPES = ("float16", "bfloat16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--format", required=True, choices=("gptq", "gguf"),
                        help="gptq: lossless GPTQ checkpoint + PEFT adapter (a directory); "
                             "gguf: one llama.cpp file, adapters merged (lossy)")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a qra checkpoint directory (save_pretrained / qra quantize)")
    parser.add_argument("--out", required=True, metavar="OUT",
                        help="gptq: output directory; gguf: output file ending in .gguf")
    parser.add_argument("--adapter", metavar="DIR",
                        help="a PEFT adapter saved after a fine-tune, stacked on the model")
    g = parser.add_argument_group("gptq")
    g.add_argument("--checkpoint-format", choices=("gptq_v2", "gptq"), default=None,
                   help="gptq_v2 (default) stores the zero point itself; gptq (v1) stores "
                        "zero - 1 and cannot hold a zero of 0")
    g.add_argument("--fractional-zeros", choices=("refuse", "fold"), default=None,
                   help="refuse (default) layers with non-integer zero points (hqq), or fold "
                        "the remainder into the exported adapter (exact base + adapter)")
    g.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="dtype of unquantized tensors and biases (default float16)")
    g.add_argument("--adapter-out", metavar="DIR", default=None,
                   help="where the PEFT adapter goes (default OUT/adapter)")
    g = parser.add_argument_group("gguf")
    g.add_argument("--gguf-type", action="append", default=None, metavar="BITS=TYPE",
                   help="map a bit-width to a GGUF type, e.g. 3=Q4_1 (repeatable; default "
                        "2=Q4_0 3=Q4_0 4=Q4_1 8=Q8_0)")
    g.add_argument("--float-type", default=None, help="type of float tensors (default F16)")
    g.add_argument("--vocab-from", metavar="GGUF", default=None,
                   help="copy the tokenizer.* metadata of this GGUF file")
    g.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name written with a converted tokenizer")
    return parser


def _parse_types(items) -> Optional[Dict[int, str]]:
    from .gguf import DEFAULT_TYPES, QUANTIZABLE_TYPES
    if not items:
        return None
    out = {}
    for item in items:
        bits, sep, name = item.partition("=")
        if not sep or not bits.strip().isdigit():
            raise ValueError(f"--gguf-type: expected BITS=TYPE (e.g. 3=Q4_1), got {item!r}")
        b = int(bits)
        if b not in DEFAULT_TYPES:
            raise ValueError(f"--gguf-type: bits must be one of {tuple(DEFAULT_TYPES)}, got {b}")
        name = name.strip().upper()
        if name not in QUANTIZABLE_TYPES:
            raise ValueError(f"--gguf-type: {name!r} cannot be produced by gguf.quants "
                             f"(choose one of {QUANTIZABLE_TYPES})")
        out[b] = name
    return out


def _check(args) -> None:
    """Every argument, cheaply, before any model is loaded."""
    model = args.model
    if not os.path.isdir(model):
        raise ValueError(f"--model: {model!r} is not a directory")
    cfg_path = os.path.join(model, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--model: {model!r} has no config.json")
    try:
        cfg = json.load(open(cfg_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"--model: {cfg_path} is not valid JSON ({e.msg})") from None
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method != "qra":
        raise ValueError(f"--model: {model!r} is not a qra checkpoint (quantization_config."
                         f"quant_method is {method!r}); quantize it first (qra quantize)")
    if args.adapter is not None and not os.path.isfile(
            os.path.join(args.adapter, "adapter_config.json")):
        raise ValueError(f"--adapter: {args.adapter!r} has no adapter_config.json")
    gptq_only = {"--checkpoint-format": args.checkpoint_format,
                 "--fractional-zeros": args.fractional_zeros, "--dtype": args.dtype,
                 "--adapter-out": args.adapter_out}
    gguf_only = {"--gguf-type": args.gguf_type, "--float-type": args.float_type,
                 "--vocab-from": args.vocab_from, "--tokenizer-pre": args.tokenizer_pre}
    wrong = gguf_only if args.format == "gptq" else gptq_only
    for flag, value in wrong.items():
        if value is not None:
            raise ValueError(f"{flag} applies to the other format, not --format {args.format}")
    if args.format == "gptq":
        if os.path.isfile(args.out):
            raise ValueError(f"--out: {args.out!r} is a file; --format gptq writes a directory")
    else:
        if not args.out.endswith(".gguf"):
            raise ValueError(f"--out: {args.out!r} must end in .gguf for --format gguf")
        if os.path.isdir(args.out):
            raise ValueError(f"--out: {args.out!r} is a directory")
        _parse_types(args.gguf_type)
        from .gguf import FLOAT_TYPES
        if args.float_type is not None and args.float_type.upper() not in FLOAT_TYPES:
            raise ValueError(f"--float-type: must be one of {FLOAT_TYPES}, got {args.float_type!r}")
        if args.vocab_from is not None and not os.path.isfile(args.vocab_from):
            raise ValueError(f"--vocab-from: {args.vocab_from!r} is not a file")


def _load(args):
    import qra_kernels  # noqa: F401 - registers "qra" with transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = None
    if any(os.path.exists(os.path.join(args.model, f))
           for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.adapter is not None:
        from ..integrations import peft as qp
        model = qp.load(model, args.adapter).eval()
    return model, tokenizer


def main_from_args(args: argparse.Namespace) -> int:
    _check(args)
    import torch
    model, tokenizer = _load(args)
    if args.format == "gptq":
        from .gptq import export_gptq
        report = export_gptq(
            model, args.out, checkpoint_format=args.checkpoint_format or "gptq_v2",
            fractional_zeros=args.fractional_zeros or "refuse",
            dtype=getattr(torch, args.dtype or "float16"),
            adapter_dir=args.adapter_out or "adapter", tokenizer=tokenizer)
        bits = sorted({v["bits"] for v in report["layers"].values()})
        adapter = report["adapter"]["dir"] if report["adapter"] else "no adapter"
        print(f"wrote {args.out}: {len(report['layers'])} GPTQ layers "
              f"({report['checkpoint_format']}, bits {bits}), "
              f"{len(report['float_layers'])} float; {adapter}")
        if report["vllm_fused_mismatch"]:
            print(f"note: vLLM/SGLang fuse layers whose shards differ here and cannot serve them: "
                  f"{', '.join(report['vllm_fused_mismatch'][:4])}"
                  f"{' ...' if len(report['vllm_fused_mismatch']) > 4 else ''}")
    else:
        from .gguf import export_gguf
        report = export_gguf(model, args.out, types=_parse_types(args.gguf_type),
                             float_type=(args.float_type or "F16").upper(), tokenizer=tokenizer,
                             vocab_from=args.vocab_from, tokenizer_pre=args.tokenizer_pre)
        errs = [t["rel_error"] for t in report["tensors"].values() if "rel_error" in t]
        print(f"wrote {args.out}: {report['tensor_bytes'] / 2**20:.1f} MiB of tensors, types "
              f"{report['type_map']}; re-quantization weight error (relative) mean "
              f"{sum(errs) / len(errs):.4f}, max {max(errs):.4f}")
    return 0


def main(argv=None) -> int:
    """Standalone entry point (``python -m qra_kernels.exporters.cli``)."""
    parser = add_arguments(argparse.ArgumentParser(prog="qra export", description=__doc__))
    args = parser.parse_args(argv)
    try:
        return main_from_args(args)
    except ValueError as e:
        parser.exit(2, f"qra export: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
