"""The serving dtype and numerics of a generation policy, set and obeyed from the command line and
the library (issue 26): `aftune policy --dtype --numerics` writes an `aftune.generation-policy.v2`
policy; `aftune infer`, `aftune serve` and `aftune.infer` load the model in the dtype it pins and
record portable numerics when it says portable; `aftune verify-inference` PASSes the honest
records and FAILs the tampered ones or those served otherwise than the client's policy says.

    python -m pytest -q -n 0 tests/test_policy_numerics_cli.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aftune.core.encoding import canonical_json
from aftune.errors import InputError
from aftune.inference.policy import GenerationPolicy
from aftune.core.rows import rows_to_json
from aftune.inference.record import InferenceRecord, RecordDir, boundary_key, record_id, served_file
from conftest import invoke

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin" / "model"
PROMPT = "Q: What is 3 plus 4? A:"
TOKENS = 5


def write_policy(path: Path, *flags) -> Path:
    r = invoke("policy", BUILTIN, "--max-new-tokens", TOKENS, *flags, "--out", path)
    assert r.exit_code == 0, r.output
    return path


def infer(record_dir: Path, policy: Path, *flags):
    return invoke("infer", "--model", BUILTIN, "--record-dir", record_dir, "--prompt", PROMPT, "--policy", policy,
                  "--json", *flags)


def the_record(record_dir: Path) -> dict:
    """The record file's members, with what a v6 record keeps out put back (SPEC.md 8.4, 8.4.1):
    the served `model`, the policy, and the rows (boundary rows once regenerated or kept)."""
    (path,) = (record_dir / "records").glob("*.json")
    rec = InferenceRecord.open(record_dir)
    return {**json.loads(path.read_bytes()), "model": rec.model, "generation": rec.doc["generation"],
            "tensors": rows_to_json(rec.rows)}


def verify(record_dir: Path, policy: Path):
    return invoke("verify-inference", record_dir, "--all", "--model", BUILTIN, "--prompt", PROMPT, "--policy", policy,
                  "--public-key", record_dir / "provider.key.pub")


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("policies")
    return {"portable": write_policy(d / "portable.json", "--dtype", "float32", "--numerics", "portable"),
            "native": write_policy(d / "native.json"),
            "bfloat16": write_policy(d / "bfloat16.json", "--dtype", "bfloat16")}


def test_policy_writes_the_dtype_and_numerics_and_bad_combinations_exit_2(policies, tmp_path):
    doc = json.loads(policies["portable"].read_text())
    assert doc["format"] == "aftune.generation-policy.v2"
    assert (doc["dtype"], doc["numerics"], doc["max_new_tokens"]) == ("float32", "portable", TOKENS)
    assert GenerationPolicy.load(policies["portable"]).to_json() == doc
    # without the flags: the model's dtype (the built-in config says float32), native numerics, v2 too
    doc = json.loads(policies["native"].read_text())
    assert (doc["format"], doc["dtype"], doc["numerics"]) == ("aftune.generation-policy.v2", "float32", "native")
    assert json.loads(policies["bfloat16"].read_text())["dtype"] == "bfloat16"
    # the policy's own message, exit 2, no traceback (invoke fails on one), nothing written
    for flags, words in ((("--dtype", "bfloat16", "--numerics", "portable"), "portable numerics needs dtype float32"),
                         (("--numerics", "fast"), "numerics: must be one of native, portable"),
                         (("--dtype", "int8"), "dtype: must be one of")):
        r = invoke("policy", BUILTIN, *flags, "--out", tmp_path / "bad.json")
        assert r.exit_code == 2, (flags, r.output)
        assert words in r.stderr and "invalid generation policy" in r.stderr, r.stderr
        assert not (tmp_path / "bad.json").exists()
    assert "generation-policy.v1" not in invoke("policy", "--help").output


def test_a_portable_policy_records_portable_numerics_that_verify_and_tampering_fails(policies, tmp_path):
    rec = tmp_path / "rec"
    r = infer(rec, policies["portable"], "--activation-interval", 1)
    assert r.exit_code == 0, r.output
    doc = the_record(rec)
    assert doc["generation"]["policy"]["numerics"] == "portable" and doc["model"]["dtype"] == "float32"
    assert doc["numerics"] is not None and doc["numerics"]["grid"] == "bfloat16"
    assert all(row[2] == "BF16" for row in doc["tensors"] if row[0].startswith("boundary/"))
    r = verify(rec, policies["portable"])
    assert r.exit_code == 0 and "PASS: 4/4 blocks pass" in r.stdout, r.output
    # the client asked for native numerics: the record is not what it asked
    r = verify(rec, policies["native"])
    assert r.exit_code == 1 and "numerics" in r.stdout, r.output
    # a stored boundary replaced by another valid grid tensor of the same shape
    record = InferenceRecord.open(rec)
    victim = record.store.path(record.rows[boundary_key(2)].digest)
    victim.chmod(0o644)
    victim.write_bytes(record.store.path(record.rows[boundary_key(1)].digest).read_bytes())
    r = verify(rec, policies["portable"])
    assert r.exit_code == 1 and "FAIL" in r.stdout and "altered" in r.stdout, r.output


def test_a_bfloat16_policy_serves_in_bfloat16_and_a_float32_client_fails(policies, tmp_path):
    rec = tmp_path / "rec"
    r = infer(rec, policies["bfloat16"])  # no --dtype: the policy's
    assert r.exit_code == 0, r.output
    doc = the_record(rec)
    assert doc["model"]["dtype"] == "bfloat16" and doc["generation"]["policy"]["dtype"] == "bfloat16"
    assert doc["numerics"] is None
    r = verify(rec, policies["bfloat16"])
    assert r.exit_code == 0 and "PASS" in r.stdout, r.output
    r = verify(rec, policies["native"])  # the client's float32 policy
    assert r.exit_code == 1 and "served in bfloat16" in r.stdout and "dtype float32" in r.stdout, r.output
    # the provider relabels the record float32 (policy and model dtype), rehashed: still FAIL
    doc["model"]["dtype"] = doc["generation"]["policy"]["dtype"] = "float32"
    layout = InferenceRecord.open(rec).doc["layout"]
    records = RecordDir(rec, "blake3")
    raw = json.loads(next((rec / "records").glob("*.json")).read_bytes())
    raw["served"] = records.keep_served(served_file(doc["model"], layout)).hex()
    raw["generation"]["policy_digest"] = records.keep_policy(canonical_json(doc["generation"]["policy"])).hex()
    assert raw["generation"]["policy_digest"] == GenerationPolicy.from_json(doc["generation"]["policy"]).digest("blake3").hex()
    data = canonical_json(raw)
    for old in (rec / "records").glob("*.json"):
        old.unlink()
    (rec / "records" / f"{record_id('blake3', data).hex()}.json").write_bytes(data)
    r = verify(rec, policies["native"])
    assert r.exit_code == 1 and "FAIL" in r.stdout, r.output
    # an explicit --dtype that contradicts the policy: exit 2 naming both, no record
    for policy, dtype, pinned in ((policies["bfloat16"], "float32", "bfloat16"),
                                  (policies["portable"], "bfloat16", "float32")):
        r = infer(tmp_path / "x", policy, "--dtype", dtype)
        assert r.exit_code == 2 and f"--dtype {dtype} contradicts" in r.stderr, r.output
        assert f"pins the serving dtype {pinned}" in r.stderr, r.stderr
        assert not (tmp_path / "x" / "records").exists()
    # the same --dtype as the policy is fine
    assert infer(tmp_path / "same", policies["bfloat16"], "--dtype", "bfloat16").exit_code == 0


def test_the_library_serves_in_the_policys_dtype_and_defaults_to_the_served_model(tmp_path):
    import aftune

    pinned = GenerationPolicy.for_model(BUILTIN, max_new_tokens=3, dtype="bfloat16")
    aftune.infer(BUILTIN, PROMPT, record_dir=tmp_path / "a", policy=pinned)
    assert InferenceRecord.open(tmp_path / "a").model["dtype"] == "bfloat16"
    # no policy: GenerationPolicy.for_model of the served model, so its dtype is the served one
    aftune.infer(BUILTIN, PROMPT, record_dir=tmp_path / "b", dtype="bfloat16")
    doc = the_record(tmp_path / "b")
    assert doc["model"]["dtype"] == doc["generation"]["policy"]["dtype"] == "bfloat16"
    portable = pinned.to_json() | {"dtype": "float32", "numerics": "portable"}
    aftune.infer(BUILTIN, PROMPT, record_dir=tmp_path / "c", policy=portable)
    doc = the_record(tmp_path / "c")
    assert doc["model"]["dtype"] == "float32" and doc["numerics"] is not None
    with pytest.raises(InputError, match="--dtype float32 contradicts the generation policy.*bfloat16"):
        aftune.infer(BUILTIN, PROMPT, record_dir=tmp_path / "d", policy=pinned, dtype="float32")


def test_serve_loads_the_policys_dtype_and_records_portable(policies, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    import aftune.inference.serve as serve
    from aftune.inference.access import add_client

    apps = []
    monkeypatch.setattr(serve, "run_server", lambda app, *a, **kw: apps.append(app))
    key = add_client(tmp_path / "keys.txt", "alice")
    rec = tmp_path / "rec"
    r = invoke("serve", BUILTIN, "--policy", policies["portable"], "--api-keys", tmp_path / "keys.txt",
               "--record-dir", rec)
    assert r.exit_code == 0 and "(float32, portable numerics)" in r.stderr, r.output
    answer = TestClient(apps[-1]).post("/v1/generate", json={"prompt": PROMPT},
                                       headers={"authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    assert the_record(rec)["numerics"] is not None
    r = verify(rec, policies["portable"])
    assert r.exit_code == 0 and "PASS" in r.stdout, r.output
    r = verify(rec, policies["native"])
    assert r.exit_code == 1, r.output
    # a bfloat16 policy: served in bfloat16; a --dtype contradicting it: exit 2 naming both
    r = invoke("serve", BUILTIN, "--policy", policies["bfloat16"], "--api-keys", tmp_path / "keys.txt",
               "--record-dir", tmp_path / "b")
    assert r.exit_code == 0 and apps[-1].state.engine.served.dtype == "bfloat16", r.output
    r = invoke("serve", BUILTIN, "--policy", policies["bfloat16"], "--api-keys", tmp_path / "keys.txt",
               "--record-dir", tmp_path / "c", "--dtype", "float32")
    assert r.exit_code == 2 and "--dtype float32 contradicts" in r.stderr and "bfloat16" in r.stderr, r.output
