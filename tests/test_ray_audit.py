"""Audits fan out over an existing Ray cluster (a local instance on loopback here).

    pytest tests/test_ray_audit.py --long

Marked long: the replays take a second, but each Ray worker process imports torch, transformers
and aftune afresh, which took 43 s per worker on the 2-core development machine under load (7 s in a plain process),
and the test took two to five minutes of CI's ten."""

from __future__ import annotations

import os
import secrets

import pytest

from aftune.protocol.audit import audit_bundle
from aftune.protocol.opening import open_bundle
from aftune.protocol.challenge import challenge_from_transcript
from conftest import agreement_for
from test_tampering import FlipExponentBit

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_address():
    # a token of this test's own: a local ray.init() with none writes ~/.ray/auth_token, after
    # which every `ray start` on the machine turns token authentication on
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import Config

    _enable_token_auth()  # Ray read RAY_AUTH_MODE when imported: make it read it again
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Config.initialize("")  # and again, now that they are restored


@pytest.mark.long
def test_audit_on_a_ray_cluster_matches_the_local_verdicts(record, ray_address, tmp_path):
    import torch

    # recorded with one intra-op thread, so that each Ray worker's strict replay (which pins the
    # recorded count) takes one core: two workers with two spinning threads each on a 2-core CI
    # machine made this test take five minutes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir, key = record("llama", steps=4, steps_per_block=2, deviation=FlipExponentBit(step=3))
    finally:
        torch.set_num_threads(threads)
    c = challenge_from_transcript(run_dir / "transcript.jsonl", key, "all")
    open_bundle(run_dir, c, tmp_path / "bundle")
    args = (tmp_path / "bundle", run_dir / "transcript.jsonl", key, c)
    on_ray = audit_bundle(*args, agreement=agreement_for(run_dir), workers=2, ray_address=ray_address)
    local = audit_bundle(*args, agreement=agreement_for(run_dir), workers=1)
    assert [(r.layer_block, r.step_block, r.verdict) for r in on_ray.results] == \
        [(r.layer_block, r.step_block, r.verdict) for r in local.results]
    assert on_ray.verdict == "FAIL" and [(r.layer_block, r.step_block) for r in on_ray.results
                                         if r.verdict == "FAIL"] == [(1, 1)]
