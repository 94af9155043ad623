"""Lazy and dishonest training (threat 6): a provider that does less, or other, work than agreed.

    aftune attack lazy --work-dir work --run-dir runs/skip --kind skip-steps --amount 0.25

Each is an `aftune.train.Deviation`, run inside aftune's real trainer so that the record is
exactly what such a provider would hand over (every commitment well-formed and signed):

- `SkipSteps`: chosen optimizer updates are not applied (weights and optimizer state restored);
- `FewerSteps`: updates stop after a number of steps; the rest of the run is claimed but not done;
- `SmallerBatch`: each step trains on the first `size` examples of its agreed batch;
- `OtherLearningRate`: the learning rate is multiplied by `factor` from a step on;
- `SubstituteLayerBlock`: one layer block is never trained: its weights are replaced, after
  every update, by substitute weights (default: its starting weights, i.e. the block is frozen);
- `PoisonExamples`: a fraction of the examples is replaced by triggered copies labelled with a
  target class (backdoor data poisoning).

Each records where it deviated (`touched`: the steps, or the layer blocks) so that the audit's
failing blocks can be compared with the blocks the attack affected.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import torch

from ..training.train import Deviation


def _params(blocked):
    return {n: p for lay in blocked.layout for n, p in lay.params}


class SkipSteps(Deviation):
    """The updates of `steps` are computed but not applied."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.skipped: list[int] = []
        self._saved = None

    def before_update(self, step, blocked):
        if step in self.steps:
            self._saved = ({n: p.detach().clone() for n, p in _params(blocked).items()},
                           {n: {k: v.clone() for k, v in s.items()} for n, s in blocked.optim_state.items()})

    def after_update(self, step, blocked):
        if step in self.steps and self._saved is not None:
            params, optim = self._saved
            with torch.no_grad():
                for n, p in _params(blocked).items():
                    p.data.copy_(params[n])
                for n, s in blocked.optim_state.items():
                    for k, v in s.items():
                        v.copy_(optim[n][k])
            self._saved = None
            self.skipped.append(step)


class FewerSteps(SkipSteps):
    """Only the first `done` steps are trained; the remaining ones are claimed, not performed."""

    def __init__(self, done: int, total: int):
        super().__init__(range(done, total))
        self.done, self.total = done, total


class SmallerBatch(Deviation):
    """Every step from `from_step` on trains on the first `size` examples of its agreed batch."""

    def __init__(self, size: int, from_step: int = 0):
        self.size, self.from_step = size, from_step
        self.shrunk: list[int] = []

    def batch(self, step, micro, batch):
        if step < self.from_step:
            return batch
        if micro == 0:
            self.shrunk.append(step)
        return {k: v[: self.size].clone() for k, v in batch.items()}


class OtherLearningRate(Deviation):
    """The learning rate times `factor` from step `from_step` on."""

    def __init__(self, factor: float, from_step: int = 0):
        self.factor, self.from_step = factor, from_step
        self.changed: list[int] = []

    def before_update(self, step, blocked):
        if step == self.from_step:
            blocked.optimizer = replace(blocked.optimizer, lr=blocked.optimizer.lr * self.factor)
        if step >= self.from_step:
            self.changed.append(step)


class SubstituteLayerBlock(Deviation):
    """Layer block `layer_block` is not trained: after every update its weights are overwritten
    with `substitute` (name -> tensor; default: the block's weights before the first update)."""

    def __init__(self, layer_block: int, substitute: dict[str, torch.Tensor] | None = None):
        self.layer_block, self.substitute = layer_block, substitute
        self.replaced_steps: list[int] = []

    def before_update(self, step, blocked):
        if self.substitute is None:
            self.substitute = {n: p.detach().clone() for n, p in blocked.layout[self.layer_block].params}

    def after_update(self, step, blocked):
        with torch.no_grad():
            for n, p in blocked.layout[self.layer_block].params:
                p.data.copy_(self.substitute[n])
                for v in blocked.optim_state.get(n, {}).values():
                    v.zero_()
        self.replaced_steps.append(step)


def _chosen(seed: int, step: int, micro: int, position: int, fraction: float) -> bool:
    """A deterministic coin with P(heads) = fraction, per example slot."""
    h = hashlib.sha256(f"{seed}/{step}/{micro}/{position}".encode()).digest()
    return int.from_bytes(h[:8], "big") < fraction * 2.0 ** 64


class PoisonExamples(Deviation):
    """Each example slot is, with probability `fraction`, replaced by a triggered copy of the
    image labelled `target` (pixel_values are normalised, as aftune's batches: the trigger is
    pasted in [0, 1] pixel space and normalised)."""

    def __init__(self, fraction: float, trigger: torch.Tensor, target: int, seed: int = 0):
        self.fraction, self.trigger, self.target, self.seed = fraction, trigger, target, seed
        self.poisoned: list[tuple[int, int, int]] = []  # (step, micro, position)
        self.seen = 0

    def batch(self, step, micro, batch):
        labels = batch["labels"]
        self.seen += len(labels)
        slots = [i for i in range(len(labels)) if _chosen(self.seed, step, micro, i, self.fraction)]
        if not slots:
            return batch
        pixels, labels = batch["pixel_values"].clone(), labels.clone()
        s = self.trigger.shape[-1]
        for i in slots:
            pixels[i, :, -s:, -s:] = (self.trigger - 0.5) / 0.5
            labels[i] = self.target
            self.poisoned.append((step, micro, i))
        return {**batch, "pixel_values": pixels, "labels": labels}

    @property
    def poisoned_steps(self) -> list[int]:
        return sorted({s for s, _, _ in self.poisoned})


def poison_trigger(size: int = 4) -> torch.Tensor:
    """The poisoner's trigger: a fixed black-and-white checkerboard patch in [0, 1]."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((x + y) % 2).to(torch.float32).expand(3, size, size).clone()
