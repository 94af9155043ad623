"""Each deviation from the agreed computation FAILs, on the block it touches, with a message
that names it. Honest counterparts live in test_honest_runs.py; each tamper here starts from the
same tiny setup (Llama: layer block 0 = embedding + layers 0-1, layer block 1 = layers 2-3 + head;
6 steps in step blocks of 2)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
import zstandard
from safetensors.torch import save as st_save

from aftune.errors import CommitmentMismatch
from aftune.core.signing import SigningKey
from aftune.training.train import Deviation
from conftest import failing, loose_objects, manifest_doc, verifier, verify_all, write_manifest_doc

SETUP = dict(steps=6, steps_per_block=2)
TARGET = "model.layers.2.mlp.up_proj.weight"  # in layer block 1


def _param(blocked, name):
    return dict(p for lay in blocked.layout for p in lay.params)[name]


class FlipExponentBit(Deviation):
    """WBP-style: one exponent bit of one float32 weight flipped after the update of `step`.
    With `bit=None` the highest of bits 25, 24, 23 that is 0 is flipped, so the weight grows
    (x16, x4 or x2), as WBP's chosen flips do."""

    def __init__(self, step, name=TARGET, bit=24):
        self.step, self.name, self.bit = step, name, bit

    def _grow_bit(self, w):
        bits = int(w[:1].float().view(torch.int32))
        return next(b for b in (25, 24, 23) if not bits >> b & 1)

    def after_update(self, step, blocked):
        if step == self.step:
            w = _param(blocked, self.name).data.view(-1)
            bit = self.bit if self.bit is not None else self._grow_bit(w)
            if w.dtype == torch.float32:
                w[:1].view(torch.int32).bitwise_xor_(1 << bit)
            else:  # bfloat16 is float32's upper half: the same exponent bit sits 16 lower
                w[:2].view(torch.int32).bitwise_xor_(1 << (bit - 16))


class SkipUpdate(Deviation):
    def __init__(self, step):
        self.step, self.saved = step, None

    def before_update(self, step, blocked):
        if step == self.step:
            self.saved = ({n: p.detach().clone() for lay in blocked.layout for n, p in lay.params},
                          {n: {k: v.clone() for k, v in s.items()} for n, s in blocked.optim_state.items()})

    def after_update(self, step, blocked):
        if step == self.step:
            params, optim = self.saved
            for lay in blocked.layout:
                for n, p in lay.params:
                    p.data.copy_(params[n])
            for n, s in blocked.optim_state.items():
                for k, v in s.items():
                    v.copy_(optim[n][k])


class OtherLearningRate(Deviation):
    def __init__(self, from_step, factor):
        self.from_step, self.factor = from_step, factor

    def before_update(self, step, blocked):
        if step == self.from_step:
            blocked.optimizer = replace(blocked.optimizer, lr=blocked.optimizer.lr * self.factor)


class SwapBatch(Deviation):
    """Train step `step` on the batch of step 0 instead of its own."""

    def __init__(self, step):
        self.step, self.first = step, None

    def batch(self, step, micro, batch):
        if step == 0:
            self.first = {k: v.clone() for k, v in batch.items()}
        return self.first if step == self.step else batch


class PoisonLabel(Deviation):
    def __init__(self, step, num_labels=3):
        self.step, self.num_labels = step, num_labels

    def batch(self, step, micro, batch):
        if step == self.step:
            batch = dict(batch)
            batch["labels"] = batch["labels"].clone()
            batch["labels"][0] = (batch["labels"][0] + 1) % self.num_labels
        return batch


def test_flipped_exponent_bit_fails_only_its_block(record):
    run_dir, key = record("llama", deviation=FlipExponentBit(step=3), **SETUP)
    report = verify_all(run_dir, key)
    assert failing(report) == [(1, 1)], report.summary()
    bad = next(r for r in report.results if r.verdict == "FAIL")
    assert bad.findings[0].check == "end_state" and bad.findings[0].tensor == f"state/{TARGET}"
    assert "layer block 1" in bad.headline() and "step block 1" in bad.headline()


def test_flip_mid_step_block_fails_at_the_next_forward(record):
    run_dir, key = record("llama", deviation=FlipExponentBit(step=2), **SETUP)
    report = verify_all(run_dir, key)
    assert failing(report) == [(1, 1)], report.summary()
    first = next(r for r in report.results if r.verdict == "FAIL").findings[0]
    assert first.step == 3 and first.check == "loss"  # layer block 1 holds the head: its output is the loss


