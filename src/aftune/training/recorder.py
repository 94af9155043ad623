"""Background recording: hashes, compresses and stores tensors off the training thread, then
commits and signs each step block as soon as its last tensor is in (SPEC.md 3).

The training thread only hands over tensors that it will not modify again (boundary tensors are
fresh; state tensors are snapshot copies, or live tensors it waits for). Worker threads compute
digests and write objects (the hashing and compression libraries release the GIL); one committer
thread builds each manifest, its Merkle root, and the signed transcript line, in step-block
order. At most two step blocks are in flight, which bounds memory. Each step block's objects go
into one pack (core.packs), whose index is written before the step block's manifest and signed
line: a signed step block's objects are always readable.

A small model's step is short and the training thread holds the GIL for most of it, so each
hand-over and each stored object costs it time (benchmarks/README.md): cross-block tensors are
handed over in batches, integer batch fields are committed by digest only (a verifier rebuilds
every batch and compares them by digest: SPEC.md 3.2), and objects are compressed at zstd's
fastest level (float tensors barely compress; integer ones still do).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .manifest import StepBlockManifest, is_boundary, is_step_gradient
from ..core.packs import PACK_DIR, PackWriter
from ..core.store import ObjectStore, TensorRef
from .transcript import TranscriptWriter


BATCH_TENSORS = 32  # tensors handed over per background job
BATCH_BYTES = 32 << 20


def stored_common(key: str, tensor: torch.Tensor, digest_boundaries: bool = False) -> bool:
    """Whether a common entry's object is stored (SPEC.md 3.2): all but integer and boolean
    batch fields, which no verifier loads, and, with digest-only boundaries, the boundary
    tensors (SPEC.md 3.8: regenerated on challenge)."""
    if digest_boundaries and is_boundary(key):
        return False
    if is_step_gradient(key):  # several processes: the ranks' and the reduced gradients (SPEC.md 5.5)
        return False
    return tensor.is_floating_point() or "/batch/" not in key


class _Digest(Future):
    """The digest of one handed-over tensor. Waiting for it first hands over the batch it is in."""

    def __init__(self, hand_over):
        super().__init__()
        self._hand_over = hand_over

    def result(self, timeout=None):  # the training thread's wait; the committer uses Future.result
        self._hand_over()
        return super().result(timeout)


class Recorder:
    def __init__(self, run_dir: Path, algorithm: str, num_blocks: int, transcript: TranscriptWriter,
                 workers: int = 2, compression_level: int = -1, signed: int = 0, digest_boundaries: bool = False):
        self.run_dir = run_dir
        self.algorithm = algorithm
        self.num_blocks = num_blocks
        self.transcript = transcript
        self.store = ObjectStore(run_dir / "objects", algorithm, level=compression_level)
        (run_dir / "manifests").mkdir(parents=True, exist_ok=True)
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="aftune-hash")
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="aftune-commit")
        self._open: dict[int, tuple[int, int, dict[str, Future], list[dict[str, Future]]]] = {}
        self._packs: dict[int, PackWriter] = {}  # step block -> its open pack
        self._pending: list[tuple[_Digest, str, torch.Tensor, PackWriter | None]] = []  # not yet handed over
        self._pending_bytes = 0
        self._pending_kind = ""
        self._commits: list[Future] = []
        self.roots: dict[int, bytes] = {}
        self.digest_boundaries = digest_boundaries
        self.signed = signed  # resuming: step blocks below this one are signed; their manifests stay as they are
        if signed:  # packs the interrupted run never finished: nothing references them
            for tmp in (run_dir / "objects" / PACK_DIR).glob(".tmp-*"):
                tmp.unlink(missing_ok=True)

    def _job(self, name: str, tensor: torch.Tensor, pack: PackWriter | None) -> TensorRef:
        ref = TensorRef.of(name, tensor, self.algorithm)
        if pack is not None:
            self.store.put(ref, tensor, pack)
        return ref

    def _batch_job(self, items: list[tuple[_Digest, str, torch.Tensor, PackWriter | None]]) -> None:
        for n, (future, name, tensor, store) in enumerate(items):
            try:
                future.set_result(self._job(name, tensor, store))
            except BaseException as exc:
                for f, *_ in items[n:]:
                    f.set_exception(exc)
                raise

    def _add(self, step_block: int, kind: str, name: str, tensor: torch.Tensor, store: bool) -> _Digest:
        if kind != self._pending_kind:  # the state is handed over before training starts
            self._flush()
            self._pending_kind = kind
        future = _Digest(self._flush)
        self._pending.append((future, name, tensor, self._packs[step_block] if store else None))
        self._pending_bytes += tensor.nelement() * tensor.element_size()
        if len(self._pending) >= BATCH_TENSORS or self._pending_bytes >= BATCH_BYTES:
            self._flush()
        return future

    def _flush(self) -> None:
        """Hand the pending tensors to a worker (training thread only)."""
        if self._pending:
            self._workers.submit(self._batch_job, self._pending)
        self._pending, self._pending_bytes = [], 0

    def begin(self, step_block: int, first_step: int, num_steps: int) -> None:
        self._open[step_block] = (first_step, num_steps, {}, [{} for _ in range(self.num_blocks)])
        self._packs[step_block] = self.store.begin_pack(f"{step_block:06d}")

    def state(self, step_block: int, block: int, key: str, name: str, tensor: torch.Tensor, store: bool) -> Future:
        """A state tensor of `block` at the start of `step_block`. The caller passes a private copy,
        or the live tensor and waits for the returned future before modifying it."""
        future = self._add(step_block, "state", name, tensor, store)
        self._open[step_block][3][block][key] = future
        return future

    def common(self, step_block: int, key: str, name: str, tensor: torch.Tensor) -> None:
        """A cross-block tensor; the caller must not modify it afterwards."""
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        self._open[step_block][2][key] = self._add(step_block, "common", name, t,
                                                   stored_common(key, t, self.digest_boundaries))

    def merge(self, step_block: int, common: dict[str, TensorRef], blocks: list[dict[str, TensorRef]]) -> None:
        """Several ranks (SPEC.md 5.5): add another rank's rows of `step_block` (its objects are
        in the store already). A key committed twice is an internal error, not a record."""
        _, _, mine, my_blocks = self._open[step_block]
        for target, rows in [(mine, common)] + list(zip(my_blocks, blocks)):
            for key, ref in rows.items():
                if key in target:
                    raise RuntimeError(f"two ranks committed {key}")
                done: Future = Future()
                done.set_result(ref)
                target[key] = done

    def end(self, step_block: int) -> None:
        """Close `step_block`: it is committed and signed in the background. Waits for the step
        block before the previous one, so at most two are in flight."""
        self._flush()
        first, num, common, blocks = self._open.pop(step_block)
        pack = self._packs.pop(step_block)
        self._commits.append(self._committer.submit(self._commit, step_block, first, num, common, blocks, pack))
        if len(self._commits) >= 3:
            self._commits[-3].result()

    def _commit(self, step_block, first, num, common, blocks, pack: PackWriter) -> bytes:
        try:
            manifest = StepBlockManifest(
                step_block, first, num,
                {k: Future.result(f) for k, f in common.items()},  # end() handed them over
                [{k: Future.result(f) for k, f in b.items()} for b in blocks],
            )
        except BaseException:
            pack.abort()
            raise
        pack.finish()  # before the manifest and the signed line: what is signed is readable
        if step_block >= self.signed:
            manifest.write(self.run_dir / "manifests")
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
            for pack in self._packs.values():  # step blocks never ended (an error in training)
                pack.abort()


class RankRecorder(Recorder):
    """A rank other than 0 (SPEC.md 5.5): hashes and stores its tensors in the run's object store
    like the recorder of rank 0, but writes no manifest and signs nothing: `end` returns the
    step block's rows, which rank 0 merges into its manifest."""

    def __init__(self, run_dir: Path, algorithm: str, num_blocks: int, rank: int, digest_boundaries: bool = False):
        super().__init__(run_dir, algorithm, num_blocks, None, digest_boundaries=digest_boundaries)
        self.rank = rank

    def begin(self, step_block: int, first_step: int, num_steps: int) -> None:
        super().begin(step_block, first_step, num_steps)  # its own pack: ranks never write one file
        self._packs[step_block] = self.store.begin_pack(f"{step_block:06d}-rank{self.rank:04d}")

    def end(self, step_block: int) -> tuple[dict[str, TensorRef], list[dict[str, TensorRef]]]:
        """The step block's rows, once its pack is complete (rank 0 signs only what is readable)."""
        self._flush()
        _, _, common, blocks = self._open.pop(step_block)
        pack = self._packs.pop(step_block)
        try:
            rows = ({k: Future.result(f) for k, f in common.items()},
                    [{k: Future.result(f) for k, f in b.items()} for b in blocks])
        except BaseException:
            pack.abort()
            raise
        pack.finish()
        return rows
