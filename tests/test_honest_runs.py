"""Honest runs of every model family verify PASS at every block, in strict mode on CPU."""

from __future__ import annotations

import pytest

from aftune.training.settings import LoraSettings
from aftune.errors import RecordError
from aftune.training.regenerate import prepare
from conftest import agreement_for, verifier, verify_all


def _assert_all_pass(run_dir, key, expected_blocks=None):
    report = verify_all(run_dir, key)
    assert report.verdict == "PASS", report.summary()
    assert all(r.compared > 0 for r in report.results)
    if expected_blocks is not None:
        assert len(report.results) == expected_blocks
    return report


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "bert", "vit", "dinov2", "resnet"])
def test_full_finetuning_passes(record, family):
    run_dir, key = record(family)
    report = _assert_all_pass(run_dir, key)
    assert len({r.layer_block for r in report.results}) >= 2  # the model really was split


def test_sgd_momentum_accumulation_schedule_passes(record):
    run_dir, key = record("llama", optimizer="sgd", momentum=0.9, grad_accum=2, schedule="cosine",
                          warmup_steps=1, weight_decay=0.01, max_grad_norm=0.5)
    _assert_all_pass(run_dir, key)


def test_tied_embeddings_with_dropout_and_sgd_pass(record):
    # GPT-2 ties its input and output embeddings across the first and last layer blocks
    run_dir, key = record("gpt2", optimizer="sgd", grad_accum=2)
    _assert_all_pass(run_dir, key)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_lora_passes(record, family):
    run_dir, key = record(family, lora=LoraSettings(r=4, alpha=8, dropout=0.1))
    _assert_all_pass(run_dir, key)


def test_checkpoint_interval_through_prepare(record):

    run_dir, key = record("llama", steps=6, steps_per_block=2, checkpoint_interval=3)
    with pytest.raises(RecordError, match="aftune prepare"):  # committed by digest only: exit 2, not a verdict
        verifier(run_dir, key).verify_block(1, 2)
    objects = sorted((run_dir / "objects").rglob("*.zst"))
    assert prepare(run_dir, key, 1, 2, agreement=agreement_for(run_dir)) == [1, 2]
    regenerated = sorted(set((run_dir / "objects").rglob("*.zst")) - set(objects))
    assert regenerated  # new objects, each checked against its digest on the way in
    result, _ = verifier(run_dir, key).verify_block(1, 2)
    assert result.verdict == "PASS", result.headline()
    _assert_all_pass(run_dir, key)


def test_sha256_runs_pass(record):
    run_dir, key = record("llama", hash_algorithm="sha256", steps=2)
    _assert_all_pass(run_dir, key)
