"""The comparison harness: equal-memory allocations, rank correlation, and a tiny run end
to end (rows written one at a time, a rerun skips what is done)."""
import json
import random

import pytest

from qra_kernels.allocation import linear_shapes
from qra_search.compare import (closest_uniform, main, random_allocation, spearman,
                                widest_uniforms)
from qra_search.costs import CostModel
from qra_search.evaluate import layer_groups
from qra_search.genes import Budget, GeneSpace


def test_random_allocations_land_within_one_percent_of_the_budget(model):
    shapes = linear_shapes(model)
    groups = layer_groups(list(shapes), "module")
    costs = CostModel(shapes, 64)
    space = GeneSpace(groups, (2, 3, 4, 8), (0, 4, 8, 16), costs, Budget())
    target = space.memory(space.uniform(4, 8))
    seen = set()
    for seed in range(5):
        cfg = random_allocation(space, target, random.Random(seed))
        assert 0.99 * target <= space.memory(cfg) <= target
        seen.add(space.key(cfg))
    assert len(seen) > 1  # they differ
    u = closest_uniform(space, target)
    assert space.memory(u) == target
    from qra_search.compare import greedy_allocation
    assert 0.99 * target <= space.memory(greedy_allocation(space, target)) <= target
    wide = widest_uniforms(space, target)
    assert wide["uniform-4b-r8"] == space.uniform(4, 8)
    assert "uniform-8b-r0" not in wide or space.memory(space.uniform(8, 0)) <= target
    for name, cfg in wide.items():
        b, r = cfg[space.names[0]]
        assert space.memory(cfg) <= target and name == f"uniform-{b}b-r{r}"
        wider = [x for x in space.ranks if x > r]
        assert not wider or space.memory(space.uniform(b, wider[0])) > target


