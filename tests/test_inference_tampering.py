"""Auditable inference, attack side: each deviation of a provider FAILs, with a finding that
names the block, the step or token, and the check. Each attack has its honest twin in
test_inference.py (same model, same settings, PASS)."""

from __future__ import annotations

import json

import pytest
import torch

from aftune.errors import CommitmentMismatch
from aftune.inference.engine import ServingDeviation
from aftune.inference.record import InferenceRecord, boundary_key
from aftune.inference.sampling import greedy_token
from aftune.inference.receipt import Receipt, verify_receipt
from aftune.core.signing import SigningKey
from test_inference import PROMPT, QuantizedServing, cli, failing, infer, policy, verify


def forge_record(rec_dir, rid: str, edit=None, edit_boundaries=None) -> str:
    """The dishonest provider's pen on a v6 record: edit the record file (`edit(doc)`) and its
    boundaries file (`edit_boundaries(doc)`), recompute the boundaries root the record commits,
    and write both under the new record id (unsigned: no receipt). Returns the new id."""
    from aftune.core.encoding import canonical_json
    from aftune.core.rows import rows_from_json
    from aftune.inference.compact import boundaries_file, boundaries_root, write_boundaries
    from aftune.inference.record import RecordDir, record_id

    records = RecordDir(rec_dir, "blake3")
    doc = json.loads(records.record_path(bytes.fromhex(rid)).read_bytes())
    if edit:
        edit(doc)
    kept = records.boundaries_path(bytes.fromhex(rid))
    roots = rows = None
    if kept.is_file():
        bdoc = json.loads(kept.read_bytes())
        if edit_boundaries:
            edit_boundaries(bdoc)
        roots = {k: bytes.fromhex(v) for k, v in bdoc["boundary_roots"].items()}
        rows = rows_from_json(bdoc["tensors"], "boundaries: tensors")
        doc["boundaries"] = boundaries_root("blake3", roots, rows).hex()
    data = canonical_json(doc)
    new = record_id("blake3", data)
    records.write_new(records.record_path(new), data)
    if roots is not None and new.hex() == rid:  # only the rows' dtype or shape changed: not under the root
        kept.write_bytes(boundaries_file(new, roots, rows))
    elif roots is not None:
        write_boundaries(records, new, roots, rows)
    return new.hex()

TARGET = "model.layers.2.mlp.down_proj.weight"  # layer.2: layer block 2 with one layer per block


class ChangeOneWeight(ServingDeviation):
    def __init__(self, name=TARGET, delta=0.01):
        self.name, self.delta = name, delta

    def weights(self, model):
        dict(model.named_parameters())[self.name].data[3, 5] += self.delta


class PerturbBoundary(ServingDeviation):
    """AFTUNE's activation attack: a small perturbation added to one block's input at one step."""

    def __init__(self, step, at, scale=1e-3):
        self.step, self.at, self.scale = step, at, scale

    def boundary(self, step, boundary, hidden):
        if (step, boundary) == (self.step, self.at):
            g = torch.Generator().manual_seed(0)
            return hidden + self.scale * hidden.abs().mean() * torch.randn(hidden.shape, generator=g)
        return hidden


class SecondBestToken(ServingDeviation):
    def __init__(self, step):
        self.step = step

    def token(self, step, logits, token):
        if step != self.step:
            return token
        z = logits.double().clone()
        z[token] = -float("inf")
        return greedy_token(z)


class SwapPrompt(ServingDeviation):
    """Answer another prompt than the client's (the record still names the client's)."""

    def inputs(self, inputs):
        ids = inputs["input_ids"].clone()
        ids[0, -1] = (ids[0, -1] + 1) % 512
        return {"input_ids": ids}


def test_one_weight_changed_in_the_served_model_fails_its_block(model_dir, tmp_path):
    result, _ = infer(model_dir("llama"), tmp_path / "rec", deviation=ChangeOneWeight())
    _, report = verify(tmp_path / "rec", result, model=model_dir("llama"))
    assert failing(report) == [2], report.summary()
    bad = report.results[2]
    assert bad.findings[0].check == "output" and bad.findings[0].step == 0
    assert "layer block 2 (layer.2), step 0" in bad.headline() and "boundary/0003" in bad.headline()
    assert not report.errors  # the record claims the agreed model: the replay is what catches it


