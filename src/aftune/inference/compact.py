"""What a v6 inference record keeps out of its own file, and how a reader puts it back (SPEC.md
8.4, 8.4.1): the generation policy in a policy file named by its digest, the prompt's token ids
and the generated tokens inline (no stored objects), and the per-boundary commitments folded
into one `boundaries` root whose leaves live in a boundaries file the provider regenerates when a
challenge needs them (8.9).

    R/policies/<policy digest>.json    the canonical JSON of one generation policy, once per policy
    R/boundaries/<record id>.json      {format, record, boundary_roots, tensors}: regenerated, MAY be absent

    root = boundaries_root("blake3", roots, rows)     # what the record's `boundaries` commits
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import jsonio
from ..core.encoding import TAG_INFERENCE_BOUNDARY, canonical_json, hash_message, parse_hex_digest
from ..core.merkle import merkle_root
from ..core.rows import TensorRef, rows_from_json, rows_to_json
from ..errors import CommitmentMismatch, InputError, RecordError
from .records_dir import MAX_BOUNDARIES_BYTES, RecordDir

BOUNDARIES_FORMAT = "aftune.inference-boundaries.v1"
MAX_INLINE_IDS = 1 << 20  # prompt tokens a record may state inline


def boundary_key(boundary: int) -> str:
    return f"boundary/{boundary:04d}"


def boundary_label(boundary: int) -> str:
    """The key of boundary `boundary` in `boundary_roots` (and in the boundaries tree)."""
    return f"{boundary:04d}"


def boundary_leaf(algorithm: str, steps_root: bytes, digest: bytes) -> bytes:
    """H(TAG_INFERENCE_BOUNDARY || steps_root(b) || tensor_digest("activation", h_b))."""
    return hash_message(algorithm, TAG_INFERENCE_BOUNDARY, steps_root, digest)


def boundaries_root(algorithm: str, roots: dict[str, bytes], rows: dict[str, TensorRef]) -> bytes:
    """The root a v6 record commits: merkle_root({"%04d" % b: boundary_leaf(...)}) over every
    boundary `1 <= b < nb` (the empty root for one layer block)."""
    leaves = {label: boundary_leaf(algorithm, root, rows[boundary_key(int(label))].digest)
              for label, root in roots.items()}
    return merkle_root(algorithm, leaves)


def boundaries_file(rid: bytes, roots: dict[str, bytes], rows: dict[str, TensorRef]) -> bytes:
    """The bytes of a boundaries file: canonical JSON of {format, record, boundary_roots, tensors}."""
    return canonical_json({"format": BOUNDARIES_FORMAT, "record": rid.hex(),
                           "boundary_roots": {k: v.hex() for k, v in sorted(roots.items())},
                           "tensors": rows_to_json(rows)})


def write_boundaries(records: RecordDir, rid: bytes, roots: dict[str, bytes], rows: dict[str, TensorRef]) -> None:
    records.write_new(records.boundaries_path(rid), boundaries_file(rid, roots, rows))


def read_boundaries(records: RecordDir, rid: bytes, nb: int, committed: bytes, where: str
                    ) -> tuple[dict[str, bytes], dict[str, TensorRef]] | None:
    """The per-boundary roots and rows of record `rid` from its boundaries file, checked against
    the root the record commits; None when the file is absent (not regenerated yet)."""
    path = records.boundaries_path(rid)
    if not path.is_file():
        return None
    doc = jsonio.parse(jsonio.read_bytes(path, MAX_BOUNDARIES_BYTES, "boundaries file"), f"boundaries file {path}")
    if (not isinstance(doc, dict) or set(doc) != {"format", "record", "boundary_roots", "tensors"}
            or doc["format"] != BOUNDARIES_FORMAT):
        raise RecordError(f"{where}: boundaries/{rid.hex()[:16]}….json is not an {BOUNDARIES_FORMAT} file with exactly "
                          "format, record, boundary_roots and tensors")
    if doc["record"] != rid.hex():
        raise RecordError(f"{where}: its boundaries file names record {str(doc['record'])[:16]}…")
    labels = [boundary_label(b) for b in range(1, nb)]
    raw = doc["boundary_roots"]
    if not isinstance(raw, dict) or sorted(raw) != labels:
        raise RecordError(f"{where}: its boundaries file must have exactly the boundaries 0001..{nb - 1:04d}")
    try:
        roots = {k: parse_hex_digest(raw[k], f"boundaries: boundary_roots.{k}") for k in labels}
    except InputError as exc:
        raise RecordError(str(exc)) from None
    rows = rows_from_json(doc["tensors"], "boundaries: tensors")
    if sorted(rows) != [boundary_key(b) for b in range(1, nb)]:
        raise RecordError(f"{where}: its boundaries file must have exactly the rows boundary/0001..{nb - 1:04d}")
    got = boundaries_root(records.algorithm, roots, rows)
    if got != committed:
        raise CommitmentMismatch(f"{where}: its boundaries file hashes to the root {got.hex()[:16]}…, not to the "
                                 f"committed {committed.hex()[:16]}…: the per-boundary commitments were edited")
    return roots, rows


def inline_rows(doc: dict[str, Any], where: str) -> dict[str, tuple[TensorRef, torch.Tensor]]:
    """A v6 causal LM record's `input.ids` and `output.tokens` as the rows input/input_ids
    (I64 [1, P]) and output/tokens (I64 [N]), with their tensors."""
    from .policy import MAX_NEW_TOKENS

    ids = doc["input"].get("ids") if isinstance(doc.get("input"), dict) else None
    tokens = doc["output"].get("tokens") if isinstance(doc.get("output"), dict) else None
    for name, v, most in (("input.ids", ids, MAX_INLINE_IDS), ("output.tokens", tokens, MAX_NEW_TOKENS)):
        if (not isinstance(v, list) or not 1 <= len(v) <= most
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in v)):
            raise RecordError(f"{where}: '{name}' must list 1 to {most} token ids (integers in [0, 2^31))")
    algorithm = doc["hash"]
    out = {}
    for key, name, t in (("input/input_ids", "input_ids", torch.tensor([ids], dtype=torch.int64)),
                         ("output/tokens", "tokens", torch.tensor(tokens, dtype=torch.int64))):
        out[key] = (TensorRef.of(name, t, algorithm), t)
    return out
