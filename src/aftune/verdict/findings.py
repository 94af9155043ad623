"""Verdicts: what a verification compared, what failed, and why (machine-readable too).

A block PASSes only if at least one commitment was compared and none failed: a check that
compared nothing is a FAIL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PASS, FAIL = "PASS", "FAIL"


@dataclass(frozen=True)
class Finding:
    """One failed comparison, located to the block, step and tensor."""

    layer_block: int
    step_block: int
    check: str  # batch | output | input_gradient | loss | shared_gradient | grad_norms | end_state | base_weights | initial_state | record
    reason: str
    tensor: str = ""
    step: int | None = None
    micro: int | None = None
    expected: str | None = None
    actual: str | None = None
    error: float | None = None

    def location(self, block_label: str = "") -> list[str]:
        """Where the finding is: the block (or the run) and the step block."""
        if self.layer_block < 0 and self.step_block < 0:
            return [block_label or "run"]
        if self.layer_block < 0:
            return [block_label or "run", f"step block {self.step_block}"]
        return [block_label or f"layer block {self.layer_block}", f"step block {self.step_block}"]

    def describe(self, block_label: str = "") -> str:
        where = self.location(block_label)
        if self.step is not None:
            where.append(f"step {self.step}")
        if self.micro is not None:
            where.append(f"micro-batch {self.micro}")
        text = ", ".join(where) + f": {self.check}"
        if self.tensor:
            text += f" [{self.tensor}]"
        text += f": {self.reason}"
        if self.expected is not None:
            text += f" (committed {self.expected}, recomputed {self.actual})"
        if self.error is not None:
            text += f" (relative error {self.error:.3g})"
        return text


@dataclass
class BlockResult:
    layer_block: int
    step_block: int
    label: str
    compared: int = 0
    findings: list[Finding] = field(default_factory=list)
    max_error: float = 0.0  # largest relative L2 error of any tensor (tolerance mode)
    max_elem_error: float = 0.0  # largest element error / rms of any tensor (tolerance mode)
    seconds: float = 0.0
    errors_by_kind: dict[str, list[float]] = field(default_factory=dict)  # kind -> [max rel L2, max elem]

    @property
    def verdict(self) -> str:
        return PASS if self.compared > 0 and not self.findings else FAIL

    def headline(self) -> str:
        if self.verdict == PASS:
            return f"PASS {self.label}, step block {self.step_block}: {self.compared} commitments match"
        if not self.findings:
            return f"FAIL {self.label}, step block {self.step_block}: nothing was compared"
        return f"FAIL {self.findings[0].describe(self.label)}"


@dataclass
class Report:
    run_dir: str
    mode: str
    results: list[BlockResult] = field(default_factory=list)
    errors: list[Finding] = field(default_factory=list)  # run-level failures (final model, structure)

    @property
    def verdict(self) -> str:
        if self.errors or not self.results:
            return FAIL
        return PASS if all(r.verdict == PASS for r in self.results) else FAIL

    def summary(self) -> str:
        failed = [r for r in self.results if r.verdict == FAIL]
        text = f"{self.verdict}: {len(self.results) - len(failed)}/{len(self.results)} blocks pass ({self.mode} mode)"
        if self.errors:
            text += "; " + self.errors[0].describe()
        elif failed:
            text += "; first failure: " + failed[0].headline()
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "mode": self.mode,
            "run_dir": self.run_dir,
            "errors": [asdict(e) for e in self.errors],
            "blocks": [
                {"layer_block": r.layer_block, "step_block": r.step_block, "label": r.label, "verdict": r.verdict,
                 "compared": r.compared, "max_error": r.max_error, "max_elem_error": r.max_elem_error, "errors_by_kind": r.errors_by_kind, "seconds": round(r.seconds, 4),
                 "findings": [asdict(f) for f in r.findings]}
                for r in self.results
            ],
        }
