"""Inference records (SPEC.md 8.3-8.4): the record directory, the keys of a record's tensor rows,
and reading one record as hostile input.

    R/records/<id>.json     one canonical-JSON record file, named by its id (the digest of its bytes)
    R/served/<digest>.json  v5: the members `model` and `layout`, the same for every record of one
                            served model, written once and named by their digest (the record holds it)
    R/objects/              the content-addressed tensor store
    R/tokenizers/<root>/    the tokenizer files, named by their files root
    R/receipts/<id>.json    the provider's signed receipt

    record = InferenceRecord.open("records", "3fa1…")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..core import jsonio
from ..core.encoding import (DTYPE_BY_NAME, HASH_ALGORITHMS, TAG_INFERENCE_RECORD, TAG_INFERENCE_SERVED,
                             canonical_json, hash_message, parse_hex_digest, tensor_digest)
from ..core.merkle import files_root, merkle_root
from ..core.rows import TensorRef, rows_from_json
from ..core.store import ObjectStore
from ..errors import CommitmentMismatch, InputError, RecordError
from ..models import tokenizer_files
from .batching import BatchShape
from .policy import MAX_NEW_TOKENS, GenerationPolicy, parse_request_nonce
from .portable import PortableLog
from .served import RunBinding
from .settings import RecordingSettings

RECORD_FORMAT = "aftune.inference.v5"  # written: v4 with `model` and `layout` in a served file, by digest (8.4)
RECORD_FORMAT_V4 = "aftune.inference.v4"  # read: v3 and the member `numerics` (SPEC.md 8.4, 8.13)
RECORD_FORMAT_V3 = "aftune.inference.v3"  # read: a v3 record has no `numerics` (native numerics)
RECORD_FORMATS = (RECORD_FORMAT, RECORD_FORMAT_V4, RECORD_FORMAT_V3)
SERVED_FORMAT = "aftune.inference-served.v1"  # R/served/<digest>.json: {format, model, layout}
SERVED_MEMBERS = ("model", "layout")
MAX_RECORD_BYTES = 256 << 20
MAX_SERVED_BYTES = 16 << 20


# --- keys of the tensor rows, and the per-step roots ----------------------------------------------

def boundary_key(boundary: int) -> str:
    return f"boundary/{boundary:04d}"


def boundary_label(boundary: int) -> str:
    """The key of boundary `boundary` in the record's `boundary_roots`."""
    return f"{boundary:04d}"


def steps_root(algorithm: str, parts: list[torch.Tensor]) -> bytes:
    """The Merkle root of one boundary's per-step activations (SPEC.md 8.4): leaf key `%06d` of the
    step, leaf digest the tensor digest (name `activation`) of that step's new positions."""
    return merkle_root(algorithm, {f"{k:06d}": tensor_digest("activation", t, algorithm) for k, t in enumerate(parts)})


def step_layout(prompt_length: int, num_tokens: int) -> list[tuple[int, int]]:
    """(first position, positions) of each generation step: the prompt, then one token each."""
    return [(0, prompt_length)] + [(prompt_length + k - 1, 1) for k in range(1, num_tokens)]


def input_key(field_name: str) -> str:
    return f"input/{field_name}"


def digests_root(algorithm: str, rows: dict[str, TensorRef], prefix: str) -> bytes:
    return merkle_root(algorithm, {k: r.digest for k, r in rows.items() if k.startswith(prefix)})


def record_id(algorithm: str, data: bytes) -> bytes:
    return hash_message(algorithm, TAG_INFERENCE_RECORD, data)


def served_file(model: dict[str, Any], layout: dict[str, Any]) -> bytes:
    """The bytes of a served file (SPEC.md 8.4): canonical JSON of {format, model, layout}."""
    return canonical_json({"format": SERVED_FORMAT, "model": model, "layout": layout})


def served_digest(algorithm: str, data: bytes) -> bytes:
    return hash_message(algorithm, TAG_INFERENCE_SERVED, data)


