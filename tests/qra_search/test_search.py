"""run_search end to end on a tiny model: budgets, archive resume, reproducibility."""
import json

import pytest
import torch

from qra_search import Allocation, run_search
from qra_search.archive import Archive, pareto_front


KW = dict(rank_choices=(0, 4, 8), default_rank=4, method="rtn", evaluations=8, popsize=4,
          refine_steps=2, proxy_top=1, proxy_steps=2, progress=False)


def test_pareto_front_indices():
    pts = [[1, 5], [2, 2], [3, 3], [5, 1], [2, 2]]
    assert pareto_front(pts) == [0, 1, 3]


def test_search_result_respects_budget_and_contract(model, tokens, tmp_path, make_model):
    r = run_search(model, tokens, 3.5, cache_dir=str(tmp_path), archive=str(tmp_path / "a.jsonl"), **KW)
    assert isinstance(r.best, Allocation)
    assert r.best.memory_bytes <= r.budget["memory_bytes"]
    assert r.best.objectives["within_budget"]
    mems = [o["memory_bytes"] for _, o in r.pareto]
    quals = [o["quality"] for _, o in r.pareto]
    assert mems == sorted(mems) and quals == sorted(quals, reverse=True)  # a real front
    for a, o in r.pareto:
        assert a.memory_bytes == o["memory_bytes"]
    assert set(r.timings) >= {"quantize", "sensitivity", "exploration", "refinement", "descent",
                              "proxy"}
    # the model is left with its float weights
    fresh = make_model()
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    r.best.save(str(tmp_path / "alloc.json"))
    assert Allocation.load(str(tmp_path / "alloc.json")).layers == r.best.layers


def test_select_kl_proxy_and_proxy_near_kl(
        model, tokens, tmp_path):
    arch = tmp_path / "a.jsonl"
    kw = {**KW, "proxy_top": 2}
    r = run_search(model, tokens, 3.5, cache_dir=str(tmp_path), archive=str(arch),
                   **{**kw, "select": "kl"})
    recs = [json.loads(l) for l in arch.read_text().splitlines()[1:]]
    recs = [x for x in recs if "fidelity" in x]
    limit = r.budget["memory_bytes"]
    cheap = [x for x in recs if x["fidelity"] == "cheap" and x["memory_bytes"] <= limit]
    assert r.best.objectives["quality"] == min(x["quality"] for x in cheap)
    assert "descent" in {x["stage"] for x in recs}
    # the first greedy seed spends the budget (fill), and the result is never worse than it
    seeds = [x for x in recs if x["stage"] == "seed" and x["fidelity"] == "cheap"]
    assert max(x["memory_bytes"] for x in seeds if x["memory_bytes"] <= limit) >= 0.99 * limit
    assert r.best.objectives["quality"] <= min(x["quality"] for x in seeds
                                               if x["memory_bytes"] <= limit)
    p = run_search(model, tokens, 3.5, cache_dir=str(tmp_path), archive=str(arch), resume=True,
                   **{**kw, "select": "proxy"})
    recs = [json.loads(l) for l in arch.read_text().splitlines()[1:]]
    proxies = [x["quality"] for x in recs if x.get("fidelity") == "proxy"]
    assert len(proxies) >= 2
    assert p.best.objectives["proxy_loss"] == min(proxies)
    assert p.evaluations["cheap"] == 0  # the second run only re-read the archive
    # the default: the lowest proxy loss among finalists within kl_slack of the lowest KL
    kl_of = {x["key"]: x["quality"] for x in recs if x.get("fidelity") == "cheap"}
    prox = {x["key"]: x["quality"] for x in recs if x.get("fidelity") == "proxy"}
    floor = min(kl_of[k] for k in prox)
    for slack in (1.0, 1.5, 1e6):
        d = run_search(model, tokens, 3.5, cache_dir=str(tmp_path), archive=str(arch),
                       resume=True, **{**kw, "kl_slack": slack})
        eligible = [k for k in prox if kl_of[k] <= slack * floor]
        assert d.best.objectives["proxy_loss"] == min(prox[k] for k in eligible)
        assert d.best.objectives["quality"] <= slack * floor
    # proxy+kl: the lowest proxy loss + kl_weight x KL; weight 0 is the proxy's own pick
    for weight in (0.0, 3.0, 1e6):
        d = run_search(model, tokens, 3.5, cache_dir=str(tmp_path), archive=str(arch),
                       resume=True, **{**kw, "select": "proxy+kl", "kl_weight": weight})
        score = {k: prox[k] + weight * kl_of[k] for k in prox}
        got = d.best.objectives["proxy_loss"] + weight * d.best.objectives["quality"]
        assert got == pytest.approx(min(score.values()))
    assert d.best.objectives["quality"] == floor  # an enormous weight: the lowest KL
    with pytest.raises(ValueError, match="kl_slack"):
        run_search(model, tokens, 3.5, **{**KW, "kl_slack": 0.5})
    with pytest.raises(ValueError, match="kl_weight"):
        run_search(model, tokens, 3.5, **{**KW, "kl_weight": -1.0})
    with pytest.raises(ValueError, match="select"):
        run_search(model, tokens, 3.5, **{**KW, "select": "best"})
    with pytest.raises(ValueError, match="proxy_top"):
        run_search(model, tokens, 3.5, **{**KW, "select": "proxy", "proxy_top": 0})


