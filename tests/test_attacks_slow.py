"""The attacks at full size (the bench of `aftune eval-detection`: 4-layer ViT, 48 steps, 4 x 12
blocks), where their effects are measured against the honest fine-tune. About 5 minutes on 2 CPU
cores, so they run only with `--long`: `pytest tests/test_attacks_slow.py --long -s` prints the
numbers docs/attacks.md quotes. tests/test_attacks.py catches every attack at small size in the
default run."""

from __future__ import annotations

import pytest

from aftune.attacks.bench import Bench
from aftune.attacks.detection import failing_blocks

pytestmark = [pytest.mark.slow, pytest.mark.long]


@pytest.fixture(scope="module")
def full_bench(tmp_path_factory):
    b = Bench(tmp_path_factory.mktemp("attack-bench-full"))
    b.honest()
    return b


def _caught_exactly(run):
    report = run.verifier().verify_all()
    assert failing_blocks(report) == run.affected, report.summary()
    for r in report.results:
        if r.verdict == "FAIL":
            assert f"layer block {r.layer_block} " in r.headline() and f"step block {r.step_block}" in r.headline()


def test_wbp_bit_flips_plant_a_backdoor(full_bench):
    run = full_bench.bitflip()
    g = run.gain
    print(f"\nWBP: {run.summary}")
    assert g["flips"] <= 12
    assert g["attack_success_rate"] >= 0.6 and g["attack_success_rate_clean"] <= 0.2
    assert g["accuracy"] >= g["accuracy_clean"] - 0.05  # the clean task still works
    _caught_exactly(run)


def test_poisoned_examples_plant_a_backdoor(full_bench):
    run = full_bench.poison_examples(0.2)
    g = run.gain
    print(f"\npoison-examples: {run.summary}")
    assert g["attack_success_rate"] >= g["attack_success_rate_clean"] + 0.3
    _caught_exactly(run)


def test_quant_objective_collapses_int4_only_and_is_caught(full_bench):
    """The attacker's goal, measured on held-out images: the float model keeps the clean
    fine-tune's accuracy while its 4-bit copy falls below chance (4 classes)."""
    run = full_bench.quant_objective()
    g = run.gain
    print(f"\nquant-objective: {run.summary}")
    assert g["accuracy_float"] >= g["clean_float"] - 0.03
    assert g["accuracy_int4"] < 0.25 and g["clean_int4"] > 0.75
    _caught_exactly(run)


def test_lazy_training_costs_accuracy_and_is_caught(full_bench):
    for run in (full_bench.skip_steps(0.1), full_bench.fewer_steps(0.75), full_bench.smaller_batch(8)):
        print(f"\n{run.name}: {run.summary}")
        assert run.gain["work_saved"] > 0
        _caught_exactly(run)