def utc_now() -> str:
    """RFC 3339 UTC time with microseconds, e.g. 2025-01-31T12:00:00.123456Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- the record directory --------------------------------------------------------------------

class RecordDir:
    """R/records/<id>.json, R/objects/, R/tokenizers/<root>/, R/receipts/<id>.json."""

    def __init__(self, root: str | Path, algorithm: str):
        self.root = Path(root)
        self.algorithm = algorithm
        self.store = ObjectStore(self.root / "objects", algorithm)

    def record_path(self, rid: bytes) -> Path:
        return self.root / "records" / f"{rid.hex()}.json"

    def receipt_path(self, rid: bytes) -> Path:
        return self.root / "receipts" / f"{rid.hex()}.json"

    def tokenizer_dir(self, digest: bytes) -> Path:
        return self.root / "tokenizers" / digest.hex()

    def served_path(self, digest: bytes) -> Path:
        return self.root / "served" / f"{digest.hex()}.json"

    def keep_served(self, data: bytes) -> bytes:
        """Write a served file once (its name is its digest) and return its digest."""
        digest = served_digest(self.algorithm, data)
        path = self.served_path(digest)
        if not path.is_file():
            self.write_new(path, data)
        return digest

    def read_served(self, digest: bytes, where: str) -> dict[str, Any]:
        """The members `model` and `layout` of served file `digest`, read as hostile input: its
        bytes must hash to its digest."""
        path = self.served_path(digest)
        if not path.is_file():
            raise RecordError(f"{where}: its served file served/{digest.hex()}.json (model and layout) is missing")
        data = jsonio.read_bytes(path, MAX_SERVED_BYTES, "served file")
        if served_digest(self.algorithm, data) != digest:
            raise CommitmentMismatch(f"served/{digest.hex()[:16]}….json: the file's bytes hash to "
                                     f"{served_digest(self.algorithm, data).hex()[:16]}…, not to the digest the "
                                     f"record commits: the served file (model and layout) was edited")
        doc = jsonio.parse(data, f"served file {path}")
        if not isinstance(doc, dict) or doc.get("format") != SERVED_FORMAT or set(doc) != {"format", *SERVED_MEMBERS}:
            raise RecordError(f"served/{digest.hex()[:16]}….json is not an {SERVED_FORMAT} file with exactly "
                              "format, model and layout")
        return {k: doc[k] for k in SERVED_MEMBERS}

    def served_digests(self) -> list[str]:
        d = self.root / "served"
        if not d.is_dir():
            return []
        return sorted(p.stem for p in d.glob("*.json") if len(p.stem) == 64 and not p.stem.strip("0123456789abcdef"))

    def keep_tokenizer(self, source: Path, digest: bytes) -> Path:
        """Copy the tokenizer files once, named by their files root."""
        target = self.tokenizer_dir(digest)
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        for name, data in tokenizer_files(source).items():
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, target)
        except OSError:  # another writer was first: same content by construction
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def write_new(self, path: Path, data: bytes) -> None:
        """Create `path` with `data`; an existing file is never overwritten."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                if path.read_bytes() != data:
                    raise RecordError(f"{path} exists with other content: records are never overwritten") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def record_ids(self) -> list[str]:
        d = self.root / "records"
        if not d.is_dir():
            return []
        return sorted(p.stem for p in d.glob("*.json") if len(p.stem) == 64 and not p.stem.strip("0123456789abcdef"))


# --- reading a record ------------------------------------------------------------------------

def splice_served(records: RecordDir, doc: dict[str, Any], where: str) -> dict[str, Any]:
    """A v5 record's `model` and `layout`, read from the served file it names by digest, spliced
    into (a copy of) its document; v3 and v4 records hold them and MUST NOT name a served file."""
    if doc.get("format") != RECORD_FORMAT:
        if "served" in doc:
            raise RecordError(f"{where}: 'served' is not part of an {doc.get('format')} record")
        return doc
    for k in SERVED_MEMBERS:
        if k in doc:
            raise RecordError(f"{where}: an {RECORD_FORMAT} record holds '{k}' in its served file, not in itself")
    try:
        digest = parse_hex_digest(doc.get("served"), f"{where}: served")
    except InputError as exc:
        raise RecordError(str(exc)) from None
    return {**doc, **records.read_served(digest, where)}