def test_select_finalist_on_the_gemma3_finalists():
    """The finalists of the Gemma-3-270M search at 4.0 bits (KL, proxy loss: the archive in
    benches/results/compare-gemma3-270m-gptq-b4.0-200steps). Descent drove the lowest KL to a
    rank-0/4 allocation 2.4x below every other finalist, so ``proxy-near-kl`` (slack 2) had
    nothing else to choose from and returned it; after 200 steps of fine-tuning it was 0.14
    nats worse than uniform 4-bit r16. ``proxy+kl`` weighs the two instead."""
    from qra_search.config import SearchConfig
    from qra_search.search import select_finalist
    fin = {"lowest-kl": (0.0955, 4.6424), "greedy": (0.2802, 3.2878), "r4": (0.2847, 3.1402),
           "r8": (0.2743, 3.1274), "r16": (0.2906, 3.1074), "uniform": (0.2327, 3.2475)}
    names = list(fin)
    kl = {n: v[0] for n, v in fin.items()}
    proxy = {n: v[1] for n, v in fin.items()}

    def pick(**kw):
        return select_finalist(names, lambda n: n, kl, proxy, SearchConfig(**kw))
    assert pick(select="kl") == "lowest-kl"
    assert pick(select="proxy-near-kl", kl_slack=2.0) == "lowest-kl"
    assert pick(select="proxy") == "r16"
    assert pick(select="proxy+kl", kl_weight=0.0) == "r16"
    assert pick(select="proxy+kl") == "r8"  # 3.813 against uniform's 3.829 (weight 2.5)
    assert pick(select="proxy+kl", kl_weight=3.0) == "uniform"  # 3.946 against r8's 3.950
    assert pick(select="proxy+kl", kl_weight=100.0) == "lowest-kl"
    assert select_finalist(names, lambda n: n, kl, {}, SearchConfig()) == "lowest-kl"


def test_infeasible_budget_names_the_smallest_feasible(model, tokens):
    with pytest.raises(ValueError, match=r"smallest feasible budget is --budget-bits (\d+\.\d+)") as e:
        run_search(model, tokens, 1.0, **{**KW, "default_rank": 0})
    import re
    need = float(re.search(r"--budget-bits (\d+\.\d+)", str(e.value)).group(1))
    run_search(model, tokens, need, **{**KW, "default_rank": 0, "evaluations": 4,
                                       "refine_steps": 0})  # it fits
    with pytest.raises(ValueError, match="--budget-mb"):
        run_search(model, tokens, None, budget_mb=0.001, **KW)
    with pytest.raises(ValueError, match="bits choice 5"):
        run_search(model, tokens, 4.0, bits_choices=(4, 5))
    with pytest.raises(ValueError, match="rank choice -1"):
        run_search(model, tokens, 4.0, rank_choices=(0, -1))
    with pytest.raises(ValueError, match="budget_bits"):
        run_search(model, tokens, float("nan"))


def test_reproducible_from_seed(tokens, tmp_path, make_model):
    tiny_llama = make_model
    a = run_search(tiny_llama(), tokens, 3.5, seed=3, cache_dir=str(tmp_path), **KW)
    b = run_search(tiny_llama(), tokens, 3.5, seed=3, cache_dir=str(tmp_path), **KW)
    assert a.best.layers == b.best.layers
    assert [(x.layers, o) for x, o in a.pareto] == [(x.layers, o) for x, o in b.pareto]


