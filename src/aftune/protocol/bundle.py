"""Reading bundles (SPEC.md 9.6, 9.7a) as hostile input, against the client's own transcript and
challenge: a training bundle offers RunRecord's interface, so the same verifier replays it; an
inference bundle is an inference record directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import TAG_EXAMPLE, hash_message, parse_hex_digest
from ..core.merkle import InclusionProof, merkle_root, root_from_proof
from ..core.rows import MAX_ROWS, TensorRef, row_from_json, rows_from_json
from ..core.store import ObjectStore
from ..data import Dataset, example_from_raw
from ..errors import CommitmentMismatch, InputError, RecordError
from ..training.manifest import subtree_label
from ..training.run import RunRecord, committed_settings, read_base_digests, signed_run_config
from ..training.transcript import Transcript

BUNDLE_FORMAT = "aftune.bundle.v1"
INFERENCE_BUNDLE_FORMAT = "aftune.inference-bundle.v1"
MAX_BUNDLE_JSON = 256 << 20


@dataclass
class PartialManifest:
    step_block: int
    first_step: int
    num_steps: int
    common: dict[str, TensorRef]
    blocks: list[dict[str, TensorRef]]
    roots: dict[str, bytes]

    def merkle_root(self, algorithm: str) -> bytes:
        return merkle_root(algorithm, self.roots)


class _Examples(dict):
    def __missing__(self, index):
        raise CommitmentMismatch(f"the bundle does not open example {index}, which a challenged step uses")


class BundleStore(ObjectStore):
    """A bundle's tensors: one that is missing or unreadable is a failed opening (FAIL)."""

    def get(self, ref: TensorRef, where: str):
        if not self.has(ref.digest):
            raise CommitmentMismatch(f"{where}: the bundle does not include tensor {ref.name!r} "
                                     f"({ref.digest.hex()[:16]}…), which the replay needs")
        try:
            return super().get(ref, where)
        except CommitmentMismatch:
            raise
        except RecordError as exc:
            raise CommitmentMismatch(f"the bundle's copy is unusable: {exc}") from None


