"""Attested verdicts (`aftune.attested-verdict.v1`): a verifier's report signed inside a TEE by an
ephemeral Ed25519 key that the TEE's evidence binds, and the client's check of the whole chain.

    # inside the TEE (Gramine enclave, TDX or CCA guest):
    aftune attestation verify-run runs/demo --public-key provider.pub --nonce $NONCE --provider auto \\
        --out verdict.json
    # the client, on any machine:
    aftune attestation check-verdict verdict.json --nonce $NONCE --run-root $ROOT \\
        --measurement mrenclave=$MRENCLAVE --collateral collateral.json

SPEC.md 10.4. The verifier makes a fresh key, puts `binding(nonce, key, code digest)` in the
evidence's user data, verifies the run, and signs the message
`H(TAG_ATTESTED_VERDICT || ... || report)` under the context `attested-verdict`. The key never
leaves the process, so a valid signature means: the code the evidence measures produced this
report, for this nonce, about this run. `check_attested_verdict` checks each link and names the
broken one: nonce, evidence, binding, code, signature, run, report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import HASH_ALGORITHMS, TAG_ATTESTED_VERDICT, hash_message, length_prefixed, parse_hex_digest
from ..core.signing import PublicKey, SigningKey
from ..errors import InputError
from .appraisal import verify_evidence
from .binding import VERDICT_FORMAT, provider_user_data, user_data, verdict_binding, verifier_code_digest
from .claims import (FAIL, PASS, SKIPPED, ChainReport, Check, Endorsements, Evidence, AppraisalPolicy, first_failure, parse_hex,
                     parse_nonce, short)
from .providers import SIMULATED_WARNING, EvidenceProvider

SIGNATURE_CONTEXT = "attested-verdict"
MAX_DOCUMENT_BYTES = 1 << 26
VERDICTS = ("PASS", "FAIL")
_FIELDS = ("format", "hash", "nonce", "verifier_key", "code_digest", "run", "verdict", "report", "evidence", "signature")
_RUN_FIELDS = ("run_root", "config_digest", "provider_key")


def report_text(report_doc: dict[str, Any]) -> str:
    """The report as signed: sorted keys, compact, UTF-8; non-finite numbers as Python writes them."""
    return json.dumps(report_doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


@dataclass(frozen=True)
class AttestedVerdict:
    algorithm: str  # the hash function (JSON "hash")
    nonce: bytes
    verifier_key: PublicKey  # ephemeral: made, used and dropped inside the TEE
    code_digest: bytes
    run_root: bytes
    config_digest: bytes
    provider_key: PublicKey  # the key the verified run was signed with
    verdict: str
    report: str  # the verifier's report, JSON text exactly as signed
    evidence: Evidence
    signature: bytes = b""

    @property
    def simulated(self) -> bool:
        return self.evidence.kind == "simulated"

    def message(self) -> bytes:
        lp = length_prefixed
        return hash_message(self.algorithm, TAG_ATTESTED_VERDICT, lp(VERDICT_FORMAT.encode("ascii")),
                            lp(self.algorithm.encode("ascii")), lp(self.nonce), self.verifier_key.raw, self.code_digest,
                            lp(self.evidence.kind.encode("ascii")), self.run_root, self.config_digest,
                            self.provider_key.raw, lp(self.verdict.encode("ascii")), lp(self.report.encode("utf-8")))

    def to_json(self) -> dict[str, Any]:
        doc = {"format": VERDICT_FORMAT, "hash": self.algorithm, "nonce": self.nonce.hex(),
               "verifier_key": self.verifier_key.text, "code_digest": self.code_digest.hex(),
               "run": {"run_root": self.run_root.hex(), "config_digest": self.config_digest.hex(),
                       "provider_key": self.provider_key.text},
               "verdict": self.verdict, "report": self.report, "evidence": self.evidence.to_json(),
               "signature": self.signature.hex()}
        if self.simulated:
            doc["warning"] = SIMULATED_WARNING
        return doc

    @classmethod
    def from_json(cls, obj: Any) -> "AttestedVerdict":
        """Parse hostile input: exactly the fields of SPEC.md 10.4, each of the right form."""
        if not isinstance(obj, dict):
            raise InputError("an attested verdict is a JSON object")
        simulated = isinstance(obj.get("evidence"), dict) and obj["evidence"].get("kind") == "simulated"
        expected = set(_FIELDS) | ({"warning"} if simulated else set())
        if set(obj) != expected:
            missing, unknown = sorted(expected - set(obj)), sorted(set(obj) - expected)
            raise InputError(f"attested verdict: missing fields {missing}" if missing else
                             f"attested verdict: unknown fields {unknown}")
        if obj["format"] != VERDICT_FORMAT:
            raise InputError(f"attested verdict: format must be {VERDICT_FORMAT}, got {str(obj['format'])[:40]!r}")
        if obj["hash"] not in HASH_ALGORITHMS:
            raise InputError(f"attested verdict: unknown hash {str(obj['hash'])[:20]!r}")
        if simulated and obj["warning"] != SIMULATED_WARNING:
            raise InputError("attested verdict: a simulated verdict must carry the simulated-evidence warning")
        run = obj["run"]
        if not isinstance(run, dict) or set(run) != set(_RUN_FIELDS):
            raise InputError(f"attested verdict: run must hold exactly {list(_RUN_FIELDS)}")
        if obj["verdict"] not in VERDICTS or not isinstance(obj["report"], str):
            raise InputError("attested verdict: verdict must be PASS or FAIL and report a JSON string")
        if not isinstance(obj["verifier_key"], str) or not isinstance(run["provider_key"], str):
            raise InputError("attested verdict: verifier_key and run.provider_key are 'ed25519:<64 hex digits>'")
        return cls(obj["hash"], parse_nonce(obj["nonce"], "attested verdict: nonce"),
                   PublicKey.from_text(obj["verifier_key"]),
                   parse_hex_digest(obj["code_digest"], "attested verdict: code_digest"),
                   parse_hex_digest(run["run_root"], "attested verdict: run.run_root"),
                   parse_hex_digest(run["config_digest"], "attested verdict: run.config_digest"),
                   PublicKey.from_text(run["provider_key"]), obj["verdict"], obj["report"],
                   Evidence.from_json(obj["evidence"], "attested verdict: evidence"),
                   parse_hex(obj["signature"], "attested verdict: signature", 64))

    @classmethod
    def load(cls, path: str | Path) -> "AttestedVerdict":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"attested verdict {p} does not exist")
        data = jsonio.read_capped(p, MAX_DOCUMENT_BYTES)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise InputError(f"attested verdict {p} is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return cls.from_json(jsonio.loads(data))
        except ValueError as exc:
            raise InputError(f"attested verdict {p} is not valid JSON: {exc}") from None


def attest_report(report_doc: dict[str, Any], provider: EvidenceProvider, nonce: bytes, *, algorithm: str,
                  run_root: bytes, config_digest: bytes, provider_key: PublicKey,
                  code_digest: bytes | None = None) -> AttestedVerdict:
    """Inside the TEE: bind a fresh key into evidence and sign the verifier's report with it."""
    if report_doc.get("verdict") not in VERDICTS:
        raise InputError("the report to attest has no PASS/FAIL verdict")
    key = SigningKey.generate()  # ephemeral: it lives only in this process, inside the TEE
    code = code_digest if code_digest is not None else verifier_code_digest(algorithm)
    evidence = provider.evidence(provider_user_data(verdict_binding(algorithm, nonce, key.public_key, code)))
    unsigned = AttestedVerdict(algorithm, nonce, key.public_key, code, run_root, config_digest, provider_key,
                               report_doc["verdict"], report_text(report_doc), evidence)
    return AttestedVerdict(**{**unsigned.__dict__, "signature": key.sign(SIGNATURE_CONTEXT, unsigned.message())})


