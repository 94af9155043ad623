"""Resuming an interrupted run (`aftune train --resume --run-dir RUN`): the provider's side only.

    aftune train --run-dir runs/demo --resume        # after a crash or a kill, same machine

A run killed at any point keeps what it signed: the transcript's complete lines, the manifests
and objects they commit. Resuming (SPEC.md 3.7):
1. drops a torn last transcript line (a line without its newline was never fully written);
2. refuses a finished run, and a run whose recomputed config (settings, model, data, versions,
   thread count) differs from its config.json byte for byte;
3. restarts training at the start of the last step block `c` whose full state is stored (a
   checkpoint, at most `checkpoint_interval - 1` step blocks before the first unsigned one), the
   state loaded from the store with every object checked against its committed digest;
4. recomputes step blocks `c .. n-1` (already signed) and requires each to reach its signed root
   (else nothing is appended: this machine does not reproduce the run), then signs the rest.

The resumed record is the record an uninterrupted run would have written: same roots, same run
root (tests/test_resume.py kills a run with SIGKILL and compares).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.signing import SigningKey
from ..core.store import ObjectMissing, ObjectStore
from ..errors import CommitmentMismatch, InputError, RecordError
from .engine import BlockedModel
from .manifest import StepBlockManifest, read_manifest
from .settings import TrainSettings
from .transcript import Transcript


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run continues: `signed_roots[s]` for every signed step block, and the
    step block `start` training restarts at (its state loaded from `manifest`, None for 0)."""

    signed_roots: tuple[bytes, ...]
    start: int
    prev_root: bytes  # the root `start` chains to (the config digest for step block 0)
    manifest: StepBlockManifest | None

    @property
    def signed(self) -> int:
        return len(self.signed_roots)


def drop_torn_line(path: Path) -> int:
    """Cut the transcript after its last newline (a kill during a write leaves a torn line);
    returns the number of bytes dropped."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - keep


def resume_point(run: Path, key: SigningKey, settings: TrainSettings, config_digest: bytes,
                 num_blocks: int) -> ResumePoint:
    """Read what the interrupted run signed and choose where to restart."""
    path = run / "transcript.jsonl"
    if not path.is_file():
        raise InputError(f"{run} has no transcript.jsonl: nothing to resume (start a new run instead)")
    drop_torn_line(path)
    transcript = Transcript.load(path, key.public_key)
    if transcript.run is not None:
        raise InputError(f"{run} is a finished run (its transcript ends with the run root): nothing to resume")
    if transcript.config_digest != config_digest:
        raise CommitmentMismatch(f"{path} was signed for another config than {run}/config.json")
    entries = transcript.step_blocks
    if len(entries) > settings.num_step_blocks + 1:
        raise RecordError(f"{path} signs {len(entries)} step blocks, more than the run's {settings.num_step_blocks + 1}")
    start = max((s for s in range(len(entries)) if settings.stores_state(s)), default=0)
    manifest = None
    if start > 0:
        manifest = read_manifest(run / "manifests", start, num_blocks)
        if manifest.merkle_root(transcript.algorithm) != entries[start].merkle_root:
            raise CommitmentMismatch(f"manifest of step block {start} does not match its signed root")
    prev = entries[start - 1].root if start > 0 else config_digest
    return ResumePoint(tuple(e.root for e in entries), start, prev, manifest)


def load_checkpoint(blocked: BlockedModel, store: ObjectStore, manifest: StepBlockManifest) -> None:
    """Load the committed state of every layer block at the start of `manifest`'s step block
    into the live model and optimizer (each object checked against its digest by the store)."""
    for b, entries in enumerate(manifest.blocks):
        for key, ref in entries.items():
            if not key.startswith(("state/", "optim/")):
                continue
            try:
                tensor = store.get(ref, f"step block {manifest.step_block}, layer block {b}")
            except ObjectMissing as exc:
                raise RecordError(f"cannot resume: {exc}") from None
            blocked.assign(key, tensor)
