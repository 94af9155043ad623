"""Portable training records (issue 26, SPEC.md 5.5): bitwise verdicts on the client's hardware.

A run agreed with `numerics="portable"` computes in float64 and rounds every crossing value to the
float32 grid, logging the elements near a rounding midpoint (training/portable.py). Honest runs
verify strict under other CPU kernels (ATen's default kernels against this machine's) and another
thread count, in a fresh process, where a native run's strict replay fails. Each dishonest
provider below is simulated inside its own trainer, so everything it commits is signed
consistently: a weight moved by one float32 step, a value moved by one grid step without a log
entry, a log entry claiming a rounding no nearby value has, a malformed log, the rank-1 drift of
issue 26. Run: pytest tests/test_training_portable.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from aftune.core import grid
from aftune.errors import InputError
from aftune.training import portable
from aftune.training.settings import LoraSettings, TrainSettings
from aftune.training.train import Deviation
from conftest import agreement_path, failing, verifier, verify_all
from test_tampering import _param
from test_tolerance_drift import RankOneDrift

PORTABLE = dict(numerics="portable")


def _verify_in_subprocess(run_dir, public_key, tmp_path, **env) -> subprocess.CompletedProcess:
    key = tmp_path / "provider.pub"
    key.write_text(public_key.text + "\n")
    return subprocess.run([sys.executable, "-m", "aftune", "verify", str(run_dir), "--all", "--agreement",
                           str(agreement_path(run_dir)), "--public-key", str(key)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


# --- honest runs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, lora", [("llama", False), ("gpt2", False), ("bert", False), ("vit", False),
                                          ("llama", True)])
def test_honest_portable_runs_pass_strict(record, family, lora):
    """Decoder, tied embeddings (a tied group), encoder and image classification, LoRA: every
    block and the final model PASS bitwise; the run logged near-boundary elements and stores
    float32 state."""
    extra = {"lora": LoraSettings(r=4, alpha=8)} if lora else {}
    run_dir, key = record(family, **PORTABLE, **extra)
    report = verify_all(run_dir, key)
    assert report.verdict == "PASS", [f.reason for r in report.results for f in r.findings] + report.errors
    assert all(r.compared > 0 for r in report.results)
    logs = [k for s in range(2) for k in verifier(run_dir, key).record.manifest(s).common if "/numerics/" in k]
    assert logs, "an honest portable run logs some near-boundary elements"
    state = verifier(run_dir, key).record.manifest(2).blocks[0]
    assert {ref.dtype for ref in state.values()} == {"F32"}


def test_portable_verdict_holds_on_other_kernels_and_thread_counts(record, tmp_path):
    """The same record, verified in a fresh process with ATen's default (non-vector) kernels and
    with one thread: PASS. The native run of the same agreement FAILs under the default kernels
    (the contrast portable numerics exists for)."""
    run_dir, key = record("llama", **PORTABLE)
    lora_dir, lora_key = record("llama", lora=LoraSettings(r=4, alpha=8), **PORTABLE)  # the merge is checked too
    for (d, k), env in (((run_dir, key), {"ATEN_CPU_CAPABILITY": "default"}), ((run_dir, key), {"OMP_NUM_THREADS": "1"}),
                        ((lora_dir, lora_key), {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"})):
        done = _verify_in_subprocess(d, k, tmp_path, **env)
        assert done.returncode == 0 and "PASS" in done.stdout, (env, done.stdout[-2000:], done.stderr[-2000:])
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU runs ATen's default kernels already: no other kernels to contrast with")
    native_dir, native_key = record("llama")
    done = _verify_in_subprocess(native_dir, native_key, tmp_path, ATEN_CPU_CAPABILITY="default")
    assert done.returncode == 1 and "FAIL" in done.stdout, done.stdout[-2000:]


def test_portable_agreement_rules():
    with pytest.raises(InputError, match="dtype must be float32"):
        TrainSettings(numerics="portable", dtype="bfloat16").validate()
    with pytest.raises(InputError, match="numerics must be one of"):
        TrainSettings(numerics="fast").validate()
    assert "numerics" not in TrainSettings().to_json()  # native agreements keep their digests
    assert TrainSettings.from_json(TrainSettings(**PORTABLE).to_json()).numerics == "portable"


def test_portable_run_refuses_tolerance_mode(record):
    run_dir, key = record("llama", steps=2, **PORTABLE)
    with pytest.raises(InputError, match="portable numerics is verified bitwise"):
        verifier(run_dir, key, mode="tolerance")


def test_native_record_against_portable_agreement_fails(record, tmp_path):
    """The agreement pins the numerics: a provider that ran native numerics does not conform."""
    from aftune.training.agreement import Agreement
    from aftune.training.verify import Verifier
    from dataclasses import replace

    run_dir, key = record("llama", steps=2)
    agreed = Agreement.load(agreement_path(run_dir))
    portable_agreement = replace(agreed, settings=replace(agreed.settings, numerics="portable"))
    report = Verifier(run_dir, key, portable_agreement).verify_all()
    assert report.verdict == "FAIL"
    finding = next(e for e in report.errors if e.tensor == "config.settings.numerics")
    assert "agreed 'portable'" in finding.reason and "'native'" in finding.reason, finding.reason


def test_batchnorm_models_are_refused(record):
    with pytest.raises(InputError, match="running statistics"):
        record("resnet", **PORTABLE)


# --- dishonest providers ---------------------------------------------------------------------------

TARGET = "model.layers.2.mlp.up_proj.weight"  # layer block 1


class OneUlp(Deviation):
    """One weight moved to the next float32 value after the update of `step`."""

    def __init__(self, step: int):
        self.step = step

    def after_update(self, step, blocked):
        if step == self.step:
            w = _param(blocked, TARGET).data
            flat = w.view(-1)
            flat[7] = torch.nextafter(flat[7].float(), torch.tensor(float("inf"))).double()


def test_one_float32_step_on_one_weight_fails(record):
    run_dir, key = record("llama", deviation=OneUlp(step=1), **PORTABLE)
    report = verify_all(run_dir, key)
    assert failing(report) == [(1, 0)]
    finding = next(f for r in report.results for f in r.findings)
    assert finding.check == "end_state" and finding.tensor == f"state/{TARGET}"


class Dishonest(portable.WriterGrid):
    """A provider whose grid moves one element of `target` by one grid step, logging it or not,
    or commits a malformed log there."""

    target, log_it, malformed = "", True, False

    def settle(self, key, x, tau, scale):
        if key != self.target:
            return super().settle(key, x, tau, scale)
        g = grid.to_grid(x.detach(), portable.GRID_DTYPE)
        bits = grid.bits_of(g).reshape(-1)
        bits[3] += 1  # the next float32 away from zero
        moved = grid.values_of(bits, portable.GRID_DTYPE).reshape(g.shape)
        idx, logged = grid.near_boundary(x, g, tau, scale)
        if self.log_it:
            entries = {int(i): int(b) for i, b in zip(idx.tolist(), logged.tolist())}
            entries[3] = int(bits[3])
            log = torch.tensor(sorted(entries.items()), dtype=torch.int64)
            if self.malformed:
                log = log.to(torch.int32)
            self.commit(key, portable.LOG_NAME, log)
        return moved


@pytest.mark.parametrize("target, log_it, malformed, check", [
    ("step/00000001/micro/0000/numerics/boundary/0001/activation", True, False, "numerics"),
    ("step/00000001/micro/0000/numerics/boundary/0001/activation", False, False, "output"),
    ("step/00000001/numerics/gradient/" + TARGET, True, False, "numerics"),
    ("step/00000001/numerics/state/" + TARGET, True, False, "numerics"),
    ("step/00000001/numerics/optim/" + TARGET + "/exp_avg", False, False, "end_state"),
    ("step/00000001/numerics/gradient/" + TARGET, True, True, "record"),
])
def test_a_rounding_the_verifier_cannot_reproduce_fails(record, monkeypatch, target, log_it, malformed, check):
    """The log gives a provider no freedom beyond one grid step on elements that really lie near a
    midpoint: a value moved one grid step far from any midpoint FAILs, logged (the verifier's own
    value does not allow it) or not (its rounding differs); a malformed log is a record finding."""
    monkeypatch.setattr(Dishonest, "target", target)
    monkeypatch.setattr(Dishonest, "log_it", log_it)
    monkeypatch.setattr(Dishonest, "malformed", malformed)
    from aftune.training import engine

    monkeypatch.setattr(engine, "WriterGrid", Dishonest)
    run_dir, key = record("llama", **PORTABLE)
    monkeypatch.undo()
    report = verify_all(run_dir, key)
    assert report.verdict == "FAIL"
    checks = {f.check for r in report.results for f in r.findings}
    assert check in checks, [(f.check, f.reason) for r in report.results for f in r.findings]
    if check == "numerics":
        f = next(f for r in report.results for f in r.findings if f.check == "numerics")
        assert f.tensor == target and "flat index 3" in f.reason


def test_rank_one_drift_fails_in_portable_mode(record):
    """Issue 26's drift (2.5 % of the matrix's norm at the end of every step block) in a portable
    run: every moved step block FAILs bitwise."""
    run_dir, key = record("llama", deviation=RankOneDrift(2, TARGET), steps=8, **PORTABLE)
    report = verify_all(run_dir, key)
    assert failing(report) == [(1, s) for s in range(4)]


def test_portable_audit_with_regenerated_checkpoints(record, tmp_path):
    """State committed by digest only (checkpoint interval 2) is regenerated bitwise by the
    provider's `open` (float32, as committed), and the client's audit of the opened blocks PASSes;
    `verify --all` chains through the unstored start states."""
    from aftune import workflows

    run_dir, key = record("llama", steps=8, checkpoint_interval=2, **PORTABLE)
    assert verify_all(run_dir, key).verdict == "PASS"
    client = workflows.RunVerifier(agreement_path(run_dir), key, transcript=run_dir / "transcript.jsonl")
    challenge = client.challenge(strategy="all")
    workflows.open_challenge(run_dir, challenge, out=tmp_path / "bundle")
    report = client.audit(tmp_path / "bundle", challenge)
    assert report.verdict == "PASS", [f.reason for r in report.results for f in r.findings] + report.errors
    assert sorted((r.layer_block, r.step_block) for r in report.results) == list(challenge.blocks)
