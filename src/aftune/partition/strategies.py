"""The TEE-shielded DNN partition (TSDP) strategies of TAOISM, as placements of linear layers.

    sites = find_sites(model, "llama")
    plan = make_plan(sites, StrategyConfig("shield-deep", shield_fraction=0.25), n_layers=4)
    plan.mode("model.layers.3.mlp.down_proj")     # "shielded"

A *site* is one linear operation with a fixed weight: `nn.Linear`, GPT-2's `Conv1D`, or an
`nn.Conv2d` (groups 1, zero padding) computed as a matrix product on im2col patches. Sites are
grouped by the model's stages (aftune's family adapters: 0 = embedding, 1..L = layers, L+1 =
head). Everything else (embeddings, norms, activations, attention scores and values, softmax)
always runs in the trusted process; the placement of a site is one of

- `shielded`: computed in the trusted process in the model's own dtype (bit-identical);
- `offloaded`: the worker multiplies the blinded, quantized input by the quantized weight;
- `split`: the weight's largest-magnitude elements stay in the trusted process (a sparse float
  product there), the rest is offloaded (`shield-large-magnitude`);
- `slice`: the worker multiplies by the public backbone's weight, the trusted process adds the
  private slice, the low-rank difference (`teeslice`, see teeslice.py);
- `whole-model`: the `none-shielded` baseline: the worker runs the whole model in plaintext and
  nothing is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError

STRATEGIES: dict[str, str] = {
    "shield-deep": "the deepest layers and the head shielded, the rest offloaded (DarkneTZ)",
    "shield-shallow": "the embedding and the first layers shielded, the rest offloaded (Serdab, Origami)",
    "shield-large-magnitude": "the largest-magnitude weights of every layer shielded, the rest offloaded (Magnitude)",
    "shield-intermediate": "a run of middle layers shielded, the rest offloaded (SOTER)",
    "shield-nonlinear": "every linear layer offloaded; non-linear operations shielded (Slalom, ShadowNet)",
    "teeslice": "public backbone offloaded, private low-rank slices shielded (TEESlice)",
    "all-shielded": "baseline: the whole model in the trusted process (black box)",
    "none-shielded": "baseline: the whole model on the worker in plaintext, nothing checked (white box)",
}
ORIGINS: dict[str, str] = {  # the TSDP solution each strategy stands for in TAOISM's evaluation
    "shield-deep": "DarkneTZ", "shield-shallow": "Serdab", "shield-large-magnitude": "Magnitude",
    "shield-intermediate": "SOTER", "shield-nonlinear": "Slalom / ShadowNet", "teeslice": "TEESlice",
    "all-shielded": "black box", "none-shielded": "white box",
}
MODES = ("shielded", "offloaded", "split", "slice", "whole-model")


@dataclass(frozen=True)
class StrategyConfig:
    """A strategy and its parameters (committed in the record)."""

    name: str
    shield_fraction: float = 0.25  # layer strategies: fraction of the L layers shielded (at least one)
    magnitude_fraction: float = 0.01  # shield-large-magnitude: fraction of each weight's elements kept
    slice_tolerance: float = 1e-6  # teeslice: singular values <= tol * sigma_max(W) are not in the slice

    def __post_init__(self) -> None:
        problems = []
        if self.name not in STRATEGIES:
            problems.append(f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}")
        if not isinstance(self.shield_fraction, (int, float)) or not 0 < self.shield_fraction <= 1:
            problems.append(f"shield_fraction must be in (0, 1], got {self.shield_fraction!r}")
        if not isinstance(self.magnitude_fraction, (int, float)) or not 0 < self.magnitude_fraction < 1:
            problems.append(f"magnitude_fraction must be in (0, 1), got {self.magnitude_fraction!r}")
        if not isinstance(self.slice_tolerance, (int, float)) or not 0 <= self.slice_tolerance < 1:
            problems.append(f"slice_tolerance must be in [0, 1), got {self.slice_tolerance!r}")
        if problems:
            raise InputError("; ".join(problems))

    def to_json(self) -> dict:
        return {"name": self.name, "shield_fraction": float(self.shield_fraction),
                "magnitude_fraction": float(self.magnitude_fraction), "slice_tolerance": float(self.slice_tolerance)}

    @classmethod
    def from_json(cls, obj: object) -> StrategyConfig:
        if not isinstance(obj, dict) or set(obj) != {"name", "shield_fraction", "magnitude_fraction", "slice_tolerance"}:
            raise InputError(f"malformed strategy: {str(obj)[:200]}")
        return cls(**obj)


@dataclass(frozen=True)
class Site:
    """One linear operation with a fixed weight, seen as y = x @ W^T with W [d_out, d_in]."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear", "conv1d" (GPT-2) or "conv2d" (im2col)
    stage: int  # 0 embedding, 1..L layers, L+1 head
    d_in: int
    d_out: int
    weight: str  # the weight's parameter name (the first name of a tied tensor)
    offloadable: bool = True
    reason: str = ""  # why a site cannot be offloaded