def test_resume_after_interruption_reevaluates_nothing(tokens, tmp_path, make_model):
    tiny_llama = make_model
    arch = tmp_path / "run.jsonl"
    full = run_search(tiny_llama(), tokens, 3.5, seed=1, cache_dir=str(tmp_path),
                      archive=str(tmp_path / "full.jsonl"), **KW)
    # Interrupt a search after 9 evaluations (the Evaluator raises as a kill would) ...
    from qra_search import evaluate
    orig, calls = evaluate.Evaluator.kl, {"n": 0}

    def killed(self, cfg):
        calls["n"] += 1
        if calls["n"] > 9:  # the sensitivity profile is cached in tmp_path by the full run
            raise KeyboardInterrupt
        return orig(self, cfg)
    evaluate.Evaluator.kl = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            run_search(tiny_llama(), tokens, 3.5, seed=1, cache_dir=str(tmp_path),
                       archive=str(arch), **KW)
    finally:
        evaluate.Evaluator.kl = orig
    lines = [l for l in arch.read_text().splitlines() if '"event"' not in l]
    assert len(lines) == 1 + 9
    with open(arch, "a") as f:
        f.write('{"key": "torn')  # a write cut by the kill
    with pytest.raises(ValueError, match="--resume"):
        run_search(tiny_llama(), tokens, 3.5, seed=1, archive=str(arch), **KW)
    resumed = run_search(tiny_llama(), tokens, 3.5, seed=1, cache_dir=str(tmp_path),
                         archive=str(arch), resume=True, **KW)
    assert resumed.evaluations["reused"] >= 9
    assert resumed.evaluations["cheap"] == full.evaluations["cheap"] - 9
    assert resumed.best.layers == full.best.layers
    assert [o for _, o in resumed.pareto] == [o for _, o in full.pareto]
    assert resumed.total_timings["total"] > resumed.timings["total"]  # both runs counted
    with pytest.raises(ValueError, match="different search"):
        run_search(tiny_llama(), tokens, 3.5, seed=2, archive=str(arch), resume=True, **KW)


def test_more_evaluations_extend_a_finished_search(tokens, tmp_path, make_model):
    """A finished search rerun with more evaluations continues from its archive and ends
    where an uninterrupted run with that many evaluations ends."""
    kw = {**KW, "evaluations": 4, "granularity": "module"}
    arch = str(tmp_path / "ext.jsonl")
    first = run_search(make_model(), tokens, 3.5, seed=1, cache_dir=str(tmp_path),
                       archive=arch, **kw)
    more = run_search(make_model(), tokens, 3.5, seed=1, cache_dir=str(tmp_path),
                      archive=arch, resume=True, **{**kw, "evaluations": 12})
    assert more.evaluations["reused"] >= first.evaluations["cheap"] - 2
    assert more.evaluations["cheap"] > 0
    fresh = run_search(make_model(), tokens, 3.5, seed=1, cache_dir=str(tmp_path),
                       archive=str(tmp_path / "fresh.jsonl"), **{**kw, "evaluations": 12})
    assert more.best.layers == fresh.best.layers
    assert [o for _, o in more.pareto] == [o for _, o in fresh.pareto]


def test_a_search_killed_in_each_stage_resumes_to_the_same_result(tokens, tmp_path, make_model):
    """Kill (as an exception in the evaluator would) inside stage 0, I, II, III, IV and the
    proxy stage; each resumed run returns what the uninterrupted run returned."""
    from qra_search import evaluate, store as store_mod
    full = run_search(make_model(), tokens, 3.5, seed=4, cache_dir=str(tmp_path / "c0"),
                      archive=str(tmp_path / "full.jsonl"), **KW)
    cases = {"quantize": (store_mod.QuantStore, "_compute", 5),
             "sensitivity": (evaluate.Evaluator, "kl", 3),
             "exploration": (evaluate.Evaluator, "kl", 14),
             "refinement": (evaluate.Evaluator, "kl", None),
             "descent": (evaluate.Evaluator, "kl", None),
             "proxy": (evaluate.Evaluator, "finetune", 1)}
    stages = [json.loads(l).get("stage") for l in open(tmp_path / "full.jsonl")
              if '"fidelity": "cheap"' in l]
    n_gp, n_descent = stages.count("gp"), stages.count("descent")
    assert n_gp >= 2 and n_descent >= 2  # each kill lands after the stage's first call
    n_kl_before_gp = 8 + full.evaluations["cheap"] - n_gp - n_descent  # 8: stage I's passes
    for stage, (cls, meth, after) in cases.items():
        if stage == "refinement":
            after = n_kl_before_gp + 1  # within the GP steps
        elif stage == "descent":
            after = n_kl_before_gp + n_gp + 1  # within the descent
        cache, arch = str(tmp_path / f"c-{stage}"), str(tmp_path / f"{stage}.jsonl")
        orig, calls = getattr(cls, meth), {"n": 0}

        def killed(self, *a, _orig=orig, _after=after, **k):
            calls["n"] += 1
            if calls["n"] > _after:
                raise KeyboardInterrupt
            return _orig(self, *a, **k)
        setattr(cls, meth, killed)
        try:
            with pytest.raises(KeyboardInterrupt):
                run_search(make_model(), tokens, 3.5, seed=4, cache_dir=cache, archive=arch, **KW)
        finally:
            setattr(cls, meth, orig)
        events = [json.loads(l) for l in open(arch) if '"event"' in l]
        assert events[-1]["stage"] == stage and events[-1]["interrupted"], events
        resumed = run_search(make_model(), tokens, 3.5, seed=4, cache_dir=cache, archive=arch,
                             resume=True, **KW)
        assert resumed.best.layers == full.best.layers, stage
        assert [o for _, o in resumed.pareto] == [o for _, o in full.pareto], stage


