"""Challenges, openings and audits of inference records: the client picks layer blocks of a
record after its receipt is signed; the provider opens them; the client replays them from the
bundle alone with its own copy of the model."""

from __future__ import annotations

import shutil
import subprocess
import sys

from aftune.protocol.challenge import challenge_for_inference
from aftune.protocol.audit import audit_inference_bundle
from aftune.protocol.opening import open_inference_bundle
from aftune.core.signing import SigningKey
from test_inference import PROMPT, infer
from test_inference_tampering import PerturbBoundary


def _challenge(result, engine, strategy="uniform", count=2, nonce=None):
    return challenge_for_inference(bytes.fromhex(result.record_id), len(engine.blocks), strategy,
                                   count=None if strategy == "all" else count, nonce=nonce)


def test_honest_record_passes_and_perturbed_block_fails_when_challenged(model_dir, tmp_path):
    model = model_dir("llama")
    key = SigningKey.generate()
    honest, engine = infer(model, tmp_path / "honest", key=key)
    c = _challenge(honest, engine, "all")
    open_inference_bundle(tmp_path / "honest", c, tmp_path / "b0", model=model)
    report = audit_inference_bundle(tmp_path / "b0", c, key.public_key, model, expected_prompt=PROMPT)
    assert report.verdict == "PASS" and len(report.results) == len(engine.blocks), report.summary()

    # a boundary activation perturbed while serving (AFTUNE's activation attack)
    bad, engine = infer(model, tmp_path / "bad", key=key, deviation=PerturbBoundary(step=1, at=2))
    c = _challenge(bad, engine, "all")
    open_inference_bundle(tmp_path / "bad", c, tmp_path / "ball", model=model)
    full = audit_inference_bundle(tmp_path / "ball", c, key.public_key, model)
    affected = {r.layer_block for r in full.results if r.verdict == "FAIL"}
    assert affected and affected <= {1, 2}, full.summary()  # the blocks on either side of boundary 2
    # A single challenged block FAILs exactly when it is an affected one. The record id (and so
    # which block a nonce picks) changes with the random key, so draw nonces until both an
    # affected and an unaffected block have been challenged; 64 draws miss one with p < 1e-7.
    seen = set()
    for i in range(64):
        c = _challenge(bad, engine, count=1, nonce=bytes([i]) * 32)
        hit = c.blocks[0][0] in affected
        if hit in seen:
            continue
        bundle = tmp_path / f"b{i + 1}"
        open_inference_bundle(tmp_path / "bad", c, bundle, model=model)
        report = audit_inference_bundle(bundle, c, key.public_key, model)
        assert report.verdict == ("FAIL" if hit else "PASS"), (c.blocks, report.summary())
        seen.add(hit)
        if seen == {True, False}:
            break
    assert seen == {True, False}


def test_inference_bundle_for_another_challenge_or_incomplete_fails(model_dir, tmp_path):
    model = model_dir("llama")
    key = SigningKey.generate()
    result, engine = infer(model, tmp_path / "rec", key=key)
    c = _challenge(result, engine, count=1, nonce=b"\x01" * 32)
    other = _challenge(result, engine, "all")
    open_inference_bundle(tmp_path / "rec", c, tmp_path / "b", model=model)
    assert "another challenge" in audit_inference_bundle(tmp_path / "b", other, key.public_key, model).summary()
    # a v6 bundle without the record's boundaries file: the audit does not regenerate them, it FAILs
    shutil.rmtree(tmp_path / "b" / "boundaries")
    report = audit_inference_bundle(tmp_path / "b", c, key.public_key, model)
    assert report.verdict == "FAIL" and "boundaries file" in report.summary(), report.summary()
    # every block challenged, the stored boundaries removed: the blocks that read one FAIL
    open_inference_bundle(tmp_path / "rec", other, tmp_path / "all", model=model)
    assert audit_inference_bundle(tmp_path / "all", other, key.public_key, model).verdict == "PASS"
    shutil.rmtree(tmp_path / "all" / "objects")
    report = audit_inference_bundle(tmp_path / "all", other, key.public_key, model)
    assert [r.verdict for r in report.results] == ["PASS"] + ["FAIL"] * (len(engine.blocks) - 1), report.summary()


def test_inference_audit_through_the_cli(model_dir, tmp_path):
    model = model_dir("llama")
    key_path = tmp_path / "provider.key"
    key = SigningKey.generate()
    key.save(key_path)
    result, engine = infer(model, tmp_path / "rec", key=key)
    py = [sys.executable, "-m", "aftune"]
    steps = [
        [*py, "challenge", "--record-root", result.record_id, "--layer-blocks", str(len(engine.blocks)),
         "--sample-blocks", "2", "--out", str(tmp_path / "c.json")],
        [*py, "open", str(tmp_path / "rec"), "--challenge", str(tmp_path / "c.json"), "--out", str(tmp_path / "b"),
         "--model", str(model)],
    ]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    from conftest import invoke

    audit = ["audit", tmp_path / "b", "--challenge", tmp_path / "c.json", "--public-key", str(key_path) + ".pub",
             "--model", model]
    r = invoke(*audit, "--prompt", PROMPT)  # no policy: the record is compared with what the client asked
    assert r.exit_code == 2 and "--policy FILE" in r.output, r.output
    r = invoke(*audit, "--prompt", PROMPT, "--max-new-tokens", "6")
    assert r.exit_code == 0 and "PASS: 2/2 blocks pass" in r.output, r.output
    r = invoke(*audit, "--prompt", PROMPT, "--max-new-tokens", "9")  # the client asked for more than it got
    assert r.exit_code == 1 and "max_new_tokens" in r.output, r.output
    r = invoke(*audit, "--prompt", "Q: another question?", "--max-new-tokens", "6")
    assert r.exit_code == 1 and "input" in r.output, r.output
    r = invoke(*audit, "--unsafe-skip-input-check", "--unsafe-skip-policy-check")
    assert r.exit_code == 0 and "NOT CHECKED" in r.output, r.output
