"""Audits fan out over an existing Ray cluster (a local instance on loopback here)."""

from __future__ import annotations

import pytest

from aftune.protocol.audit import audit_bundle
from aftune.protocol.opening import open_bundle
from aftune.protocol.challenge import challenge_from_transcript
from conftest import agreement_for
from test_tampering import FlipExponentBit

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_audit_on_a_ray_cluster_matches_the_local_verdicts(record, ray_address, tmp_path):
    run_dir, key = record("llama", steps=4, steps_per_block=2, deviation=FlipExponentBit(step=3))
    c = challenge_from_transcript(run_dir / "transcript.jsonl", key, "all")
    open_bundle(run_dir, list(c.blocks), c.digest_bytes, tmp_path / "bundle")
    args = (tmp_path / "bundle", run_dir / "transcript.jsonl", key, list(c.blocks), c.digest_bytes)
    on_ray = audit_bundle(*args, agreement=agreement_for(run_dir), workers=2, ray_address=ray_address)
    local = audit_bundle(*args, agreement=agreement_for(run_dir), workers=1)
    assert [(r.layer_block, r.step_block, r.verdict) for r in on_ray.results] == \
        [(r.layer_block, r.step_block, r.verdict) for r in local.results]
    assert on_ray.verdict == "FAIL" and [(r.layer_block, r.step_block) for r in on_ray.results
                                         if r.verdict == "FAIL"] == [(1, 1)]
