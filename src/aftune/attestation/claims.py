"""Common types of attestation: evidence, the claims parsed from it, the policy they are appraised
against, and the reports that say which check failed.

    from aftune.attestation import Evidence, AppraisalPolicy, verify_evidence
    appraisal = verify_evidence(Evidence("tdx", quote, collateral=text), policy=AppraisalPolicy(...))
    appraisal.require()        # raises AttestationFailure("tcb", "status OutOfDate is not ...")

RATS habit (RFC 9334): evidence is first parsed and its signatures checked, giving `Claims`
(what the attester says about itself); the claims are then appraised against an explicit
`AppraisalPolicy` (reference values, accepted TCB statuses) as a separate step. Nothing is trusted
because it parsed. A report is a tuple of `Check`s, each PASS, FAIL or SKIPPED with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..errors import CommitmentMismatch, InputError

EVIDENCE_KINDS = ("sgx", "tdx", "cca", "nvidia", "simulated")
MAX_EVIDENCE_BYTES = 1 << 20  # a quote is ~5 KiB, a CCA token ~2 KiB, an SPDM report ~4 KiB
MIN_NONCE_BYTES, MAX_NONCE_BYTES = 16, 64
PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
_HEX = re.compile(r"[0-9a-f]*")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")


class AttestationFailure(CommitmentMismatch):
    """Evidence, or one link of an attested chain, does not hold: a FAIL (exit code 1) that
    names the check (`signature`, `tcb`, `binding`, `nonce`, ...) and why."""

    def __init__(self, check: str, reason: str):
        self.check, self.reason = check, reason
        super().__init__(f"{check}: {reason}")


def parse_hex(text: Any, what: str, size: int | None = None) -> bytes:
    """Lowercase hex from hostile input, optionally of an exact byte length."""
    if not isinstance(text, str) or len(text) % 2 or not _HEX.fullmatch(text):
        raise InputError(f"{what}: expected lowercase hex digits, got {str(text)[:40]!r}")
    if size is not None and len(text) != 2 * size:
        raise InputError(f"{what}: expected {size} bytes ({2 * size} hex digits), got {len(text) // 2}")
    return bytes.fromhex(text)


def parse_nonce(text: Any, what: str = "nonce") -> bytes:
    """A client nonce: 16 to 64 bytes as lowercase hex (clients should use 32 random bytes)."""
    nonce = parse_hex(text, what)
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise InputError(f"{what}: must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes, got {len(nonce)} "
                         f"(make one with `aftune attestation nonce`)")
    return nonce


def parse_time(text: str) -> datetime:
    """RFC 3339 UTC (`2025-06-20T00:00:00Z`) as an aware datetime."""
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        raise InputError(f"time must be RFC 3339 UTC like 2025-06-20T00:00:00Z, got {str(text)[:40]!r}")
    return datetime.fromisoformat(text[:19]).replace(tzinfo=timezone.utc)


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise InputError("the verification time must be timezone-aware (UTC)")
    return now


def short(b: bytes) -> str:
    """A digest prefix for messages: `1a2b3c4d5e6f7081…`."""
    return b.hex()[:16] + "…"


@dataclass(frozen=True)
class Evidence:
    """What an attester produced, as bytes: an Intel DCAP quote (`sgx`, `tdx`), an Arm CCA token
    (`cca`), an NVIDIA SPDM GET_MEASUREMENTS request+response (`nvidia`) or an aftune simulated
    document (`simulated`: no TEE, proves nothing). Intel quotes may travel with their collateral
    (dcap-qvl JSON text); NVIDIA reports travel with the GPU's PEM certificate chain."""

    kind: str
    data: bytes
    collateral: str | None = None
    cert_chain: bytes | None = None

    def __post_init__(self):
        if self.kind not in EVIDENCE_KINDS:
            raise InputError(f"unknown evidence kind {self.kind!r}: choose one of {', '.join(EVIDENCE_KINDS)}")
        if not self.data or len(self.data) > MAX_EVIDENCE_BYTES:
            raise InputError(f"{self.kind} evidence must hold 1 to {MAX_EVIDENCE_BYTES} bytes, got {len(self.data)}")
        if self.collateral is not None and self.kind not in ("sgx", "tdx"):
            raise InputError("only Intel quotes (sgx, tdx) travel with collateral")
        if self.cert_chain is not None and self.kind != "nvidia":
            raise InputError("only NVIDIA reports travel with a certificate chain")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "data": self.data.hex()}
        if self.collateral is not None:
            from ..core import jsonio

            doc["collateral"] = jsonio.loads(self.collateral)
        if self.cert_chain is not None:
            doc["cert_chain"] = self.cert_chain.decode("ascii")
        return doc

    @classmethod
    def from_json(cls, obj: Any, what: str = "evidence") -> "Evidence":
        """Parse hostile input: `kind`, `data` (hex), and only the fields its kind allows."""
        import json

        if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
            raise InputError(f"{what}: expected an object with a 'kind'")
        allowed = {"kind", "data"} | ({"collateral"} if obj["kind"] in ("sgx", "tdx") else set()) \
            | ({"cert_chain"} if obj["kind"] == "nvidia" else set())
        unknown = sorted(set(obj) - allowed)
        if unknown or "data" not in obj:
            raise InputError(f"{what}: unknown fields {unknown}" if unknown else f"{what}: missing 'data'")
        if isinstance(obj.get("data"), str) and len(obj["data"]) > 2 * MAX_EVIDENCE_BYTES:
            raise InputError(f"{what}: data is larger than {MAX_EVIDENCE_BYTES} bytes")
        collateral = obj.get("collateral")
        if collateral is not None and not isinstance(collateral, dict):
            raise InputError(f"{what}: collateral must be an object (dcap-qvl's collateral JSON)")
        chain = obj.get("cert_chain")
        if chain is not None and (not isinstance(chain, str) or not chain.isascii()):
            raise InputError(f"{what}: cert_chain must be PEM text")
        return cls(obj["kind"], parse_hex(obj["data"], f"{what}: data"),
                   json.dumps(collateral) if collateral is not None else None,
                   chain.encode("ascii") if chain is not None else None)


