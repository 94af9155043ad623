"""Batched generation (SPEC.md 8.5.1): concurrent requests grouped into batches and generated
together by the engine, each row's trace exactly what generating it alone would record, plus
the batch shape and row it was computed in. `InferenceEngine.generate` uses it when batching is
on; nothing here is called directly.

    engine = InferenceEngine(served, "records", key, batching=BatchingSettings(max_batch_size=8))
    threads calling engine.generate(...) at once  ->  one batch, one record per request
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import InputError
from ..models.cache import KVCache
from .batching import BatchingSettings, BatchShape, batch_context, left_pad, row_slots, run_block_batched
from .policy import GenerationPolicy
from .portable import PortableLog, near_tie, round_and_log, tau_for
from .sampling import choose_token


@dataclass
class Trace:
    """What one request computed: the step layout, tokens and boundary outputs of each step."""

    steps: list[tuple[int, int]] = field(default_factory=list)  # (first position, number of positions)
    tokens: list[int] = field(default_factory=list)
    boundaries: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # boundary -> per-step outputs
    label: int | None = None
    portable: PortableLog | None = None  # portable numerics: the near-boundary and near-tie logs
    batch: BatchShape | None = None  # batched serving: the batch shape and row (None: computed alone)


@dataclass
class Request:
    """One generation waiting for, or computed in, a batch."""

    inputs: dict[str, torch.Tensor]
    policy: GenerationPolicy
    seed: int | None
    on_token: Callable[[int, int], None] | None
    on_token_id: Callable[[int], None] | None
    trace: Trace | None = None
    error: BaseException | None = None
    finished: bool = False


class Batcher:
    """Groups concurrent generations into batches (static batching). The first request to find
    the model idle leads: it waits `window_ms` for others (or until the batch is full), takes the
    queue's first `max_batch_size` requests and computes them as one batch; requests that arrive
    meanwhile queue for the next batch, led by one of them."""

    def __init__(self, engine, settings: BatchingSettings):
        self.engine, self.settings = engine, settings
        self.cond = threading.Condition()
        self.queue: list[Request] = []
        self.busy = False

    def run(self, job: Request) -> Trace:
        with self.cond:
            self.queue.append(job)
            self.cond.notify_all()
        while True:
            with self.cond:
                while not job.finished and self.busy:
                    self.cond.wait()
                if job.finished:
                    break
                self.busy = True
                deadline = time.monotonic() + self.settings.window_ms / 1000
                while len(self.queue) < self.settings.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
                batch = self.queue[:self.settings.max_batch_size]
                del self.queue[:len(batch)]
            try:
                run_batch(self.engine, batch)
            finally:
                with self.cond:
                    for j in batch:
                        j.finished = True
                    self.busy = False
                    self.cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.trace


def run_batch(engine, batch: list[Request]) -> None:
    """Compute the requests of one batch: one alone as ever (no batch shape), several together.
    An error of one row fails that row; an error of the computation fails every row."""
    with engine._lock:
        if len(batch) == 1:
            job = batch[0]
            try:
                job.trace = engine._generate(job.inputs, job.policy, job.seed, job.on_token, job.on_token_id)
            except BaseException as exc:  # handed to the request's own thread, which raises it
                job.error = exc
            return
        try:
            generate_batch(engine, batch)
        except BaseException as exc:  # the batch's computation failed: every request sees it
            for job in batch:
                if job.error is None:
                    job.error = exc

@torch.inference_mode()
def generate_batch(engine, jobs: list[Request]) -> None:
    """Generate several requests as one batch (SPEC.md 8.5.1): prompts left-padded to the
    longest, one KV cache per layer block holding every row, every row run until all are done.
    Each row's trace holds exactly what `_generate` would record for it (its real slots), and
    the batch shape and row it was computed in."""
    served, blocks, algorithm = engine.served, engine.blocks, engine.served.algorithm
    nb, size = len(blocks), len(jobs)
    lengths = [int(j.inputs["input_ids"].shape[1]) for j in jobs]
    length = max(lengths)
    ids = left_pad([j.inputs["input_ids"] for j in jobs], length)
    caches = [KVCache() for _ in range(nb)]
    traces = [Trace(boundaries={b: [] for b in range(1, nb)}, batch=BatchShape(size, i, length))
              for i in range(size)]
    devs = [engine.deviation.for_row(i) if engine.deviation is not None else None for i in range(size)]
    tau, tau_logit = tau_for(engine.settings.layers_per_block)
    portable = [j.policy.numerics == "portable" for j in jobs]
    logs = [{b: [] for b in range(1, nb)} for _ in jobs]
    offsets = [dict.fromkeys(range(1, nb), 0) for _ in jobs]
    ties: list[list[int]] = [[] for _ in jobs]
    active = [True] * size
    firsts = [0] * size
    watches = [engine._stop_watch(j.policy) for j in jobs]
    for step in range(max(j.policy.max_new_tokens for j in jobs)):
        ctx = batch_context(served, step, ids, lengths, length)
        h = None
        for b in range(nb):
            if b > 0:
                for i in range(size):
                    if not active[i]:
                        continue
                    q = lengths[i] if step == 0 else 1
                    x = row_slots(h, i, q).clone()
                    if devs[i] is not None:
                        x = devs[i].boundary(step, b, x)
                    if portable[i]:
                        grid, entries = round_and_log(x, tau, offsets[i][b])
                        offsets[i][b] += x.numel()
                        if devs[i] is not None:
                            grid, entries = devs[i].grid(step, b, grid, entries)
                        logs[i][b].extend(entries)
                        traces[i].boundaries[b].append(grid)
                        x = grid.to(h.dtype)
                    else:
                        traces[i].boundaries[b].append(x)
                    h[i:i + 1, h.shape[1] - q:] = x  # fed on: what the row's record commits
            h = run_block_batched(served, blocks, b, h, ctx, caches[b])
        chosen = []
        for i, job in enumerate(jobs):
            if not active[i]:
                chosen.append(0)  # a finished row runs on as padding until the batch ends
                continue
            trace, q = traces[i], (lengths[i] if step == 0 else 1)
            try:
                token = choose_token(h[i], job.policy, job.seed, algorithm, step)
            except InputError as exc:  # this row's logits were not finite: that request fails alone
                job.error, active[i] = exc, False
                chosen.append(0)
                continue
            if portable[i] and near_tie(h[i], token, job.policy, job.seed, algorithm, step, tau_logit):
                ties[i].append(step)
            if devs[i] is not None:
                token = devs[i].token(step, h[i], token)
            trace.steps.append((firsts[i], q))
            trace.tokens.append(token)
            firsts[i] += q
            if job.on_token:
                job.on_token(step + 1, job.policy.max_new_tokens)
            if job.on_token_id:
                job.on_token_id(token)
            if (job.policy.stops_at(token) or engine._stop_string(devs[i], watches[i], step, token)
                    or (devs[i] is not None and devs[i].stop(step, token))
                    or len(trace.tokens) == job.policy.max_new_tokens):
                active[i] = False
            chosen.append(token)
        if not any(active):
            break
        ids = torch.tensor(chosen, dtype=torch.int64)[:, None]
    for i, job in enumerate(jobs):
        if portable[i]:
            steps = devs[i].ties(ties[i]) if devs[i] is not None else ties[i]
            traces[i].portable = PortableLog({b: sorted(v) for b, v in logs[i].items()}, tuple(steps))
        if job.error is None:
            job.trace = traces[i]
