"""Static checks a client runs on what it was handed: a run, record directory or bundle's files
(`aftune check`), a TEE-shielded partition record (`aftune partition check`), and TEE evidence
(`aftune attestation verify`).

    report = aftune.check("runs/demo", "runs/demo/provider.key.pub")     # .status "intact" or "damaged"
    report = aftune.check_partition("partition-records/ID.json", "trusted.pub", crossings=None)
    appraisal = aftune.verify_attestation(aftune.Evidence("tdx", quote, collateral=text))

None of them prints; a record that fails a check gives a failing report, bad input an AftuneError.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CommitmentMismatch
from ..verdict.findings import RECORD, BlockResult, Report
from . import expect
from .quiet import quiet


def check(target: str | Path, provider_key, *, transcript: str | Path | None = None, progress=None):
    """Check every stored object, manifest, root, chain link and signature of a run directory,
    inference record directory or bundle against the provider's key, replaying nothing
    (SPEC.md 6.9). Returns a CheckReport (`status` "intact" or "damaged", `problems` with path and why)."""
    from ..protocol.check import check_path

    with quiet():
        return check_path(target, expect.public_key(provider_key), transcript=transcript, progress=progress)


def check_partition(record: str | Path, trusted_key, *, crossings: str | Path | None = None) -> Report:
    """Check a partition record: signed by the trusted side's pinned key, its Merkle root, and
    with `crossings` (the stored crossing tensors) every digest and every offloaded product
    replayed (SPEC.md 11). PASS only when all of that holds and the record's outcome is PASS."""
    from ..partition import PartitionRecord, check_record, load_crossings

    key = expect.public_key(trusted_key, "the trusted side's public key")
    with quiet():
        loaded = PartitionRecord.read(record)
        result = BlockResult(-1, 0, f"partition record {Path(record).name}", scope=RECORD)
        report = Report(str(record), "strict")
        try:
            found = check_record(loaded, public_key=key, crossings=load_crossings(crossings) if crossings else None)
        except CommitmentMismatch as exc:
            result.fail("partition", str(exc))
        else:
            result.label = f"partition record {found.record_id[:16]}… ({found.strategy})"
            result.compared = 1 + found.digests_checked + found.products_replayed
            if found.outcome != "PASS":
                result.fail("outcome", f"the trusted side recorded {found.outcome}: {found.summary()}")
            if crossings is None:
                report.notes.append("the crossings were not replayed (crossings=): only the signature and the "
                                    "Merkle root were checked")
    report.results.append(result)
    return report


def verify_attestation(evidence, *, policy=None, endorsements=None, now=None, expected_user_data: bytes | None = None):
    """Appraise TEE evidence (Intel SGX/TDX DCAP quotes, Arm CCA tokens, NVIDIA SPDM reports)
    against `policy` (an AppraisalPolicy: reference values, accepted TCB statuses) with
    `endorsements` (collateral, platform keys). Returns an Appraisal; evidence that is not
    authentic gives one whose failed check says why."""
    from ..attestation.claims import AppraisalPolicy, Endorsements
    from ..attestation.appraisal import verify_evidence

    with quiet():
        return verify_evidence(evidence, policy=policy or AppraisalPolicy(), endorsements=endorsements or Endorsements(),
                               now=now, expected_user_data=expected_user_data)
