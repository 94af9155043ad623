"""The planner's probabilities: exact against brute force, worst cases checked, and matched by
1000 simulated audits that run the real challenge sampler.

    python -m pytest tests/test_planner.py -q        # add -s to print the simulated-vs-predicted table
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from aftune.protocol.challenge import derive_challenge
from aftune.errors import InputError
from aftune.protocol.planner import Threat, assess_challenge, plan, threat_detection, threat_model
from aftune.protocol.probability import (detection_probability, hypergeometric_miss, hypergeometric_miss_exact,
                                         placement_detection, weighted_miss)

# ---------------------------------------------------------------------------------------------
# Brute force (exact fractions, tiny grids).


def _grid(L, S):
    return [(l, s) for l in range(L) for s in range(S)]


def brute_uniform_miss(n, m, k):
    tampered = set(range(m))
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(1 for c in subsets if not tampered & set(c)), len(subsets))


def brute_weighted_miss(L, S, k, tampered, w):
    """Successive sampling without replacement, probability proportional to weight."""
    weight = {b: (w if b[0] in (0, L - 1) else 1) for b in _grid(L, S)}

    def rec(left, k):
        if k == 0:
            return Fraction(1)
        total = sum(weight[b] for b in left)
        return sum((Fraction(weight[b], total) * rec(left - {b}, k - 1) for b in left if b not in tampered),
                   Fraction(0))

    return rec(frozenset(weight), k)


def brute_stratified_miss(L, S, k_total, tampered):
    """Every r-subset of step blocks for the extra draws, every within-step subset, equally likely."""
    k, r = divmod(k_total, S)
    total = Fraction(0)
    extras = list(itertools.combinations(range(S), r))
    for extra in extras:
        p = Fraction(1)
        for s in range(S):
            take = k + (s in extra)
            subsets = list(itertools.combinations(range(L), take))
            p *= Fraction(sum(1 for c in subsets if not any((l, s) in tampered for l in c)), len(subsets))
        total += p
    return total / len(extras)


# ---------------------------------------------------------------------------------------------
# Exactness.


def test_hypergeometric_is_exact_against_enumeration():
    for n in range(1, 9):
        for m in range(n + 1):
            for k in range(n + 1):
                exact = brute_uniform_miss(n, m, k)
                assert hypergeometric_miss_exact(n, m, k) == exact
                assert hypergeometric_miss(n, m, k) == pytest.approx(float(exact), abs=1e-15)


def test_hypergeometric_large_grids():
    for n, m, k in [(10_000, 1, 500), (10_000, 37, 123), (100_000, 5000, 3000), (2_000, 1500, 100)]:
        assert hypergeometric_miss(n, m, k) == pytest.approx(float(hypergeometric_miss_exact(n, m, k)), rel=1e-11)
    assert detection_probability(10**6, 1, 1000) == pytest.approx(1e-3, rel=1e-12)  # m = 1: exactly K/N


def test_detection_is_monotone_and_above_the_binomial_bound():
    n = 60
    for m in (1, 3, 10):
        probs = [detection_probability(n, m, k) for k in range(n + 1)]
        assert probs == sorted(probs) and probs[0] == 0.0 and probs[-1] == 1.0
        for k in range(n + 1):
            assert probs[k] >= 1 - (1 - k / n) ** m - 1e-12  # docs/threats.md's lower bound
    for k in (1, 5, 20):
        assert [detection_probability(n, m, k) for m in range(n + 1)] == sorted(
            detection_probability(n, m, k) for m in range(n + 1))


@pytest.mark.parametrize("L,S,k", [(3, 2, 2), (4, 2, 3), (5, 1, 3), (4, 3, 3), (2, 3, 2)])
def test_weighted_is_exact_against_enumeration(L, S, k):
    for m in (1, 2):
        for tampered in itertools.combinations(_grid(L, S), m):
            edge = sum(1 for l, _ in tampered if l in (0, L - 1))
            exact = brute_weighted_miss(L, S, k, set(tampered), 4)
            assert weighted_miss(L, S, k, edge, m - edge, 4) == pytest.approx(float(exact), abs=1e-13)


@pytest.mark.parametrize("L,S,k", [(3, 2, 3), (3, 3, 4), (2, 4, 3), (4, 3, 7), (3, 4, 2)])
def test_stratified_is_exact_against_enumeration(L, S, k):
    for m in (1, 2, 3):
        for tampered in itertools.combinations(_grid(L, S), m):
            exact = brute_stratified_miss(L, S, k, set(tampered))
            assert 1 - placement_detection("stratified", k, L, S, tampered) == pytest.approx(float(exact), abs=1e-13)


@pytest.mark.parametrize("strategy", ["uniform", "weighted", "stratified", "columns"])
def test_worst_case_placement_is_the_minimum_over_all_placements(strategy):
    """For 'm blocks wherever the provider likes', the planner's figure is the least detection
    probability over every placement (brute force on small grids)."""
    for L, S in [(4, 3), (3, 4), (5, 2)]:
        for m in (1, 2, 3, 5):
            model = threat_model(Threat("tampered_blocks", m), L, S)
            for k in (1, 3, 5, L * S - 2):
                planned = threat_detection(model, strategy, k, L, S)
                least = min(placement_detection(strategy, k, L, S, t) for t in itertools.combinations(_grid(L, S), m))
                assert planned == pytest.approx(least, abs=1e-12), (L, S, m, k)


def test_threat_models():
    L, S = 8, 30
    skip = threat_model(Threat("skip_steps", 0.1), L, S)
    # the concentrating provider: one fake gradient norm per step block skips the step's updates
    assert (skip.tampered, skip.units, skip.shape) == (3, 3, "one_per_step_block")  # 0.1 x 30 is 3, not 4
    poison = threat_model(Threat("poison_examples", 0.01), L, S)
    assert (poison.tampered, poison.shape) == (1, "last_layer_block")
    params = threat_model(Threat("tamper_params", 0.3), L, S)
    assert params.tampered == 3 and params.shape == "free"
    sized = threat_model(Threat("tamper_params", 0.5), L, S, layer_block_params=[70, 10, 10, 10, 10, 10, 10, 10])
    assert sized.tampered == 1  # the big first block alone holds half the parameters
    layers = threat_model(Threat("substitute_layers", 0.25), L, S)
    assert (layers.tampered, layers.units) == (2 * 30, 2)
    # Without the grid's shape, a bound valid for every shape.
    assert threat_model(Threat("skip_steps", 0.1), None, None, num_blocks=240).tampered == 1
    assert threat_model(Threat("poison_examples", 0.1), None, None, num_blocks=240).tampered == 1
    # The one failing block hides in its step block from stratified sampling (1 of L per step block)
    # but not from whole columns: checking every step block always catches it.
    assert threat_detection(skip, "stratified", S, L, S) < 0.5
    assert threat_detection(skip, "columns", L * S, L, S) == 1.0
    assert threat_detection(skip, "columns", L * 10, L, S) == pytest.approx(1 - math.comb(27, 10) / math.comb(30, 10))
    # Poisoned labels enter the last layer block: weighting the edges helps.
    assert threat_detection(poison, "weighted", 10, L, S) > threat_detection(poison, "uniform", 10, L, S)
    for bad in [("skip_steps", 0), ("skip_steps", 1.5), ("tampered_blocks", 0), ("tampered_blocks", 1.5),
                ("flip_bits", 1), ("poison_examples", float("nan"))]:
        with pytest.raises(InputError):
            Threat(*bad)


def test_plan_reaches_the_target_with_the_fewest_blocks():
    threats = [Threat("tampered_blocks", 4), Threat("skip_steps", 0.05), Threat("poison_examples", 0.02)]
    p = plan(threats, target=0.99, num_layer_blocks=8, num_step_blocks=64)
    assert {o.strategy for o in p.options} == {"uniform", "weighted", "stratified", "columns"}
    for o in p.options:
        assert min(o.detection) >= 0.99
        step = 8 if o.strategy == "columns" else 1  # columns come whole: one column (8 blocks) fewer
        if o.count > step:  # one block (column) fewer misses the target for some threat
            assert min(threat_detection(m, o.strategy, o.count - step, 8, 64) for m in p.threats) < 0.99
    assert p.recommended.count == min(o.count for o in p.options)
    assert p.to_json()["recommended"]["strategy"] == p.recommended.strategy


def test_plan_with_only_the_block_count_is_uniform():
    p = plan([Threat("tampered_blocks", 10)], target=0.95, num_blocks=1000)
    assert [o.strategy for o in p.options] == ["uniform"] and p.notes
    k = p.recommended.count
    assert detection_probability(1000, 10, k) >= 0.95 > detection_probability(1000, 10, k - 1)
    assert plan([Threat("tampered_blocks", 1)], target=1.0, num_blocks=50).recommended.strategy == "all"
    for kw in [{}, {"num_blocks": 10, "num_layer_blocks": 3}, {"num_layer_blocks": 4}]:
        with pytest.raises(InputError):
            plan([Threat("tampered_blocks", 1)], **kw)
    with pytest.raises(InputError):
        plan([], num_blocks=10)
    with pytest.raises(InputError):
        plan([Threat("tampered_blocks", 11)], num_blocks=10)


def test_large_grid_plans_quickly():
    p = plan([Threat("tampered_blocks", 20), Threat("skip_steps", 0.01)], num_layer_blocks=16, num_step_blocks=2000)
    assert p.recommended.count < 32000 and min(p.recommended.detection) >= 0.99


def test_assess_a_challenge():
    c = derive_challenge(bytes(32), bytes(32), 6, 10, "stratified", count=10)
    a = assess_challenge(c, [Threat("skip_steps", 0.1), Threat("tampered_blocks", 2)])
    # one block in every step block, but the skipped step block's one failing block is 1 of its 6
    assert a.detection[0] == pytest.approx(1 / 6)
    columns = assess_challenge(derive_challenge(bytes(32), bytes(32), 6, 10, "columns", count=12),
                               [Threat("skip_steps", 0.1)])
    assert columns.count == 12 and columns.detection[0] == pytest.approx(2 / 10)  # 2 of 10 step blocks, whole
    assert a.detection[1] == pytest.approx(placement_detection("stratified", 10, 6, 10, [(0, 0), (0, 1)]))
    assert len(assess_challenge(c).to_json()["threats"]) == 4  # the smallest instance of each threat


# ---------------------------------------------------------------------------------------------
# 1000 simulated audits with the real sampler (fresh nonce each) vs the planner's probability.

AUDITS = 1000
# (L, S, tampered blocks, K): a spread of N, m, K, with tampered blocks in edge and interior rows.
CONFIGS = [
    (4, 8, [(1, 2), (2, 2), (0, 5)], 6),  # N = 32, m = 3, K = 6
    (5, 12, [(2, 0), (3, 4), (1, 7), (4, 7), (2, 11)], 9),  # N = 60, m = 5, K = 9
    (3, 20, [(1, 3), (1, 4)], 15),  # N = 60, m = 2, K = 15
    (6, 10, [(l, 4) for l in range(6)], 5),  # N = 60, m = 6: a step block failing everywhere, K = 5
    (5, 12, [(3, 1), (1, 5), (2, 8)], 15),  # N = 60: the concentrating provider, one block in 3 step blocks
]


def binomial_acceptance(n: int, p: float, level: float = 0.99) -> tuple[int, int]:
    """The central `level` interval of Binomial(n, p): [lo, hi] holds the count with probability >= level."""
    if p <= 0.0:
        return 0, 0
    if p >= 1.0:
        return n, n

    def pmf(x):
        return math.exp(math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1)
                        + x * math.log(p) + (n - x) * math.log1p(-p))

    tail = (1 - level) / 2
    cdf, lo = 0.0, 0
    while cdf + pmf(lo) <= tail:
        cdf += pmf(lo)
        lo += 1
    cdf, hi = 0.0, n
    while cdf + pmf(hi) <= tail:
        cdf += pmf(hi)
        hi -= 1
    return lo, hi


@pytest.mark.parametrize("strategy", ["uniform", "weighted", "stratified", "columns", "all"])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_simulated_audits_match_the_planner(strategy, config):
    L, S, tampered, k = CONFIGS[config]
    rng = random.Random(1000 * config + len(strategy))
    root = rng.randbytes(32)
    kw = {} if strategy == "all" else {"count": k}
    caught = 0
    for _ in range(AUDITS):
        c = derive_challenge(root, rng.randbytes(32), L, S, strategy, **kw)
        caught += any(b in tampered for b in c.blocks)
    predicted = placement_detection(strategy, c.num_challenged, L, S, tampered)
    lo, hi = binomial_acceptance(AUDITS, predicted)
    print(f"\n{strategy:>10} N={L * S:3d} m={len(tampered)} K={c.num_challenged:2d}: predicted {predicted:.4f}, "
          f"caught {caught}/{AUDITS}, 99% interval [{lo}, {hi}]")
    assert lo <= caught <= hi


@pytest.mark.parametrize("strategy", ["columns", "uniform"])
def test_planner_against_the_concentrating_adversary_matches_1000_audits(strategy):
    """Skipped steps in 10% of step blocks, each hidden behind one fake gradient norm in a layer
    block the provider picks at random: 1000 audits with fresh nonces catch it as often as the
    planner says, and whole columns catch it better than the same budget of uniform blocks would
    catch a step block that fails everywhere."""
    L, S, k = 6, 20, 24  # columns: 4 whole step blocks
    model = threat_model(Threat("skip_steps", 0.1), L, S)
    assert model.tampered == 2 and model.shape == "one_per_step_block"
    predicted = threat_detection(model, strategy, k, L, S)
    rng = random.Random(7 + len(strategy))
    root = rng.randbytes(32)
    caught = 0
    for _ in range(AUDITS):
        tampered = {(rng.randrange(L), s) for s in rng.sample(range(S), model.units)}
        c = derive_challenge(root, rng.randbytes(32), L, S, strategy, count=k)
        caught += bool(tampered & set(c.blocks))
    lo, hi = binomial_acceptance(AUDITS, predicted)
    print(f"\nconcentrating adversary, {strategy}: predicted {predicted:.4f}, caught {caught}/{AUDITS} [{lo}, {hi}]")
    assert lo <= caught <= hi
    if strategy == "columns":
        assert predicted == pytest.approx(1 - math.comb(S - 2, 4) / math.comb(S, 4))


def test_binomial_acceptance_interval():
    lo, hi = binomial_acceptance(1000, 0.5)
    assert 450 < lo < 465 and 535 < hi < 550 and lo + hi == 1000
    assert binomial_acceptance(1000, 1.0) == (1000, 1000)


# ---------------------------------------------------------------------------------------------
# The command (registered by aftune.cli.plan).

from conftest import invoke  # noqa: E402


def test_cli_plan(tmp_path):
    import json

    r = invoke("plan", "--total-blocks", 1000, "--target", 0.99, "--tampered-blocks", 10)
    assert r.exit_code == 0, r.output
    k = next(o for o in plan([Threat("tampered_blocks", 10)], num_blocks=1000).options).count
    assert f"--strategy uniform --sample-blocks {k}" in r.output
    r = invoke("plan", "--layer-blocks", 8, "--step-blocks", 64, "--skip-steps", 0.05, "--poison-examples", 0.02,
               "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["recommended"]["count"] == min(o["count"] for o in doc["options"])
    for bad in (["--total-blocks", 100], ["--total-blocks", 100, "--skip-steps", 2], ["--total-blocks", 10, "--tampered-blocks", 11],
                ["--layer-blocks", 3, "--total-blocks", 10, "--tampered-blocks", 1], ["--total-blocks", 10, "--target", 0,
                                                                                "--tampered-blocks", 1]):
        assert invoke("plan", *bad).exit_code == 2, bad
    c = derive_challenge(bytes(32), bytes(32), 6, 10, "columns", count=60)
    c.save(tmp_path / "c.json")
    r = invoke("plan", "--challenge", tmp_path / "c.json", "--skip-steps", 0.1)
    assert r.exit_code == 0 and "100%" in r.output, r.output  # every column: the hidden block is always hit
    (tmp_path / "bad.json").write_text(json.dumps({**c.to_json(), "blocks": [[0, 0]]}))
    assert invoke("plan", "--challenge", tmp_path / "bad.json").exit_code == 2
