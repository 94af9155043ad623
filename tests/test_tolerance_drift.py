"""No hiding place in tolerance mode (issue 26, part 1): the state rule and the chain.

A dishonest provider that moves one weight matrix by a fixed rank-1 change of 2.5 % of its norm at
the end of every step block of an agreed bfloat16 run stays under the relative end-state
thresholds of each step block (8 u = 3.1 % relative L2), while the sum of the moves grows step
block after step block. The provider is simulated as in test_tampering.py: a `Deviation` of its
own trainer, so every commitment (boundaries computed with the moved weights, end states, Merkle
roots, signed transcript) is made and signed consistently, as a provider holding its key would
(rewriting the committed state afterwards would leave the later steps' boundary tensors computed
from the unmoved weights, an easier catch). Tolerance mode now compares weights and optimizer
state under the state rule (ulps of the run dtype and units of the replay's own updates, SPEC.md
6.3) and, with --all, along the chain of step blocks; the honest run passes both, in both
precisions (pytest -s prints the measures)."""

from __future__ import annotations

import pytest
import torch

from aftune.training.calibrate import calibrate
from aftune.training.drift import DriftChain
from aftune.training.train import Deviation
from aftune.verdict.comparison import (COUNT_SLACK, STATE_KINDS, STATE_SCOPES, TOLERANCE_FORMAT, Tolerance,
                                       state_errors, ulp)
from conftest import agreement_for, failing, verifier
from test_tampering import _param

TARGET = "model.layers.2.mlp.up_proj.weight"  # in layer block 1
DRIFT = dict(dtype="bfloat16", lr=1e-3, steps=16, steps_per_block=2)  # 8 step blocks of 2 steps


class RankOneDrift(Deviation):
    """A fixed rank-1 change of `fraction` of the matrix's norm, added after the last update of
    every step block."""

    def __init__(self, steps_per_block: int, name: str = TARGET, fraction: float = 0.025):
        self.every, self.name, self.fraction, self.direction = steps_per_block, name, fraction, None

    def after_update(self, step, blocked):
        if (step + 1) % self.every:
            return
        w = _param(blocked, self.name).data
        if self.direction is None:
            g = torch.Generator().manual_seed(26)
            left, right = torch.randn(w.shape[0], generator=g, dtype=torch.float64), \
                torch.randn(w.shape[1], generator=g, dtype=torch.float64)
            self.direction = torch.outer(left / left.norm(), right / right.norm())
        moved = w.double() + self.fraction * float(w.double().norm()) * self.direction
        w.copy_(moved.to(w.dtype))


class FlipSmallWeight(Deviation):
    """An exponent bit flip (x4) of one small weight (about 0.1 of its matrix's rms) after the
    update of `step`, the last of its step block: only the end-state check sees it."""

    def __init__(self, step: int, name: str = TARGET):
        self.step, self.name, self.flipped = step, name, None

    def after_update(self, step, blocked):
        if step != self.step:
            return
        w = _param(blocked, self.name).data.view(-1)
        rms = float(w.float().pow(2).mean().sqrt())
        bits = w.view(torch.int16)
        exp_bit1 = (bits >> 8) & 1  # bfloat16: sign, 8 exponent bits (7..14), 7 fraction bits
        candidates = torch.nonzero(exp_bit1 == 0).reshape(-1)  # setting exponent bit 1 multiplies by 4
        i = int(candidates[(w[candidates].float().abs() - 0.1 * rms).abs().argmin()])
        before = float(w[i])
        bits[i] ^= 1 << 8
        self.flipped = (i, before, float(w[i]), rms)


def _chain_findings(report, tensor):
    return [f for r in report.results for f in r.findings
            if f.tensor == tensor and "drifts from the chain replayed from step block" in f.reason]


def test_rank_one_drift_every_step_block_fails_tolerance_and_strict(record):
    run, key = record("llama", deviation=RankOneDrift(DRIFT["steps_per_block"]), **DRIFT)
    report = verifier(run, key, mode="tolerance", replay_dtype="float32").verify_all()
    assert report.verdict == "FAIL", report.summary()
    target = f"state/{TARGET}"
    bad = [(r.layer_block, r.step_block) for r in report.results if r.verdict == "FAIL"]
    assert {lb for lb, _ in bad} == {1}, bad  # only the layer block that holds the matrix
    named = {f.tensor for r in report.results for f in r.findings}
    assert named == {target}, named  # nothing else is accused
    chained = _chain_findings(report, target)
    assert chained, "the chain must see the summed drift"
    first = chained[0]
    assert "from step block 0" in first.reason and "elements" in first.reason and "ulps" in first.reason
    # the drift is caught in most step blocks, and by the chain in every step block after it begins to show
    assert len(bad) >= 6, bad
    later = sorted({f.step_block for f in chained})
    assert later == list(range(later[0], 8)), later
    print(f"\nrank-1 drift of 2.5 % per step block (bfloat16 run, float32 replay): {len(bad)}/8 step blocks of layer "
          f"block 1 FAIL; chain from step block {later[0]} on; e.g. {first.describe()[:300]}")
    strict = verifier(run, key).verify_all()
    assert strict.verdict == "FAIL" and failing(strict) == [(1, s) for s in range(8)], strict.summary()


