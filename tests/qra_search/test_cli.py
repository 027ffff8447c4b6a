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


@pytest.mark.parametrize("cmd", [[], ["demo"], ["search"], ["quantize"], ["bench"],
                                 ["export"]])
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


def test_every_option_has_help():
    parser = cli.build_parser(["bench"])
    subs = parser._subparsers._group_actions[0].choices
    for name in ("demo", "search", "quantize"):
        for action in subs[name]._actions:
            if action.dest != "help":
                assert action.help, f"qra {name} {action.option_strings} has no help text"


def test_help_does_not_import_torch():
    """`qra --help` and `qra search --help` only parse arguments (issue: start-up time)."""
    import subprocess
    import sys
    code = ("import sys; from qra_search import cli\n"
            "for argv in ([], ['search', '--help']):\n"
            "    try: cli.main(argv + ([] if argv else ['--help']))\n"
            "    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bench_missing_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_optional_module", lambda name: None)
    one_line_error(*run(capsys, "bench")[::2], "is not installed")


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
    assert "Pareto front" in out and "uniform baselines" in out and "*" in out
    assert "chosen allocation" in out
    assert os.path.exists(alloc) and os.path.exists(str(tmp_path / "alloc.pareto.png"))
    d = json.load(open(alloc))
    assert d["objectives"]["within_budget"] and len(d["layers"]) == 14
    assert d["method"] == "rtn" and d["lora_init"] == "svd"
    # same search again: refused without --resume, answered from the archive with it
    one_line_error(*run(capsys, "search", "--model", model_dir, "--budget-bits", "3.5",
                        "--out", alloc, *cache, *SMALL)[::2], "--resume")
    code, out, err = run(capsys, "search", "--model", model_dir, "--budget-bits", "3.5",
                         "--out", alloc, "--resume", *cache, *SMALL)
    assert code == 0 and "'cheap': 0" in out and "'proxy': 0" in out, out
    assert json.load(open(alloc))["layers"] == d["layers"]
    # an infeasible budget names the smallest feasible one
    code, out, err = run(capsys, "search", "--model", model_dir, "--budget-bits", "1",
                         "--default-rank", "0", "--out", str(tmp_path / "x.json"), *cache,
                         *SMALL[:2], *SMALL[4:])
    one_line_error(code, err, "smallest feasible budget is --budget-bits")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_saves_what_the_search_scored_and_it_reloads(capsys, tmp_path, model_dir,
                                                              method):
    """search → quantize → from_pretrained: QRALinear layers whose packed weights and
    adapters are the search's entries, and logits equal the evaluated allocation's."""
    import torch
    from transformers import AutoModelForCausalLM

    import qra_kernels  # noqa: F401 - registers "qra"
    from qra_kernels.allocation import Allocation
    from qra_kernels.modules import qra_layers
    from qra_search.evaluate import Evaluator
    from qra_search.models import load_model
    from qra_search.store import quant_store
    alloc = str(tmp_path / "alloc.json")
    cache = str(tmp_path / "cache")
    # ranks up to 8 in the search, while `qra quantize` alone would default to 64 factors:
    # both go through one store factory, so they read the same entries.
    small = [a for a in SMALL] + ["--hessian-blocks", "8"]
    small[small.index("--method") + 1] = method
    code, _, err = run(capsys, "search", "--model", model_dir, "--budget-bits", "4.5",
                       "--out", alloc, "--cache-dir", cache, *small)
    assert code == 0, err
    q = str(tmp_path / "q")
    code, out, err = run(capsys, "quantize", "--model", model_dir, "--allocation", alloc,
                         "--out", q, "--cache-dir", cache, "--no-progress")
    assert code == 0, err
    a = Allocation.load(alloc)
    assert Allocation.load(os.path.join(q, "allocation.json")).layers == a.layers
    reloaded = AutoModelForCausalLM.from_pretrained(q).eval()
    layers = qra_layers(reloaded)
    assert set(layers) == set(a.layers)
    for n, spec in a.layers.items():
        assert (layers[n].bits, layers[n].rank) == (spec["bits"], spec["rank"])
    # the search's view of the same allocation: dense swap of the stored entries
    model, tok = load_model(model_dir)
    from qra_search.models import search_calibration
    from qra_search.quantize import search_config_of
    _, hess = search_calibration(tok, search_config_of(a, method))
    assert (hess is not None) == (method == "gptq")
    store = quant_store(model, a.layers, group_size=a.group_size, method=method,
                        cache_dir=cache, hessian_tokens=hess)
    for n, spec in a.layers.items():
        e = store.get(n, spec["bits"])
        assert torch.equal(layers[n].qweight, e["qw"].qweight), n
        r = spec["rank"]
        if r:
            torch.testing.assert_close(layers[n].scaling * layers[n].lora_B @ layers[n].lora_A,
                                       e["B"][:, :r] @ e["A"][:r], rtol=0, atol=1e-6)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    ev = Evaluator(model, store, ids)
    ev.apply({n: (s["bits"], s["rank"]) for n, s in a.layers.items()})
    with torch.no_grad():
        want = model(ids).logits
        got = reloaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the quantized directory is refused as the input of another quantization
    one_line_error(*run(capsys, "quantize", "--model", q, "--allocation", alloc, "--out",
                        str(tmp_path / "q2"))[::2], "already quantized")


def test_refusals_come_before_the_model_loads(capsys, tmp_path, model_dir, monkeypatch):
    """Each refusal is one line, exit 2, and nothing was loaded."""
    from qra_search import models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    from qra_kernels.allocation import Allocation
    alloc = tmp_path / "a.json"
    Allocation(layers={"model.layers.0.mlp.up_proj": {"bits": 4, "rank": 0}}).save(alloc)
    out_file = tmp_path / "exists.txt"
    out_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    not_model = tmp_path / "notmodel"
    not_model.mkdir()
    (not_model / "config.json").write_text("{}")
    cases = [
        (("quantize", "--model", model_dir, "--allocation", str(alloc), "--out", str(out_file)),
         "is a file"),
        (("quantize", "--model", model_dir, "--allocation", str(alloc), "--out", str(full)),
         "not empty"),
        (("quantize", "--model", str(not_model), "--allocation", str(alloc), "--out",
          str(tmp_path / "o")), "lacks weights"),
        (("search", "--model", str(not_model), "--out", str(tmp_path / "s.json")), "lacks"),
        (("search", "--model", model_dir, "--out", str(full)), "is a directory"),
        (("search", "--model", model_dir, "--out", str(tmp_path / "no" / "dir" / "a.json")),
         "does not exist"),
        (("demo", "--model", model_dir, "--out", str(out_file)), "is a file"),
        (("demo", "--model", model_dir, "--out", str(full)), "not empty"),
    ]
    for argv, pattern in cases:
        one_line_error(*run(capsys, *argv)[::2], pattern)
    # an allocation naming a layer the model lacks: refused from the config alone
    bad = tmp_path / "bad.json"
    Allocation(layers={"model.layers.7.mlp.up_proj": {"bits": 4}}).save(bad)
    one_line_error(*run(capsys, "quantize", "--model", model_dir, "--allocation", str(bad),
                        "--out", str(tmp_path / "o2"))[::2], "model.layers.7")
