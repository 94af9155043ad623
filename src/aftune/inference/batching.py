"""Batched serving (SPEC.md 8.5.1): the shape of the batch a request was computed in, the batched
step context, and one layer block run over a batch.

    shape = BatchShape(size=4, row=1, length=12)    # committed in the record's `batch` member
    ctx = batch_context(served, step, ids, prompt_lengths, shape.length)
    out = run_block_batched(served, blocks, b, hidden, ctx, cache)     # [B, q, H], or logits [B, V]

The provider runs B requests as one batch: prompts left-padded to `length` slots, each row with
its own positions and attention mask, one KV cache per layer block holding every row. A row's
results depend on the batch's shape and its position in it (kernels choose their blocking by the
number of rows), never on the other rows' values (no operation reduces across rows, and padding
slots are masked to an exact zero weight). So a verifier replays one row in a batch of the same
shape whose other rows are filler (token 0, zero activations) and gets the provider's bits
(measured: `benchmarks/batch_invariance.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, RecordError

MAX_BATCH_SIZE = 64  # rows a batch may have (SPEC.md 8.4 `batch`)
MAX_WINDOW_MS = 10000.0


@dataclass(frozen=True)
class BatchingSettings:
    """How a server groups concurrent requests into batches (`aftune serve --max-batch-size`)."""

    max_batch_size: int = 8  # rows of one batch at most; 1: every request computed alone (serialised)
    window_ms: float = 2.0  # how long the first request of a batch waits for others to join it

    def validate(self) -> "BatchingSettings":
        problems = []
        n = self.max_batch_size
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_BATCH_SIZE:
            problems.append(f"--max-batch-size must be an integer in [1, {MAX_BATCH_SIZE}], got {n!r}")
        w = self.window_ms
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w <= MAX_WINDOW_MS:
            problems.append(f"--batch-window-ms must be a number in [0, {MAX_WINDOW_MS:g}], got {w!r}")
        if problems:
            raise InputError("; ".join(problems))
        return self


@dataclass(frozen=True)
class BatchShape:
    """Where a request sat in the batch it was computed in."""

    size: int  # B: rows in the batch (>= 2; a request computed alone has no BatchShape)
    row: int  # this request's row, 0 .. size-1
    length: int  # prompt slots every row was left-padded to (>= the request's prompt length)

    def to_json(self) -> dict[str, int]:
        return {"size": self.size, "row": self.row, "length": self.length}

    @classmethod
    def from_json(cls, obj: Any, prompt_length: int | None = None) -> "BatchShape | None":
        """The record's `batch` member (null: computed alone); a malformed one is a RecordError."""
        if obj is None:
            return None
        ok = isinstance(obj, dict) and set(obj) == {"size", "row", "length"} and all(
            isinstance(obj[k], int) and not isinstance(obj[k], bool) for k in obj)
        if not ok or not 2 <= obj["size"] <= MAX_BATCH_SIZE or not 0 <= obj["row"] < obj["size"] or obj["length"] < 1:
            raise RecordError(f"record: batch must be null or {{size in [2, {MAX_BATCH_SIZE}], row in [0, size), "
                              f"length >= 1}}, got {str(obj)[:80]}")
        if prompt_length is not None and obj["length"] < prompt_length:
            raise RecordError(f"record: batch.length {obj['length']} is shorter than the prompt ({prompt_length} tokens)")
        return cls(obj["size"], obj["row"], obj["length"])


def batch_context(served, step: int, ids: torch.Tensor, prompt_lengths: list[int], length: int) -> dict[str, Any]:
    """The context of step `step` of a batch (the adapter's `batch_context`)."""
    return served.adapter.batch_context(step, ids, prompt_lengths, length)


def run_block_batched(served, blocks, block: int, hidden: torch.Tensor | None, ctx: dict[str, Any],
                      cache) -> torch.Tensor:
    """Layer block `block` over the whole batch; the head gives every row's next-token logits [B, V]."""
    ctx["cache"] = cache
    h = hidden
    for s in blocks.stages(block):
        module = served.stages[s].module
        h = module.every_row(h) if served.stage_names[s] == "head" else module(h, ctx)
    return h


def supports_batching(served) -> bool:
    """Whether `served` can be served in batches (layer-stack causal LMs without sliding windows)."""
    adapter = served.adapter
    return served.task == "causal_lm" and hasattr(adapter, "batch_context") and all(
        w is None for w in getattr(adapter, "windows", [None]))


# --- the batch a row sits in ------------------------------------------------------------------------

def left_pad(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """[B, length] input ids: row i's ids ([1, P_i] or [P_i]) in its last P_i slots, token 0 before."""
    ids = torch.zeros(len(rows), length, dtype=torch.int64)
    for i, r in enumerate(rows):
        r = r.reshape(-1)
        ids[i, length - r.numel():] = r
    return ids


def row_slots(hidden: torch.Tensor, row: int, q: int) -> torch.Tensor:
    """Row `row`'s last `q` slots of a batched step tensor, [1, q, ...] (its real positions)."""
    return hidden[row:row + 1, hidden.shape[1] - q:]


def filler_batch(shape: BatchShape, step: int, row_ids: torch.Tensor, row_hidden: torch.Tensor | None,
                 prompt_length: int) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """The verifier's batch for one step of the row: the row's ids (and, past block 0, its
    committed hidden states) in its row and last slots; every other slot and row filler (token 0,
    zero activations, rows of full length). Returns (ids [B, q], hidden [B, q, H] or None, prompt
    lengths)."""
    q = shape.length if step == 0 else 1
    ids = torch.zeros(shape.size, q, dtype=torch.int64)
    n = row_ids.shape[-1]
    ids[shape.row, q - n:] = row_ids.reshape(-1)
    hidden = None
    if row_hidden is not None:
        hidden = torch.zeros((shape.size, q) + tuple(row_hidden.shape[2:]), dtype=row_hidden.dtype)
        hidden[shape.row, q - row_hidden.shape[1]:] = row_hidden[0]
    lengths = [shape.length] * shape.size
    lengths[shape.row] = prompt_length
    return ids, hidden, lengths
