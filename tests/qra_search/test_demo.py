"""`qra demo` on the real SmolLM2-135M, as a user runs it, then the saved model read back
the way a user reads it: `import qra_kernels; AutoModelForCausalLM.from_pretrained`."""
import json
import os

import pytest
import torch

from qra_search import cli

pytestmark = pytest.mark.slow

# The demo's own path at the smallest effort that still runs every stage.
CHEAP = ["--bits", "4,8", "--ranks", "0,8", "--default-rank", "8", "--evaluations", "2",
         "--popsize", "2", "--refine-steps", "1", "--proxy-top", "1", "--proxy-steps", "1",
         "--calib-blocks", "2", "--heldout-blocks", "1", "--seq-len", "64", "--no-progress",
         "--threads", "2"]


def test_demo_model_reloads_with_the_evaluated_logits(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import qra_kernels  # noqa: F401 - registers "qra" with transformers
    from qra_kernels.allocation import Allocation
    from qra_kernels.modules import qra_layers
    from qra_search.evaluate import Evaluator
    from qra_search.models import calibration_and_heldout, load_model
    from qra_search.store import quant_store
    out = str(tmp_path / "demo")
    assert cli.main(["demo", "--out", out, *CHEAP]) == 0
    printed = capsys.readouterr().out
    assert "* = chosen" in printed and "*" in printed.split("uniform baselines")[0]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["qralinear_max_logit_diff"] < 1e-3
    assert report["peak_rss_mb"]["process"] > 0 and "sensitivity" in report["peak_rss_mb"]
    names = [r["model"] for r in report["perplexity"]]
    assert names == ["float", "uniform 4-bit", "uniform 4-bit + rank 8", "searched"]
    # the budget is uniform 4-bit + rank 8 itself: it fits, as does the searched allocation
    assert [r["within_budget"] for r in report["perplexity"]] == [None, True, True, True]
    alloc = Allocation.load(os.path.join(out, "allocation.json"))

    reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model")).eval()
    layers = qra_layers(reloaded)
    assert set(layers) == set(alloc.layers) and len(layers) == 210
    # The evaluated allocation: the search's dense swap of the very entries it scored.
    model, tok = load_model()
    store = quant_store(model, alloc.layers, group_size=alloc.group_size,
                        method=alloc.method, cache_dir=os.path.join(out, "cache"))
    _, held = calibration_and_heldout(tok, 64, 2, 1)
    ev = Evaluator(model, store, held)
    ev.apply({n: (s["bits"], s["rank"]) for n, s in alloc.layers.items()})
    with torch.no_grad():
        want = model(held).logits
        got = reloaded(held).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)
    # A rerun resumes: nothing is evaluated again.
    assert cli.main(["demo", "--out", out, *CHEAP]) == 0
    printed = capsys.readouterr().out
    assert "'cheap': 0" in printed and "'proxy': 0" in printed


def test_uniform_references_bracket_the_budget():
    from qra_search.demo import uniform_bits_near
    assert uniform_bits_near(4.0, (2, 3, 4, 8)) == [4]
    assert uniform_bits_near(3.25, (2, 3, 4, 8)) == [3, 4]
    assert uniform_bits_near(5.0, (2, 3, 4, 8)) == [4, 8]
    assert uniform_bits_near(3.25, (4, 8)) == [4]      # nothing below: the one above
    assert uniform_bits_near(9.0, (2, 4, 8)) == [8]
    assert uniform_bits_near(None, (2, 3, 4, 8)) == [4]  # budget in MiB or latency
    assert uniform_bits_near(None, (2, 8)) == []
