"""Record format v5 (SPEC.md 8.3, 8.4): `model` and `layout`, the same in every record of one
served model, are written once per record directory as the content-addressed served file
`served/<digest>.json`, the record holding only its digest. Honest v5 records verify, are checked
and travel in bundles with their served file; v4 records still read; an edited, missing, swapped
or malformed served file FAILs naming it.

    pytest tests/test_inference_served.py
"""

from __future__ import annotations

import hashlib
import json

import blake3
import pytest

from aftune.core.encoding import canonical_json
from aftune.core.rows import rows_to_json
from aftune.core.signing import SigningKey
from aftune.errors import CommitmentMismatch, RecordError
from aftune.inference.record import InferenceRecord, RecordDir, record_id, served_digest, served_file
from aftune.protocol.check import check_path
from aftune.protocol.challenge import challenge_for_inference
from aftune.protocol.opening import open_inference_bundle
from test_inference import infer, verify


def _doc(result) -> dict:
    return json.loads(result.record_path.read_bytes())


def as_v5(rec_dir, rid: str) -> dict:
    """Record `rid` (v6) as a v5 writer wrote it (SPEC.md 8.4): the policy, the input and output
    digests, every row and the boundary roots in the record, the input and output objects stored.
    (The record must have its boundaries: kept, or regenerated.)"""
    rec = InferenceRecord.open(rec_dir, rid)
    assert rec.boundaries_known
    for key in rec.inline:
        if not key.startswith("boundary/"):
            rec.store.put(rec.rows[key], rec.tensor(key))
    doc = json.loads(rec.records.record_path(rec.record_id).read_bytes())
    doc.pop("boundaries")
    doc["input"].pop("ids", None)
    doc.update(format="aftune.inference.v5", created="2026-12-06T12:00:00.000000Z", generation=rec.doc["generation"],
               tensors=rows_to_json(rec.rows), boundary_roots=rec.doc["boundary_roots"])
    for section in ("input", "output"):
        doc[section]["digest"] = rec.doc[section]["digest"]
    return doc


def _rewrite(rec_dir, doc) -> str:
    """Write `doc` as a record (as a dishonest provider may) and return its id."""
    records = RecordDir(rec_dir, "blake3")
    data = canonical_json(doc)
    rid = record_id("blake3", data)
    records.write_new(records.record_path(rid), data)
    return rid.hex()


def test_v6_records_name_one_served_file_and_one_policy_file_and_verify(model_dir, tmp_path):
    key = SigningKey.generate()
    first, engine = infer(model_dir("llama"), tmp_path / "rec", key=key, activation_interval=0)
    second, _ = infer(model_dir("llama"), tmp_path / "rec", key=key, activation_interval=0)
    doc = _doc(first)
    assert doc["format"] == "aftune.inference.v6" and "model" not in doc and "layout" not in doc
    assert [p.stem for p in (tmp_path / "rec" / "policies").iterdir()] == [doc["generation"]["policy_digest"]]
    assert _doc(second)["generation"]["policy_digest"] == doc["generation"]["policy_digest"]
    served = sorted((tmp_path / "rec" / "served").iterdir())
    assert [p.name for p in served] == [f"{doc['served']}.json"] and _doc(second)["served"] == doc["served"]
    rec = InferenceRecord.open(tmp_path / "rec", first.record_id)
    assert rec.served_digest.hex() == doc["served"] and rec.model_digest == engine.served.digest
    assert served[0].read_bytes() == served_file(rec.model, rec.doc["layout"])
    for result in (first, second):
        _, report = verify(tmp_path / "rec", result)
        assert report.verdict == "PASS", report.summary()
    report = check_path(tmp_path / "rec", key.public_key)
    assert report.exit_code == 0 and not report.problems, report.summary()
    # a bundle for a challenge carries the served file, and it is the one the record names
    c = challenge_for_inference(bytes.fromhex(first.record_id), len(engine.blocks), "all")
    summary = open_inference_bundle(tmp_path / "rec", c, tmp_path / "bundle", model=model_dir("llama"))
    assert set(summary["provider_verdicts"].values()) == {"PASS"}
    assert (tmp_path / "bundle" / "served" / served[0].name).read_bytes() == served[0].read_bytes()
    policy = f"policies/{doc['generation']['policy_digest']}.json"
    assert (tmp_path / "bundle" / policy).read_bytes() == (tmp_path / "rec" / policy).read_bytes()
    # the provider regenerated the boundaries for the opening: the bundle carries its boundaries file
    assert (tmp_path / "bundle" / "boundaries" / f"{first.record_id}.json").is_file()
    report = check_path(tmp_path / "bundle", key.public_key)
    assert report.kind == "inference bundle" and report.exit_code == 0 and not report.problems, report.summary()
    # twin: a served file, a policy file and a boundaries file no record names are reported
    (tmp_path / "rec" / "served" / ("ab" * 32 + ".json")).write_bytes(b"{}")
    (tmp_path / "rec" / "policies" / ("cd" * 32 + ".json")).write_bytes(b"{}")
    (tmp_path / "rec" / "boundaries").mkdir()
    (tmp_path / "rec" / "boundaries" / ("ef" * 32 + ".json")).write_bytes(b"{}")
    report = check_path(tmp_path / "rec", key.public_key)
    assert sorted((p.path, p.kind) for p in report.problems) == [
        (f"boundaries/{'ef' * 32}.json", "unreferenced"), (f"policies/{'cd' * 32}.json", "unreferenced"),
        (f"served/{'ab' * 32}.json", "unreferenced")], report.summary()
    # twin: an edited policy file fails naming it
    (tmp_path / "rec" / policy).write_bytes(canonical_json({**json.loads((tmp_path / "rec" / policy).read_bytes()),
                                                            "max_new_tokens": 99}))
    with pytest.raises(CommitmentMismatch, match="policy file was edited"):
        InferenceRecord.open(tmp_path / "rec", first.record_id)


