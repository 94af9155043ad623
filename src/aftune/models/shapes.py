"""Expected shapes of the tensors that cross layer-block boundaries, from the architecture alone.

A verifier feeds committed boundary tensors into its replay. Before it does, it checks their
shapes and dtypes against what the agreed computation produces, computed here by running the
stages on PyTorch's meta device (shapes only: no arithmetic, no memory for weights). A committed
tensor of another shape is then a finding against the provider, and an error the replay still
raises is aftune's own (exit 3), never a verdict.

    oracle = ShapeOracle(hf_config, "sdpa", torch.float32)
    oracle.training_outputs(blocks, batch)        # [TensorSpec of block 0's output, block 1's, ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.encoding import dtype_name
from .cache import KVCache
from .loading import build_model
from .registry import adapter_class


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape and dtype (safetensors name, as committed)."""

    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def spec_of(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(t.shape), dtype_name(t.dtype))


def _meta(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in batch.items()}


class ShapeOracle:
    """The architecture on the meta device, in the dtype the record was computed in."""

    def __init__(self, hf_config: dict[str, Any], attn_implementation: str, dtype: torch.dtype):
        model = build_model(hf_config, attn_implementation, dtype, device="meta")
        self.adapter = adapter_class(hf_config["model_type"])(model)
        self._cache: dict[Any, list[TensorSpec]] = {}

    @torch.no_grad()
    def training_outputs(self, blocks, batch: dict[str, torch.Tensor]) -> list[TensorSpec]:
        """The output spec of every layer block for a micro-batch shaped like `batch`."""
        key = ("train", tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items())))
        if key not in self._cache:
            self.adapter.model.train()
            ctx = self.adapter.context(_meta(batch))
            self._cache[key] = self._run(blocks, self.adapter.stages, ctx, None)
        return self._cache[key]

    @torch.no_grad()
    def inference_outputs(self, blocks, steps: list[tuple[int, int]], step_inputs) -> list[list[TensorSpec]]:
        """Per generation step, the output spec of every layer block; `step_inputs(k)` gives the
        inputs of step k (their shapes only are used)."""
        self.adapter.model.eval()
        stages = self.adapter.inference_stages()
        caches = [KVCache() for _ in range(len(blocks))] if self.adapter.task == "causal_lm" else None
        out = []
        for k, (first, _) in enumerate(steps):
            ctx = self.adapter.inference_context(first, _meta(step_inputs(k)))
            out.append(self._run(blocks, stages, ctx, caches))
        return out

    @staticmethod
    def _run(blocks, stages, ctx, caches) -> list[TensorSpec]:
        specs, h = [], None
        for b in range(len(blocks)):
            ctx["cache"] = caches[b] if caches is not None else None
            for s in blocks.stages(b):
                h = stages[s].module(h, ctx)
            specs.append(spec_of(h))
        return specs