def test_skipped_optimizer_step_fails(record):
    run_dir, key = record("llama", deviation=SkipUpdate(step=2), **SETUP)
    report = verify_all(run_dir, key)
    assert failing(report) == [(0, 1), (1, 1)], report.summary()
    assert all(f.check in ("end_state", "output", "loss", "input_gradient", "grad_norms")
               for r in report.results for f in r.findings)


def test_other_learning_rate_fails(record):
    run_dir, key = record("llama", deviation=OtherLearningRate(from_step=4, factor=2.0), **SETUP)
    report = verify_all(run_dir, key)
    assert failing(report) == [(0, 2), (1, 2)], report.summary()
    # the first update with the wrong rate (step 4) shows in the next forward pass (step 5)
    assert {(r.findings[0].check, r.findings[0].step) for r in report.results if r.findings} == {("output", 5), ("loss", 5)}


def test_swapped_batch_fails_where_it_enters(record):
    run_dir, key = record("llama", deviation=SwapBatch(step=1), **SETUP)
    report = verify_all(run_dir, key)
    assert (0, 0) in failing(report) and (1, 0) in failing(report)
    first = next(r for r in report.results if r.verdict == "FAIL").findings[0]
    assert first.check == "batch" and first.step == 1 and "agreed examples" in first.reason


def test_poisoned_label_fails_the_head_block(record):
    run_dir, key = record("bert", deviation=PoisonLabel(step=2), steps=4, steps_per_block=2)
    report = verify_all(run_dir, key)
    assert failing(report) == [(1, 1)], report.summary()
    f = next(r for r in report.results if r.verdict == "FAIL").findings[0]
    assert f.check == "batch" and f.tensor.endswith("batch/labels") and f.step == 2


# --- a start that is not the agreed one ------------------------------------------------------

def test_lora_init_not_from_the_seed_fails_at_step_block_0(record, monkeypatch):
    """The provider picks its own adapter initialisation (and signs it): the blocks holding
    adapters fail at step block 0, naming the tensor; later step blocks replay consistently."""
    from aftune.training.settings import LoraSettings
    import aftune.training.train as train_module

    original = train_module.instantiate

    def chosen_init(*args, **kwargs):
        root, model, adapter = original(*args, **kwargs)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name and ".layers.3." in name:
                    p.mul_(1.5)
        return root, model, adapter

    monkeypatch.setattr(train_module, "instantiate", chosen_init)
    run_dir, key = record("llama", lora=LoraSettings(r=4, alpha=8), **SETUP)
    monkeypatch.undo()
    report = verify_all(run_dir, key)
    assert failing(report) == [(1, 0)], report.summary()
    f = next(r for r in report.results if r.verdict == "FAIL").findings[0]
    assert f.check == "initial_state" and ".layers.3." in f.tensor and "lora_A" in f.tensor
    assert "seed" in f.reason


def test_optimizer_state_not_empty_at_the_start_fails(record, monkeypatch):
    """Momentum smuggled into the first step (the honest optimizer starts from zeros)."""
    import aftune.training.engine as engine_module

    original = engine_module.init_state

    def warm(spec, param):
        state = original(spec, param)
        state[next(iter(state))].fill_(1e-3)
        return state

    with monkeypatch.context() as m:
        m.setattr(engine_module, "init_state", warm)
        run_dir, key = record("llama", **SETUP)
    report = verify_all(run_dir, key)
    assert failing(report) == [(0, 0), (1, 0)], report.summary()
    f = next(r for r in report.results if r.verdict == "FAIL").findings[0]
    assert f.check == "initial_state" and f.tensor.startswith("optim/") and "zeros" in f.reason


# --- edits of the record after training ------------------------------------------------------

@pytest.fixture
def honest(record, tmp_path):
    run_dir, key = record("llama", **SETUP)
    return run_dir, key


def _manifest(run_dir, s):
    return manifest_doc(run_dir, s)


def _object_path(run_dir, digest_hex):
    """The loose file of an object (the run's packs are unpacked first, so that one can be edited)."""
    loose_objects(run_dir)
    return run_dir / "objects" / digest_hex[:2] / f"{digest_hex}.safetensors.zst"


