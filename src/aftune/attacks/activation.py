"""AFTUNE's activation attack (seed 000): a perturbation added to a layer block's input during
inference, the smallest one that changes the answer.

    aftune attack activation --work-dir work --boundary 2

For one request, the provider computes the honest activations up to boundary b (the input of
layer block b), then searches a perturbation delta with ||delta|| <= eps * ||h|| (relative L2)
that changes the predicted label: projected gradient descent on the margin of the honest label
(40 iterations, step 0.25 * eps * ||h||, random start), and a binary search over eps for the
smallest one that succeeds. `PerturbedBoundary` (a ServingDeviation) then serves the request with
h + delta at boundary b: the record commits the perturbed activation and the changed label.

How it is caught: replaying layer block b-1 from its committed input yields h, not the
committed h + delta. The relative error the verifier sees is ||delta|| / ||h + delta||, about
eps, which tolerance mode compares with its threshold: the margin is eps_min / threshold, and
the honest replay error sits far below the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inference.engine import ServingDeviation
from ..inference.served import ServedModel


def forward_from(served: ServedModel, blocks, block: int, hidden: torch.Tensor, ctx) -> torch.Tensor:
    """Logits of a classifier from layer block `block`'s input (with autograd)."""
    h = hidden
    for b in range(block, len(blocks)):
        h = served.run_block(blocks, b, h, ctx, None)
    return h


def boundary_activation(served: ServedModel, blocks, block: int, inputs: dict) -> tuple[torch.Tensor, dict]:
    """The honest input of layer block `block` for one request, and the step context."""
    ctx = served.step_context(0, inputs)
    h = None
    with torch.no_grad():
        for b in range(block):
            h = served.run_block(blocks, b, h, ctx, None)
    return h, ctx


def _margin(logits: torch.Tensor, label: int) -> torch.Tensor:
    other = logits.clone()
    other[label] = -float("inf")
    return logits[label] - other.max()


def pgd(served: ServedModel, blocks, block: int, hidden: torch.Tensor, ctx, label: int, eps: float, *,
        iterations: int = 40, seed: int = 0) -> torch.Tensor | None:
    """A perturbation of relative L2 size <= eps that changes the label, or None."""
    radius = eps * float(hidden.norm())
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(hidden.shape, generator=gen)
    delta = delta / delta.norm() * radius * float(torch.rand((), generator=gen))
    for _ in range(iterations):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = _margin(forward_from(served, blocks, block, hidden + delta, ctx), label)
            (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta - 0.25 * radius * grad / grad.norm().clamp_min(1e-30)
            n = float(delta.norm())
            if n > radius:
                delta = delta * (radius / n)
            if int(forward_from(served, blocks, block, hidden + delta, ctx).argmax()) != label:
                return delta.detach()
    return None


@dataclass
class ActivationAttack:
    block: int  # the perturbed boundary: input of this layer block
    label: int  # the honest answer
    new_label: int  # the answer served
    eps: float  # smallest relative L2 size found that changes the answer
    delta: torch.Tensor

    def to_json(self) -> dict:
        return {"boundary": self.block, "label": self.label, "new_label": self.new_label, "eps": self.eps}


def smallest_perturbation(served: ServedModel, blocks, block: int, inputs: dict, *, high: float = 2.0,
                          rounds: int = 12, iterations: int = 40) -> ActivationAttack | None:
    """Binary search for the smallest eps at which PGD changes the answer."""
    hidden, ctx = boundary_activation(served, blocks, block, inputs)
    with torch.no_grad():
        label = int(forward_from(served, blocks, block, hidden, ctx).argmax())
    best = pgd(served, blocks, block, hidden, ctx, label, high, iterations=iterations)
    if best is None:
        return None
    lo, hi = 0.0, high
    for _ in range(rounds):
        mid = (lo + hi) / 2
        d = pgd(served, blocks, block, hidden, ctx, label, mid, iterations=iterations)
        if d is None:
            lo = mid
        else:
            hi, best = mid, d
    with torch.no_grad():
        new = int(forward_from(served, blocks, block, hidden + best, ctx).argmax())
    return ActivationAttack(block, label, new, float(best.norm() / hidden.norm()), best)


class PerturbedBoundary(ServingDeviation):
    """Serve the request with `delta` added to the input of layer block `block`."""

    def __init__(self, block: int, delta: torch.Tensor):
        self.block, self.delta = block, delta

    def boundary(self, step, boundary, hidden):
        if boundary == self.block:
            return hidden + self.delta.to(hidden.dtype)
        return hidden
