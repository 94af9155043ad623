"""The chain of a chained replay (`aftune verify --all` in tolerance mode, SPEC.md 6.3 "Chain").

Each step block is replayed from its own committed start state, so a provider that moves the
state a little at the end of every step block (less than one block's end-state check allows)
leaves each block's check a small deviation while the sum of them grows without bound. The chain
carries the verifier's own state forward instead: it starts at the committed start state of its
first step block (step block 0: the agreed base model, checked there) and moves, block after
block, by the verifier's own recomputed move of that block (its replayed end state minus the
committed start state it replayed from). After step block s the chained state is

    c = e_{s+1} - sum over the chain's blocks j <= s of (e_{j+1} - a_{j+1})

(e: committed, a: recomputed from e_j), so comparing c with the committed end state e_{s+1}
compares the sum of every block's unexplained move with the rounding the replays allow, summed
over the same steps (U of the state rule, summed since the chain's start).

Moving by the recomputed move, not replaying from c itself, keeps honest rounding differences
from being amplified by the training dynamics: in bfloat16 at lr 1e-2 a free-running float32
replay diverges from an honest record as far as a 2.5 % drift per step block (docs/precision.md).

    chain = DriftChain(first=0)
    chained, total_update = chain.advance(step_block, key, start, end, update)
"""

from __future__ import annotations

import torch


class DriftChain:
    """The chained state of one layer block, from step block `first` on."""

    def __init__(self, first: int = 0):
        self.first = first
        self.through = first - 1  # the last step block whose move the chain holds
        self.state: dict[str, torch.Tensor] = {}  # key -> chained value (binary64)
        self.updates: dict[str, torch.Tensor] = {}  # key -> U summed since `first` (binary64)

    def advance(self, step_block: int, key: str, start: torch.Tensor, end: torch.Tensor,
                update: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Add step block `step_block`'s recomputed move of `key` (from the committed `start` to
        the replayed `end`, with its U `update`) and return (chained state, its summed U)."""
        start, end = start.double(), end.detach().double().reshape(start.shape)
        chained = self.state.get(key)
        chained = (start if chained is None else chained) + (end - start)
        total = self.updates.get(key)
        step_u = update.double().reshape(start.shape) if update is not None else torch.zeros_like(start)
        total = step_u.clone() if total is None else total + step_u
        self.state[key], self.updates[key], self.through = chained, total, step_block
        return chained, total


__all__ = ["DriftChain"]