def _need(obj: Any, name: str, kind, where: str = "record"):
    v = obj.get(name) if isinstance(obj, dict) else None
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise RecordError(f"{where}: '{name}' is missing or malformed")
    return v


@dataclass
class InferenceRecord:
    """One record, read from hostile files: its bytes hash to its name before anything is used."""

    records: RecordDir
    record_id: bytes
    doc: dict[str, Any]
    rows: dict[str, TensorRef]

    @classmethod
    def open(cls, record_dir: str | Path, record: str | None = None) -> "InferenceRecord":
        root = Path(record_dir)
        if not root.is_dir():
            raise InputError(f"record directory {root} does not exist")
        ids = RecordDir(root, "blake3").record_ids()
        if record is None:
            if len(ids) != 1:
                raise InputError(f"{root} holds {len(ids)} records: choose one with --record ID "
                                 f"({', '.join(i[:16] + '…' for i in ids[:5])})" if ids else f"{root} holds no records")
            name = ids[0]
        else:
            rec = record.strip().lower()
            if rec.endswith(".json"):
                rec = Path(rec).stem
            if not rec or rec.strip("0123456789abcdef"):
                raise InputError(f"a record id is hexadecimal, got {record[:80]!r}")
            matches = [i for i in ids if i.startswith(rec)]
            if len(matches) != 1:
                raise InputError(f"{'no' if not matches else 'more than one'} record in {root} starts with {rec[:64]}")
            name = matches[0]
        path = root / "records" / f"{name}.json"
        data = jsonio.read_bytes(path, MAX_RECORD_BYTES, "inference record")
        doc = jsonio.parse(data, f"inference record {path}")
        if not isinstance(doc, dict) or doc.get("format") not in RECORD_FORMATS:
            raise RecordError(f"{path} is not an {RECORD_FORMAT} (or {RECORD_FORMAT_V4}, {RECORD_FORMAT_V3}) record")
        algorithm = doc.get("hash")
        if algorithm not in HASH_ALGORITHMS:
            raise RecordError(f"{path}: unknown hash {str(algorithm)[:20]!r}")
        rid = record_id(algorithm, data)
        if rid.hex() != name:
            raise CommitmentMismatch(f"record {name[:16]}…: the file's bytes hash to {rid.hex()[:16]}…, not to its "
                                     "name: the record was edited after it was written")
        records = RecordDir(root, algorithm)
        doc = splice_served(records, doc, f"record {name[:16]}…")
        rec = cls(records, rid, doc, rows_from_json(doc.get("tensors"), "record: tensors"))
        rec._check_structure()
        return rec

    # --- structure -------------------------------------------------------------------------
    def _check_structure(self) -> None:
        d = self.doc
        if d.get("task") not in ("causal_lm", "classification"):
            raise RecordError("record: 'task' must be causal_lm or classification")
        model = _need(d, "model", dict)
        _need(model, "config", dict, "record: model")
        for k in ("dtype", "attn_implementation"):
            _need(model, k, str, "record: model")
        if model["dtype"] not in DTYPE_BY_NAME:
            raise RecordError(f"record: model.dtype {model['dtype']!r} is not supported")
        layout = _need(d, "layout", dict)
        for k, least in (("layers_per_block", 1), ("activation_interval", 0)):
            v = _need(layout, k, int, "record: layout")
            if v < least:
                raise RecordError(f"record: layout.{k} must be at least {least}")
        _need(layout, "stages", list, "record: layout")
        _need(layout, "layer_blocks", list, "record: layout")
        if "steps" in d:
            raise RecordError("record: 'steps' is not part of an aftune.inference.v3 or v4 record (the step layout "
                              "follows from the input and the tokens)")
        blocks = _need(layout, "layer_blocks", list, "record: layout")
        roots = _need(d, "boundary_roots", dict)
        if sorted(roots) != [boundary_label(b) for b in range(1, len(blocks))]:
            raise RecordError(f"record: boundary_roots must have exactly the boundaries 0001..{len(blocks) - 1:04d}")
        for b in range(1, len(blocks)):
            self.boundary_root(b)
        _need(d, "input", dict)
        _need(d, "output", dict)
        if "source" in model:
            raise RecordError("record: model.source is not part of an aftune.inference.v2 record (a verifier never "
                              "loads a model from a path the record names)")
        if "request_nonce" not in d:
            raise RecordError("record: 'request_nonce' is missing (null when the client sent none)")
        self.request_nonce  # noqa: B018 (parsed here, so that a malformed nonce is a record error)
        if self.task == "causal_lm":
            gen = _need(d, "generation", dict)
            if set(gen) != {"policy", "policy_digest", "seed"}:
                raise RecordError("record: generation must have exactly the fields policy, policy_digest and seed")
            self.policy  # noqa: B018
            self.policy_digest  # noqa: B018
            seed = gen["seed"]
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
                raise RecordError(f"record: generation.seed must be null or an integer in [0, 2^63), got {seed!r}")
        elif d.get("generation") is not None:
            raise RecordError("record: a classification record has no generation (null)")
        if self.task == "causal_lm":
            tokens = _need(d, "output", dict).get("tokens")
            ids = self.rows.get("input/input_ids")
            if (not isinstance(tokens, list) or not 1 <= len(tokens) <= MAX_NEW_TOKENS or ids is None
                    or len(ids.shape) != 2 or ids.shape[1] < 1):
                raise RecordError("record: a causal LM record needs input/input_ids [1, P] and 1 to "
                                  f"{MAX_NEW_TOKENS} output tokens")
        self._portable = self._read_numerics(len(blocks))
        self._batch = self._read_batch()

    def _read_batch(self):
        """The `batch` member (SPEC.md 8.4, 8.5.1): absent when the request was computed alone."""
        if "batch" not in self.doc:
            return None
        if self.task != "causal_lm" or self.doc["batch"] is None:
            raise RecordError("record: 'batch' is present only in a causal LM record computed in a batch")
        return BatchShape.from_json(self.doc["batch"], self.rows["input/input_ids"].shape[1])

    @property
    def batch(self) -> BatchShape | None:
        """The batch shape and row the request was computed in (a BatchShape), or None (alone)."""
        return self._batch

    def _read_numerics(self, nb: int) -> PortableLog | None:
        """The `numerics` member: absent in v3 (native), null (native) or the portable logs in v4."""
        d = self.doc
        if d["format"] == RECORD_FORMAT_V3:
            if "numerics" in d:
                raise RecordError("record: an aftune.inference.v3 record has no 'numerics'")
            return None
        if "numerics" not in d:
            raise RecordError("record: 'numerics' is missing (null for native numerics)")
        if d["numerics"] is None:
            return None
        if self.task != "causal_lm":
            raise RecordError("record: portable numerics is for causal LMs (a classifier's numerics is null)")
        sizes = {}
        for b in range(1, nb):
            ref = self.rows.get(boundary_key(b))
            if ref is None:
                raise RecordError(f"record: no row {boundary_key(b)}")
            sizes[b] = int(torch.Size(ref.shape).numel())
        return PortableLog.from_json(d["numerics"], sizes, len(d["output"]["tokens"]))

    @property
    def portable(self) -> PortableLog | None:
        """The portable numerics logs (SPEC.md 8.13), or None for native numerics."""
        return self._portable

    @property
    def algorithm(self) -> str:
        return self.records.algorithm

    @property
    def served_digest(self) -> bytes | None:
        """v5: the digest of the served file holding `model` and `layout`; None for v3 and v4."""
        s = self.doc.get("served")
        return None if s is None else bytes.fromhex(s)

    @property
    def store(self) -> ObjectStore:
        return self.records.store

    @property
    def task(self) -> str:
        return self.doc["task"]

    @property
    def model(self) -> dict[str, Any]:
        return self.doc["model"]

    @property
    def model_digest(self) -> bytes:
        try:
            return parse_hex_digest(self.model.get("digest"), "record: model.digest")
        except InputError as exc:
            raise RecordError(str(exc)) from None

    @property
    def run(self) -> RunBinding | None:
        r = self.model.get("run")
        return None if r is None else RunBinding.from_json(r)

    @property
    def settings(self) -> RecordingSettings:
        layout = self.doc["layout"]
        return RecordingSettings(layout["layers_per_block"], layout["activation_interval"], self.algorithm)

    @property
    def policy(self) -> GenerationPolicy | None:
        """The generation policy the record commits (causal LMs), parsed as hostile input."""
        g = self.doc.get("generation")
        if not isinstance(g, dict):
            return None
        try:
            return GenerationPolicy.from_json(g.get("policy"), "record: generation.policy")
        except InputError as exc:
            raise RecordError(str(exc)) from None

    @property
    def policy_digest(self) -> bytes | None:
        """The policy digest the record commits (not yet compared with its policy)."""
        g = self.doc.get("generation")
        if not isinstance(g, dict):
            return None
        try:
            return parse_hex_digest(g.get("policy_digest"), "record: generation.policy_digest")
        except InputError as exc:
            raise RecordError(str(exc)) from None

    @property
    def seed(self) -> int | None:
        g = self.doc.get("generation")
        return g.get("seed") if isinstance(g, dict) else None

    @property
    def request_nonce(self) -> bytes | None:
        """The client's request nonce the record commits, or None."""
        n = self.doc.get("request_nonce")
        if n is None:
            return None
        try:
            return parse_request_nonce(n, "record: request_nonce")
        except InputError as exc:
            raise RecordError(str(exc)) from None

    @property
    def steps(self) -> list[tuple[int, int]]:
        """(first position, positions) of every step, derived (SPEC.md 8.4): classifiers [(0, 1)];
        causal LMs the prompt of P = input_ids length, then one position per further token."""
        if self.task != "causal_lm":
            return [(0, 1)]
        return step_layout(self.rows["input/input_ids"].shape[1], len(self.doc["output"]["tokens"]))

    def boundary_root(self, boundary: int) -> bytes:
        """The committed Merkle root of boundary `boundary`'s per-step activations."""
        try:
            return parse_hex_digest(self.doc["boundary_roots"].get(boundary_label(boundary)),
                                    f"record: boundary_roots.{boundary_label(boundary)}")
        except InputError as exc:
            raise RecordError(str(exc)) from None

    def declared_digest(self, section: str) -> bytes:
        try:
            return parse_hex_digest(self.doc[section].get("digest"), f"record: {section}.digest")
        except InputError as exc:
            raise RecordError(str(exc)) from None

    def rows_root(self, prefix: str) -> bytes:
        return digests_root(self.algorithm, self.rows, prefix)

    def tensor(self, key: str) -> torch.Tensor:
        ref = self.rows.get(key)
        if ref is None:
            raise RecordError(f"record {self.record_id.hex()[:16]}…: no tensor {key!r}")
        return self.store.get(ref, f"record {self.record_id.hex()[:16]}…, {key}")

    def has_tensor(self, key: str) -> bool:
        ref = self.rows.get(key)
        return ref is not None and self.store.has(ref.digest)

    def receipt_path(self) -> Path:
        return self.records.receipt_path(self.record_id)

    def tokenizer_dir(self) -> Path | None:
        """The record's tokenizer directory (R/tokenizers/<root>/), or None for image models."""
        tok = self.model.get("tokenizer")
        if tok is None:
            return None
        try:
            digest = parse_hex_digest(tok, "record: model.tokenizer")
        except InputError as exc:
            raise RecordError(str(exc)) from None
        d = self.records.tokenizer_dir(digest)
        if not d.is_dir():
            raise RecordError(f"the record's tokenizer is missing: {d}")
        return d

    def tokenizer_files(self) -> dict[str, bytes]:
        """The record's tokenizer files, checked against the files root the record commits."""
        d = self.tokenizer_dir()
        if d is None:
            raise RecordError("the record commits no tokenizer")
        try:
            files = tokenizer_files(d)
        except InputError as exc:
            raise RecordError(str(exc)) from None
        if files_root(self.algorithm, files).hex() != self.model.get("tokenizer"):
            raise CommitmentMismatch(f"{d} does not match the tokenizer digest committed in the record")
        return files
