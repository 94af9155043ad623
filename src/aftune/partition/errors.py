"""Errors of partitioned execution, on top of aftune's hierarchy (`aftune.errors`).

    try:
        result = runtime.run(model_dir, strategy="shield-nonlinear", input_ids=ids)
    except IntegrityFailure as failure:   # exit code 1: the worker's answer was wrong
        print(failure.site, failure.step, failure.check)

- `IntegrityFailure` (exit 1, a FAIL): an answer of the untrusted worker failed a check
  (Freivalds, shape, range, frame, message order); names the layer (site), the step and why.
  Raised by the runtime, it carries the signed record of the failed session (`record`; its last
  crossing is the rejected answer) and, when they were stored, the crossings.
- `PartitionError` (exit 2): the session could not run (a process died, a timeout, a protocol
  fault on the trusted side's own channel); nothing is concluded about any answer.
"""

from __future__ import annotations

from typing import Any

from ..errors import AftuneError


class IntegrityFailure(AftuneError):
    """The untrusted worker returned something the trusted side rejects: a FAIL (exit code 1)."""

    exit_code = 1

    def __init__(self, site: str, step: int, check: str, reason: str, record: Any = None, crossings: Any = None):
        self.site, self.step, self.check, self.reason = site, step, check, reason
        self.record, self.crossings = record, crossings  # the signed record of the session, its stored crossings
        super().__init__(f"FAIL at layer {site}, step {step} ({check}): {reason}")


class PartitionError(AftuneError):
    """A partitioned session could not run; nothing is concluded (exit code 2)."""
