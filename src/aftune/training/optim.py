"""Optimizer updates, learning-rate schedules and gradient clipping, written out per tensor.

These are the formulas of SPEC.md 5.3, applied one parameter at a time so that replaying one
layer block performs exactly the arithmetic the provider performed for it. The update of one
tensor never depends on another tensor, except through the global clipping coefficient, which
is computed from committed per-tensor norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPTIMIZERS = ("adamw", "sgd")
# trainer_*: the same shapes with the Hugging Face Trainer's warm-up, lr * t / W from 0 (SPEC.md 5.3.2)
SCHEDULES = ("constant", "linear", "cosine", "trainer_constant", "trainer_linear", "trainer_cosine")
STATE_NAMES = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
CLIP_EPS = 1e-6


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    max_grad_norm: float = 0.0  # 0 disables clipping

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based), as a Python float (binary64)."""
        if self.schedule.startswith("trainer_"):
            return self.lr * self._trainer_factor(step)
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            return self.lr * (1.0 - progress)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr

    def _trainer_factor(self, step: int) -> float:
        """The Hugging Face Trainer's schedule factor (transformers.optimization), op for op."""
        w, total = self.warmup_steps, self.total_steps
        if step < w:
            return float(step) / float(max(1, w))
        if self.schedule == "trainer_linear":
            return max(0.0, float(total - step) / float(max(1, total - w)))
        if self.schedule == "trainer_cosine":
            progress = float(step - w) / float(max(1, total - w))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(0.5) * 2.0 * progress)))
        return 1.0


def decays(param: torch.Tensor) -> bool:
    """Weight decay applies to matrices and higher-rank tensors, not to biases and norm scales."""
    return param.dim() >= 2


def init_state(spec: OptimizerSpec, param: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(param, memory_format=torch.contiguous_format) for name in STATE_NAMES[spec.name]}


@torch.no_grad()
def apply_update(spec: OptimizerSpec, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                 step: int, decay: bool | None = None) -> None:
    """One optimizer step (`step` is 0-based) on one tensor, in place. `decay`: whether weight
    decay applies (default: `decays(param)`; a flat FSDP shard passes its whole tensor's)."""
    lr = spec.lr_at(step)
    wd = spec.weight_decay if (decays(param) if decay is None else decay) else 0.0
    if spec.name == "adamw":
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        t = step + 1
        if wd:
            param.mul_(1.0 - lr * wd)
        exp_avg.lerp_(grad, 1.0 - spec.beta1)
        exp_avg_sq.mul_(spec.beta2).addcmul_(grad, grad, value=1.0 - spec.beta2)
        bias1 = 1.0 - spec.beta1**t
        bias2 = 1.0 - spec.beta2**t
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(spec.eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias1)
    elif spec.name == "sgd":
        buf = state["momentum_buffer"]
        g = grad.add(param, alpha=wd) if wd else grad
        buf.mul_(spec.momentum).add_(g)
        param.add_(buf, alpha=-lr)
    else:  # guarded by config validation
        raise ValueError(spec.name)


def tensor_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """float32 vector of the L2 norms of each gradient, in the given order."""
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    return torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]).cpu()


def clip_coefficient(max_grad_norm: float, all_norms: list[torch.Tensor]) -> float | None:
    """The factor every gradient is multiplied by, or None when clipping is off or not needed."""
    if max_grad_norm <= 0:
        return None
    parts = [n for n in all_norms if n.numel()]
    if not parts:
        return None
    total = torch.linalg.vector_norm(torch.cat(parts))
    coef = max_grad_norm / (float(total) + CLIP_EPS)
    return coef if coef < 1.0 else None
