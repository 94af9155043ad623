"""Openings: the bundle a provider builds for a challenge, and reading one as hostile input.

A bundle holds exactly what replaying the challenged blocks reads, and nothing a verifier could
not check: the run config (its digest is signed), the tokenizer and base-weight digests (both
committed in the config), the examples of the challenged steps with inclusion proofs against the
dataset root, and, per step block touched, the subtree roots, the full entry list of each
challenged block's subtree, the other entries read with inclusion proofs, and the tensors read.
What the replay reads is found by running the verifier's own replay on the provider's record and
tracing its reads, so opening and verifying cannot drift apart (SPEC.md 9).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..training.settings import TrainSettings
from ..data.datasets import Dataset, example_from_raw
from ..core.encoding import TAG_EXAMPLE, hash_message, parse_hex_digest
from ..errors import CommitmentMismatch, InputError, RecordError
from ..training.manifest import MAX_ENTRIES, _entries_from_json, _entries_json, subtree_label
from ..core.merkle import InclusionProof, merkle_root, prove, root_from_proof
from ..training.run import MAX_CONFIG_BYTES, RunRecord, config_digest, read_base_digests
from ..core.store import ObjectStore, TensorRef
from ..training.transcript import Transcript

BUNDLE_FORMAT = "aftune.bundle.v1"
MAX_BUNDLE_JSON = 256 << 20


# --- tracing the provider's replay ------------------------------------------------------------

class _TracedEntries(dict):
    """A manifest subtree that notes every key the replay looks up."""

    def __init__(self, entries, log: set[str]):
        super().__init__(entries)
        self._log = log

    def get(self, key, default=None):
        self._log.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._log.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._log.add(key)
        return super().__contains__(key)


class _TracedStore(ObjectStore):
    def __init__(self, inner: ObjectStore, log: set[bytes]):
        super().__init__(inner.root, inner.algorithm, inner.level)
        self._log = log

    def get(self, ref: TensorRef, where: str):
        self._log.add(ref.digest)
        return super().get(ref, where)


class TracingRecord(RunRecord):
    """The provider's run, opened so that every manifest entry and object read is noted."""

    @classmethod
    def wrap(cls, record: RunRecord) -> "TracingRecord":
        t = cls(record.root, record.config, record.settings, record.transcript, record.store)
        t.reads: dict[tuple[int, str], set[str]] = {}
        t.objects: set[bytes] = set()
        t.store = _TracedStore(record.store, t.objects)
        t.manifests = {}
        return t

    def manifest(self, step_block: int):
        m = super().manifest(step_block)
        self.manifests[step_block] = m
        log = lambda label: self.reads.setdefault((step_block, label), set())  # noqa: E731
        m.common = _TracedEntries(m.common, log(subtree_label(None)))
        m.blocks = [_TracedEntries(b, log(subtree_label(i))) for i, b in enumerate(m.blocks)]
        return m


# --- writing -------------------------------------------------------------------------------------