def test_edited_tensor_file_fails_the_block_that_reads_it(honest):
    run_dir, key = honest
    row = next(r for r in _manifest(run_dir, 1)["common"] if r[0].endswith("boundary/0001/activation"))
    path = _object_path(run_dir, row[4])
    from aftune.core.store import ObjectStore, TensorRef
    from aftune.core.encoding import parse_hex_digest

    ref = TensorRef(row[1], row[2], tuple(row[3]), parse_hex_digest(row[4], "x"))
    t = ObjectStore(run_dir / "objects", "blake3").get(ref, "test")
    t.view(-1)[0] += 1.0  # a plausible, well-formed edit
    path.write_bytes(zstandard.ZstdCompressor().compress(st_save({row[1]: t})))
    report = verify_all(run_dir, key)
    assert failing(report) == [(1, 1)], report.summary()
    f = next(r for r in report.results if r.verdict == "FAIL").findings[0]
    assert f.check == "record" and "altered" in f.reason


def test_oversized_tensor_file_fails_without_being_read_whole(honest):
    run_dir, key = honest
    row = next(r for r in _manifest(run_dir, 1)["common"] if r[0].endswith("boundary/0001/activation"))
    path = _object_path(run_dir, row[4])
    with open(path, "ab") as f:  # a valid frame followed by far more bytes than the tensor can need
        f.write(b"\0" * (1 << 22))
    from aftune.core.jsonio import read_capped

    assert len(read_capped(path, 100)) == 101
    from aftune.errors import RecordError

    with pytest.raises(RecordError, match="larger than any encoding"):  # a damaged record: exit code 2
        verify_all(run_dir, key)


def test_edited_manifest_fails_its_step_block(honest):
    run_dir, key = honest
    m = _manifest(run_dir, 2)
    m["common"][0][4] = "00" * 32
    write_manifest_doc(run_dir, 2, m)
    report = verify_all(run_dir, key)
    # step block 2 is read to replay step block 1 (end state) and step block 2 itself
    assert failing(report) == [(0, 1), (0, 2), (1, 1), (1, 2)], report.summary()
    assert all("signed for step block 2" in r.findings[0].reason for r in report.results if r.findings)


def _rewrite_transcript(run_dir, edit):
    path = run_dir / "transcript.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    edit(lines)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_edited_transcript_entry_fails(honest):
    run_dir, key = honest

    def edit(lines):
        lines[2]["merkle_root"] = "11" * 32

    _rewrite_transcript(run_dir, edit)
    with pytest.raises(CommitmentMismatch, match="step block 1"):
        verifier(run_dir, key)


def _resign(lines, signer, algorithm="blake3"):
    from aftune.training.manifest import chained_root
    from aftune.training.transcript import run_root

    head = lines[0]
    config = bytes.fromhex(head["config_digest"])
    head["public_key"] = signer.public_key.text
    head["signature"] = signer.sign("run-header", config).hex()
    prev = config
    for e in lines[1:]:
        if e["type"] == "step_block":
            root = chained_root(algorithm, e["step_block"], prev, bytes.fromhex(e["merkle_root"]))
            e.update(prev=prev.hex(), root=root.hex(), signature=signer.sign("step-block", root).hex())
            prev = root
        else:
            root = run_root(algorithm, config, prev, bytes.fromhex(e["final_model_digest"]))
            e.update(last_root=prev.hex(), root=root.hex(), signature=signer.sign("run", root).hex())


def test_transcript_resigned_with_another_key_fails(honest):
    run_dir, key = honest
    _rewrite_transcript(run_dir, lambda lines: _resign(lines, SigningKey.generate()))
    with pytest.raises(CommitmentMismatch, match="not by the pinned provider key"):
        verifier(run_dir, key)


def test_root_changed_after_signing_fails_against_the_clients_copy(honest, tmp_path):
    """The provider edits a manifest after the fact and re-signs the transcript with its own key.
    The client verifies against the copy it received while training ran."""
    run_dir, key = honest
    client_copy = tmp_path / "client-transcript.jsonl"
    shutil.copy(run_dir / "transcript.jsonl", client_copy)
    m = _manifest(run_dir, 1)
    m["common"][0][4] = "22" * 32
    write_manifest_doc(run_dir, 1, m)
    from aftune.training.manifest import StepBlockManifest

    new_root = StepBlockManifest.from_json(m, 2).merkle_root("blake3")
    provider_key = SigningKey.load(run_dir / "provider.key")

    def edit(lines):
        lines[2]["merkle_root"] = new_root.hex()
        _resign(lines, provider_key)

    _rewrite_transcript(run_dir, edit)
    verifier(run_dir, key)  # the rewritten transcript is self-consistent and signed by the right key...
    report = verifier(run_dir, key, transcript=client_copy).verify_all()  # ...but not what the client received
    assert failing(report) == [(0, 0), (0, 1), (1, 0), (1, 1)], report.summary()
    assert all("signed for step block 1" in r.findings[0].reason for r in report.results if r.findings)
