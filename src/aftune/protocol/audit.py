"""The client's audit of an opened bundle: every challenged block replayed (SPEC.md 9.7, 9.7a).

    aftune audit BUNDLE --transcript MY_COPY --challenge CHALLENGE --public-key PUB

The verifier reads nothing but the bundle, the client's own transcript (or, for an inference
record, its own copy of the model) and challenge, and the provider's public key. Training blocks
are spread over a local process pool (each worker opens the bundle itself), or over an existing
Ray cluster with `ray_address` (one task per block; docs/ray.md): each node opens the bundle and
transcript at the same absolute path, so they must be on storage every node mounts.
"""

from __future__ import annotations

import os
from contextlib import suppress
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

from ..core import jsonio
from ..core.signing import PublicKey
from ..errors import ClusterError, CommitmentMismatch, InputError, MissingExtra, RecordError
from ..training.transcript import Transcript
from ..training.agreement import Agreement
from ..training.verify import NEEDS_AGREEMENT, Verifier
from ..verdict.findings import RECORD, BlockResult, Finding, ReplayNode, Report
from ..verdict.comparison import Tolerance
from .bundle import INFERENCE_BUNDLE_FORMAT, MAX_BUNDLE_JSON, BundleStore, TrainingBundle


def _verify_chunk(bundle_dir: str, transcript_path: str, key_text: str, blocks: list[tuple[int, int]],
                  all_blocks: list[tuple[int, int]], challenge_digest: bytes, agreement: Agreement | None, mode: str,
                  tolerance: Tolerance, replay_dtype: str | None, threads: int | None,
                  on_block: Callable[[BlockResult], None] | None = None) -> list[BlockResult]:
    if threads and mode != "strict":  # strict replay uses the recorded thread count (Verifier)
        import torch

        torch.set_num_threads(threads)
    transcript = Transcript.load(Path(transcript_path), PublicKey.from_text(key_text))
    record = TrainingBundle.load(bundle_dir, transcript, challenge_digest, all_blocks)
    verifier = Verifier(None, None, agreement, unsafe_no_agreement=agreement is None, mode=mode, tolerance=tolerance,
                        replay_dtype=replay_dtype, record=record)
    results = []
    for l, s in blocks:
        results.append(verifier.verify_block(l, s)[0])
        if on_block:  # in-process only: progress as each block ends
            on_block(results[-1])
    return results