@dataclass(frozen=True)
class Placement:
    site: str
    mode: str


@dataclass(frozen=True)
class Plan:
    strategy: StrategyConfig
    n_layers: int
    sites: tuple[Site, ...]
    placements: tuple[Placement, ...]

    def mode(self, site: str) -> str:
        for p in self.placements:
            if p.site == site:
                return p.mode
        raise InputError(f"layer {site} is not a linear site of this model")

    @property
    def shielded_stages(self) -> tuple[int, ...]:
        return tuple(sorted({s.stage for s in self.sites if self.mode(s.name) == "shielded"}))

    def to_json(self) -> dict:
        return {"strategy": self.strategy.to_json(), "layers": self.n_layers,
                "sites": [[s.name, s.kind, s.stage, s.d_in, s.d_out, p.mode]
                          for s, p in zip(self.sites, self.placements, strict=True)]}


def weight_matrix(module: nn.Module, kind: str) -> torch.Tensor:
    """The site's weight as [d_out, d_in] (a view where possible)."""
    w = module.weight
    if kind == "conv1d":
        return w.T
    if kind == "conv2d":
        return w.reshape(w.shape[0], -1)
    return w


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "conv1d"
    return None


def _conv_offloadable(m: nn.Conv2d) -> str:
    if m.groups != 1:
        return f"grouped convolution (groups={m.groups})"
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return f"padding {m.padding!r} / {m.padding_mode} is not plain zero padding"
    return ""


def find_sites(model: nn.Module, family: str) -> list[Site]:
    """Every linear site of the model, in module order, with its stage."""
    from ..models import adapter_class

    stages = adapter_class(family)(model).stages
    owner: dict[int, int] = {}
    for i, st in enumerate(stages):
        for m in st.module.modules():
            owner.setdefault(id(m), i)
    names = {id(p): n for n, p in model.named_parameters()}
    sites = []
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is None:
            continue
        if id(m) not in owner:
            raise InputError(f"layer {name} belongs to no stage of the {family} adapter; cannot place it")
        w = weight_matrix(m, kind)
        reason = _conv_offloadable(m) if kind == "conv2d" else ""
        sites.append(Site(name, kind, owner[id(m)], int(w.shape[1]), int(w.shape[0]), names[id(m.weight)],
                          offloadable=not reason, reason=reason))
    if not sites:
        raise InputError(f"the {family} model has no linear layer to place")
    return sites


def shielded_stages(config: StrategyConfig, n_layers: int) -> set[int]:
    """Stages kept whole in the trusted process by the layer strategies."""
    k = min(n_layers, max(1, math.ceil(config.shield_fraction * n_layers - 1e-9)))
    if config.name == "shield-deep":
        return set(range(n_layers - k + 1, n_layers + 2))  # the last k layers and the head
    if config.name == "shield-shallow":
        return set(range(k + 1))  # the embedding and the first k layers
    if config.name == "shield-intermediate":
        start = 1 + (n_layers - k) // 2
        return set(range(start, start + k))
    return set()


