"""AFTUNE's parameter attack (seed 000): an edit of chosen layers' weights under a relative-L2
bound (per tensor) that plants a backdoor (a triggered input answered with a target class) or
poisons one input (misclassified), the smallest edit that succeeds.

    aftune attack parameter --work-dir work --layer vit.layers.3

`smallest_edit` runs projected gradient descent on the edit (||delta_t|| <= bound * ||W_t|| for
every edited tensor t; loss = cross-entropy of the attack input towards its goal plus that of
the attacker's clean inputs towards their labels, so the rest of the model's behaviour stays)
and a binary search over the bound. `search_edit` also chooses the layer: how large an edit a
layer needs differs by an order of magnitude between layers and between two fine-tunes of the
same task (measured: the backdoor needs 0.1 of layer.0 but more than 0.5 of layer.2 on the
small bench, and under 0.06 of layer.1 on the full one), so it walks a schedule of bounds,
trying every candidate layer at each (the preferred one first), and refines the first bound at
which a layer reaches every goal. Where it is caught:

- serving: `EditedWeights` (a ServingDeviation) answers with W + delta while the record claims
  the fine-tuned model's digest: the inference verifier's replay of the edited layer block with
  the committed weights differs (strict and tolerance mode); a record that honestly names the
  edited model fails the model-digest / run-binding check instead;
- training: the edit written into RUN/model after training makes `Verifier.check_final_model`
  fail, naming the tensors; an edit made after the last update (`EditDuringTraining`) fails the
  replay of its (layer block, last step block), also in tolerance mode with calibrated thresholds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..inference.engine import ServingDeviation
from ..training.train import Deviation


BOUND_SCHEDULE = (0.1, 0.25, 0.5)  # relative-L2 bounds tried in turn by `search_edit`


PREFERRED_LAYER = "vit.layers.2"  # tried first at every bound (the layer the attack has always edited)


def candidate_layers(model: nn.Module, layer: str | None = None) -> list[str]:
    """The layers an edit may change: `layer` alone when the attacker names one (a layer prefix or
    one tensor), else every layer of the model (`vit.layers.0`, ...), PREFERRED_LAYER first, then
    the others nearest to it first."""
    if layer is not None:
        return [layer]
    found: dict[str, tuple[str, int]] = {}
    for name, _ in model.named_parameters():
        m = re.match(r"^(.*\.layers)\.(\d+)\.", name)
        if m:
            found[f"{m.group(1)}.{m.group(2)}"] = (m.group(1), int(m.group(2)))
    if not found:
        raise ValueError("the model has no `*.layers.N` layers: name the layer to edit")
    stack, index = found.get(PREFERRED_LAYER, (None, 0))
    return sorted(found, key=lambda k: (found[k][0] != stack, abs(found[k][1] - index), found[k][1]))


def layer_weights(model: nn.Module, prefix: str) -> list[str]:
    """The weight matrices of a layer (`vit.layers.3`) or one named tensor."""
    params = dict(model.named_parameters())
    if prefix in params:
        return [prefix]
    names = [n for n, p in params.items() if n.startswith(prefix + ".") and p.dim() >= 2]
    if not names:
        raise ValueError(f"no weight matrix named {prefix!r} or under it")
    return names


@dataclass
class ParameterEdit:
    goal: str  # backdoor | poison
    layers: list[str]
    bound: float  # the smallest per-tensor relative-L2 bound at which the search succeeded
    rel_l2: float  # largest ||delta_t|| / ||W_t|| of the edit found
    success: float  # fraction of the attack inputs answered as wanted
    delta: dict[str, torch.Tensor]
    layer: str = ""  # the layer (or tensor) edited, as searched

    def to_json(self) -> dict:
        return {"goal": self.goal, "layer": self.layer, "layers": self.layers, "bound": self.bound,
                "rel_l2": self.rel_l2, "success": self.success}


@dataclass(frozen=True)
class Goal:
    """What one edit must make the model answer: `y` for the attack inputs `x`."""

    name: str  # backdoor | poison
    x: torch.Tensor
    y: torch.Tensor


def _logits(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, weights, (), {"pixel_values": x}).logits


def optimise_edit(model: nn.Module, layers: list[str], bound: float, attack_x: torch.Tensor, attack_y: torch.Tensor,
                  clean_x: torch.Tensor, clean_y: torch.Tensor, *, iterations: int = 40) -> dict[str, torch.Tensor]:
    """Projected gradient descent on the edit within the per-tensor bound: normalised gradient
    steps of 0.2 of the bound's radius, decayed (cosine) to 0.02, so the iterate settles instead of
    circling the goal's boundary. Returns the final edit if it reaches the goal, else the last
    iterate that did (if any): every iterate lies within the bound."""
    params = dict(model.named_parameters())
    w = {n: params[n].detach() for n in layers}
    radius = {n: bound * float(w[n].norm()) for n in layers}
    delta = {n: torch.zeros_like(w[n]) for n in layers}
    reached = None
    for k in range(iterations):
        step = 0.02 + 0.09 * (1 + math.cos(math.pi * k / max(1, iterations - 1)))
        for d in delta.values():
            d.requires_grad_(True)
        with torch.enable_grad():
            edited = {n: w[n] + delta[n] for n in layers}
            attack_logits = _logits(model, edited, attack_x)
            loss = nn.functional.cross_entropy(attack_logits, attack_y) + \
                nn.functional.cross_entropy(_logits(model, edited, clean_x), clean_y)
            grads = torch.autograd.grad(loss, [delta[n] for n in layers])
        if bool((attack_logits.argmax(-1) == attack_y).all()):
            reached = {n: d.detach().clone() for n, d in delta.items()}
        with torch.no_grad():
            for n, g in zip(layers, grads):
                d = delta[n] - step * radius[n] * g / g.norm().clamp_min(1e-30)
                norm = float(d.norm())
                delta[n] = d * (radius[n] / norm) if norm > radius[n] else d
    final = {n: d.detach() for n, d in delta.items()}
    if reached is None or _success(model, layers, final, attack_x, attack_y) == 1.0:
        return final
    return reached


def _success(model, layers, delta, x, y) -> float:
    params = dict(model.named_parameters())
    with torch.no_grad():
        edited = {n: params[n].detach() + delta[n] for n in layers}
        return float((_logits(model, edited, x).argmax(-1) == y).float().mean())


def smallest_edit(model: nn.Module, layers: list[str], goal: str, attack_x: torch.Tensor, attack_y: torch.Tensor,
                  clean_x: torch.Tensor, clean_y: torch.Tensor, *, threshold: float = 1.0, high: float = 0.5,
                  low: float = 0.0, rounds: int = 8, iterations: int = 40,
                  first: dict[str, torch.Tensor] | None = None) -> ParameterEdit | None:
    """Binary search between `low` (known to fail) and `high` for the smallest bound whose edit
    answers `threshold` of the attack inputs as wanted. `first`: an edit already found at `high`."""
    model.eval()
    params = dict(model.named_parameters())

    def attempt(bound):
        d = optimise_edit(model, layers, bound, attack_x, attack_y, clean_x, clean_y, iterations=iterations)
        return d, _success(model, layers, d, attack_x, attack_y)

    best, rate = (first, _success(model, layers, first, attack_x, attack_y)) if first is not None else attempt(high)
    if rate < threshold:
        return None
    best_bound, best_rate = high, rate
    lo, hi = low, high
    for _ in range(rounds):
        mid = (lo + hi) / 2
        d, r = attempt(mid)
        if r >= threshold:
            hi, best, best_bound, best_rate = mid, d, mid, r
        else:
            lo = mid
    rel = max(float(best[n].norm() / params[n].detach().norm()) for n in layers)
    return ParameterEdit(goal, list(layers), best_bound, rel, best_rate, best)


def search_edit(model: nn.Module, candidates: list[str], goals: list[Goal], clean_x: torch.Tensor,
                clean_y: torch.Tensor, *, schedule=BOUND_SCHEDULE, rounds: int = 6,
                iterations: int = 40) -> list[ParameterEdit] | None:
    """One layer's smallest edits for every goal. The bounds of `schedule` are tried in turn;
    at each, every candidate layer (in the order given) until one reaches all the goals; each
    goal's bound is then refined by binary search down to the largest bound of the schedule at
    which that layer missed it. None when no candidate reaches every goal within the last bound."""
    model.eval()
    missed: dict[tuple[str, str], float] = {}  # (layer, goal) -> largest bound tried that missed it
    for bound in schedule:
        for layer in candidates:
            names = layer_weights(model, layer)
            found: list[dict[str, torch.Tensor]] = []
            for g in goals:
                d = optimise_edit(model, names, bound, g.x, g.y, clean_x, clean_y, iterations=iterations)
                if _success(model, names, d, g.x, g.y) < 1.0:
                    missed[(layer, g.name)] = bound
                    break
                found.append(d)
            if len(found) < len(goals):
                continue
            edits = []
            for g, d in zip(goals, found):
                e = smallest_edit(model, names, g.name, g.x, g.y, clean_x, clean_y, high=bound,
                                  low=missed.get((layer, g.name), 0.0), rounds=rounds, iterations=iterations, first=d)
                e.layer = layer
                edits.append(e)
            return edits
    return None


def edited_accuracy(model: nn.Module, edit: ParameterEdit, x: torch.Tensor, y: torch.Tensor) -> float:
    params = dict(model.named_parameters())
    edited = {n: params[n].detach() + edit.delta[n] for n in edit.layers}
    with torch.no_grad():
        pred = torch.cat([_logits(model, edited, x[i:i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


class EditedWeights(ServingDeviation):
    """Serve W + delta while the record claims the unedited model."""

    def __init__(self, delta: dict[str, torch.Tensor]):
        self.delta = delta

    def weights(self, model):
        params = dict(model.named_parameters())
        for n, d in self.delta.items():
            params[n].data.add_(d.to(params[n].dtype))


class EditDuringTraining(Deviation):
    """Add the edit to the weights right after the update of step `step` (the last one, say)."""

    def __init__(self, delta: dict[str, torch.Tensor], step: int):
        self.delta, self.step = delta, step

    def after_update(self, step, blocked):
        if step == self.step:
            params = {n: p for lay in blocked.layout for n, p in lay.params}
            with torch.no_grad():
                for n, d in self.delta.items():
                    params[n].add_(d)
