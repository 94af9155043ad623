"""What a run will cost before it starts, from the agreement alone (SPEC.md 6.10):
`aftune estimate AGREEMENT`, and the line `aftune agree` prints.

    aftune estimate agreement.json

The architecture is built on PyTorch's meta device (shapes only, no weights), split into layer
blocks as the run will be, and every tensor the record stores is counted: the full state at each
stored checkpoint (weights, buffers, optimizer state), per step the losses and gradient norms
(and, with stored boundaries, the boundary activations and gradients at the full `seq_len`: an
upper bound, as batches are padded to their longest example), the manifests' rows (zstd-compressed
in v3 manifests, about 40 bytes each) and the transcript. The cost of opening one challenged block
is the most training steps the provider re-runs for it: a re-run starts at the nearest stored checkpoint (SPEC.md 3.8), so with digest-only
boundaries it is `checkpoint_interval x steps_per_block` steps of the whole model.

Checkpoint spacing from what the client accepts (`aftune agree --max-recompute-steps N` or
`--storage-budget BYTES`): `spacing_for` turns either into the checkpoint interval the agreement
then states.
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass, replace

from ..core.encoding import DTYPE_BY_NAME
from ..errors import InputError
from .manifest import common_key
from .optim import STATE_NAMES
from .settings import TrainSettings

OBJECT_OVERHEAD = 110 + 48  # bytes an object adds to its tensor: safetensors header, zstd frame, pack index entry (3.2)
PACK_OVERHEAD = 24  # a pack's header and its index's (3.2)
MANIFEST_ROW = 40  # bytes a row takes in a v3 manifest (zstd): its digest's 64 hex digits, about 34 (measured)
MANIFEST_OVERHEAD = 120  # a manifest's fields and frame
TRANSCRIPT_LINE = 420  # a signed step-block line (3.4.3)


@dataclass(frozen=True)
class Estimate:
    settings: TrainSettings
    layer_blocks: int
    parameters: int  # of the model as trained (LoRA: base and adapters)
    model_bytes: int  # the exported model's weights (RUN/model)
    state_bytes: int  # one full stored state: weights, buffers, optimizer state
    checkpoints: int  # full states stored
    checkpoint_bytes: int  # all of them (step block 0's zero optimizer state compresses to nearly nothing)
    step_bytes: int  # objects stored per step beyond checkpoints
    manifest_bytes: int  # all manifests
    transcript_bytes: int

    @property
    def record_bytes(self) -> int:
        """objects/, manifests/ and transcript.jsonl: what recording adds to the run."""
        return (self.checkpoint_bytes + self.settings.steps * self.step_bytes + self.manifest_bytes
                + self.transcript_bytes)

    @property
    def per_step_bytes(self) -> int:
        """Stored per step beyond checkpoints: objects and the manifests' share."""
        return self.step_bytes + (self.manifest_bytes + self.transcript_bytes) // max(1, self.settings.steps)

    @property
    def open_steps(self) -> int:
        """The most training steps (whole model) the provider re-runs to open one block."""
        s = self.settings
        if not s.digest_boundaries:
            return (s.checkpoint_interval - 1) * s.steps_per_block  # prepare replays the start state
        return min(s.steps, s.checkpoint_interval * s.steps_per_block)

    def line(self) -> str:
        s = self.settings
        if s.digest_boundaries:
            opening = (f"opening one block re-runs at most {self.open_steps} of {s.steps} training steps of the "
                       "whole model, then replays the block")
        elif self.open_steps:
            opening = f"opening one block replays it after at most {self.open_steps} steps of its layer block"
        else:
            opening = "opening one block replays it"
        return (f"estimate: record {_size(self.record_bytes)} ({self.checkpoints} checkpoint"
                f"{'s' if self.checkpoints != 1 else ''} of {_size(self.state_bytes)}, {_size(self.per_step_bytes)} "
                f"per step), exported model {_size(self.model_bytes)}; boundaries {s.boundaries}, checkpoint "
                f"interval {s.checkpoint_interval}; {opening}")

    def to_json(self) -> dict:
        return {"record_bytes": self.record_bytes, "model_bytes": self.model_bytes, "state_bytes": self.state_bytes,
                "checkpoints": self.checkpoints, "per_step_bytes": self.per_step_bytes, "open_steps": self.open_steps,
                "parameters": self.parameters, "layer_blocks": self.layer_blocks,
                "checkpoint_interval": self.settings.checkpoint_interval, "boundaries": self.settings.boundaries}


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _row(key: str, name: str, shape) -> int:
    """A row's bytes in a v3 manifest: the rest of a row (key, name, dtype, shape) mostly repeats
    its neighbours', which zstd stores in a few bytes."""
    return MANIFEST_ROW


