"""The seeded example order (SPEC.md 4.2): which examples each micro-batch holds.

Epoch e is the example indices sorted by H(TAG_ORDER || u64(seed) || u64(epoch) || u64(index)),
not a framework RNG, so any verifier can recompute it; micro-batch k takes the batch_size
positions after k * batch_size in the concatenation of epochs 0, 1, 2, ...

    OrderCache("blake3", seed=0, num_examples=48).indices(micro_index=3, batch_size=8)
"""

from __future__ import annotations

from ..core.encoding import TAG_ORDER, hash_message, u64

def epoch_order(algorithm: str, seed: int, epoch: int, num_examples: int) -> list[int]:
    """Example indices of one epoch: sorted by H(TAG_ORDER || seed || epoch || index)."""
    keys = [(hash_message(algorithm, TAG_ORDER, u64(seed), u64(epoch), u64(i)), i) for i in range(num_examples)]
    return [i for _, i in sorted(keys)]


class OrderCache:
    """Memoises epoch orders across many micro-batches of one run."""

    def __init__(self, algorithm: str, seed: int, num_examples: int):
        self.algorithm, self.seed, self.n = algorithm, seed, num_examples
        self._epochs: dict[int, list[int]] = {}

    def indices(self, micro_index: int, batch_size: int) -> list[int]:
        out = []
        for k in range(micro_index * batch_size, (micro_index + 1) * batch_size):
            epoch, offset = divmod(k, self.n)
            if epoch not in self._epochs:
                self._epochs[epoch] = epoch_order(self.algorithm, self.seed, epoch, self.n)
            out.append(self._epochs[epoch][offset])
        return out


