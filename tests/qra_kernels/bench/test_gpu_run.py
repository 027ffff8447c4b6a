"""benches/gpu_run.sh --dry-run: the prepared GPU session's steps, rehearsed on the CPU.

Every step must run and succeed (toolchain checks, a CMake configure of the sm_90 build,
the GPU tests collected plus an interpreted smoke test, the benchmark on tiny shapes), the
logs and summary.json must be written, and the whole must stay well inside the GPU
session's 8-minute budget (the real step limits add up to 480 s).
"""
import json
import pathlib
import re
import shutil
import os
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benches" / "gpu_run.sh"


def _limits():
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^step (\w+) (\d+) ", SCRIPT.read_text(), re.M)}


def test_step_limits_fit_the_eight_minutes():
    limits = _limits()
    assert list(limits) == ["env", "install", "build", "static", "tests", "bench", "compare"]
    assert sum(limits.values()) <= 480, limits


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "run"
    # The script's Python is this test's (PYTHON), not whatever python3 is first on PATH.
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=400)
    summary = json.loads((out / "summary.json").read_text())
    logs = {s["step"]: (out / f"{s['step']}.log").read_text()[-2000:] for s in summary["steps"]}
    assert proc.returncode == 0, (proc.stdout[-3000:], logs)
    assert summary["dry_run"] == 1
    assert [s["step"] for s in summary["steps"]] == list(_limits())
    assert all(s["rc"] == 0 for s in summary["steps"]), logs
    assert summary["total_seconds"] < 240, summary
    assert "passed" in logs["tests"] and "tests collected" in (out / "tests.log").read_text()
    bench = json.loads((out / "bench-dry.json").read_text())
    assert {r["implementation"] for r in bench["rows"] if r["status"] == "ok"} >= {"qra:reference"}
    # The static step reads what the GPU run builds: sm_90 only.
    static_kernels = json.loads((out / "static.json").read_text())["kernels"]
    assert all(k["arch"] == "sm_90" for k in static_kernels), {k["arch"] for k in static_kernels}
