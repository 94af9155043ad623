"""One front door per workflow (aftune.workflows): the rules a client relies on hold the same in
the Python API and the CLI, a FAIL is a report and never an exception, keys are accepted as paths,
`ed25519:<hex>` or objects, and library calls print nothing.

    python -m pytest -q tests/test_workflows.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import aftune
from aftune.protocol.challenge import challenge_from_transcript, derive_challenge
from conftest import agreement_for, agreement_path, invoke


def _findings(report):
    return [f.reason for f in report.errors] + [f.reason for r in report.results for f in r.findings]


@pytest.fixture
def two_runs(record, tmp_path):
    """Two finished runs of the same agreement but another seed: (run, key) each."""
    a = record("llama", steps=4, steps_per_block=2)
    b = record("llama", steps=4, steps_per_block=2, seed=1)
    return a, b


def test_a_challenge_for_another_run_root_or_grid_fails_the_same_way_in_the_api_and_the_cli(two_runs, tmp_path):
    (run_a, key_a), (run_b, key_b) = two_runs
    honest = challenge_from_transcript(run_b / "transcript.jsonl", key_b, "all")
    aftune.open_challenge(run_b, honest, tmp_path / "bundle")
    verifier = aftune.RunVerifier(agreement_for(run_b), key_b, transcript=run_b / "transcript.jsonl")
    assert verifier.audit(tmp_path / "bundle", honest).verdict == "PASS"

    other_root = challenge_from_transcript(run_a / "transcript.jsonl", key_a, "all")  # drawn from another run
    assert other_root.run_root != honest.run_root
    other_grid = derive_challenge(bytes.fromhex(honest.run_root), bytes(32), honest.num_layer_blocks + 1,
                                  honest.num_step_blocks, "all", kind="training")
    for bad, words in ((other_root, "drawn from another run root"), (other_grid, "grid does not match")):
        path = bad.save(tmp_path / f"challenge-{words[:5]}.json")
        api = aftune.audit(tmp_path / "bundle", run_b / "transcript.jsonl", path, str(run_b / "provider.key.pub"),
                           agreement_path(run_b))
        assert api.verdict == "FAIL" and not api.results
        (finding,) = api.errors
        assert finding.check == "challenge" and words in finding.reason
        cli = invoke("audit", tmp_path / "bundle", "--transcript", run_b / "transcript.jsonl", "--challenge", path,
                     "--public-key", run_b / "provider.key.pub", "--agreement", agreement_path(run_b), "--json")
        assert cli.exit_code == 1, cli.output
        doc = json.loads(cli.output)
        assert doc["verdict"] == "FAIL" and [e["reason"] for e in doc["errors"]] == [finding.reason]
        # the provider's side refuses to open it, with the same words
        with pytest.raises(aftune.InputError, match=words):
            aftune.open_challenge(run_b, bad, tmp_path / f"bundle-{words[:5]}")


def test_a_wrong_key_is_a_fail_report_and_keys_are_taken_in_every_form(record, tmp_path):
    run, key = record("llama", steps=2, steps_per_block=2)
    agreement = agreement_for(run)
    for given in (key, key.text, str(run / "provider.key.pub"), run / "provider.key.pub"):
        report = aftune.RunVerifier(agreement, given).verify(run, block=(0, 0))
        assert report.verdict == "PASS", report.summary()
    other = aftune.SigningKey.generate().public_key
    report = aftune.RunVerifier(agreement, other.text).verify(run)
    assert report.verdict == "FAIL" and not report.results
    assert any("not by the pinned provider key" in r for r in _findings(report))
    with pytest.raises(aftune.InputError, match="private key"):  # a private key where a public one goes
        aftune.RunVerifier(agreement, run / "provider.key")
    with pytest.raises(aftune.InputError, match="PublicKey"):
        aftune.RunVerifier(agreement, 42)


def test_no_agreement_needs_the_named_unsafe_object_and_the_report_says_what_was_not_checked(record):
    run, key = record("llama", steps=2, steps_per_block=2)
    with pytest.raises(aftune.InputError, match="aftune agree"):
        aftune.RunVerifier(None, key)
    with pytest.raises(aftune.InputError, match="not both"):
        aftune.RunVerifier(agreement_for(run), key, unsafe=[aftune.UnsafeNoAgreement()])
    with pytest.raises(aftune.InputError, match="UnsafeNoAgreement"):  # a weakening this workflow does not know
        aftune.RunVerifier(None, key, unsafe=[aftune.UnsafeSkipInputCheck()])
    report = aftune.RunVerifier(None, key, unsafe=aftune.UnsafeNoAgreement()).verify(run)
    assert report.verdict == "PASS" and report.notes and "consistency with itself" in report.notes[0]
    assert "NOT CHECKED" in report.summary()


def test_inference_request_rules_live_in_the_library(model_dir, tmp_path):
    prompt = "Q: what colour is the sky?"
    policy = aftune.policy(model_dir("llama"), max_new_tokens=4, out=tmp_path / "policy.json")
    answer = aftune.infer(model_dir("llama"), prompt, record_dir=tmp_path / "rec", policy=tmp_path / "policy.json")
    assert isinstance(answer.record_id, str) and len(answer.record_id) == 64  # ids are hex text
    key = answer.receipt.key.text
    request = aftune.InferenceRequest(prompt=prompt, policy=policy)
    report = aftune.RecordVerifier(request, model=model_dir("llama"), provider_key=key).verify(tmp_path / "rec")
    assert report.verdict == "PASS" and not report.notes, report.summary()
    with pytest.raises(aftune.InputError, match="generation policy you asked for"):
        aftune.RecordVerifier(aftune.InferenceRequest(prompt=prompt), model=model_dir("llama")).verify(tmp_path / "rec")
    skipped = aftune.RecordVerifier(aftune.InferenceRequest(prompt=prompt), model=model_dir("llama"), provider_key=key,
                                    unsafe=[aftune.UnsafeSkipPolicyCheck()]).verify(tmp_path / "rec")
    assert skipped.verdict == "PASS" and any("generation policy" in n for n in skipped.notes)
    with pytest.raises(aftune.InputError, match="run= needs provider_key"):
        aftune.RecordVerifier(request, run=model_dir("llama"))
    lied = aftune.RecordVerifier(aftune.InferenceRequest(prompt="Q: and the grass?", policy=policy),
                                 model=model_dir("llama"), provider_key=key).verify(tmp_path / "rec")
    assert lied.verdict == "FAIL"
    receipt = tmp_path / "rec" / "receipts" / f"{answer.record_id}.json"
    good = aftune.verify_receipt(receipt, key, record_dir=tmp_path / "rec", policy=policy)
    assert good.verdict == "PASS", good.summary()
    bad = aftune.verify_receipt(receipt, aftune.SigningKey.generate().public_key, record_dir=tmp_path / "rec")
    assert bad.verdict == "FAIL" and "not by the pinned provider key" in bad.summary()
    with pytest.raises(aftune.InputError, match="UnsafeSignatureOnly"):
        aftune.verify_receipt(receipt, key)
    alone = aftune.verify_receipt(receipt, key, unsafe=aftune.UnsafeSignatureOnly())
    assert alone.verdict == "PASS" and any("only the receipt's signature" in n for n in alone.notes)


def test_every_command_has_its_function():
    from aftune.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    groups = {g.name for g in app.registered_groups}
    function_of = {"verify": "verify_run", "verify-inference": "verify_inference", "verify-receipt": "verify_receipt",
                   "challenge": "challenge_run", "open": "open_challenge", "prepare-inference": "prepare_inference",
                   "eval-detection": None, "serve": None, "report": None}  # see docs/cli.md: not library workflows
    for name in sorted(commands):
        fn = function_of.get(name, name.replace("-", "_"))
        if fn is not None:
            assert callable(getattr(aftune, fn)), f"`aftune {name}` has no function aftune.{fn}"
    assert {"attestation", "partition"} <= groups
    assert callable(aftune.verify_attestation) and callable(aftune.check_partition)


def test_a_python_verification_of_the_built_in_run_prints_nothing(tmp_path):
    """In a fresh process (so transformers loads, and would warn, inside the calls)."""
    script = textwrap.dedent(f"""
        import aftune
        from aftune.builtin import DATA_FILE, MODEL_DIR
        agreement = aftune.agree(MODEL_DIR, DATA_FILE, steps=2, steps_per_block=2, boundaries="stored")
        result = aftune.train({str(tmp_path / 'run')!r}, MODEL_DIR, DATA_FILE, agreement=agreement)
        report = aftune.RunVerifier(agreement, str(result.public_key_path)).verify({str(tmp_path / 'run')!r})
        assert report.verdict == "PASS", report.summary()
        assert aftune.check({str(tmp_path / 'run')!r}, result.public_key_path).status == "intact"
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)