def test_verifying_with_another_model_fails_the_model_check(model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    result, _ = infer(model_dir("llama"), tmp_path / "rec")
    mine = tmp_path / "mine"
    shutil.copytree(model_dir("llama"), mine)
    w = load_file(mine / "model.safetensors")
    w[TARGET][3, 5] += 0.01
    save_file(w, mine / "model.safetensors", metadata={"format": "pt"})
    _, report = verify(tmp_path / "rec", result, model=mine)
    assert report.verdict == "FAIL"
    assert report.errors[0].check == "model" and "weights are not the ones" in report.errors[0].reason
    assert failing(report) == [2]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit", "resnet"])
def test_quantized_serving_fails_strict(model_dir, tmp_path, family, bits):
    result, engine = infer(model_dir(family), tmp_path / "rec", deviation=QuantizedServing(bits))
    _, report = verify(tmp_path / "rec", result, model=model_dir(family))
    assert report.verdict == "FAIL"
    assert failing(report)[0] == 0 and report.results[0].findings[0].check == "output", report.summary()
    assert "layer block 0" in report.summary()


def test_perturbed_activation_fails_the_block_that_produced_it(model_dir, tmp_path):
    result, _ = infer(model_dir("llama"), tmp_path / "rec", gen=policy(6), deviation=PerturbBoundary(step=3, at=2))
    _, report = verify(tmp_path / "rec", result, model=model_dir("llama"))
    assert failing(report) == [1], report.summary()
    f = report.results[1].findings[0]
    assert (f.check, f.step, f.tensor) == ("output", 3, "boundary/0002")  # the finding names the step
    assert "layer block 1 (layer.1), step 3: output" in report.results[1].headline()


def test_edited_activation_object_fails(model_dir, tmp_path):
    result, _ = infer(model_dir("llama"), tmp_path / "rec")
    rec = InferenceRecord.open(tmp_path / "rec")
    victim = rec.store.path(rec.rows[boundary_key(2)].digest)
    donor = rec.store.path(rec.rows[boundary_key(1)].digest)
    victim.chmod(0o644)
    victim.write_bytes(donor.read_bytes())  # a valid object, but of another tensor
    _, report = verify(tmp_path / "rec", result, model=model_dir("llama"))
    assert failing(report) == [2], report.summary()
    assert report.results[2].findings[0].check == "record"
    assert "altered" in report.results[2].findings[0].reason


@pytest.mark.parametrize("gen", [policy(6), policy(6, temperature=0.8, top_p=0.9)])
def test_token_that_does_not_follow_from_the_logits_fails(model_dir, tmp_path, gen):
    result, engine = infer(model_dir("llama"), tmp_path / "rec", gen=gen, deviation=SecondBestToken(step=2))
    _, report = verify(tmp_path / "rec", result, model=model_dir("llama"))
    last = len(engine.blocks) - 1
    assert failing(report) == [last], report.summary()
    f = report.results[last].findings[0]
    assert f.check == "token" and f.step == 2 and f.reason.startswith(f"token 2: the committed token {result.tokens[2]}")
    # earlier blocks consume the committed (wrong) token consistently: only the head block fails
    if not gen.sampling:
        _, report = verify(tmp_path / "rec", result, model=model_dir("llama"), mode="tolerance",
                           replay_dtype="float64")
        assert failing(report) == [last], report.summary()


@pytest.mark.parametrize("family", ["bert", "vit", "resnet"])
def test_classifier_label_that_does_not_follow_fails(model_dir, tmp_path, family):
    result, engine = infer(model_dir(family), tmp_path / "rec", deviation=SecondBestToken(step=0))
    _, report = verify(tmp_path / "rec", result, model=model_dir(family))
    assert failing(report) == [len(engine.blocks) - 1], report.summary()
    assert report.results[-1].findings[0].check == "label"
    assert "is not the argmax" in report.results[-1].findings[0].reason


def test_swapped_prompt_fails_the_input_check(model_dir, tmp_path):
    result, _ = infer(model_dir("llama"), tmp_path / "rec", deviation=SwapPrompt())
    _, report = verify(tmp_path / "rec", result, model=model_dir("llama"))
    assert report.verdict == "FAIL"
    assert report.errors[0].check == "input" and "another prompt" in report.errors[0].reason
    # an honest record of another prompt: the client's own prompt does not match
    result, _ = infer(model_dir("llama"), tmp_path / "other", prompt="Q: what colour is the grass?")
    _, report = verify(tmp_path / "other", result, model=model_dir("llama"), expected_prompt=PROMPT)
    assert report.verdict == "FAIL" and "answers another prompt" in report.errors[0].reason
    assert all(r.verdict == "PASS" for r in report.results)  # the replay itself is honest


def test_edited_record_file_fails(model_dir, tmp_path):
    result, _ = infer(model_dir("llama"), tmp_path / "rec")
    doc = json.loads(result.record_path.read_bytes())
    doc["output"]["text"] = "something else"
    result.record_path.write_bytes(json.dumps(doc).encode())
    with pytest.raises(CommitmentMismatch, match="edited after it was written"):
        InferenceRecord.open(tmp_path / "rec")
    r = cli("verify-inference", tmp_path / "rec", "--all", "--model", model_dir("llama"), "--prompt", PROMPT,
            "--max-new-tokens", 6)
    assert r.exit_code == 1 and "FAIL" in r.output


def test_rehashed_record_without_a_receipt_fails(model_dir, tmp_path):
    from aftune.core.encoding import canonical_json
    from aftune.inference.record import record_id

    key = SigningKey.generate()
    result, _ = infer(model_dir("llama"), tmp_path / "rec", key=key)
    doc = json.loads(result.record_path.read_bytes())
    doc["output"]["text"] = "something else"  # renamed to its new digest: self-consistent, unsigned
    data = canonical_json(doc)
    (tmp_path / "rec" / "records" / f"{record_id('blake3', data).hex()}.json").write_bytes(data)
    result.record_path.unlink()
    v, report = verify(tmp_path / "rec", type(result)(**{**result.__dict__, "record_id": record_id("blake3", data).hex()}),
                       model=model_dir("llama"), public_key=key.public_key)
    assert {e.check for e in report.errors} >= {"receipt", "output"}, report.summary()


@pytest.mark.parametrize("field, value", [("hash", "sha256"), ("time", "2030-01-01T00:00:00.000000Z"),
                                          ("record_root", "11" * 32), ("model_digest", "22" * 32)])
def test_edited_receipt_fails(model_dir, tmp_path, field, value):
    key = SigningKey.generate()
    result, _ = infer(model_dir("llama"), tmp_path / "rec", key=key)
    doc = json.loads(result.receipt_path.read_bytes())
    doc[field] = value
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    with pytest.raises(CommitmentMismatch, match="signature does not verify"):
        verify_receipt(Receipt.load(edited), key.public_key)
    r = cli("verify-receipt", edited, "--public-key", key.public_key.text, "--record-dir", tmp_path / "rec")
    assert r.exit_code == 1 and "INVALID" in r.output
    result.receipt_path.write_text(json.dumps(doc))  # the provider edits its stored copy
    _, report = verify(tmp_path / "rec", result, model=model_dir("llama"), public_key=key.public_key)
    assert report.verdict == "FAIL" and report.errors[0].check == "receipt", report.summary()


def test_receipt_from_another_key_or_for_another_record_fails(model_dir, tmp_path):
    from aftune.inference.receipt import issue_receipt

    key, other = SigningKey.generate(), SigningKey.generate()
    a, _ = infer(model_dir("llama"), tmp_path / "rec", key=key)
    b, _ = infer(model_dir("llama"), tmp_path / "rec", key=key, prompt="Q: and the grass?")
    with pytest.raises(CommitmentMismatch, match="not by the pinned provider key"):
        verify_receipt(Receipt.load(a.receipt_path), other.public_key)
    ra = Receipt.load(a.receipt_path)
    forged = issue_receipt(key, "blake3", b"\x22" * 32, bytes.fromhex(b.record_id), ra.time)
    with pytest.raises(CommitmentMismatch, match="model digest"):  # signed for another model than b's record's
        verify_receipt(forged, key.public_key, tmp_path / "rec")
    # a v3 receipt binds the request through its record: a's receipt does not answer b's nonce or policy
    with pytest.raises(CommitmentMismatch, match="request nonce"):
        verify_receipt(ra, key.public_key, tmp_path / "rec", request_nonce=b"\x07" * 32)
    with pytest.raises(CommitmentMismatch, match="policy digest"):
        verify_receipt(ra, key.public_key, tmp_path / "rec", policy_digest=b"\x55" * 32)
    r = cli("verify-receipt", a.receipt_path, "--public-key", other.public_key.text, "--record-dir", tmp_path / "rec")
    assert r.exit_code == 1


def test_receipt_malformed_is_bad_input(tmp_path):
    p = tmp_path / "r.json"
    for text in ("{", "[]", json.dumps({"format": "aftune.receipt.v2"}), json.dumps({"x": 1})):
        p.write_text(text)
        r = cli("verify-receipt", p, "--public-key", "ed25519:" + "00" * 32, "--record-dir", tmp_path)
        assert r.exit_code == 2 and "receipt" in r.output, (text, r.output)


@pytest.mark.parametrize("change", ["positions", "hidden"])
def test_a_boundary_committed_in_another_shape_is_a_finding(model_dir, tmp_path, change):
    """A provider commits (and would sign) a record whose boundary row has another shape than the
    agreed computation gives: more positions than the steps, or another hidden size. The verifier
    compares the row with the shapes of one meta-device pass over the whole sequence and FAILs the
    block that reads it, naming the tensor: never an exception from the replay."""
    result, _ = infer(model_dir("llama"), tmp_path / "rec", gen=policy(6))

    def reshape(bdoc):
        row = next(r for r in bdoc["tensors"] if r[0] == "boundary/0001")
        row[3] = [row[3][0], row[3][1] + 1, row[3][2]] if change == "positions" else [row[3][0], row[3][1], row[3][2] * 2]

    rid = forge_record(tmp_path / "rec", result.record_id, edit_boundaries=reshape)
    assert rid == result.record_id  # the digest commits dtype and shape: the rows' copies are checked against it
    _, report = verify(tmp_path / "rec", type(result)(**{**result.__dict__, "record_id": rid}))
    assert report.verdict == "FAIL"
    found = [f for r in report.results for f in r.findings] + list(report.errors)
    assert any("boundary/0001" in f"{f.tensor} {f.reason}" for f in found), report.summary()
