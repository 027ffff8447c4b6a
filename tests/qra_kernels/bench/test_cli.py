"""``qra bench`` through its entry points (``main_from_args``, ``python -m
qra_kernels.bench``): the JSON has every installed peer and the machine description, the
PNG is written, and bad input exits 2 with a one-line reason."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from qra_kernels import bench
from qra_kernels.bench import impls

# --quick's machinery on the tiny shapes: seconds, not minutes.
FAST = ["--quick", "--models", "tiny", "--layers", "proj", "--bits", "2,4,8", "--ranks", "0,3",
        "--ms", "1,5", "--group-size", "32", "--min-time", "0.005", "--max-copies", "3",
        "--no-e2e", "--threads", "1"]


def _parse(argv):
    parser = bench.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(argv)
    args.bench_command_line = "qra bench " + " ".join(argv)
    return args


def _check_report(report, out_dir, stem):
    # Every peer whose package is installed is in the report, with its version.
    for name, dist, *_ in impls._PEERS:
        version = impls.package_version(dist)
        entry = report["peers"][name]
        assert entry["installed"] == (version is not None)
        assert entry["version"] == version
        if not entry["usable_here"]:
            assert entry["unavailable_reason"]
    measured = {r["implementation"] for r in report["rows"] if r["status"] == "ok"}
    usable = {n for n, e in report["peers"].items() if e["usable_here"]}
    assert usable <= measured
    for backend, info in report["backends"].items():
        assert (f"qra:{backend}" in measured) == info["usable_here"]
    machine = report["machine"]
    for key in ("platform", "cpu_model", "cpu_count", "torch_threads", "torch",
                "last_level_cache_bytes", "memory_bytes", "qra"):
        assert key in machine, key
    assert machine["qra"]["backends"]
    assert report["hardware_limit"]["copy_bandwidth_GBps"] > 0
    assert report["summary"], "speed-ups over the peers must be summarized"
    png = os.path.join(out_dir, f"{stem}.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_main_from_args_writes_json_png_and_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = bench.main_from_args(_parse(FAST + ["--out", str(tmp_path), "--name", "run"]))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(tmp_path / "run.json") as f:
        report = json.load(f)
    _check_report(report, str(tmp_path), "run")
    assert report["config"]["models"] == ["tiny"]
    assert report["config"]["bits"] == [2, 4, 8]
    assert report["command"].startswith("qra bench --quick")
    printed = capsys.readouterr().out
    assert "qra:reference" in printed and "copy bandwidth" in printed
    assert "speed-up" in printed


@pytest.mark.parametrize("argv,message", [
    (["--bits", "5"], "bits"),
    (["--models", "GPT-9"], "unknown model"),
    (["--ranks", "-2"], "ranks"),
    (["--implementations", "nope"], "unknown implementations"),
    (["--threads", "0"], "--threads"),
])
def test_bad_input_exits_2_with_a_reason(tmp_path, capsys, argv, message):
    """The same one-line error format as every other `qra` command."""
    from qra_search import cli
    try:
        rc = cli.main(["bench", "--quick", "--no-e2e", "--out", str(tmp_path)] + argv)
    except SystemExit as e:  # argparse-level errors (e.g. --threads 0)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qra bench") and "error:" in err and message in err
    assert len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_python_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qra_kernels.bench", *FAST,
                           "--implementations", "qra:reference,torch_dense_fp32",
                           "--out", str(tmp_path), "--name", "m"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "m.json") as f:
        report = json.load(f)
    assert {r["implementation"] for r in report["rows"]} == {"qra:reference",
                                                              "torch_dense_fp32"}
    assert report["command"].startswith("python -m qra_kernels.bench --quick")


@pytest.mark.slow
def test_quick_suite_as_ci_runs_it(tmp_path):
    """The real ``--quick`` sweep (SmolLM2-135M shapes, every backend and CPU peer),
    without the end-to-end model run."""
    proc = subprocess.run([sys.executable, "-m", "qra_kernels.bench", "--quick", "--no-e2e",
                           "--threads", "1", "--out", str(tmp_path), "--name", "quick"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "quick.json") as f:
        report = json.load(f)
    _check_report(report, str(tmp_path), "quick")
    assert {r["model"] for r in report["rows"]} == {"SmolLM2-135M"}
    assert all(r["status"] == "ok" for r in report["rows"]), [
        r for r in report["rows"] if r["status"] != "ok"][:3]


def test_qra_bench_command(tmp_path, monkeypatch):
    """``qra bench`` (the CLI's subcommand) reaches main_from_args with these options."""
    cli = pytest.importorskip("qra_search.cli")
    argv = ["bench", *FAST, "--implementations", "qra:reference", "--out", str(tmp_path),
            "--name", "cli"]
    monkeypatch.setattr(sys, "argv", ["qra", *argv])
    threads = torch.get_num_threads()
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "cli.json") as f:
        report = json.load(f)
    assert report["command"].startswith("qra bench --quick --models tiny")
    assert {r["implementation"] for r in report["rows"]} == {"qra:reference"}
