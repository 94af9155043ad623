"""Inference receipts: what the provider signs for each request (`aftune verify-receipt`).

    aftune verify-receipt R/receipts/<id>.json --public-key provider.pub --record-dir R --request-nonce HEX

A v3 receipt binds the model digest and the record id (the digest of the record file, which
commits the input, the output, the client's request nonce and the generation policy digest) to a
time, under the provider's Ed25519 key with the signature context "inference-receipt"; a v2
receipt (still read) also repeated those four. The signed message is the digest of a fixed
binary layout (SPEC.md 8.7), not of JSON, so any verifier can rebuild it. `verify_receipt`
raises on any failure and returns nothing otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import HASH_ALGORITHMS, TAG_RECEIPT, hash_message, length_prefixed, parse_hex_digest
from ..core.signing import PublicKey, SigningKey
from ..errors import CommitmentMismatch, InputError, RecordError
from .policy import parse_request_nonce

RECEIPT_FORMAT = "aftune.receipt.v3"  # written: model and record only (the record binds the rest)
RECEIPT_FORMAT_V2 = "aftune.receipt.v2"  # read
SIGNATURE_CONTEXT = "inference-receipt"
MAX_RECEIPT_BYTES = 1 << 16
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")
_FIELDS_V2 = ("format", "hash", "model_digest", "input_digest", "output_digest", "record_root", "time", "key",
              "request_nonce", "policy_digest", "signature")
_FIELDS = ("format", "hash", "model_digest", "record_root", "time", "key", "signature")


@dataclass(frozen=True)
class Receipt:
    algorithm: str  # the hash function (JSON "hash")
    model_digest: bytes
    record_root: bytes  # the record id: H(TAG_INFERENCE_RECORD || record file bytes)
    time: str  # RFC 3339, UTC ("Z")
    key: PublicKey
    signature: bytes = b""
    format: str = RECEIPT_FORMAT
    # v2 only (a v3 receipt binds them through the record it names):
    input_digest: bytes | None = None
    output_digest: bytes | None = None
    request_nonce: bytes | None = None  # the client's nonce (16-64 bytes), when the request carried one
    policy_digest: bytes | None = None  # the generation policy's digest (causal LMs), else None

    @property
    def binds_request(self) -> bool:
        """Whether the receipt itself states the request nonce and policy digest (v2), rather than
        binding them through its record (v3)."""
        return self.format == RECEIPT_FORMAT_V2

    def message(self) -> bytes:
        """v3: H(TAG_RECEIPT || lp(format) || lp(hash) || model || record || lp(time) || key); v2:
        H(TAG_RECEIPT || lp(format) || lp(hash) || model || input || output || record || lp(time) || key
        || lp(request nonce or empty) || lp(policy digest or empty))."""
        head = (length_prefixed(self.format.encode("ascii")), length_prefixed(self.algorithm.encode("ascii")))
        if self.format == RECEIPT_FORMAT:
            return hash_message(self.algorithm, TAG_RECEIPT, *head, self.model_digest, self.record_root,
                                length_prefixed(self.time.encode("ascii")), self.key.raw)
        return hash_message(self.algorithm, TAG_RECEIPT, *head, self.model_digest, self.input_digest,
                            self.output_digest, self.record_root, length_prefixed(self.time.encode("ascii")),
                            self.key.raw, length_prefixed(self.request_nonce or b""),
                            length_prefixed(self.policy_digest or b""))

    def to_json(self) -> dict[str, Any]:
        if self.format == RECEIPT_FORMAT:
            return {"format": RECEIPT_FORMAT, "hash": self.algorithm, "model_digest": self.model_digest.hex(),
                    "record_root": self.record_root.hex(), "time": self.time, "key": self.key.text,
                    "signature": self.signature.hex()}
        return {"format": RECEIPT_FORMAT_V2, "hash": self.algorithm, "model_digest": self.model_digest.hex(),
                "input_digest": self.input_digest.hex(), "output_digest": self.output_digest.hex(),
                "record_root": self.record_root.hex(), "time": self.time, "key": self.key.text,
                "request_nonce": self.request_nonce.hex() if self.request_nonce is not None else None,
                "policy_digest": self.policy_digest.hex() if self.policy_digest is not None else None,
                "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, obj: Any) -> "Receipt":
        """Parse hostile input: every field present, of the right form, and nothing else."""
        if not isinstance(obj, dict):
            raise InputError("a receipt is a JSON object")
        fmt = obj.get("format")
        if fmt not in (RECEIPT_FORMAT, RECEIPT_FORMAT_V2):
            raise InputError(f"receipt: format must be {RECEIPT_FORMAT} (or {RECEIPT_FORMAT_V2}), got {str(fmt)[:40]!r}")
        fields = _FIELDS if fmt == RECEIPT_FORMAT else _FIELDS_V2
        missing = [f for f in fields if f not in obj]
        unknown = sorted(set(obj) - set(fields))
        if missing or unknown:
            raise InputError(f"receipt: missing fields {missing}" if missing else f"receipt: unknown fields {unknown}")
        if obj["hash"] not in HASH_ALGORITHMS:
            raise InputError(f"receipt: unknown hash {str(obj['hash'])[:20]!r}")
        model, record = (parse_hex_digest(obj[f], f"receipt: {f}") for f in ("model_digest", "record_root"))
        t = obj["time"]
        if not isinstance(t, str) or not _TIME.fullmatch(t):
            raise InputError(f"receipt: time must be RFC 3339 UTC like 2025-01-31T12:00:00.000000Z, got {str(t)[:40]!r}")
        if not isinstance(obj["key"], str):
            raise InputError("receipt: key must be 'ed25519:<64 hex digits>'")
        key = PublicKey.from_text(obj["key"])
        sig = obj["signature"]
        if not isinstance(sig, str) or len(sig) != 128 or sig.strip("0123456789abcdef"):
            raise InputError("receipt: signature must be 128 lowercase hex digits")
        if fmt == RECEIPT_FORMAT:
            return cls(obj["hash"], model, record, t, key, bytes.fromhex(sig))
        io = [parse_hex_digest(obj[f], f"receipt: {f}") for f in ("input_digest", "output_digest")]
        nonce = None if obj["request_nonce"] is None else parse_request_nonce(obj["request_nonce"], "receipt: request_nonce")
        policy = None if obj["policy_digest"] is None else parse_hex_digest(obj["policy_digest"], "receipt: policy_digest")
        return cls(obj["hash"], model, record, t, key, bytes.fromhex(sig), RECEIPT_FORMAT_V2, *io, nonce, policy)

    @classmethod
    def load(cls, path: str | Path) -> "Receipt":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"receipt {p} does not exist")
        return cls.from_json(jsonio.read_json(p, MAX_RECEIPT_BYTES, "receipt", InputError))


def issue_receipt(key: SigningKey, algorithm: str, model_digest: bytes, record_root: bytes, time: str) -> Receipt:
    """A v3 receipt for record `record_root` of model `model_digest`, signed now."""
    unsigned = Receipt(algorithm, model_digest, record_root, time, key.public_key)
    return sign_receipt(key, unsigned)


def sign_receipt(key: SigningKey, unsigned: Receipt) -> Receipt:
    """`unsigned` (any format) with its signature."""
    return Receipt(**{**unsigned.__dict__, "signature": key.sign(SIGNATURE_CONTEXT, unsigned.message())})


def _short_or_none(b: bytes | None) -> str:
    return "none" if b is None else b.hex()[:16] + "…"


def verify_receipt(receipt: Receipt, public_key: PublicKey, record_dir: str | Path | None = None, *,
                   request_nonce: bytes | None = None, policy_digest: bytes | None = None) -> None:
    """Check a receipt; with `request_nonce` / `policy_digest` (the client's), that it answers that
    request under that policy; with `record_dir`, also that the record it names agrees with it.
    Raises CommitmentMismatch (a FAIL) or RecordError/InputError; returns nothing otherwise."""
    # 1. the key must be the pinned one, 2. the signature must verify over the rebuilt message
    if receipt.key != public_key:
        raise CommitmentMismatch(f"receipt is signed by {receipt.key.text[:24]}…, not by the pinned provider key "
                                 f"{public_key.text[:24]}…")
    if not public_key.verify(SIGNATURE_CONTEXT, receipt.message(), receipt.signature):
        raise CommitmentMismatch("receipt signature does not verify: the receipt was edited after signing "
                                 "(or signed for another message)")
    # 4. the client's own request: its nonce and its policy (SPEC.md 8.7 numbers). A v2 receipt
    # states them; a v3 receipt binds them through its record, so they are compared there
    if not receipt.binds_request and record_dir is None and (request_nonce, policy_digest) != (None, None):
        raise InputError("a v3 receipt binds the request nonce and the policy through the record it names: give the "
                         "record directory (--record-dir) to compare them with yours")
    if receipt.binds_request:
        _check_request(receipt.request_nonce, receipt.policy_digest, request_nonce, policy_digest, "the receipt")
    if record_dir is None:
        return
    # 3. the record named by the receipt: its bytes hash to the id, its commitments are the receipt's
    from .record import InferenceRecord

    root = Path(record_dir)
    if not (root / "records" / f"{receipt.record_root.hex()}.json").is_file():
        raise RecordError(f"{root} has no record {receipt.record_root.hex()}: the provider did not hand it over")
    record = InferenceRecord.open(root, receipt.record_root.hex())
    if record.algorithm != receipt.algorithm:
        raise CommitmentMismatch(f"the record uses {record.algorithm}, the receipt {receipt.algorithm}")
    checks = [("model digest", record.model_digest, receipt.model_digest)]
    if receipt.binds_request:
        checks += [("input digest", record.rows_root("input/"), receipt.input_digest),
                   ("output digest", record.rows_root("output/"), receipt.output_digest),
                   ("request nonce", record.request_nonce, receipt.request_nonce),
                   ("policy digest", record.policy_digest, receipt.policy_digest)]
    for what, in_record, in_receipt in checks:
        if in_record != in_receipt:
            raise CommitmentMismatch(f"receipt {what} {_short_or_none(in_receipt)} differs from the record's "
                                     f"{_short_or_none(in_record)}")
    if not receipt.binds_request:
        _check_request(record.request_nonce, record.policy_digest, request_nonce, policy_digest, "the record")


def _check_request(nonce: bytes | None, policy: bytes | None, client_nonce: bytes | None,
                   client_policy: bytes | None, where: str) -> None:
    """Step 4: the committed request nonce and policy digest are the client's (where given)."""
    if client_nonce is not None and nonce != client_nonce:
        raise CommitmentMismatch(f"{where} answers request nonce {_short_or_none(nonce)}, not yours "
                                 f"{_short_or_none(client_nonce)}: a receipt for another (or a replayed) request")
    if client_policy is not None and policy != client_policy:
        raise CommitmentMismatch(f"{where}'s policy digest {_short_or_none(policy)} is not your policy's "
                                 f"{_short_or_none(client_policy)}: the answer was generated under another generation "
                                 "policy")


def committed_request(receipt: Receipt, record_dir: str | Path | None = None) -> tuple:
    """The request nonce and policy digest a receipt answers: its own (v2), its record's (v3), or,
    for a v3 receipt whose record is not at hand, "unknown" (what the caller did not compare is
    then said in words)."""
    if receipt.binds_request:
        return receipt.request_nonce, receipt.policy_digest
    if record_dir is None:
        return "unknown", "unknown"
    from ..errors import AftuneError
    from .record import InferenceRecord

    try:
        rec = InferenceRecord.open(record_dir, receipt.record_root.hex())
    except AftuneError:  # verify_receipt reports it
        return "unknown", "unknown"
    return rec.request_nonce, rec.policy_digest