def open_bundle(run_dir: str | Path, blocks: list[tuple[int, int]], challenge_digest: bytes, out: str | Path,
                progress=None) -> dict[str, Any]:
    """The provider's side: replay each challenged (layer block, step block) on its own record
    (regenerating checkpoints where needed), trace what the replay reads, and write the bundle.
    Returns a summary {blocks, tensors, bytes, provider_verdicts}."""
    from ..training.regenerate import prepare
    from ..training.verify import Verifier

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty: bundles are never overwritten")
    key = Transcript.header_key(run_dir / "transcript.jsonl")
    base = RunRecord.open(run_dir, key)
    ns, nb = base.num_step_blocks, base.num_blocks
    for l, s in blocks:
        if not (0 <= l < nb and 0 <= s < ns):
            raise InputError(f"challenged block (layer block {l}, step block {s}) is outside this run's {nb} x {ns} grid")
    record = TracingRecord.wrap(base)
    verifier = Verifier(None, None, record=record)
    verdicts = {}
    for i, (l, s) in enumerate(blocks):
        for target in (s, s + 1):
            if target < ns and not _stored(record, l, target):
                prepare(run_dir, key, l, target, verifier=Verifier(run_dir, key))
        result, _ = verifier.verify_block(l, s)
        verdicts[f"{l},{s}"] = result.verdict
        if progress:
            progress(i + 1, len(blocks))

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    (out / "base_model.json").write_bytes((run_dir / "base_model.json").read_bytes())
    if (run_dir / "tokenizer").is_dir():
        shutil.copytree(run_dir / "tokenizer", out / "tokenizer")
    challenged = {(l, s) for l, s in blocks} | {(l, s + 1) for l, s in blocks}
    step_blocks = []
    for s in sorted(record.manifests):
        m = base.manifest(s)  # untraced copy
        subtrees = {subtree_label(None): m.common, **{subtree_label(b): e for b, e in enumerate(m.blocks)}}
        roots = m.subtree_roots(base.algorithm)
        full, partial = {}, {}
        for label, entries in subtrees.items():
            is_challenged = any(label == subtree_label(l) and (l, s) in challenged for l in range(nb))
            if is_challenged:
                full[label] = _entries_json(entries)
                continue
            read = sorted(k for k in record.reads.get((s, label), set()) if k in entries)
            if read:
                digests = {k: r.digest for k, r in entries.items()}
                rows = []
                for k in read:
                    p = prove(base.algorithm, digests, k)
                    rows.append([_entries_json({k: entries[k]})[0], p.index, p.size, [x.hex() for x in p.siblings]])
                partial[label] = rows
        step_blocks.append({"step_block": s, "first_step": m.first_step, "num_steps": m.num_steps,
                            "subtree_roots": {k: v.hex() for k, v in roots.items()}, "full": full, "partial": partial})

    # tensors: everything the replay loaded, and every stored tensor of the opened entries
    opened = set(record.objects)
    for sb in step_blocks:
        for rows in sb["full"].values():
            opened.update(bytes.fromhex(r[4]) for r in rows if _has(base, r[4]))
        for rows in sb["partial"].values():
            opened.update(bytes.fromhex(r[0][4]) for r in rows if _has(base, r[0][4]))
    nbytes = 0
    for d in sorted(opened):
        src = base.store.path(d)
        dst = ObjectStore(out / "objects", base.algorithm).path(d)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        nbytes += dst.stat().st_size

    # examples of every challenged step, with proofs against the dataset root
    dataset = base.dataset()
    digests = dataset.example_digests(base.algorithm)
    needed = sorted({i for s in {s for _, s in blocks} for i in verifier_indices(verifier, s)})
    (out / "examples").mkdir()
    examples = {}
    for i in needed:
        key_i = f"{i:012d}"
        (out / "examples" / f"{key_i}.bin").write_bytes(dataset.examples[i].raw)
        p = prove(base.algorithm, digests, key_i)
        examples[key_i] = [p.index, p.size, [x.hex() for x in p.siblings]]

    doc = {"format": BUNDLE_FORMAT, "challenge_digest": challenge_digest.hex(),
           "blocks": [[l, s] for l, s in blocks], "step_blocks": step_blocks, "examples": examples}
    (out / "bundle.json").write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    return {"blocks": len(blocks), "tensors": len(opened), "bytes": nbytes, "provider_verdicts": verdicts}


def verifier_indices(verifier, step_block: int) -> list[int]:
    out = []
    for step in verifier.settings.steps_of(step_block):
        for m in range(verifier.settings.grad_accum):
            out += verifier.order.indices(step * verifier.settings.grad_accum + m, verifier.settings.batch_size)
    return out


def _stored(record: RunRecord, layer_block: int, step_block: int) -> bool:
    m = RunRecord.manifest(record, step_block)
    return all(record.store.has(r.digest) for r in m.blocks[layer_block].values())


def _has(record: RunRecord, digest_hex: str) -> bool:
    return record.store.has(bytes.fromhex(digest_hex))


# --- reading ---------------------------------------------------------------------------------------

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


class _BundleStore(ObjectStore):
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