def attest_run(run_dir: str | Path, public_key: PublicKey, provider: EvidenceProvider, nonce: bytes, *,
               agreement=None, unsafe_no_agreement: bool = False, transcript: str | Path | None = None,
               mode: str = "strict") -> AttestedVerdict:
    """Verify every block of a run against the client's `agreement` (`Verifier.verify_all`) and
    attest the report. A record that contradicts its signed commitments is attested as a FAIL,
    like `aftune verify` reports it."""
    from ..errors import CommitmentMismatch
    from ..training.verify import Verifier

    verifier = Verifier(run_dir, public_key, agreement, unsafe_no_agreement=unsafe_no_agreement, mode=mode,
                        transcript=transcript)
    run = verifier.record.transcript.run
    if run is None:
        raise InputError(f"{run_dir}: the transcript has no signed run root yet: a verdict must name a finished run")
    try:
        report = verifier.verify_all().to_json()
    except CommitmentMismatch as exc:
        report = {"verdict": "FAIL", "errors": [{"check": "record", "reason": str(exc)}]}
    return attest_report(report, provider, nonce, algorithm=verifier.record.algorithm, run_root=run.root,
                         config_digest=run.config_digest, provider_key=public_key)


def check_attested_verdict(doc: AttestedVerdict, *, nonce: bytes, expected_run_root: bytes, policy: AppraisalPolicy = AppraisalPolicy(),
                           endorsements: Endorsements = Endorsements(), expected_config_digest: bytes | None = None,
                           expected_provider_key: PublicKey | None = None, expected_code_digest: bytes | None = None,
                           expected_agreement: bytes | None = None, unsafe_no_agreement: bool = False,
                           now: datetime | None = None) -> ChainReport:
    """The client's check: evidence valid with the expected measurement, nonce fresh, report signed
    by the bound key, report about the agreed run and the client's agreement (its digest,
    `Agreement.digest()`). Without `expected_agreement` only `unsafe_no_agreement=True` proceeds,
    and the agreement link then says it was not checked. Returns a ChainReport naming any broken
    link."""
    if expected_agreement is None and not unsafe_no_agreement:
        raise InputError("give your agreement (--agreement): without it a PASS may be about another agreement or about "
                         "self-consistency only (--unsafe-no-agreement accepts that)")
    if not policy.reference_values and not doc.simulated:
        raise InputError("give the verifier's expected measurement (--measurement NAME=HEX, e.g. mrenclave, mrtd, rim): "
                         "without it the evidence says nothing about which code signed the verdict")
    links = [Check("nonce", PASS, f"the verdict answers this client's nonce {short(nonce)}") if doc.nonce == nonce else
             Check("nonce", FAIL, f"the verdict answers nonce {short(doc.nonce)}, not this client's {short(nonce)}: "
                                  "stale or replayed")]
    expected = user_data(doc.evidence.kind, verdict_binding(doc.algorithm, nonce, doc.verifier_key, doc.code_digest))
    appraisal = verify_evidence(doc.evidence, policy=policy, endorsements=endorsements, now=now,
                                expected_user_data=expected)
    evidence_checks = tuple(c for c in appraisal.checks if c.name != "binding")
    failed = first_failure(evidence_checks)
    measured = "; ".join(c.detail for c in evidence_checks if c.name.startswith("measurement") or c.name == "simulated")
    links.append(Check("evidence", FAIL, f"{failed.name}: {failed.detail}") if failed else
                 Check("evidence", PASS, f"{doc.evidence.kind}: {appraisal.claims.anchor}; {measured}"))
    binding = next((c for c in appraisal.checks if c.name == "binding"), None)
    links.append(Check("binding", binding.status, binding.detail + " (nonce, verifier key, code digest)") if binding
                 else Check("binding", SKIPPED, "not checked: the evidence did not verify"))
    if expected_code_digest is None:
        links.append(Check("code", SKIPPED, f"code digest {short(doc.code_digest)} not compared (no expected code "
                                            "digest given; the TEE measurement identifies the code)"))
    else:
        links.append(Check("code", PASS if doc.code_digest == expected_code_digest else FAIL,
                           f"code digest {short(doc.code_digest)}" + (" as expected" if doc.code_digest ==
                                                                       expected_code_digest else
                                                                       f", expected {short(expected_code_digest)}")))
    links.append(Check("signature", PASS, f"the report is signed by the bound key {doc.verifier_key.text[:24]}…")
                 if doc.verifier_key.verify(SIGNATURE_CONTEXT, doc.message(), doc.signature) else
                 Check("signature", FAIL, "the report's signature does not verify under the key the evidence binds: "
                                          "the report or a signed field was edited"))
    links.append(_run_link(doc, expected_run_root, expected_config_digest, expected_provider_key))
    links.append(_report_link(doc))
    links.append(_agreement_link(doc, expected_agreement))
    facts = (("kind", doc.evidence.kind), ("run_root", doc.run_root.hex()), ("verifier_key", doc.verifier_key.text),
             ("code_digest", doc.code_digest.hex()), ("verdict", doc.verdict))
    return ChainReport("attested verdict", tuple(links), appraisal, doc.simulated, doc.verdict, facts)


