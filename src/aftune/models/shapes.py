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


def _length_family(batch: dict[str, torch.Tensor]) -> tuple[Any, int] | None:
    """(what the batch is apart from its length, its length T) when every tensor is [B, T]."""
    shapes = {tuple(v.shape) for v in batch.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        return None
    b, t = next(iter(shapes))
    return (b, tuple((k, v.dtype) for k, v in sorted(batch.items()))), t


def _with_length(specs: list[TensorSpec], t_from: int, t_to: int) -> list[TensorSpec]:
    return [TensorSpec(s.shape[:1] + (t_to,) + s.shape[2:], s.dtype) if len(s.shape) >= 2 and s.shape[1] == t_from
            else s for s in specs]


class ShapeOracle:
    """The architecture on the meta device, in the dtype the record was computed in."""

    def __init__(self, hf_config: dict[str, Any], attn_implementation: str, dtype: torch.dtype):
        model = build_model(hf_config, attn_implementation, dtype, device="meta")
        self.adapter = adapter_class(hf_config["model_type"])(model)
        self._cache: dict[Any, list[TensorSpec]] = {}
        self._lengths: dict[Any, dict[int, list[TensorSpec]]] = {}  # length family -> {T: specs}, passes run
        self._rule: dict[Any, bool] = {}  # length family -> whether specs follow T in dimension 1

    @torch.no_grad()
    def training_outputs(self, blocks, batch: dict[str, torch.Tensor]) -> list[TensorSpec]:
        """The output spec of every layer block for a micro-batch shaped like `batch`.

        Text batches differ from step to step only in their length T (every tensor [B, T]), and
        a meta pass costs about a millisecond per operator whatever the sizes. So after two passes
        at two lengths with the same B, the specs of a third length are derived by putting T in
        dimension 1 where the two passes had their lengths, provided the two passes agree with
        that rule (else every length gets its own pass)."""
        key = ("train", tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items())))
        if key not in self._cache:
            self._cache[key] = self._derived(batch) or self._training_pass(blocks, batch)
        return self._cache[key]

    def _training_pass(self, blocks, batch) -> list[TensorSpec]:
        self.adapter.model.train()
        specs = self._run(blocks, self.adapter.stages, self.adapter.context(_meta(batch)), None)
        family = _length_family(batch)
        if family is not None:
            seen = self._lengths.setdefault(family[0], {})
            seen[family[1]] = specs
            if len(seen) == 2 and family[0] not in self._rule:  # does the rule predict one pass from the other?
                (t0, a), (t1, b) = seen.items()
                self._rule[family[0]] = _with_length(a, t0, t1) == b and _with_length(b, t1, t0) == a
        return specs

    def _derived(self, batch) -> list[TensorSpec] | None:
        family = _length_family(batch)
        if family is None or not self._rule.get(family[0]):
            return None
        t0, specs = next(iter(self._lengths[family[0]].items()))
        return _with_length(specs, t0, family[1])

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
