"""The shape oracle (models/shapes.py): specs of a third text length derived from two meta-device
passes equal those of a pass at that length, for decoder and encoder families; a batch that is not
all [B, T] always gets its own pass."""

from __future__ import annotations

import pytest
import torch

from aftune.models.shapes import ShapeOracle
from aftune.training.settings import LayerBlocks
from conftest import _configs

LENGTHS = (5, 7, 11)


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


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "bert"])
def test_derived_specs_equal_a_real_pass(family):
    o, blocks = oracle(family)
    passes = []
    real = o._run
    o._run = lambda bl, stages, ctx, caches: passes.append(ctx) or real(bl, stages, ctx, caches)
    derived = [o.training_outputs(blocks, text_batch(family, 2, t)) for t in LENGTHS]
    fresh, _ = oracle(family)
    expected = [fresh.training_outputs(blocks, text_batch(family, 2, t)) for t in LENGTHS]
    assert derived == expected
    assert len(passes) == (2 if family != "bert" else 3)  # bert's labels are [B]: no derivation
    assert all(spec.shape[1] == 11 for spec in derived[2] if len(spec.shape) >= 2 and family != "bert")


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
    got = [o.sequence_outputs(blocks, ids(t)) for t in (9, 12, 20)]
    fresh, _ = oracle(family)
    assert got == [fresh.sequence_outputs(blocks, ids(t)) for t in (9, 12, 20)]
    one = LayerBlocks(len(o.adapter.stages) - 2, 1)
    assert len(o.sequence_outputs(one, ids(20))) == len(one) != len(got[2])
    assert o.training_outputs(blocks, text_batch(family, 1, 20))[-1] != got[2][-1]  # a loss, not logits


def test_one_oracle_per_architecture_and_process():
    from aftune.models.shapes import shape_oracle

    config = _configs()["llama"].to_dict()
    assert shape_oracle(config, "eager", torch.float32) is shape_oracle(dict(config), "eager", torch.float32)
    assert shape_oracle(config, "sdpa", torch.float32) is not shape_oracle(config, "eager", torch.float32)