class _Layout:
    """The run's layer blocks and state tensors, on the meta device."""

    def __init__(self, hf_config: dict, settings: TrainSettings):
        from ..models import build_model
        from .engine import BlockedModel
        from .instantiate import instantiate, is_lora_tensor

        model = build_model(hf_config, settings.attn_implementation, DTYPE_BY_NAME[settings.dtype], device="meta")
        _, model, adapter = instantiate(hf_config, settings, model)
        self.bm = BlockedModel(model, adapter, settings)
        self.portable = settings.numerics == "portable"
        self.state: list[list[tuple[str, str, tuple, int]]] = []  # per block: (key, name, shape, bytes)
        self.model_bytes = 0
        self.parameters = 0
        for b in range(len(self.bm.blocks)):
            rows = []
            for key, (name, t) in self.bm.state_tensors(b).items():
                size = 4 if self.portable and t.is_floating_point() else t.element_size()
                rows.append((key, name, tuple(t.shape), t.numel() * size))
                if key.startswith("state/") and not is_lora_tensor(name):
                    self.model_bytes += t.numel() * DTYPE_BY_NAME[settings.dtype].itemsize \
                        if t.is_floating_point() else t.numel() * t.element_size()
                if key.startswith("state/") and name in dict(self.bm.layout[b].params):
                    self.parameters += t.numel()
            self.state.append(rows)

    def boundary_shapes(self, hf_config: dict, settings: TrainSettings, spec) -> list[tuple]:
        """The output shape of each layer block but the last for a full-length micro-batch."""
        import torch

        from ..models.shapes import shape_oracle

        oracle = shape_oracle(hf_config, settings.attn_implementation, DTYPE_BY_NAME[settings.dtype])
        batch = {}
        for f in spec.fields:
            if f == "pixel_values":
                side = spec.image_size
                batch[f] = torch.zeros((settings.batch_size, 3, side, side))
            elif f == "labels" and self.bm.adapter.task != "causal_lm":  # one class per example
                batch[f] = torch.zeros((settings.batch_size,), dtype=torch.int64)
            else:
                batch[f] = torch.zeros((settings.batch_size, settings.seq_len), dtype=torch.int64)
        outs = oracle.training_outputs(self.bm.blocks, batch)
        return [tuple(o.shape) for o in outs[:-1]]


def estimate(agreement) -> Estimate:
    """The record an honest run under `agreement` stores, and the cost of opening one block."""
    return estimate_for(agreement.base_config, agreement.settings, agreement.batch_spec())