class TrainingBundle(RunRecord):
    """An audit bundle, opened against the client's own transcript and challenge. Offers the
    interface of RunRecord, so the same Verifier replays it."""

    @classmethod
    def load(cls, bundle_dir: str | Path, transcript: Transcript, challenge_digest: bytes,
             blocks: list[tuple[int, int]]) -> "TrainingBundle":
        root = Path(bundle_dir)
        if not (root / "bundle.json").is_file():
            raise InputError(f"{root} is not an audit bundle: it has no bundle.json")
        doc = jsonio.read_json(root / "bundle.json", MAX_BUNDLE_JSON, "bundle")
        if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
            raise RecordError(f"bundle.json is not an {BUNDLE_FORMAT} document")
        if doc.get("challenge_digest") != challenge_digest.hex():
            raise CommitmentMismatch("this bundle answers another challenge")
        if doc.get("blocks") != [[l, s] for l, s in blocks]:
            raise CommitmentMismatch("the bundle opens other blocks than the challenge asks for")
        config = signed_run_config(root / "config.json", transcript, "the bundle's run config")
        settings, problem = committed_settings(config, transcript)
        rec = cls(root, config, settings, transcript, BundleStore(root / "objects", transcript.algorithm), problem)
        rec.doc = doc
        rec._manifests = rec._parse_step_blocks(doc.get("step_blocks"))
        return rec

    def _parse_step_blocks(self, rows: Any) -> dict[int, PartialManifest]:
        if not isinstance(rows, list) or len(rows) > 1_000_000:
            raise RecordError("bundle.json: 'step_blocks' must be a list")
        out = {}
        nb = self.num_blocks
        labels = [subtree_label(None)] + [subtree_label(b) for b in range(nb)]
        for sb in rows:
            if not isinstance(sb, dict):
                raise RecordError("bundle.json: each step block must be an object")
            s = sb.get("step_block")
            if isinstance(s, bool) or not isinstance(s, int) or s < 0 or s in out:
                raise RecordError("bundle.json: bad or repeated step block index")
            try:
                roots = {k: parse_hex_digest(v, f"step block {s} root {k}") for k, v in dict(sb["subtree_roots"]).items()}
            except (KeyError, TypeError, ValueError, InputError) as exc:
                raise RecordError(f"bundle.json: step block {s}: bad subtree roots ({exc})") from None
            if sorted(roots) != sorted(labels):
                raise RecordError(f"bundle.json: step block {s} must give the root of every subtree")
            opened: dict[str, dict[str, TensorRef]] = {label: {} for label in labels}
            full, partial = sb.get("full", {}), sb.get("partial", {})
            if not isinstance(full, dict) or not isinstance(partial, dict):
                raise RecordError(f"bundle.json: step block {s}: 'full' and 'partial' must be objects")
            for label, entry_rows in full.items():
                if label not in roots:
                    raise RecordError(f"bundle.json: step block {s}: unknown subtree {label!r}")
                entries = rows_from_json(entry_rows, f"bundle.json: step block {s} {label}")
                if merkle_root(self.algorithm, {k: r.digest for k, r in entries.items()}) != roots[label]:
                    raise CommitmentMismatch(f"step block {s}: the opened {label} does not match its subtree root")
                opened[label] = entries
            for label, proof_rows in partial.items():
                if label not in roots or label in full or not isinstance(proof_rows, list) or len(proof_rows) > MAX_ROWS:
                    raise RecordError(f"bundle.json: step block {s}: bad partial subtree {label!r}")
                for row in proof_rows:
                    try:
                        entry, index, size, siblings = row
                        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (index, size)):
                            raise TypeError("a proof's index and size must be integers")
                        key, tref = row_from_json(entry, f"step block {s} {label}", InputError)
                        proof = InclusionProof(key, index, size,
                                               tuple(parse_hex_digest(x, "proof") for x in siblings))
                    except (ValueError, TypeError, InputError) as exc:
                        raise RecordError(f"bundle.json: step block {s} {label}: malformed opening ({exc})") from None
                    try:
                        implied = root_from_proof(self.algorithm, proof, tref.digest)
                    except InputError as exc:
                        raise CommitmentMismatch(f"step block {s} {label} {key}: {exc}") from None
                    if implied != roots[label]:
                        raise CommitmentMismatch(f"step block {s}: {key} is not in the committed {label} subtree")
                    opened[label][key] = tref
            first, num = sb.get("first_step"), sb.get("num_steps")
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (first, num)):
                raise RecordError(f"bundle.json: step block {s}: bad step range")
            out[s] = PartialManifest(s, first, num, opened[subtree_label(None)],
                                     [opened[subtree_label(b)] for b in range(nb)], roots)
        return out

    def manifest(self, step_block: int):
        entries = self.transcript.step_blocks
        if step_block >= len(entries):
            raise CommitmentMismatch(f"step block {step_block} has no signed root in the transcript")
        m = self._manifests.get(step_block)
        if m is None:
            raise CommitmentMismatch(f"the bundle does not open step block {step_block}, which the replay needs")
        e = entries[step_block]
        if (m.first_step, m.num_steps) != (e.first_step, e.num_steps) or m.merkle_root(self.algorithm) != e.merkle_root:
            raise CommitmentMismatch(f"the bundle's step block {step_block} does not match the root signed for it")
        return m

    def dataset(self, kind: str, root: bytes, labels: tuple[str, ...], num_examples: int) -> Dataset:
        """The opened examples, each proven against the agreed dataset `root` of `num_examples`."""
        examples = _Examples()
        rows = self.doc.get("examples")
        if not isinstance(rows, dict):
            raise RecordError("bundle.json: 'examples' must be an object")
        for key, proof in rows.items():
            try:
                index = int(key)
                if key != f"{index:012d}" or not 0 <= index < num_examples:
                    raise ValueError(key)
                raw = (self.root / "examples" / f"{key}.bin").read_bytes()
                p = InclusionProof(key, int(proof[0]), int(proof[1]), tuple(parse_hex_digest(x, "proof") for x in proof[2]))
            except (OSError, ValueError, TypeError, IndexError, InputError) as exc:
                raise CommitmentMismatch(f"the bundle's example {key[:20]!r} is malformed or missing ({exc})") from None
            if p.size != num_examples or root_from_proof(self.algorithm, p, hash_message(self.algorithm, TAG_EXAMPLE, raw)) != root:
                raise CommitmentMismatch(f"bundle: example {index} is not the agreed dataset's example {index}")
            examples[index] = example_from_raw(kind, raw)
        return Dataset(kind, examples, tuple(str(x) for x in labels), ())

    def base_digests(self) -> dict[str, bytes]:
        return read_base_digests(self.root / "base_model.json", self.section("model").get("base_weights"), self.algorithm)