def audit_bundle(bundle_dir: str | Path, transcript_path: str | Path, public_key: PublicKey, challenge, *,
                 agreement: Agreement | None = None, unsafe_no_agreement: bool = False, mode: str = "strict",
                 tolerance: Tolerance | None = None, replay_dtype: str | None = None, workers: int | None = None,
                 ray_address: str | None = None,
                 on_block: Callable[[BlockResult], None] | None = None) -> Report:
    """Verify every block of the training `challenge` from the bundle against the client's own
    transcript and `agreement`. A transcript that the pinned key did not sign, a challenge drawn
    for another run root or grid (`challenge_mismatch`), a bundle that cannot be opened against
    the transcript and challenge, or a run that does not conform to the agreement (its config,
    examples, labels, tokenizer) is a FAIL (the report's errors), never a PASS."""
    from .challenge import challenge_mismatch

    if agreement is None and not unsafe_no_agreement:
        raise InputError(NEEDS_AGREEMENT)
    report = Report(str(bundle_dir), mode)
    try:
        transcript = Transcript.load(Path(transcript_path), public_key)
    except CommitmentMismatch as exc:  # not signed by the pinned key, or rewritten: nothing it commits counts
        report.errors.append(Finding(-1, -1, "transcript", str(exc)))
        return report
    why = challenge_mismatch(challenge, transcript, Path(bundle_dir) / "config.json")
    if why is not None:
        report.errors.append(Finding(-1, -1, "challenge", why))
        return report
    blocks, challenge_digest = list(challenge.blocks), challenge.digest_bytes
    try:  # structural checks once, in this process, before any work is spread out
        record = TrainingBundle.load(bundle_dir, transcript, challenge_digest, blocks)
        probe = Verifier(None, None, agreement, unsafe_no_agreement=unsafe_no_agreement, mode=mode,
                         tolerance=tolerance, replay_dtype=replay_dtype, record=record)
    except RecordError as exc:  # missing, corrupt or contradicting: the provider failed to open
        report.errors.append(Finding(-1, -1, "opening", str(exc)))
        return report
    report.notes.extend(probe.notes)
    report.agreement = probe.new_report().agreement
    if probe.conformance:
        report.errors.extend(probe.conformance)
        return report
    if not blocks:
        report.errors.append(Finding(-1, -1, "opening", "the challenge names no blocks: nothing was compared"))
        return report
    if workers is None:  # as many replays as the cores run at full speed: a strict replay pins the recorded threads
        per_replay = (probe.recorded_threads() or 1) if probe.comparison.strict else 1
        workers = min(max(1, (os.cpu_count() or 1) // per_replay), len(blocks)) if len(blocks) >= 4 else 1
    args = (str(bundle_dir), str(transcript_path), public_key.text)
    rest = (blocks, challenge_digest, agreement, mode, tolerance, replay_dtype)
    results: list[BlockResult] = []
    reported = False
    if ray_address:  # one task per block, spread over the nodes; progress as each block ends
        per_replay = (probe.recorded_threads() or 1) if probe.comparison.strict else 1
        args = (str(Path(bundle_dir).resolve()), str(Path(transcript_path).resolve()), public_key.text)
        results = _ray_map(ray_address, args, blocks, rest, per_replay, on_block)
        reported = True
    elif workers == 1:
        results = _verify_chunk(*args, blocks, *rest, None, on_block)
        reported = True
    else:
        import multiprocessing
        from concurrent.futures import as_completed

        # several chunks per worker, so that progress arrives while the audit runs (each chunk
        # opens the bundle once: a few chunks per worker keep that cost small)
        n_chunks = min(len(blocks), workers * 4)
        chunks = [blocks[i::n_chunks] for i in range(n_chunks)]
        ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_verify_chunk, *args, c, *rest, threads) for c in chunks]
            for future in as_completed(futures):
                for r in future.result():
                    results.append(r)
                    if on_block:
                        on_block(r)
        reported = True
    order = {b: i for i, b in enumerate(blocks)}
    results.sort(key=lambda r: order[(r.layer_block, r.step_block)])
    for r in results:
        report.results.append(r)
        if on_block and not reported:
            on_block(r)
    return report


def _replay_on_node(bundle_dir: str, transcript_path: str, key_text: str, block: tuple[int, int], *rest):
    """A Ray task: replay one block on whichever node runs it; say which node and which versions."""
    import socket

    import ray
    import torch

    from ..version import __version__

    node = ReplayNode(ray.get_runtime_context().get_node_id(), socket.gethostname())
    results = _verify_chunk(bundle_dir, transcript_path, key_text, [block], *rest, 1)
    for r in results:
        r.replayed_on = node
    return node, (__version__, torch.__version__), results


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT address must accept a connection: `ray.init` retries a dead one for minutes."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return  # "auto", ray://...: Ray's own address forms, which Ray resolves
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start its head node "
                         f"with `ray start --head --port {port}` there, or give the address it printed "
                         "(docs/ray.md)") from None


def _ray_map(address: str, args, blocks: list[tuple[int, int]], rest, cpus_per_replay: int,
             on_block: Callable[[BlockResult], None] | None) -> list[BlockResult]:
    """Replay each block as one Ray task on the cluster at `address` (SPREAD over its nodes, each
    task holding the cores a replay uses). Every node must run this driver's aftune and torch. A
    node or worker lost mid-audit is a `ClusterError` naming the block it held: Ray's retries are
    off, so that each block in the report was replayed once, on the node the report names."""
    try:
        import ray
        from ray.exceptions import RayError, RayTaskError
    except ImportError:
        raise MissingExtra("ray", "ray") from None
    import torch

    from ..version import __version__

    _check_reachable(address)
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"no Ray cluster answers at {address}: {exc}; start one with `ray start --head` "
                         "(docs/ray.md)") from None

    def widest_node() -> float:  # a task that no alive node can hold would wait for ever
        return max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)

    if widest_node() < cpus_per_replay:
        raise InputError(f"each replay needs {cpus_per_replay} CPUs (the thread count recorded, strict mode), "
                         f"and no node of the Ray cluster at {address} has more than {widest_node():g}")
    replay = ray.remote(num_cpus=cpus_per_replay, scheduling_strategy="SPREAD", max_retries=0)(_replay_on_node)
    pending = {replay.remote(*args, b, *rest): b for b in blocks}
    out = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=30)
            if not done and widest_node() < cpus_per_replay:
                l, s = next(iter(pending.values()))
                raise ClusterError(f"the Ray cluster at {address} has lost every node with {cpus_per_replay} CPUs "
                                   f"while layer block {l}, step block {s} and {len(pending) - 1} more waited: "
                                   "nothing was concluded; check the nodes (`ray status`) and run the audit again")
            for ref in done:
                l, s = pending.pop(ref)
                try:
                    node, versions, results = ray.get(ref)
                except RayTaskError as exc:  # the replay itself raised: as if it had run here
                    raise (exc.cause if isinstance(exc.cause, BaseException) else exc) from None
                except RayError as exc:
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise ClusterError(f"the Ray cluster lost layer block {l}, step block {s} mid-audit "
                                       f"({type(exc).__name__}: {reason}); nothing was concluded: check "
                                       f"the nodes (`ray status`) and run the audit again") from None
                if versions != (__version__, torch.__version__):
                    raise InputError(f"Ray {node.describe()} runs aftune {versions[0]} with torch {versions[1]}, "
                                     f"this driver aftune {__version__} with torch {torch.__version__}: "
                                     "install the same versions on every node (docs/ray.md)")
                out += results
                for r in results:
                    if on_block:
                        on_block(r)
    finally:
        for ref in pending:  # an error left work running: stop it (on a cluster that may be gone)
            with suppress(RayError):
                ray.cancel(ref, force=True)
    return out