@pytest.mark.parametrize("record_dtype, replay_dtype", [("float32", "float64"), ("bfloat16", "float32")])
def test_the_honest_run_passes_the_state_rule_and_the_chain(record, record_dtype, replay_dtype):
    run, key = record("llama", **{**DRIFT, "dtype": record_dtype})
    v = verifier(run, key, mode="tolerance", replay_dtype=replay_dtype)
    report = v.verify_all()
    assert report.verdict == "PASS", report.summary()
    assert set(v.state_observed) == {(s, k) for s in STATE_SCOPES for k in STATE_KINDS}
    margins = {}
    for (scope, kind), seen in sorted(v.state_observed.items()):
        limits = v.state_limits(scope, kind)
        margins[f"{scope} {kind}"] = min(lim / x if x else float("inf") for x, lim in zip(seen, limits))
    print(f"\nhonest {record_dtype} run replayed in {replay_dtype}: state rule margins (limit / largest honest) "
          + ", ".join(f"{k} {m:.1f}x" for k, m in margins.items()))
    assert margins["block weights"] >= 2 and margins["chain weights"] >= 2, margins


def test_an_exponent_flip_of_a_small_bfloat16_weight_fails_tolerance_mode(record):
    """A x4 flip of a weight of 0.1 rms: under the relative end-state thresholds (its error is
    0.3 rms against 0.625 x (|w| + rowrms)), but far beyond its update (lr 1e-4, B_S 2)."""
    flip = FlipSmallWeight(step=1)
    run, key = record("llama", deviation=flip, dtype="bfloat16", lr=1e-4, steps=4, steps_per_block=2)
    index, before, after, rms = flip.flipped
    assert abs(after) == pytest.approx(4 * abs(before)) and abs(before) < 0.26 * rms
    report = verifier(run, key, mode="tolerance", replay_dtype="float32").verify_all()
    assert failing(report)[:1] == [(1, 0)] and {lb for lb, _ in failing(report)} == {1}, report.summary()
    found = [f for r in report.results for f in r.findings]
    assert {f.tensor for f in found} == {f"state/{TARGET}"}
    block = next(f for f in found if f.step_block == 0)
    assert "relative L2 error" not in block.reason  # the relative thresholds alone pass it
    assert f"element {index} off by" in block.reason, block.reason
    print(f"\nx4 flip of a {before:.3g} weight (rms {rms:.3g}): {block.describe()[:300]}")
    honest, key2 = record("llama", dtype="bfloat16", lr=1e-4, steps=4, steps_per_block=2)
    assert verifier(honest, key2, mode="tolerance", replay_dtype="float32").verify_all().verdict == "PASS"


def test_state_errors_count_ulps_and_updates():
    a = torch.tensor([1.0, 0.02, 0.0, -3e-3], dtype=torch.bfloat16)
    spacing = ulp(a.float(), torch.bfloat16)
    assert spacing.tolist() == [2.0 ** -7, 2.0 ** -13, 2.0 ** -133, 2.0 ** -16]
    e = a.double() + spacing * torch.tensor([1.0, 0.0, 0.0, 3.0])  # one and three ulps off
    err = state_errors(a.float(), e, None, torch.bfloat16)  # nothing moved: ulps only
    assert err.element == 3.0 and err.worst == 3 and err.worst_ulps == 3.0 and err.touched == 0
    update = torch.tensor([0.0, 0.0, 0.0, 2.0 ** -15])  # element 3 moved by 2 ulps: its scale is 3 ulps
    assert state_errors(a.float(), e, update, torch.bfloat16).element == 1.0
    nan = state_errors(a.float(), e * float("nan"), None, torch.bfloat16)
    assert nan.element == nan.norm == float("inf")
    many = torch.zeros(100)
    assert state_errors(many, many + 1e-3, torch.full((100,), 1e-6), torch.float32).beyond == 100
    assert state_errors(many, many + 1e-3, torch.full((100,), 1e-6), torch.float32).count == (100 - COUNT_SLACK) / 100


def test_the_chain_adds_each_blocks_recomputed_move():
    chain = DriftChain(first=0)
    start, end = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])
    c, u = chain.advance(0, "k", start, end, torch.tensor([0.5, 0.0]))
    assert c.tolist() == [1.5, 2.0] and u.tolist() == [0.5, 0.0]
    committed_start = torch.tensor([1.6, 2.1])  # the provider moved the state by 0.1
    c, u = chain.advance(1, "k", committed_start, committed_start + 0.5, torch.tensor([0.5, 0.5]))
    assert c.tolist() == pytest.approx([2.0, 2.5]) and u.tolist() == [1.0, 0.5] and chain.through == 1


def test_tolerance_v2_carries_the_state_limits_and_v1_still_reads(record):
    t = Tolerance.for_training("bfloat16", "float32")
    doc = t.to_json()
    assert doc["format"] == TOLERANCE_FORMAT == "aftune.tolerance.v2" and Tolerance.from_json(doc) == t
    assert doc["state"]["chain"]["weights"]["element"] == t.state_limits("chain", "weights")[0]
    v1 = {"format": "aftune.tolerance.v1", "rel_l2": 1e-3, "max_elem": 1e-2, "per_kind": {}}
    old = Tolerance.from_json(v1)
    assert old.state == () and old.state_limits("block", "weights") is None
    with pytest.raises(Exception, match="finite positive"):
        Tolerance(state=(("block", "weights", float("inf"), 1.0, 1.0),))

    run, key = record("llama", dtype="bfloat16", lr=1e-3, steps=4, steps_per_block=2)
    v = verifier(run, key, mode="tolerance", replay_dtype="float32", tolerance=old)
    assert v.state_limits("block", "weights") == t.state_limits("block", "weights")  # v1: the defaults apply
    c = calibrate(run, key, replay_dtype="float32", agreement=agreement_for(run))
    assert {(s, k) for s, k, *_ in c.suggested.state} == {(s, k) for s in STATE_SCOPES for k in STATE_KINDS}
    assert c.suggested.to_json()["format"] == TOLERANCE_FORMAT
    report = verifier(run, key, mode="tolerance", replay_dtype="float32", tolerance=c.suggested).verify_all()
    assert report.verdict == "PASS", report.summary()
