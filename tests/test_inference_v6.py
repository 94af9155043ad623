"""v6 inference records and v3 receipts (SPEC.md 8.4.1, 8.7): what the record keeps out of its
file is put back only when it matches what the record commits. Each honest case has dishonest
twins: a provider that edits the policy file, the boundaries file, a record's shape, or hands a
record whose boundaries its model does not reproduce.

    pytest tests/test_inference_v6.py
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from aftune.core.encoding import canonical_json
from aftune.errors import CommitmentMismatch, InputError, RecordError
from aftune.inference.receipt import Receipt
from aftune.inference.record import InferenceRecord
from test_inference import infer, verify
from test_inference_served import _rewrite
from test_inference_tampering import PerturbBoundary


def test_a_v6_record_keeps_no_per_boundary_value_and_regenerates_them_against_its_root(model_dir, tmp_path):
    result, engine = infer(model_dir("llama"), tmp_path / "rec", activation_interval=0)
    raw = json.loads(result.record_path.read_bytes())
    assert raw["format"] == "aftune.inference.v6" and len(raw["boundaries"]) == 64
    assert not {"boundary_roots", "tensors", "created"} & set(raw)
    kept = set(os.listdir(tmp_path / "rec"))
    assert {"records", "receipts", "served", "policies"} <= kept and not {"objects", "boundaries"} & kept, kept
    v, report = verify(tmp_path / "rec", result)
    assert report.verdict == "PASS" and v.record.boundaries_known, report.summary()
    # twin: the served boundary 2 was not the model's: the record's root is over the served values,
    # so the strict verifier's regeneration does not reproduce it (a record-level FAIL, said why)
    bad, _ = infer(model_dir("llama"), tmp_path / "bad", activation_interval=0,
                   deviation=PerturbBoundary(step=1, at=2))
    _, report = verify(tmp_path / "bad", bad)
    assert report.verdict == "FAIL" and [e.check for e in report.errors] == ["boundaries"], report.summary()
    assert "boundaries recomputed by strict replay" in report.errors[0].reason
    # twin: the same dishonest record with its boundaries file kept: the FAIL names block 1, boundary 2
    kept, _ = infer(model_dir("llama"), tmp_path / "kept", activation_interval=1,
                    deviation=PerturbBoundary(step=1, at=2))
    _, report = verify(tmp_path / "kept", kept)
    failing = {r.layer_block: r for r in report.results if r.verdict == "FAIL"}
    assert 1 in failing and failing[1].findings[0].tensor == "boundary/0002", report.summary()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(tensors=[]), "no 'tensors'"),
    (lambda d: d["input"].update(digest="00" * 32), "without 'digest'"),
    (lambda d: d.update(created="2026-12-06T12:00:00.000000Z"), "'created' is not part"),
    (lambda d: d.update(boundary_roots={}), "'boundary_roots' is not part"),
    (lambda d: d["generation"].update(policy={}), "exactly the fields policy_digest and seed"),
    (lambda d: d["input"].update(ids=[]), "'input.ids' must list"),
    (lambda d: d["input"].update(ids=[1, -2]), "'input.ids' must list"),
    (lambda d: d["output"].update(tokens=[True]), "'output.tokens' must list"),
    (lambda d: d.update(boundaries="xyz"), "boundaries"),
])
def test_malformed_v6_records_are_record_errors(model_dir, tmp_path, edit, message):
    result, _ = infer(model_dir("llama"), tmp_path / "rec", activation_interval=0)
    doc = json.loads(result.record_path.read_bytes())
    edit(doc)
    with pytest.raises(RecordError, match=message):
        InferenceRecord.open(tmp_path / "rec", _rewrite(tmp_path / "rec", doc))


def test_a_boundaries_file_of_another_record_or_shape_is_refused(model_dir, tmp_path):
    first, _ = infer(model_dir("llama"), tmp_path / "rec")  # I_A = 1: the boundaries file is written
    second, _ = infer(model_dir("llama"), tmp_path / "rec", prompt="Q: and the grass?")
    files = tmp_path / "rec" / "boundaries"
    mine = (files / f"{first.record_id}.json").read_bytes()
    assert InferenceRecord.open(tmp_path / "rec", first.record_id).boundaries_known
    # the second record's file replaced by the first's: it names another record
    (files / f"{second.record_id}.json").write_bytes(mine)
    with pytest.raises(RecordError, match="names record"):
        InferenceRecord.open(tmp_path / "rec", second.record_id)
    # renamed to the second record, but its values hash to the first record's root
    (files / f"{second.record_id}.json").write_bytes(mine.replace(first.record_id.encode(), second.record_id.encode()))
    with pytest.raises(CommitmentMismatch, match="boundaries file hashes to the root"):
        InferenceRecord.open(tmp_path / "rec", second.record_id)
    # a missing boundary
    doc = json.loads(mine)
    doc["boundary_roots"].pop("0001")
    (files / f"{first.record_id}.json").write_bytes(canonical_json(doc))
    with pytest.raises(RecordError, match="exactly the boundaries"):
        InferenceRecord.open(tmp_path / "rec", first.record_id)


def test_the_policy_file_is_carried_and_checked(model_dir, tmp_path):
    result, _ = infer(model_dir("llama"), tmp_path / "rec", activation_interval=0)
    rec = InferenceRecord.open(tmp_path / "rec", result.record_id)
    path = rec.records.policy_path(rec.policy_digest)
    assert rec.policy.digest("blake3") == rec.policy_digest
    shutil.move(path, tmp_path / "away.json")
    with pytest.raises(RecordError, match="policy file .* is missing"):
        InferenceRecord.open(tmp_path / "rec", result.record_id)
    # a policy file with other bytes of the same policy (re-serialised): not the committed bytes
    path.write_bytes(json.dumps(json.loads((tmp_path / "away.json").read_bytes()), indent=1).encode())
    with pytest.raises(CommitmentMismatch, match="policy file was edited"):
        InferenceRecord.open(tmp_path / "rec", result.record_id)


def test_a_v3_receipt_is_small_and_strict_about_its_fields(model_dir, tmp_path):
    result, _ = infer(model_dir("llama"), tmp_path / "rec", activation_interval=0)
    assert result.receipt_path.stat().st_size < 500
    doc = json.loads(result.receipt_path.read_bytes())
    assert sorted(doc) == ["format", "hash", "key", "model_digest", "record_root", "signature", "time"]
    for extra in ("request_nonce", "policy_digest", "input_digest"):  # v2 fields are not part of v3
        with pytest.raises(InputError, match="unknown fields"):
            Receipt.from_json({**doc, extra: None})
    with pytest.raises(InputError, match="missing fields"):
        Receipt.from_json({**doc, "format": "aftune.receipt.v2"})


def test_a_portable_record_keeps_its_boundaries_file_even_without_stored_activations(tmp_path):
    """Portable logs (SPEC.md 8.13) are read against the boundaries' sizes: a portable v6 record
    keeps its boundaries file whatever I_A, verifies, and without the file is a record error."""
    from test_inference_portable import BUILTIN, PROMPT, make, pinned

    policy = pinned(6, numerics="portable")
    result = make(tmp_path / "p", policy, interval=0, layers_per_block=1)
    rec = InferenceRecord.open(tmp_path / "p", result.record_id)
    assert rec.boundaries_known and rec.portable is not None and not any(rec.stored(k) for k in rec.boundary_rows)
    from aftune.inference.verify import InferenceVerifier

    v = InferenceVerifier(tmp_path / "p", result.record_id, model=BUILTIN, policy=policy, expected_prompt=PROMPT)
    report = v.verify_all()
    assert report.verdict == "PASS", report.summary()
    (tmp_path / "p" / "boundaries" / f"{result.record_id}.json").unlink()
    with pytest.raises(RecordError, match="portable-numerics .* keeps its boundaries file"):
        InferenceRecord.open(tmp_path / "p", result.record_id)
