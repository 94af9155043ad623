"""The client's training workflow: verify a run, check its files, challenge it, audit the opening.

    import aftune

    verifier = aftune.RunVerifier("agreement.json", "runs/demo/provider.key.pub",
                                  transcript="my-transcript.jsonl")     # what the client expects, once
    report = verifier.verify("runs/demo")                               # every block and the final model
    report = verifier.verify("runs/demo", block=(1, 2))                 # one block
    challenge = verifier.challenge(sample_rate=0.25)                    # from the signed run root
    aftune.open_challenge("runs/demo", challenge, "bundle")             # the provider
    report = verifier.audit("bundle", challenge)

Every rule a client relies on lives here, not in the CLI: no verdict without an agreement unless
`UnsafeNoAgreement` says so; a challenge drawn for another run root or grid FAILs; a record that
contradicts its signatures (a wrong key, a rewritten transcript) is a FAIL `Report`, never an
exception. Bad input raises an `AftuneError` subclass. Nothing prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import CommitmentMismatch, InputError
from ..verdict.comparison import MODES, Tolerance
from ..verdict.findings import BlockResult, Finding, Report
from . import expect
from .expect import Unsafe, UnsafeNoAgreement
from .quiet import quiet

ALL = "all"  # RunVerifier.verify(run, block=ALL): every block and the final model (the default)


def mismatch_report(target, mode: str, exc: CommitmentMismatch, check: str = "record") -> Report:
    """The FAIL report of a record that contradicts what was signed before anything was replayed."""
    report = Report(str(target), mode)
    report.errors.append(Finding(-1, -1, check, str(exc)))
    return report


class RunVerifier:
    """Verifies training runs against what the client expects, stated once.

    `agreement`: the client's agreement (an Agreement or the path of agreement.json), required
    unless `unsafe` holds `UnsafeNoAgreement()`. `provider_key`: the provider's public key,
    pinned out of band (a PublicKey, a .pub path, or 'ed25519:<hex>'). `transcript`: the client's
    own copy of the transcript, received while training ran (without it, the run directory's,
    which the provider could rewrite). `client_key`: the client's public key, when the agreement
    must carry the client's signature. `mode` "strict" (bitwise) or "tolerance"; `dtype` the
    replay dtype (tolerance mode); `tolerance` thresholds (default: the agreed dtype's)."""

    def __init__(self, agreement, provider_key, *, transcript: str | Path | None = None, client_key=None,
                 mode: str = "strict", dtype: str | None = None, tolerance: Tolerance | None = None,
                 unsafe: Iterable[Unsafe] | Unsafe | None = None):
        skipped = expect.unsafe_set(unsafe, (UnsafeNoAgreement,))
        self.unsafe_no_agreement = UnsafeNoAgreement in skipped
        self.agreement = expect.agreement(agreement)
        if self.agreement is not None and self.unsafe_no_agreement:
            raise InputError("give an agreement or UnsafeNoAgreement(), not both")
        if self.agreement is None and not self.unsafe_no_agreement:
            from ..training.verify import NEEDS_AGREEMENT

            raise InputError(NEEDS_AGREEMENT)
        if client_key is not None:
            if self.agreement is None:
                raise InputError("client_key checks the agreement's signature: give the agreement")
            self.agreement.check_signature(expect.public_key(client_key, "your client public key"))
        self.provider_key = expect.public_key(provider_key)
        self.transcript = Path(transcript) if transcript is not None else None
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if tolerance is not None and mode != "tolerance":
            raise InputError("thresholds (tolerance=) apply to mode='tolerance'")
        self.mode, self.dtype, self.tolerance = mode, dtype, tolerance

    def _verifier(self, run_dir):
        from ..training.verify import Verifier

        return Verifier(run_dir, self.provider_key, self.agreement, unsafe_no_agreement=self.unsafe_no_agreement,
                        mode=self.mode, tolerance=self.tolerance, replay_dtype=self.dtype, transcript=self.transcript)

    def verify(self, run_dir: str | Path, *, block: tuple[int, int] | str = ALL,
               on_block: Callable[[BlockResult], None] | None = None) -> Report:
        """Replay one (layer block, step block), or every block and the final model (`ALL`)."""
        if block != ALL and not (isinstance(block, tuple) and len(block) == 2
                                 and all(isinstance(x, int) and not isinstance(x, bool) for x in block)):
            raise InputError(f"block is (layer_block, step_block) or 'all', not {block!r}")
        with quiet():
            try:
                v = self._verifier(run_dir)
            except CommitmentMismatch as exc:  # wrong key, rewritten transcript, edited config: a FAIL
                return mismatch_report(run_dir, self.mode, exc)
            try:
                if block == ALL:
                    return v.verify_all(on_block)
                report = v.new_report()
                report.errors.extend(v.conformance)
                result = v.verify_block(*block)[0]
            except CommitmentMismatch as exc:
                report = v.new_report()
                report.errors.append(Finding(-1, -1, "record", str(exc)))
                return report
        report.results.append(result)
        if on_block:
            on_block(result)
        return report

    def total_blocks(self, run_dir: str | Path) -> int:
        """How many blocks `verify(run_dir)` replays (for progress bars): the agreement's grid."""
        if self.agreement is not None:
            layers, steps = self.agreement.grid()
            return layers * steps
        from ..training.run import RunRecord

        record = RunRecord.open(run_dir, self.provider_key, self.transcript)
        return record.num_blocks * record.num_step_blocks

    def check(self, target: str | Path, progress=None):
        """Check the files of a run directory or bundle without replaying (`aftune check`)."""
        from ..protocol.check import check_path

        with quiet():
            return check_path(target, self.provider_key, transcript=self.transcript, progress=progress)

    def challenge(self, *, sample_rate: float | None = None, count: int | None = None, strategy: str = "uniform",
                  challenge_nonce: bytes | None = None, edge_weight: int | None = None,
                  transcript: str | Path | None = None):
        """Draw a challenge from the signed run root of your transcript copy (`transcript`, else
        the verifier's) and a fresh nonce, on the agreement's grid (`aftune challenge`)."""
        from ..protocol.challenge import challenge_from_transcript

        source = Path(transcript) if transcript is not None else self.transcript
        if source is None:
            raise InputError("a challenge is drawn from your own copy of the transcript: give transcript=")
        if source.is_dir():
            source = source / "transcript.jsonl"
        if (sample_rate is None) == (count is None) and strategy != "all":
            raise InputError("give sample_rate= or count= (or strategy='all')")
        return challenge_from_transcript(source, self.provider_key, strategy, count=count, sample_rate=sample_rate,
                                         nonce=challenge_nonce, edge_weight=edge_weight,
                                         config_path=source.parent / "config.json", agreement=self.agreement)

    def audit(self, bundle: str | Path, challenge, *, transcript: str | Path | None = None, workers: int | None = None,
              ray_address: str | None = None, on_block: Callable[[BlockResult], None] | None = None) -> Report:
        """Replay every challenged block from the provider's bundle against your transcript copy,
        challenge and agreement (`aftune audit`). A challenge made for another run root or grid,
        or a transcript the pinned key did not sign, FAILs."""
        from ..protocol.audit import audit_bundle
        from ..protocol.challenge import Challenge

        challenge = challenge if isinstance(challenge, Challenge) else Challenge.load(challenge)
        if challenge.kind != "training":
            raise InputError(f"this is an {challenge.kind} challenge: audit it with RecordVerifier.audit")
        source = Path(transcript) if transcript is not None else self.transcript
        if source is None:
            raise InputError("auditing a bundle needs your own copy of the transcript: give transcript=")
        with quiet():
            return audit_bundle(bundle, source, self.provider_key, challenge, agreement=self.agreement,
                                unsafe_no_agreement=self.unsafe_no_agreement, mode=self.mode, tolerance=self.tolerance,
                                replay_dtype=self.dtype, workers=workers, ray_address=ray_address, on_block=on_block)

    def calibrate(self, run_dir: str | Path, *, margin: float = 4.0):
        """Replay an honest run and suggest tolerance thresholds (`aftune calibrate`)."""
        from ..training.calibrate import calibrate

        with quiet():
            return calibrate(run_dir, self.provider_key, self.dtype, margin, agreement=self.agreement,
                             unsafe_no_agreement=self.unsafe_no_agreement)

    def prepare(self, run_dir: str | Path, layer_block: int | None = None, step_block: int | None = None, *,
                base_model: str | Path | None = None) -> list[int]:
        """Regenerate what the run committed by digest only (`aftune prepare`): a block's start
        state from the nearest checkpoint and, with digest-only boundaries (SPEC.md 3.8), its
        boundary tensors (neither block given: everything, from `base_model` where the re-run
        starts at step block 0). Returns the step blocks re-run, each tensor checked against its
        committed digest."""
        from ..training.regenerate import prepare, prepare_digest

        with quiet():
            v = self._verifier(run_dir)
            if v.run_settings.digest_boundaries:
                return prepare_digest(v, layer_block, step_block, base_model).step_blocks
            if layer_block is None or step_block is None:
                raise InputError("give the layer block and the step block")
            return prepare(run_dir, v.record.transcript.public_key, layer_block, step_block, verifier=v)

    def attest(self, run_dir: str | Path, report: Report, evidence_provider: str, attestation_nonce: bytes):
        """Inside a TEE: sign `report` with a key bound to evidence from `evidence_provider`
        (gramine, configfs-tsm, auto, unsafe-simulated) and the client's `attestation_nonce`
        (SPEC 10.4). Returns the AttestedVerdict."""
        from ..attestation.providers import provider_by_name
        from ..attestation.verdict import attest_report
        from ..training.transcript import Transcript

        source = self.transcript or Path(run_dir) / "transcript.jsonl"
        transcript = Transcript.load(source, self.provider_key)
        run = transcript.run
        if run is None:
            raise InputError("the transcript has no signed run root yet: a verdict must name a finished run")
        return attest_report(report.to_json(), provider_by_name(evidence_provider), attestation_nonce,
                             algorithm=transcript.algorithm, run_root=run.root,
                             config_digest=run.config_digest, provider_key=self.provider_key)


def open_challenge(target: str | Path, challenge, out: str | Path, *, model: str | Path | None = None,
                   progress=None, base_model: str | Path | None = None) -> dict:
    """The provider's opening of a challenge (`aftune open`): a bundle in `out`, from a run
    directory (a training challenge; one drawn for another run root or grid is refused) or a
    record directory (an inference challenge; `model` the served model, default the record's).
    `base_model`: a training run with digest-only boundaries regenerates from it (SPEC.md 3.8)."""
    from ..protocol.challenge import Challenge
    from ..protocol.opening import open_bundle, open_inference_bundle

    challenge = challenge if isinstance(challenge, Challenge) else Challenge.load(challenge)
    with quiet():
        if challenge.kind == "inference":
            return open_inference_bundle(target, challenge, out, model=model)
        return open_bundle(target, challenge, out, progress=progress, base_model=base_model)
