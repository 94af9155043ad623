"""Digest-only boundaries (SPEC.md 3.8): the record stores no boundary tensors, no base state
and no final state; the provider regenerates them by re-running the model (training/regenerate.py)
and every regenerated tensor must match its commitment.

    PYTHONPATH=src pytest tests/test_digest_boundaries.py -p no:cacheprovider -n 0 -q
"""

from __future__ import annotations

import shutil

import pytest

from aftune.errors import CommitmentMismatch, InputError, RecordError
from aftune.protocol.audit import audit_bundle
from aftune.protocol.challenge import challenge_from_transcript
from aftune.protocol.opening import open_bundle
from aftune.training.check import check_run
from aftune.training.regenerate import prepare_digest
from aftune.training.run import RunRecord
from conftest import agreement_for, failing, verifier
from test_tampering import FlipExponentBit

SETTINGS = dict(steps=6, steps_per_block=2, boundaries="digest")  # three step blocks


def _stored(run_dir, key):
    """{(step block, 'boundary' | 'state'): (stored, committed)} of the record."""
    rec = RunRecord.open(run_dir, key)
    out = {}
    for s in range(rec.num_step_blocks + 1):
        m = rec.manifest(s)
        bounds = [r for k, r in m.common.items() if "/boundary/" in k]
        state = [r for b in m.blocks for r in b.values()]
        out[(s, "boundary")] = (sum(rec.store.has(r.digest) for r in bounds), len(bounds))
        out[(s, "state")] = (sum(rec.store.has(r.digest) for r in state), len(state))
    return out


@pytest.fixture
def digest_run(record):
    return record("llama", **SETTINGS)


def test_digest_run_stores_no_boundary_nor_base_or_final_state(digest_run):
    run_dir, key = digest_run
    stored = _stored(run_dir, key)
    for s in range(3):
        assert stored[(s, "boundary")][0] == 0 and stored[(s, "boundary")][1] > 0
    assert stored[(0, "state")][0] == 0  # the agreed base model
    assert stored[(3, "state")][0] == 0  # the final state: the exported model
    for s in (1, 2):
        assert stored[(s, "state")][0] == stored[(s, "state")][1] > 0  # checkpoints (I_C = 1)
    assert '"boundaries":"digest"' in (run_dir / "config.json").read_text()
    report = check_run(run_dir, key)  # aftune check: what is digest-only is not missing
    assert report.status == "intact", [p.__dict__ for p in report.problems]


def test_verify_says_prepare_and_never_passes_without_the_tensors(digest_run):
    run_dir, key = digest_run
    v = verifier(run_dir, key)
    with pytest.raises(RecordError, match="aftune prepare") as err:
        v.verify_block(1, 1)
    assert not isinstance(err.value, CommitmentMismatch)  # missing data (exit 2), not a verdict
    with pytest.raises(RecordError, match="aftune prepare"):
        v.verify_all()


def test_prepare_all_then_verify_all_passes(digest_run, model_dir):
    run_dir, key = digest_run
    v = verifier(run_dir, key)
    r = prepare_digest(v, base_model=model_dir("llama"))
    assert r.start == 0 and r.step_blocks == [0, 1, 2] and r.boundaries > 0 and r.states > 0
    stored = _stored(run_dir, key)
    assert all(have == total for have, total in stored.values()), stored
    report = verifier(run_dir, key).verify_all()
    assert report.verdict == "PASS", report.summary()
    assert prepare_digest(verifier(run_dir, key), base_model=model_dir("llama")).tensors == 0  # idempotent


def test_prepare_one_block_reruns_from_the_nearest_checkpoint(digest_run):
    run_dir, key = digest_run
    v = verifier(run_dir, key)
    r = prepare_digest(v, 1, 2)  # no base model needed: step block 2's state is a checkpoint
    assert r.start == 2 and r.step_blocks == [2] and r.boundaries > 0
    result, _ = verifier(run_dir, key).verify_block(1, 2)
    assert result.verdict == "PASS", result.headline()


def test_regenerating_from_another_base_model_is_refused_naming_the_tensor(digest_run, model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir, key = digest_run
    other = tmp_path / "other-base"
    shutil.copytree(model_dir("llama"), other)
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CommitmentMismatch, match=f"state/{name}.*step block 0"):
        prepare_digest(verifier(run_dir, key), 0, 0, base_model=other)
    assert _stored(run_dir, key)[(0, "boundary")][0] == 0  # nothing was stored


def test_a_record_that_is_not_the_computation_cannot_be_regenerated(record):
    """The provider changed a weight after step 2 (mid step block 1) and committed what it then
    computed: re-running step block 1 from its checkpoint gives other step-3 tensors."""
    run_dir, key = record("llama", deviation=FlipExponentBit(step=2), **SETTINGS)
    with pytest.raises(CommitmentMismatch, match=r"step block 1: the regenerated step/00000003/"):
        prepare_digest(verifier(run_dir, key), 1, 1)


