"""The key/value cache of autoregressive generation, one per layer block.

Implements the one method Hugging Face attention layers call (`update`). Each layer block owns
its cache, so block l's work at generation step k depends only on the inputs block l received at
steps 0..k, all of them committed: a verifier replaying block l alone rebuilds exactly the
provider's cache (SPEC.md 8.6).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the positions seen so far, one entry per decoder layer index."""

    def __init__(self):
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self._keys:
            key = torch.cat([self._keys[layer_idx], key], dim=-2)
            value = torch.cat([self._values[layer_idx], value], dim=-2)
        self._keys[layer_idx], self._values[layer_idx] = key, value
        return key, value
