"""The record directory (SPEC.md 8.3): where records, served files, policy files, boundaries
files, objects, tokenizers and receipts live, and how each is written once and read back as
hostile input.

    records = RecordDir("records", "blake3"); records.keep_served(served_file(model, layout))
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import TAG_GENERATION_POLICY, TAG_INFERENCE_SERVED, canonical_json, hash_message
from ..core.rows import rows_from_json
from ..core.store import ObjectStore
from ..errors import CommitmentMismatch, RecordError
from ..models import tokenizer_files

SERVED_FORMAT = "aftune.inference-served.v1"  # R/served/<digest>.json: {format, model, layout}
SERVED_MEMBERS = ("model", "layout")
MAX_RECORD_BYTES = 256 << 20
MAX_SERVED_BYTES = 16 << 20
MAX_POLICY_BYTES = 1 << 20
MAX_BOUNDARIES_BYTES = 16 << 20


def served_file(model: dict[str, Any], layout: dict[str, Any]) -> bytes:
    """The bytes of a served file (SPEC.md 8.4): canonical JSON of {format, model, layout}."""
    return canonical_json({"format": SERVED_FORMAT, "model": model, "layout": layout})


def served_digest(algorithm: str, data: bytes) -> bytes:
    return hash_message(algorithm, TAG_INFERENCE_SERVED, data)



# --- the record directory --------------------------------------------------------------------

class RecordDir:
    """R/records/<id>.json, R/served/<digest>.json, R/policies/<digest>.json,
    R/boundaries/<id>.json, R/objects/, R/tokenizers/<root>/, R/receipts/<id>.json."""

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

    def policy_path(self, digest: bytes) -> Path:
        return self.root / "policies" / f"{digest.hex()}.json"

    def keep_policy(self, data: bytes) -> bytes:
        """Write a policy file once (v6 records: the canonical JSON of a generation policy, named
        by the policy digest) and return the digest."""
        digest = hash_message(self.algorithm, TAG_GENERATION_POLICY, data)
        path = self.policy_path(digest)
        if not path.is_file():
            self.write_new(path, data)
        return digest

    def read_policy(self, digest: bytes, where: str) -> Any:
        """The policy object of policy file `digest`, read as hostile input: its bytes must hash to
        the digest (parsed, not yet checked, by the caller)."""
        path = self.policy_path(digest)
        if not path.is_file():
            raise RecordError(f"{where}: its policy file policies/{digest.hex()}.json (the generation policy) is missing")
        data = jsonio.read_bytes(path, MAX_POLICY_BYTES, "policy file")
        got = hash_message(self.algorithm, TAG_GENERATION_POLICY, data)
        if got != digest:
            raise CommitmentMismatch(f"policies/{digest.hex()[:16]}….json: the file's bytes hash to {got.hex()[:16]}…, "
                                     "not to the policy digest the record commits: the policy file was edited")
        return jsonio.parse(data, f"policy file {path}")

    def boundaries_path(self, rid: bytes) -> Path:
        return self.root / "boundaries" / f"{rid.hex()}.json"

    def row_digests(self, rid: bytes) -> set[bytes]:
        """The digests of every row record `rid` commits: in its file (`tensors`; none for a v6
        causal LM) and, when here, in its boundaries file (v6). The objects it may name."""
        doc = jsonio.read_json(self.record_path(rid), MAX_RECORD_BYTES, "inference record")
        rows = doc.get("tensors", []) if isinstance(doc, dict) else None
        found = {r.digest for r in rows_from_json(rows, "record: tensors").values()}
        kept = self.boundaries_path(rid)
        if kept.is_file():
            more = jsonio.read_json(kept, MAX_BOUNDARIES_BYTES, "boundaries file")
            found |= {r.digest for r in rows_from_json(more.get("tensors") if isinstance(more, dict) else None,
                                                       "boundaries: tensors").values()}
        return found

    def digests_in(self, folder: str) -> list[str]:
        """The 64-hex-digit names of the JSON files in R/<folder>/."""
        d = self.root / folder
        if not d.is_dir():
            return []
        return sorted(p.stem for p in d.glob("*.json") if len(p.stem) == 64 and not p.stem.strip("0123456789abcdef"))

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
