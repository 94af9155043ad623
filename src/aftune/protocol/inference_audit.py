"""Challenges, openings and audits of inference records (SPEC.md 9.6-9.7 applied to 8).

The challenge's root is the record id, which the signed receipt names; its grid is the record's
layer blocks x one step block. The provider opens by replaying the challenged blocks on its own
record and copying what that replay reads (the record, its receipt, its tokenizer and the tensors
loaded); the client replays the same blocks from the bundle alone, with its own copy of the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .bundle import _BundleStore, _TracedStore
from ..errors import CommitmentMismatch, InputError, RecordError
from ..core import jsonio
from ..verdict.findings import BlockResult, Finding, Report
from ..core.signing import PublicKey


INFERENCE_BUNDLE_FORMAT = "aftune.inference-bundle.v1"


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


def audit_inference_bundle(bundle: str | Path, challenge, public_key: PublicKey, model: str | Path, *,
                           mode: str = "strict", replay_dtype: str | None = None,
                           expected_prompt: str | None = None, on_block=None) -> Report:
    """Replay the challenged layer blocks of the record the challenge names, from the bundle alone.
    A bundle missing anything, or answering another record, FAILs."""
    from ..inference.verify import InferenceVerifier

    report = Report(str(bundle), mode)
    if challenge.kind != "inference":
        raise InputError(f"this is a {challenge.kind} challenge, not an inference one")
    if not challenge.blocks:
        report.errors.append(Finding(-1, -1, "opening", "the challenge names no blocks: nothing was compared"))
        return report
    try:
        doc = jsonio.loads((Path(bundle) / "bundle.json").read_bytes())
    except (OSError, ValueError):
        raise InputError(f"{bundle} is not an inference bundle: it has no readable bundle.json") from None
    if not isinstance(doc, dict) or doc.get("format") != INFERENCE_BUNDLE_FORMAT:
        raise InputError(f"{bundle} is not an {INFERENCE_BUNDLE_FORMAT} bundle")
    if doc.get("challenge_digest") != challenge.digest or doc.get("blocks") != [[l, s] for l, s in challenge.blocks]:
        report.errors.append(Finding(-1, -1, "opening", "this bundle answers another challenge"))
        return report
    try:
        v = InferenceVerifier(bundle, challenge.run_root, model=model, mode=mode, replay_dtype=replay_dtype,
                              public_key=public_key, expected_prompt=expected_prompt)
    except (InputError, RecordError) as exc:  # the record the challenge names is not (properly) in the bundle
        report.errors.append(Finding(-1, -1, "opening", f"the bundle does not open record "
                                                        f"{challenge.run_root[:16]}…: {exc}"))
        return report
    if v.record.record_id.hex() != challenge.run_root:
        report.errors.append(Finding(-1, -1, "opening", "the bundle opens another record than the challenge names"))
        return report
    if len(v.blocks) != challenge.num_layer_blocks:
        report.errors.append(Finding(-1, -1, "opening", "the challenge's grid does not match the record's layer blocks"))
        return report
    report.errors.extend(v.errors)
    v.record.records.store = _BundleStore(v.record.records.store.root, v.record.algorithm)
    for l, _ in challenge.blocks:
        try:
            result, _ = v.verify_block(l)
        except RecordError as exc:  # something the replay needs is not in the bundle
            result = BlockResult(l, 0, v.served.describe(v.blocks, l))
            result.findings.append(Finding(l, 0, "opening", f"the bundle cannot be replayed: {exc}"))
        report.results.append(result)
        if on_block:
            on_block(result)
    return report


__all__ = ["open_inference_bundle", "audit_inference_bundle", "CommitmentMismatch"]
