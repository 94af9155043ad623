"""Step-block manifests: every committed tensor of one step block, and the roots over them.

A manifest lists, for step block s, one subtree per layer block (its state at the start of s:
weights, buffers, optimizer state) and one common subtree (what crosses blocks: batches,
boundary activations and gradients, losses, gradient norms). The step block's Merkle root is a
tree over those subtree roots; its chained root binds the index and the previous chained root
(SPEC.md 3.3). Manifests are hostile input: `from_json` checks every field before anything is
used. Writers write `aftune.manifest.v3`: the rows of v2 in one zstd frame
(`manifests/NNNNNN.json.zst`, 3.3.1), a quarter of the bytes or less (a step block's state
rows are most of what a digest-only run stores per step). Readers also accept v2 (`NNNNNN.json`, the same rows as
plain JSON) and v1, whose `shared/...` rows a replay compares as well. v2 and v3 commit no
tied-weight gradient parts (5.2.4).

    m = read_manifest(run / "manifests", 3, num_blocks)   # whichever file holds step block 3
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from ..core import jsonio
from ..core.encoding import TAG_STEP_BLOCK, hash_message, u64
from ..core.merkle import merkle_root
from ..core.rows import TensorRef, rows_from_json, rows_to_json
from ..core.store import read_frame
from ..errors import AftuneError, InputError, RecordError

MANIFEST_FORMAT = "aftune.manifest.v3"  # what writers write: the v2 document in one zstd frame
JSON_FORMATS = ("aftune.manifest.v1", "aftune.manifest.v2")  # plain JSON files (v1: tied-weight parts)
MANIFEST_FORMATS = (*JSON_FORMATS, MANIFEST_FORMAT)
MAX_MANIFEST_BYTES = 1 << 30
COMPRESSED_SUFFIX = ".json.zst"  # v3
JSON_SUFFIX = ".json"  # v1 and v2
MANIFEST_LEVEL = 19  # zstd level of a v3 manifest (not normative): the file is written once per step block


def manifest_paths(manifests_dir: Path, step_block: int) -> tuple[Path, Path]:
    """The v3 and the v1/v2 file names of `step_block`'s manifest."""
    stem = f"{step_block:06d}"
    return manifests_dir / (stem + COMPRESSED_SUFFIX), manifests_dir / (stem + JSON_SUFFIX)


def manifest_path(manifests_dir: Path, step_block: int) -> Path:
    """The file that holds `step_block`'s manifest (the v3 name when there is none)."""
    zst, plain = manifest_paths(manifests_dir, step_block)
    return plain if plain.exists() and not zst.exists() else zst


def read_manifest(manifests_dir: Path, step_block: int, num_blocks: int) -> "StepBlockManifest":
    """Step block `step_block`'s manifest, v3 or older (SPEC.md 3.3.1); a record error when it is
    missing, written twice (both names) or malformed."""
    zst, plain = manifest_paths(manifests_dir, step_block)
    if zst.exists() and plain.exists():
        raise RecordError(f"manifests/{plain.name} and {zst.name} both exist: a step block has one manifest "
                          "(remove the one the run did not write)")
    return StepBlockManifest.read(plain if plain.exists() else zst, num_blocks)


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

    def to_json(self, format: str = MANIFEST_FORMAT) -> dict[str, Any]:
        return {
            "format": format,
            "step_block": self.step_block,
            "first_step": self.first_step,
            "num_steps": self.num_steps,
            "common": rows_to_json(self.common),
            "blocks": [rows_to_json(b) for b in self.blocks],
        }

    def encode(self) -> bytes:
        """The bytes of `manifests/NNNNNN.json.zst` (v3): the JSON document in one zstd frame that
        declares its content size."""
        text = json.dumps(self.to_json(), separators=(",", ":")).encode("utf-8")
        return zstandard.ZstdCompressor(level=MANIFEST_LEVEL, write_content_size=True).compress(text)

    def write(self, manifests_dir: Path) -> Path:
        """Write this manifest as v3 into `manifests_dir` (atomically: a temporary file renamed),
        replacing an unsigned one of the same step block (v2, from a run resumed by this version);
        returns its path."""
        path, plain = manifest_paths(manifests_dir, self.step_block)
        plain.unlink(missing_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_bytes(self.encode())
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: Path, num_blocks: int) -> "StepBlockManifest":
        """One manifest file: `.json.zst` must hold v3, `.json` v1 or v2."""
        if not path.is_file():
            raise RecordError(f"manifest {path} is missing: the record is incomplete")
        where = f"manifest {path}"
        if path.name.endswith(COMPRESSED_SUFFIX):
            data = read_frame(jsonio.read_bytes(path, MAX_MANIFEST_BYTES, "manifest"), MAX_MANIFEST_BYTES, where)
            formats: tuple[str, ...] = (MANIFEST_FORMAT,)
        else:
            data = jsonio.read_bytes(path, MAX_MANIFEST_BYTES, "manifest")
            formats = JSON_FORMATS
        return cls.from_json(jsonio.parse(data, where), num_blocks, where, RecordError, formats)

    @classmethod
    def from_json(cls, obj: Any, num_blocks: int, where: str = "manifest",
                  error: type[AftuneError] = InputError,
                  formats: tuple[str, ...] = MANIFEST_FORMATS) -> "StepBlockManifest":
        """Parse a manifest from hostile JSON; `error` names `where` and the bad field."""
        if not isinstance(obj, dict) or obj.get("format") not in formats:
            raise error(f"{where}: not an {' or '.join(formats)} document")
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
