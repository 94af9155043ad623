"""Tensors absent from a base checkpoint, such as the new classification head of an encoder
fine-tuned from its base weights (all-MiniLM-L6-v2 has no `classifier.*`): initialised from the
agreement's seed, deterministically (SPEC.md 4.7), so the client's agreement and the provider's
training hold the same bytes and the agreement commits them. Without a seed they are refused.

    load_pretrained(model_dir, "sdpa", torch.float32, head_init=HeadInit("blake3", seed=0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.encoding import TAG_HEAD_INIT, hashed_uniforms
from ..errors import InputError


@dataclass(frozen=True)
class HeadInit:
    """The agreement's hash algorithm and seed, from which absent tensors are drawn."""

    algorithm: str
    seed: int


def absent_tensor(init: HeadInit, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` absent from the checkpoint: zeros for a vector (a bias), otherwise
    (2u - 1) / sqrt(fan_in), fan_in = prod(shape[1:]) (PyTorch's Linear bound), u the hashed
    uniforms of TAG_HEAD_INIT for `name` (core.encoding.hashed_uniforms), rounded once to `dtype`."""
    if len(shape) < 2:
        return torch.zeros(shape, dtype=dtype)
    u = hashed_uniforms(init.algorithm, TAG_HEAD_INIT, init.seed, name, math.prod(shape))
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return ((2.0 * u - 1.0) * bound).reshape(shape).to(dtype)


def init_absent(model: nn.Module, names: list[str], init: HeadInit | None, where: str) -> None:
    """Fill the model's tensors `names` (absent from the checkpoint in `where`) from `init`, or
    refuse them when there is no agreement seed to draw them from."""
    if not names:
        return
    names = sorted(names)
    if init is None:
        raise InputError(f"{where} has no weights for {', '.join(names[:4])}: tensors absent from a base checkpoint "
                         "are drawn from the agreement's seed, so agree on it first (`aftune agree`) and train "
                         "under that agreement")
    state = model.state_dict()
    with torch.no_grad():
        for name in names:
            target = state[name]
            target.copy_(absent_tensor(init, name, tuple(target.shape), target.dtype))
