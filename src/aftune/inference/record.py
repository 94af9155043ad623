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

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..core import jsonio
from ..core.encoding import (DTYPE_BY_NAME, HASH_ALGORITHMS, TAG_INFERENCE_RECORD, hash_message, parse_hex_digest,
                             tensor_digest)
from ..core.merkle import files_root, merkle_root
from ..core.rows import TensorRef, rows_from_json
from ..core.store import ObjectStore
from ..errors import CommitmentMismatch, InputError, RecordError
from ..models import tokenizer_files
from .batching import BatchShape
from .compact import boundary_key, boundary_label, inline_rows, read_boundaries  # noqa: F401 (re-exported)
from .policy import MAX_NEW_TOKENS, GenerationPolicy, parse_request_nonce
from .portable import PortableLog
from .records_dir import (MAX_RECORD_BYTES, MAX_SERVED_BYTES, SERVED_FORMAT, SERVED_MEMBERS, RecordDir, served_digest,  # noqa: F401
                          served_file)
from .served import RunBinding
from .settings import RecordingSettings

RECORD_FORMAT = "aftune.inference.v6"  # written: v5 with the policy, the ids and the boundaries kept out (8.4.1)
RECORD_FORMAT_V5 = "aftune.inference.v5"  # read: v4 with `model` and `layout` in a served file, by digest (8.4)
RECORD_FORMAT_V4 = "aftune.inference.v4"  # read: v3 and the member `numerics` (SPEC.md 8.4, 8.13)
RECORD_FORMAT_V3 = "aftune.inference.v3"  # read: a v3 record has no `numerics` (native numerics)
RECORD_FORMATS = (RECORD_FORMAT, RECORD_FORMAT_V5, RECORD_FORMAT_V4, RECORD_FORMAT_V3)
SPLICED = (RECORD_FORMAT, RECORD_FORMAT_V5)  # `model` and `layout` in a served file


# --- keys of the tensor rows, and the per-step roots ----------------------------------------------

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


