"""Step-block manifests: every committed tensor of one step block, and the roots over them.

A manifest lists, for step block s, one subtree per layer block (its state at the start of s:
weights, buffers, optimizer state) and one common subtree (what crosses blocks: batches,
boundary activations and gradients, losses, gradient norms, tied-weight gradient parts). The
step block's Merkle root is a tree over those subtree roots; its chained root binds the index
and the previous chained root (SPEC.md 3.3). Manifests are hostile input: `from_json` checks
every field before anything is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import DTYPES_BY_NAME, TAG_STEP_BLOCK, hash_message, parse_hex_digest, u64
from ..errors import InputError, RecordError
from ..core.merkle import merkle_root
from ..core.store import TensorRef

MANIFEST_FORMAT = "aftune.manifest.v1"
MAX_ENTRIES = 5_000_000
MAX_KEY = 1024
MAX_DIM = 1 << 40
MAX_NDIM = 8


def common_key(step: int, micro: int | None, *rest: str) -> str:
    head = f"step/{step:08d}" if micro is None else f"step/{step:08d}/micro/{micro:04d}"
    return "/".join((head, *rest))


def subtree_label(block: int | None) -> str:
    return "common" if block is None else f"block/{block:04d}"


@dataclass
class StepBlockManifest:
    step_block: int
    first_step: int
    num_steps: int
    common: dict[str, TensorRef]
    blocks: list[dict[str, TensorRef]]

    def subtree_roots(self, algorithm: str) -> dict[str, bytes]:
        roots = {subtree_label(None): _root(algorithm, self.common)}
        for b, entries in enumerate(self.blocks):
            roots[subtree_label(b)] = _root(algorithm, entries)
        return roots

    def merkle_root(self, algorithm: str) -> bytes:
        return merkle_root(algorithm, self.subtree_roots(algorithm))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "step_block": self.step_block,
            "first_step": self.first_step,
            "num_steps": self.num_steps,
            "common": _entries_json(self.common),
            "blocks": [_entries_json(b) for b in self.blocks],
        }

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path, num_blocks: int) -> "StepBlockManifest":
        if not path.is_file():
            raise RecordError(f"manifest {path} is missing: the record is incomplete")
        try:
            obj = jsonio.loads(path.read_bytes())
        except ValueError as exc:
            raise RecordError(f"manifest {path} is not valid JSON ({exc}): truncated or corrupt") from None
        try:
            return cls.from_json(obj, num_blocks)
        except InputError as exc:
            raise RecordError(f"manifest {path}: {exc}") from None

    @classmethod
    def from_json(cls, obj: Any, num_blocks: int) -> "StepBlockManifest":
        if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
            raise InputError(f"not an {MANIFEST_FORMAT} document")
        ints = {}
        for k in ("step_block", "first_step", "num_steps"):
            v = obj.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"'{k}' must be a non-negative integer")
            ints[k] = v
        blocks = obj.get("blocks")
        if not isinstance(blocks, list) or len(blocks) != num_blocks:
            raise InputError(f"'blocks' must list {num_blocks} layer blocks")
        return cls(ints["step_block"], ints["first_step"], ints["num_steps"],
                    _entries_from_json(obj.get("common"), "common"),
                    [_entries_from_json(b, f"block {i}") for i, b in enumerate(blocks)])


def chained_root(algorithm: str, step_block: int, prev: bytes, merkle: bytes) -> bytes:
    return hash_message(algorithm, TAG_STEP_BLOCK, u64(step_block), prev, merkle)


def _root(algorithm: str, entries: dict[str, TensorRef]) -> bytes:
    return merkle_root(algorithm, {k: r.digest for k, r in entries.items()})


def _entries_json(entries: dict[str, TensorRef]) -> list[list[Any]]:
    return [[k, r.name, r.dtype, list(r.shape), r.digest.hex()] for k, r in sorted(entries.items())]


def _entries_from_json(rows: Any, where: str) -> dict[str, TensorRef]:
    if not isinstance(rows, list) or len(rows) > MAX_ENTRIES:
        raise InputError(f"{where}: entries must be a list")
    out: dict[str, TensorRef] = {}
    for row in rows:
        if not isinstance(row, list) or len(row) != 5:
            raise InputError(f"{where}: each entry is [key, name, dtype, shape, digest]")
        key, name, dtype, shape, digest = row
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY or not isinstance(name, str) or len(name) > MAX_KEY:
            raise InputError(f"{where}: bad key or name {str(key)[:80]!r}")
        if key in out:
            raise InputError(f"{where}: duplicate key {key!r}")
        try:
            key.encode("utf-8"), name.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{where}: key or name is not valid Unicode text") from None
        if dtype not in DTYPES_BY_NAME:
            raise InputError(f"{where}: {key}: unknown dtype {str(dtype)[:20]!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)):
            raise InputError(f"{where}: {key}: bad shape")
        out[key] = TensorRef(name, dtype, tuple(shape), parse_hex_digest(digest, f"{where}: {key}"))
    return out
