"""Inference receipts: what the provider signs for each request (`aftune verify-receipt`).

    aftune verify-receipt R/receipts/<id>.json --public-key provider.pub --record-dir R --request-nonce HEX

A receipt binds the model digest, the input digest, the output digest, the record id (the
digest of the record file), the client's request nonce and the generation policy digest to a
time, under the provider's Ed25519 key with the signature context "inference-receipt". The
signed message is the digest of a fixed binary layout (SPEC.md 8.7), not of JSON, so any
verifier can rebuild it. `verify_receipt` raises on any failure and returns nothing otherwise.
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

RECEIPT_FORMAT = "aftune.receipt.v2"
SIGNATURE_CONTEXT = "inference-receipt"
MAX_RECEIPT_BYTES = 1 << 16
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")
_FIELDS = ("format", "hash", "model_digest", "input_digest", "output_digest", "record_root", "time", "key",
           "request_nonce", "policy_digest", "signature")


@dataclass(frozen=True)
class Receipt:
    algorithm: str  # the hash function (JSON "hash")
    model_digest: bytes
    input_digest: bytes
    output_digest: bytes
    record_root: bytes  # the record id: H(TAG_INFERENCE_RECORD || record file bytes)
    time: str  # RFC 3339, UTC ("Z")
    key: PublicKey
    signature: bytes = b""
    request_nonce: bytes | None = None  # the client's nonce (16-64 bytes), when the request carried one
    policy_digest: bytes | None = None  # the generation policy's digest (causal LMs), else None

    def message(self) -> bytes:
        """H(TAG_RECEIPT || lp(format) || lp(hash) || model || input || output || record || lp(time) || key
        || lp(request nonce or empty) || lp(policy digest or empty))."""
        return hash_message(self.algorithm, TAG_RECEIPT, length_prefixed(RECEIPT_FORMAT.encode("ascii")),
                            length_prefixed(self.algorithm.encode("ascii")), self.model_digest, self.input_digest,
                            self.output_digest, self.record_root, length_prefixed(self.time.encode("ascii")),
                            self.key.raw, length_prefixed(self.request_nonce or b""),
                            length_prefixed(self.policy_digest or b""))

    def to_json(self) -> dict[str, Any]:
        return {"format": RECEIPT_FORMAT, "hash": self.algorithm, "model_digest": self.model_digest.hex(),
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
        missing = [f for f in _FIELDS if f not in obj]
        unknown = sorted(set(obj) - set(_FIELDS))
        if missing or unknown:
            raise InputError(f"receipt: missing fields {missing}" if missing else f"receipt: unknown fields {unknown}")
        if obj["format"] != RECEIPT_FORMAT:
            raise InputError(f"receipt: format must be {RECEIPT_FORMAT}, got {str(obj['format'])[:40]!r}")
        if obj["hash"] not in HASH_ALGORITHMS:
            raise InputError(f"receipt: unknown hash {str(obj['hash'])[:20]!r}")
        digests = [parse_hex_digest(obj[f], f"receipt: {f}")
                   for f in ("model_digest", "input_digest", "output_digest", "record_root")]
        t = obj["time"]
        if not isinstance(t, str) or not _TIME.fullmatch(t):
            raise InputError(f"receipt: time must be RFC 3339 UTC like 2025-01-31T12:00:00.000000Z, got {str(t)[:40]!r}")
        if not isinstance(obj["key"], str):
            raise InputError("receipt: key must be 'ed25519:<64 hex digits>'")
        key = PublicKey.from_text(obj["key"])
        sig = obj["signature"]
        if not isinstance(sig, str) or len(sig) != 128 or sig.strip("0123456789abcdef"):
            raise InputError("receipt: signature must be 128 lowercase hex digits")
        nonce = None if obj["request_nonce"] is None else parse_request_nonce(obj["request_nonce"], "receipt: request_nonce")
        policy = None if obj["policy_digest"] is None else parse_hex_digest(obj["policy_digest"], "receipt: policy_digest")
        return cls(obj["hash"], *digests, t, key, bytes.fromhex(sig), nonce, policy)

    @classmethod
    def load(cls, path: str | Path) -> "Receipt":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"receipt {p} does not exist")
        return cls.from_json(jsonio.read_json(p, MAX_RECEIPT_BYTES, "receipt", InputError))


def issue_receipt(key: SigningKey, algorithm: str, model_digest: bytes, input_digest: bytes, output_digest: bytes,
                  record_root: bytes, time: str, *, request_nonce: bytes | None = None,
                  policy_digest: bytes | None = None) -> Receipt:
    unsigned = Receipt(algorithm, model_digest, input_digest, output_digest, record_root, time, key.public_key,
                       request_nonce=request_nonce, policy_digest=policy_digest)
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
    # 4. the client's own request: its nonce and its policy (SPEC.md 8.7 numbers; checked before the record)
    if request_nonce is not None and receipt.request_nonce != request_nonce:
        raise CommitmentMismatch(f"the receipt answers request nonce {_short_or_none(receipt.request_nonce)}, not "
                                 f"yours {_short_or_none(request_nonce)}: a receipt for another (or a replayed) request")
    if policy_digest is not None and receipt.policy_digest != policy_digest:
        raise CommitmentMismatch(f"the receipt's policy digest {_short_or_none(receipt.policy_digest)} is not your "
                                 f"policy's {_short_or_none(policy_digest)}: the answer was generated under another "
                                 "generation policy")
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
    checks = (("model digest", record.model_digest, receipt.model_digest),
              ("input digest", record.rows_root("input/"), receipt.input_digest),
              ("output digest", record.rows_root("output/"), receipt.output_digest))
    checks += (("request nonce", record.request_nonce, receipt.request_nonce),
               ("policy digest", record.policy_digest, receipt.policy_digest))
    for what, in_record, in_receipt in checks:
        if in_record != in_receipt:
            raise CommitmentMismatch(f"receipt {what} {_short_or_none(in_receipt)} differs from the record's "
                                     f"{_short_or_none(in_record)}")
