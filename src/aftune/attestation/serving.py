"""Attested serving (`aftune.attested-serving.v1`, GuaranTEE's idea made checkable): evidence that
the model answering is the agreed one and that the receipts come from inside the TEE, and the
client's check of the chain evidence -> model digest and receipt key -> receipt -> record.

    curl -s "127.0.0.1:8000/v1/attestation?nonce=$NONCE" > attestation.json     # the server, in a TEE
    aftune attestation check-serving attestation.json --nonce $NONCE --model-digest $DIGEST \\
        --receipt receipts/ID.json --record-dir records --measurement rim=$RIM --platform-key cpak.pem

SPEC.md 10.5. The serving code, measured by the TEE, puts `binding(nonce, model digest, receipt
key)` in the evidence's user data. The receipt key should be made inside the TEE when serving
starts and never written where the host can read it: then a receipt that verifies under the
attested key was signed by the measured code, about the model it attested.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import HASH_ALGORITHMS, parse_hex_digest
from ..core.signing import PublicKey
from ..errors import CommitmentMismatch, InputError, RecordError
from .appraisal import verify_evidence
from .binding import SERVING_FORMAT, provider_user_data, serving_binding, user_data
from .claims import (FAIL, PASS, SKIPPED, ChainReport, Check, Endorsements, Evidence, AppraisalPolicy, first_failure,
                     parse_nonce, short)
from .providers import SIMULATED_WARNING, EvidenceProvider

MAX_RESPONSE_BYTES = 1 << 22
_FIELDS = ("format", "hash", "nonce", "model_digest", "receipt_key", "evidence")


@dataclass(frozen=True)
class ServingEvidence:
    """The answer to `GET /v1/attestation?nonce=HEX`."""

    algorithm: str  # the hash function (JSON "hash")
    nonce: bytes
    model_digest: bytes
    receipt_key: PublicKey
    evidence: Evidence

    def to_json(self) -> dict[str, Any]:
        doc = {"format": SERVING_FORMAT, "hash": self.algorithm, "nonce": self.nonce.hex(),
               "model_digest": self.model_digest.hex(), "receipt_key": self.receipt_key.text,
               "evidence": self.evidence.to_json()}
        if self.evidence.kind == "simulated":
            doc["warning"] = SIMULATED_WARNING
        return doc

    @classmethod
    def from_json(cls, obj: Any) -> "ServingEvidence":
        if not isinstance(obj, dict):
            raise InputError("an attested-serving response is a JSON object")
        simulated = isinstance(obj.get("evidence"), dict) and obj["evidence"].get("kind") == "simulated"
        expected = set(_FIELDS) | ({"warning"} if simulated else set())
        if set(obj) != expected:
            missing, unknown = sorted(expected - set(obj)), sorted(set(obj) - expected)
            raise InputError(f"attested serving: missing fields {missing}" if missing else
                             f"attested serving: unknown fields {unknown}")
        if obj["format"] != SERVING_FORMAT or obj["hash"] not in HASH_ALGORITHMS:
            raise InputError(f"attested serving: format must be {SERVING_FORMAT} with hash blake3 or sha256")
        if simulated and obj["warning"] != SIMULATED_WARNING:
            raise InputError("attested serving: simulated evidence must carry the simulated-evidence warning")
        if not isinstance(obj["receipt_key"], str):
            raise InputError("attested serving: receipt_key must be 'ed25519:<64 hex digits>'")
        return cls(obj["hash"], parse_nonce(obj["nonce"], "attested serving: nonce"),
                   parse_hex_digest(obj["model_digest"], "attested serving: model_digest"),
                   PublicKey.from_text(obj["receipt_key"]), Evidence.from_json(obj["evidence"], "attested serving: evidence"))

    @classmethod
    def load(cls, path: str | Path) -> "ServingEvidence":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"attested-serving response {p} does not exist")
        data = jsonio.read_capped(p, MAX_RESPONSE_BYTES)
        if len(data) > MAX_RESPONSE_BYTES:
            raise InputError(f"attested-serving response {p} is larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            return cls.from_json(jsonio.loads(data))
        except ValueError as exc:
            raise InputError(f"attested-serving response {p} is not valid JSON: {exc}") from None


def serving_evidence(provider: EvidenceProvider, nonce: bytes, *, algorithm: str, model_digest: bytes,
                     receipt_key: PublicKey) -> ServingEvidence:
    """Inside the TEE: evidence binding the client's nonce, the served model and the receipt key."""
    binding = serving_binding(algorithm, nonce, model_digest, receipt_key)
    return ServingEvidence(algorithm, nonce, model_digest, receipt_key, provider.evidence(provider_user_data(binding)))


