"""Calibrate tolerance-mode thresholds on honest replays (`aftune calibrate`).

Replay an honest run in the precision the audit will use, measure the largest per-tensor errors
for each kind of tensor (activations, gradients, weights, optimizer state), and set each kind's
thresholds a margin above them. The margin must stay below the smallest deviation an attack
needs: the attack suite measures that side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..core.signing import PublicKey
from ..verdict.comparison import STATE_KINDS, STATE_SCOPES, TENSOR_KINDS, Tolerance
from .agreement import Agreement
from .verify import Verifier


_NEVER = 1e300  # thresholds no honest error reaches: calibration only measures
# the smallest state-rule limits calibration sets (element, norm, count): an element may always be
# one ulp plus twice its update off (a near-zero Adam gradient whose sign rounds the other way)
STATE_FLOORS = (2.0, 1e-7, 0.01)


@dataclass(frozen=True)
class Calibration:
    blocks: int
    observed: dict[str, tuple[float, float]]  # kind -> (max relative L2 error, max element error / rms)
    suggested: Tolerance
    # (scope, kind) -> the state rule's largest (element, norm, count) (SPEC.md 6.3)
    state: dict[tuple[str, str], tuple[float, float, float]] = field(default_factory=dict)
    floor: float = 1e-7  # the smallest threshold calibration sets
    # the kinds with a threshold raised to `floor`: margin x their largest honest error was below it
    # (0 when the replay is bitwise, as on identical hardware); `aftune calibrate` says so
    floored: tuple[str, ...] = ()

    @property
    def max_rel_l2(self) -> float:
        return max(v[0] for v in self.observed.values())

    @property
    def max_elem(self) -> float:
        return max(v[1] for v in self.observed.values())


def calibrate(run_dir: str | Path, public_key: PublicKey, replay_dtype: str | None = None,
              margin: float = 4.0, floor: float = 1e-7, agreement: Agreement | None = None,
              unsafe_no_agreement: bool = False) -> Calibration:
    """Replay an honest run (which must conform to the `agreement`) and set thresholds `margin`
    times the largest honest errors."""
    if not math.isfinite(margin) or margin < 1:
        raise InputError(f"margin must be at least 1, got {margin}")
    v = Verifier(run_dir, public_key, agreement, unsafe_no_agreement=unsafe_no_agreement, mode="tolerance",
                 replay_dtype=replay_dtype,
                 tolerance=Tolerance(rel_l2=_NEVER, max_elem=_NEVER,
                                     state=tuple((sc, k, _NEVER, _NEVER, _NEVER) for sc in STATE_SCOPES
                                                 for k in STATE_KINDS)))
    report = v.verify_all()
    if report.verdict != "PASS":
        raise InputError(f"calibration needs an honest run whose replay succeeds: {report.summary()}")
    observed = {}
    for kind in TENSOR_KINDS:
        seen = [r.errors_by_kind[kind] for r in report.results if kind in r.errors_by_kind]
        if seen:
            observed[kind] = (max(s[0] for s in seen), max(s[1] for s in seen))
    if not observed:
        raise InputError("calibration compared no floating-point tensor: nothing to calibrate on")
    per_kind = tuple((k, max(rel * margin, floor), max(elem * margin, floor)) for k, (rel, elem) in observed.items())
    floored = tuple(k for k, (rel, elem) in observed.items() if min(rel, elem) * margin < floor)
    fallback = (max(t[1] for t in per_kind), max(t[2] for t in per_kind))
    state_seen = {k: tuple(x) for k, x in v.state_observed.items()}
    state = tuple((sc, k, *(max(x * margin, f) for x, f in zip(seen, STATE_FLOORS)))
                  for (sc, k), seen in sorted(state_seen.items()))
    return Calibration(len(report.results), observed, Tolerance(*fallback, per_kind=per_kind, state=state), state_seen,
                       floor, floored)
