"""Inference verification by replay: the client's side of auditable inference.

    aftune verify-inference R --record ID --layer-block 1 --public-key provider.pub
    aftune verify-inference R --record ID --all --mode tolerance --dtype float32
    aftune prepare-inference R --record ID --layer-block 2

For a record and a layer block l the verifier (numbers follow SPEC.md 8.8):
 1. checks that the record file hashes to its name, and with a pinned key that the receipt is
    signed and names this record, model, input and output;
 2. loads the model, checks its config and weights digest against the record (and, with a run
    directory and the pinned key, that it is the run's signed final model);
 3. checks the input: the committed input ids are the tokens of the recorded prompt (and the
    client's own prompt or image, when given); the output tokens, steps and digests agree;
 4. replays block l step by step from the committed block inputs with its own KV cache, and
    compares every step's output with the committed boundary (bitwise in strict mode, relative
    errors in tolerance mode);
 5. for the last block, recomputes the logits of every step and checks that each committed token
    follows from them: the argmax for greedy decoding, the seeded draw for sampling.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.encoding import tensor_digest
from ..errors import CommitmentMismatch, InputError, RecordError
from .engine import (DTYPE_BY_NAME, IMAGE_FAMILIES, InferenceRecord, KVCache, ServedModel, boundary_key,
                        choose_token, classification_inputs, eos_token_ids, greedy_token, image_pixels, is_run_dir,
                        prompt_ids, sample_uniform, step_key)
from ..verdict.findings import BlockResult, Finding, Report
from ..core.signing import PublicKey
from ..training.verify import relative_errors

MODES = ("strict", "tolerance")
MAX_FINDINGS_PER_CHECK = 8
RECORD_LEVEL = -1  # layer_block of findings about the whole record


@dataclass(frozen=True)
class InferenceTolerance:
    """Thresholds of tolerance mode. The defaults depend on the record's dtype (`for_dtype`):
    honest replay error scales with the precision the provider computed in, and that dtype is
    bound by the model digest, so a provider cannot choose a looser one."""

    rel_l2: float  # activations: ||recomputed - committed|| / ||committed||
    max_elem: float  # activations: max |recomputed - committed| / rms(committed)
    logit: float  # tokens: logit error allowed, as a fraction of the step's largest |logit|

    @classmethod
    def for_dtype(cls, dtype: str) -> "InferenceTolerance":
        return cls(*DEFAULT_TOLERANCE[dtype])

    def problems(self) -> list[str]:
        return [f"{name} must be a non-negative number, got {v!r}" for name, v in
                (("rel_l2", self.rel_l2), ("max_elem", self.max_elem), ("logit", self.logit))
                if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0]


# Default thresholds per record dtype (rel_l2, max_elem, logit), a few times the largest honest
# error measured on tiny models of every family replayed one precision up (tests/test_inference_
# tolerance.py prints them): bfloat16 -> float32 honest 4.7e-3, 2.2e-2, 6.0e-3; float32 -> float64
# honest 3.1e-7, 1.6e-6, 2.3e-7.
DEFAULT_TOLERANCE = {
    "bfloat16": (1.5e-2, 8e-2, 2.5e-2),
    "float16": (2e-3, 1e-2, 3e-3),
    "float32": (1e-5, 1e-4, 1e-5),
    "float64": (1e-12, 1e-11, 1e-12),
}


@dataclass(frozen=True)
class InferenceFinding(Finding):
    """A failed check of an inference record; `step` is the generation step (step k chooses
    token k), `layer_block` is -1 for checks about the whole record."""

    def location(self, block_label: str = "") -> list[str]:
        return [block_label or ("record" if self.layer_block == RECORD_LEVEL else f"layer block {self.layer_block}")]


class InferenceBlockResult(BlockResult):
    def headline(self) -> str:
        if self.verdict == "PASS":
            text = f"PASS {self.label}: {self.compared} commitments match"
            if self.max_error or self.max_elem_error:
                text += f" (largest relative error {self.max_error:.3g}, element {self.max_elem_error:.3g} x rms)"
            return text
        if not self.findings:
            return f"FAIL {self.label}: nothing was compared"
        return f"FAIL {self.findings[0].describe(self.label)}"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(d: bytes) -> str:
    return d.hex()[:16] + "…"


class InferenceVerifier:
    """Verifies one inference record. Construction runs the record-level checks (collected in
    `errors`); `verify_block` replays one layer block, `verify_all` every block."""

    def __init__(self, record_dir: str | Path, record: str | None = None, *, model: str | Path | ServedModel | None = None,
                 mode: str = "strict", tolerance: InferenceTolerance | None = None,
                 replay_dtype: str | None = None, public_key: PublicKey | None = None,
                 run_dir: str | Path | None = None, transcript: str | Path | None = None,
                 expected_prompt: str | None = None, expected_text: str | None = None,
                 expected_image: str | Path | None = None):
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if replay_dtype is not None and replay_dtype not in DTYPE_BY_NAME:
            raise InputError(f"--dtype must be one of {', '.join(DTYPE_BY_NAME)}, got {replay_dtype!r}")
        self.record = InferenceRecord.open(record_dir, record)
        rec = self.record
        if replay_dtype is not None and mode == "strict" and replay_dtype != rec.model["dtype"]:
            raise InputError(f"replaying a {rec.model['dtype']} record in {replay_dtype} cannot be bitwise: "
                             "use --mode tolerance with --dtype")
        self.mode = mode
        self.tolerance = tolerance or InferenceTolerance.for_dtype(rec.model["dtype"])
        problems = self.tolerance.problems()
        if problems:
            raise InputError("invalid tolerance: " + "; ".join(problems))
        self.errors: list[InferenceFinding] = []
        self.fatal = False  # the record contradicts itself: block replays are meaningless
        self.served, run_from_model = self._load_model(model)
        run_dir = run_dir or run_from_model
        if replay_dtype is not None and replay_dtype != rec.model["dtype"]:
            self.served.model.to(DTYPE_BY_NAME[replay_dtype])
        self.replay_dtype = self.served.compute_dtype
        self.blocks = self.served.blocks(rec.settings.layers_per_block)
        self.tokens: list[int] = []
        self.inputs: dict[str, torch.Tensor] = {}
        # 1. receipt, 2. model and run, 3. layout, input and output
        if public_key is not None:
            self._check_receipt(public_key)
        self._check_model()
        self._check_run(public_key, run_dir, transcript)
        self._check_layout()
        if not self.fatal:
            self._check_input(expected_prompt, expected_text, expected_image)
            self._check_output()

    # --- record-level checks ---------------------------------------------------------------
    def _error(self, check: str, reason: str, fatal: bool = False, **kw) -> None:
        self.errors.append(InferenceFinding(RECORD_LEVEL, 0, check, reason, **kw))
        self.fatal = self.fatal or fatal

    def _load_model(self, model) -> tuple[ServedModel, Path | None]:
        rec = self.record
        if isinstance(model, ServedModel):
            return model, None
        path = model if model is not None else rec.model.get("source")
        if not isinstance(path, (str, Path)) or not path:
            raise InputError("the record names no model: pass --model with your copy of the model (or run directory)")
        p = Path(path)
        if model is None and not p.exists():
            raise InputError(f"the record names the model {p}, which is not here: pass --model with your copy "
                             "of the model (or the run directory)")
        run_dir = p if is_run_dir(p) else None
        if run_dir is not None:
            p = p / "model"
        served = ServedModel.load(p, dtype=rec.model["dtype"], attn_implementation=rec.model["attn_implementation"],
                                  hash_algorithm=rec.algorithm, plain=True, with_tokenizer=False)
        return served, run_dir

    def _check_receipt(self, public_key: PublicKey) -> None:
        from .receipt import Receipt, verify_receipt

        path = self.record.receipt_path()
        if not path.is_file():
            self._error("receipt", f"no receipt for this record at {path}: the provider signed nothing")
            return
        try:
            receipt = Receipt.load(path)
            if receipt.record_root != self.record.record_id:
                raise CommitmentMismatch(f"the receipt names record {_short(receipt.record_root)}, not this one")
            verify_receipt(receipt, public_key, self.record.records.root)
        except (CommitmentMismatch, InputError) as exc:
            self._error("receipt", str(exc))

    def _check_model(self) -> None:
        rec, served = self.record, self.served
        if served.hf_config != rec.model["config"]:
            diff = sorted(k for k in set(served.hf_config) | set(rec.model["config"])
                          if served.hf_config.get(k) != rec.model["config"].get(k))
            self._error("model", f"the model's config.json differs from the committed config (fields {diff[:6]})")
        if served.algorithm != rec.algorithm or served.digest != rec.model_digest:
            self._error("model", "the model's weights are not the ones the record commits to (another model, or "
                        "weights changed)", expected=_short(rec.model_digest), actual=_short(served.digest))

    def _check_run(self, public_key, run_dir, transcript) -> None:
        from ..training.transcript import run_root

        rec = self.record
        binding = rec.run
        if binding is not None:
            if run_root(rec.algorithm, binding.config_digest, binding.last_root,
                        binding.final_model_digest) != binding.root:
                self._error("run", "the committed run root does not follow from its parts")
            if binding.final_model_digest != rec.model_digest:
                self._error("run", "the record's model digest is not the run's final model digest",
                            expected=_short(binding.final_model_digest), actual=_short(rec.model_digest))
        if run_dir is None or public_key is None:
            return
        from ..training.run import RunRecord

        try:
            run = RunRecord.open(run_dir, public_key, transcript)
        except CommitmentMismatch as exc:
            self._error("run", f"the run directory's signed record is not valid: {exc}")
            return
        signed = run.transcript.run
        if signed is None:
            self._error("run", "the run has no signed run root: training did not finish")
        elif signed.final_model_digest != rec.model_digest:
            self._error("run", "the served model is not the run's fine-tuned model: the record's model digest "
                        "differs from the signed final_model_digest", expected=_short(signed.final_model_digest),
                        actual=_short(rec.model_digest))
        elif binding is None or binding.root != signed.root:
            self._error("run", "the record is not bound to this run's signed run root")
        tok = (run.config.get("model") or {}).get("tokenizer")
        if tok is not None and rec.model.get("tokenizer") != tok:
            self._error("run", "the record's tokenizer is not the run's committed tokenizer")

    def _check_layout(self) -> None:
        layout = self.record.doc["layout"]
        if layout["stages"] != self.served.stage_names or \
                layout["layer_blocks"] != [list(r) for r in self.blocks.ranges]:
            self._error("record", "the committed layer-block layout differs from the model's", fatal=True)
        if self.record.task != self.served.task:
            self._error("record", f"the record is a {self.record.task} record, the model a {self.served.task}",
                        fatal=True)

    def _tokenizer(self):
        """The record's tokenizer (checked against its committed files root), loaded once."""
        from .engine import load_tokenizer

        if getattr(self, "_loaded_tokenizer", None) is None:
            d = self.record.tokenizer_dir()
            if d is None:
                raise RecordError("the record commits no tokenizer")
            self._loaded_tokenizer = load_tokenizer(d)
        return self._loaded_tokenizer

    def _check_input(self, expected_prompt, expected_text, expected_image) -> None:
        rec, served = self.record, self.served
        inp = rec.doc["input"]
        if rec.rows_root("input/") != rec.declared_digest("input"):
            self._error("input", "the input digest does not match the committed input tensors", fatal=True)
        fields = {"causal_lm": ["input_ids"], "bert": ["attention_mask", "input_ids", "token_type_ids"],
                  "image": ["pixel_values"]}
        kind = "causal_lm" if rec.task == "causal_lm" else ("image" if served.family in IMAGE_FAMILIES else "bert")
        have = sorted(k[len("input/"):] for k in rec.rows if k.startswith("input/"))
        if have != fields[kind]:
            self._error("input", f"committed input tensors {have}, expected {fields[kind]}", fatal=True)
            return
        self.inputs = {f: rec.tensor(f"input/{f}") for f in fields[kind]}
        if kind == "causal_lm":
            prompt = inp.get("prompt")
            if inp.get("kind") != "prompt" or not isinstance(prompt, str):
                self._error("input", "the record has no prompt", fatal=True)
                return
            if expected_prompt is not None and prompt != expected_prompt:
                self._error("input", f"the record answers another prompt: {prompt[:60]!r}, not yours "
                            f"{expected_prompt[:60]!r}")
            try:
                ids = prompt_ids(self._tokenizer(), prompt)
            except InputError as exc:
                self._error("input", f"the recorded prompt cannot be tokenised: {exc}", fatal=True)
                return
            if not torch.equal(ids, self.inputs["input_ids"]):
                self._error("input", "the committed input ids are not the tokens of the recorded prompt: the model "
                            "was run on another prompt", tensor="input/input_ids")
        elif kind == "bert":
            text = inp.get("text")
            if inp.get("kind") != "text" or not isinstance(text, str):
                self._error("input", "the record has no text", fatal=True)
                return
            if expected_text is not None and text != expected_text:
                self._error("input", f"the record classifies another text: {text[:60]!r}")
            try:
                want = classification_inputs(self._tokenizer(), text, served.max_positions)
            except InputError as exc:
                self._error("input", f"the recorded text cannot be tokenised: {exc}", fatal=True)
                return
            for f in fields[kind]:
                if not torch.equal(want[f], self.inputs[f]):
                    self._error("input", f"the committed {f} are not those of the recorded text: the model was run "
                                "on another input", tensor=f"input/{f}")
        else:
            info = inp.get("image")
            px = self.inputs["pixel_values"]
            if inp.get("kind") != "image" or not isinstance(info, dict) or px.dim() != 4 or px.shape[0] != 1:
                self._error("input", "the record has no image input of shape [1, 3, S, S]", fatal=True)
                return
            if expected_image is not None:
                pixels, got = image_pixels(expected_image, int(px.shape[-1]), rec.algorithm)
                if got["digest"] != info.get("digest") or not torch.equal(pixels, px):
                    self._error("input", f"the committed pixels are not those of your image {Path(expected_image).name}")

    def _check_output(self) -> None:
        rec = self.record
        out = rec.doc["output"]
        if rec.rows_root("output/") != rec.declared_digest("output"):
            self._error("output", "the output digest does not match the committed output tensors", fatal=True)
        steps = rec.steps
        if rec.task == "classification":
            label = out.get("label")
            t = rec.tensor("output/label") if "output/label" in rec.rows else None
            if (t is None or t.dtype != torch.int64 or not _is_int(label) or t.tolist() != [label]
                    or steps != [(0, 1)]):
                self._error("output", "the committed label, its tensor and the single step disagree", fatal=True)
                return
            self.tokens = [label]
            return
        tokens = out.get("tokens")
        t = rec.tensor("output/tokens") if "output/tokens" in rec.rows else None
        if (t is None or not isinstance(tokens, list) or not all(_is_int(x) for x in tokens)
                or t.dtype != torch.int64 or t.tolist() != tokens):
            self._error("output", "the committed tokens and their tensor disagree", fatal=True)
            return
        self.tokens = tokens
        gen = rec.generation
        eos = set(eos_token_ids(rec.model["config"]))
        if sorted(eos) != sorted(rec.doc["generation"]["eos_token_ids"]):
            self._error("output", "the committed end-of-sequence tokens are not the model config's")
        p = self.inputs["input_ids"].shape[1] if "input_ids" in self.inputs else 0
        want_steps = [(0, p)] + [(p + k - 1, 1) for k in range(1, len(tokens))]
        if steps != want_steps or not tokens:
            self._error("output", f"the committed steps {steps[:3]}… do not match a prompt of {p} tokens and "
                        f"{len(tokens)} generated tokens", fatal=True)
            return
        if len(tokens) > gen.max_new_tokens:
            self._error("output", f"{len(tokens)} tokens generated, max_new_tokens is {gen.max_new_tokens}")
        early = [i for i, tok in enumerate(tokens[:-1]) if tok in eos]
        if early:
            self._error("output", f"generation went on after an end-of-sequence token at step {early[0]}")
        if len(tokens) < gen.max_new_tokens and tokens[-1] not in eos:
            self._error("output", f"generation stopped after {len(tokens)} of {gen.max_new_tokens} tokens without "
                        "an end-of-sequence token")
        text = out.get("text")
        if text != self._tokenizer().decode(tokens, skip_special_tokens=True):
            self._error("output", "the committed text is not the decoding of the committed tokens")

    # --- block replay ----------------------------------------------------------------------
    def _step_inputs(self, k: int) -> dict[str, torch.Tensor]:
        if self.record.task == "classification":
            return self.inputs
        if k == 0:
            return {"input_ids": self.inputs["input_ids"]}
        return {"input_ids": torch.tensor([[self.tokens[k - 1]]], dtype=torch.int64)}

    def committed_boundary(self, b: int, layer_block: int) -> list[torch.Tensor]:
        """The committed input of layer block b, per step, each checked against its step digest."""
        rec = self.record
        key = boundary_key(b)
        if key not in rec.rows:
            raise CommitmentMismatch(f"boundary {b} has no commitment in the record")
        if not rec.has_tensor(key):
            raise RecordError(f"boundary {b} (input of layer block {b}) is committed by digest only (activation "
                              f"interval {rec.settings.activation_interval}): run `aftune prepare-inference "
                              f"{rec.records.root} --record {rec.record_id.hex()} --layer-block {layer_block}` first")
        full = rec.tensor(key)
        steps = rec.steps
        if len(steps) == 1:
            parts = [full]
        else:
            if full.dim() < 2 or full.shape[1] != sum(q for _, q in steps):
                raise CommitmentMismatch(f"boundary {b}: stored tensor of shape {list(full.shape)} does not cover the "
                                         f"{sum(q for _, q in steps)} positions of the steps")
            parts = [p.clone() for p in torch.split(full, [q for _, q in steps], dim=1)]
        for k, part in enumerate(parts):
            ref = rec.rows.get(step_key(k, b))
            if ref is None or tensor_digest(ref.name, part, rec.algorithm) != ref.digest:
                raise CommitmentMismatch(f"boundary {b}: the stored tensor disagrees with the digest of step {k}")
        return parts

    def verify_block(self, layer_block: int, inputs: list[torch.Tensor] | None = None
                     ) -> tuple[InferenceBlockResult, list[torch.Tensor] | None]:
        """Replay one layer block over every step. `inputs` (per step) replace the committed
        inputs when a previous block's strict replay produced them. Returns the result and the
        replayed outputs (None for the last block or when the replay stopped)."""
        nb = len(self.blocks)
        if not 0 <= layer_block < nb:
            raise InputError(f"layer block {layer_block} does not exist: this record has layer blocks 0..{nb - 1}")
        t0 = time.perf_counter()
        res = InferenceBlockResult(layer_block, 0, self.served.describe(self.blocks, layer_block))
        outputs = None
        if self.fatal:
            reason = self.errors[-1].reason if self.errors else "inconsistent record"
            res.findings.append(InferenceFinding(layer_block, 0, "record", f"the record contradicts itself: {reason}"))
        else:
            previous = torch.get_num_threads()
            try:
                threads = self.recorded_threads()
                if threads and self.mode == "strict":
                    torch.set_num_threads(threads)
                outputs = self._replay(res, layer_block, inputs)
            except CommitmentMismatch as exc:
                self._fail(res, "record", str(exc))
            except RuntimeError as exc:  # committed tensors that do not fit the model
                self._fail(res, "record", "the committed tensors cannot be replayed with this model: "
                           f"{str(exc).splitlines()[0][:300]}")
            finally:
                torch.set_num_threads(previous)
        res.seconds = time.perf_counter() - t0
        return res, outputs

    def recorded_threads(self) -> int | None:
        """The intra-op thread count the provider recorded with (bitwise CPU results depend on it)."""
        env = self.record.doc.get("environment")
        n = env.get("torch_threads") if isinstance(env, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 4096 else None

    def _fail(self, res: BlockResult, check: str, reason: str, **kw) -> None:
        if sum(1 for f in res.findings if f.check == check) < MAX_FINDINGS_PER_CHECK:
            res.findings.append(InferenceFinding(res.layer_block, 0, check, reason, **kw))

    @torch.inference_mode()
    def _replay(self, res: InferenceBlockResult, l: int, inputs) -> list[torch.Tensor] | None:
        rec, served, blocks = self.record, self.served, self.blocks
        self._current = res
        last = l == len(blocks) - 1
        steps = rec.steps
        if l > 0 and inputs is None:
            inputs = self.committed_boundary(l, l)
        committed_out = None
        if not last and self.mode == "tolerance":
            committed_out = self.committed_boundary(l + 1, l)
        cache = KVCache() if rec.task == "causal_lm" else None
        outputs = []
        for k, (first, _) in enumerate(steps):
            ctx = served.step_context(first, self._step_inputs(k))
            h_in = None
            if l > 0:
                h_in = inputs[k]
                h_in = h_in.to(self.replay_dtype) if h_in.dtype != self.replay_dtype else h_in
            out = served.run_block(blocks, l, h_in, ctx, cache)
            if last:
                self._check_choice(res, k, out)
            else:
                self._compare(res, k, l + 1, out, committed_out[k] if committed_out is not None else None)
                outputs.append(out)
        if last:
            return None
        if self.mode == "strict":
            ref = rec.rows.get(boundary_key(l + 1))
            full = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
            res.compared += 1
            if ref is None or tensor_digest(ref.name, full, rec.algorithm) != ref.digest:
                self._fail(res, "output", "the block's recomputed output over all steps differs from the committed "
                           "boundary", tensor=boundary_key(l + 1))
        return outputs

    def _compare(self, res: InferenceBlockResult, k: int, b: int, out: torch.Tensor,
                 committed: torch.Tensor | None) -> None:
        key = step_key(k, b)
        ref = self.record.rows.get(key)
        if ref is None:
            self._fail(res, "record", "no commitment for this step's block output", tensor=key, step=k)
            return
        res.compared += 1
        if tuple(out.shape) != ref.shape:
            self._fail(res, "output", f"shape {list(out.shape)} recomputed, {list(ref.shape)} committed",
                       tensor=key, step=k)
            return
        if self.mode == "strict":
            got = tensor_digest(ref.name, out, self.record.algorithm)
            if got != ref.digest:
                self._fail(res, "output", "the block's recomputed output differs from the committed one",
                           tensor=key, step=k, expected=_short(ref.digest), actual=_short(got))
            return
        rel, elem = relative_errors(out, committed)
        res.max_error, res.max_elem_error = max(res.max_error, rel), max(res.max_elem_error, elem)
        seen = res.errors_by_kind.setdefault("activation", [0.0, 0.0])
        seen[0], seen[1] = max(seen[0], rel), max(seen[1], elem)
        if not (rel <= self.tolerance.rel_l2 and elem <= self.tolerance.max_elem):
            self._fail(res, "output", f"the block's recomputed output differs from the committed one beyond the "
                       f"tolerance; largest element error {elem:.3g} x rms", tensor=key, step=k, error=rel)

    def _check_choice(self, res: InferenceBlockResult, k: int, logits: torch.Tensor) -> None:
        rec = self.record
        res.compared += 1
        if not bool(torch.isfinite(logits).all()):
            self._fail(res, "token" if rec.task == "causal_lm" else "label",
                       "the recomputed logits are not finite", step=k)
            return
        committed = self.tokens[k]
        if rec.task == "classification":
            ok, detail = self._token_ok(logits, committed, None, k)
            if not ok:
                self._fail(res, "label", f"the committed label {committed} is not the argmax of the recomputed "
                           f"logits ({detail})", tensor="output/label", step=k)
            return
        gen = rec.generation
        ok, detail = self._token_ok(logits, committed, gen, k)
        if not ok:
            how = "the seeded draw" if gen.sampling else "the argmax"
            self._fail(res, "token", f"token {k}: the committed token {committed} is not {how} of the recomputed "
                       f"logits ({detail})", tensor="output/tokens", step=k)

    def _token_ok(self, logits: torch.Tensor, token: int, gen, k: int) -> tuple[bool, str]:
        z = logits.detach().double()
        if not 0 <= token < z.numel():
            return False, f"token id outside the vocabulary of {z.numel()}"
        sampling = gen is not None and gen.sampling
        if self.mode == "strict":
            want = choose_token(logits, gen, self.record.algorithm, k) if gen is not None else greedy_token(logits)
            return want == token, f"expected {want}"
        scale = max(float(z.abs().max()), 1e-30)
        eps = self.tolerance.logit * scale
        if not sampling:
            gap = float(z.max() - z[token])
            self._observe_token(gap / (2 * scale))
            return gap <= 2 * eps, f"its logit is {gap:.3g} below the largest, tolerance {2 * eps:.3g}"
        u = sample_uniform(self.record.algorithm, gen.seed, k)
        self._observe_token(_needed_logit_tolerance(z, token, gen, u) / scale)
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
        chained = None
        for l in todo:
            use = chained if (chained is not None and l > 0 and not self.record.has_tensor(boundary_key(l))) else None
            result, outputs = self.verify_block(l, use)
            report.results.append(result)
            ok = result.verdict == "PASS" and self.mode == "strict"
            chained = outputs if ok and l + 1 in todo else None
            if on_block:
                on_block(result)
        return report

    def verify_all(self, on_block=None) -> Report:
        return self.verify(None, on_block)


def sampled_token_possible(z: torch.Tensor, token: int, temperature: float, top_p: float, u: float,
                           eps: float) -> bool:
    """Could logits within `eps` (each) of `z` make the seeded draw pick `token`? A sound,
    conservative test for tolerance mode: every probability of the provider's distribution lies
    within a factor r = exp(2 eps / T) of ours, which bounds nucleus membership and the
    cumulative sums on both sides of the token."""
    p = torch.softmax(z.double() / float(temperature), dim=-1)
    r = math.exp(2.0 * eps / float(temperature))
    n = p.numel()
    if top_p >= 1.0:
        maybe = torch.ones(n, dtype=torch.bool)
        surely = maybe
    else:
        ps = torch.sort(p, descending=True).values
        cs = torch.cumsum(ps, dim=0)
        neg = -ps  # ascending

        def mass_above(x: torch.Tensor, inclusive: bool) -> torch.Tensor:
            count = torch.searchsorted(neg, -x, right=inclusive)
            return torch.where(count > 0, cs[(count - 1).clamp(min=0)], torch.zeros_like(x))

        sure_above = mass_above(p * r * r, inclusive=False) / r
        maybe_above = (mass_above(p / (r * r), inclusive=True) - p).clamp(min=0) * r
        top = float(ps[0])
        maybe = (sure_above < top_p) | (p * r * r >= top)
        surely = maybe_above < top_p
        surely = surely & maybe
    if not bool(maybe[token]):
        return False
    lo = float(p[:token][surely[:token]].sum()) / r
    hi = float(p[: token + 1][maybe[: token + 1]].sum()) * r
    tot_lo = float(p[surely].sum()) / r
    tot_hi = float(p[maybe].sum()) * r
    return u * tot_hi >= lo and u * tot_lo < hi


def _needed_logit_tolerance(z: torch.Tensor, token: int, gen, u: float) -> float:
    """The smallest absolute logit error under which `sampled_token_possible` accepts the token
    (bisection; for calibration only, never a verdict)."""
    if sampled_token_possible(z, token, gen.temperature, gen.top_p, u, 0.0):
        return 0.0
    lo, hi = 0.0, max(float(z.abs().max()), 1.0)
    while not sampled_token_possible(z, token, gen.temperature, gen.top_p, u, hi):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return math.inf
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if sampled_token_possible(z, token, gen.temperature, gen.top_p, u, mid) else (mid, hi)
    return hi


def prepare_inference(record_dir: str | Path, record: str | None = None, layer_block: int | None = None,
                      model: str | Path | ServedModel | None = None) -> list[int]:
    """Regenerate boundaries committed by digest only (I_A > 1) by strict replay from the nearest
    stored one; each regenerated tensor must match its committed digests before it is stored.
    With `layer_block`, only what that block's replay needs (its input, and its output for
    tolerance mode); otherwise every missing boundary. Returns the boundaries regenerated."""
    v = InferenceVerifier(record_dir, record, model=model, mode="strict")
    rec, nb = v.record, len(v.blocks)
    if layer_block is not None and not 0 <= layer_block < nb:
        raise InputError(f"layer block {layer_block} does not exist: this record has layer blocks 0..{nb - 1}")
    if v.fatal:
        raise CommitmentMismatch(f"cannot regenerate activations: {v.errors[-1].describe()}")
    wanted = range(1, nb) if layer_block is None else [b for b in (layer_block, layer_block + 1) if 1 <= b < nb]
    missing = [b for b in wanted if not rec.has_tensor(boundary_key(b))]
    done: list[int] = []
    for target in missing:
        start = max([0] + [b for b in range(1, target) if rec.has_tensor(boundary_key(b))])
        inputs = None
        for l in range(start, target):
            result, outputs = v.verify_block(l, inputs)
            if result.verdict != "PASS" or outputs is None:
                raise RecordError(f"cannot regenerate boundary {l + 1}: the strict replay of {result.label} does not "
                                  f"match its digests ({result.headline()}); regeneration needs the hardware the "
                                  "record was made on, and an honest record")
            full = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
            ref = rec.rows[boundary_key(l + 1)]
            if not rec.has_tensor(boundary_key(l + 1)):
                rec.store.put(ref, full)
                done.append(l + 1)
            inputs = outputs
    return sorted(set(done))