def make_plan(sites: list[Site], config: StrategyConfig, n_layers: int,
              changed_sites: set[str] | None = None) -> Plan:
    """Placement of every site under a strategy. `changed_sites` (teeslice): the sites whose
    weight differs from the public backbone's."""
    name = config.name
    if name == "teeslice" and changed_sites is None:
        raise InputError("teeslice needs the public backbone the model was fine-tuned from: TEESlice partitions "
                         "before training, and a model trained in one piece has no private slices to shield")
    stages = shielded_stages(config, n_layers)
    placements = []
    for s in sites:
        if name == "none-shielded":
            mode = "whole-model"
        elif name == "all-shielded" or not s.offloadable or s.stage in stages:
            mode = "shielded"
        elif name == "shield-large-magnitude":
            mode = "split"
        elif name == "teeslice":
            mode = "slice" if s.name in changed_sites else "offloaded"
        else:
            mode = "offloaded"
        placements.append(Placement(s.name, mode))
    return Plan(config, n_layers, tuple(sites), tuple(placements))


@dataclass(frozen=True)
class Exposure:
    """What the worker sees under a plan, in elements (parameters: unique tensors of the model;
    activations: inputs and outputs of every linear site over the run)."""

    parameters: int
    parameters_plaintext: int  # elements whose exact value the worker receives
    activations: int
    activations_plaintext: int  # elements the worker sees in clear
    activations_blinded: int  # elements it sees only as x + r mod p (one-time r)
    macs: int  # multiply-accumulates of the linear sites
    macs_trusted: int  # of which computed in the trusted process (shielded parts)
    macs_offloaded: int = 0
    notes: tuple[str, ...] = field(default=())

    def fractions(self) -> dict[str, float]:
        def frac(a: int, b: int) -> float:
            return a / b if b else 0.0

        return {"parameters_plaintext": frac(self.parameters_plaintext, self.parameters),
                "activations_plaintext": frac(self.activations_plaintext, self.activations),
                "activations_blinded": frac(self.activations_blinded, self.activations),
                "macs_trusted": frac(self.macs_trusted, self.macs),
                "macs_offloaded": frac(self.macs_offloaded, self.macs)}


def exposure(plan: Plan, model: nn.Module, site_rows: dict[str, int], *, shielded_elements: dict[str, int],
             slice_ranks: dict[str, int], blinded: bool = True) -> Exposure:
    """Exposure of a plan given the rows each site processed (`site_rows`), the number of
    weight elements a split site keeps (`shielded_elements`) and each slice's rank."""
    params = {id(p): p.numel() for p in model.parameters()}
    modules = dict(model.named_modules())
    plain_params: set[int] = set()
    partial = 0
    acts = acts_seen = macs = macs_trusted = macs_off = 0
    whole = plan.strategy.name == "none-shielded"
    for s, p in zip(plan.sites, plan.placements, strict=True):
        rows = site_rows.get(s.name, 0)
        site_macs = rows * s.d_in * s.d_out
        site_acts = rows * (s.d_in + s.d_out)
        acts, macs = acts + site_acts, macs + site_macs
        wid = id(modules[s.name].weight)
        if p.mode == "shielded":
            macs_trusted += site_macs
            continue
        acts_seen += site_acts
        macs_off += site_macs
        if p.mode in ("offloaded", "whole-model"):
            plain_params.add(wid)
        elif p.mode == "split":
            partial += s.d_in * s.d_out - shielded_elements.get(s.name, 0)
            macs_trusted += rows * shielded_elements.get(s.name, 0)
        elif p.mode == "slice":
            macs_trusted += rows * slice_ranks.get(s.name, 0) * (s.d_in + s.d_out)
    if whole:
        plain_params = set(params)
    notes = []
    if whole:
        notes.append("the worker runs the whole model: every weight and activation in plaintext, nothing checked")
    if plan.strategy.name == "teeslice":
        notes.append("offloaded weights are the public backbone's; the private slices never cross")
    if plan.strategy.name == "shield-large-magnitude":
        notes.append("zeros in the exposed weights reveal where the shielded elements are")
    plaintext = whole or not blinded
    return Exposure(parameters=sum(params.values()), parameters_plaintext=sum(params[i] for i in plain_params) + partial,
                    activations=acts, activations_plaintext=acts_seen if plaintext else 0,
                    activations_blinded=0 if plaintext else acts_seen, macs=macs, macs_trusted=macs_trusted,
                    macs_offloaded=macs_off, notes=tuple(notes))
