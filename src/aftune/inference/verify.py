"""Inference verification by replay: the client's side of auditable inference.

    aftune verify-inference R --all --run RUN --public-key provider.pub --prompt "..." --policy policy.json \
        --request-nonce HEX
    aftune verify-inference R --record ID --layer-block 1 --model MY_COPY --prompt "..." --agreement agreement.json

For a record and a layer block l the verifier (numbers follow SPEC.md 8.8):
 1. checks that the record file hashes to its name, and with a pinned key that the receipt is
    signed and names this record, model, input, output, request nonce and policy;
 2. loads the client's own copy of the model (never a path the record names), checks its config,
    tokenizer and model digest against the record (and, with a run directory and the pinned key,
    that it is the run's signed final model);
 3. compares the committed generation policy and request nonce with the client's, field by
    field, and re-derives a sampled record's seed from the nonce, the input and the policy;
 4. checks the input: the committed input ids are the tokens of the recorded prompt (rendered
    with the chat template, tokenised with the client's tokenizer) and the prompt is the client's;
    the output tokens, steps, stop rule and digests agree (steps 1-4: `checks.py`);
 5. replays block l step by step from the committed block inputs with its own KV cache, and
    compares every step's output with the committed boundary (`verdict.comparison`: bitwise in
    strict mode, relative errors in tolerance mode); a v6 record without its boundaries file has
    them regenerated first (`boundaries_replay.py`);
 6. for the last block, recomputes the logits of every step and checks each committed token.

What the caller did not give (a pinned key, the client's input, policy or nonce) is not compared:
each such gap is a line of `Report.notes`, refused unless an option named `unsafe` allows it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..core.encoding import DTYPE_BY_NAME, tensor_digest
from ..core.signing import PublicKey
from ..errors import CommitmentMismatch, InputError, RecordError
from ..models.cache import KVCache
from ..models.shapes import TensorSpec, shape_oracle
from ..training.replay import check_fits
from ..verdict.findings import RECORD, BlockResult, Finding, Report
from ..verdict.comparison import Comparison, Tolerance, Verifying
from ..verdict.threads import pinned_threads, recorded_threads
from .batching import batch_context, filler_batch, row_slots, run_block_batched, supports_batching
from .checks import RecordChecks
from .policy import GenerationPolicy, check_request_nonce
from .portable import tau_for, token_acceptable, token_cap
from .portable_replay import PortableReplay
from .boundaries_replay import BoundaryRegeneration
from .thresholds import ACCEPTED_LAYERS_PER_BLOCK, default_tolerance
from .record import InferenceRecord, boundary_key, steps_root
from .sampling import choose_token, greedy_token, needed_logit_tolerance, sample_uniform, sampled_token_possible
from .served import ServedModel, is_run_dir

RECORD_LEVEL = -1  # layer_block of findings about the whole record
class InferenceVerifier(RecordChecks, PortableReplay, BoundaryRegeneration, Verifying):
    """Verifies one inference record. Construction runs the record-level checks (collected in
    `errors`); `verify_block` replays one layer block, `verify_all` every block."""

    def __init__(self, record_dir: str | Path, record: str | None = None, *, model: str | Path | ServedModel | None = None,
                 mode: str = "strict", tolerance: Tolerance | None = None,
                 replay_dtype: str | None = None, public_key: PublicKey | None = None,
                 run_dir: str | Path | None = None, transcript: str | Path | None = None,
                 expected_prompt: str | None = None, expected_text: str | None = None,
                 expected_image: str | Path | None = None, policy: GenerationPolicy | None = None,
                 request_nonce: bytes | None = None, max_layers_per_block: int = ACCEPTED_LAYERS_PER_BLOCK,
                 regenerate_boundaries: bool = True):
        """`model` is the client's own copy (a model or run directory, or a loaded ServedModel);
        without it, the run directory's model/. `policy` and `request_nonce` are what the client
        asked for (a causal LM record is compared with them field by field). Without `tolerance`,
        tolerance mode uses `default_tolerance`, widened for the record's block depth only up to
        `max_layers_per_block`. A v6 record without its boundaries file has them regenerated in
        memory (strict mode), unless `regenerate_boundaries` is False (an audit: the bundle must
        carry the provider's file), which raises RecordError instead."""
        if replay_dtype is not None and replay_dtype not in DTYPE_BY_NAME:
            raise InputError(f"--dtype must be one of {', '.join(DTYPE_BY_NAME)}, got {replay_dtype!r}")
        self.record = InferenceRecord.open(record_dir, record)
        rec = self.record
        depth_note = None
        if tolerance is None:  # the defaults of the record's dtype, the replay's and the accepted block depth
            tolerance, depth_note = default_tolerance(rec, replay_dtype, max_layers_per_block)
        self.comparison = Comparison(mode, tolerance)
        # portable tau widens for deeper blocks only as far as the client accepts (the depth is the provider's choice)
        self.portable_depth = min(rec.settings.layers_per_block, max_layers_per_block) \
            if isinstance(max_layers_per_block, int) and max_layers_per_block >= 1 else 2
        if rec.portable is not None and rec.settings.layers_per_block > self.portable_depth:
            depth_note = (f"portable tau was widened for layer blocks of at most {self.portable_depth} layers, not the "
                          f"record's {rec.settings.layers_per_block} (the provider chose that depth); give "
                          f"--max-layers-per-block {rec.settings.layers_per_block} if you accept blocks that deep")
        if rec.portable is not None and not self.comparison.strict:
            raise InputError("this record has portable numerics (SPEC.md 8.13): it is verified bitwise on any hardware "
                             "in strict mode (the default); tolerance mode does not apply to its bfloat16 boundaries")
        if replay_dtype is not None and self.comparison.strict and replay_dtype != rec.model["dtype"]:
            raise InputError(f"replaying a {rec.model['dtype']} record in {replay_dtype} cannot be bitwise: "
                             "use --mode tolerance with --dtype")
        if policy is not None and not isinstance(policy, GenerationPolicy):
            raise InputError("policy must be a GenerationPolicy (GenerationPolicy.load(path) reads a policy file)")
        self.client_policy = policy
        self.client_nonce = check_request_nonce(request_nonce) if request_nonce is not None else None
        self.errors: list[Finding] = []
        self.fatal = False  # the record contradicts itself: block replays are meaningless
        self.served, run_from_model = self._load_model(model, run_dir)
        run_dir = run_dir or run_from_model
        self.notes = self._gaps(public_key, run_dir, expected_prompt, expected_text, expected_image)
        if depth_note is not None and (not self.comparison.strict or rec.portable is not None):
            self.notes.append(depth_note)
        self.shapes = shape_oracle(self.served.hf_config, rec.model["attn_implementation"],
                                  DTYPE_BY_NAME[rec.model["dtype"]])
        if replay_dtype is not None and replay_dtype != rec.model["dtype"]:
            self.served.model.to(DTYPE_BY_NAME[replay_dtype])
        self.replay_dtype = self.served.compute_dtype
        self.blocks = self.served.blocks(rec.settings.layers_per_block)
        self.tokens: list[int] = []
        self.inputs: dict[str, torch.Tensor] = {}
        self._expected: list | None = None
        # 1. receipt, 2. model and run, layout, 3. policy, nonce and seed, 4. input and output
        if public_key is not None:
            self._check_receipt(public_key)
        self._check_model()
        self._check_run(public_key, run_dir, transcript)
        self._check_layout()
        if not self.fatal:
            self._check_policy()
            self._check_input(expected_prompt, expected_text, expected_image)
            self._check_output()
        if not self.fatal and not rec.boundaries_known:
            if not regenerate_boundaries:
                raise RecordError(rec.boundaries_missing())
            self._regenerate_boundaries()

    def _error(self, check: str, reason: str, fatal: bool = False, **kw) -> None:
        self.errors.append(Finding(RECORD_LEVEL, 0, check, reason, scope=RECORD, **kw))
        self.fatal = self.fatal or fatal

    def _gaps(self, public_key, run_dir, prompt, text, image) -> list[str]:
        """What this verification does not compare, in words (Report.notes)."""
        rec, notes = self.record, []
        if public_key is None:
            notes.append("the receipt was not checked: no pinned provider key (--public-key)")
            if run_dir is not None:
                notes.append("the run was not checked: a run is evidence only under the provider's pinned key")
        if (prompt, text, image) == (None, None, None):
            notes.append("the input was not compared with yours (--prompt, --text or --image): the record may answer "
                         "another input")
        if rec.task == "causal_lm":
            if self.client_policy is not None and self.client_policy.dtype is None:
                notes.append(f"the serving dtype was not compared with yours: your generation policy "
                             f"({self.client_policy.format}) pins none (the record's model.dtype is "
                             f"{rec.model['dtype']}); a policy made by `aftune policy` pins it")
            if self.client_policy is None:
                notes.append("the generation policy was not compared with yours (--policy or --agreement): the "
                             "provider may have chosen the temperature, top_p, max_new_tokens, end-of-sequence "
                             "tokens, stop rule and chat template")
            if self.client_nonce is None and (rec.request_nonce is not None or rec.policy.sampling):
                notes.append("the request nonce was not compared with yours (--request-nonce): the provider may have "
                             "chosen the nonce, and so the sampling seed")
        return notes

    def _load_model(self, model, run_dir) -> tuple[ServedModel, Path | None]:
        """The client's copy: `model`, else the run's model/. Never a path the record names."""
        rec = self.record
        if isinstance(model, ServedModel):
            return model, None
        path = model if model is not None else run_dir
        if path is None:
            raise InputError("no model to replay with: pass your copy of the model (--model DIR), or the training "
                             "run it comes from (--run RUN with --public-key); a verifier never loads a model from a "
                             "path the provider names")
        p = Path(path)
        if not p.exists():
            raise InputError(f"model {p} does not exist: pass your copy of the model (or the run directory)")
        run_dir = p if is_run_dir(p) else None
        if run_dir is not None:
            p = p / "model"
        served = ServedModel.load(p, dtype=rec.model["dtype"], attn_implementation=rec.model["attn_implementation"],
                                  hash_algorithm=rec.algorithm, plain=True, with_tokenizer=False)
        return served, run_dir

    def recorded_threads(self) -> int | None:
        """The intra-op thread count the provider recorded with (bitwise CPU results depend on it)."""
        return recorded_threads(self.record.doc.get("environment"))

    # --- block replay ----------------------------------------------------------------------
    def _step_inputs(self, k: int) -> dict[str, torch.Tensor]:
        if self.record.task == "classification":
            return self.inputs
        if k == 0:
            return {"input_ids": self.inputs["input_ids"]}
        return {"input_ids": torch.tensor([[self.tokens[k - 1]]], dtype=torch.int64)}

    def expected_outputs(self) -> list:
        """The shape and dtype of every layer block's output in the agreed computation, from the
        committed inputs (run once on the meta device). A causal LM's boundaries are its steps'
        outputs joined along the positions, which is the shape of one pass over the whole
        sequence: that one pass is run (one meta run, not one per step: meta runs cost about a
        millisecond per operator whatever the sizes). Inputs the model cannot take at all (an
        image of another size) contradict the model the record names: a finding."""
        if self._expected is None:
            steps = self.record.steps
            batch = self._step_inputs(0)
            if self.record.task == "causal_lm" and len(steps) > 1:
                ids = self.inputs["input_ids"]
                batch = {"input_ids": torch.empty((ids.shape[0], sum(n for _, n in steps)), dtype=ids.dtype)}
            try:
                self._expected = [self.shapes.sequence_outputs(self.blocks, batch)]
            except (RuntimeError, ValueError, IndexError) as exc:
                shapes = {k: list(v.shape) for k, v in self.inputs.items()}
                raise CommitmentMismatch(f"the committed inputs {shapes} do not fit the model: "
                                         f"{str(exc).splitlines()[0][:200]}") from None
        return self._expected

    def expected_boundary(self, b: int) -> TensorSpec:
        """Shape and dtype of boundary b (the input of layer block b) over all steps (portable
        numerics: on the bfloat16 grid)."""
        per_step = [specs[b - 1] for specs in self.expected_outputs()]
        shape = list(per_step[0].shape)
        if len(per_step) > 1:
            shape[1] = sum(spec.shape[1] for spec in per_step)
        dtype = "BF16" if self.record.portable is not None else per_step[0].dtype
        return TensorSpec(tuple(shape), dtype)

    def committed_boundary(self, b: int, layer_block: int) -> list[torch.Tensor]:
        """The committed input of layer block b, per step: the stored concatenation (its digest
        checked by the store) split into the steps' slices, whose root must be the committed one."""
        rec = self.record
        key = boundary_key(b)
        check_fits(rec.rows.get(key), self.expected_boundary(b), key)
        if not rec.has_tensor(key):
            raise RecordError(f"boundary {b} (input of layer block {b}) is committed by digest only (activation "
                              f"interval {rec.settings.activation_interval}): run `aftune prepare-inference "
                              f"{rec.records.root} --record {rec.record_id.hex()} --layer-block {layer_block}` on the "
                              "provider's hardware, or ask for an opening (`aftune open`)")
        full = rec.tensor(key)
        steps = rec.steps
        parts = [full] if len(steps) == 1 else [p.clone() for p in torch.split(full, [q for _, q in steps], dim=1)]
        if steps_root(rec.algorithm, parts) != rec.boundary_root(b):
            raise CommitmentMismatch(f"boundary {b}: the stored activations do not match the committed root of its "
                                     "per-step digests (boundary_roots)")
        return parts

    def verify_block(self, layer_block: int, inputs: list[torch.Tensor] | None = None
                     ) -> tuple[BlockResult, list[torch.Tensor] | None]:
        """Replay one layer block over every step. `inputs` (per step) replace the committed
        inputs when a previous block's strict replay produced them. Returns the result and the
        replayed outputs (None for the last block, in tolerance mode, or when the replay stopped)."""
        nb = len(self.blocks)
        if not 0 <= layer_block < nb:
            raise InputError(f"layer block {layer_block} does not exist: this record has layer blocks 0..{nb - 1}")
        if inputs is None and layer_block in self._regenerated and self.comparison.strict:
            return self._regenerated[layer_block], None  # replayed strictly while regenerating (SPEC.md 8.9)
        t0 = time.perf_counter()
        res = BlockResult(layer_block, 0, self.served.describe(self.blocks, layer_block), scope=RECORD)
        outputs = None
        if self.fatal:
            reason = self.errors[-1].reason if self.errors else "inconsistent record"
            res.fail("record", f"the record contradicts itself: {reason}")
        else:
            try:
                # portable numerics replays on any hardware: the provider's thread count is not needed
                with pinned_threads(self.recorded_threads(),
                                    enabled=self.comparison.strict and self.record.portable is None):
                    outputs = self._replay(res, layer_block, inputs)
            except CommitmentMismatch as exc:  # a committed tensor contradicts the agreed computation
                res.fail("record", str(exc))
        res.seconds = time.perf_counter() - t0
        return res, outputs

    @torch.inference_mode()
    def _replay(self, res: BlockResult, l: int, inputs) -> list[torch.Tensor] | None:
        """Strict mode: step by step with the block's own KV cache, the provider's very calls.
        Tolerance mode: the whole sequence at once (teacher forcing, `_replay_sequence`)."""
        rec, served, blocks = self.record, self.served, self.blocks
        self._current = res
        last = l == len(blocks) - 1
        if l > 0 and inputs is None:
            inputs = self.committed_boundary(l, l)
        if not self.comparison.strict:
            self._replay_sequence(res, l, inputs)
            return None
        cache = KVCache() if rec.task == "causal_lm" else None
        portable = rec.portable is not None
        if portable and last:
            ties, cap = len(rec.portable.token_steps), token_cap(len(self.tokens))
            if ties > cap:
                res.fail("token", f"the near-tie log lists {ties} of {len(self.tokens)} steps, more than the cap {cap} "
                         "(SPEC.md 8.13)", tensor="output/tokens", step=rec.portable.token_steps[cap])
                return None
        outputs = []
        shape = rec.batch
        if shape is not None and (shape.length > served.max_positions or not supports_batching(served)):
            why = (f"batch.length {shape.length} exceeds the model's {served.max_positions} positions"
                   if supports_batching(served) else f"a {served.family} model is never served in batches")
            res.fail("record", f"the record claims batch {shape.to_json()}: {why}", tensor="batch")
            return None
        for k, (first, q) in enumerate(rec.steps):
            h_in = inputs[k] if l > 0 else None
            if portable and h_in is not None:  # the committed grid values, computed on in float32
                h_in = h_in.to(self.replay_dtype)
            if shape is None:
                ctx = served.step_context(first, self._step_inputs(k))
                out = served.run_block(blocks, l, h_in, ctx, cache)
            else:  # the row in a batch of the committed shape, every other row filler (SPEC.md 8.5.1)
                ids, h_batch, lengths = filler_batch(shape, k, self._step_inputs(k)["input_ids"], h_in,
                                                     rec.steps[0][1])
                ctx = batch_context(served, k, ids, lengths, shape.length)
                out = run_block_batched(served, blocks, l, h_batch, ctx, cache)
                out = out[shape.row] if last else row_slots(out, shape.row, q).clone()
            if last:
                self._check_choice(res, k, out)
            else:
                outputs.append(out)
        if last:
            return None
        if portable:
            outputs = self._portable_outputs(res, l, outputs)
            if outputs is None:
                return None
        if self._regenerating:  # v6 without its boundaries file: these outputs are the regeneration
            return outputs
        return outputs if self._compare_steps(res, l, outputs) else None

    def _compare_steps(self, res: BlockResult, l: int, outputs: list[torch.Tensor]) -> bool:
        """Strict: the replayed outputs must hash to the committed boundary and per-step root; on
        a mismatch, the first differing step is named when the boundary is stored."""
        rec, b = self.record, l + 1
        key = boundary_key(b)
        ref = rec.rows.get(key)
        res.compared += len(outputs)
        full = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        if ref is None:
            res.fail("record", "no commitment for this block's output", tensor=key)
            return False
        outcome = self.comparison.compare(ref, full, None, rec.algorithm, "activation")
        if outcome.matched and steps_root(rec.algorithm, outputs) == rec.boundary_root(b):
            return True
        if outcome.reason:  # a shape
            res.fail("output", outcome.reason, tensor=key)
            return False
        step, expected, actual, count = None, outcome.expected, outcome.actual, 0
        if rec.has_tensor(key):
            for k, (mine, theirs) in enumerate(zip(outputs, self.committed_boundary(b, l))):
                if tensor_digest("activation", mine, rec.algorithm) != tensor_digest("activation", theirs, rec.algorithm):
                    if step is None:
                        step = k
                        expected = tensor_digest("activation", theirs, rec.algorithm).hex()[:16] + "…"
                        actual = tensor_digest("activation", mine, rec.algorithm).hex()[:16] + "…"
                    count += int((mine.to(theirs.dtype) != theirs).sum()) if mine.shape == theirs.shape else 0
        where = "" if step is not None else " (the boundary is not stored: the first differing step is not known)"
        if rec.portable is not None:
            where += (f": {count} element(s) of boundary {b} are neither the grid rounding of the recomputed value "
                      "nor in its near-boundary log" if step is not None else
                      f": boundary {b} is not the grid rounding of the recomputed values with its near-boundary log")
        res.fail("output", f"the block's recomputed output differs from the committed one{where}", tensor=key,
                 step=step, expected=expected, actual=actual)
        return False

    def _replay_sequence(self, res: BlockResult, l: int, inputs) -> None:
        """Tolerance mode, teacher forcing: block l runs once over every position (the prompt and
        every generated token but the last), fed the committed inputs; its output is compared with
        the committed boundary l+1 in one comparison, the block's committed input giving the
        magnitude scale; the last block's logits at every position check every token."""
        rec, served, blocks = self.record, self.served, self.blocks
        last = l == len(blocks) - 1
        if rec.task == "causal_lm":
            generated = torch.tensor([self.tokens[:-1]], dtype=torch.int64)
            step = {"input_ids": torch.cat([self.inputs["input_ids"], generated], dim=1)}
        else:
            step = self._step_inputs(0)
        ctx = served.step_context(0, step)
        h_in = None
        if l > 0:
            h_in = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
            h_in = h_in.to(self.replay_dtype)
        if last:
            logits = served.run_block(blocks, l, h_in, ctx, None, every_position=rec.task == "causal_lm")
            if rec.task != "causal_lm":
                self._check_choice(res, 0, logits)
                return
            first = rec.steps[0][1] - 1  # the prompt's last position predicts token 0
            for k in range(len(self.tokens)):
                self._check_choice(res, k, logits[first + k])
            return
        out = served.run_block(blocks, l, h_in, ctx, None)
        committed = self.committed_boundary(l + 1, l)
        committed = committed[0] if len(committed) == 1 else torch.cat(committed, dim=1)
        key = boundary_key(l + 1)
        res.compared += 1
        outcome = self.comparison.compare(self.record.rows[key], out, lambda: committed, rec.algorithm, "activation",
                                      scale=h_in)
        if outcome.elem is not None:
            res.observe("activation", outcome.rel, outcome.elem)
        if not outcome.matched:
            res.fail("output", f"the block's recomputed output differs from the committed one beyond the tolerance"
                     f"{': ' + outcome.reason if outcome.reason else ''}", tensor=key, step=self._first_step(out, committed),
                     error=outcome.rel)

    def _first_step(self, out: torch.Tensor, committed: torch.Tensor) -> int | None:
        """The step of the first position whose error exceeds the element threshold (a locator)."""
        if out.dim() < 3 or out.shape != committed.shape or self.record.task != "causal_lm":
            return None
        d = (out.double() - committed.double()).abs()
        scale = committed.double().abs() + committed.double().pow(2).mean(-1, keepdim=True).sqrt()
        bad = ((d / scale.clamp_min(1e-30)).amax(dim=-1)[0] > self.tolerance.limits("activation")[1]).nonzero()
        if not len(bad):
            return None
        position, prompt = int(bad[0]), self.record.steps[0][1]
        return 0 if position < prompt else position - prompt + 1

    def _check_choice(self, res: BlockResult, k: int, logits: torch.Tensor) -> None:
        rec = self.record
        res.compared += 1
        if not bool(torch.isfinite(logits).all()):
            res.fail("token" if rec.task == "causal_lm" else "label", "the recomputed logits are not finite", step=k)
            return
        committed = self.tokens[k]
        if rec.task == "classification":
            ok, detail = self._token_ok(logits, committed, None, k)
            if not ok:
                res.fail("label", f"the committed label {committed} is not the argmax of the recomputed logits "
                         f"({detail})", tensor="output/label", step=k)
            return
        policy = rec.policy
        ok, detail = self._token_ok(logits, committed, policy, k)
        if not ok:
            how = "the seeded draw" if policy.sampling else "the argmax"
            res.fail("token", f"token {k}: the committed token {committed} is not {how} of the recomputed logits "
                     f"({detail})", tensor="output/tokens", step=k)

    def _token_ok(self, logits: torch.Tensor, token: int, gen: GenerationPolicy | None, k: int) -> tuple[bool, str]:
        z = logits.detach().double()
        if not 0 <= token < z.numel():
            return False, f"token id outside the vocabulary of {z.numel()}"
        sampling = gen is not None and gen.sampling
        seed = self.record.seed
        if sampling and seed is None:
            return False, "a sampled record without a seed"
        if self.comparison.strict:
            want = choose_token(logits, gen, seed, self.record.algorithm, k) if gen is not None else greedy_token(logits)
            portable = self.record.portable
            if want != token and portable is not None:  # a logged near tie may go either way (SPEC.md 8.13)
                if k not in portable.token_steps:
                    return False, f"expected {want}; step {k} is not in the near-tie log"
                _, tau_logit = tau_for(self.portable_depth)
                ok = token_acceptable(logits, token, gen, seed, self.record.algorithm, k, tau_logit)
                return ok, f"expected {want}; the recomputed logits are not near a tie with it (logged step {k})"
            return want == token, f"expected {want}"
        scale = max(float(z.abs().max()), 1e-30)
        eps = self.tolerance.logit * scale
        if not sampling:
            gap = float(z.max() - z[token])
            self._observe_token(gap / (2 * scale))
            return gap <= 2 * eps, f"its logit is {gap:.3g} below the largest, tolerance {2 * eps:.3g}"
        u = sample_uniform(self.record.algorithm, seed, k)
        self._observe_token(needed_logit_tolerance(z, token, gen, u) / scale)
        ok = sampled_token_possible(z, token, gen.temperature, gen.top_p, u, eps)
        return ok, f"no logits within {eps:.3g} of the recomputed ones make the draw u={u:.6f} pick it"

    def _observe_token(self, needed: float) -> None:
        """Tolerance mode: the smallest logit tolerance that accepts this token (calibration)."""
        seen = self._current.errors_by_kind.setdefault("token", [0.0, 0.0])
        seen[0] = max(seen[0], needed)

    # --- whole record ----------------------------------------------------------------------
    def verify(self, layer_blocks: list[int] | None = None, on_block=None) -> Report:
        """Verify the given layer blocks (all when None), chaining strict replays where a
        boundary is committed by digest only."""
        nb = len(self.blocks)
        todo = list(range(nb)) if layer_blocks is None else list(layer_blocks)
        for l in todo:
            if not 0 <= l < nb:
                raise InputError(f"layer block {l} does not exist: this record has layer blocks 0..{nb - 1}")
        report = Report(str(self.record.records.root), self.mode)
        report.errors.extend(self.errors)
        report.notes.extend(self.notes)
        chained = None
        for l in todo:
            use = chained if (chained is not None and l > 0 and not self.record.has_tensor(boundary_key(l))) else None
            result, outputs = self.verify_block(l, use)
            report.results.append(result)
            ok = result.verdict == "PASS" and self.comparison.strict
            chained = outputs if ok and l + 1 in todo else None
            if on_block:
                on_block(result)
        return report

    def verify_all(self, on_block=None) -> Report:
        return self.verify(None, on_block)