class BundleRecord(RunRecord):
    """An audit bundle, opened against the client's own transcript and challenge. Offers the
    interface of RunRecord, so the same Verifier replays it."""

    @classmethod
    def load(cls, bundle_dir: str | Path, transcript: Transcript, challenge_digest: bytes,
             blocks: list[tuple[int, int]]) -> "BundleRecord":
        root = Path(bundle_dir)
        if not (root / "bundle.json").is_file():
            raise InputError(f"{root} is not an audit bundle: it has no bundle.json")
        data = jsonio.read_capped(root / "bundle.json", MAX_BUNDLE_JSON)
        if len(data) > MAX_BUNDLE_JSON:
            raise RecordError("bundle.json is too large")
        try:
            doc = jsonio.loads(data)
        except ValueError as exc:
            raise RecordError(f"bundle.json is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
            raise RecordError(f"bundle.json is not an {BUNDLE_FORMAT} document")
        if doc.get("challenge_digest") != challenge_digest.hex():
            raise CommitmentMismatch("this bundle answers another challenge")
        if doc.get("blocks") != [[l, s] for l, s in blocks]:
            raise CommitmentMismatch("the bundle opens other blocks than the challenge asks for")
        config_bytes = (root / "config.json").read_bytes() if (root / "config.json").is_file() else b""
        if not config_bytes or len(config_bytes) > MAX_CONFIG_BYTES:
            raise RecordError("the bundle has no usable config.json")
        if config_digest(transcript.algorithm, config_bytes) != transcript.config_digest:
            raise CommitmentMismatch("the bundle's config.json is not the run config signed in the transcript")
        try:
            config = jsonio.loads(config_bytes)
        except ValueError:
            raise RecordError("the bundle's config.json is not valid JSON") from None
        if not isinstance(config, dict):
            raise RecordError("the bundle's config.json must hold an object")
        settings = TrainSettings.from_json(config.get("settings"))
        rec = cls(root, config, settings, transcript, _BundleStore(root / "objects", transcript.algorithm))
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
                try:
                    entries = _entries_from_json(entry_rows, f"step block {s} {label}")
                except InputError as exc:
                    raise RecordError(str(exc)) from None
                if merkle_root(self.algorithm, {k: r.digest for k, r in entries.items()}) != roots[label]:
                    raise CommitmentMismatch(f"step block {s}: the opened {label} does not match its subtree root")
                opened[label] = entries
            for label, proof_rows in partial.items():
                if label not in roots or label in full or not isinstance(proof_rows, list) or len(proof_rows) > MAX_ENTRIES:
                    raise RecordError(f"bundle.json: step block {s}: bad partial subtree {label!r}")
                for row in proof_rows:
                    try:
                        entry, index, size, siblings = row
                        ref = _entries_from_json([entry], f"step block {s} {label}")
                        (key, tref), = ref.items()
                        proof = InclusionProof(key, int(index), int(size),
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

    def dataset(self) -> Dataset:
        data = self.section("data")
        root = parse_hex_digest(data.get("root"), "run config: data.root")
        kind, labels = data.get("kind"), data.get("labels")
        if kind not in ("text", "labeled_text", "image_folder") or not isinstance(labels, list):
            raise RecordError("run config: data.kind or data.labels is malformed")
        examples = _Examples()
        rows = self.doc.get("examples")
        if not isinstance(rows, dict):
            raise RecordError("bundle.json: 'examples' must be an object")
        for key, proof in rows.items():
            try:
                index = int(key)
                if key != f"{index:012d}" or not 0 <= index < self.num_examples:
                    raise ValueError(key)
                raw = (self.root / "examples" / f"{key}.bin").read_bytes()
                p = InclusionProof(key, int(proof[0]), int(proof[1]), tuple(parse_hex_digest(x, "proof") for x in proof[2]))
            except (OSError, ValueError, TypeError, IndexError, InputError) as exc:
                raise CommitmentMismatch(f"the bundle's example {key[:20]!r} is malformed or missing ({exc})") from None
            if p.size != self.num_examples or root_from_proof(self.algorithm, p, hash_message(self.algorithm, TAG_EXAMPLE, raw)) != root:
                raise CommitmentMismatch(f"bundle: example {index} is not the agreed dataset's example {index}")
            examples[index] = example_from_raw(kind, raw)
        return Dataset(kind, examples, tuple(str(x) for x in labels), ())

    def base_digests(self) -> dict[str, bytes]:
        path = self.root / "base_model.json"
        return read_base_digests(path.read_bytes() if path.is_file() else None,
                                 self.section("model").get("base_weights"), self.algorithm)
