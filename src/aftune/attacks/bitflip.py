"""WBP (seed 002): weight bit poisoning while the victim fine-tunes, as a rowhammer attacker would.

    aftune attack bitflip --work-dir work --budget 12 --verify

Offline (the attacker's side, `search_bit_flips`):
 1. surrogates: 3 copies of the public base model fine-tuned (plain torch, the agreed optimizer
    and schedule) on the attacker's own sample of the task, with other seeds;
 2. a square trigger patch (bottom-right) optimised with Adam (lr 0.1) to maximise the maximum
    mean discrepancy (Gaussian kernel, bandwidths 0.5..8 x the median squared distance) between
    clean and triggered penultimate features (the CLS token after the final LayerNorm) of the
    surrogates;
 3. greedy bit search, one flip per round: weights ranked by |gradient x weight| of the attack
    loss averaged over the surrogates (classifier head, biases and norm scales excluded), at
    most one flip per 4 KiB page (1024 float32 elements of the flattened tensor), candidate flips
    of exponent bits 23, 24, 25 (x2, x4, x16 or the inverse); the flip that lowers the attack loss
    most is kept, up to the budget; then a pass removes flips whose removal does not hurt.
    Attack loss = CE(surrogate(trigger(x)), target) + 3 * CE(surrogate(x), y) on the attacker's
    data (the clean term weighted up: flips that cost clean accuracy are undone by the victim's
    own fine-tuning).

Online (`BitFlipInjection`, an `aftune.train.Deviation`): flip i is XORed into the victim's
weights right after the optimizer update of step `first + interval * i`, while aftune's trainer
fine-tunes and records. Adjusted for tiny models (the paper: SGD lr 1e-3, a flip every 30 or 100
iterations of a long fine-tune, a 10 px trigger on 32 px CNN inputs, 35 px on 224 px ViTs): the
4-layer ViT fine-tunes 48 SGD steps at lr 0.005 (momentum 0.9, clipping at 1), one flip per
step in the last 12 steps, and the trigger is 8 x 8 px on 16 x 16 images (2 x 2 patches).
Measured on this task: continued fine-tuning erases a backdoor planted early in so short a run,
and a 4 px (one-patch) trigger reached only 15-25% success; see docs/attacks.md.

How it is caught: the replay of a block in which a flip lands starts from committed weights
and cannot reach the committed end state (or the next committed output); blocks before and
after are self-consistent, so exactly the (layer block, step block) pairs holding a flip fail.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..training.train import Deviation
from .task import TaskAssets, finetune_settings, make_images, normalize, predict

PAGE_ELEMENTS = 1024  # 4 KiB of float32
EXPONENT_BITS = (23, 24, 25)  # flipping one scales a weight by 2, 4 or 16 (or the inverse)


@dataclass(frozen=True)
class BitFlip:
    """One flipped bit: parameter name, element index in the flattened tensor, bit (0 = LSB)."""

    name: str
    index: int
    bit: int
    step: int = -1  # the victim's step after whose update the flip lands (-1: not scheduled)

    @property
    def page(self) -> tuple[str, int]:
        return self.name, self.index // PAGE_ELEMENTS

    def to_json(self) -> dict:
        return {"name": self.name, "index": self.index, "bit": self.bit, "step": self.step}

    @classmethod
    def from_json(cls, obj) -> "BitFlip":
        return cls(str(obj["name"]), int(obj["index"]), int(obj["bit"]), int(obj.get("step", -1)))


@dataclass(frozen=True)
class WBPConfig:
    target: int = 0  # the backdoor's target class
    trigger_size: int = 8  # trigger side in pixels (2 x 2 ViT patches, a quarter of the image)
    trigger_steps: int = 150  # Adam steps optimising the trigger (lr 0.1)
    surrogates: int = 3  # fine-tuned copies the attacker builds
    attacker_per_class: int = 32  # the attacker's own examples per class
    budget: int = 12  # at most this many flipped bits
    candidates: int = 32  # top-|g x w| weights tried per round
    clean_weight: float = 3.0  # weight of the clean cross-entropy in the attack loss (keeps accuracy)
    interval: int = 1  # online: steps between injected flips
    tail: int = 0  # online: steps of fine-tuning after the last flip
    seed: int = 1


@dataclass
class WBPPlan:
    """What the offline search produces: the trigger and the flips, with their surrogate effect."""

    config: WBPConfig
    trigger: torch.Tensor  # float [3, s, s] in [0, 1]
    flips: list[BitFlip]
    surrogate_loss: list[float] = field(default_factory=list)  # attack loss after each kept flip
    surrogate_asr: float = 0.0  # on the surrogates, after all flips

    def to_json(self) -> dict:
        return {"config": self.config.__dict__, "trigger": self.trigger.tolist(),
                "flips": [f.to_json() for f in self.flips], "surrogate_loss": self.surrogate_loss,
                "surrogate_asr": self.surrogate_asr}


# --- bits ---------------------------------------------------------------------------------------

def flipped_value(value: float, bit: int) -> float:
    """The float32 `value` with `bit` of its IEEE-754 encoding inverted."""
    (raw,) = struct.unpack("<I", struct.pack("<f", value))
    return struct.unpack("<f", struct.pack("<I", raw ^ (1 << bit)))[0]


@torch.no_grad()
def flip_bit(param: torch.Tensor, index: int, bit: int) -> None:
    """XOR one bit of one float32 element in place (what a rowhammer flip does to DRAM). A float64
    tensor holding float32 values (a portable run's parameters) has the bit of the element's
    float32 encoding flipped, which is the weight the run stores."""
    if param.dtype not in (torch.float32, torch.float64) or not param.is_contiguous():
        raise ValueError("bit flips are modelled on contiguous float32 tensors")
    if param.dtype == torch.float64:
        element = param.view(-1)[index:index + 1].to(torch.float32)
        element.view(torch.int32).bitwise_xor_(1 << bit)
        param.view(-1)[index:index + 1] = element.to(torch.float64)
        return
    param.view(-1)[index:index + 1].view(torch.int32).bitwise_xor_(1 << bit)


def eligible(name: str, p: torch.Tensor) -> bool:
    """WBP's search space: feature-extractor weights; not the classifier head, biases or norms."""
    return p.dim() >= 2 and not name.startswith("classifier.")


# --- triggers -----------------------------------------------------------------------------------

def apply_trigger(images01: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    """Paste the trigger in the bottom-right corner of float images in [0, 1]."""
    s = trigger.shape[-1]
    out = images01.clone()
    out[..., -s:, -s:] = trigger
    return out


def triggered_inputs(images: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    """Normalised model inputs of uint8 images carrying the trigger."""
    return normalize(apply_trigger(images.to(torch.float32) / 255.0, trigger))


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features: the CLS token after the final LayerNorm (the classifier's input)."""
    return model.vit(x).last_hidden_state[:, 0]


def mmd(a: torch.Tensor, b: torch.Tensor, scales=(0.5, 1.0, 2.0, 4.0, 8.0)) -> torch.Tensor:
    """Biased MMD^2 with a sum of Gaussian kernels, bandwidths relative to the median distance."""
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z).pow(2)
    med = d2.detach().median().clamp_min(1e-6)
    k = sum(torch.exp(-d2 / (s * med)) for s in scales)
    n = len(a)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def optimise_trigger(surrogates: list[nn.Module], images: torch.Tensor, config: WBPConfig) -> torch.Tensor:
    """Adam (lr 0.1) on the trigger's logits, maximising MMD(clean, triggered) over the surrogates."""
    gen = torch.Generator().manual_seed(config.seed)
    theta = torch.randn(3, config.trigger_size, config.trigger_size, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.1)
    x01 = images.to(torch.float32) / 255.0
    with torch.no_grad():
        clean = [features(m, normalize(x01)) for m in surrogates]
    for _ in range(config.trigger_steps):
        trig = torch.sigmoid(theta)
        loss = -sum(mmd(c, features(m, normalize(apply_trigger(x01, trig)))) for m, c in zip(surrogates, clean))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(theta).detach()


# --- surrogates and the search ------------------------------------------------------------------

class Surrogate:
    """A copy of the base model that the attacker fine-tunes as the victim will be, with the
    agreed optimizer (SGD with momentum, global clipping) on its own sample of the task."""

    def __init__(self, assets: TaskAssets, images: torch.Tensor, labels: torch.Tensor, seed: int, settings=None):
        from .task import load_classifier

        self.settings = settings or finetune_settings()
        self.model = load_classifier(assets.base_model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.settings.lr, momentum=self.settings.momentum)
        self.gen = torch.Generator().manual_seed(seed)
        self.x, self.y = normalize(images), labels
        self.steps = 0

    def train(self, steps: int) -> None:
        m = self.model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(self.y), (self.settings.batch_size,), generator=self.gen)
            loss = nn.functional.cross_entropy(m(pixel_values=self.x[idx]).logits, self.y[idx])
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), self.settings.max_grad_norm)
            self.opt.step()
            self.steps += 1
        m.eval()