def utc_now() -> str:
    """RFC 3339 UTC time with microseconds, e.g. 2025-01-31T12:00:00.123456Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- reading a record ------------------------------------------------------------------------

def splice_served(records: RecordDir, doc: dict[str, Any], where: str) -> dict[str, Any]:
    """A v5 record's `model` and `layout`, read from the served file it names by digest, spliced
    into (a copy of) its document; v3 and v4 records hold them and MUST NOT name a served file."""
    if doc.get("format") not in SPLICED:
        if "served" in doc:
            raise RecordError(f"{where}: 'served' is not part of an {doc.get('format')} record")
        return doc
    for k in SERVED_MEMBERS:
        if k in doc:
            raise RecordError(f"{where}: an {doc['format']} record holds '{k}' in its served file, not in itself")
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
    # v6 (SPEC.md 8.4.1): tensors held in memory (inline ids, regenerated boundaries), the
    # committed root of the boundaries, and whether their roots and rows are at hand
    inline: dict[str, torch.Tensor] = field(default_factory=dict)
    committed_boundaries: bytes | None = None
    boundaries_known: bool = True

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
            raise RecordError(f"{path} is not an {RECORD_FORMAT} (or v5, v4, v3) record")
        algorithm = doc.get("hash")
        if algorithm not in HASH_ALGORITHMS:
            raise RecordError(f"{path}: unknown hash {str(algorithm)[:20]!r}")
        rid = record_id(algorithm, data)
        if rid.hex() != name:
            raise CommitmentMismatch(f"record {name[:16]}…: the file's bytes hash to {rid.hex()[:16]}…, not to its "
                                     "name: the record was edited after it was written")
        records = RecordDir(root, algorithm)
        where = f"record {name[:16]}…"
        doc = splice_served(records, doc, where)
        if doc["format"] != RECORD_FORMAT:
            rec = cls(records, rid, doc, rows_from_json(doc.get("tensors"), "record: tensors"))
        else:
            rec = cls._open_v6(records, rid, doc, where)
        rec._check_structure()
        return rec

    @classmethod
    def _open_v6(cls, records: RecordDir, rid: bytes, doc: dict[str, Any], where: str) -> "InferenceRecord":
        """A v6 record with what it keeps out put back (SPEC.md 8.4.1): the policy from its policy
        file, the input and output rows from `input.ids` and `output.tokens` (causal LMs), the
        digests of input and output derived, and the boundary roots and rows from the boundaries
        file when the provider has regenerated it (checked against the committed root)."""
        for k in ("boundary_roots", "created"):
            if k in doc:
                raise RecordError(f"{where}: '{k}' is not part of an {RECORD_FORMAT} record")
        for section in ("input", "output"):
            if not isinstance(doc.get(section), dict) or "digest" in doc[section]:
                raise RecordError(f"{where}: '{section}' must be an object without 'digest' (derived in {RECORD_FORMAT})")
        doc = {**doc, "input": dict(doc["input"]), "output": dict(doc["output"])}
        inline: dict[str, torch.Tensor] = {}
        if doc.get("task") == "causal_lm":
            if "tensors" in doc:
                raise RecordError(f"{where}: a causal LM {RECORD_FORMAT} record states its ids inline: no 'tensors'")
            rows = {}
            for key, (ref, t) in inline_rows(doc, where).items():
                rows[key], inline[key] = ref, t
            doc["input"].pop("ids")
            gen = doc.get("generation")
            if not isinstance(gen, dict) or set(gen) != {"policy_digest", "seed"}:
                raise RecordError(f"{where}: generation must have exactly the fields policy_digest and seed (the "
                                  "policy is in its policy file)")
            try:
                digest = parse_hex_digest(gen["policy_digest"], "record: generation.policy_digest")
            except InputError as exc:
                raise RecordError(str(exc)) from None
            doc["generation"] = {**gen, "policy": records.read_policy(digest, where)}
        else:
            rows = rows_from_json(doc.get("tensors"), "record: tensors")
            if any(not k.startswith(("input/", "output/")) for k in rows):
                raise RecordError(f"{where}: the rows of an {RECORD_FORMAT} record are its input/ and output/ rows only")
        for section in ("input", "output"):
            doc[section]["digest"] = digests_root(records.algorithm, rows, f"{section}/").hex()
        try:
            committed = parse_hex_digest(doc.get("boundaries"), "record: boundaries")
        except InputError as exc:
            raise RecordError(str(exc)) from None
        layout = doc.get("layout")
        blocks = layout.get("layer_blocks") if isinstance(layout, dict) else None
        if not isinstance(blocks, list) or not blocks:
            raise RecordError("record: layout.layer_blocks is missing or malformed")
        rec = cls(records, rid, doc, rows)
        rec.inline = inline
        rec.committed_boundaries = committed
        rec.boundaries_known = False
        found = read_boundaries(records, rid, len(blocks), committed, where)
        if found is not None:
            rec.install_boundaries(*found)
        return rec

    def install_boundaries(self, roots: dict[str, bytes], rows: dict[str, TensorRef],
                           tensors: dict[str, torch.Tensor] | None = None) -> None:
        """The per-boundary roots and rows of a v6 record (from its boundaries file, or regenerated
        and checked against the committed root by the caller), and any regenerated tensors."""
        self.doc["boundary_roots"] = {k: v.hex() for k, v in roots.items()}
        self.rows.update(rows)
        self.inline.update(tensors or {})
        self.boundaries_known = True

    @property
    def is_v6(self) -> bool:
        """A v6 record: its policy, and its boundaries' values, are in files of their own (8.4.1)."""
        return self.committed_boundaries is not None

    @property
    def boundary_rows(self) -> dict[str, TensorRef]:
        return {k: r for k, r in self.rows.items() if k.startswith("boundary/")}

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
        if not self.is_v6:  # v6: read (and checked) with the boundaries file, when there
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
            if ref is None and not self.boundaries_known:  # the logs are read against the boundaries' sizes
                raise RecordError(f"record: a portable-numerics {RECORD_FORMAT} record keeps its boundaries file "
                                  "(SPEC.md 8.4.1), and it is missing")
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
        if not self.boundaries_known:
            raise RecordError(self.boundaries_missing())
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

    def boundaries_missing(self) -> str:
        """Why a v6 record's per-boundary commitments are not at hand, and what to run."""
        return (f"record {self.record_id.hex()[:16]}… commits its boundaries by one root only and its boundaries "
                f"file is not here: the provider regenerates it on its own hardware (`aftune prepare-inference "
                f"{self.records.root} --record {self.record_id.hex()}`, or an opening: `aftune open`)")

    def tensor(self, key: str) -> torch.Tensor:
        if key in self.inline:
            return self.inline[key]
        ref = self.rows.get(key)
        if ref is None:
            raise RecordError(f"record {self.record_id.hex()[:16]}…: no tensor {key!r}")
        return self.store.get(ref, f"record {self.record_id.hex()[:16]}…, {key}")

    def has_tensor(self, key: str) -> bool:
        if key in self.inline:
            return True
        ref = self.rows.get(key)
        return ref is not None and self.store.has(ref.digest)

    def stored(self, key: str) -> bool:
        """Whether the object of row `key` is in the store (not only in memory)."""
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
