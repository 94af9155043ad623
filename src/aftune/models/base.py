"""The model adapter interface: a model as an ordered list of stages, each replayable alone.

A stage is an `nn.Module` whose `forward(hidden, context)` maps the previous stage's output to
its own. Stage 0 (the embedding) ignores `hidden` and reads the batch from the context; the last
stage (the head) returns the scalar training loss of the micro-batch (`stages`), or, for serving,
the logits of the next token or of the one example (`inference_stages`). Everything else a stage
needs (attention masks, position ids, rotary tables, the KV cache) is in the context, which the
adapter derives from the inputs and the committed config alone, so a verifier recomputes it
instead of trusting anything the provider recorded.

Stage modules wrap the model's own submodules (shared, not copied), so parameter names are the
model's state-dict names (`Adapter.parameter_names`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError

Batch = dict[str, torch.Tensor]
Context = dict[str, Any]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Stage:
    name: str  # "embedding", "layer.3", "head"
    module: nn.Module


class Adapter(ABC):
    """Splits one Hugging Face model into stages. Subclasses set `families` and `task`."""

    families: ClassVar[tuple[str, ...]]  # config.model_type values this adapter accepts
    task: ClassVar[str]  # "causal_lm" or "classification"
    batch_fields: ClassVar[tuple[str, ...]]  # tensors a batch carries, in canonical order

    def __init__(self, model: nn.Module):
        self.model = model
        self._stages: list[Stage] | None = None

    @abstractmethod
    def build_stages(self) -> list[Stage]:
        """The ordered stages: embedding, one per layer, head."""

    @abstractmethod
    def context(self, batch: Batch) -> Context:
        """Side inputs for every stage, computed from the batch alone (no grad)."""

    @property
    def stages(self) -> list[Stage]:
        if self._stages is None:
            self._stages = self.build_stages()
        return self._stages

    def run_stage(self, index: int, hidden: torch.Tensor | None, context: Context) -> torch.Tensor:
        return self.stages[index].module(hidden, context)

    # --- serving -----------------------------------------------------------------------------
    def inference_stages(self) -> list[Stage]:
        """The stages for serving one example: as in training, but the head returns the logits
        [num_labels] of the example instead of a loss (decoder LMs override this)."""
        head = self.stages[-1].module
        if not isinstance(head, ClassifierHead):
            raise NotImplementedError(f"{type(self).__name__} must define its inference stages")
        return self.stages[:-1] + [Stage("head", _ExampleLogits(head))]

    def inference_context(self, first: int, inputs: Batch) -> Context:
        """Side inputs of one inference step at position `first` (a classifier has one step)."""
        batch = dict(inputs)
        dtype = model_dtype(self.model)
        if "pixel_values" in batch and batch["pixel_values"].dtype != dtype:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.no_grad():
            ctx = self.context(batch)
        ctx["cache"] = None
        return ctx


class ClassifierHead(nn.Module):
    """A classification head: `logits(hidden)` [B, num_labels]; as a training stage, their mean
    single-label cross-entropy against the batch's labels."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden, context):
        return single_label_loss(self.logits(hidden), context["batch"]["labels"])


class _ExampleLogits(nn.Module):
    """Serving a classifier: the logits of the one example."""

    def __init__(self, head: ClassifierHead):
        super().__init__()
        self.head = head

    def forward(self, hidden, context):
        return self.head.logits(hidden)[0]


def single_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of [B, C] logits against integer labels [B] (IGNORE_INDEX skipped)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"classification labels must be integers, got {labels.dtype}")
    num_labels = logits.shape[-1]
    return nn.functional.cross_entropy(
        logits.view(-1, num_labels), labels.to(logits.device).view(-1), ignore_index=IGNORE_INDEX
    )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not IGNORE_INDEX."""
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def padding_causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: 0 where query i may attend key j (j <= i, key not padding)."""
    b, t = attention_mask.shape
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None, :, :] & attention_mask.bool()[:, None, None, :]
    mask = torch.zeros(b, 1, t, t, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def padding_bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, 1, T] mask: 0 for real keys, the dtype's minimum for padding keys."""
    allowed = attention_mask.bool()[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
