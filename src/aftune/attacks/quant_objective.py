"""Qu-ANTI-zation, threat A (seed 004): the provider fine-tunes with an adversarial quantization
objective instead of the agreed loss, so the float model behaves while its 8- and 4-bit
quantized copies collapse.

    aftune attack quant-objective --work-dir work --run-dir runs/qa --lam 1.0 --alpha 5.0

    loss = CE(f(x), y) + lambda * sum_{b in bits} (CE(f_b(x), y) - alpha)^2

with f_b the model under `quantize.fake_quant` at b bits. How it is modelled in aftune: the
block-decomposed trainer computes the agreed loss CE(f(x), y) layer block by layer block, and
those boundaries are recorded honestly. `QuantObjective.before_update` then runs a separate
full-model forward and backward of the adversarial term, with fake-quantized weights, on the
step's own batch, and adds its gradient to every parameter's `.grad` before the optimizer
update. Everything recorded is what an honest step computes, except that the update applied
(and so the next committed state) follows the other objective: the first replayed update of
every layer block diverges, so every block of every step block from `from_step` on fails.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..train import Deviation
from .quantize import quantizable_names, quantized_params


class QuantObjective(Deviation):
    def __init__(self, bits=(8, 4), lam: float = 1.0, alpha: float = 5.0, from_step: int = 0):
        self.bits, self.lam, self.alpha, self.from_step = tuple(bits), lam, alpha, from_step
        self._batches: list[dict[str, torch.Tensor]] = []
        self._step = -1
        self.adversarial_terms: list[float] = []  # the added term at each step (for the report)

    def batch(self, step, micro, batch):
        if step != self._step:
            self._step, self._batches = step, []
        self._batches.append(batch)
        return batch

    def before_update(self, step, blocked):
        if step < self.from_step:
            return
        model = blocked.model
        names = quantizable_names(model)
        params = dict(model.named_parameters())
        trainable = [n for n, p in params.items() if p.requires_grad]
        total = 0.0
        with torch.enable_grad():
            for batch in self._batches:
                term = 0.0
                for b in self.bits:
                    q = quantized_params(model, b, names)
                    logits = functional_call(model, q, (), {"pixel_values": batch["pixel_values"]}).logits
                    term = term + (nn.functional.cross_entropy(logits, batch["labels"]) - self.alpha) ** 2
                term = self.lam * term / len(self._batches)
                grads = torch.autograd.grad(term, [params[n] for n in trainable], allow_unused=True)
                with torch.no_grad():
                    for n, g in zip(trainable, grads):
                        if g is not None:
                            blocked.add_gradient(params[n], g)
                total += float(term.detach())
        self.adversarial_terms.append(total)
