"""Training replays in another precision with the default thresholds (no calibration): honest runs
PASS in every family, with their margins printed (`pytest tests/test_training_precision.py -s`),
and a flipped exponent bit or a scaled weight still FAILs. The defaults are in units of the unit
roundoff of the agreed run dtype (`Tolerance.for_training`, SPEC.md 6.3); the replay holds the
state at the run's dtype after every update, as the run stores it."""

from __future__ import annotations

import pytest
import torch

from aftune.errors import InputError
from aftune.training.train import Deviation
from aftune.verdict.comparison import TENSOR_KINDS, UNIT_ROUNDOFF, Tolerance
from conftest import failing, verifier
from test_tampering import FlipExponentBit, _param

TARGET = "model.layers.2.mlp.up_proj.weight"
PAIRS = [("float32", "float64"), ("bfloat16", "float32")]


class ScaleOneWeight(Deviation):
    """One weight multiplied by `factor` after the update of `step` (a targeted edit)."""

    def __init__(self, step, name=TARGET, factor=1.5):
        self.step, self.name, self.factor = step, name, factor

    def after_update(self, step, blocked):
        if step == self.step:
            w = _param(blocked, self.name).data.view(-1)
            i = int(w.abs().argmax())
            w[i] = w[i] * self.factor


def margins(report, tol: Tolerance) -> dict[str, float]:
    """Per tensor kind: threshold / largest honest error (the smaller of rel_l2 and element)."""
    out = {}
    for kind in TENSOR_KINDS:
        seen = [r.errors_by_kind[kind] for r in report.results if kind in r.errors_by_kind]
        if seen:
            rel, elem = max(s[0] for s in seen), max(s[1] for s in seen)
            lr, le = tol.limits(kind)
            out[kind] = min(lr / rel if rel else float("inf"), le / elem if elem else float("inf"))
    return out


@pytest.mark.parametrize("family, record_dtype, replay_dtype", [
    ("llama", "float32", "float64"), ("llama", "bfloat16", "float32"), ("mistral", "bfloat16", "float32"),
])
def test_default_thresholds_pass_honest_runs_replayed_in_another_precision(record, family, record_dtype,
                                                                           replay_dtype):
    run, key = record(family, dtype=record_dtype, lr=1e-3, steps=8, steps_per_block=4)
    v = verifier(run, key, mode="tolerance", replay_dtype=replay_dtype)
    assert v.comparison.tolerance == Tolerance.for_training(record_dtype, replay_dtype)
    report = v.verify_all()
    assert report.verdict == "PASS", report.summary()
    m = margins(report, v.comparison.tolerance)
    print(f"\n{family} {record_dtype} run replayed in {replay_dtype}: margins (threshold / largest honest error) "
          + ", ".join(f"{k} {x:.1f}x" for k, x in m.items()))
    assert set(m) >= {"activation", "gradient", "weights"} and all(x >= 2 for x in m.values()), m


@pytest.mark.parametrize("record_dtype, replay_dtype, attack", [
    ("float32", "float64", "bit flip"), ("float32", "float64", "weight x1.5"), ("bfloat16", "float32", "weight x1.5"),
])  # a bfloat16 run's honest weights differ by up to about 40 u per element: an exponent bit flip of a small weight
#     (x4 or /4 of the first element) stays below the default element threshold, see docs/precision.md
def test_default_thresholds_catch_an_edited_weight(record, record_dtype, replay_dtype, attack):
    deviation = FlipExponentBit(step=2, name=TARGET, bit=24) if attack == "bit flip" else ScaleOneWeight(step=2)
    run, key = record("llama", dtype=record_dtype, lr=1e-3, deviation=deviation)
    v = verifier(run, key, mode="tolerance", replay_dtype=replay_dtype)
    report = v.verify_all()
    assert failing(report) == [(1, 1)], report.summary()
    bad = next(r for r in report.results if r.verdict == "FAIL")
    first = bad.findings[0]
    # the first step that computes with the edited weight, or the end state that holds it
    assert first.step == 3 or (first.check == "end_state" and first.tensor.endswith(TARGET)), first.describe()
    ratio = {k: max(rel / lim[0], elem / lim[1]) for k, (rel, elem) in bad.errors_by_kind.items()
             for lim in [v.comparison.tolerance.limits(k)]}
    print(f"\n{attack} in a {record_dtype} run, replayed in {replay_dtype}: first finding {first.check} at step {first.step}; "
          "errors / default thresholds " + ", ".join(f"{k} {x:.3g}x" for k, x in ratio.items()))
    assert max(ratio.values()) > 1


def test_no_default_for_float16_runs_and_units_follow_the_less_precise_dtype():
    with pytest.raises(InputError, match="float16"):
        Tolerance.for_training("float16", "float32")
    bf = Tolerance.for_training("bfloat16", "float64")
    assert bf == Tolerance.for_training("bfloat16", "float32")  # the run's rounding dominates
    assert bf.limits("activation")[0] == 16 * UNIT_ROUNDOFF["bfloat16"]
    f32 = Tolerance.for_training("float32")
    assert f32.limits("weights")[1] < 1e-3 < bf.limits("weights")[1]


def test_the_replay_holds_the_state_at_the_runs_dtype(record):
    """A bfloat16 run stores weights and optimizer state in bfloat16 after every update; a float32
    replay that kept its own float32 state would drift away from it over a step block."""
    run, key = record("llama", dtype="bfloat16", lr=1e-3, steps=8, steps_per_block=4)
    v = verifier(run, key, mode="tolerance", replay_dtype="float32")
    assert v.storage_dtype == torch.bfloat16 and v.replay_dtype == torch.float32
    assert verifier(run, key, mode="strict").storage_dtype is None


def test_the_cli_uses_the_defaults_and_refuses_a_float16_run_without_thresholds(record):
    from conftest import agreement_path, invoke

    run, key = record("llama", dtype="bfloat16", lr=1e-3, steps=4)
    base = ("verify", run, "--agreement", agreement_path(run), "--public-key", key.text, "--all", "--mode", "tolerance")
    r = invoke(*base, "--dtype", "float32")
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    half, key16 = record("llama", dtype="float16", lr=1e-3, steps=2)
    r = invoke("verify", half, "--agreement", agreement_path(half), "--public-key", key16.text, "--all", "--mode",
               "tolerance", "--dtype", "float32")
    assert r.exit_code == 2 and "float16" in r.output, r.output
