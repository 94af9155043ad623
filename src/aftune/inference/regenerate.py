"""Regenerating the boundary activations an inference record commits by digest only (SPEC.md 8.9):
`aftune prepare-inference`, and the provider's side of an opening (`aftune open`).

    aftune prepare-inference R --record ID --layer-block 2 --model runs/demo

A record commits, per boundary, the digest of its activations and the root of their per-step
digests (a v6 record: all of them under one root, their values in a boundaries file written here
when missing); the tensors themselves are stored every `activation_interval` boundaries, or never. To
replay a layer block, the provider recomputes its input (and its output, which tolerance mode
compares with) by strict replay from the nearest stored boundary or from the input, on its own
hardware: every regenerated tensor must hash to the committed digest and per-step root before it
is stored, and one that does not is a FAIL (`CommitmentMismatch`): the record is not this model's
computation, or this is not the hardware it was made on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CommitmentMismatch, InputError
from .compact import write_boundaries
from .record import boundary_key
from .served import ServedModel
from .verify import InferenceVerifier


def regenerate(v: InferenceVerifier, boundaries) -> list[int]:
    """Store the boundaries in `boundaries` that are not stored yet, by one strict chain of
    block replays from the nearest stored boundary below the first of them (a v6 record's were
    regenerated in memory by the verifier, against its committed root), and write a v6 record's
    boundaries file when it is missing. Returns the boundaries stored."""
    rec, nb = v.record, len(v.blocks)
    if v.fatal:
        raise CommitmentMismatch(f"cannot regenerate activations: {v.errors[-1].describe()}")
    wanted = sorted({b for b in boundaries if 1 <= b < nb})
    done: list[int] = []
    for b in wanted:
        key = boundary_key(b)
        if key in rec.inline and not rec.stored(key):
            rec.store.put(rec.rows[key], rec.inline[key])
            done.append(b)
    if rec.is_v6 and not rec.records.boundaries_path(rec.record_id).is_file():
        roots = {k: bytes.fromhex(h) for k, h in rec.doc["boundary_roots"].items()}
        write_boundaries(rec.records, rec.record_id, roots, rec.boundary_rows)
    missing = [b for b in wanted if not rec.stored(boundary_key(b))]
    if not missing:
        return done
    start = max([0] + [b for b in range(1, missing[0]) if rec.stored(boundary_key(b))])
    inputs = None
    for l in range(start, missing[-1]):
        result, outputs = v.verify_block(l, inputs)
        if result.verdict != "PASS" or outputs is None:
            raise CommitmentMismatch(f"regenerating boundary {l + 1}: the strict replay of {result.label} does not "
                                     f"reproduce the committed activations ({result.headline()}): the record is not "
                                     "this model's computation, or this is not the hardware it was made on")
        if l + 1 in missing:
            full = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
            rec.store.put(rec.rows[boundary_key(l + 1)], full)
            done.append(l + 1)
        inputs = outputs
    return done


def prepare_inference(record_dir: str | Path, record: str | None = None, layer_block: int | None = None,
                      model: str | Path | ServedModel | None = None) -> list[int]:
    """Regenerate boundaries committed by digest only. With `layer_block`, only what that block's
    replay needs (its input, and its output for tolerance mode); otherwise every missing boundary.
    Returns the boundaries regenerated."""
    v = InferenceVerifier(record_dir, record, model=model, mode="strict")
    nb = len(v.blocks)
    if layer_block is not None and not 0 <= layer_block < nb:
        raise InputError(f"layer block {layer_block} does not exist: this record has layer blocks 0..{nb - 1}")
    wanted = range(1, nb) if layer_block is None else (layer_block, layer_block + 1)
    return regenerate(v, wanted)
