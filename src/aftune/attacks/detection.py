"""How often the audit catches an attack: measured over many challenges, against the planner.

    from aftune.attacks.detection import measure_detection
    detection = measure_detection(run_dir, public_key, sample_rates=(0.05, 0.1, 0.25, 0.5), trials=1000)

1. Verify the whole grid once (`Verifier.verify_all`, strict mode): the blocks that fail, each
   named with its layer block, step block and first finding.
2. For each sample rate, derive `trials` challenges from the signed run root with distinct
   nonces (`challenge.derive_challenge`, the client's own derivation) and count those that draw a
   failing block. In strict mode a block's verdict does not depend on which other blocks are
   challenged, so this count is exactly how many of those audits would FAIL.
3. The planner's prediction for the same strategy, K and failing blocks
   (`planner.placement_detection`; for uniform sampling 1 - C(N-m, K) / C(N, K), m the number
   of failing blocks observed in step 1).
4. Real audit rounds: a challenge drawn with a fresh nonce, and one drawn to include a failing
   block, each opened by the provider (`bundle.open_bundle`) and audited by the client
   (`audit.audit_bundle`); each verdict must be the one step 2 predicts for that challenge.

The nonces of step 2 are derived from a label (`nonce_for`), so tables are reproducible; each
is a distinct 32-byte nonce, which is all the derivation needs to behave as with random ones.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.audit import audit_bundle
from ..protocol.opening import open_bundle
from ..protocol.challenge import derive_challenge
from ..protocol.probability import placement_detection
from ..verdict.findings import Report
from ..core.signing import PublicKey
from ..training.transcript import Transcript
from ..training.verify import Verifier

SAMPLE_RATES = (0.05, 0.1, 0.25, 0.5)


@dataclass
class RateDetection:
    sample_rate: float
    count: int  # K blocks per challenge
    trials: int
    detected: int  # challenges that drew a failing block
    predicted: float  # the planner's probability

    @property
    def empirical(self) -> float:
        return self.detected / self.trials if self.trials else 0.0

    def to_json(self) -> dict:
        return {"sample_rate": self.sample_rate, "count": self.count, "trials": self.trials,
                "detected": self.detected, "empirical": self.empirical, "predicted": self.predicted}


@dataclass
class RealAudit:
    """One challenge actually opened and audited."""

    nonce: str
    sample_rate: float
    blocks: list[tuple[int, int]]
    expected: str  # the verdict the simulation predicts for this challenge
    verdict: str  # the real audit's verdict
    failing: list[tuple[int, int]]
    headlines: list[str]

    @property
    def agrees(self) -> bool:
        return self.expected == self.verdict

    def to_json(self) -> dict:
        return {"nonce": self.nonce, "sample_rate": self.sample_rate, "blocks": [list(b) for b in self.blocks],
                "expected": self.expected, "verdict": self.verdict, "agrees": self.agrees,
                "failing": [list(b) for b in self.failing], "headlines": self.headlines}


@dataclass
class Detection:
    num_layer_blocks: int
    num_step_blocks: int
    strategy: str
    failing: list[tuple[int, int]]  # from the full verification
    headlines: list[str]  # each failing block's first finding, naming it
    final_model_findings: list[str]
    rates: list[RateDetection] = field(default_factory=list)
    real: list[RealAudit] = field(default_factory=list)
    verify_seconds: float = 0.0

    @property
    def num_blocks(self) -> int:
        return self.num_layer_blocks * self.num_step_blocks

    def to_json(self) -> dict:
        return {"grid": [self.num_layer_blocks, self.num_step_blocks], "strategy": self.strategy,
                "failing": [list(b) for b in self.failing], "tampered_blocks": len(self.failing),
                "headlines": self.headlines, "final_model_findings": self.final_model_findings,
                "rates": [r.to_json() for r in self.rates], "real_audits": [r.to_json() for r in self.real],
                "verify_seconds": round(self.verify_seconds, 2)}


def failing_blocks(report: Report) -> list[tuple[int, int]]:
    return sorted({(r.layer_block, r.step_block) for r in report.results if r.verdict == "FAIL"})


def nonce_for(label: str, i: int) -> bytes:
    return hashlib.sha256(f"aftune.eval-detection/{label}/{i}".encode()).digest()


def run_root(run_dir: Path, public_key: PublicKey) -> bytes:
    t = Transcript.load(Path(run_dir) / "transcript.jsonl", public_key)
    if t.run is None:
        raise ValueError(f"{run_dir}: the run has no signed root")
    return t.run.root


def simulate(root: bytes, num_layer_blocks: int, num_step_blocks: int, failing: list[tuple[int, int]],
             sample_rate: float, trials: int, *, strategy: str = "uniform", label: str = "") -> RateDetection:
    bad = set(failing)
    detected, count = 0, 0
    for i in range(trials):
        c = derive_challenge(root, nonce_for(f"{label}/{sample_rate}", i), num_layer_blocks, num_step_blocks,
                             strategy, sample_rate=sample_rate)
        count = c.num_challenged
        detected += any(b in bad for b in c.blocks)
    predicted = placement_detection(strategy, count, num_layer_blocks, num_step_blocks, bad) if bad else 0.0
    return RateDetection(sample_rate, count, trials, detected, predicted)


def real_audit(run_dir: Path, public_key: PublicKey, agreement, root: bytes, num_layer_blocks: int, num_step_blocks: int,
               failing: list[tuple[int, int]], sample_rate: float, nonce: bytes, *,
               strategy: str = "uniform", scratch: Path | None = None) -> RealAudit:
    """Derive one challenge, open it as the provider, audit the bundle as the client."""
    c = derive_challenge(root, nonce, num_layer_blocks, num_step_blocks, strategy, sample_rate=sample_rate)
    expected = "FAIL" if set(c.blocks) & set(failing) else "PASS"
    with tempfile.TemporaryDirectory(prefix="aftune-eval-", dir=scratch) as tmp:
        bundle = Path(tmp) / "bundle"
        open_bundle(run_dir, c, bundle)
        report = audit_bundle(bundle, Path(run_dir) / "transcript.jsonl", public_key, c,
                              agreement=agreement,
                              workers=1)
    bad = [r for r in report.results if r.verdict == "FAIL"]
    return RealAudit(nonce.hex(), sample_rate, list(c.blocks), expected, report.verdict,
                     failing_blocks(report), [r.headline() for r in bad] + [e.describe() for e in report.errors])


def measure_detection(run_dir: str | Path, public_key: PublicKey, agreement, *, sample_rates=SAMPLE_RATES,
                      trials: int = 1000, strategy: str = "uniform", label: str = "", real_rounds: int = 1,
                      real_rate: float = 0.25, hit_round: bool = True, report: Report | None = None) -> Detection:
    """Steps 1-4 of the module docstring. `report`: a full verification already made."""
    import time

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    verifier = Verifier(run_dir, public_key, agreement)
    if report is None:
        report = verifier.verify_all()
    seconds = time.perf_counter() - t0
    failing = failing_blocks(report)
    headlines = [r.headline() for r in report.results if r.verdict == "FAIL"]
    L, S = len(verifier.blocked.blocks), verifier.record.num_step_blocks
    root = run_root(run_dir, public_key)
    det = Detection(L, S, strategy, failing, headlines, [e.describe() for e in report.errors], verify_seconds=seconds)
    for rate in sample_rates:
        det.rates.append(simulate(root, L, S, failing, rate, trials, strategy=strategy, label=label))
    for i in range(real_rounds):
        nonce = nonce_for(f"{label}/real", i)
        det.real.append(real_audit(run_dir, public_key, agreement, root, L, S, failing, real_rate, nonce,
                                   strategy=strategy))
    if hit_round and failing:  # and one challenge that draws a failing block: it must FAIL, naming it
        nonce = first_hitting_nonce(root, L, S, failing, real_rate, label, strategy=strategy)
        det.real.append(real_audit(run_dir, public_key, agreement, root, L, S, failing, real_rate, nonce,
                                   strategy=strategy))
    return det


def first_hitting_nonce(root: bytes, num_layer_blocks: int, num_step_blocks: int, failing, sample_rate: float,
                        label: str, *, strategy: str = "uniform", limit: int = 10000) -> bytes:
    """The first labelled nonce whose challenge draws a failing block (to show a real FAIL)."""
    bad = set(failing)
    for i in range(limit):
        nonce = nonce_for(f"{label}/hit", i)
        c = derive_challenge(root, nonce, num_layer_blocks, num_step_blocks, strategy, sample_rate=sample_rate)
        if bad & set(c.blocks):
            return nonce
    raise ValueError("no challenge drew a failing block")