# --- inference records ---------------------------------------------------------------------------

def audit_inference_bundle(bundle: str | Path, challenge, public_key: PublicKey, model: str | Path, *,
                           mode: str = "strict", replay_dtype: str | None = None,
                           expected_prompt: str | None = None, expected_text: str | None = None,
                           expected_image: str | Path | None = None, policy=None, request_nonce: bytes | None = None,
                           on_block=None, max_layers_per_block: int = 2) -> Report:
    """Replay the challenged layer blocks of the record the challenge names, from the bundle alone,
    and compare the record with the client's prompt, generation policy and request nonce (what is
    not given is a line of the report's notes). A bundle missing anything, or answering another
    record, FAILs."""
    from ..inference.verify import InferenceVerifier

    report = Report(str(bundle), mode)
    opening = lambda reason: Finding(-1, 0, "opening", reason, scope=RECORD)  # noqa: E731
    if challenge.kind != "inference":
        raise InputError(f"this is a {challenge.kind} challenge, not an inference one")
    if not challenge.blocks:
        report.errors.append(opening("the challenge names no blocks: nothing was compared"))
        return report
    doc = jsonio.read_json(Path(bundle) / "bundle.json", MAX_BUNDLE_JSON, "inference bundle", InputError)
    if not isinstance(doc, dict) or doc.get("format") != INFERENCE_BUNDLE_FORMAT:
        raise InputError(f"{bundle} is not an {INFERENCE_BUNDLE_FORMAT} bundle")
    if doc.get("challenge_digest") != challenge.digest or doc.get("blocks") != [[l, s] for l, s in challenge.blocks]:
        report.errors.append(opening("this bundle answers another challenge"))
        return report
    try:
        v = InferenceVerifier(bundle, challenge.run_root, model=model, mode=mode, replay_dtype=replay_dtype,
                              public_key=public_key, expected_prompt=expected_prompt, expected_text=expected_text,
                              expected_image=expected_image, policy=policy, request_nonce=request_nonce,
                              max_layers_per_block=max_layers_per_block, regenerate_boundaries=False)
    except (InputError, RecordError) as exc:  # the record the challenge names is not (properly) in the bundle
        report.errors.append(opening(f"the bundle does not open record {challenge.run_root[:16]}…: {exc}"))
        return report
    if v.record.record_id.hex() != challenge.run_root:
        report.errors.append(opening("the bundle opens another record than the challenge names"))
        return report
    if len(v.blocks) != challenge.num_layer_blocks:
        report.errors.append(opening("the challenge's grid does not match the record's layer blocks"))
        return report
    report.errors.extend(v.errors)
    report.notes.extend(v.notes)
    v.record.records.store = BundleStore(v.record.records.store.root, v.record.algorithm)
    for l, _ in challenge.blocks:
        try:
            result, _ = v.verify_block(l)
        except RecordError as exc:  # something the replay needs is not in the bundle
            result = BlockResult(l, 0, v.served.describe(v.blocks, l), scope=RECORD)
            result.fail("opening", f"the bundle cannot be replayed: {exc}")
        report.results.append(result)
        if on_block:
            on_block(result)
    return report
