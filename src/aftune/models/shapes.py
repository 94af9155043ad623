"""Expected shapes of the tensors that cross layer-block boundaries, from the architecture alone.

A verifier feeds committed boundary tensors into its replay. Before it does, it checks their
shapes and dtypes against what the agreed computation produces, computed here by running the
stages on PyTorch's meta device (shapes only: no arithmetic, no memory for weights). A committed
tensor of another shape is then a finding against the provider, and an error the replay still
raises is aftune's own (exit 3), never a verdict.

    oracle = shape_oracle(hf_config, "sdpa", torch.float32)   # one per architecture and process
    oracle.training_outputs(blocks, batch)        # [TensorSpec of block 0's output, block 1's, ...]
    oracle.sequence_outputs(blocks, inputs)       # the same for one inference pass over a sequence
"""

from __future__ import annotations

import json
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
    """The architecture on the meta device, in the dtype the record was computed in.

    Text batches differ from step to step (and records from record) only in their length T
    (every tensor [B, T]), and a meta pass costs about a millisecond per operator whatever the
    sizes. So after two passes at two lengths with the same B and layer blocks, the specs of a
    further length are derived by putting T in dimension 1 where the two passes had their
    lengths, provided each of the two passes is predicted from the other by that rule and a
    third pass, at a length well beyond both (4 max + 3), is predicted too: a dimension padded
    to, capped at or pooled by some size agrees at two short lengths but not there (else every
    length gets its own pass)."""

    MAX_CACHED = 4096

    def __init__(self, hf_config: dict[str, Any], attn_implementation: str, dtype: torch.dtype):
        model = build_model(hf_config, attn_implementation, dtype, device="meta")
        self.adapter = adapter_class(hf_config["model_type"])(model)
        self._cache: dict[Any, list[TensorSpec]] = {}
        self._lengths: dict[Any, dict[int, list[TensorSpec]]] = {}  # length family -> {T: specs}, passes run
        self._rule: dict[Any, bool] = {}  # length family -> whether specs follow T in dimension 1

    @torch.no_grad()
    def training_outputs(self, blocks, batch: dict[str, torch.Tensor]) -> list[TensorSpec]:
        """The output spec of every layer block for a micro-batch shaped like `batch`."""
        def run(b):
            self.adapter.model.train()
            return self._run(blocks, self.adapter.stages, self.adapter.context(_meta(b)), None)
        return self._specs("train", blocks, batch, run)

    @torch.no_grad()
    def sequence_outputs(self, blocks, batch: dict[str, torch.Tensor]) -> list[TensorSpec]:
        """The output spec of every layer block for one inference pass over the whole of `batch`
        (a prefill from position 0: a causal LM's steps joined along the positions)."""
        def run(b):
            self.adapter.model.eval()
            caches = [KVCache() for _ in range(len(blocks))] if self.adapter.task == "causal_lm" else None
            ctx = self.adapter.inference_context(0, _meta(b))
            return self._run(blocks, self.adapter.inference_stages(), ctx, caches)
        return self._specs("sequence", blocks, batch, run)

    def _specs(self, kind: str, blocks, batch: dict[str, torch.Tensor], run) -> list[TensorSpec]:
        layout = (kind, tuple(tuple(r) for r in blocks.ranges))
        key = (layout, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items())))
        if key in self._cache:
            return self._cache[key]
        length = _length_family(batch)
        family = (layout, length[0]) if length is not None else None
        specs = None
        if family is not None and self._rule.get(family):
            t0, known = next(iter(self._lengths[family].items()))
            specs = _with_length(known, t0, length[1])
        if specs is None:
            specs = run(batch)
            if family is not None:
                seen = self._lengths.setdefault(family, {})
                seen[length[1]] = specs
                if len(seen) == 2 and family not in self._rule:  # does the rule predict one pass from the other?
                    (t0, a), (t1, b) = seen.items()
                    agree = _with_length(a, t0, t1) == b and _with_length(b, t1, t0) == a
                    if agree:  # and a pass far from both: a size that is padded, capped or pooled shows there
                        tp = 4 * max(t0, t1) + 3
                        probe = {k: torch.empty((v.shape[0], tp), dtype=v.dtype) for k, v in batch.items()}
                        agree = _with_length(a, t0, tp) == run(probe)
                    self._rule[family] = agree
        if len(self._cache) >= self.MAX_CACHED:
            self._cache.clear()
        self._cache[key] = specs
        return specs

    @staticmethod
    def _run(blocks, stages, ctx, caches) -> list[TensorSpec]:
        specs, h = [], None
        for b in range(len(blocks)):
            ctx["cache"] = caches[b] if caches is not None else None
            for s in blocks.stages(b):
                h = stages[s].module(h, ctx)
            specs.append(spec_of(h))
        return specs


_ORACLES: dict[Any, ShapeOracle] = {}
_ORACLES_KEPT = 4


def shape_oracle(hf_config: dict[str, Any], attn_implementation: str, dtype: torch.dtype) -> ShapeOracle:
    """A ShapeOracle shared by the verifiers of one process for the same architecture (its
    results depend on nothing else), so that what it learnt carries from record to record."""
    key = (json.dumps(hf_config, sort_keys=True, default=str), attn_implementation, str(dtype))
    oracle = _ORACLES.get(key)
    if oracle is None:
        oracle = ShapeOracle(hf_config, attn_implementation, dtype)
        if len(_ORACLES) >= _ORACLES_KEPT:
            _ORACLES.pop(next(iter(_ORACLES)))
        _ORACLES[key] = oracle
    return oracle
