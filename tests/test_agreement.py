"""A PASS means the agreed computation happened (issue 9): each dishonest provider below got exit 0
before the client's agreement was an input to every verdict. Now each FAILs, naming what differs
from the agreement, in `aftune verify` and in the two-party audit alike; honest runs PASS.

Dishonest providers are built as a provider would: by training with other inputs or settings, or
by editing its files and re-signing the transcript with its own key (it holds it)."""

from __future__ import annotations

import json
import shutil

import pytest

from aftune.core.encoding import canonical_json
from aftune.core.signing import SigningKey
from aftune.errors import InputError
from aftune.training.agreement import Agreement, make_agreement
from aftune.training.run import config_digest
from aftune.training.settings import LoraSettings, TrainSettings
from aftune.training.train import train
from aftune.training.verify import Verifier
from conftest import DATA_KIND, agreement_for, failing, invoke, verify_all
from test_tampering import FlipExponentBit, _resign, _rewrite_transcript

SETTINGS = dict(steps=2, batch_size=4, seq_len=32, layers_per_block=2, steps_per_block=2, lr=1e-2, boundaries="stored")


def _client_agreement(model_dir, datasets, family="llama", **kw) -> Agreement:
    return make_agreement(model_dir(family), datasets[DATA_KIND[family]], TrainSettings(**{**SETTINGS, **kw}))


def _provider_run(tmp_path, name, model, data, **kw):
    """A provider that trains whatever it likes, without the client's agreement."""
    from aftune.core.signing import PublicKey

    result = train(model, data, tmp_path / name, TrainSettings(**{**SETTINGS, **kw}))
    return tmp_path / name, PublicKey.load(result.public_key_path)


def _named(report, field) -> bool:
    return any(f.tensor == field or f.tensor.startswith(field + ".") for f in report.errors)


def _edit_config_and_resign(run_dir, edit):
    """The provider rewrites config.json and re-signs the whole transcript with its own key."""
    config = json.loads((run_dir / "config.json").read_text())
    edit(config)
    data = canonical_json(config)
    (run_dir / "config.json").write_bytes(data)
    key = SigningKey.load(run_dir / "provider.key")

    def resign(lines):
        lines[0]["config_digest"] = lines[-1]["config_digest"] = config_digest("blake3", data).hex()
        _resign(lines, key)

    _rewrite_transcript(run_dir, resign)


def test_honest_run_under_the_agreement_passes(record):
    run, key = record("llama", **SETTINGS)
    report = verify_all(run, key)
    assert report.verdict == "PASS" and not report.notes, report.summary()
    assert report.agreement == agreement_for(run).digest().hex()


# --- what the provider trained with -------------------------------------------------------------

def test_other_settings_than_agreed_fail_naming_each_field(model_dir, datasets, tmp_path):
    agreement = _client_agreement(model_dir, datasets)
    run, key = _provider_run(tmp_path, "run", model_dir("llama"), datasets["text"], **{**SETTINGS, "steps": 1, "lr": 2e-2})
    report = Verifier(run, key, agreement).verify_all()
    assert report.verdict == "FAIL" and not report.results  # nothing replayed under the wrong settings
    assert _named(report, "config.settings.steps") and _named(report, "config.settings.lr")
    assert _named(report, "config.agreement")
    assert "other training settings than agreed" in report.summary()


def test_a_tokenizer_that_rewrites_the_data_fails(model_dir, datasets, tmp_path):
    """Same weights, same dataset root: only the tokenizer's normalizer changes 'plus' to 'minus'."""
    model = tmp_path / "model"
    shutil.copytree(model_dir("llama"), model)
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Replace", "pattern": {"String": "plus"}, "content": "minus"}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    agreement = _client_agreement(model_dir, datasets)
    run, key = _provider_run(tmp_path, "run", model, datasets["text"])
    report = Verifier(run, key, agreement).verify_all()
    assert report.verdict == "FAIL" and _named(report, "config.model.tokenizer")
    assert "tokenizer is not the agreed one" in report.summary()


