"""The partition record (format `aftune.partition.v1`): what crossed, signed by the trusted side.

    record = PartitionRecord.read(path)                      # <id>.json and <id>.sig
    report = check_record(record, public_key=key, crossings=load_crossings(path_of_crossings))

The trusted process writes one record per session: the model digest, the strategy and its plan,
the arithmetic, the input's digest, the output, the outcome (PASS, or FAIL naming the layer and
step), and one row per crossing with its tensor digest; `crossings.root` is the Merkle root over
{crossing name: digest} (SPEC.md 2.4). The record's bytes are canonical JSON; its id is
`H(TAG_PARTITION_RECORD || bytes)` and the signature is Ed25519 over the id with context
`partition-record` (SPEC.md 11.5). `check_record` raises on any failure and returns what it
compared: signature, rows and root always; with the stored crossings, every digest, and every
offloaded product replayed exactly (operand @ W^T mod p with the weight that crossed): an
auditor needs neither the trusted side's secrets nor the model.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch

from ..core import jsonio
from ..core.encoding import canonical_json, hash_message, parse_hex_digest, tensor_digest
from ..core.merkle import merkle_root
from ..core.signing import PublicKey, SigningKey
from ..errors import CommitmentMismatch, InputError, RecordError
from .field import Field
from .link import crossing_name

RECORD_FORMAT = "aftune.partition.v1"
SIGNATURE_FORMAT = "aftune.partition-signature.v1"
TAG_PARTITION_RECORD = b"aftune.v1.partition-record\x00"  # belongs in core/encoding.py (SPEC.md 11.5)
SIGNATURE_CONTEXT = "partition-record"
TRUSTED_SIDE_LABEL = "process isolation only (no TEE: no memory encryption, no attestation)"
MAX_RECORD_BYTES = 256 << 20
MAX_CROSSINGS_BYTES = 16 << 30
RECORD_FIELDS = ("format", "hash", "created", "nonce", "trusted_side", "model", "backbone", "strategy", "plan",
                 "arithmetic", "input", "output", "outcome", "crossings", "key")


def record_id(algorithm: str, body: bytes) -> bytes:
    return hash_message(algorithm, TAG_PARTITION_RECORD, body)


@dataclass(frozen=True)
class PartitionRecord:
    body: bytes  # canonical JSON, exactly as hashed
    signature: bytes
    key: PublicKey

    @property
    def document(self) -> dict[str, Any]:
        return jsonio.loads(self.body)

    @property
    def id(self) -> bytes:
        return record_id(self.document["hash"], self.body)

    def write(self, directory: str | Path) -> Path:
        """`<dir>/<id>.json` (the body) and `<dir>/<id>.sig`; never overwrites other bytes."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        rid = self.id.hex()
        sig = canonical_json({"format": SIGNATURE_FORMAT, "record": rid, "key": self.key.text,
                              "signature": self.signature.hex()})
        for path, data in ((d / f"{rid}.json", self.body), (d / f"{rid}.sig", sig)):
            if path.exists() and path.read_bytes() != data:
                raise InputError(f"{path} exists with other bytes; refusing to overwrite a record")
            path.write_bytes(data)
        return d / f"{rid}.json"

    @classmethod
    def read(cls, path: str | Path) -> PartitionRecord:
        p = Path(path)
        body = jsonio.read_bytes(p, MAX_RECORD_BYTES, "partition record")
        sig = jsonio.read_json(p.with_suffix(".sig"), 1 << 16, "partition record signature")
        if not isinstance(sig, dict) or set(sig) != {"format", "record", "key", "signature"} \
                or sig["format"] != SIGNATURE_FORMAT:
            raise RecordError(f"{p.with_suffix('.sig')}: not an {SIGNATURE_FORMAT} document")
        try:
            signature = bytes.fromhex(str(sig["signature"]))
        except ValueError:
            raise RecordError(f"{p.with_suffix('.sig')}: the signature is not hex") from None
        record = cls(body, signature, PublicKey.from_text(str(sig["key"])))
        if parse_hex_digest(sig["record"], "signature file: record") != record.id:
            raise CommitmentMismatch(f"{p.with_suffix('.sig')} signs record {sig['record'][:16]}…, not this file "
                                     f"({record.id.hex()[:16]}…)")
        return record


def sign_record(body: dict[str, Any], key: SigningKey) -> PartitionRecord:
    data = canonical_json({**body, "key": key.public_key.text})
    return PartitionRecord(data, key.sign(SIGNATURE_CONTEXT, record_id(body["hash"], data)), key.public_key)


def new_body(**parts: Any) -> dict[str, Any]:
    """The record body (without `key`): format, time and nonce added to the caller's parts."""
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"format": RECORD_FORMAT, "created": created, "nonce": secrets.token_hex(16),
            "trusted_side": TRUSTED_SIDE_LABEL, **parts}


@dataclass(frozen=True)
class RecordCheck:
    """What `check_record` compared (it raises on any failure)."""

    record_id: str
    strategy: str
    outcome: str  # the record's own outcome: PASS, or FAIL (which the replay then reproduces)
    crossings: int
    digests_checked: int
    products_replayed: int

    def summary(self) -> str:
        return (f"record {self.record_id[:16]}… ({self.strategy}): signature and Merkle root of {self.crossings} "
                f"crossings verified; {self.digests_checked} crossing digests and {self.products_replayed} "
                f"offloaded products replayed exactly")


