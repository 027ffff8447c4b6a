"""The `qra` command: help, one-line errors with non-zero exit, search → quantize on a tiny
model saved to disk, and --resume."""
import json
import os

import pytest

from qra_search import cli


def run(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's --help / usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, pattern):
    assert code == 2, err
    # progress bars may precede an error found after loading; the error is one line, last
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert "Traceback" not in err, err
    assert lines[-1].startswith("qra") and pattern in lines[-1], err


@pytest.mark.parametrize("cmd", [[], ["demo"], ["search"], ["quantize"], ["bench"]])
def test_help(capsys, cmd):
    code, out, _ = run(capsys, *cmd, "--help")
    assert code == 0 and "usage: qra" in out


def test_bad_input_is_one_line(capsys, tmp_path):
    one_line_error(*run(capsys, "search", "--model", str(tmp_path / "nope"))[::2],
                   "does not exist")
    one_line_error(*run(capsys, "search", "--bits", "2,5")[::2], "bits choice 5")
    one_line_error(*run(capsys, "search", "--ranks", "0,-4")[::2], "rank choice -4")
    one_line_error(*run(capsys, "search", "--ranks", "0,x")[::2], "comma-separated")
    one_line_error(*run(capsys, "search", "--budget-bits", "-1")[::2], "positive")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"layers\": {\"x\": {\"bits\": 5}}}")
    one_line_error(*run(capsys, "quantize", "--allocation", str(bad), "--out", str(tmp_path / "o"))[::2],
                   "bits must be one of")
    bad.write_text("{not json")
    one_line_error(*run(capsys, "quantize", "--allocation", str(bad), "--out", str(tmp_path / "o"))[::2],
                   "not valid JSON")


def test_bench_missing_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_bench_module", lambda: None)
    one_line_error(*run(capsys, "bench")[::2], "benchmarks are not installed")


@pytest.fixture
def model_dir(tmp_path, make_model, make_tokenizer):
    d = tmp_path / "tiny"
    make_model().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return str(d)


SMALL = ["--ranks", "0,4,8", "--default-rank", "4", "--evaluations", "4", "--popsize", "4",
         "--refine-steps", "1", "--proxy-top", "1", "--proxy-steps", "1", "--calib-blocks", "3",
         "--seq-len", "32", "--method", "rtn", "--no-progress"]


def test_search_quantize_resume_and_infeasible(capsys, tmp_path, model_dir):
    alloc = str(tmp_path / "alloc.json")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    code, out, err = run(capsys, "search", "--model", model_dir, "--budget-bits", "3.5",
                         "--out", alloc, *cache, *SMALL)
    assert code == 0, err
    assert "Pareto front" in out and "uniform baselines" in out
    assert os.path.exists(alloc) and os.path.exists(str(tmp_path / "alloc.pareto.png"))
    d = json.load(open(alloc))
    assert d["objectives"]["within_budget"] and len(d["layers"]) == 14
    # same search again: refused without --resume, answered from the archive with it
    one_line_error(*run(capsys, "search", "--model", model_dir, "--budget-bits", "3.5",
                        "--out", alloc, *cache, *SMALL)[::2], "--resume")
    code, out, err = run(capsys, "search", "--model", model_dir, "--budget-bits", "3.5",
                         "--out", alloc, "--resume", *cache, *SMALL)
    assert code == 0 and "'cheap': 0" in out and "'proxy': 0" in out, out
    assert json.load(open(alloc))["layers"] == d["layers"]
    # quantize with it
    q = str(tmp_path / "q")
    code, out, err = run(capsys, "quantize", "--model", model_dir, "--allocation", alloc,
                         "--out", q, *cache, "--no-progress")
    assert code == 0, err
    from safetensors.torch import load_file
    sd = load_file(os.path.join(q, "model.safetensors"))
    assert any(k.endswith("qweight") for k in sd)
    from qra_search import Allocation
    assert Allocation.load(os.path.join(q, "allocation.json")).layers == d["layers"]
    # an infeasible budget names the smallest feasible one
    code, out, err = run(capsys, "search", "--model", model_dir, "--budget-bits", "1",
                         "--default-rank", "0", "--out", str(tmp_path / "x.json"), *cache,
                         *SMALL[:2], *SMALL[4:])
    one_line_error(code, err, "smallest feasible budget is --budget-bits")
