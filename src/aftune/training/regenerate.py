"""Regenerate checkpoints that were committed by digest only (`aftune prepare`).

With checkpoint interval I_C > 1 the full state of a layer block is stored only every I_C step
blocks. To open step block s, its start state is rebuilt by replaying from the nearest stored
checkpoint; every regenerated tensor must match its committed digest before it is stored.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, RecordError
from ..core.signing import PublicKey
from .agreement import Agreement
from .verify import Verifier


def prepare(run_dir: str | Path, public_key: PublicKey, layer_block: int, step_block: int,
            verifier: Verifier | None = None, agreement: Agreement | None = None,
            unsafe_no_agreement: bool = False) -> list[int]:
    """Make the start state of (layer_block, step_block) available; returns the step blocks
    whose state was regenerated (empty when it was already stored). The replay follows the
    `agreement` (or `verifier`'s)."""
    v = verifier or Verifier(run_dir, public_key, agreement, unsafe_no_agreement=unsafe_no_agreement, mode="strict")
    ns = v.num_step_blocks
    if not 0 <= step_block <= ns:
        raise InputError(f"step block {step_block} does not exist: this run has step blocks 0..{ns}")
    if not 0 <= layer_block < len(v.blocked.blocks):
        raise InputError(f"layer block {layer_block} does not exist")
    start = step_block - step_block % v.settings.checkpoint_interval
    regenerated = []
    state = None
    for s in range(start, step_block):
        result, state = v.verify_block(layer_block, s, state)
        if result.findings or not state:
            raise RecordError(f"cannot regenerate step block {s + 1}: replaying step block {s} failed: {result.headline()}")
        manifest = v.record.manifest(s + 1)
        for b in v.blocked.tied_group(layer_block):  # a tied group is replayed together (SPEC.md 5.2.4)
            for key, (ref, _) in v.state_refs(manifest, b).items():
                if ref is not None and not v.record.store.has(ref.digest):
                    v.record.store.put(ref, state[key])
        regenerated.append(s + 1)
    return regenerated