def estimate_for(hf_config: dict, settings: TrainSettings, spec, layout: _Layout | None = None) -> Estimate:
    layout = layout or _Layout(hf_config, settings)
    nb, S, A = len(layout.bm.blocks), settings.num_step_blocks, settings.grad_accum
    state_bytes = sum(n + OBJECT_OVERHEAD for rows in layout.state for *_, n in rows)
    # step block 0's optimizer state is all zeros, which zstd stores in next to nothing
    base_bytes = sum((n if k.startswith("state/") else n // 1000) + OBJECT_OVERHEAD
                     for rows in layout.state for k, _, _, n in rows)
    checkpoints = sum(settings.stores_state(s) for s in range(1, S + 1))
    stored_bytes = checkpoints * state_bytes + (base_bytes if settings.stores_state(0) else 0)
    checkpoints += settings.stores_state(0)
    state_rows = sum(_row(k, name, shape) for rows in layout.state for k, name, shape, _ in rows)
    # per step: losses, gradient norms (stored), batch fields and boundaries (rows; boundaries stored
    # unless digest-only)
    trainable = [len(layout.bm.layout[b].trainable) for b in range(nb)]
    step_bytes = A * (4 + OBJECT_OVERHEAD) + sum(4 * n + OBJECT_OVERHEAD for n in trainable)
    step_rows = A * _row(common_key(0, 0, "loss"), "loss", ()) + sum(
        _row(common_key(0, None, "grad_norms", f"{b:04d}"), "grad_norms", (n,)) for b, n in enumerate(trainable))
    step_rows += A * sum(_row(common_key(0, 0, "batch", f), f, (settings.batch_size, settings.seq_len))
                         for f in spec.fields)
    if nb > 1:
        shapes = layout.boundary_shapes(hf_config, settings, spec)
        itemsize = 4 if layout.portable else DTYPE_BY_NAME[settings.dtype].itemsize
        for b, shape in enumerate(shapes, start=1):
            for kind in ("activation", "gradient"):
                step_rows += A * _row(common_key(0, 0, "boundary", f"{b:04d}", kind), kind, shape)
                if not settings.digest_boundaries:
                    n = 1
                    for d in shape:
                        n *= d
                    step_bytes += A * (n * itemsize + OBJECT_OVERHEAD)
    manifest_bytes = (S + 1) * (state_rows + MANIFEST_OVERHEAD) + settings.steps * step_rows
    step_bytes += PACK_OVERHEAD // max(1, settings.steps_per_block)  # a pack per step block
    return Estimate(settings, nb, layout.parameters, layout.model_bytes, state_bytes, checkpoints, stored_bytes, step_bytes,
                    manifest_bytes, (S + 2) * TRANSCRIPT_LINE)


def spacing_for(hf_config: dict, settings: TrainSettings, spec, max_recompute_steps: int | None = None,
                storage_budget: int | None = None) -> TrainSettings:
    """The settings with the checkpoint interval the client accepts (SPEC.md 6.10). With
    `max_recompute_steps`: the largest interval whose re-run to open one block is at most that
    many training steps (the least storage within that cost); with `storage_budget` alone: the
    smallest interval whose estimated record fits (the cheapest openings within that storage);
    with both, the first that meets both. One that cannot be met is an InputError saying why."""
    if max_recompute_steps is None and storage_budget is None:
        return settings
    B, S = settings.steps_per_block, settings.num_step_blocks
    lo, hi = 1, S
    if max_recompute_steps is not None:
        if max_recompute_steps < B:
            raise InputError(f"--max-recompute-steps {max_recompute_steps} is less than one step block "
                             f"({B} steps): opening a block re-runs at least its step block")
        hi = max(1, min(S, max_recompute_steps // B))
    if storage_budget is not None:
        layout = _Layout(hf_config, settings)
        size = lambda i: estimate_for(hf_config, replace(settings, checkpoint_interval=i), spec, layout).record_bytes  # noqa: E731
        fits = [i for i in range(1, S + 1) if size(i) <= storage_budget]
        if not fits:
            raise InputError(f"--storage-budget {storage_budget} bytes is less than the smallest record these "
                             f"settings give ({_size(size(S))}, with the fewest checkpoints)")
        lo = fits[0]
        if lo > hi:
            raise InputError(f"no checkpoint spacing meets both: a record within {storage_budget} bytes needs "
                             f"checkpoints at least {lo * B} steps apart, more than --max-recompute-steps "
                             f"{max_recompute_steps}")
    return replace(settings, checkpoint_interval=hi if max_recompute_steps is not None else lo)


def spacing_for_model(model_dir, settings: TrainSettings, max_recompute_steps: int | None = None,
                      storage_budget: int | None = None, *, interval_given: bool = False) -> TrainSettings:
    """`spacing_for` on a base model directory's canonical config (what `aftune agree` and
    `aftune.agree` both call). `interval_given`: the caller also set the checkpoint interval,
    which these options set: refused."""
    if max_recompute_steps is None and storage_budget is None:
        return settings
    if interval_given:
        raise InputError("--max-recompute-steps and --storage-budget set the checkpoint interval: drop "
                         "--checkpoint-interval")
    from ..core import jsonio
    from .agreement import batch_spec, canonical_config

    doc = jsonio.read_json(Path(model_dir) / "config.json", 1 << 20, "model config", InputError)
    if not isinstance(doc, dict):
        raise InputError(f"{model_dir}/config.json is not a JSON object")
    config = canonical_config(doc)
    return spacing_for(config, settings, batch_spec(config, settings), max_recompute_steps, storage_budget)
