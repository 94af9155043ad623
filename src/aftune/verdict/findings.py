"""Verdicts: what a verification compared, what failed, and why (machine-readable too).

Shared by every verifier. A block PASSes only if at least one commitment was compared and none
failed: a check that compared nothing is a FAIL. A report PASSes only if it has blocks, all of
them pass, and nothing failed at the level of the whole run or record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PASS, FAIL = "PASS", "FAIL"
MAX_FINDINGS_PER_CHECK = 8  # per block and kind of check: the first ones locate the cause
RUN, RECORD = "run", "record"  # scopes: a training run (blocks x step blocks), an inference record (blocks)


@dataclass(frozen=True)
class Finding:
    """One failed comparison, located to the block, step and tensor. `layer_block` -1 is the
    whole run or record; inference records have no step blocks (their `step_block` is 0 and not
    shown), and their `step` is the generation step."""

    layer_block: int
    step_block: int
    check: str  # batch | output | input_gradient | loss | shared_gradient | grad_norms | end_state | base_weights | initial_state | record | token | label | ...
    reason: str
    tensor: str = ""
    step: int | None = None
    micro: int | None = None
    expected: str | None = None
    actual: str | None = None
    error: float | None = None
    scope: str = RUN

    def location(self, block_label: str = "") -> list[str]:
        """Where the finding is: the block (or the run or record) and, in a run, the step block."""
        where = [block_label or (self.scope if self.layer_block < 0 else f"layer block {self.layer_block}")]
        if self.scope == RUN and self.step_block >= 0:
            where.append(f"step block {self.step_block}")
        return where

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


@dataclass(frozen=True)
class ReplayNode:
    """Where a block was replayed, for an audit spread over a Ray cluster: the Ray node id (hex)
    and its host name. Informative only: it changes no verdict."""

    ray_node_id: str
    hostname: str

    def describe(self) -> str:
        return f"node {self.ray_node_id[:8]} on {self.hostname}"


@dataclass
class BlockResult:
    """The verdict on one block: (layer block, step block) of a run, or a layer block of a record."""

    layer_block: int
    step_block: int
    label: str
    compared: int = 0
    findings: list[Finding] = field(default_factory=list)
    max_error: float = 0.0  # largest relative L2 error of any tensor (tolerance mode)
    max_elem_error: float = 0.0  # largest element error / rms of any tensor (tolerance mode)
    seconds: float = 0.0
    errors_by_kind: dict[str, list[float]] = field(default_factory=dict)  # kind -> [max rel L2, max elem]
    scope: str = RUN
    replayed_on: ReplayNode | None = None  # the Ray node that replayed it (audits over a Ray cluster)

    @property
    def verdict(self) -> str:
        return PASS if self.compared > 0 and not self.findings else FAIL

    def fail(self, check: str, reason: str, *, capped: bool = True, **kw) -> None:
        """Add a finding about this block; past MAX_FINDINGS_PER_CHECK of one check, the rest
        are dropped (`capped=False` keeps them, for findings ranked and cut afterwards)."""
        same = sum(1 for f in self.findings if f.check == check)
        if not capped or same < MAX_FINDINGS_PER_CHECK:
            self.findings.append(Finding(self.layer_block, self.step_block, check, reason, scope=self.scope, **kw))

    def observe(self, kind: str, rel: float, elem: float) -> None:
        """Note a tolerance-mode error of a tensor of `kind` (for calibration and the report)."""
        self.max_error, self.max_elem_error = max(self.max_error, rel), max(self.max_elem_error, elem)
        seen = self.errors_by_kind.setdefault(kind, [0.0, 0.0])
        seen[0], seen[1] = max(seen[0], rel), max(seen[1], elem)

    def where(self) -> str:
        return self.label if self.scope == RECORD else f"{self.label}, step block {self.step_block}"

    def headline(self) -> str:
        if self.verdict == PASS:
            text = f"PASS {self.where()}: {self.compared} commitments match"
            if self.max_error or self.max_elem_error:
                text += f" (largest relative error {self.max_error:.3g}, element {self.max_elem_error:.3g} x magnitude)"
            return text
        if not self.findings:
            return f"FAIL {self.where()}: nothing was compared"
        return f"FAIL {self.findings[0].describe(self.label)}"


@dataclass
class Report:
    run_dir: str  # the run directory, record directory or bundle verified
    mode: str
    results: list[BlockResult] = field(default_factory=list)
    errors: list[Finding] = field(default_factory=list)  # failures of the whole run or record
    notes: list[str] = field(default_factory=list)  # what was not checked, in words (unsafe options)
    agreement: str | None = None  # hex digest of the client's agreement the verdict is about

    @property
    def verdict(self) -> str:
        if self.errors or not self.results:
            return FAIL
        return PASS if all(r.verdict == PASS for r in self.results) else FAIL

    def summary(self) -> str:
        """One line: the verdict, then what decided it. A failure of the whole run or record (a
        wrong prompt, settings that are not the agreed ones) comes first, with how the replayed
        blocks fared after it, so that a FAIL never reads "FAIL: 4/4 blocks pass"; otherwise the
        blocks that pass, and the first one that does not."""
        failed = [r for r in self.results if r.verdict == FAIL]
        if self.errors:
            text = f"{self.verdict}: " + self.errors[0].describe()
            if len(self.errors) > 1:
                text += f" (and {len(self.errors) - 1} more)"
            replayed = f"{len(self.results) - len(failed)}/{len(self.results)} replayed blocks pass"
            text += f" ({self.mode} mode; " + (replayed if self.results else "nothing replayed") + ")"
            if failed:
                text += "; first failing block: " + failed[0].headline()
        else:
            text = f"{self.verdict}: {len(self.results) - len(failed)}/{len(self.results)} blocks pass ({self.mode} mode)"
            if failed:
                text += "; first failure: " + failed[0].headline()
            elif not self.results:
                text += "; nothing was verified"
        if self.notes:
            text += f"; NOT CHECKED ({len(self.notes)}): " + "; ".join(self.notes)
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "mode": self.mode,
            "run_dir": self.run_dir,
            "agreement": self.agreement,
            "notes": list(self.notes),
            "errors": [asdict(e) for e in self.errors],
            "blocks": [
                {"layer_block": r.layer_block, "step_block": r.step_block, "label": r.label, "verdict": r.verdict,
                 "compared": r.compared, "max_error": r.max_error, "max_elem_error": r.max_elem_error,
                 "errors_by_kind": r.errors_by_kind, "seconds": round(r.seconds, 4),
                 "findings": [asdict(f) for f in r.findings],
                 **({"replayed_on": asdict(r.replayed_on)} if r.replayed_on else {})}
                for r in self.results
            ],
        }

    def nodes(self) -> str:
        """The Ray nodes that replayed the blocks and how many each did ("" when none did)."""
        counts: dict[ReplayNode, int] = {}
        for r in self.results:
            if r.replayed_on:
                counts[r.replayed_on] = counts.get(r.replayed_on, 0) + 1
        if not counts:
            return ""
        return f"replayed on {len(counts)} Ray node{'s' if len(counts) > 1 else ''}: " + ", ".join(
            f"{n.describe()} ({k} block{'s' if k > 1 else ''})" for n, k in counts.items())
