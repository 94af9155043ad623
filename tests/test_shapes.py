"""The shape oracle (models/shapes.py): specs of a third text length derived from two meta-device
passes equal those of a pass at that length, for decoder and encoder families; a batch that is not
all [B, T] always gets its own pass."""

from __future__ import annotations

import pytest
import torch

from aftune.models.base import Stage
from aftune.models.shapes import ShapeOracle
from aftune.training.settings import LayerBlocks
from conftest import _configs

LENGTHS = (5, 7, 11)
SEEN = (5, 7)  # the lengths an oracle runs passes at (and one more, 4 x 7 + 3, to confirm the rule)
UNSEEN = (1, 2, 11, 32, 64)  # lengths it then gives specs for without running them


def text_batch(family: str, b: int, t: int) -> dict[str, torch.Tensor]:
    batch = {"input_ids": torch.zeros((b, t), dtype=torch.int64), "attention_mask": torch.ones((b, t), dtype=torch.int64)}
    if family == "bert":
        batch["token_type_ids"] = torch.zeros((b, t), dtype=torch.int64)
        batch["labels"] = torch.zeros((b,), dtype=torch.int64)  # not [B, T]: every length gets a pass
    else:
        batch["labels"] = torch.zeros((b, t), dtype=torch.int64)
    return batch


def oracle(family: str) -> tuple[ShapeOracle, LayerBlocks]:
    config = _configs()[family].to_dict()
    o = ShapeOracle(config, "eager", torch.float32)
    return o, LayerBlocks(len(o.adapter.stages) - 2, 2)


def count_passes(o: ShapeOracle) -> list:
    """The meta-device passes `o` runs from now on (one entry each)."""
    passes, real = [], o._run
    o._run = lambda bl, stages, ctx, caches: passes.append(ctx) or real(bl, stages, ctx, caches)
    return passes


def real_pass(make, blocks, batch, kind: str = "training"):
    """The specs of a meta-device pass over `batch` itself: a new oracle has seen no other length, so
    it derives nothing."""
    o = make()
    passes = count_passes(o)
    specs = getattr(o, f"{kind}_outputs")(blocks, batch)
    assert len(passes) == 1
    return specs


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "bert"])
def test_derived_specs_equal_a_real_pass(family):
    """Passes at two lengths; the specs of five other lengths (shorter, longer, T = 1, T = the
    hidden size) are derived, not run, and equal a real pass at each of those lengths."""
    o, blocks = oracle(family)
    passes = count_passes(o)
    for t in SEEN:
        o.training_outputs(blocks, text_batch(family, 2, t))
    derived = {t: o.training_outputs(blocks, text_batch(family, 2, t)) for t in UNSEEN}
    # derived without a pass; bert's labels are [B]: no derivation, a pass each
    assert len(passes) == (len(SEEN) + 1 if family != "bert" else len(SEEN) + len(UNSEEN))
    assert derived == {t: real_pass(lambda: oracle(family)[0], blocks, text_batch(family, 2, t)) for t in UNSEEN}
    assert all(derived[t][0].shape == (2, t, 32) for t in UNSEEN)


class _Reshaped(torch.nn.Module):
    """A stage whose output does not follow T in dimension 1 the way its input does."""

    def __init__(self, inner: torch.nn.Module, how: str):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, h, ctx):
        h = self.inner(h, ctx)
        b, t, d = h.shape
        if self.how == "pool":  # every other position: ceil(T / 2)
            return h[:, ::2]
        if self.how == "prefix":  # one more position in front: T + 1
            return torch.cat([h[:, :1], h], 1)
        if self.how == "pad8":  # padded to a multiple of 8 positions
            return torch.cat([h, h.new_zeros((b, -t % 8, d))], 1)
        if self.how == "truncate8":  # at most 8 positions
            return h[:, :8]
        raise AssertionError(self.how)


class _Restored(torch.nn.Module):
    """The next stage, handed [B, T, H] again (shapes only: the oracle runs on the meta device)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, h, ctx):
        return self.inner(h.new_zeros((h.shape[0], ctx["batch"]["input_ids"].shape[1], h.shape[-1])), ctx)


def reshaping_oracle(how: str) -> ShapeOracle:
    """llama in four layer blocks, block 0's output (after layer.0) reshaped by `how`."""
    o, _ = oracle("llama")
    stages = o.adapter.stages
    stages[1] = Stage(stages[1].name, _Reshaped(stages[1].module, how))
    stages[2] = Stage(stages[2].name, _Restored(stages[2].module))
    return o


@pytest.mark.parametrize("how", [
    "pool", "prefix",
    "pad8", "truncate8",  # agree with the rule at 5 and 7: the oracle's third pass, at 31, shows the break
])
def test_a_boundary_that_does_not_follow_t_is_never_derived_wrongly(how):
    """The oracle may derive only what a real pass would give: where a boundary's dimension 1 is
    not T it must notice (run a pass per length) rather than put T there or keep a stale size."""
    o = reshaping_oracle(how)
    blocks = LayerBlocks(len(o.adapter.stages) - 2, 1)
    lengths = SEEN + UNSEEN
    got = {t: o.training_outputs(blocks, text_batch("llama", 2, t)) for t in lengths}
    expected = {t: real_pass(lambda: reshaping_oracle(how), blocks, text_batch("llama", 2, t)) for t in lengths}
    assert any(expected[t][0].shape[1] != t for t in lengths)  # the boundary really breaks the rule
    assert all(expected[t][1].shape == (2, t, 32) for t in lengths)  # and the next block gets [B, T, H] again
    assert got == expected


def test_another_batch_size_gets_its_own_passes():
    o, blocks = oracle("llama")
    for t in LENGTHS:
        o.training_outputs(blocks, text_batch("llama", 2, t))
    specs = o.training_outputs(blocks, text_batch("llama", 3, 13))
    assert specs[0].shape[:2] == (3, 13)
    assert len(o._lengths) == 2  # (B=2) and (B=3) are separate families


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequence_specs_derived_and_kept_apart_from_training_and_other_blocks(family):
    """Inference passes (eval, inference stages) and training passes are cached apart, as are
    two layer partitions of the same model; derived inference specs equal real ones."""
    o, blocks = oracle(family)
    ids = lambda t: {"input_ids": torch.zeros((1, t), dtype=torch.int64)}  # noqa: E731
    passes = count_passes(o)
    got = [o.sequence_outputs(blocks, ids(t)) for t in (9, 12, 20)]
    assert len(passes) == 3  # 9, 12 and the confirming 51; 20 derived
    assert got == [real_pass(lambda: oracle(family)[0], blocks, ids(t), "sequence") for t in (9, 12, 20)]
    one = LayerBlocks(len(o.adapter.stages) - 2, 1)
    assert len(o.sequence_outputs(one, ids(20))) == len(one) != len(got[2])
    assert o.training_outputs(blocks, text_batch(family, 1, 20))[-1] != got[2][-1]  # a loss, not logits


def test_one_oracle_per_architecture_and_process():
    from aftune.models.shapes import shape_oracle

    config = _configs()["llama"].to_dict()
    assert shape_oracle(config, "eager", torch.float32) is shape_oracle(dict(config), "eager", torch.float32)
    assert shape_oracle(config, "sdpa", torch.float32) is not shape_oracle(config, "eager", torch.float32)