@dataclass(frozen=True)
class Claims:
    """What verified evidence says, after its signatures checked out (and nothing else yet).

    `user_data` is the attester-chosen field (SGX/TDX report_data, CCA realm challenge, SPDM
    nonce) that carries aftune's binding digest; `measurements` are the code identities a policy
    compares with reference values (mrenclave, mrtd, rtmr0..3, rim, rem0..3, gpu.N, ...)."""

    kind: str
    user_data: bytes
    measurements: tuple[tuple[str, bytes], ...]
    anchor: str  # what the signatures chain to, in words
    tcb_status: str | None = None  # Intel only
    advisories: tuple[str, ...] = ()
    debug: bool = False
    debug_reason: str = ""
    details: tuple[tuple[str, str], ...] = ()  # informative only, never appraised

    def measurement(self, name: str) -> bytes | None:
        return dict(self.measurements).get(name)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "user_data": self.user_data.hex(), "anchor": self.anchor,
                "measurements": {k: v.hex() for k, v in self.measurements}, "tcb_status": self.tcb_status,
                "advisories": list(self.advisories), "debug": self.debug, "details": dict(self.details)}


@dataclass(frozen=True)
class Check:
    """One line of a report: a check or a link, its status (PASS, FAIL, SKIPPED) and why."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<7} {self.name}: {self.detail}"


def first_failure(checks: tuple[Check, ...]) -> Check | None:
    return next((c for c in checks if c.status == FAIL), None)


@dataclass(frozen=True)
class Appraisal:
    """The result of verifying one piece of evidence: its claims (None when its signatures did
    not check out) and every check run, in order. `require()` raises on the first failure."""

    kind: str
    claims: Claims | None
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return self.claims is not None and first_failure(self.checks) is None

    def require(self) -> Claims:
        failed = first_failure(self.checks)
        if failed is not None or self.claims is None:
            raise AttestationFailure(failed.name if failed else "evidence", failed.detail if failed else "no claims")
        return self.claims

    def summary(self) -> str:
        failed = first_failure(self.checks)
        if failed is not None:
            return f"INVALID {self.kind} evidence: {failed.name}: {failed.detail}"
        return f"VALID {self.kind} evidence ({self.claims.anchor if self.claims else ''})"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "valid": self.ok, "checks": [c.__dict__ for c in self.checks],
                "claims": self.claims.to_json() if self.claims else None}


@dataclass(frozen=True)
class AppraisalPolicy:
    """How claims are appraised. Defaults are strict; anything weaker says `unsafe` in its name.

    reference_values: (claim name, expected bytes) pairs; every one given must match exactly.
    accepted_tcb_statuses / accepted_advisories: Intel TCB statuses and security advisories the
    client accepts (default: UpToDate only, no advisory)."""

    reference_values: tuple[tuple[str, bytes], ...] = ()
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    accepted_advisories: tuple[str, ...] = ()
    unsafe_allow_debug: bool = False  # accept debug enclaves/TDs and non-SECURED CCA platforms
    unsafe_accept_simulated: bool = False  # accept `simulated` evidence (no TEE: proves nothing)


@dataclass(frozen=True)
class Endorsements:
    """What the verifier trusts besides the evidence: Intel collateral (from a PCCS, or carried by
    the evidence), the trusted Arm CCA platform keys (CPAK, PEM), and the roots. The Intel and
    NVIDIA roots are pinned in `trust_anchors`; `unsafe_*_root_der` replaces them (test PKIs)."""

    intel_collateral: str | None = None
    cca_platform_keys: tuple[bytes, ...] = ()
    unsafe_intel_root_der: bytes | None = None
    unsafe_nvidia_root_der: bytes | None = None


@dataclass(frozen=True)
class ChainReport:
    """The links of an attested chain (attested verdict, attested serving) and the evidence
    appraisal under them. `ok` only when no link failed; `require()` names the broken link."""

    subject: str
    links: tuple[Check, ...]
    appraisal: Appraisal | None = None
    simulated: bool = False
    attested_verdict: str | None = None  # the verifier's PASS/FAIL, for attested verdicts
    facts: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return first_failure(self.links) is None and any(c.status == PASS for c in self.links)

    def require(self) -> None:
        failed = first_failure(self.links)
        if failed is not None:
            raise AttestationFailure(failed.name, failed.detail)

    def summary(self) -> str:
        failed = first_failure(self.links)
        if failed is not None:
            return f"INVALID {self.subject}: link '{failed.name}' is broken: {failed.detail}"
        note = " [SIMULATED evidence accepted (unsafe): no TEE vouches for this]" if self.simulated else ""
        tail = f"; the attested verifier's verdict is {self.attested_verdict}" if self.attested_verdict else ""
        return f"VALID {self.subject}{tail}{note}"

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "valid": self.ok, "simulated": self.simulated,
                "attested_verdict": self.attested_verdict, "links": [c.__dict__ for c in self.links],
                "facts": dict(self.facts), "evidence": self.appraisal.to_json() if self.appraisal else None}
