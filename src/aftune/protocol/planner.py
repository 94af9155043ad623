"""The audit planner: how many blocks to challenge, and how, to catch a threat with a target probability.

    aftune plan --layer-blocks 8 --step-blocks 64 --target 0.99 --skip-steps 0.05 --poison-examples 0.01

Every probability is exact (closed form or an exact recursion; no simulation) and is for the worst
case the threat allows: where a threat leaves the provider free to choose which blocks it
tampers, it is assumed to choose the blocks each strategy is least likely to draw. The provider
is also assumed to concentrate its deviation in as few blocks as it can (docs/threats.md, "the
concentrating adversary"): one block's committed tensors can steer every other block (a fake
boundary gradient drives every upstream block; one inflated gradient norm sets the whole step's
clipping coefficient), so changing the updates of a step block costs it one failing block there,
in the layer block of its choice. The `columns` strategy checks whole step blocks, where that one
block cannot hide. SPEC.md 9.5 states each threat model and formula.

Grid: L layer blocks x S step blocks, N = L*S blocks; a challenge draws K of them (aftune.challenge).
A tampered block is one whose replay fails; a threat is caught when a challenge draws at least one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from ..errors import InputError
from .challenge import DEFAULT_EDGE_WEIGHT, MAX_EDGE_WEIGHT, STRATEGIES, Challenge, columns_for
from .probability import (edge_layer_blocks, hypergeometric_miss, stratified_miss, weighted_miss,
                          weighted_miss_curve)

THREAT_KINDS = ("tampered_blocks", "skip_steps", "poison_examples", "tamper_params", "substitute_layers")
PLANNED_STRATEGIES = ("uniform", "stratified", "columns", "weighted")  # order = preference when counts tie


# ---------------------------------------------------------------------------------------------
# Threats: how many blocks each makes fail, and where.

@dataclass(frozen=True)
class Threat:
    """A deviation the audit should catch. `amount` is a block count for "tampered_blocks" and a
    fraction in (0, 1] for the others."""

    kind: str
    amount: float
    name: str = ""  # shown instead of "kind amount" when given

    def __post_init__(self):
        if self.kind not in THREAT_KINDS:
            raise InputError(f"unknown threat {self.kind!r}: choose one of {', '.join(THREAT_KINDS)}")
        a = self.amount
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise InputError(f"{self.label}: the amount must be a number, got {a!r}")
        if self.kind == "tampered_blocks":
            if not isinstance(a, int) and not float(a).is_integer() or a < 1:
                raise InputError(f"--tampered-blocks must be a positive integer, got {a!r}")
        elif not 0 < a <= 1:
            raise InputError(f"--{self.kind.replace('_', '-')} is a fraction in (0, 1], got {a!r}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        amount = int(self.amount) if self.kind == "tampered_blocks" else f"{self.amount:g}"
        return f"{self.kind.replace('_', '-')} {amount}"


@dataclass(frozen=True)
class ThreatModel:
    """What a threat does to the grid, as far as detection depends on it.

    shape: "free" (m blocks anywhere the provider likes), "one_per_step_block" (one block in each
    of `units` step blocks, in the layer block the provider likes), "step_blocks" (every layer
    block of `units` step blocks), "layer_blocks" (`units` layer blocks in every step block), or
    "last_layer_block" (the last layer block of `units` step blocks)."""

    threat: Threat
    tampered: int  # m: the fewest blocks this threat makes fail
    shape: str
    units: int
    model: str  # one line: the assumption behind m

    def to_json(self) -> dict[str, Any]:
        return {"threat": self.threat.label, "kind": self.threat.kind, "amount": self.threat.amount,
                "tampered_blocks": self.tampered, "shape": self.shape, "model": self.model}


def threat_model(threat: Threat, num_layer_blocks: int | None, num_step_blocks: int | None, *,
                 num_blocks: int | None = None, layer_block_params: list[int] | None = None) -> ThreatModel:
    """Translate a threat into the fewest blocks it makes fail (SPEC.md 9.5.2).

    Without the grid's shape (only N), m is a lower bound valid for every shape and only uniform
    sampling can be assessed."""
    L, S = num_layer_blocks, num_step_blocks
    n = L * S if L and S else num_blocks
    if not n or n < 1:
        raise InputError("give the grid: --layer-blocks and --step-blocks, or at least --blocks")
    f = float(threat.amount)
    shaped = L is not None and S is not None
    if threat.kind == "tampered_blocks":
        m = int(threat.amount)
        if m > n:
            raise InputError(f"{threat.label}: the grid has only {n} blocks")
        return ThreatModel(threat, m, "free", m, f"{_n(m, 'block')} fail, wherever the provider chooses")
    if threat.kind == "skip_steps":
        if not shaped:
            return ThreatModel(threat, 1, "free", 1, "skipped steps fail at least 1 block: a concentrating provider "
                               "fails one block per step block it touches (grid shape unknown)")
        units = _ceil_times(threat.amount, S)
        return ThreatModel(threat, units, "one_per_step_block", units,
                           f"skipped steps packed into ceil(F*S) = {_n(units, 'step block')}; a concentrating provider "
                           f"skips each step's updates with one inflated gradient norm (the global clipping scale), so "
                           f"only that norm's layer block fails: {_n(units, 'block')}, one per step block, in the "
                           f"layer blocks it chooses")
    if threat.kind == "poison_examples":
        if not shaped:
            return ThreatModel(threat, 1, "free", 1, "a poisoned example fails at least 1 block (grid shape unknown)")
        units = _ceil_times(threat.amount, S)
        return ThreatModel(threat, units, "last_layer_block", units,
                           f"poisoned examples packed into ceil(F*S) = {_n(units, 'step block')}; label-only poisoning "
                           f"fails only the last layer block (labels, loss) of each: {_n(units, 'block')}")
    if threat.kind == "tamper_params":
        if not shaped:
            return ThreatModel(threat, 1, "free", 1, "tampered parameters fail at least 1 block (grid shape unknown)")
        c, how = _layer_blocks_holding(f, L, layer_block_params)
        return ThreatModel(threat, c, "free", c,
                           f"a fraction {f:g} of parameters spans at least {_n(c, 'layer block')} ({how}); an edit made "
                           f"once fails only the block where it happens: {_n(c, 'block')}, wherever the provider chooses")
    # substitute_layers
    if not shaped:
        m = _ceil_times(threat.amount, n)
        return ThreatModel(threat, m, "free", m, f"substituted layers fail at least ceil(F*N) = {_n(m, 'block')}")
    c = _ceil_times(threat.amount, L)
    return ThreatModel(threat, c * S, "layer_blocks", c,
                       f"a fraction {f:g} of layers spans ceil(F*L) = {_n(c, 'layer block')}, substituted for every "
                       f"step: {c} x {S} blocks")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _exact(fraction: float) -> Fraction:
    """The fraction the user wrote (0.1 is 1/10, not the nearest double), so 0.1 x 30 is 3, not 4."""
    return Fraction(repr(float(fraction)))


def _ceil_times(fraction: float, n: int) -> int:
    return max(1, math.ceil(_exact(fraction) * n))


def _layer_blocks_holding(fraction: float, num_layer_blocks: int, sizes: list[int] | None) -> tuple[int, str]:
    if sizes is None:
        return _ceil_times(fraction, num_layer_blocks), "assuming layer blocks of equal size"
    if len(sizes) != num_layer_blocks or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes) \
            or not sum(sizes):
        raise InputError(f"layer_block_params must list {num_layer_blocks} non-negative parameter counts")
    need, held, c = _exact(fraction) * sum(sizes), 0, 0
    for size in sorted(sizes, reverse=True):  # the largest blocks hold the fraction in the fewest blocks
        held, c = held + size, c + 1
        if held >= need:
            break
    return max(1, c), "the largest layer blocks first"


def threat_detection(model: ThreatModel, strategy: str, count: int, num_layer_blocks: int | None,
                     num_step_blocks: int | None, *, num_blocks: int | None = None,
                     edge_weight: int = DEFAULT_EDGE_WEIGHT) -> float:
    """P(detect) of a threat by a challenge of K blocks with `strategy`, for the placement of the
    tampered blocks least likely to be drawn by that strategy (SPEC.md 9.5.3)."""
    L, S = num_layer_blocks, num_step_blocks
    n = L * S if L and S else num_blocks
    m = model.tampered
    if strategy == "all":
        return 1.0 if m else 0.0
    if strategy == "uniform":
        return 1.0 - hypergeometric_miss(n, m, count)
    if L is None or S is None:
        raise InputError(f"the {strategy} strategy needs the grid's shape: give --layer-blocks and --step-blocks")
    if strategy == "weighted":
        edge = _weighted_edge_tampered(model, L, S)
        return 1.0 - weighted_miss(L, S, count, edge, m - edge, edge_weight)
    if strategy == "stratified":
        if model.shape == "free":  # as even as possible over the step blocks (the miss probability is Schur-concave)
            per_step = [m // S + (i < m % S) for i in range(min(m, S))]
        elif model.shape == "step_blocks":
            per_step = [L] * model.units
        elif model.shape in ("last_layer_block", "one_per_step_block"):
            per_step = [1] * model.units
        else:
            per_step = [model.units] * S
        return 1.0 - stratified_miss(L, S, count, per_step)
    if strategy == "columns":
        return 1.0 - hypergeometric_miss(S, _step_blocks_touched(model, L, S), columns_for(count, L))
    raise InputError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")


def _step_blocks_touched(model: ThreatModel, num_layer_blocks: int, num_step_blocks: int) -> int:
    """How many step blocks hold a tampered block, in the placement the columns strategy is least
    likely to catch (free blocks packed into as few step blocks as they fit)."""
    if model.shape == "free":
        return -(-model.tampered // num_layer_blocks)
    if model.shape == "layer_blocks":
        return num_step_blocks
    return model.units


def _weighted_edge_tampered(model: ThreatModel, num_layer_blocks: int, num_step_blocks: int) -> int:
    """How many of the threat's blocks lie in the first or last layer block, in the placement the
    weighted strategy is least likely to catch (interior blocks first, where the threat allows)."""
    e = edge_layer_blocks(num_layer_blocks)
    interior_rows = num_layer_blocks - e
    if model.shape == "free":
        return max(0, model.tampered - interior_rows * num_step_blocks)
    if model.shape == "step_blocks":
        return model.units * e
    if model.shape == "last_layer_block":
        return model.units
    if model.shape == "one_per_step_block":  # interior layer blocks when there are any
        return 0 if interior_rows else model.units
    return num_step_blocks * max(0, model.units - interior_rows)  # layer_blocks: interior rows first


def smallest_count(probability: Callable[[int], float], num_blocks: int, target: float) -> int:
    """The smallest K in [1, N] with probability(K) >= target, by bisection (probability is
    non-decreasing in K for every strategy: the top-K draws of a fixed seed grow with K)."""
    if probability(num_blocks) < target:
        raise InputError(f"even challenging all {num_blocks} blocks does not reach {target}")
    lo, hi = 1, num_blocks
    while lo < hi:
        mid = (lo + hi) // 2
        if probability(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def threat_smallest_count(model: ThreatModel, strategy: str, target: float, num_layer_blocks: int | None,
                          num_step_blocks: int | None, *, num_blocks: int | None = None,
                          edge_weight: int = DEFAULT_EDGE_WEIGHT) -> int:
    """The smallest K with which `strategy` catches the threat with probability >= target."""
    L, S = num_layer_blocks, num_step_blocks
    n = L * S if L and S else num_blocks
    if strategy == "all":
        return n
    if strategy == "weighted" and L is not None and S is not None:
        edge = _weighted_edge_tampered(model, L, S)
        for k, miss in enumerate(weighted_miss_curve(L, S, edge, model.tampered - edge, edge_weight)):
            if k >= 1 and 1.0 - miss >= target:
                return k
            if k >= n:
                break
        raise InputError(f"even challenging all {n} blocks does not reach {target}")
    k = smallest_count(lambda k: threat_detection(model, strategy, k, L, S, num_blocks=n, edge_weight=edge_weight),
                       n, target)
    return columns_for(k, L) * L if strategy == "columns" else k  # columns check whole step blocks


# ---------------------------------------------------------------------------------------------
# Plans.

@dataclass(frozen=True)
class StrategyOption:
    strategy: str
    count: int  # the smallest K reaching the target for every threat
    detection: tuple[float, ...]  # P(detect) of each threat at that K

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "count": self.count, "detection": list(self.detection)}


@dataclass(frozen=True)
class Plan:
    target: float
    num_blocks: int
    num_layer_blocks: int | None
    num_step_blocks: int | None
    edge_weight: int
    threats: tuple[ThreatModel, ...]
    options: tuple[StrategyOption, ...]  # one per strategy assessed
    recommended: StrategyOption
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "num_blocks": self.num_blocks, "num_layer_blocks": self.num_layer_blocks,
                "num_step_blocks": self.num_step_blocks, "edge_weight": self.edge_weight,
                "threats": [t.to_json() for t in self.threats], "options": [o.to_json() for o in self.options],
                "recommended": self.recommended.to_json(), "notes": list(self.notes)}


def _grid(num_blocks: int | None, num_layer_blocks: int | None, num_step_blocks: int | None):
    for name, v in (("blocks", num_blocks), ("layer blocks", num_layer_blocks), ("step blocks", num_step_blocks)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"the number of {name} must be a positive integer, got {v!r}")
    L, S, n = num_layer_blocks, num_step_blocks, num_blocks
    if L is not None and S is not None:
        if n is not None and n != L * S:
            raise InputError(f"--blocks {n} is not --layer-blocks {L} x --step-blocks {S} = {L * S}")
        return L * S, L, S
    if n is not None:
        if L is not None:
            if n % L:
                raise InputError(f"--blocks {n} is not a multiple of --layer-blocks {L}")
            return n, L, n // L
        if S is not None:
            if n % S:
                raise InputError(f"--blocks {n} is not a multiple of --step-blocks {S}")
            return n, n // S, S
        return n, None, None
    raise InputError("give the grid: --layer-blocks and --step-blocks (or --blocks N, which allows uniform sampling only)")


def plan(threats: Iterable[Threat], *, target: float = 0.99, num_blocks: int | None = None,
         num_layer_blocks: int | None = None, num_step_blocks: int | None = None,
         edge_weight: int = DEFAULT_EDGE_WEIGHT, strategies: Iterable[str] | None = None,
         layer_block_params: list[int] | None = None) -> Plan:
    """For each strategy, the smallest K that catches every threat with probability >= target;
    the recommendation is the strategy needing the fewest blocks ("all" when every one needs N)."""
    threats = tuple(threats)
    if not threats:
        raise InputError("name at least one threat (--tampered-blocks, --skip-steps, --poison-examples, "
                         "--tamper-params or --substitute-layers)")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise InputError(f"the target probability must be in (0, 1], got {target!r}")
    if isinstance(edge_weight, bool) or not isinstance(edge_weight, int) or not 1 <= edge_weight <= MAX_EDGE_WEIGHT:
        raise InputError(f"the edge weight must be an integer in [1, {MAX_EDGE_WEIGHT}], got {edge_weight!r}")
    n, L, S = _grid(num_blocks, num_layer_blocks, num_step_blocks)
    models = tuple(threat_model(t, L, S, num_blocks=n, layer_block_params=layer_block_params) for t in threats)
    notes = []
    wanted = tuple(strategies) if strategies is not None else PLANNED_STRATEGIES
    for s in wanted:
        if s not in STRATEGIES:
            raise InputError(f"unknown strategy {s!r}: choose from {', '.join(STRATEGIES)}")
    shaped = ("weighted", "stratified", "columns")
    if L is None:
        if any(s in shaped for s in wanted):
            notes.append("only uniform sampling is assessed: weighted, stratified and columns need --layer-blocks "
                         "and --step-blocks")
        wanted = tuple(s for s in wanted if s not in shaped) or ("uniform",)

    def probabilities(strategy: str, k: int) -> tuple[float, ...]:
        return tuple(threat_detection(mod, strategy, k, L, S, num_blocks=n, edge_weight=edge_weight) for mod in models)

    options = []
    for strategy in wanted:  # each threat's detection grows with K: the plan needs the largest of their counts
        k = max(threat_smallest_count(mod, strategy, target, L, S, num_blocks=n, edge_weight=edge_weight)
                for mod in models)
        options.append(StrategyOption(strategy, k, probabilities(strategy, k)))
    best = min(options, key=lambda o: (o.count, wanted.index(o.strategy)))
    if best.count == n and best.strategy != "all":
        best = StrategyOption("all", n, probabilities("all", n))
        notes.append("reaching the target needs every block: challenge them all")
    if any(m.tampered == 1 for m in models):
        notes.append("a threat that fails a single block is caught only with probability about K/N: "
                     "structural checks of every block still apply (docs/threats.md)")
    return Plan(float(target), n, L, S, edge_weight, models, tuple(options), best, tuple(notes))


@dataclass(frozen=True)
class ChallengeAssessment:
    """The detection probability each threat had under one challenge."""

    challenge_digest: str
    strategy: str
    count: int
    num_blocks: int
    threats: tuple[ThreatModel, ...]
    detection: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        """The `threats` argument of aftune.report_html.render_html."""
        return {"challenge": self.challenge_digest, "strategy": self.strategy, "count": self.count,
                "num_blocks": self.num_blocks,
                "threats": [{**m.to_json(), "detection_probability": p} for m, p in zip(self.threats, self.detection)]}


def unit_threat_models(num_layer_blocks: int, num_step_blocks: int) -> tuple[ThreatModel, ...]:
    """The smallest instance of each threat: what a challenge catches at the very least."""
    L, S = num_layer_blocks, num_step_blocks
    return (
        ThreatModel(Threat("tampered_blocks", 1, "one tampered block"), 1, "free", 1,
                    "1 block fails, wherever the provider chooses (also: one edited parameter)"),
        ThreatModel(Threat("skip_steps", 1 / S, "one skipped step"), 1, "one_per_step_block", 1,
                    "a concentrating provider fails one layer block of one step block (a fake gradient norm)"),
        ThreatModel(Threat("poison_examples", 1 / S, "one poisoned example"), 1, "last_layer_block", 1,
                    "label-only poisoning fails the last layer block of one step block: 1 block"),
        ThreatModel(Threat("substitute_layers", 1 / L, "one substituted layer block"), S, "layer_blocks", 1,
                    f"one layer block substituted for every step: {S} blocks"),
    )


# the threats that need optimizer steps: an inference record has none (SPEC.md 9.7a)
TRAINING_ONLY_THREATS = ("skip_steps", "poison_examples")


def unit_inference_threat_models(num_layer_blocks: int) -> tuple[ThreatModel, ...]:
    """The smallest instance of each threat to an inference record (its layer blocks x one step
    block): a tampered layer block, and another model served in place of the committed one."""
    L = num_layer_blocks
    return (
        ThreatModel(Threat("tampered_blocks", 1, "one tampered layer block"), 1, "free", 1,
                    "1 layer block fails, wherever the provider chooses (an edited activation or weight)"),
        ThreatModel(Threat("substitute_layers", 1.0, "another model served"), L, "layer_blocks", L,
                    f"every layer block computes with other weights (e.g. a quantized copy): {_n(L, 'block')} fail"),
    )


def assess_challenge(challenge: Challenge, threats: Iterable[Threat] | None = None, *,
                     layer_block_params: list[int] | None = None) -> ChallengeAssessment:
    """P(detect) of each threat under this challenge's strategy, K and grid (worst-case placement);
    without threats, of the smallest instance of each (`unit_threat_models`; for an inference
    challenge `unit_inference_threat_models`: a record has no optimizer steps or examples to skip
    or poison, so those threats are refused)."""
    L, S, k = challenge.num_layer_blocks, challenge.num_step_blocks, challenge.num_challenged
    inference = challenge.kind == "inference"
    if threats is None:
        models = unit_inference_threat_models(L) if inference else unit_threat_models(L, S)
    else:
        threats = tuple(threats)
        if inference:
            for t in threats:
                if t.kind in TRAINING_ONLY_THREATS:
                    raise InputError(f"{t.label} is a threat to training: an inference record has no optimizer "
                                     f"steps or training examples (use --tampered-blocks, --tamper-params or "
                                     f"--substitute-layers)")
        models = tuple(threat_model(t, L, S, layer_block_params=layer_block_params) for t in threats)
    if not models:
        raise InputError("name at least one threat to assess the challenge against")
    weight = challenge.edge_weight or DEFAULT_EDGE_WEIGHT
    detection = tuple(threat_detection(m, challenge.strategy, k, L, S, edge_weight=weight) for m in models)
    return ChallengeAssessment(challenge.digest, challenge.strategy, k, L * S, models, detection)


def threat_table(challenge: Challenge, threats: Iterable[Threat] | None = None) -> dict[str, Any]:
    """The `threats` argument of aftune.report_html.render_html for this challenge."""
    return assess_challenge(challenge, threats).to_json()
