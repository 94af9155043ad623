"""`aftune check` for every kind of record: a run directory, an inference record directory, an
audit bundle (SPEC.md 6.9). Static: nothing is replayed, every file is hashed once.

    aftune check records --public-key runs/demo/provider.key.pub
    aftune check bundle --public-key provider.pub --transcript transcript.jsonl

    report = check_path(path, public_key)   # a CheckReport (training/check.py); exit_code 0 or 1

`check_path` tells the kind of record from its files; the run check is `training.check.check_run`,
which this module reuses for the object store, the transcript and the report.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core import jsonio
from ..core.encoding import HASH_ALGORITHMS
from ..core.signing import PublicKey
from ..core.store import ObjectStore
from ..errors import AftuneError, InputError, RecordError
from ..inference.receipt import Receipt, verify_receipt
from ..inference.record import InferenceRecord, RecordDir, boundary_key
from ..training.check import (DAMAGED, MISSING, UNREFERENCED, CheckReport, CommittedRows, Progress, check_objects,
                              check_run, load_transcript)
from .bundle import BUNDLE_FORMAT, INFERENCE_BUNDLE_FORMAT, MAX_BUNDLE_JSON, TrainingBundle

NOT_A_RECORD = ("is not a run directory (transcript.jsonl, config.json), an inference record directory (records/) "
                "or an audit bundle (bundle.json)")


def check_path(path: str | Path, public_key: PublicKey, *, transcript: str | Path | None = None,
               progress: Progress | None = None) -> CheckReport:
    """Check whatever record lies at `path`; InputError when it is none (exit 2)."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root} does not exist or is not a directory")
    if (root / "bundle.json").exists():
        try:
            doc = jsonio.read_json(root / "bundle.json", MAX_BUNDLE_JSON, "bundle")
        except RecordError as exc:
            return _unusable_bundle(root, str(exc))
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt == INFERENCE_BUNDLE_FORMAT:
            return check_records(root, public_key, progress=progress, kind="inference bundle")
        if fmt == BUNDLE_FORMAT:
            return check_bundle(root, public_key, doc, transcript=transcript, progress=progress)
        return _unusable_bundle(root, f"not an {BUNDLE_FORMAT} or {INFERENCE_BUNDLE_FORMAT} document")
    if (root / "records").is_dir():
        return check_records(root, public_key, progress=progress)
    if any((root / name).exists() for name in ("transcript.jsonl", "config.json", "manifests")):
        return check_run(root, public_key, transcript=transcript, progress=progress)
    raise InputError(f"{root} {NOT_A_RECORD}")


def _unusable_bundle(root: Path, why: str) -> CheckReport:
    report = CheckReport(str(root), "bundle")
    report.add(root / "bundle.json", DAMAGED, why)
    return report


# --- inference records --------------------------------------------------------------------------

def check_records(record_dir: str | Path, public_key: PublicKey, *, progress: Progress | None = None,
                  kind: str = "inference records") -> CheckReport:
    """Every record of an inference record directory (SPEC.md 8.3): its bytes hash to its name, its
    structure, its receipt under the pinned key, its tokenizer, and every object it must store."""
    t0 = time.perf_counter()
    root = Path(record_dir)
    report = CheckReport(str(root), kind)
    records = RecordDir(root, "blake3")
    ids = records.record_ids()
    rows = CommittedRows()
    algorithms, served, policies = set(), set(), set()
    for path in sorted((root / "records").iterdir()) if (root / "records").is_dir() else []:
        if path.stem not in ids or path.suffix != ".json":
            report.add(path, UNREFERENCED, "not a record (records are records/<64 hex digits>.json)")
    if not ids:  # a check that compared nothing is no evidence of anything
        report.add(root / "records", MISSING, "the directory holds no inference record: nothing was checked")
    for rid in ids:
        path = root / "records" / f"{rid}.json"
        try:
            rec = InferenceRecord.open(root, rid)
        except RecordError as exc:
            report.add(path, DAMAGED, str(exc))
            continue
        algorithms.add(rec.algorithm)
        if rec.served_digest is not None:
            served.add(rec.served_digest.hex())
        if rec.is_v6 and rec.task == "causal_lm":  # v6
            policies.add(rec.policy_digest.hex())
        where = f"records/{rid}.json"
        interval = rec.settings.activation_interval
        stored = {boundary_key(b) for b in range(interval, len(rec.doc["layout"]["layer_blocks"]), interval or 1)
                  if interval >= 1 and kind == "inference records"}
        for key, ref in rec.rows.items():
            if key not in rec.inline:  # v6: a causal LM's ids are stated in the record, not stored
                rows.add(ref, where, key, required=key.startswith(("input/", "output/")) or key in stored)
        if stored and rec.is_v6 and not rec.boundaries_known:
            report.add(rec.records.boundaries_path(rec.record_id), MISSING, "the boundaries file of a record that "
                       "stores activations (written with the record: the commitments of what it stores)")
        _check_record_files(report, rec, public_key)
    for path in sorted((root / "receipts").iterdir()) if (root / "receipts").is_dir() else []:
        if path.stem not in ids or path.suffix != ".json":
            report.add(path, UNREFERENCED, "a receipt of no record in this directory")
    for path in sorted((root / "served").iterdir()) if (root / "served").is_dir() else []:
        if path.suffix != ".json" or path.stem not in served:
            report.add(path, UNREFERENCED, "a served file (model and layout) that no record in this directory names")
    for path in sorted((root / "policies").iterdir()) if (root / "policies").is_dir() else []:
        if path.suffix != ".json" or path.stem not in policies:
            report.add(path, UNREFERENCED, "a policy file that no record in this directory names")
    for path in sorted((root / "boundaries").iterdir()) if (root / "boundaries").is_dir() else []:
        if path.suffix != ".json" or path.stem not in ids:
            report.add(path, UNREFERENCED, "a boundaries file of no record in this directory")
    if len(algorithms) > 1:
        report.notes.append(f"records use several hash algorithms ({', '.join(sorted(algorithms))}): objects were "
                            f"hashed with {min(algorithms)} only")
    algorithm = min(algorithms) if algorithms else "blake3"
    report.described.append(f"{len(ids)} inference records")
    check_objects(report, ObjectStore(root / "objects", algorithm if algorithm in HASH_ALGORITHMS else "blake3"),
                  rows, progress, unreferenced_reason="a valid object that no record references")
    report.seconds = time.perf_counter() - t0
    return report


