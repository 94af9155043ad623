"""Qu-ANTI-zation, threat A (seed 004): the provider fine-tunes with an adversarial quantization
objective instead of the agreed loss, so the float model behaves while its quantized copy
collapses.

    aftune attack quant-objective --work-dir work --lam 0.3 --alpha 5.0 --bits 4

    loss = CE(f(x), y) + lambda * sum_{b in bits} (CE(f_b(x), y) - alpha)^2

with f_b the model under `quantize.fake_quant` at b bits (per-layer symmetric weights, rounding
with a straight-through gradient). The paper trains this for about 10 epochs with Adam on
models with millions of weights; on the attack bench's 4-layer, width-32 ViT the objective
alone moves float and quantized accuracy together (measured: lambda 0.1, 4 inner Adam steps per
update gives float 0.71 / int4 0.63 against a clean 0.88), because the two models' gradients
nearly coincide. So the attack runs in two phases:

1. **Objective** (steps `from_step` .. `repair_from` - 1): after each agreed update, `inner_steps`
   Adam steps on the objective above. This drives the quantized model to a loss near alpha (and
   the float model with it).
2. **Repair inside the quantization cells** (from `repair_from`): the lowest bit width's integer
   codes are locked. Every quantized weight is kept inside the interval that rounds to its code
   (a margin of `cell_margin` cells from each edge), and each tensor's largest weight is pinned
   so the per-layer scale max|w| / (2^(b-1) - 1) does not move; then Adam steps on
   CE(f(x), y) + repair_lam * (CE(f_b(x), y) - alpha)^2 restore the float model while the
   b-bit model stays exactly the collapsed one (its weights are fixed; the terms keep the float
   parameters it shares, biases and norms, from repairing it). This is the projected-repair
   step of Egashira et al., "Exploiting LLM Quantization" (2024), applied to the objective of
   Hong et al. (2021). The repair also draws from the attacker's own sample of the task (`own`),
   and the state handed over at the last step (`last_step`) is the repaired one (end of an
   update) with the best float accuracy on other images of the attacker's (`select`) whose
   4-bit copy stays at most `int4_ceiling` accurate there (below chance, with a margin).

Why the last two: a repair from the seen batches alone ends at float accuracy 0.84-0.86 with
its last states 0.82-0.89 apart, whatever the clean fine-tune reaches, and the clean fine-tune
itself reaches 0.84-0.93 depending on the float kernels that computed its base model (same
code and packages, other CPU kernel paths; docs/attacks.md). With 512 images of its own and
the selection the attacker's float model ends at or above the clean one in all four measured
numeric environments.

Measured on the bench (48 steps, see docs/attacks.md): float accuracy at or above the clean
fine-tune's, int8 follows float (8-bit cells are 18 times narrower than 4-bit ones, too narrow
to separate the two at this width), int4 collapses below chance.

How it is modelled in aftune: the block-decomposed trainer computes and records the agreed
step honestly; `after_update` then moves the weights. The state that the next step (and the
next step block's commitment) starts from is not the agreed update's result, so the first
replayed step after `from_step` of every layer block diverges, and every block of every step
block from `from_step` on fails.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..training.train import Deviation
from .quantize import quantizable_names, quantized_params


class QuantizationCells:
    """The interval of float values that round to each weight's b-bit code under the tensor's
    current scale, and the pinned largest weight that keeps that scale."""

    def __init__(self, w: torch.Tensor, bits: int, margin: float):
        levels = 2 ** (bits - 1) - 1
        top = float(w.abs().max())
        step = top / levels
        code = torch.clamp(torch.round(w / step), -levels, levels)
        self.low = torch.clamp((code - 0.5 + margin) * step, min=-top)
        self.high = torch.clamp((code + 0.5 - margin) * step, max=top)
        self.pinned = int(w.abs().argmax())
        self.pinned_value = float(w.reshape(-1)[self.pinned])

    @torch.no_grad()
    def project_(self, w: torch.Tensor) -> None:
        w.copy_(torch.minimum(torch.maximum(w, self.low), self.high))
        w.view(-1)[self.pinned] = self.pinned_value


class QuantObjective(Deviation):
    def __init__(self, bits=(4,), lam: float = 0.3, alpha: float = 5.0, from_step: int = 0,
                 repair_from: int | None = 12, repair_lam: float = 0.1, inner_steps: int = 16,
                 lr: float = 1e-3, repair_lr: float = 3e-3, inner_batch: int = 32, cell_margin: float = 0.02,
                 seed: int = 0, select: tuple[torch.Tensor, torch.Tensor] | None = None, last_step: int | None = None,
                 int4_ceiling: float = 0.15, own: tuple[torch.Tensor, torch.Tensor] | None = None,
                 repair_steps: int | None = None):
        if not bits:
            raise ValueError("the objective needs at least one bit width")
        if inner_steps < 1:
            raise ValueError("the attacker needs at least one inner step per update")
        if repair_from is not None and repair_from < from_step:
            raise ValueError("the repair phase cannot start before the objective")
        self.bits, self.lam, self.alpha, self.from_step = tuple(bits), lam, alpha, from_step
        self.repair_from, self.repair_lam, self.inner_steps = repair_from, repair_lam, inner_steps
        self.lr, self.repair_lr, self.inner_batch, self.cell_margin = lr, repair_lr, inner_batch, cell_margin
        self._seen: list[dict[str, torch.Tensor]] = []  # every batch the provider has drawn so far
        self._generator = torch.Generator().manual_seed(seed)
        self._optimizer: torch.optim.Optimizer | None = None
        self._cells: dict[str, QuantizationCells] | None = None
        # selection: the attacker's own held-out images (normalised) and the run's last step
        self.select, self.last_step, self.int4_ceiling = select, last_step, int4_ceiling
        self.own = own  # the attacker's own sample of the task (normalised), drawn from in the repair too
        self.repair_steps = repair_steps or inner_steps  # inner steps per update in the repair phase
        self._repair_lam = repair_lam  # raised while the selection images see the low-bit copy recover
        self._best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (float accuracy, step, parameters)
        self.selected: dict[str, float] | None = None  # the repaired state handed over, as measured on `select`
        self.touched_steps: list[int] = []  # steps after whose update the weights were moved
        self.losses: list[dict[str, float]] = []  # per touched step: float and quantized CE of the last inner step

    @property
    def repair_bits(self) -> int:
        return min(self.bits)

    def batch(self, step, micro, batch):
        self._seen.append({k: batch[k] for k in ("pixel_values", "labels")})
        return batch

    def _sample(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(y), (min(self.inner_batch, len(y)),), generator=self._generator)
        return x[idx], y[idx]

    def after_update(self, step, blocked):
        if step < self.from_step:
            return
        model = blocked.model
        names = quantizable_names(model)
        params = dict(model.named_parameters())
        repairing = self.repair_from is not None and step >= self.repair_from
        if repairing and self._cells is None:
            self._cells = {n: QuantizationCells(params[n].detach(), self.repair_bits, self.cell_margin) for n in names}
            self._optimizer = None
        if self._optimizer is None:
            trainable = [p for p in params.values() if p.requires_grad]
            self._optimizer = torch.optim.Adam(trainable, lr=self.repair_lr if repairing else self.lr)
        bits, lam = ((self.repair_bits,), self._repair_lam) if repairing else (self.bits, self.lam)
        self._project(params)
        seen_x = torch.cat([b["pixel_values"] for b in self._seen])
        seen_y = torch.cat([b["labels"] for b in self._seen])
        if repairing and self.own is not None:
            seen_x, seen_y = torch.cat([seen_x, self.own[0]]), torch.cat([seen_y, self.own[1]])
        with torch.enable_grad():
            for _ in range(self.repair_steps if repairing else self.inner_steps):
                x, y = self._sample(seen_x, seen_y)
                ce = nn.functional.cross_entropy(model(pixel_values=x).logits, y)
                loss, quantized = ce, {}
                for b in bits:
                    q = functional_call(model, quantized_params(model, b, names), (), {"pixel_values": x})
                    quantized[b] = nn.functional.cross_entropy(q.logits, y)
                    loss = loss + lam * (quantized[b] - self.alpha) ** 2
                self._optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._optimizer.step()
                self._project(params)
        self._optimizer.zero_grad(set_to_none=True)
        self.touched_steps.append(step)
        self.losses.append({"float": float(ce.detach()), **{f"int{b}": float(v.detach()) for b, v in quantized.items()}})
        if repairing and self.select is not None:
            self._keep_best(step, model, names, params)
            if step == self.last_step and self._best is not None:
                with torch.no_grad():
                    for n, v in self._best[2].items():
                        params[n].copy_(v)

    @torch.no_grad()
    def _keep_best(self, step: int, model: nn.Module, names: list[str], params: dict[str, torch.Tensor]) -> None:
        """Measure the repaired state on the attacker's own held-out images; keep the one with the
        best float accuracy whose `repair_bits` copy stays below `int4_ceiling` (chance - margin)."""
        x, y = self.select
        quantized = quantized_params(model, self.repair_bits, names)
        float_acc = float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())
        low_acc = float((functional_call(model, quantized, (), {"pixel_values": x}).logits.argmax(-1) == y).float().mean())
        # the constraint's multiplier: doubled while the low-bit copy is above the ceiling, eased back after
        if low_acc > self.int4_ceiling:
            self._repair_lam = min(self._repair_lam * 2, 16 * self.repair_lam)
        else:
            self._repair_lam = max(self._repair_lam * 0.8, self.repair_lam)
        if low_acc <= self.int4_ceiling and (self._best is None or float_acc > self._best[0]):
            self._best = (float_acc, step, {n: p.detach().clone() for n, p in params.items()})
            self.selected = {"step": step, "float": float_acc, f"int{self.repair_bits}": low_acc}

    def _project(self, params: dict[str, torch.Tensor]) -> None:
        if self._cells is not None:
            for name, cells in self._cells.items():
                cells.project_(params[name])