def check_record(record: PartitionRecord, *, public_key: PublicKey,
                 crossings: Mapping[str, torch.Tensor] | None = None) -> RecordCheck:
    # 1. the signature, by the pinned key, over the id of the exact bytes
    if record.key.raw != public_key.raw:
        raise CommitmentMismatch(f"the record is signed by {record.key.text}, not by the pinned key {public_key.text}")
    try:
        doc = jsonio.loads(record.body)
    except ValueError as exc:
        raise RecordError(f"the partition record is not strict JSON: {exc}") from None
    if not isinstance(doc, dict) or tuple(sorted(doc)) != tuple(sorted(RECORD_FIELDS)) or doc["format"] != RECORD_FORMAT:
        raise RecordError(f"not an {RECORD_FORMAT} record: fields {sorted(doc)[:20] if isinstance(doc, dict) else doc}")
    algorithm = doc["hash"]
    rid = record_id(algorithm, record.body)
    if not public_key.verify(SIGNATURE_CONTEXT, rid, record.signature):
        raise CommitmentMismatch(f"the signature over record {rid.hex()[:16]}… does not verify: the record was edited")
    if doc["key"] != public_key.text:
        raise CommitmentMismatch("the record names another key than the one that signed it")
    # 2. the crossing rows and their root
    c = doc["crossings"]
    rows = _rows(c)
    digests = {crossing_name(r[0], r[1], r[2]): parse_hex_digest(r[8], f"crossing {r[0]}") for r in rows}
    if parse_hex_digest(c.get("root"), "crossings.root") != merkle_root(algorithm, digests):
        raise CommitmentMismatch("the crossings' Merkle root does not match their rows")
    if c.get("count") != len(rows) or c.get("bytes") != sum(r[7] for r in rows):
        raise CommitmentMismatch("crossings.count / crossings.bytes disagree with the rows")
    checked = replayed = 0
    if crossings is not None:
        checked, replayed = _replay(rows, crossings, algorithm, Field(int(doc["arithmetic"]["modulus"])))
    return RecordCheck(rid.hex(), str(doc["strategy"]["name"]), str(doc["outcome"]["verdict"]), len(rows),
                       checked, replayed)


def _rows(c: Any) -> list[list]:
    if not isinstance(c, dict) or not isinstance(c.get("rows"), list):
        raise RecordError("crossings.rows is missing")
    for i, r in enumerate(c["rows"]):
        ok = (isinstance(r, list) and len(r) == 9 and r[0] == i and isinstance(r[1], str) and r[2] in
              ("to-worker", "from-worker") and isinstance(r[3], str) and isinstance(r[4], int) and isinstance(r[5], str)
              and isinstance(r[6], list) and all(isinstance(d, int) and d >= 0 for d in r[6])
              and isinstance(r[7], int) and r[7] >= 0)
        if not ok:
            raise RecordError(f"crossing row {i} is malformed: {str(r)[:200]}")
    return c["rows"]


def _replay(rows: list[list], tensors: Mapping[str, torch.Tensor], algorithm: str, field: Field) -> tuple[int, int]:
    names = [crossing_name(r[0], r[1], r[2]) for r in rows]
    extra = set(tensors) - set(names)
    if extra:
        raise CommitmentMismatch(f"{len(extra)} stored crossings are not in the record, e.g. {min(extra)}")
    weights: dict[str, torch.Tensor] = {}
    replayed = 0
    for r, name in zip(rows, names, strict=True):
        index, site, direction, kind, step = r[:5]
        if name not in tensors:
            raise RecordError(f"crossing {name} is not stored; cannot replay layer {site}, step {step}")
        t = tensors[name]
        if tensor_digest(name, t, algorithm).hex() != r[8]:
            raise CommitmentMismatch(f"crossing {index} (layer {site}, step {step}, {direction}): the stored tensor's "
                                     f"digest differs from the record's {r[8][:16]}…")
        if kind == "weight":
            weights[site] = t
        elif kind == "result":
            prev = rows[index - 1] if index else None
            if prev is None or prev[3] != "product" or prev[1] != site or prev[4] != step or site not in weights:
                raise CommitmentMismatch(f"crossing {index}: a result for layer {site}, step {step} without its "
                                         "weight or operand")
            operand = tensors[names[index - 1]]
            expected = field.matmul_small(operand, weights[site].T)
            if t.shape != expected.shape or not torch.equal(t, expected):
                raise CommitmentMismatch(f"FAIL at layer {site}, step {step}: the worker's result (crossing {index}) "
                                         f"is not operand @ W^T mod p: the product was wrong")
            replayed += 1
    return len(rows), replayed


def save_crossings(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    p = Path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(p))
    return p


def load_crossings(path: str | Path) -> dict[str, torch.Tensor]:
    """Stored crossings (safetensors); the file is hostile input: size-capped, parsed by the
    safetensors library (no code execution)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = jsonio.read_bytes(path, MAX_CROSSINGS_BYTES, "stored crossings")
    try:
        return load(data)
    except (SafetensorError, ValueError) as exc:
        raise RecordError(f"{path}: not a safetensors file of crossings: {exc}") from None