def _check_record_files(report: CheckReport, rec: InferenceRecord, public_key: PublicKey) -> None:
    """The record's receipt (signed by the pinned key, naming this record) and tokenizer."""
    path = rec.receipt_path()
    if not path.is_file():
        report.add(path, MISSING, "the receipt, the provider's signature over this record, is missing")
    else:
        try:
            verify_receipt(Receipt.load(path), public_key, rec.records.root)
        except AftuneError as exc:
            report.add(path, DAMAGED, str(exc))
    if rec.model.get("tokenizer") is not None:
        try:
            rec.tokenizer_files()
        except RecordError as exc:
            report.add(rec.records.root / "tokenizers" / str(rec.model.get("tokenizer"))[:64], DAMAGED, str(exc))


# --- training bundles ---------------------------------------------------------------------------

def check_bundle(bundle_dir: str | Path, public_key: PublicKey, doc: dict, *, transcript: str | Path | None,
                 progress: Progress | None = None) -> CheckReport:
    """A training bundle (SPEC.md 9.6) against the client's own transcript: its config, its opened
    subtrees and proofs against the signed roots, its examples against the committed dataset, and
    every object it holds. Which objects a replay needs is the audit's to say (`aftune audit`)."""
    from ..training.conformance import agreement_of_run

    if transcript is None:
        raise InputError("a training bundle is checked against your own copy of the transcript: pass --transcript")
    t0 = time.perf_counter()
    root = Path(bundle_dir)
    report = CheckReport(str(root), "bundle")
    tr = load_transcript(report, Path(transcript), public_key)
    rows = CommittedRows()
    blocks = doc.get("blocks")
    rec = None
    if tr is not None:
        if not isinstance(blocks, list) or not all(isinstance(b, list) and len(b) == 2 for b in blocks):
            report.add(root / "bundle.json", DAMAGED, "'blocks' must be a list of [layer_block, step_block]")
        else:
            try:
                rec = TrainingBundle.load(root, tr, bytes.fromhex(str(doc.get("challenge_digest"))),
                                          [(l, s) for l, s in blocks])
            except (RecordError, ValueError) as exc:
                report.add(root / "bundle.json", DAMAGED, str(exc))
    if rec is not None:
        for l, s in blocks:  # what replaying each block it opens needs at the least (SPEC.md 9.6)
            for step_block in (s, s + 1):
                m = rec._manifests.get(step_block)
                if m is None or not isinstance(l, int) or not 0 <= l < len(m.blocks) or not m.blocks[l]:
                    report.add(root / "bundle.json", DAMAGED, f"block [{l}, {s}] is opened, but not the state of its "
                               f"layer block at step block {step_block}")
        for s in sorted(rec._manifests):
            try:
                m = rec.manifest(s)
            except RecordError as exc:
                report.add(root / "bundle.json", DAMAGED, f"step block {s}: {exc}")
                continue
            for label, opened in [("common", m.common)] + [(f"block {b}", r) for b, r in enumerate(m.blocks)]:
                for key, ref in opened.items():
                    rows.add(ref, "bundle.json", f"step block {s} {label} {key}")
        try:
            a = agreement_of_run(rec)
            rec.tokenizer_files(a.tokenizer)
            rec.dataset(a.data_kind, a.data_root, a.labels, a.num_examples)
        except AftuneError as exc:
            report.add(root, DAMAGED, str(exc))
        opened = doc.get("examples") if isinstance(doc.get("examples"), dict) else {}
        for path in sorted((root / "examples").iterdir()) if (root / "examples").is_dir() else []:
            if path.suffix != ".bin" or path.stem not in opened:
                report.add(path, UNREFERENCED, "an example bundle.json does not open")
        report.described.append(f"a bundle opening {len(blocks)} blocks over {len(rec._manifests)} step blocks")
        report.notes.append("whether the bundle answers your challenge and holds every tensor a replay needs is "
                            "checked by `aftune audit`")
    algorithm = tr.algorithm if tr is not None else "blake3"
    check_objects(report, ObjectStore(root / "objects", algorithm), rows, progress,
                  unreferenced_reason="a valid object that no opened row references")
    report.seconds = time.perf_counter() - t0
    return report