def test_latency_budget(model, tokens):
    from qra_search.costs import LatencyTable
    from qra_kernels.allocation import linear_shapes
    entries = [{"n": n, "k": k, "bits": b, "rank": r, "m": 1, "us": b * 1.0 + r * 0.1}
               for n, k in set(linear_shapes(model).values()) for b in (2, 3, 4, 8)
               for r in (0, 4, 8)]
    table = LatencyTable("fake", entries)
    r = run_search(model, tokens, None, budget_latency_us=14 * 3.5, latency_table=table,
                   **{**KW, "evaluations": 4, "refine_steps": 1})
    assert r.best.objectives["latency_us"] <= 14 * 3.5
    with pytest.raises(ValueError, match="smallest feasible budget is --budget-latency-us 28"):
        run_search(model, tokens, None, budget_latency_us=10, latency_table=table, **KW)


def test_calibration_from_texts_or_id_lists(make_tokenizer):
    from qra_search.models import documentation_texts
    from qra_search.search import tokens_from
    tok = make_tokenizer()
    t = tokens_from(documentation_texts()[:50], tok, seq_len=16, n_blocks=3)
    assert t.shape == (3, 16) and t.dtype == torch.long
    assert tokens_from([[1, 2, 3, 4], [5, 6, 7, 8]], seq_len=4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match="tokenizer"):
        tokens_from(["some text"])
    with pytest.raises(ValueError, match="calibration"):
        tokens_from(42)


def test_search_with_gptq_hessians_from_more_calibration(model, tokens, tmp_path):
    """GPTQ in the search: Hessians measured once (float inputs) on their own calibration
    blocks, cached on disk, and the archive header records which tokens they came from."""
    import torch
    hess = torch.randint(0, 256, (12, 32), generator=torch.Generator().manual_seed(5))
    kw = {**KW, "method": "gptq", "evaluations": 4, "refine_steps": 1}
    r = run_search(model, tokens, 3.5, cache_dir=str(tmp_path), hessian_calibration=hess,
                   archive=str(tmp_path / "g.jsonl"), **kw)
    assert r.best.method == "gptq" and r.best.memory_bytes <= r.budget["memory_bytes"]
    header = json.loads(open(tmp_path / "g.jsonl").readline())["header"]
    assert header["method"] == "gptq" and "hessian_tokens" in header
    assert list((tmp_path / "hessians").iterdir())
    with pytest.raises(ValueError, match="different search"):  # other Hessian tokens
        run_search(model, tokens, 3.5, cache_dir=str(tmp_path), hessian_calibration=hess[:6],
                   archive=str(tmp_path / "g.jsonl"), resume=True, **kw)


def test_proxy_trains_on_its_own_blocks(model, tmp_path):
    """proxy_blocks: the proxy fine-tune trains on calibration blocks disjoint from the KL
    blocks; too few blocks for them is a clear error."""
    import torch
    blocks = torch.randint(0, 256, (7, 32), generator=torch.Generator().manual_seed(8))
    kw = {**KW, "evaluations": 4, "refine_steps": 0, "n_blocks": 4}
    r = run_search(model, blocks, 3.5, proxy_blocks=3, archive=str(tmp_path / "p.jsonl"), **kw)
    assert r.evaluations["proxy"] >= 1
    header = json.loads(open(tmp_path / "p.jsonl").readline())["header"]
    assert header["proxy_blocks"] == 3 and "proxy_tokens" in header
    with pytest.raises(ValueError, match="proxy_blocks=5"):
        run_search(model, blocks, 3.5, proxy_blocks=5, **kw)
