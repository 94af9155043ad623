"""`aftune estimate` and checkpoint spacing from the agreement (SPEC.md 6.10): the estimate,
made from the agreement alone, is within 25% of what a built-in run then stores.

    PYTHONPATH=src pytest tests/test_estimate.py -p no:cacheprovider -n 0 -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from aftune import builtin
from aftune.errors import InputError
from aftune.training.agreement import make_agreement
from aftune.training.estimate import estimate, spacing_for
from aftune.training.settings import TrainSettings
from aftune.training.train import train
from conftest import DATA_KIND


def _bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def _record_bytes(run: Path) -> int:
    return _bytes(run / "objects") + _bytes(run / "manifests") + (run / "transcript.jsonl").stat().st_size


@pytest.mark.parametrize("kw", [dict(boundaries="digest", checkpoint_interval=2), dict(boundaries="stored")])
def test_the_estimate_is_within_25_percent_of_what_the_run_stores(kw, tmp_path):
    settings = TrainSettings(steps=8, steps_per_block=2, **kw)
    agreement = make_agreement(builtin.MODEL_DIR, builtin.DATA_FILE, settings)
    e = estimate(agreement)
    train(None, None, tmp_path / "run", agreement=agreement)
    stored = _record_bytes(tmp_path / "run")
    assert 0.75 <= e.record_bytes / stored <= 1.25, (e.to_json(), stored)
    weights = (tmp_path / "run" / "model" / "model.safetensors").stat().st_size
    assert 0.75 <= e.model_bytes / weights <= 1.25
    if settings.digest_boundaries:
        assert e.checkpoints == 1 and e.open_steps == 4  # only step block 2 is stored; openings re-run <= 2 step blocks
        assert "re-runs at most 4 of 8 training steps" in e.line()


def test_spacing_from_the_recompute_the_client_accepts():
    config = make_agreement(builtin.MODEL_DIR, builtin.DATA_FILE, TrainSettings(steps=2)).base_config
    s = TrainSettings(steps=16, steps_per_block=2, boundaries="digest")
    from aftune.training.agreement import batch_spec

    spec = batch_spec(config, s)
    assert spacing_for(config, s, spec, max_recompute_steps=4).checkpoint_interval == 2
    assert spacing_for(config, s, spec, max_recompute_steps=7).checkpoint_interval == 3
    assert spacing_for(config, s, spec, max_recompute_steps=1000).checkpoint_interval == 8
    with pytest.raises(InputError, match="less than one step block"):
        spacing_for(config, s, spec, max_recompute_steps=1)
    # a budget: the smallest interval whose record fits it
    sizes = {i: estimate_bytes(config, replace(s, checkpoint_interval=i), spec) for i in range(1, 9)}
    assert sizes[1] > sizes[2] > sizes[8]
    assert spacing_for(config, s, spec, storage_budget=sizes[2]).checkpoint_interval == 2
    assert spacing_for(config, s, spec, storage_budget=sizes[2] - 1).checkpoint_interval > 2
    with pytest.raises(InputError, match="smallest record"):
        spacing_for(config, s, spec, storage_budget=1000)
    with pytest.raises(InputError, match="meets both"):
        spacing_for(config, s, spec, max_recompute_steps=2, storage_budget=sizes[4])


def estimate_bytes(config, settings, spec) -> int:
    from aftune.training.estimate import estimate_for

    return estimate_for(config, settings, spec).record_bytes


def test_agree_pins_the_spacing_and_prints_the_estimate(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cli = [sys.executable, "-m", "aftune"]
    out = subprocess.run([*cli, "agree", "--steps", "16", "--steps-per-block", "2", "--boundaries", "digest",
                          "--max-recompute-steps", "6", "--out", str(tmp_path / "a.json")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "estimate: record" in out.stdout and "checkpoint interval 3" in out.stdout
    assert json.loads((tmp_path / "a.json").read_text())["settings"]["checkpoint_interval"] == 3
    est = subprocess.run([*cli, "estimate", str(tmp_path / "a.json"), "--json"], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert est.returncode == 0, est.stderr
    doc = json.loads(est.stdout)
    assert doc["checkpoint_interval"] == 3 and doc["open_steps"] == 6 and doc["boundaries"] == "digest"
    bad = subprocess.run([*cli, "agree", "--max-recompute-steps", "6", "--checkpoint-interval", "2", "--out",
                          str(tmp_path / "b.json")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "drop --checkpoint-interval" in bad.stderr + bad.stdout


@pytest.mark.parametrize("family", sorted(DATA_KIND))
def test_every_family_gets_an_estimate(family, model_dir, datasets):
    """`aftune agree` prints the estimate for any architecture aftune trains (meta device only)."""
    for boundaries in ("stored", "digest"):
        settings = TrainSettings(steps=4, batch_size=2, seq_len=16, steps_per_block=2, boundaries=boundaries)
        e = estimate(make_agreement(model_dir(family), datasets[DATA_KIND[family]], settings))
        assert e.record_bytes > 0 and e.model_bytes > 0 and e.state_bytes > e.model_bytes
        assert e.layer_blocks >= 1 and "estimate: record" in e.line()


def test_the_python_agree_applies_the_same_spacing_and_trainer_config_rules_as_the_cli(tmp_path):
    """`aftune.agree` is not a way around the rules of `aftune agree`: the spacing options set the
    interval (and refuse one given too), and a Trainer configuration's settings cannot be given again."""
    import aftune
    from aftune.builtin import DATA_FILE, MODEL_DIR

    a = aftune.agree(MODEL_DIR, DATA_FILE, steps=16, steps_per_block=2, max_recompute_steps=6)
    assert a.settings.checkpoint_interval == 3
    with pytest.raises(InputError, match="drop --checkpoint-interval"):
        aftune.agree(MODEL_DIR, DATA_FILE, steps=16, steps_per_block=2, checkpoint_interval=2, max_recompute_steps=6)
    with pytest.raises(InputError, match="gives lr"):
        aftune.agree(MODEL_DIR, DATA_FILE, trainer_config={"max_steps": 4, "learning_rate": 1e-3}, lr=1e-2)
