"""Stage IV (measured descent) and the greedy's fill, on a synthetic interacting quality
and on a tiny model's real KL."""
import pytest

from qra_search.costs import CostModel
from qra_search.descent import descend, exchanges, one_level_moves
from qra_search.evaluate import layer_groups
from qra_search.genes import Budget, GeneSpace
from qra_search.sensitivity import Sensitivity, profile

BITS, RANKS = (2, 3, 4, 8), (0, 4, 8)
ERR = {2: 1.0, 3: 0.3, 4: 0.08, 8: 0.005}


def _synthetic(n=8, budget_bits=3.5):
    """``n`` blocks of two layers; alone, block g's harm is ``w_g · ERR[bits] · (1 - rank/16)``
    (what stage I would measure, every other block float), growing with depth. In the
    model the early blocks' harm is amplified (their error travels through every later
    block) and the late blocks' damped, with a compounding term on top: what the additive
    model cannot see."""
    shapes = {}
    for i in range(n):
        shapes[f"model.layers.{i}.self_attn.q_proj"] = (64, 64)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (64, 128)
    costs = CostModel(shapes, 64)
    groups = layer_groups(list(shapes), "block")
    names = list(groups)
    w = {g: 1.0 + 0.1 * i for i, g in enumerate(names)}
    context = {g: 3.0 if i < n // 2 else 0.6 for i, g in enumerate(names)}
    alone = lambda g, b, r: w[g] * ERR[b] * (1 - r / 16)
    sens = Sensitivity({g: {b: alone(g, b, 0) for b in BITS} for g in names},
                       {g: {b: {r: r / 16 for r in RANKS} for b in BITS} for g in names})
    space = GeneSpace(groups, BITS, RANKS, costs, Budget(costs.uniform_bytes(budget_bits, 4)), sens)

    def true(cfg):
        total, upstream = 0.0, 0.0
        for g in names:  # in block order
            h = context[g] * alone(g, *cfg[g])
            total += h * (1.0 + upstream)
            upstream += h
        return total
    return space, true


def test_fill_spends_the_budget_and_never_exceeds_it():
    space, _ = _synthetic()
    g, f = space.greedy(), space.greedy(fill=True)
    assert space.feasible(f) and space.memory(f) >= space.memory(g)
    target = space.budget.memory_bytes
    assert space.memory(f) >= 0.99 * target or all(
        space.memory({**f, m[0]: m[1]}) > target
        for m in one_level_moves(space, f) if space.memory({**f, m[0]: m[1]}) > space.memory(f))


def test_exchanges_move_each_group_once_and_fit_the_budget():
    space, true = _synthetic()
    centre = space.greedy(fill=True)
    q0 = true(centre)
    delta = {(g, o): true({**centre, g: o}) - q0 for g, o in one_level_moves(space, centre)}
    seq = exchanges(space, centre, delta)
    assert seq, "the interacting quality has measured gains the additive greedy missed"
    moved = [g for ex in seq for g, _ in ex]
    assert len(moved) == len(set(moved))
    for n in range(1, len(seq) + 1):
        trial = dict(centre)
        for ex in seq[:n]:
            # the move it is built around gains more than its paying downgrades cost
            assert delta[ex[0]] + sum(max(delta[m], 0.0) for m in ex[1:]) < 0
            for g, o in ex:
                trial[g] = o
        assert space.feasible(trial)


def test_descent_beats_the_additive_greedy_on_an_interacting_quality():
    space, true = _synthetic()
    start = space.greedy(fill=True)
    calls = []

    def score(cfg):
        calls.append(space.key(cfg))
        return true(cfg)
    seen = descend(space, start, true(start), score, rounds=3, progress=False)
    assert [space.key(c) for c in seen] == calls  # every measurement returned, in order
    best = min((c for c in seen if space.feasible(c)), key=true)
    assert true(best) < 0.5 * true(start)  # measured: 0.30
    per_round = len(one_level_moves(space, start)) + 8
    assert len(seen) <= 3 * per_round
    # zero rounds: nothing measured
    assert descend(space, start, true(start), score, rounds=0, progress=False) == []


def test_descent_stops_at_a_measured_local_optimum():
    space, true = _synthetic()
    start = space.greedy(fill=True)
    seen = descend(space, start, true(start), true, rounds=50, progress=False)
    best = min((c for c in seen if space.feasible(c)), key=true)
    # no feasible one-level change of the result measures better: a local optimum
    for g, o in one_level_moves(space, best):
        trial = {**best, g: o}
        if space.feasible(trial):
            assert true(trial) >= true(best) - 1e-12
    assert len(seen) < 50 * (len(one_level_moves(space, start)) + 8)  # it stopped early


@pytest.fixture
def real(tiny_search):
    ev, groups, costs, tmp_path = tiny_search
    sens = profile(ev, groups, BITS, RANKS, str(tmp_path), progress=False)
    space = GeneSpace(groups, BITS, RANKS, costs, Budget(costs.uniform_bytes(3.5, 4)), sens)
    return space, ev


def test_descent_on_real_kl_measures_each_neighbour_in_context(real):
    space, ev = real
    start = space.greedy(fill=True)
    kl = lambda c: ev.kl(space.layers(c))
    seen = descend(space, start, kl(start), kl, rounds=1, progress=False)
    keys = [space.key(c) for c in seen]
    neighbours = [space.key({**start, g: o}) for g, o in one_level_moves(space, start)]
    assert keys[:len(neighbours)] == neighbours  # every one-level change, in the model
    for c in seen[len(neighbours):]:  # then exchanges: inside the budget
        assert space.feasible(c)