def test_fewer_layers_than_the_agreed_architecture_fail(model_dir, datasets, tmp_path):
    """The provider trains a 2-layer cut of the agreed 4-layer model: the unused base weights were
    never noticed before."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(tmp_path / "cut")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir("llama") / f, tmp_path / "cut" / f)
    agreement = _client_agreement(model_dir, datasets)
    run, key = _provider_run(tmp_path, "run", tmp_path / "cut", datasets["text"])
    report = Verifier(run, key, agreement).verify_all()
    assert report.verdict == "FAIL" and _named(report, "config.model.config.num_hidden_layers")
    assert _named(report, "config.model.base_weights")


def test_an_agreement_whose_architecture_drops_base_tensors_is_refused(model_dir, datasets, record):
    run, key = record("llama", **SETTINGS)
    good = agreement_for(run)
    bad = Agreement(**{**good.__dict__, "base_config": {**good.base_config, "num_hidden_layers": 2}})
    with pytest.raises(InputError, match="base tensors are not those of its architecture"):
        Verifier(run, key, bad)


def test_a_batch_spec_that_cuts_examples_short_fails(model_dir, datasets, tmp_path):
    """Trained with 16-token examples, committed as if under the agreed 32: before, the verifier
    rebuilt batches from the committed batch spec; now it derives the spec from the agreement."""
    agreement = _client_agreement(model_dir, datasets)
    run, key = _provider_run(tmp_path, "run", model_dir("llama"), datasets["text"], **{**SETTINGS, "seq_len": 16})

    def claim_agreed(config):
        config["settings"]["seq_len"] = 32
        config["agreement"] = agreement.digest().hex()

    _edit_config_and_resign(run, claim_agreed)
    report = Verifier(run, key, agreement).verify_all()
    assert report.verdict == "FAIL" and _named(report, "config.batch.seq_len"), report.summary()


def test_a_poisoned_dataset_fails_in_verify_and_in_the_audit(model_dir, datasets, tmp_path):
    from aftune.protocol.audit import audit_bundle
    from aftune.protocol.challenge import challenge_from_transcript
    from aftune.protocol.opening import open_bundle

    poisoned = tmp_path / "poisoned.jsonl"
    poisoned.write_text(datasets["text"].read_text().replace("plus", "minus"))
    agreement = _client_agreement(model_dir, datasets)
    run, key = _provider_run(tmp_path, "run", model_dir("llama"), poisoned)
    assert Verifier(run, key, agreement).verify_all().verdict == "FAIL"
    c = challenge_from_transcript(run / "transcript.jsonl", key, "all", agreement=agreement)
    open_bundle(run, c, tmp_path / "bundle")
    report = audit_bundle(tmp_path / "bundle", run / "transcript.jsonl", key, c,
                          agreement=agreement)
    assert report.verdict == "FAIL" and _named(report, "config.data.root"), report.summary()
    assert "not trained on the agreed dataset" in report.summary()


def test_permuted_class_labels_fail_in_verify_and_in_the_audit(record, tmp_path):
    """The provider opens honestly, then permutes the labels in the run config (the bundle's copy
    too), re-signs the transcript the client receives and re-labels the bundle for the client's
    new challenge: before, the bundle's replay took the labels from that config and PASSed."""
    from aftune.protocol.audit import audit_bundle
    from aftune.protocol.challenge import challenge_from_transcript
    from aftune.protocol.opening import open_bundle

    run, key = record("bert", **SETTINGS)
    agreement = agreement_for(run)
    first = challenge_from_transcript(run / "transcript.jsonl", key, "all", agreement=agreement)
    open_bundle(run, first, tmp_path / "bundle")
    _edit_config_and_resign(run, lambda config: config["data"]["labels"].reverse())
    shutil.copy(run / "config.json", tmp_path / "bundle" / "config.json")
    report = verify_all(run, key)
    assert report.verdict == "FAIL" and _named(report, "config.data.labels")
    c = challenge_from_transcript(run / "transcript.jsonl", key, "all", agreement=agreement)
    doc = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    doc["challenge_digest"] = c.digest
    (tmp_path / "bundle" / "bundle.json").write_text(json.dumps(doc))
    report = audit_bundle(tmp_path / "bundle", run / "transcript.jsonl", key, c,
                          agreement=agreement)
    assert report.verdict == "FAIL" and _named(report, "config.data.labels"), report.summary()
    assert "class labels are not the agreed ones" in report.summary()


def test_a_challenge_on_a_run_with_other_steps_fails(model_dir, datasets, tmp_path):
    from aftune.errors import CommitmentMismatch
    from aftune.protocol.challenge import challenge_from_transcript

    agreement = _client_agreement(model_dir, datasets)
    run, key = _provider_run(tmp_path, "run", model_dir("llama"), datasets["text"], **{**SETTINGS, "steps": 4})
    with pytest.raises(CommitmentMismatch, match="not the agreed one"):
        challenge_from_transcript(run / "transcript.jsonl", key, "all", agreement=agreement)


# --- what the client runs afterwards: RUN/model -------------------------------------------------

def _resign_final_model(run_dir):
    """The provider edits RUN/model and re-signs the run line over the new model digest."""
    from aftune.core.encoding import DTYPE_BY_NAME
    from aftune.models import load_pretrained, model_commitment

    _, model = load_pretrained(run_dir / "model", "sdpa", DTYPE_BY_NAME["float32"])
    digest = model_commitment(model, run_dir / "model", "blake3")[0]
    key = SigningKey.load(run_dir / "provider.key")

    def resign(lines):
        lines[-1]["final_model_digest"] = digest.hex()
        _resign(lines, key)

    _rewrite_transcript(run_dir, resign)