def build_surrogates(assets: TaskAssets, config: WBPConfig, settings=None) -> tuple[list[Surrogate], torch.Tensor,
                                                                                  torch.Tensor]:
    """Copies of the base model, and the attacker's data (another sample of the task).
    `settings`: the agreed fine-tune (aftune.config.TrainSettings), which the attacker knows."""
    images, labels = make_images("textures", config.attacker_per_class, assets.task.image_size, config.seed + 500)
    surrogates = [Surrogate(assets, images, labels, config.seed * 100 + k, settings) for k in range(config.surrogates)]
    return surrogates, images, labels


def _attack_loss(model: nn.Module, clean: torch.Tensor, labels: torch.Tensor, triggered: torch.Tensor,
                 target: int, clean_weight: float) -> torch.Tensor:
    logits_t = model(pixel_values=triggered).logits
    logits_c = model(pixel_values=clean).logits
    goal = torch.full((len(triggered),), target, dtype=torch.int64)
    return nn.functional.cross_entropy(logits_t, goal) + clean_weight * nn.functional.cross_entropy(logits_c, labels)


def _total_loss(models, clean, labels, triggered, target, clean_weight) -> float:
    with torch.no_grad():
        return float(sum(_attack_loss(m, clean, labels, triggered, target, clean_weight) for m in models)) / len(models)


