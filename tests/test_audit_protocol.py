"""The audit between two parties: the provider commits, the client's nonce picks the blocks, the
provider opens only what it committed, the client verifies with nothing but files it was given."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from aftune.protocol.audit import audit_bundle
from aftune.protocol.opening import open_bundle
from aftune.protocol.challenge import Challenge, challenge_from_transcript, derive_challenge
from aftune.core.signing import SigningKey
from aftune.training.transcript import Transcript
from conftest import agreement_for, failing
from test_tampering import FlipExponentBit, _resign

PY = [sys.executable, "-m", "aftune"]


def run(argv, cwd, expect=0):
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, f"{argv}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done.stdout


def test_two_parties_sharing_only_files(tmp_path):
    from aftune.builtin import DATA_FILE, MODEL_DIR

    provider, client = tmp_path / "provider", tmp_path / "client"
    provider.mkdir(), client.mkdir()
    # the client writes the agreement from its own copies of the base model and data
    run([*PY, "agree", "--base-model", str(MODEL_DIR), "--data", str(DATA_FILE), "--steps", "8", "--batch-size", "4",
         "--layers-per-block", "4", "--out", "agreement.json"], client)
    shutil.copy(client / "agreement.json", provider / "agreement.json")
    run([*PY, "train", "--run-dir", "run", "--agreement", "agreement.json"], provider)
    # the client receives the transcript as it is streamed and the provider's key
    for name, src in [("transcript.jsonl", "run/transcript.jsonl"), ("provider.pub", "run/provider.key.pub")]:
        shutil.copy(provider / src, client / name)
    run([*PY, "challenge", "transcript.jsonl", "--public-key", "provider.pub", "--agreement", "agreement.json",
         "--sample-blocks", "3", "--strategy", "stratified", "--out", "challenge.json"], client)
    shutil.copy(client / "challenge.json", provider / "challenge.json")
    run([*PY, "open", "run", "--challenge", "challenge.json", "--out", "bundle"], provider)
    shutil.copytree(provider / "bundle", client / "bundle")
    report = client / "report.json"
    out = run([*PY, "audit", "bundle", "--transcript", "transcript.jsonl", "--challenge", "challenge.json",
               "--public-key", "provider.pub", "--agreement", "agreement.json", "--report-json", str(report)], client)
    assert "PASS: 3/3 blocks pass" in out
    doc = json.loads(report.read_text())
    assert doc["verdict"] == "PASS" and len(doc["blocks"]) == 3
    assert sorted((b["layer_block"], b["step_block"]) for b in doc["blocks"]) == \
        sorted(tuple(b) for b in json.loads((client / "challenge.json").read_text())["blocks"])

    # the same bundle does not answer a new challenge (a new nonce)
    run([*PY, "challenge", "transcript.jsonl", "--public-key", "provider.pub", "--agreement", "agreement.json",
         "--sample-blocks", "3", "--out", "other.json"], client)
    out = run([*PY, "audit", "bundle", "--transcript", "transcript.jsonl", "--challenge", "other.json",
               "--public-key", "provider.pub", "--agreement", "agreement.json"], client, expect=1)
    assert "another challenge" in out


@pytest.fixture
def tampered(record):
    """A run with one exponent bit flipped in layer block 1 during step block 1 (grid 2 x 3)."""
    run_dir, key = record("llama", steps=6, steps_per_block=2, deviation=FlipExponentBit(step=3))
    return run_dir, key


def _audit(run_dir, key, challenge, tmp_path, name):
    bundle = tmp_path / name
    open_bundle(run_dir, challenge, bundle)
    return audit_bundle(bundle, run_dir / "transcript.jsonl", key, challenge,
                        agreement=agreement_for(run_dir))


def test_tampered_run_fails_whenever_the_tampered_block_is_challenged(tampered, tmp_path):
    run_dir, key = tampered
    root = Transcript.load(run_dir / "transcript.jsonl", key).run.root
    # Two of six blocks per challenge: draw nonces until challenges that include the tampered
    # block and challenges that miss it have each been audited three times (the run root, and so
    # the draws, may change between runs; 64 draws fall short with negligible probability).
    outcomes = {True: 0, False: 0}
    for i in range(64):
        c = derive_challenge(root, bytes([i]) * 32, 2, 3, "uniform", count=2)
        hit = (1, 1) in c.blocks
        if outcomes[hit] >= 3:
            continue
        report = _audit(run_dir, key, c, tmp_path, f"b{i}")
        assert report.verdict == ("FAIL" if hit else "PASS"), (c.blocks, report.summary())
        if hit:
            assert failing(report) == [(1, 1)]
        outcomes[hit] += 1
        if min(outcomes.values()) >= 3:
            break
    assert min(outcomes.values()) >= 3, outcomes  # both cases really occurred


def test_a_bundle_missing_anything_fails(record, tmp_path):
    run_dir, key = record("llama", steps=4, steps_per_block=2)
    c = challenge_from_transcript(run_dir / "transcript.jsonl", key, "all")
    bundle = tmp_path / "bundle"
    open_bundle(run_dir, c, bundle)
    honest = audit_bundle(bundle, run_dir / "transcript.jsonl", key, c,
                          agreement=agreement_for(run_dir))
    assert honest.verdict == "PASS", honest.summary()

    def damaged(edit):
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(bundle, copy)
        edit(copy)
        return audit_bundle(copy, run_dir / "transcript.jsonl", key, c,
                            agreement=agreement_for(run_dir))

    def drop_start_weight(b):  # a tensor the replay loads: layer block 0's weights at step block 0
        doc = json.loads((b / "bundle.json").read_text())
        row = next(x for x in doc["step_blocks"] if x["step_block"] == 0)["full"]["block/0000"][0]
        (b / "objects" / row[4][:2] / f"{row[4]}.safetensors.zst").unlink()

    report = damaged(drop_start_weight)
    assert report.verdict == "FAIL" and any("does not include tensor" in f.reason
                                            for r in report.results for f in r.findings)
    report = damaged(lambda b: next((b / "examples").iterdir()).unlink())
    assert report.verdict == "FAIL"

    def drop_proof(b):
        doc = json.loads((b / "bundle.json").read_text())
        sb = next(x for x in doc["step_blocks"] if x["partial"])
        label = next(iter(sb["partial"]))
        sb["partial"][label] = sb["partial"][label][1:]
        (b / "bundle.json").write_text(json.dumps(doc))

    assert damaged(drop_proof).verdict == "FAIL"

    def swap_digest(b):  # an opened entry that is not the committed one
        doc = json.loads((b / "bundle.json").read_text())
        sb = next(x for x in doc["step_blocks"] if x["partial"])
        label = next(iter(sb["partial"]))
        sb["partial"][label][0][0][4] = "ab" * 32
        (b / "bundle.json").write_text(json.dumps(doc))

    report = damaged(swap_digest)
    assert report.verdict == "FAIL" and "not in the committed" in report.errors[0].reason


def test_transcript_resigned_after_the_challenge_is_rejected(record, tmp_path):
    run_dir, key = record("llama", steps=4, steps_per_block=2)
    c = challenge_from_transcript(run_dir / "transcript.jsonl", key, "uniform", count=2)
    provider_key = SigningKey.load(run_dir / "provider.key")
    lines = [json.loads(x) for x in (run_dir / "transcript.jsonl").read_text().splitlines()]
    lines[1]["merkle_root"] = "cd" * 32  # the provider rewrites history and re-signs with its own key
    _resign(lines, provider_key)
    rewritten = tmp_path / "rewritten.jsonl"
    rewritten.write_text("".join(json.dumps(x) + "\n" for x in lines))
    from aftune.cli.audit import _check_run_root
    from aftune.errors import CommitmentMismatch

    with pytest.raises(CommitmentMismatch, match="re-signed after the challenge"):
        _check_run_root(c, rewritten, key)
    assert Challenge.from_json(c.to_json()).blocks == c.blocks


def test_audit_reports_each_block_as_it_ends_with_one_or_more_workers(tampered, tmp_path):
    """Progress (issue 25): on_block sees every challenged block while the audit runs, with one
    worker and with several processes, and both give the same findings."""
    run_dir, key = tampered
    root = Transcript.load(run_dir / "transcript.jsonl", key).run.root
    c = derive_challenge(root, bytes(32), 2, 3, "uniform", count=6)
    bundle = tmp_path / "bundle"
    open_bundle(run_dir, c, bundle)
    reports = {}
    for workers in (1, 2):
        seen = []
        reports[workers] = audit_bundle(bundle, run_dir / "transcript.jsonl", key, c, agreement=agreement_for(run_dir),
                                        workers=workers, on_block=seen.append)
        assert sorted((r.layer_block, r.step_block) for r in seen) == sorted(c.blocks)
        assert [(r.layer_block, r.step_block) for r in reports[workers].results] == list(c.blocks)
    assert failing(reports[1]) == failing(reports[2]) == [(1, 1)]
