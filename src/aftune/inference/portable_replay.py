"""Portable numerics on the verifier's side (SPEC.md 8.13 step 11): a block's own float32 outputs
rounded to the bfloat16 grid, with the record's near-boundary log applied under the rule, before
the bitwise comparison of `InferenceVerifier._compare_steps`.
"""

from __future__ import annotations

import torch

from ..verdict.findings import BlockResult
from .portable import adjust, boundary_cap, tau_for
from .record import boundary_key


class PortableReplay:
    """Mixed into `InferenceVerifier`: reads `record` and `portable_depth`."""

    def _step_of(self, flat: int, parts: list[torch.Tensor]) -> int:
        """The step holding flat element `flat` of a boundary's concatenated steps."""
        for k, part in enumerate(parts):
            if flat < part.numel():
                return k
            flat -= part.numel()
        return len(parts) - 1

    def _portable_outputs(self, res: BlockResult, l: int, outputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Portable numerics (SPEC.md 8.13): the verifier's own float32 outputs of block l rounded to
        the grid, a logged element taking the committed value only where the rule allows; the
        result is then compared bitwise (digest, steps root) like any strict output."""
        rec, b = self.record, l + 1
        key = boundary_key(b)
        ref = rec.rows.get(key)
        if not getattr(self, "_regenerating", False) and (ref is None or ref.dtype != "BF16"):
            res.fail("record", f"boundary {b}: a portable record commits its boundaries on the bfloat16 grid (BF16), "
                     f"not {ref.dtype if ref else 'nothing'}", tensor=key)
            return None
        entries = rec.portable.boundaries[b]
        full = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        cap = boundary_cap(full.numel())
        if len(entries) > cap:
            step = self._step_of(entries[cap][0], outputs)
            res.fail("output", f"boundary {b}: the near-boundary log lists {len(entries)} of its {full.numel()} "
                     f"elements, more than the cap {cap} (exceeded at step {step}): a log gives a provider one grid "
                     "step of freedom on each element it lists", tensor=key, step=step)
            return None
        tau, _ = tau_for(self.portable_depth)  # capped by the client's accepted depth
        adjusted = adjust(full, entries, tau)
        if adjusted.refused:
            step = self._step_of(adjusted.refused[0], outputs)
            res.fail("output", f"boundary {b}: {len(adjusted.refused)} logged element(s) commit a value that is not "
                     f"the grid rounding of any value within tau * s of the recomputed one (first: element "
                     f"{adjusted.refused[0]}, step {step})", tensor=key, step=step)
            return None
        sizes = [o.shape[1] for o in outputs] if outputs[0].dim() > 1 else None
        grid = adjusted.grid
        return [grid] if len(outputs) == 1 else [p.clone() for p in torch.split(grid, sizes, dim=1)]