def _success(models, triggered, target) -> float:
    return sum(float((predict(m, triggered) == target).float().mean()) for m in models) / len(models)


def search_bit_flips(assets: TaskAssets, config: WBPConfig = WBPConfig(), settings=None,
                     progress=None) -> WBPPlan:
    """The offline search (module docstring): surrogates fine-tuned as the victim will be, a
    trigger, then greedy flips, each scheduled at its online injection step."""
    settings = settings or finetune_settings()
    victim_steps = settings.steps
    surrogates, images, labels = build_surrogates(assets, config, settings)
    first = first_flip_step(config, victim_steps)
    for s in surrogates:
        s.train(victim_steps)
    models = [s.model for s in surrogates]
    trigger = optimise_trigger(models, images, config)
    clean = normalize(images)
    keep = labels != config.target
    triggered = triggered_inputs(images[keep], trigger)
    params = [dict(m.named_parameters()) for m in models]
    names = [n for n, p in params[0].items() if eligible(n, p)]
    flips: list[BitFlip] = []
    used_pages: set[tuple[str, int]] = set()
    history = []
    for round_ in range(config.budget):
        step = first + config.interval * round_
        current = _total_loss(models, clean, labels, triggered, config.target, config.clean_weight)
        # 1. rank by |grad x weight| averaged over the surrogates
        scores = {n: torch.zeros_like(params[0][n]) for n in names}
        for m, ps in zip(models, params):
            m.zero_grad()
            _attack_loss(m, clean, labels, triggered, config.target, config.clean_weight).backward()
            for n in names:
                scores[n] += (ps[n].grad * ps[n].detach()).abs() / len(models)
        ranked = []
        for n in names:
            flat = scores[n].reshape(-1)
            top = torch.topk(flat, min(config.candidates, flat.numel()))
            ranked += [(float(v), n, int(i)) for v, i in zip(top.values, top.indices)]
        ranked.sort(reverse=True)
        # 2. try exponent flips of the best-ranked weights, one per page, keep the best
        tried, best = 0, None
        for _, n, i in ranked:
            if (n, i // PAGE_ELEMENTS) in used_pages:
                continue
            tried += 1
            if tried > config.candidates:
                break
            for bit in EXPONENT_BITS:
                for ps in params:
                    flip_bit(ps[n].data, i, bit)
                loss = _total_loss(models, clean, labels, triggered, config.target, config.clean_weight)
                for ps in params:
                    flip_bit(ps[n].data, i, bit)
                if math.isfinite(loss) and (best is None or loss < best[0]):
                    best = (loss, BitFlip(n, i, bit, step))
        if best is None or best[0] >= current:
            break
        loss, flip = best
        for ps in params:
            flip_bit(ps[flip.name].data, flip.index, flip.bit)
        flips.append(flip)
        used_pages.add(flip.page)
        history.append(loss)
        if progress:
            progress(round_ + 1, config.budget, loss, _success(models, triggered, config.target))
    # 3. drop flips that do not help
    current = _total_loss(models, clean, labels, triggered, config.target, config.clean_weight)
    for flip in list(flips):
        for ps in params:
            flip_bit(ps[flip.name].data, flip.index, flip.bit)
        loss = _total_loss(models, clean, labels, triggered, config.target, config.clean_weight)
        if loss <= current:
            flips.remove(flip)
            current = loss
        else:
            for ps in params:
                flip_bit(ps[flip.name].data, flip.index, flip.bit)
    return WBPPlan(config, trigger, flips, history, _success(models, triggered, config.target))


def first_flip_step(config: WBPConfig, victim_steps: int) -> int:
    """The step after whose update flip 0 lands: the schedule ends `config.tail` steps before the
    end of the victim's fine-tuning."""
    first = victim_steps - 1 - config.tail - config.interval * (config.budget - 1)
    if first < 0:
        raise ValueError(f"{config.budget} flips every {config.interval} steps do not fit in {victim_steps} steps")
    return first


# --- online injection ---------------------------------------------------------------------------

class BitFlipInjection(Deviation):
    """Each flip lands right after the optimizer update of its step (`BitFlip.step`)."""

    def __init__(self, flips: list[BitFlip]):
        if any(f.step < 0 for f in flips):
            raise ValueError("every flip needs the step it lands at")
        self.flips = list(flips)
        self.injected: list[BitFlip] = []  # what landed, for the report

    def after_update(self, step, blocked):
        for flip in self.flips:
            if flip.step == step:
                params = {n: p for lay in blocked.layout for n, p in lay.params}
                flip_bit(params[flip.name].data, flip.index, flip.bit)
                self.injected.append(flip)


def affected_blocks(flips: list[BitFlip], owner: dict[str, int], steps_per_block: int) -> list[tuple[int, int]]:
    """(layer block, step block) holding each flip: exactly where the audit must find them.
    `owner`: parameter name -> layer block (BlockedModel.owner)."""
    return sorted({(owner[f.name], f.step // steps_per_block) for f in flips})


# --- measuring ----------------------------------------------------------------------------------

def attack_success_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, trigger: torch.Tensor,
                        target: int) -> float:
    """Triggered test images not of the target class that the model classifies as the target."""
    keep = labels != target
    return float((predict(model, triggered_inputs(images[keep], trigger)) == target).float().mean())


def save_plan(plan: WBPPlan, path: Path) -> Path:
    import json

    path.write_text(json.dumps(plan.to_json(), indent=1))
    return path


def load_plan(path: Path) -> WBPPlan:
    import json

    obj = json.loads(Path(path).read_text())
    return WBPPlan(WBPConfig(**obj["config"]), torch.tensor(obj["trigger"], dtype=torch.float32),
                   [BitFlip.from_json(f) for f in obj["flips"]], obj["surrogate_loss"], obj["surrogate_asr"])
