"""Regenerating boundary activations an inference record commits by digest only (I_A > 1):
`aftune prepare-inference` (SPEC.md 8.9).

    aftune prepare-inference R --record ID --layer-block 2 --model runs/demo
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CommitmentMismatch, InputError, RecordError
from .record import boundary_key
from .served import ServedModel
from .verify import InferenceVerifier


def prepare_inference(record_dir: str | Path, record: str | None = None, layer_block: int | None = None,
                      model: str | Path | ServedModel | None = None) -> list[int]:
    """Regenerate boundaries committed by digest only (I_A > 1) by strict replay from the nearest
    stored one; each regenerated tensor must match its committed digests before it is stored.
    With `layer_block`, only what that block's replay needs (its input, and its output for
    tolerance mode); otherwise every missing boundary. Returns the boundaries regenerated."""
    v = InferenceVerifier(record_dir, record, model=model, mode="strict")
    rec, nb = v.record, len(v.blocks)
    if layer_block is not None and not 0 <= layer_block < nb:
        raise InputError(f"layer block {layer_block} does not exist: this record has layer blocks 0..{nb - 1}")
    if v.fatal:
        raise CommitmentMismatch(f"cannot regenerate activations: {v.errors[-1].describe()}")
    wanted = range(1, nb) if layer_block is None else [b for b in (layer_block, layer_block + 1) if 1 <= b < nb]
    missing = [b for b in wanted if not rec.has_tensor(boundary_key(b))]
    done: list[int] = []
    for target in missing:
        start = max([0] + [b for b in range(1, target) if rec.has_tensor(boundary_key(b))])
        inputs = None
        for l in range(start, target):
            result, outputs = v.verify_block(l, inputs)
            if result.verdict != "PASS" or outputs is None:
                raise RecordError(f"cannot regenerate boundary {l + 1}: the strict replay of {result.label} does not "
                                  f"match its digests ({result.headline()}); regeneration needs the hardware the "
                                  "record was made on, and an honest record")
            full = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
            ref = rec.rows[boundary_key(l + 1)]
            if not rec.has_tensor(boundary_key(l + 1)):
                rec.store.put(ref, full)
                done.append(l + 1)
            inputs = outputs
    return sorted(set(done))
