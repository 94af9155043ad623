"""Openings: what a provider hands over for a challenge (SPEC.md 9.6, 9.7a).

    aftune open RUN --challenge challenge.json --out bundle/
    aftune open RECORDS --challenge challenge.json --out bundle/ --model runs/demo

A training bundle holds exactly what replaying the challenged blocks reads, and nothing a
verifier could not check: the run config (its digest is signed), the tokenizer and base-weight
digests (both committed in the config), the examples of the challenged steps with inclusion
proofs against the dataset root, and, per step block touched, the subtree roots, the full entry
list of each challenged block's subtree, the other entries read with inclusion proofs, and the
tensors read. What the replay reads is found by running the verifier's own replay on the
provider's record and tracing its reads, so opening and verifying cannot drift apart. An
inference bundle is the record, its receipt, its tokenizer and the tensors its replay loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..core.merkle import prove
from ..core.rows import TensorRef, rows_to_json
from ..core.store import ObjectStore
from ..errors import InputError
from ..training.manifest import subtree_label
from ..training.run import RunRecord
from ..training.transcript import Transcript
from .bundle import BUNDLE_FORMAT, INFERENCE_BUNDLE_FORMAT


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


class TracingRun(RunRecord):
    """The provider's run, opened so that every manifest entry and object read is noted."""

    @classmethod
    def wrap(cls, record: RunRecord) -> "TracingRun":
        t = cls(record.root, record.config, record.committed, record.transcript, record.store, record.settings_problem)
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
    record = TracingRun.wrap(base)
    # the provider replays its own record to trace what the replay reads: its own config is the
    # reference here (the client checks the opening against its agreement)
    verifier = Verifier(None, None, unsafe_no_agreement=True, record=record)
    verdicts = {}
    for i, (l, s) in enumerate(blocks):
        for target in (s, s + 1):
            if target < ns and not _stored(record, l, target):
                prepare(run_dir, key, l, target, verifier=Verifier(run_dir, key, unsafe_no_agreement=True))
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
                full[label] = rows_to_json(entries)
                continue
            read = sorted(k for k in record.reads.get((s, label), set()) if k in entries)
            if read:
                digests = {k: r.digest for k, r in entries.items()}
                rows = []
                for k in read:
                    p = prove(base.algorithm, digests, k)
                    rows.append([entries[k].to_row(k), p.index, p.size, [x.hex() for x in p.siblings]])
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
    dataset = verifier.dataset
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


# --- inference records ---------------------------------------------------------------------------

def open_inference_bundle(records_dir: str | Path, challenge, out: str | Path, model: str | Path | None = None) -> dict:
    """The provider's opening of the challenged layer blocks of one record. Returns a summary."""
    from ..inference.verify import InferenceVerifier

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty: bundles are never overwritten")
    if challenge.kind != "inference":
        raise InputError(f"this is a {challenge.kind} challenge, not an inference one")
    layer_blocks = [l for l, _ in challenge.blocks]
    v = InferenceVerifier(records_dir, challenge.run_root, model=model)
    rec = v.record
    loaded: set[bytes] = set()
    rec.records.store = _TracedStore(rec.records.store, loaded)
    verdicts = {}
    for l in layer_blocks:
        result, _ = v.verify_block(l)
        verdicts[l] = result.verdict
    # the record-level checks (input re-tokenised, output) read the input and output tensors
    loaded |= {ref.digest for key, ref in rec.rows.items() if key.startswith(("input/", "output/"))}
    root = rec.records.root
    rid = rec.record_id
    for src in (rec.records.record_path(rid), rec.records.receipt_path(rid)):
        if src.is_file():
            dst = out / src.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    tok = rec.tokenizer_dir()
    if tok is not None and tok.is_dir():
        shutil.copytree(tok, out / tok.relative_to(root))
    nbytes = 0
    for d in sorted(loaded):
        src = rec.records.store.path(d)
        if src.is_file():
            dst = out / src.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            nbytes += dst.stat().st_size
    (out / "bundle.json").write_text(json.dumps({"format": INFERENCE_BUNDLE_FORMAT, "challenge_digest": challenge.digest,
                                                 "blocks": [[l, 0] for l in layer_blocks]}), encoding="utf-8")
    return {"blocks": len(layer_blocks), "tensors": len(loaded), "bytes": nbytes, "provider_verdicts": verdicts}