def _run_link(doc: AttestedVerdict, run_root: bytes, config_digest: bytes | None, provider_key: PublicKey | None) -> Check:
    if doc.run_root != run_root:
        return Check("run", FAIL, f"the report is about run {short(doc.run_root)}, not the agreed {short(run_root)}")
    if config_digest is not None and doc.config_digest != config_digest:
        return Check("run", FAIL, f"config digest {short(doc.config_digest)} differs from the agreed {short(config_digest)}")
    if provider_key is not None and doc.provider_key != provider_key:
        return Check("run", FAIL, f"the run was verified under key {doc.provider_key.text[:24]}…, not the pinned "
                                  f"provider key {provider_key.text[:24]}…")
    extra = ", config digest" if config_digest is not None else ""
    extra += ", provider key" if provider_key is not None else ""
    return Check("run", PASS, f"run root {short(run_root)}{extra} as agreed")


def _agreement_link(doc: AttestedVerdict, expected: bytes | None) -> Check:
    """The verdict is about the client's agreement (the signed report names its digest, and the
    verifier did not fall back to self-consistency)."""
    if expected is None:
        return Check("agreement", SKIPPED, "NOT CHECKED (unsafe, no agreement given): the verdict may be about "
                                           "another agreement, or about self-consistency only")
    try:
        report = json.loads(doc.report, object_pairs_hook=_pairs)
    except ValueError:
        return Check("agreement", FAIL, "the signed report is not JSON")
    agreed, notes = (report.get("agreement"), report.get("notes")) if isinstance(report, dict) else (None, None)
    if notes:
        return Check("agreement", FAIL, f"the verifier did not check everything: {'; '.join(map(str, notes))[:200]}")
    if agreed != expected.hex():
        return Check("agreement", FAIL, f"the report is about agreement {str(agreed)[:16]}…, not yours "
                                        f"{short(expected)}")
    return Check("agreement", PASS, f"the report is about your agreement {short(expected)}")


def _report_link(doc: AttestedVerdict) -> Check:
    try:
        report = json.loads(doc.report, object_pairs_hook=_pairs)
    except ValueError as exc:
        return Check("report", FAIL, f"the signed report is not JSON: {exc}")
    if not isinstance(report, dict) or report.get("verdict") != doc.verdict:
        return Check("report", FAIL, f"the signed report's verdict differs from the document's {doc.verdict}")
    return Check("report", PASS, f"the signed report's verdict is {doc.verdict} "
                                 f"({len(report.get('blocks') or [])} blocks)")
