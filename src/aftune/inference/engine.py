"""Auditable inference, the provider's side: generation recorded layer block by layer block
(`aftune infer`, `aftune serve`).

    aftune infer --model runs/demo --prompt "Q: what is 2+2?" --record-dir records
    aftune infer --model runs/bert --text "great fine okay" --record-dir records
    aftune infer --model runs/vit --image cat.png --record-dir records

The provider runs the model as layer blocks (`LayerBlocks`: block 0 holds the embedding, the last
block the head). A causal LM generates with a KV cache: step 0 (prefill) runs the prompt, step
k >= 1 runs the token chosen at step k-1. Each layer block keeps its own cache, so block l's work
at step k depends only on the inputs block l received at steps 0..k, all of them committed. For
every step and every block boundary the record commits the digest of the hidden states of the
step's new positions, folded into one Merkle root per boundary, and the digest of the
concatenation over steps; the concatenation is stored in full every `activation_interval` (I_A)
boundaries, or never (I_A = 0: the provider regenerates it when challenged, `regenerate.py`).
A verifier replays one layer block alone by feeding it the committed inputs step by step with
its own cache: the very same sequence of calls, so strict mode compares digests bitwise; in
tolerance mode it replays the block over the whole sequence at once (SPEC.md 8).

The last block recomputes the logits of every step from the hidden state; the record commits
every generated token, the client's generation policy (and its digest), the client's request
nonce and the seed. The seed of a sampled request is derived from the nonce, the input and the
policy (`sampling.request_seed`), and sampling draws its uniform from a hash of the seed and the
step, so every token can be re-derived and no seed is the provider's choice. Classifiers (BERT,
ViT, DINOv2, ResNet) run one forward pass and commit the label.

Concurrent generations are computed as one batch (`batched.py`, SPEC.md 8.5.1) when the model
allows it: each record states its batch shape and row, and a verifier replays that row among
filler rows. A policy's stop strings end generation at the first decoded text holding one
(`stops.py`); the record commits where the answer is cut (`output.stop_offset`).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.encoding import canonical_json
from ..core.rows import TensorRef, rows_to_json
from ..errors import InputError
from ..models.cache import KVCache
from .batched import Batcher, Request, Trace as _Trace
from .batching import BatchingSettings, supports_batching
from .policy import GenerationPolicy, check_request_nonce
from .portable import PortableLog, near_tie, round_and_log, tau_for
from .compact import boundaries_root, write_boundaries
from .record import (RECORD_FORMAT, RecordDir, boundary_key, boundary_label, digests_root, input_key, record_id,
                     served_file, steps_root, utc_now)
from .receipt import issue_receipt
from .sampling import choose_token, greedy_token, request_seed
from .stops import StopStrings, stop_offset
from .served import ModelSource, ServedModel
from .settings import RecordingSettings


def load_served(model: str | Path, policy: GenerationPolicy | None = None, *, dtype: str | None = None,
                hash_algorithm: str | None = None) -> ServedModel:
    """The model (or run) directory loaded for serving under the client's `policy`: in `dtype`
    when given, else in the serving dtype the policy pins (a v2 policy), else in the run's dtype
    or float32. An explicit `dtype` that the policy contradicts is an error naming both (the
    engine would refuse every request); so is a pinned dtype a run was not trained in (its final
    model digest is over its own dtype). Numerics need nothing here: `generate` records portable
    numerics when the policy says so."""
    pinned = policy.dtype if isinstance(policy, GenerationPolicy) else None
    if dtype is not None and pinned is not None and dtype != pinned:
        raise InputError(f"--dtype {dtype} contradicts the generation policy, which pins the serving dtype {pinned}: "
                         f"drop --dtype to serve in {pinned}, or agree a {dtype} policy with the client")
    if dtype is None and pinned is not None:
        src = ModelSource.resolve(model, hash_algorithm=hash_algorithm)
        if src.run_dir is not None and src.dtype != pinned:
            raise InputError(f"the generation policy pins the serving dtype {pinned}, and the run {src.run_dir} was "
                             f"trained in {src.dtype}: its final model digest is over its {src.dtype} weights, so a "
                             f"record could not be bound to it (agree a {src.dtype} policy with the client)")
    return ServedModel.load(model, dtype=dtype or pinned, hash_algorithm=hash_algorithm)


# --- deviations (attack simulations for tests; honest serving uses none) ------------------------

class ServingDeviation:
    """A provider that departs from the agreed inference, for the attack suite and the tests.
    The honest engine uses none; each hook returns its input unchanged by default."""

    def weights(self, model: nn.Module) -> None:
        """Change the served weights after the committed digest was taken (the claim stays)."""

    def inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return inputs

    def boundary(self, step: int, boundary: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def token(self, step: int, logits: torch.Tensor, token: int) -> int:
        """The token (or a classifier's label, at step 0) reported instead of the chosen one."""
        return token

    def seed(self, seed: int | None) -> int | None:
        """The sampling seed used and committed instead of the one derived from the client's nonce
        (a provider grinding seeds until the answer suits it)."""
        return seed

    def stop(self, step: int, token: int) -> bool:
        """Stop generating after this token although the policy says go on (a truncated answer)."""
        return False

    def stop_string(self, step: int, hit: bool) -> bool:
        """Whether to stop at a step where the decoded text does (`hit`) or does not contain a stop
        string: False where it does goes on past it (a late stop)."""
        return hit

    def grid(self, step: int, boundary: int, grid: torch.Tensor, entries: list[list[int]]
             ) -> tuple[torch.Tensor, list[list[int]]]:
        """Portable numerics: the grid values committed (and fed on) instead of the rounding, and
        the near-boundary log entries `[flat index, bits]` listed for this step."""
        return grid, entries

    def ties(self, steps: list[int]) -> list[int]:
        """Portable numerics: the near-tie steps listed instead of the honest ones."""
        return steps

    def for_row(self, row: int) -> "ServingDeviation | None":
        """Batched serving: the deviation applied to the request in row `row` (None: that row honest)."""
        return self


# --- recording one request -------------------------------------------------------------------

@dataclass(frozen=True)
class InferenceResult:
    record_id: str  # hex: the record's id, its digest (SPEC.md 8.3)
    record_path: Path
    tokens: tuple[int, ...]
    text: str | None
    label: int | None
    label_name: str | None
    receipt: Any  # receipt.Receipt
    receipt_path: Path
    seconds: float
    prompt_tokens: int = 0  # a causal LM's prompt length in tokens (the OpenAI wire format's usage)
    stop_offset: int | None = None  # where the first stop string starts in `text` (the answer is text[:offset])


class InferenceEngine:
    """The provider's side: one loaded model, one record directory, one signing key.

    `generate` and `classify` are thread-safe. Concurrent generations are computed as one batch
    (`batching`: up to max_batch_size requests arriving within window_ms; each record states its
    batch shape and row, SPEC.md 8.5.1) when the model supports it, else serialised by a lock;
    hashing, storing and signing of each request's own record run outside it."""

    def __init__(self, served: ServedModel, record_dir: str | Path, key, settings: RecordingSettings = RecordingSettings(),
                 deviation: ServingDeviation | None = None, batching: BatchingSettings = BatchingSettings()):
        self.served, self.key = served, key
        self.settings = RecordingSettings(settings.layers_per_block, settings.activation_interval,
                                       served.algorithm).validate()
        self.blocks = served.blocks(self.settings.layers_per_block)
        self.records = RecordDir(record_dir, served.algorithm)
        self.deviation = deviation
        self._lock = threading.Lock()
        batching = batching.validate()
        self._batcher = (Batcher(self, batching) if batching.max_batch_size > 1 and supports_batching(served)
                         else None)
        if served.tokenizer_dir is not None:
            kept = self.records.keep_tokenizer(served.tokenizer_dir, served.tokenizer_digest)
            served.use_tokenizer(kept, served.tokenizer_digest)
        if deviation is not None:
            with torch.no_grad():
                deviation.weights(served.model)
        # no path: a verifier loads the client's own copy of the model, never one the record names
        model = {"config": served.hf_config, "digest": served.digest.hex(), "dtype": served.dtype,
                 "attn_implementation": served.attn_implementation,
                 "tokenizer": served.tokenizer_digest.hex() if served.tokenizer_digest else None,
                 "run": served.run.to_json() if served.run else None}
        layout = {"stages": served.stage_names, "layer_blocks": [list(r) for r in self.blocks.ranges],
                  "layers_per_block": self.settings.layers_per_block,
                  "activation_interval": self.settings.activation_interval}
        self.served_digest = self.records.keep_served(served_file(model, layout))

    # --- requests --------------------------------------------------------------------------
    def generate(self, prompt: str, policy: GenerationPolicy, *, request_nonce: bytes | None = None,
                 on_token: Callable[[int, int], None] | None = None,
                 on_token_id: Callable[[int], None] | None = None) -> InferenceResult:
        """Generate under the client's `policy`. A sampled request needs the client's
        `request_nonce` (16 to 64 bytes), from which its seed is derived; a greedy one commits
        the nonce when given. `on_token_id(token)` sees each token as it is chosen (streaming)."""
        if not isinstance(policy, GenerationPolicy):
            raise InputError("generation needs the client's generation policy (a GenerationPolicy)")
        if policy.dtype is not None and policy.dtype != self.served.dtype:
            raise InputError(f"the generation policy pins the serving dtype {policy.dtype}, and this model is served "
                             f"in {self.served.dtype}: load it in {policy.dtype} (--dtype {policy.dtype})")
        if request_nonce is not None:
            request_nonce = check_request_nonce(request_nonce)
        elif policy.sampling:
            raise InputError("sampling needs the client's request nonce (16 to 64 bytes): the seed is derived from "
                             "it, so that the provider cannot choose it")
        t0 = time.perf_counter()
        inputs = self.served.prompt_inputs(prompt, policy.chat_template)
        p = inputs["input_ids"].shape[1]
        if p + policy.max_new_tokens > self.served.max_positions:
            raise InputError(f"the prompt has {p} tokens; with max_new_tokens {policy.max_new_tokens} it exceeds the "
                             f"model's {self.served.max_positions} positions: shorten it or ask for fewer tokens")
        window = self.served.sliding_window()
        if window is not None and p + policy.max_new_tokens > window:
            raise InputError(f"prompt plus new tokens exceed the sliding window ({window}), which aftune does not replay")
        if self.deviation is not None:
            inputs = self.deviation.inputs(inputs)
        algorithm = self.served.algorithm
        input_digest = digests_root(algorithm, {input_key(n): TensorRef.of(n, t, algorithm) for n, t in inputs.items()},
                                    "input/")
        policy_digest = policy.digest(algorithm)
        seed = request_seed(algorithm, request_nonce, input_digest, policy_digest) if policy.sampling else None
        if self.deviation is not None:
            seed = self.deviation.seed(seed)
        if self._batcher is not None:
            trace = self._batcher.run(Request(inputs, policy, seed, on_token, on_token_id))
        else:
            with self._lock:
                trace = self._generate(inputs, policy, seed, on_token, on_token_id)
        text = self.served.tokenizer.decode(trace.tokens, skip_special_tokens=True)
        doc_input = {"kind": "prompt", "prompt": prompt}
        doc_output: dict[str, Any] = {"tokens": trace.tokens, "text": text}
        offset = stop_offset(text, policy.stop) if policy.stop else None
        if policy.stop:  # where the answer is cut: the first stop string in the text (SPEC.md 8.4)
            doc_output["stop_offset"] = offset
        outputs = {"output/tokens": ("tokens", torch.tensor(trace.tokens, dtype=torch.int64))}
        # the policy itself is kept once per policy, in its policy file (SPEC.md 8.4.1)
        if self.records.keep_policy(canonical_json(policy.to_json())) != policy_digest:
            raise AssertionError("the policy file's digest is not the policy digest")
        generation = {"policy_digest": policy_digest.hex(), "seed": seed}
        return self._finish(inputs, trace, doc_input, doc_output, outputs, generation, request_nonce, t0, text=text,
                            stop_offset=offset)

    def classify(self, *, text: str | None = None, image: str | Path | None = None,
                 request_nonce: bytes | None = None) -> InferenceResult:
        if request_nonce is not None:
            request_nonce = check_request_nonce(request_nonce)
        t0 = time.perf_counter()
        if (text is None) == (image is None):
            raise InputError("give exactly one input: --text for BERT, --image for vision models")
        if text is not None:
            inputs = self.served.text_inputs(text)
            doc_input: dict[str, Any] = {"kind": "text", "text": text}
        else:
            inputs, info = self.served.image_inputs(image)
            doc_input = {"kind": "image", "image": info}
        if self.deviation is not None:
            inputs = self.deviation.inputs(inputs)
        with self._lock:
            trace = self._forward(inputs)
        names = self.served.label_names
        label_name = names[trace.label] if names and trace.label < len(names) else None
        doc_output = {"label": trace.label, "label_name": label_name}
        outputs = {"output/label": ("label", torch.tensor([trace.label], dtype=torch.int64))}
        return self._finish(inputs, trace, doc_input, doc_output, outputs, None, request_nonce, t0,
                            label_name=label_name)

    # --- computation -----------------------------------------------------------------------
    @torch.inference_mode()
    def _generate(self, inputs, policy: GenerationPolicy, seed: int | None, on_token, on_token_id=None) -> _Trace:
        served, blocks, algorithm = self.served, self.blocks, self.served.algorithm
        nb = len(blocks)
        caches = [KVCache() for _ in range(nb)]
        trace = _Trace(boundaries={b: [] for b in range(1, nb)})
        # portable numerics (SPEC.md 8.13): every boundary rounded to the grid, fed on rounded, and
        # the elements near a rounding midpoint logged (flat indices into the boundary's steps)
        portable = policy.numerics == "portable"
        tau, tau_logit = tau_for(self.settings.layers_per_block)
        logs: dict[int, list[list[int]]] = {b: [] for b in range(1, nb)}
        offsets = dict.fromkeys(range(1, nb), 0)
        ties: list[int] = []
        watch = self._stop_watch(policy)
        step_inputs = {"input_ids": inputs["input_ids"]}
        first = 0
        for step in range(policy.max_new_tokens):
            q = step_inputs["input_ids"].shape[1]
            ctx = served.step_context(first, step_inputs)
            h = None
            for b in range(nb):
                if b > 0:
                    if self.deviation is not None:
                        h = self.deviation.boundary(step, b, h)
                    if portable:
                        grid, entries = round_and_log(h, tau, offsets[b])
                        offsets[b] += h.numel()
                        if self.deviation is not None:
                            grid, entries = self.deviation.grid(step, b, grid, entries)
                        logs[b].extend(entries)
                        trace.boundaries[b].append(grid)
                        h = grid.to(h.dtype)
                    else:
                        trace.boundaries[b].append(h)
                h = served.run_block(blocks, b, h, ctx, caches[b])
            token = choose_token(h, policy, seed, algorithm, step)
            if portable and near_tie(h, token, policy, seed, algorithm, step, tau_logit):
                ties.append(step)
            if self.deviation is not None:
                token = self.deviation.token(step, h, token)
            trace.steps.append((first, q))
            trace.tokens.append(token)
            if on_token:
                on_token(step + 1, policy.max_new_tokens)
            if on_token_id:
                on_token_id(token)
            if (policy.stops_at(token) or self._stop_string(self.deviation, watch, step, token)
                    or (self.deviation is not None and self.deviation.stop(step, token))):
                break
            first += q
            step_inputs = {"input_ids": torch.tensor([[token]], dtype=torch.int64)}
        if portable:
            if self.deviation is not None:
                ties = self.deviation.ties(ties)
            trace.portable = PortableLog({b: sorted(v) for b, v in logs.items()}, tuple(ties))
        return trace

    def _stop_watch(self, policy: GenerationPolicy) -> StopStrings | None:
        if not policy.stop:
            return None
        tokenizer = self.served.tokenizer
        return StopStrings(policy.stop, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))

    @staticmethod
    def _stop_string(deviation, watch: StopStrings | None, step: int, token: int) -> bool:
        """Whether the text decoded so far contains a stop string (SPEC.md 8.6.2)."""
        if watch is None:
            return False
        hit = watch.add(token)
        return deviation.stop_string(step, hit) if deviation is not None else hit

    @torch.inference_mode()
    def _forward(self, inputs) -> _Trace:
        served, blocks = self.served, self.blocks
        nb = len(blocks)
        trace = _Trace(boundaries={b: [] for b in range(1, nb)}, steps=[(0, 1)])
        ctx = served.step_context(0, inputs)
        h = None
        for b in range(nb):
            if b > 0:
                if self.deviation is not None:
                    h = self.deviation.boundary(0, b, h)
                trace.boundaries[b].append(h)
            h = served.run_block(blocks, b, h, ctx, None)
        if not bool(torch.isfinite(h).all()):
            raise InputError("the model produced non-finite logits")
        trace.label = greedy_token(h)
        if self.deviation is not None:
            trace.label = self.deviation.token(0, h, trace.label)
        return trace

    # --- the record ------------------------------------------------------------------------
    def _finish(self, inputs, trace: _Trace, doc_input, doc_output, outputs, generation, request_nonce, t0,
                text: str | None = None, label_name: str | None = None, stop_offset: int | None = None
                ) -> InferenceResult:
        served, algorithm, store = self.served, self.served.algorithm, self.records.store
        causal = served.task == "causal_lm"
        rows: dict[str, TensorRef] = {}
        to_store: list[tuple[TensorRef, torch.Tensor]] = []
        if causal and set(inputs) != {"input_ids"}:
            raise AssertionError(f"a causal LM request has input_ids only, not {sorted(inputs)}")
        for name, t in inputs.items():
            ref = TensorRef.of(name, t, algorithm)
            rows[input_key(name)] = ref
            to_store.append((ref, t))
        for key, (name, t) in outputs.items():
            ref = TensorRef.of(name, t, algorithm)
            rows[key] = ref
            to_store.append((ref, t))
        if causal:  # the ids and tokens are stated inline (SPEC.md 8.4.1): no object
            to_store = []
            doc_input = {**doc_input, "ids": inputs["input_ids"][0].tolist()}
        roots: dict[str, bytes] = {}
        boundary_rows: dict[str, TensorRef] = {}
        for b, per_step in trace.boundaries.items():
            # per step a digest, folded into one root per boundary, and the boundaries into one root
            roots[boundary_label(b)] = steps_root(algorithm, per_step)
            full = per_step[0] if len(per_step) == 1 else torch.cat(per_step, dim=1)
            ref = TensorRef.of("activation", full, algorithm)
            boundary_rows[boundary_key(b)] = ref
            if self.settings.stored(b):
                to_store.append((ref, full))
        for ref, t in to_store:
            store.put(ref, t)
        created = utc_now()
        doc = {
            "format": RECORD_FORMAT,
            "hash": algorithm,
            "nonce": os.urandom(16).hex(),  # the provider's: every record is distinct
            "request_nonce": request_nonce.hex() if request_nonce is not None else None,  # the client's
            "task": served.task,
            # `model` and `layout`, the same in every record of this server, by digest (SPEC.md 8.4)
            "served": self.served_digest.hex(),
            "generation": generation,
            "input": doc_input,
            "output": doc_output,
            # one root over every boundary's steps root and activation digest (SPEC.md 8.4.1)
            "boundaries": boundaries_root(algorithm, roots, boundary_rows).hex(),
            # portable numerics: the grid and the near-boundary and near-tie logs (SPEC.md 8.13)
            "numerics": trace.portable.to_json() if trace.portable is not None else None,
            # batched serving only (absent when computed alone): the batch shape and row (SPEC.md 8.5.1)
            **({"batch": trace.batch.to_json()} if trace.batch is not None else {}),
            # classifiers: the input and output rows (a causal LM states its ids inline)
            **({} if causal else {"tensors": rows_to_json(rows)}),
            # CPU results depend on the intra-op thread count: strict replay uses the same one
            "environment": {"torch_threads": torch.get_num_threads()},
        }
        data = canonical_json(doc)
        rid = record_id(algorithm, data)
        path = self.records.record_path(rid)
        self.records.write_new(path, data)
        # activations kept, or portable logs read against the boundaries' sizes: the boundaries
        # file is written with the record (SPEC.md 8.4.1)
        if self.settings.activation_interval >= 1 or trace.portable is not None:
            write_boundaries(self.records, rid, roots, boundary_rows)
        # the receipt binds the record id, and through it the input, output, nonce and policy (SPEC.md 8.7)
        receipt = issue_receipt(self.key, algorithm, served.digest, rid, time=created)
        receipt_path = self.records.receipt_path(rid)
        self.records.write_new(receipt_path, canonical_json(receipt.to_json()) + b"\n")
        return InferenceResult(rid.hex(), path, tuple(trace.tokens), text, trace.label, label_name, receipt, receipt_path,
                               time.perf_counter() - t0, int(inputs["input_ids"].shape[1]) if "input_ids" in inputs else 0,
                               stop_offset)
