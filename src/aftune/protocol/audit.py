"""The client's audit of an opened bundle: every challenged block replayed, in parallel.

    aftune audit BUNDLE --transcript MY_COPY --challenge CHALLENGE --public-key PUB

The verifier reads nothing but the bundle, the client's own transcript and challenge, and the
provider's public key. Blocks are spread over a local process pool (each worker opens the bundle
itself), or over an existing Ray cluster with `ray_address`.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

from .bundle import BundleRecord
from ..errors import RecordError
from ..verdict.findings import BlockResult, Finding, Report
from ..core.signing import PublicKey
from ..training.transcript import Transcript
from ..training.verify import Tolerance, Verifier


def _verify_chunk(bundle_dir: str, transcript_path: str, key_text: str, blocks: list[tuple[int, int]],
                  all_blocks: list[tuple[int, int]], challenge_digest: bytes, mode: str, tolerance: Tolerance,
                  replay_dtype: str | None, threads: int | None) -> list[BlockResult]:
    if threads and mode != "strict":  # strict replay uses the recorded thread count (Verifier)
        import torch

        torch.set_num_threads(threads)
    transcript = Transcript.load(Path(transcript_path), PublicKey.from_text(key_text))
    record = BundleRecord.load(bundle_dir, transcript, challenge_digest, all_blocks)
    verifier = Verifier(None, None, mode=mode, tolerance=tolerance, replay_dtype=replay_dtype, record=record)
    return [verifier.verify_block(l, s)[0] for l, s in blocks]


def audit_bundle(bundle_dir: str | Path, transcript_path: str | Path, public_key: PublicKey,
                 blocks: list[tuple[int, int]], challenge_digest: bytes, *, mode: str = "strict",
                 tolerance: Tolerance = Tolerance(), replay_dtype: str | None = None, workers: int | None = None,
                 ray_address: str | None = None,
                 on_block: Callable[[BlockResult], None] | None = None) -> Report:
    """Verify every challenged block from the bundle. A bundle that cannot be opened against the
    transcript and challenge is a FAIL (the report's errors), never a PASS."""
    report = Report(str(bundle_dir), mode)
    transcript = Transcript.load(Path(transcript_path), public_key)
    try:  # structural checks once, in this process, before any work is spread out
        record = BundleRecord.load(bundle_dir, transcript, challenge_digest, blocks)
        record.dataset(), record.base_digests(), record.tokenizer_dir()
    except RecordError as exc:  # missing, corrupt or contradicting: the provider failed to open
        report.errors.append(Finding(-1, -1, "opening", str(exc)))
        return report
    if not blocks:
        report.errors.append(Finding(-1, -1, "opening", "the challenge names no blocks: nothing was compared"))
        return report
    workers = workers or (min(os.cpu_count() or 1, len(blocks)) if len(blocks) >= 4 else 1)
    chunks = [blocks[i::workers] for i in range(workers)]
    args = (str(bundle_dir), str(transcript_path), public_key.text)
    rest = (blocks, challenge_digest, mode, tolerance, replay_dtype)
    results: list[BlockResult] = []
    if ray_address:
        results = _ray_map(ray_address, args, chunks, rest)
    elif workers == 1:
        results = _verify_chunk(*args, blocks, *rest, None)
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for chunk_results in pool.map(_verify_chunk, *zip(*[(*args, c, *rest, threads) for c in chunks])):
                results += chunk_results
    order = {b: i for i, b in enumerate(blocks)}
    results.sort(key=lambda r: order[(r.layer_block, r.step_block)])
    for r in results:
        report.results.append(r)
        if on_block:
            on_block(r)
    return report


def _ray_map(address: str, args, chunks, rest) -> list[BlockResult]:
    try:
        import ray
    except ImportError:
        from ..errors import MissingExtra

        raise MissingExtra("ray", "ray") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(_verify_chunk)
    futures = [remote.remote(*args, c, *rest, 1) for c in chunks]
    out = []
    for chunk_results in ray.get(futures):
        out += chunk_results
    return out
