"""The command line: exit codes 0 PASS, 1 FAIL, 2 bad input; clear messages, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import invoke



SETTINGS = ("--steps", 4, "--batch-size", 4, "--steps-per-block", 2, "--layers-per-block", 4)


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    """The client writes its agreement for the built-in model and data; the provider trains under it."""
    from aftune.builtin import DATA_FILE, MODEL_DIR

    run = tmp_path_factory.mktemp("cli") / "demo"
    r = invoke("agree", "--base-model", MODEL_DIR, "--data", DATA_FILE, *SETTINGS, "--out", agreement(run))
    assert r.exit_code == 0, r.output
    r = invoke("train", "--run-dir", run, "--agreement", agreement(run))
    assert r.exit_code == 0, r.output
    assert "run root" in r.output
    return run


@pytest.fixture
def run_copy(builtin_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(builtin_run, dst)
    shutil.copy(agreement(builtin_run), agreement(dst))
    return dst


def pub(run):
    return run / "provider.key.pub"


def agreement(run):
    return run.with_name(run.name + ".agreement.json")


def test_honest_builtin_run_passes_with_exit_0(builtin_run):
    r = invoke("verify", builtin_run, "--agreement", agreement(builtin_run), "--public-key", pub(builtin_run), "--all")
    assert r.exit_code == 0, r.output
    assert "PASS: 4/4 blocks pass" in r.output
    r = invoke("verify", builtin_run, "--agreement", agreement(builtin_run), "--public-key", pub(builtin_run), "-l", 1, "-s", 1, "--json")
    assert r.exit_code == 0
    report = json.loads(r.stdout)
    assert report["verdict"] == "PASS" and report["blocks"][0]["compared"] > 0


def test_model_written_in_hugging_face_format(builtin_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(builtin_run / "model")
    tok = AutoTokenizer.from_pretrained(builtin_run / "model")
    assert model.config.model_type == "llama" and tok("Q: hi")["input_ids"]
    digest = invoke("digest", builtin_run / "model")
    final = json.loads((builtin_run / "transcript.jsonl").read_text().splitlines()[-1])["final_model_digest"]
    assert f"model   {final}" in digest.output  # the run root binds weights, config and tokenizer files
    config = json.loads((builtin_run / "config.json").read_text())
    assert f"weights {config['model']['base_weights']}" not in digest.output  # fine-tuned: not the base weights


@pytest.mark.parametrize("args, message", [
    ((), "Usage"),
    (("verify", "RUN", "--all"), "--public-key"),
    (("verify", "RUN", "--public-key", "PUB", "--all"), "aftune agree"),
    (("verify", "RUN", "--agreement", "/nonexistent.json", "--public-key", "PUB", "--all"), "is missing"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "-l", "0"), "--step-block"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "-l", "9", "-s", "0"), "layer block 9 does not exist"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "-l", "0", "-s", "7"), "step block 7 does not exist"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "ed25519:zz", "--all"), "not hex"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "/nonexistent.pub", "--all"), "does not exist"),
    (("verify", "/nonexistent-run", "--agreement", "AGR", "--public-key", "PUB", "--all"), "does not exist"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "--all", "--mode", "fuzzy"), "mode must be one of"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "--all", "--dtype", "float64"), "--mode tolerance"),
])
def test_bad_usage_exits_2(builtin_run, args, message):
    names = {"RUN": builtin_run, "PUB": pub(builtin_run), "AGR": agreement(builtin_run)}
    args = [str(names.get(a, a)) for a in args]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_bad_training_settings_are_all_reported(tmp_path):
    r = invoke("train", "--run-dir", tmp_path / "r", "--steps", 0, "--lr", -1, "--optimizer", "lion")
    assert r.exit_code == 2
    for problem in ("steps must be a positive integer", "lr must be", "optimizer must be one of"):
        assert problem in r.output


def test_existing_run_dir_is_never_overwritten(builtin_run):
    r = invoke("train", "--run-dir", builtin_run, "--steps", 1)
    assert r.exit_code == 2 and "never overwritten" in r.output


def test_malformed_dataset_lines_are_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok"}\n{"txt": 1}\nnot json\n')
    r = invoke("train", "--run-dir", tmp_path / "r", "--data", data, "--steps", 1)
    assert r.exit_code == 2 and "line 2" in r.output and "line 3" in r.output


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("target, message", [
    ("manifest", "not valid JSON"),
    ("object", "truncated or corrupt"),
    ("transcript", "not JSON"),
    ("missing-manifest", "is missing"),
    ("missing-object", "is not stored"),
    ("data", "does not match the committed dataset root"),
])
def test_damaged_records_exit_2_or_fail_never_pass(run_copy, target, message):
    if target == "manifest":
        _truncate(run_copy / "manifests" / "000001.json")
    elif target == "missing-manifest":
        (run_copy / "manifests" / "000001.json").unlink()
    elif target in ("object", "missing-object"):
        row = next(r for r in json.loads((run_copy / "manifests" / "000001.json").read_text())["common"]
                   if r[0].endswith("boundary/0001/gradient"))
        path = run_copy / "objects" / row[4][:2] / f"{row[4]}.safetensors.zst"
        _truncate(path) if target == "object" else path.unlink()
    elif target == "transcript":
        _truncate(run_copy / "transcript.jsonl", 0.7)
    elif target == "data":
        path = next((run_copy / "data").iterdir())
        path.write_text(path.read_text().replace("plus", "minus", 1))
    r = invoke("verify", run_copy, "--agreement", agreement(run_copy), "--public-key", pub(run_copy), "--all")
    expected = 1 if target == "data" else 2  # edited data contradicts the commitment: FAIL
    assert r.exit_code == expected, r.output
    assert message in r.output
    assert "PASS:" not in r.output


def test_edited_config_fails_with_exit_1(run_copy):
    cfg = run_copy / "config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b'"lr":0.001', b'"lr":0.002'))
    r = invoke("verify", run_copy, "--agreement", agreement(run_copy), "--public-key", pub(run_copy), "--all")
    assert r.exit_code == 1 and "does not match the config digest" in r.output


def test_wrong_public_key_fails_with_exit_1(run_copy, tmp_path):
    invoke("keygen", tmp_path / "other.key")
    r = invoke("verify", run_copy, "--agreement", agreement(run_copy), "--public-key", tmp_path / "other.key.pub", "--all")
    assert r.exit_code == 1 and "not by the pinned provider key" in r.output


def test_tampered_block_exits_1_and_is_named(run_copy):
    from aftune.core.store import ObjectStore, TensorRef
    from safetensors.torch import save
    import zstandard

    row = next(r for r in json.loads((run_copy / "manifests" / "000001.json").read_text())["common"]
               if r[0].endswith("boundary/0001/gradient"))
    ref = TensorRef(row[1], row[2], tuple(row[3]), bytes.fromhex(row[4]))
    t = ObjectStore(run_copy / "objects", "blake3").get(ref, "test") * 1.001
    (run_copy / "objects" / row[4][:2] / f"{row[4]}.safetensors.zst").write_bytes(
        zstandard.ZstdCompressor().compress(save({row[1]: t})))
    r = invoke("verify", run_copy, "--agreement", agreement(run_copy), "--public-key", pub(run_copy), "--all")
    assert r.exit_code == 1
    assert "FAIL layer block 0" in r.output and "step block 1" in r.output and "altered" in r.output


def test_keygen_refuses_to_overwrite(tmp_path):
    assert invoke("keygen", tmp_path / "k").exit_code == 0
    r = invoke("keygen", tmp_path / "k")
    assert r.exit_code == 2 and "never overwritten" in r.output


def test_console_script_exit_codes(builtin_run):
    ok = subprocess.run([sys.executable, "-m", "aftune", "verify", str(builtin_run), "--public-key",
                         str(pub(builtin_run)), "--agreement", str(agreement(builtin_run)), "-l", "0", "-s", "0"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "aftune", "verify", str(builtin_run)], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_agreed_base_model_and_data_are_checked(builtin_run, tmp_path):
    """The client's own agreement, written from other data or another base model, FAILs the run,
    naming what differs; the honest one PASSes; none at all is refused unless the user says unsafe."""
    from aftune.builtin import DATA_FILE, MODEL_DIR

    ok = invoke("verify", builtin_run, "--agreement", agreement(builtin_run), "--public-key", pub(builtin_run),
                "-l", 0, "-s", 0)
    assert ok.exit_code == 0, ok.output
    other = tmp_path / "other.jsonl"
    other.write_text((DATA_FILE).read_text().replace("plus", "minus", 1))
    assert invoke("agree", "--base-model", MODEL_DIR, "--data", other, *SETTINGS, "--out", tmp_path / "a1").exit_code == 0
    r = invoke("verify", builtin_run, "--agreement", tmp_path / "a1", "--public-key", pub(builtin_run), "-l", 0, "-s", 0)
    assert r.exit_code == 1 and "not trained on the agreed dataset" in r.output and "config.data.root" in r.output
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(MODEL_DIR, tmp_path / "base")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # a base model one weight away from the agreed one
    m.save_pretrained(tmp_path / "base")
    assert invoke("agree", "--base-model", tmp_path / "base", "--data", DATA_FILE, *SETTINGS,
                  "--out", tmp_path / "a2").exit_code == 0
    r = invoke("verify", builtin_run, "--agreement", tmp_path / "a2", "--public-key", pub(builtin_run), "--all")
    assert r.exit_code == 1 and "did not start from the agreed base model" in r.output
    assert "config.model.base_weights" in r.output
    r = invoke("verify", builtin_run, "--public-key", pub(builtin_run), "--all")
    assert r.exit_code == 2 and "aftune agree" in r.output and "PASS" not in r.output
    r = invoke("verify", builtin_run, "--public-key", pub(builtin_run), "--all", "--unsafe-no-agreement")
    assert r.exit_code == 0 and "only the record's consistency with itself was checked" in r.output