def attestation_response(provider: EvidenceProvider, nonce_hex: str, *, algorithm: str, model_digest: bytes,
                         receipt_key: PublicKey) -> dict[str, Any]:
    """The body of `GET /v1/attestation?nonce=HEX`; a malformed nonce raises InputError (answer 400)."""
    nonce = parse_nonce(nonce_hex, "nonce")
    return serving_evidence(provider, nonce, algorithm=algorithm, model_digest=model_digest,
                            receipt_key=receipt_key).to_json()


def check_serving(response: ServingEvidence, *, nonce: bytes, expected_model_digest: bytes, policy: AppraisalPolicy = AppraisalPolicy(),
                  endorsements: Endorsements = Endorsements(), receipt=None, pinned_receipt_key: PublicKey | None = None,
                  record_dir: str | Path | None = None, now: datetime | None = None) -> ChainReport:
    """The client's check, link by link: nonce, evidence, binding, model, key, receipt, record.
    `receipt` is an `aftune.inference.receipt.Receipt`; without it (and without `record_dir`)
    those links are SKIPPED, e.g. when a client checks the server once before sending requests."""
    if not policy.reference_values and response.evidence.kind != "simulated":
        raise InputError("give the serving TEE's expected measurement (--measurement NAME=HEX, e.g. rim, mrtd, "
                         "mrenclave): without it the evidence says nothing about which code serves")
    links = [Check("nonce", PASS, f"the evidence answers this client's nonce {short(nonce)}") if response.nonce == nonce
             else Check("nonce", FAIL, f"the evidence answers nonce {short(response.nonce)}, not this client's "
                                       f"{short(nonce)}: stale or replayed")]
    expected = user_data(response.evidence.kind,
                         serving_binding(response.algorithm, nonce, response.model_digest, response.receipt_key))
    appraisal = verify_evidence(response.evidence, policy=policy, endorsements=endorsements, now=now,
                                expected_user_data=expected)
    evidence_checks = tuple(c for c in appraisal.checks if c.name != "binding")
    failed = first_failure(evidence_checks)
    links.append(Check("evidence", FAIL, f"{failed.name}: {failed.detail}") if failed else
                 Check("evidence", PASS, f"{response.evidence.kind}: {appraisal.claims.anchor}"))
    binding = next((c for c in appraisal.checks if c.name == "binding"), None)
    links.append(Check("binding", binding.status, binding.detail + " (nonce, model digest, receipt key)") if binding
                 else Check("binding", SKIPPED, "not checked: the evidence did not verify"))
    links.append(Check("model", PASS, f"the attested model {short(response.model_digest)} is the agreed one")
                 if response.model_digest == expected_model_digest else
                 Check("model", FAIL, f"the TEE serves model {short(response.model_digest)}, not the agreed "
                                      f"{short(expected_model_digest)}"))
    if pinned_receipt_key is None:
        links.append(Check("key", SKIPPED, f"receipt key {response.receipt_key.text[:24]}… learned from the evidence "
                                           "(no pinned key to compare)"))
    else:
        links.append(Check("key", PASS if response.receipt_key == pinned_receipt_key else FAIL,
                           f"attested receipt key {response.receipt_key.text[:24]}…" +
                           (" is the pinned one" if response.receipt_key == pinned_receipt_key else
                            f" is not the pinned {pinned_receipt_key.text[:24]}…")))
    links.extend(_receipt_links(response, receipt, record_dir))
    facts = (("kind", response.evidence.kind), ("model_digest", response.model_digest.hex()),
             ("receipt_key", response.receipt_key.text))
    return ChainReport("attested serving", tuple(links), appraisal, response.evidence.kind == "simulated", None, facts)


def _receipt_links(response: ServingEvidence, receipt, record_dir) -> list[Check]:
    from ..inference.receipt import verify_receipt

    if receipt is None:
        if record_dir is not None:
            raise InputError("a record directory is checked through a receipt: pass the receipt too")
        return [Check("receipt", SKIPPED, "no receipt given"), Check("record", SKIPPED, "no receipt given")]
    if receipt.model_digest != response.model_digest:
        return [Check("receipt", FAIL, f"the receipt is for model {short(receipt.model_digest)}, not the attested "
                                       f"{short(response.model_digest)}"), Check("record", SKIPPED, "receipt broken")]
    try:
        verify_receipt(receipt, response.receipt_key)
    except CommitmentMismatch as exc:
        return [Check("receipt", FAIL, f"not signed by the attested receipt key: {exc}"),
                Check("record", SKIPPED, "receipt broken")]
    links = [Check("receipt", PASS, f"receipt for record {short(receipt.record_root)} signed by the attested key")]
    if record_dir is None:
        return links + [Check("record", SKIPPED, "no record directory given")]
    try:
        verify_receipt(receipt, response.receipt_key, record_dir)
    except RecordError as exc:  # a missing record, or one that contradicts the receipt (CommitmentMismatch)
        return links + [Check("record", FAIL, str(exc))]
    return links + [Check("record", PASS, f"record {short(receipt.record_root)} agrees with the receipt")]
