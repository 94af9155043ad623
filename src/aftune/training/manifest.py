"""Step-block manifests: every committed tensor of one step block, and the roots over them.

A manifest lists, for step block s, one subtree per layer block (its state at the start of s:
weights, buffers, optimizer state) and one common subtree (what crosses blocks: batches,
boundary activations and gradients, losses, gradient norms). The step block's Merkle root is a
tree over those subtree roots; its chained root binds the index and the previous chained root
(SPEC.md 3.3). Manifests are hostile input: `from_json` checks every field before anything is
used. Writers write `aftune.manifest.v2`, which commits no tied-weight gradient parts (5.2.4);
readers also accept v1, whose `shared/...` rows a replay compares as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import TAG_STEP_BLOCK, hash_message, u64
from ..core.merkle import merkle_root
from ..core.rows import TensorRef, rows_from_json, rows_to_json
from ..errors import AftuneError, InputError, RecordError

MANIFEST_FORMAT = "aftune.manifest.v2"
MANIFEST_FORMATS = ("aftune.manifest.v1", MANIFEST_FORMAT)  # v1: per-micro-batch tied-weight parts committed
MAX_MANIFEST_BYTES = 1 << 30


def common_key(step: int, micro: int | None, *rest: str) -> str:
    head = f"step/{step:08d}" if micro is None else f"step/{step:08d}/micro/{micro:04d}"
    return "/".join((head, *rest))


def is_boundary(key: str) -> bool:
    """Whether a common entry is a boundary activation or gradient (SPEC.md 3.3)."""
    return "/boundary/" in key


def is_step_gradient(key: str) -> bool:
    """Whether a common entry is a rank's local or the reduced gradient of a step (several
    processes, SPEC.md 5.5): committed by digest only, a verifier recomputes them."""
    head, _, rest = key.partition("/rank/")
    return (bool(rest) and rest.partition("/")[2].startswith("gradient/")) or \
        (key.startswith("step/") and key.split("/", 3)[2:3] == ["gradient"])


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
            "common": rows_to_json(self.common),
            "blocks": [rows_to_json(b) for b in self.blocks],
        }

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path, num_blocks: int) -> "StepBlockManifest":
        if not path.is_file():
            raise RecordError(f"manifest {path} is missing: the record is incomplete")
        where = f"manifest {path}"
        return cls.from_json(jsonio.read_json(path, MAX_MANIFEST_BYTES, "manifest"), num_blocks, where, RecordError)

    @classmethod
    def from_json(cls, obj: Any, num_blocks: int, where: str = "manifest",
                  error: type[AftuneError] = InputError) -> "StepBlockManifest":
        """Parse a manifest from hostile JSON; `error` names `where` and the bad field."""
        if not isinstance(obj, dict) or obj.get("format") not in MANIFEST_FORMATS:
            raise error(f"{where}: not an {' or '.join(MANIFEST_FORMATS)} document")
        ints = {}
        for k in ("step_block", "first_step", "num_steps"):
            v = obj.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise error(f"{where}: '{k}' must be a non-negative integer")
            ints[k] = v
        blocks = obj.get("blocks")
        if not isinstance(blocks, list) or len(blocks) != num_blocks:
            raise error(f"{where}: 'blocks' must list {num_blocks} layer blocks")
        return cls(ints["step_block"], ints["first_step"], ints["num_steps"],
                    rows_from_json(obj.get("common"), f"{where}: common", error),
                    [rows_from_json(b, f"{where}: block {i}", error) for i, b in enumerate(blocks)])


def chained_root(algorithm: str, step_block: int, prev: bytes, merkle: bytes) -> bytes:
    return hash_message(algorithm, TAG_STEP_BLOCK, u64(step_block), prev, merkle)


def _root(algorithm: str, entries: dict[str, TensorRef]) -> bytes:
    return merkle_root(algorithm, {k: r.digest for k, r in entries.items()})
