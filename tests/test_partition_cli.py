"""`aftune partition`: the strategies table, one run through the trusted side started as a program
over loopback TCP (the code path `--trusted-command "gramine-sgx aftune-partition" --transport tcp`
takes, here with the plain interpreter: no TEE), and the record check."""

from __future__ import annotations

import json
import re
import sys

from conftest import invoke

LABEL = "trusted side: process isolation only (no TEE: no memory encryption, no attestation)"


def test_strategies_table(model_dir):
    r = invoke("partition", "strategies", model_dir("gpt2"), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["trusted_side"] == LABEL
    rows = {row["strategy"]: row for row in doc["strategies"]}
    assert rows["teeslice"]["exposure"] is None and "backbone" in rows["teeslice"]["note"]
    assert rows["all-shielded"]["exposure"]["parameters_plaintext"] == 0
    assert rows["none-shielded"]["exposure"]["activations_plaintext"] == 1
    # GPT-2 ties its LM head to the token embedding: offloading the head exposes the embedding too
    assert rows["shield-nonlinear"]["exposure"]["parameters_plaintext"] > 0.9
    table = invoke("partition", "strategies", model_dir("gpt2"))
    assert LABEL in table.output and "shield-large-magnitude" in table.output


def test_run_then_check_the_record(model_dir, tmp_path):
    records = tmp_path / "records"
    r = invoke("partition", "run", model_dir("llama"), "--strategy", "shield-deep", "--prompt", "Q: what is 2+2?",
               "--max-new-tokens", 3, "--record-dir", records, "--store-crossings",
               "--trusted-command", f"{sys.executable} -m aftune.partition.trusted", "--transport", "tcp")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(LABEL)
    assert "unpartitioned model (same trusted process): same answer" in r.output
    key = re.search(r"key:\s+(ed25519:[0-9a-f]{64})", r.output).group(1)
    record = next(records.glob("*.json"))
    ok = invoke("partition", "check", record, "--public-key", key, "--crossings", record.with_suffix(".crossings"))
    assert ok.exit_code == 0, ok.output
    replayed = int(re.search(r"(\d+) offloaded products replayed", ok.output).group(1))
    assert replayed > 0 and "outcome recorded by the trusted side: PASS" in ok.output
    record.write_bytes(record.read_bytes().replace(b'"tokens":[', b'"tokens":[7,'))
    edited = invoke("partition", "check", record, "--public-key", key)
    assert edited.exit_code == 1 and "signs record" in edited.output


def test_run_refuses_bad_usage_before_starting_processes(model_dir, tmp_path):
    r = invoke("partition", "run", model_dir("llama"), "--strategy", "shield-deep")
    assert r.exit_code == 2 and "exactly one input" in r.output
    r = invoke("partition", "run", model_dir("llama"), "--strategy", "shield-most", "--prompt", "hi")
    assert r.exit_code == 2 and "unknown strategy" in r.output
