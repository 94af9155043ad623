"""Background recording: hashes, compresses and stores tensors off the training thread, then
commits and signs each step block as soon as its last tensor is in (SPEC.md 3).

The training thread only hands over tensors that it will not modify again (boundary tensors are
fresh; state tensors are snapshot copies). Worker threads compute digests and write objects (the
hashing and compression libraries release the GIL); one committer thread builds each manifest,
its Merkle root, and the signed transcript line, in step-block order. At most two step blocks
are in flight, which bounds memory.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .manifest import StepBlockManifest
from ..core.store import ObjectStore, TensorRef
from .transcript import TranscriptWriter


class Recorder:
    def __init__(self, run_dir: Path, algorithm: str, num_blocks: int, transcript: TranscriptWriter,
                 workers: int = 2, compression_level: int = 1):
        self.run_dir = run_dir
        self.algorithm = algorithm
        self.num_blocks = num_blocks
        self.transcript = transcript
        self.store = ObjectStore(run_dir / "objects", algorithm, level=compression_level)
        (run_dir / "manifests").mkdir(parents=True, exist_ok=True)
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="aftune-hash")
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="aftune-commit")
        self._open: dict[int, tuple[int, int, dict[str, Future], list[dict[str, Future]]]] = {}
        self._commits: list[Future] = []
        self.roots: dict[int, bytes] = {}

    def _job(self, name: str, tensor: torch.Tensor, store: bool) -> TensorRef:
        ref = TensorRef.of(name, tensor, self.algorithm)
        if store:
            self.store.put(ref, tensor)
        return ref

    def begin(self, step_block: int, first_step: int, num_steps: int) -> None:
        self._open[step_block] = (first_step, num_steps, {}, [{} for _ in range(self.num_blocks)])

    def state(self, step_block: int, block: int, key: str, name: str, tensor: torch.Tensor, store: bool) -> Future:
        """A state tensor of `block` at the start of `step_block`. The caller passes a private copy,
        or the live tensor and waits for the returned future before modifying it."""
        future = self._workers.submit(self._job, name, tensor, store)
        self._open[step_block][3][block][key] = future
        return future

    def common(self, step_block: int, key: str, name: str, tensor: torch.Tensor) -> None:
        """A cross-block tensor (always stored); the caller must not modify it afterwards."""
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        self._open[step_block][2][key] = self._workers.submit(self._job, name, t, True)

    def end(self, step_block: int) -> None:
        """Close `step_block`: it is committed and signed in the background. Waits for the step
        block before the previous one, so at most two are in flight."""
        first, num, common, blocks = self._open.pop(step_block)
        self._commits.append(self._committer.submit(self._commit, step_block, first, num, common, blocks))
        if len(self._commits) >= 3:
            self._commits[-3].result()

    def _commit(self, step_block, first, num, common, blocks) -> bytes:
        manifest = StepBlockManifest(
            step_block, first, num,
            {k: f.result() for k, f in common.items()},
            [{k: f.result() for k, f in b.items()} for b in blocks],
        )
        manifest.write(self.run_dir / "manifests" / f"{step_block:06d}.json")
        root = self.transcript.step_block(step_block, first, num, manifest.merkle_root(self.algorithm))
        self.roots[step_block] = root
        return root

    def close(self) -> None:
        """Wait for every commit; re-raises the first background error."""
        try:
            for f in self._commits:
                f.result()
        finally:
            self._workers.shutdown(wait=True)
            self._committer.shutdown(wait=True)