def test_an_edited_served_config_fails_even_when_re_signed(record):
    run, key = record("llama", **SETTINGS)
    cfg = json.loads((run / "model" / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (run / "model" / "config.json").write_text(json.dumps(cfg))
    report = verify_all(run, key)
    assert report.verdict == "FAIL" and "not the model whose digest the run root signs" in report.summary()
    _resign_final_model(run)
    report = verify_all(run, key)
    assert report.verdict == "FAIL" and "not the agreed architecture" in report.summary(), report.summary()
    assert any(f.tensor == "config.json" for f in report.errors)


def test_an_edited_tokenizer_in_the_final_model_fails(record):
    run, key = record("llama", **SETTINGS)
    path = run / "model" / "tokenizer_config.json"
    path.write_text(path.read_text().replace("}", ', "model_max_length": 7}', 1))
    _resign_final_model(run)
    report = verify_all(run, key)
    assert report.verdict == "FAIL" and any(f.tensor == "tokenizer" for f in report.errors), report.summary()


def test_lora_final_model_must_be_the_merge_of_base_and_adapters(record):
    from safetensors.torch import load_file, save_file

    run, key = record("llama", **SETTINGS, lora=LoraSettings(r=4, alpha=8))
    assert verify_all(run, key).verdict == "PASS"
    path = run / "model" / "model.safetensors"
    weights = load_file(path)
    name = next(n for n in weights if "q_proj" in n)
    weights[name] = weights[name] * 1.01  # not the merge any more
    save_file(weights, path, metadata={"format": "pt"})
    _resign_final_model(run)
    report = verify_all(run, key)
    assert report.verdict == "FAIL" and "is not the merge" in report.summary(), report.summary()


# --- failing at the right place, never crashing ------------------------------------------------

def test_a_flipped_bit_with_sparse_checkpoints_is_a_fail_not_missing_data(record):
    """Checkpoints every 4 step blocks: the block after the flip cannot be regenerated, and that
    is reported as the FAIL it is (exit 1), not as a record that lacks data (exit 2)."""
    run, key = record("llama", steps=8, steps_per_block=1, checkpoint_interval=4, batch_size=4, seq_len=32,
                      lr=1e-2, deviation=FlipExponentBit(step=1))
    report = verify_all(run, key)
    assert report.verdict == "FAIL"
    assert (1, 1) in failing(report)
    later = [r for r in report.results if (r.layer_block, r.step_block) == (1, 2)][0]
    assert later.findings[0].check == "start_state" and "step block 1 failed" in later.findings[0].reason


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["model"]["config"].__setitem__("hidden_act", "no-such-activation"), "config.model.config.hidden_act"),
    (lambda c: c["settings"].__setitem__("lora", {"r": 4, "alpha": "sixteen", "dropout": 0.0, "target_modules": []}),
     "config.settings.lora"),
])
def test_bad_provider_config_values_are_a_fail_naming_the_field(record, edit, field):
    run, key = record("llama", **SETTINGS)
    _edit_config_and_resign(run, edit)
    report = verify_all(run, key)
    assert report.verdict == "FAIL" and _named(report, field), report.summary()
    # and without an agreement (self-consistency only) the bad value is bad input, never a crash
    r = invoke("verify", run, "--public-key", key.text, "--all", "--unsafe-no-agreement")
    assert r.exit_code == 2, r.output
    assert field.split(".")[-1] in r.output


def test_agreement_files_are_hostile_input(record, tmp_path):
    run, key = record("llama", **SETTINGS)
    doc = agreement_for(run).to_json()
    bad = {**doc, "settings": {**doc["settings"], "lr": -1}, "hash": "md5", "extra": 1}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = invoke("verify", run, "--public-key", key.text, "--agreement", tmp_path / "bad.json", "--all")
    assert r.exit_code == 2 and "lr must be" in r.output and "hash must be" in r.output and "unknown fields" in r.output
    doc["base_model"]["weights"] = "00" * 32
    (tmp_path / "inconsistent.json").write_text(json.dumps(doc))
    r = invoke("verify", run, "--public-key", key.text, "--agreement", tmp_path / "inconsistent.json", "--all")
    assert r.exit_code == 2 and "not the root of base_model.tensors" in r.output


def test_a_signed_agreement_is_checked_against_the_client_key(record, tmp_path):
    run, key = record("llama", **SETTINGS)
    client = SigningKey.generate()
    agreement_for(run).signed(client).save(tmp_path / "signed.json")
    assert Agreement.load(tmp_path / "signed.json").digest() == agreement_for(run).digest()  # the signature is outside
    r = invoke("verify", run, "--public-key", key.text, "--agreement", tmp_path / "signed.json", "--all",
               "--client-public-key", client.public_key.text)
    assert r.exit_code == 0, r.output
    r = invoke("verify", run, "--public-key", key.text, "--agreement", tmp_path / "signed.json", "--all",
               "--client-public-key", SigningKey.generate().public_key.text)
    assert r.exit_code == 1 and "not signed by the pinned client key" in r.output


def test_training_from_an_agreement_refuses_other_inputs(model_dir, datasets, tmp_path):
    agreement = _client_agreement(model_dir, datasets)
    other = tmp_path / "other.jsonl"
    other.write_text(datasets["text"].read_text().replace("plus", "minus"))
    with pytest.raises(InputError, match="not the agreed ones"):
        train(model_dir("llama"), other, tmp_path / "run", agreement=agreement)
    with pytest.raises(InputError, match="come from the agreement"):
        train(model_dir("llama"), datasets["text"], tmp_path / "run2", TrainSettings(steps=99), agreement=agreement)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()  # nothing was trained