def test_open_regenerates_and_the_audit_passes_or_fails_the_tampered_block(record, digest_run, model_dir, tmp_path):
    run_dir, key = digest_run
    c = challenge_from_transcript(run_dir / "transcript.jsonl", key, "all")
    open_bundle(run_dir, c, tmp_path / "bundle", base_model=model_dir("llama"))
    report = audit_bundle(tmp_path / "bundle", run_dir / "transcript.jsonl", key, c, agreement=agreement_for(run_dir))
    assert report.verdict == "PASS", report.summary()

    # tampered after the last update of step block 1: its boundaries regenerate, its end state FAILs
    bad_dir, bad_key = record("llama", deviation=FlipExponentBit(step=3), **SETTINGS)
    c = challenge_from_transcript(bad_dir / "transcript.jsonl", bad_key, "all")
    with pytest.raises(InputError, match="pass --base-model"):
        open_bundle(bad_dir, c, tmp_path / "bad")
    open_bundle(bad_dir, c, tmp_path / "bad2", base_model=model_dir("llama"))
    report = audit_bundle(tmp_path / "bad2", bad_dir / "transcript.jsonl", bad_key, c,
                          agreement=agreement_for(bad_dir))
    assert report.verdict == "FAIL" and (1, 1) in failing(report), report.summary()


def test_a_lost_checkpoint_object_is_regenerated_from_the_checkpoint_before(digest_run):
    run_dir, key = digest_run
    rec = RunRecord.open(run_dir, key)
    ref = next(iter(rec.manifest(2).blocks[1].values()))
    rec.store.unpack()  # loose objects, so that one can be lost
    rec.store.path(ref.digest).unlink()
    r = prepare_digest(verifier(run_dir, key), 1, 2)
    assert r.start == 1 and r.step_blocks == [1, 2] and rec.store.has(ref.digest)
    assert rec.store.get(ref, "test") is not None  # stored under its digest, and it checks


def test_lora_digest_run_regenerates_from_the_base_model_and_passes(record, model_dir):
    """LoRA: the base state is the base model and the seeded adapters; the final state (which the
    merge check reads) is regenerated too."""
    from aftune.training.settings import LoraSettings

    run_dir, key = record("llama", steps=4, steps_per_block=2, boundaries="digest", lora=LoraSettings(r=4))
    with pytest.raises(RecordError, match="aftune prepare"):
        verifier(run_dir, key).verify_all()
    prepare_digest(verifier(run_dir, key), base_model=model_dir("llama"))
    report = verifier(run_dir, key).verify_all()
    assert report.verdict == "PASS", report.summary()


def test_portable_digest_run_regenerates_its_log_and_passes(record, model_dir):
    """Portable numerics: the re-run recomputes the near-boundary log entries too, each by digest."""
    run_dir, key = record("llama", steps=4, steps_per_block=2, boundaries="digest", numerics="portable")
    r = prepare_digest(verifier(run_dir, key), base_model=model_dir("llama"))
    assert r.step_blocks == [0, 1]
    report = verifier(run_dir, key).verify_all()
    assert report.verdict == "PASS", report.summary()


def test_tied_group_is_regenerated_together(record):
    """qwen2 ties its embedding and LM head: preparing block 0 stores the last block's state too,
    and both replay from what one prepare regenerated."""
    run_dir, key = record("qwen2", **SETTINGS)
    v = verifier(run_dir, key)
    last = len(v.blocked.blocks) - 1
    assert last in v.blocked.tied_group(0)
    prepare_digest(v, 0, 1)
    assert prepare_digest(verifier(run_dir, key), last, 1).tensors == 0  # nothing left to regenerate
    for layer_block in (0, last):
        result, _ = verifier(run_dir, key).verify_block(layer_block, 1)
        assert result.verdict == "PASS", result.headline()


def test_default_cli_run_is_digest_only_verify_needs_prepare(tmp_path):
    """`aftune agree` and `aftune train` without --boundaries record digest-only boundaries: no
    boundary tensor is stored, `verify` without `prepare` exits 2 naming it, with it PASSes."""
    from aftune.core.signing import PublicKey
    from conftest import invoke

    run, agreement = tmp_path / "run", tmp_path / "agreement.json"
    r = invoke("agree", "--steps", 4, "--batch-size", 4, "--steps-per-block", 2, "--out", agreement)
    assert r.exit_code == 0, r.output
    assert '"boundaries":"digest"' in agreement.read_text().replace(" ", "")
    r = invoke("train", "--run-dir", run, "--agreement", agreement)
    assert r.exit_code == 0, r.output
    pub = run / "provider.key.pub"
    stored = _stored(run, PublicKey.load(pub))
    assert all(stored[(s, "boundary")][0] == 0 < stored[(s, "boundary")][1] for s in range(2)), stored
    assert stored[(0, "state")][0] == 0 and stored[(2, "state")][0] == 0, stored
    args = (run, "--agreement", agreement, "--public-key", pub)
    r = invoke("verify", *args, "--all")
    assert r.exit_code == 2 and "aftune prepare" in r.output and "PASS" not in r.output, r.output
    r = invoke("prepare", *args, "--all")
    assert r.exit_code == 0, r.output
    r = invoke("verify", *args, "--all")
    assert r.exit_code == 0 and "PASS: " in r.output, r.output


def test_new_settings_default_to_digest_and_an_absent_member_still_reads_as_stored():
    """New settings write `"boundaries": "digest"`; settings JSON without the member (every run,
    agreement and test vector made before) keeps reading as stored, and stored keeps its bytes."""
    from aftune.training.settings import TrainSettings

    new = TrainSettings()
    assert new.boundaries == "digest" and new.to_json()["boundaries"] == "digest"
    assert TrainSettings.from_json(new.to_json()) == new
    old = TrainSettings(boundaries="stored").to_json()
    assert "boundaries" not in old
    assert TrainSettings.from_json(old).boundaries == "stored"
    with pytest.raises(InputError, match="boundaries must be one of"):
        TrainSettings.from_json({**old, "boundaries": "none"})
