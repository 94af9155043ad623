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
   Hong et al. (2021).

Measured on the bench (48 steps, see docs/attacks.md): float accuracy stays at or above the clean
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
                 seed: int = 0):
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
        bits, lam = ((self.repair_bits,), self.repair_lam) if repairing else (self.bits, self.lam)
        self._project(params)
        seen_x = torch.cat([b["pixel_values"] for b in self._seen])
        seen_y = torch.cat([b["labels"] for b in self._seen])
        with torch.enable_grad():
            for _ in range(self.inner_steps):
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

    def _project(self, params: dict[str, torch.Tensor]) -> None:
        if self._cells is not None:
            for name, cells in self._cells.items():
                cells.project_(params[name])