def test_only_is_checked_before_anything_loads(capsys):
    """--only names rows the way the rows carry them (4.0 -> "4"); what this run cannot have
    is an error on one line with exit status 2 (the model is never loaded: it does not exist)."""
    from qra_search.compare import _parse_only, build_parser
    p = build_parser()
    args = p.parse_args(["--out", "o", "--budgets", "4.0,3.5", "--seeds", "0,1",
                         "--only", "4.0:searched:0,3.5:greedy:1,4:uniform:0"])
    assert _parse_only(p, args) == {("4", "searched", "0"), ("3.5", "greedy", "1"),
                                    ("4", "uniform", "0")}
    for bad, said in [("3.0:searched:0", "not in --budgets"), ("4.0:searched:2", "not in --seeds"),
                      ("4.0:searched", "budget:variant:seed"), ("x:searched:0", "not a number")]:
        with pytest.raises(SystemExit) as e:
            main(["--out", "o", "--model", "/nonexistent", "--budgets", "4.0", "--seeds", "0",
                  "--only", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert said in err.splitlines()[-1]


def test_selection_defaults_match_search_config():
    """compare's and the CLI's parsers spell SearchConfig's selection defaults out (importing
    it loads torch); they must not drift from it."""
    from qra_search.cli import build_parser as cli_parser
    from qra_search.compare import DEFAULT_KL_WEIGHT, build_parser
    from qra_search.config import SearchConfig
    c = SearchConfig()
    args = build_parser().parse_args(["--out", "x"])
    assert (args.select, args.kl_weight, args.kl_slack) == (c.select, c.kl_weight, c.kl_slack)
    assert DEFAULT_KL_WEIGHT == c.kl_weight
    s = cli_parser().parse_args(["search"])
    assert (s.select, s.kl_weight, s.kl_slack) == (c.select, c.kl_weight, c.kl_slack)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


def test_tiny_run_end_to_end_and_resume(tmp_path, make_model, make_tokenizer, capsys):
    d = tmp_path / "tiny"
    make_model().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--model", str(d), "--budgets", "4.0", "--seeds", "0,1",
            "--steps", "3", "--batch", "1", "--seq-len", "32", "--finetune-corpus", "licenses",
            "--heldout-corpus", "python-docs-odd", "--heldout-blocks", "2",
            "--ranks", "0,4,8", "--default-rank", "4", "--evaluations", "4",
            "--refine-steps", "1", "--proxy-steps", "1", "--calib-blocks", "3",
            "--randoms", "1", "--threads", "1", "--granularity", "module"]
    assert main(argv) == 0
    rows = [json.loads(l) for l in open(out / "rows.jsonl")]
    fts = [r for r in rows if r["kind"] == "finetune"]
    variants = {r["variant"] for r in fts}
    err = capsys.readouterr().err
    for r in fts:  # module granularity: a group is a layer; "g=bits/rank;..."
        ranks = [int(o.rsplit("/", 1)[1]) for o in r["allocation_key"].split(";")]
        assert r["adapted_layers"] == sum(1 for x in ranks if x > 0)
        if r["adapted_layers"] == 0:  # nothing to train: said, and "after" is "before"
            assert f"{r['variant']}: every layer at rank 0" in err
            assert abs(r["heldout_loss_after"] - r["heldout_loss_before"]) < 1e-4
    base = {"searched", "greedy", "uniform", "random-0"}
    assert variants >= base and all(v.startswith(("uniform-", "greedy-r"))
                                    for v in variants - base)
    assert "uniform-4b-r4" not in variants  # it is "uniform", the budget's own: not repeated
    assert any(v.startswith("uniform-3b-") for v in variants)
    keys = {}
    for r in fts:
        keys.setdefault(r["variant"], r["allocation_key"])
    extra = [v for v in keys if v.startswith(("greedy-r", "uniform-"))]
    assert len({keys[v] for v in extra} | {keys[v] for v in keys if v not in extra}) == \
        len(extra) + len({keys[v] for v in keys if v not in extra})  # extras are new allocations
    assert all(0.99 <= r["memory_ratio_to_budget"] <= 1.0 for r in fts
               if r["variant"] in ("greedy", "uniform", "random-0")
               or r["variant"].startswith("greedy-r"))
    assert all(r["memory_ratio_to_budget"] <= 1.0 for r in fts)
    summary = json.load(open(out / "summary.json"))["4"]
    assert set(summary["variants"]) == variants
    assert summary["finetune_epoch_seconds"] > 0 and "search_over_epoch" in summary
    # the default selection's own score is ranked against the outcome too
    assert summary["kl_weight"] == 2.5
    t = summary["variants"]
    score = [t[v]["proxy_loss"] + 2.5 * t[v]["calib_kl"] for v in t]
    assert summary["spearman_score_vs_final"] == pytest.approx(
        spearman(score, [t[v]["heldout_loss_after_mean"] for v in t]))
    # rerun: every fine-tune row is done, none is repeated
    assert main(argv) == 0
    again = [json.loads(l) for l in open(out / "rows.jsonl")]
    assert len([r for r in again if r["kind"] == "finetune"]) == len(fts)
    # rows of an allocation the search no longer returns are stale: rerun, not counted
    lines = [json.loads(l) for l in open(out / "rows.jsonl")]
    first = next(r for r in lines if r["kind"] == "search")
    g0 = sorted(first["allocations"]["searched"]["config"])[0]
    b, rk = first["allocations"]["searched"]["config"][g0]
    first["allocations"]["searched"]["config"][g0] = [8 if b != 8 else 2, rk]
    for r in lines:
        if r["kind"] == "finetune" and r["variant"] == "searched":
            del r["allocation_key"]  # as rows written before the key was recorded
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(argv) == 0
    final = [r for r in map(json.loads, open(out / "rows.jsonl")) if r["kind"] == "finetune"]
    capsys.readouterr()
    # a variant the search does not have: said, nothing run, exit status 1
    assert main(argv + ["--only", "4.0:no-such-variant:0"]) == 1
    assert "'no-such-variant' at budget 4" in capsys.readouterr().err
    assert len([r for r in map(json.loads, open(out / "rows.jsonl"))
                if r["kind"] == "finetune"]) == len(final)
    n_searched = len([r for r in fts if r["variant"] == "searched"])
    assert len(final) == len(fts) + n_searched  # only the stale rows were run again
