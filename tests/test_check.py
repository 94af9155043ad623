"""`aftune check` (SPEC.md 6.9): the static check of a run, an inference record directory and a
bundle, each honest case paired with a damaged one; and `verify --all`, which runs it first.

    python -m pytest -q tests/test_check.py

One tiny run (llama, 8 steps, step blocks of 2, checkpoint interval 2: state stored at step
blocks 0, 2 and 4) is recorded once for the module; each test damages its own copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import invoke, loose_objects, manifest_doc, write_manifest_doc


@pytest.fixture(scope="module")
def recorded(model_dir, datasets, tmp_path_factory):
    """(run directory, agreement path, inference record directory), never modified."""
    from aftune.training.agreement import make_agreement
    from aftune.training.settings import TrainSettings
    from aftune.training.train import train

    root = tmp_path_factory.mktemp("check")
    settings = TrainSettings(steps=8, batch_size=4, seq_len=32, layers_per_block=2, steps_per_block=2,
                             checkpoint_interval=2, lr=1e-2, boundaries="stored")
    agreement = make_agreement(model_dir("llama"), datasets["text"], settings)
    agreement.save(root / "agreement.json")
    train(model_dir("llama"), datasets["text"], root / "run", agreement=agreement)
    r = invoke("infer", "--model", root / "run", "--prompt", "Q: What is 3 plus 4? A:", "--record-dir",
               root / "records", "--max-new-tokens", "3", "--provider-signing-key", root / "run" / "provider.key")
    assert r.exit_code == 0, r.output
    return root / "run", root / "agreement.json", root / "records"


@pytest.fixture
def run_copy(recorded, tmp_path):
    shutil.copytree(recorded[0], tmp_path / "run")
    return tmp_path / "run"


def pub(run: Path) -> Path:
    return run / "provider.key.pub"


def check(path: Path, key: Path, *extra):
    r = invoke("check", path, "--public-key", key, "--json", *extra)
    return r.exit_code, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else r.output)


def manifest(run: Path, s: int) -> dict:
    return manifest_doc(run, s)


def object_path(root: Path, digest_hex: str) -> Path:
    return root / "objects" / digest_hex[:2] / f"{digest_hex}.safetensors.zst"


def unread_state_object(run: Path) -> str:
    """A state object of checkpoint step block 2 that appears in no other manifest: the chained
    replay of `verify --all` starts from step block 0 and never reads it."""
    others = {r[4] for s in (0, 1, 3, 4) for rows in [manifest(run, s)["common"], *manifest(run, s)["blocks"]]
              for r in rows}
    return next(r[4] for rows in manifest(run, 2)["blocks"] for r in rows if r[4] not in others)


def test_honest_run_is_intact(recorded):
    run = recorded[0]
    code, doc = check(run, pub(run))
    assert code == 0, doc
    assert doc["status"] == "intact" and doc["objects"] > 100
    assert not [p for p in doc["problems"] if p["kind"] in ("damaged", "missing")]
    assert "run is finished" in doc["described"][0]
    r = invoke("check", run, "--public-key", pub(run))
    assert r.exit_code == 0 and "INTACT" in r.output


def test_damaged_unreferenced_object_fails_check_and_verify_all(run_copy, recorded):
    from aftune.core.store import ObjectStore

    digest = unread_state_object(run_copy)
    entry = ObjectStore(run_copy / "objects", "blake3").locate(bytes.fromhex(digest))  # in its step block's pack
    data = bytearray(entry.pack.read_bytes())
    data[entry.offset + entry.length // 2] ^= 0x10
    entry.pack.write_bytes(bytes(data))
    rel = entry.pack.relative_to(run_copy).as_posix()
    code, doc = check(run_copy, pub(run_copy))
    assert code == 1 and doc["status"] == "damaged"
    assert [p for p in doc["problems"] if p["path"] == rel and p["kind"] == "damaged" and digest[:16] in p["reason"]], \
        doc["problems"]
    r = invoke("verify", run_copy, "--agreement", recorded[1], "--public-key", pub(run_copy), "--all")
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and digest[:16] in r.output and "PASS:" not in r.output


def test_missing_object_is_named(run_copy):
    row = next(r for r in manifest(run_copy, 1)["common"] if r[0].endswith("boundary/0001/activation"))
    loose_objects(run_copy)
    object_path(run_copy, row[4]).unlink()
    code, doc = check(run_copy, pub(run_copy))
    assert code == 1
    missing = [p for p in doc["problems"] if p["kind"] == "missing"]
    assert missing and row[4] in missing[0]["path"] and "boundary/0001/activation" in missing[0]["reason"]


def test_unreferenced_files_are_reported_but_intact(run_copy):
    (run_copy / "objects" / "ab").mkdir(exist_ok=True)
    (run_copy / "objects" / "ab" / ".tmp-x.zst.1.2").write_bytes(b"partial")
    code, doc = check(run_copy, pub(run_copy))
    assert code == 0 and any(p["kind"] == "unreferenced" and ".tmp-" in p["path"] for p in doc["problems"])


def test_unfinished_run_is_described_not_damaged(run_copy):
    lines = (run_copy / "transcript.jsonl").read_bytes().splitlines(keepends=True)
    (run_copy / "transcript.jsonl").write_bytes(b"".join(lines[:-2]) + lines[-2][:40])  # killed mid-line
    code, doc = check(run_copy, pub(run_copy))
    assert code == 0, doc
    assert "4 step blocks signed, run not finished" in doc["described"][0]
    kinds = {p["path"]: p["kind"] for p in doc["problems"]}
    assert kinds["transcript.jsonl"] == "unfinished" and kinds["manifests/000004.json.zst"] == "unreferenced"


def test_edited_manifest_and_config_are_damaged(run_copy):
    write_manifest_doc(run_copy, 3, json.dumps(manifest(run_copy, 3)).replace('"F32"', '"F16"', 1))
    code, doc = check(run_copy, pub(run_copy))
    assert code == 1 and any(p["path"] == "manifests/000003.json.zst" for p in doc["problems"])
    cfg = run_copy / "config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b'"lr":0.01', b'"lr":0.02'))
    code, doc = check(run_copy, pub(run_copy))
    assert code == 1 and any(p["path"] == "config.json" and "config digest" in p["reason"] for p in doc["problems"])


def test_edited_model_breaks_the_final_binding(run_copy):
    gen = run_copy / "model" / "config.json"
    gen.write_text(gen.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    code, doc = check(run_copy, pub(run_copy))
    assert code == 1 and any(p["path"] == "model" for p in doc["problems"]), doc


def test_wrong_key_and_usage(recorded, tmp_path):
    invoke("keygen", tmp_path / "other.key")
    code, doc = check(recorded[0], tmp_path / "other.key.pub")
    assert code == 1 and "pinned provider key" in json.dumps(doc)
    assert invoke("check", tmp_path / "nothing", "--public-key", pub(recorded[0])).exit_code == 2
    (tmp_path / "empty").mkdir()
    r = invoke("check", tmp_path / "empty", "--public-key", pub(recorded[0]))
    assert r.exit_code == 2 and "is not a run directory" in r.output
    (tmp_path / "no-records" / "records").mkdir(parents=True)  # a record directory with nothing to check
    code, doc = check(tmp_path / "no-records", pub(recorded[0]))
    assert code == 1 and doc["status"] == "damaged" and "nothing was checked" in json.dumps(doc)


def test_inference_records_honest_and_damaged(recorded, tmp_path):
    run, _, records = recorded
    code, doc = check(records, pub(run))
    assert code == 0, doc
    assert doc["kind"] == "inference records" and doc["described"] == ["1 inference records"]
    copy = tmp_path / "records"
    shutil.copytree(records, copy)
    assert not (copy / "objects").exists()  # v6, I_A = 0: the ids are in the record, nothing is stored
    policy = next((copy / "policies").glob("*.json"))
    honest_policy = policy.read_bytes()
    policy.write_bytes(honest_policy.replace(b'"max_new_tokens":3', b'"max_new_tokens":4'))
    code, doc = check(copy, pub(run))
    assert code == 1 and any("policy file was edited" in p["reason"] for p in doc["problems"]), doc
    policy.write_bytes(honest_policy)
    # the provider regenerates the boundaries (stored objects, a boundaries file): checked, then damaged
    rid = next((copy / "records").glob("*.json")).stem
    assert invoke("prepare-inference", copy, "--record", rid, "--model", run).exit_code == 0
    assert check(copy, pub(run))[0] == 0
    obj = sorted((copy / "objects").rglob("*.zst"))[0]
    obj.write_bytes(obj.read_bytes()[:-7])
    code, doc = check(copy, pub(run))
    assert code == 1 and any(p["path"] == obj.relative_to(copy).as_posix() for p in doc["problems"])
    rec = next((copy / "records").glob("*.json"))
    rec.write_bytes(rec.read_bytes().replace(b'"causal_lm"', b'"classification"'))
    code, doc = check(copy, pub(run))
    assert code == 1 and any(p["path"] == f"records/{rec.name}" for p in doc["problems"])


def test_bundle_is_checked_against_the_clients_transcript(recorded, tmp_path):
    run, agreement, _ = recorded
    key = pub(run)
    for args in (("challenge", run / "transcript.jsonl", "--public-key", key, "--agreement", agreement, "--sample-blocks",
                  "1", "--challenge-nonce", "22" * 32, "--out", tmp_path / "c.json"),
                 ("open", run, "--challenge", tmp_path / "c.json", "--out", tmp_path / "bundle")):
        assert invoke(*args).exit_code == 0
    bundle = tmp_path / "bundle"
    r = invoke("check", bundle, "--public-key", key)
    assert r.exit_code == 2 and "--transcript" in r.output
    code, doc = check(bundle, key, "--transcript", run / "transcript.jsonl")
    assert code == 0 and doc["kind"] == "bundle", doc
    obj = sorted((bundle / "objects").rglob("*.zst"))[-1]
    obj.write_bytes(obj.read_bytes()[:-3])
    code, doc = check(bundle, key, "--transcript", run / "transcript.jsonl")
    assert code == 1 and any(p["path"] == obj.relative_to(bundle).as_posix() for p in doc["problems"])
