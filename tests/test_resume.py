"""Interrupted runs (issue 10, SPEC.md 3.8): a run killed mid-training keeps what it signed, and
`aftune train --resume` continues it to the very record an uninterrupted run writes (same step
block roots, same run root). Each honest case has a dishonest or damaged twin.

    pytest tests/test_resume.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import DATA_KIND, loose_objects, manifest_doc

from aftune.core.signing import PublicKey
from aftune.errors import AftuneError, CommitmentMismatch, InputError
from aftune.training.agreement import make_agreement
from aftune.training.settings import TrainSettings
from aftune.training.train import Deviation, train
from aftune.training.transcript import Transcript

SETTINGS = TrainSettings(steps=8, batch_size=4, seq_len=32, layers_per_block=2, steps_per_block=2,
                         checkpoint_interval=2, lr=1e-2, boundaries="stored")


class Interrupted(Exception):
    pass


class KillAt(Deviation):
    """The process dies before step `step`'s update (what a crash does to the library call)."""

    def __init__(self, step: int):
        self.step = step

    def before_update(self, step, blocked):
        if step == self.step:
            raise Interrupted(f"killed at step {step}")


def _lines(run):
    return [json.loads(x) for x in (run / "transcript.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(model_dir, datasets, tmp_path_factory):
    model, data = model_dir("llama"), datasets[DATA_KIND["llama"]]
    agreement = make_agreement(model, data, SETTINGS)
    return agreement, train(model, data, tmp_path_factory.mktemp("whole") / "run", agreement=agreement)


@pytest.fixture
def runs(model_dir, datasets, tmp_path, uninterrupted):
    model, data = model_dir("llama"), datasets[DATA_KIND["llama"]]
    agreement, whole = uninterrupted

    def interrupted(step: int, name: str):
        run = tmp_path / name
        with pytest.raises(Interrupted):
            train(model, data, run, agreement=agreement, deviation=KillAt(step))
        return run

    return model, data, agreement, whole, interrupted


def test_resumed_run_reaches_the_uninterrupted_run_root(runs):
    model, _, _, whole, interrupted = runs
    run = interrupted(7, "killed")  # step block 3 of 4 running: 0, 1, 2 signed; 2 is a checkpoint
    lines = _lines(run)
    assert [x["type"] for x in lines] == ["header", "step_block", "step_block", "step_block"]
    key = PublicKey.load(run / "provider.key.pub")
    assert len(Transcript.load(run / "transcript.jsonl", key).step_blocks) == 3
    signed = (run / "transcript.jsonl").read_bytes()
    result = train(model, None, run, resume=True)  # the run's own agreement and data copy
    assert (run / "transcript.jsonl").read_bytes().startswith(signed)  # nothing signed was rewritten
    assert result.run_root == whole.run_root and result.final_model_digest == whole.final_model_digest
    assert [x["root"] for x in _lines(run)[1:]] == [x["root"] for x in _lines(whole.run_dir)[1:]]
    with pytest.raises(InputError, match="finished run"):
        train(model, None, run, resume=True)


def test_an_interrupted_run_verifies_up_to_its_last_signed_step_block(runs):
    from aftune.training.verify import Verifier

    _, _, agreement, _, interrupted = runs
    run = interrupted(7, "verify")  # step blocks 0, 1, 2 signed: 0 and 1 replayable (2's end state is unsigned)
    key = PublicKey.load(run / "provider.key.pub")
    v = Verifier(run, key, agreement)
    for layer_block in range(2):
        state = None  # chained through the step blocks, as verify --all does (checkpoint interval 2)
        for step_block in range(2):
            result, state = v.verify_block(layer_block, step_block, state)
            assert result.verdict == "PASS", result.headline()
    report = Verifier(run, key, agreement).verify_all()
    assert report.verdict == "FAIL" and any("did not finish" in f.reason for f in report.errors), report.summary()
    assert len(report.results) == 4 and all(r.verdict == "PASS" for r in report.results), report.summary()


def test_a_torn_transcript_line_is_dropped_and_the_run_resumes(runs):
    model, _, _, whole, interrupted = runs
    run = interrupted(3, "torn")  # step block 1 running: only step block 0 signed
    with (run / "transcript.jsonl").open("a") as f:
        f.write('{"type":"step_block","step_block":1,"first_st')  # the kill hit a write
    result = train(model, None, run, resume=True)
    assert result.run_root == whole.run_root


def test_a_damaged_checkpoint_or_other_inputs_refuse_to_resume(runs, model_dir, datasets):
    model, data, agreement, _, interrupted = runs
    run = interrupted(7, "damaged")
    manifest = manifest_doc(run, 2)
    digest = next(row[4] for row in manifest["blocks"][0] if row[0].startswith("optim/"))
    loose_objects(run)
    path = run / "objects" / digest[:2] / f"{digest}.safetensors.zst"
    path.write_bytes(path.read_bytes()[:-8])  # the checkpoint the resume would load
    with pytest.raises(AftuneError):
        train(model, None, run, resume=True)
    # other settings than the run's: refused before anything is trained
    run = interrupted(7, "other")
    other = make_agreement(model, data, dataclasses.replace(SETTINGS, lr=2e-2))
    with pytest.raises(InputError, match="config.json differs"):
        train(model, None, run, agreement=other, resume=True)
    # another base model than the agreed one
    with pytest.raises(InputError, match="not the agreed"):
        train(model_dir("mistral"), None, run, resume=True)


class CheatThenDie(KillAt):
    """A dishonest provider: scales a weight after step 4's update (step block 2), then dies."""

    def after_update(self, step, blocked):
        if step == 4:
            import torch

            with torch.no_grad():
                next(p for _, p in blocked.model.named_parameters() if p.dim() == 2).mul_(1.5)


def test_a_run_that_diverges_on_recompute_appends_nothing(runs, tmp_path):
    """A resumed run recomputes the signed step blocks since its checkpoint and must reach their
    signed roots: here step block 2 was signed over a cheated computation, so the honest
    recomputation differs and nothing is appended (and a run root never signed)."""
    model, data, agreement, _, _ = runs
    run = tmp_path / "diverged"
    with pytest.raises(Interrupted):
        train(model, data, run, agreement=agreement, deviation=CheatThenDie(7))
    before = (run / "transcript.jsonl").read_bytes()
    with pytest.raises(CommitmentMismatch, match="step block 2 recomputed to another root"):
        train(model, None, run, resume=True)
    assert (run / "transcript.jsonl").read_bytes() == before


def test_sigkill_then_cli_resume_gives_the_same_run_root(model_dir, datasets, tmp_path):
    model, data = str(model_dir("llama")), str(datasets[DATA_KIND["llama"]])
    flags = ["--model", model, "--data", data, "--steps", "8", "--steps-per-block", "1", "--checkpoint-interval",
             "2", "--batch-size", "4", "--seq-len", "32", "--layers-per-block", "2"]
    aftune = [sys.executable, "-m", "aftune", "train"]
    env = dict(os.environ)
    proc = subprocess.Popen([*aftune, "--run-dir", "killed", *flags], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    transcript = tmp_path / "killed" / "transcript.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if transcript.is_file() and transcript.read_text().count("\n") >= 4:  # header + 3 step blocks
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = transcript.read_text().count('"step_block",')
    assert 3 <= n < 9, n  # killed mid-run (8 step blocks and the final state's)
    done = subprocess.run([*aftune, "--run-dir", "killed", "--resume", "--model", model], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    whole = subprocess.run([*aftune, "--run-dir", "whole", *flags], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert _lines(tmp_path / "killed")[-1]["root"] == _lines(tmp_path / "whole")[-1]["root"]
