"""Tied parameters (SPEC.md 5.2.4): the per-micro-batch gradient parts of a shared parameter are
not committed; a block that shares a trainable parameter is replayed with its whole tied group,
which recomputes every part. Each honest case is paired with a provider that gets a part wrong.

    python -m pytest -q tests/test_tied_parts.py

Tiny Qwen2 with tied embeddings and one layer per block: layer block 0 = embedding + layer 0,
layer block 1 = layer 1, layer block 2 = layer 2 + head (its LM head is the embedding matrix), so
the tied group is {0, 2}; 4 steps in step blocks of 2.
"""

from __future__ import annotations

import json

import pytest
from conftest import failing, manifest_doc, verifier
from test_tampering import FlipExponentBit

from aftune.core.store import ObjectStore
from aftune.training.engine import BlockedModel
from aftune.training.regenerate import prepare

SETUP = dict(steps=4, steps_per_block=2, layers_per_block=1)
EMBEDDING = "model.embed_tokens.weight"


@pytest.fixture
def wrong_tied_part(monkeypatch):
    """wrong_tied_part(step, change): the provider replaces the LM head's part of the tied
    embedding's gradient by change(part) in `step`, and commits everything it computes from it."""

    def install(at_step, change):
        train_step, add_tied_parts = BlockedModel.train_step, BlockedModel.add_tied_parts

        def tracking_step(self, step, *args, **kw):
            self.tampered_step = step
            return train_step(self, step, *args, **kw)

        def tampered_add(self, alias_parts):
            if getattr(self, "tampered_step", None) == at_step:
                alias_parts = {n: [(b, change(t)) for b, t in parts] for n, parts in alias_parts.items()}
            add_tied_parts(self, alias_parts)

        monkeypatch.setattr(BlockedModel, "train_step", tracking_step)
        monkeypatch.setattr(BlockedModel, "add_tied_parts", tampered_add)

    yield install
    monkeypatch.undo()


def test_honest_tied_run_commits_no_parts_and_passes(record):
    run_dir, key = record("qwen2", **SETUP)
    store = ObjectStore(run_dir / "objects", "blake3")
    paths = sorted((run_dir / "manifests").glob("*.json.zst"))
    assert len(paths) == 3
    for s in range(len(paths)):
        doc = manifest_doc(run_dir, s)
        assert doc["format"] == "aftune.manifest.v3"
        assert not [row[0] for row in doc["common"] if "/shared/" in row[0]]
        vocab_by_hidden = 512 * 32 * 4
        assert all(4 * _numel(row[3]) < vocab_by_hidden for row in doc["common"]), "a per-step tensor is vocab x hidden"
        for entry, _, dtype, _, digest in doc["common"]:  # integer batch fields: by digest only (SPEC.md 3.2)
            assert store.has(bytes.fromhex(digest)) == (dtype not in ("I64", "BOOL") or "/batch/" not in entry), entry
    report = verifier(run_dir, key).verify_all()
    assert report.verdict == "PASS", report.summary()
    labels = {r.layer_block: r.label for r in report.results}
    assert "replayed with tied layer block 2" in labels[0] and "replayed with tied layer block 0" in labels[2]
    assert "tied" not in labels[1]
    # a float64 tolerance replay recomputes the parts in float64 and still passes (and compares the
    # integer batch fields by digest: it never needs their objects)
    result, _ = verifier(run_dir, key, mode="tolerance", replay_dtype="float64").verify_block(2, 1)
    assert result.verdict == "PASS", result.headline()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_a_wrong_tied_part_fails_owner_and_user(record, wrong_tied_part):
    wrong_tied_part(3, lambda part: part * (1 + 2 ** -10))  # off by one part in a thousand, in one step
    run_dir, key = record("qwen2", **SETUP)
    report = verifier(run_dir, key).verify_all()
    assert failing(report) == [(0, 1), (2, 1)], report.summary()  # layer block 1 shares nothing
    for layer_block in (0, 2):  # neither the owner (embedding) nor the user (head) accepts it
        result = next(r for r in report.results if (r.layer_block, r.step_block) == (layer_block, 1))
        first = result.findings[0]
        assert (first.check, first.step, first.tensor) == ("grad_norms", 3, "step/00000003/grad_norms/0000")
        assert any(f.check == "end_state" and f.tensor == f"state/{EMBEDDING}" for f in result.findings)


def test_a_flipped_weight_of_a_tied_block_fails_its_group_only(record):
    run_dir, key = record("qwen2", deviation=FlipExponentBit(step=3, name="model.layers.2.mlp.up_proj.weight"), **SETUP)
    report = verifier(run_dir, key).verify_all()
    assert failing(report) == [(0, 1), (2, 1)], report.summary()


def test_prepare_regenerates_the_whole_tied_group(record):
    run_dir, key = record("qwen2", checkpoint_interval=2, **{**SETUP, "steps": 6})
    v = verifier(run_dir, key)
    assert prepare(run_dir, key, 0, 1, verifier=v) == [1]  # step block 1 is stored by digest only
    for layer_block in (0, 2):  # block 2's state was regenerated with block 0's: no second prepare
        result, _ = v.verify_block(layer_block, 1)
        assert result.verdict == "PASS", result.headline()
