"""Start-up time of the ``qra`` command: wall seconds of ``qra --help`` and of each
``qra <subcommand> --help`` (lazy imports: none of them may import torch).

    python benches/cli_startup.py [--repeats 5] [--out R.json]

Each command runs ``--repeats`` times in a fresh process; the median and the max are
reported, with the machine's load average at the start (read the numbers against it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

SUBCOMMANDS = ["", "demo", "search", "quantize", "export", "bench"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    # the qra of this interpreter's environment first
    here = os.path.join(os.path.dirname(sys.executable), "qra")
    qra = here if os.path.exists(here) else shutil.which("qra")
    if qra is None:
        raise SystemExit("the qra command is not on PATH (pip install -e . first)")
    rows = {}
    load = os.getloadavg()
    for sub in SUBCOMMANDS:
        cmd = [qra] + ([sub] if sub else []) + ["--help"]
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t)
        # torch never imported: check it once, in the same interpreter the command uses
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; sys.argv=['qra'] + %r; "
             "from qra_search.cli import main\ntry:\n    main(sys.argv[1:])\n"
             "except SystemExit:\n    pass\nprint('torch' in sys.modules)" % cmd[1:]],
            check=True, capture_output=True, text=True)
        rows[" ".join(["qra"] + cmd[1:])] = {
            "median_s": statistics.median(times), "max_s": max(times),
            "imports_torch": probe.stdout.strip().splitlines()[-1] == "True"}
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} "
           f"{os.cpu_count()} cpus", "loadavg_1m": load[0], "python": sys.version.split()[0],
           "commands": rows}
    for name, r in rows.items():
        print(f"{name:<28} median {r['median_s']:.3f} s  max {r['max_s']:.3f} s  "
              f"torch imported: {r['imports_torch']}")
    print(f"load average at start: {load[0]:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
