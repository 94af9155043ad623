"""Regenerating a v6 record's boundaries on the verifier's side (SPEC.md 8.4.1, 8.9): when the
record's boundaries file is not at hand, strict mode recomputes every boundary by one chain of
block replays and checks the result against the one committed `boundaries` root.

    v = InferenceVerifier("records", rid, model="runs/demo")   # regenerates in memory when needed
"""

from __future__ import annotations

import time

import torch

from ..core.rows import TensorRef
from ..errors import CommitmentMismatch, RecordError
from ..verdict.findings import RECORD, BlockResult
from ..verdict.threads import pinned_threads
from .compact import boundaries_root, boundary_key, boundary_label
from .record import steps_root


class BoundaryRegeneration:
    """Mixed into `InferenceVerifier`: reads `record`, `blocks`, `served`, `comparison`, and
    calls its `_replay` (which returns a block's outputs uncompared while `_regenerating`)."""

    _regenerating = False
    # layer block -> its result, when the regeneration was its strict replay and the root matched
    _regenerated: dict = {}

    def _regenerate_boundaries(self) -> None:
        """A v6 record whose boundaries file is not here (SPEC.md 8.4.1, 8.9): strict mode
        recomputes every boundary by one chain of block replays from the committed input and
        tokens, on this machine, and the result must hash to the committed `boundaries` root; the
        per-boundary roots and rows are then the record's, and every block is compared with them.
        Tolerance mode compares with the provider's own committed values: it needs the file."""
        rec = self.record
        if not self.comparison.strict:
            raise RecordError(rec.boundaries_missing() + "; tolerance mode compares with the provider's committed "
                              "boundaries, so it needs that file")
        roots, rows, tensors, results = {}, {}, {}, {}
        inputs = None
        self._regenerating = True
        try:
            for l in range(len(self.blocks) - 1):
                t0 = time.perf_counter()
                res = BlockResult(l, 0, self.served.describe(self.blocks, l), scope=RECORD)
                try:
                    with pinned_threads(self.recorded_threads(), enabled=rec.portable is None):
                        outputs = self._replay(res, l, inputs)
                except CommitmentMismatch as exc:
                    res.fail("record", str(exc))
                    outputs = None
                if res.findings or outputs is None:
                    self._error("boundaries", f"the boundaries could not be recomputed: {res.headline()}", fatal=True)
                    return
                b = l + 1
                full = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
                roots[boundary_label(b)] = steps_root(rec.algorithm, outputs)
                rows[boundary_key(b)] = TensorRef.of("activation", full, rec.algorithm)
                tensors[boundary_key(b)] = full
                res.compared = len(outputs)  # compared below, through the committed root
                res.seconds = time.perf_counter() - t0
                results[l] = res
                inputs = outputs
        finally:
            self._regenerating = False
        got = boundaries_root(rec.algorithm, roots, rows)
        if got != rec.committed_boundaries:
            self._error("boundaries", f"the boundaries recomputed by strict replay of the committed input and tokens "
                        f"on this machine hash to {got.hex()[:16]}…, the record commits {rec.committed_boundaries.hex()[:16]}"
                        "…: the record is not this model's computation, or it was made on other hardware or with "
                        "another thread count (the provider's boundaries file, from `aftune prepare-inference` or an "
                        "opening, names the block)", fatal=True)
            return
        rec.install_boundaries(roots, rows, tensors)
        # each regenerated block was its own strict replay from the committed input, and its output
        # is committed (the root matched): `verify_block` reports it without replaying it again
        self._regenerated = results
