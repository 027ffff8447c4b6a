"""Stage I (sensitivity), II (repair, greedy, CMA-ES) and III (GP, EI) on a tiny model."""
import json

import numpy as np
import pytest

from qra_search.evolution import Budget, GeneSpace, explore
from qra_search.refinement import GaussianProcess, expected_improvement, matern52, refine
from qra_search.sensitivity import profile


def test_sensitivity_profile_is_ordered_and_cached(tiny_search):
    ev, groups, costs, tmp = tiny_search
    sens = profile(ev, groups, (2, 3, 4, 8), (0, 4, 8), str(tmp), progress=False)
    for g in groups:
        kl = sens.kl[g]
        assert kl[2] > kl[3] > kl[4] > kl[8] >= 0
        rec = sens.recovered[g][2]
        assert rec[0] == 0 and 0 < rec[4] < rec[8] < 1
        assert sens.predicted(g, 2, 8) < sens.predicted(g, 2, 0)
    n = ev.n_forward
    again = profile(ev, groups, (2, 3, 4, 8), (0, 4, 8), str(tmp), progress=False)
    assert ev.n_forward == n and again.to_dict() == json.loads(json.dumps(sens.to_dict()))


def _space(tiny_search, budget_bits=3.5, ranks=(0, 4, 8)):
    ev, groups, costs, tmp = tiny_search
    sens = profile(ev, groups, (2, 3, 4, 8), ranks, str(tmp), progress=False)
    budget = Budget(costs.uniform_bytes(budget_bits, 4))
    return GeneSpace(groups, (2, 3, 4, 8), ranks, costs, budget, sens), ev


def test_decode_encode_and_repair_keep_candidates_in_budget(tiny_search):
    space, _ = _space(tiny_search)
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.uniform(-0.2, 1.2, space.dim)
        cfg = space.decode(x)
        assert space.decode(space.encode(cfg)) == cfg
        fixed = space.repair(cfg)
        assert space.feasible(fixed)
        if space.feasible(cfg):
            assert fixed == cfg
    top = space.uniform(8, 8)
    assert not space.feasible(top) and space.feasible(space.repair(top))


def test_greedy_seed_fits_and_uses_the_budget(tiny_search):
    space, _ = _space(tiny_search)
    g = space.greedy()
    assert space.feasible(g)
    assert space.memory(g) > space.memory(space.cheapest())
    with pytest.raises(ValueError, match="no allocation fits"):
        space.greedy(Budget(space.memory(space.cheapest()) - 1))


def test_cma_es_stays_feasible_and_improves_on_its_start(tiny_search):
    space, ev = _space(tiny_search)
    start = space.cheapest()
    seen = explore(space, start, lambda c: ev.kl(space.layers(c)), evaluations=12, seed=0,
                   popsize=6, progress=False)
    assert len(seen) == 12 and all(space.feasible(c) for c in seen)
    assert min(ev.kl(space.layers(c)) for c in seen) < ev.kl(space.layers(start))


def test_gp_fits_a_smooth_function_and_ei_prefers_promise():
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (30, 2))
    y = np.sin(3 * X[:, 0]) + 0.1 * X[:, 1]
    gp = GaussianProcess(seed=0).fit(X, y)
    Xt = rng.uniform(0, 1, (20, 2))
    mu, sd = gp.predict(Xt)
    assert np.abs(mu - (np.sin(3 * Xt[:, 0]) + 0.1 * Xt[:, 1])).max() < 0.1
    assert gp.lengthscales[1] > gp.lengthscales[0]  # ARD: the nearly flat dimension is long
    assert np.allclose(np.diag(matern52(X, X, np.ones(2), 2.0)), 2.0)
    ei = expected_improvement(np.array([0.0, 1.0, 0.0]), np.array([0.1, 0.1, 1.0]), 0.5)
    assert ei[0] > ei[1] and ei[2] > ei[0]


def test_refinement_evaluates_new_feasible_candidates(tiny_search):
    space, ev = _space(tiny_search)
    score = lambda c: ev.kl(space.layers(c))
    hist = [(c, score(c)) for c in (space.greedy(), space.cheapest(), space.uniform(3, 0))]
    new = refine(space, hist, score, steps=3, seed=0, candidates=40, progress=False)
    keys = {space.key(c) for c, _ in hist}
    assert 1 <= len(new) <= 3
    assert all(space.feasible(c) and space.key(c) not in keys for c in new)


def test_gp_likelihood_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    X, y = rng.uniform(0, 1, (12, 3)), rng.normal(size=12)
    gp = GaussianProcess()
    theta = np.log([0.4, 0.9, 2.0, 1.3, 0.05])
    f, g = gp._nll(theta, X, y)
    for i in range(len(theta)):
        h = np.zeros_like(theta)
        h[i] = 1e-6
        fd = (gp._nll(theta + h, X, y)[0] - gp._nll(theta - h, X, y)[0]) / 2e-6
        assert fd == pytest.approx(g[i], rel=1e-4, abs=1e-6)