def test_v5_and_v4_records_still_read_and_verify(model_dir, tmp_path):
    result, _ = infer(model_dir("llama"), tmp_path / "rec")
    rec = InferenceRecord.open(tmp_path / "rec", result.record_id)
    doc = as_v5(tmp_path / "rec", result.record_id)
    v5 = _rewrite(tmp_path / "rec", doc)
    _, report = verify(tmp_path / "rec", type(result)(**{**result.__dict__, "record_id": v5}))
    assert report.verdict == "PASS" and InferenceRecord.open(tmp_path / "rec", v5).doc["format"] == "aftune.inference.v5"
    del doc["served"]
    doc.update(format="aftune.inference.v4", model=rec.model, layout=rec.doc["layout"])
    v4 = _rewrite(tmp_path / "rec", doc)
    _, report = verify(tmp_path / "rec", type(result)(**{**result.__dict__, "record_id": v4}))
    assert report.verdict == "PASS" and InferenceRecord.open(tmp_path / "rec", v4).served_digest is None
    # twin: a v4 record naming a served file, and a v5 record holding its model itself, are rejected
    for edit, message in ((lambda d: d.update(served=_doc(result)["served"]), "'served' is not part"),
                          (lambda d: d.update(format="aftune.inference.v5", served=_doc(result)["served"]),
                           "holds 'model' in its served file")):
        edited = json.loads(json.dumps(doc))
        edit(edited)
        with pytest.raises(RecordError, match=message):
            InferenceRecord.open(tmp_path / "rec", _rewrite(tmp_path / "rec", edited))


def test_an_edited_or_missing_served_file_fails_naming_it(model_dir, tmp_path):
    key = SigningKey.generate()
    result, _ = infer(model_dir("llama"), tmp_path / "rec", key=key)
    name = _doc(result)["served"]
    path = tmp_path / "rec" / "served" / f"{name}.json"
    honest = path.read_bytes()
    path.write_bytes(honest.replace(b'"layers_per_block":1', b'"layers_per_block":2'))
    with pytest.raises(CommitmentMismatch, match=f"served/{name[:16]}.*was edited"):
        InferenceRecord.open(tmp_path / "rec", result.record_id)
    with pytest.raises(CommitmentMismatch, match="served file"):
        verify(tmp_path / "rec", result)
    report = check_path(tmp_path / "rec", key.public_key)
    assert report.exit_code == 1 and [p.path for p in report.problems if p.kind == "damaged"] == \
        [f"records/{result.record_id}.json"] and "served file" in report.problems[0].reason, report.summary()
    path.unlink()
    with pytest.raises(RecordError, match=f"served/{name}.json .* is missing"):
        InferenceRecord.open(tmp_path / "rec", result.record_id)
    # a served file that hashes right but is not {format, model, layout}
    records = RecordDir(tmp_path / "rec", "blake3")
    bad = json.loads(honest)
    bad["extra"] = 1
    doc = _doc(result)
    doc["served"] = records.keep_served(canonical_json(bad)).hex()
    with pytest.raises(RecordError, match="exactly format, model and layout"):
        InferenceRecord.open(tmp_path / "rec", _rewrite(tmp_path / "rec", doc))


def test_a_swapped_served_file_fails_the_layout_or_the_receipt(model_dir, tmp_path):
    """A provider that points its record at another served file (here: another layer-block
    layout) changes the record id: the receipt no longer names it, and the layout check FAILs."""
    key = SigningKey.generate()
    result, engine = infer(model_dir("llama"), tmp_path / "rec", key=key)
    rec = InferenceRecord.open(tmp_path / "rec", result.record_id)
    stages = rec.doc["layout"]["stages"]
    layout = {**rec.doc["layout"], "stages": [stages[0], stages[2], stages[1], *stages[3:]]}
    doc = _doc(result)
    doc["served"] = RecordDir(tmp_path / "rec", "blake3").keep_served(served_file(rec.model, layout)).hex()
    forged = _rewrite(tmp_path / "rec", doc)
    _, report = verify(tmp_path / "rec", type(result)(**{**result.__dict__, "record_id": forged}))
    assert report.verdict == "FAIL" and any("layout" in e.reason for e in report.errors), report.summary()
    report = check_path(tmp_path / "rec", key.public_key)
    assert any(p.path == f"receipts/{forged}.json" and p.kind == "missing" for p in report.problems), report.summary()


def test_spec_vector_of_the_served_digest():
    """SPEC.md 8.12, with hashlib and blake3 directly."""
    data = b'{"format":"aftune.inference-served.v1","layout":{},"model":{}}'
    assert served_file({}, {}) == data and len(data) == 62
    want = {"blake3": "959ef7a3aea3750728e39cdab06f9302d6a6d3496028d7bfef9e6fedc18a39d7",
            "sha256": "cf004f352a0cbc37aefaa2ceb6937c96c7cfba98721dac9413e2f1ae6c8c2797"}
    tagged = b"aftune.v1.inference-served\x00" + data
    assert blake3.blake3(tagged).hexdigest() == want["blake3"] and hashlib.sha256(tagged).hexdigest() == want["sha256"]
    for alg, hex_digest in want.items():
        assert served_digest(alg, data).hex() == hex_digest
