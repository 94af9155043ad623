"""The record-level checks of an inference record (SPEC.md 8.8 steps 1-8): the receipt, the
model (the client's own copy: config, weights and tokenizer) and its run, the layout, the
generation policy, request nonce and seed against the client's, the input (re-tokenised from the
recorded prompt or text with the client's tokenizer, or the client's own image) and the output
(tokens, steps, stop rule, text). Findings are collected on the verifier (`errors`); one that
makes block replays meaningless sets `fatal`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..core.merkle import files_root
from ..core.signing import PublicKey
from ..data.inputs import classification_inputs, image_pixels, prompt_ids
from ..errors import CommitmentMismatch, InputError
from ..models import IMAGE_FAMILIES, TOKENIZER_FILES, tokenizer_files, tokenizer_from_files
from ..training.run import RunRecord
from ..training.transcript import run_root
from .receipt import Receipt, verify_receipt
from .sampling import request_seed
from .stops import first_stop_step, stop_offset

# Tokenizers built from the client's files, by a digest of those files: loading one takes most of a
# second, and a verifier of many records (an audit, a benchmark) reads the same files every time.
_TOKENIZERS: OrderedDict[bytes, object] = OrderedDict()
_TOKENIZERS_LOCK = threading.Lock()
_TOKENIZERS_KEPT = 4


def client_tokenizer(files: dict[str, bytes]):
    """The tokenizer of exactly these files, built once per process for the same bytes."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(files):
        for part in (name.encode(), len(files[name]).to_bytes(8, "big"), files[name]):
            h.update(part)
    key = h.digest()
    with _TOKENIZERS_LOCK:
        if key in _TOKENIZERS:
            _TOKENIZERS.move_to_end(key)
            return _TOKENIZERS[key]
    tokenizer = tokenizer_from_files(files, "your model's tokenizer")
    with _TOKENIZERS_LOCK:
        _TOKENIZERS[key] = tokenizer
        while len(_TOKENIZERS) > _TOKENIZERS_KEPT:
            _TOKENIZERS.popitem(last=False)
    return tokenizer


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(d: bytes) -> str:
    return d.hex()[:16] + "…"


class RecordChecks:
    """Mixed into `InferenceVerifier`: reads `record`, `served`, `blocks`, `client_policy`,
    `client_nonce`; fills `inputs`, `tokens`, and findings through `_error`."""

    def _check_receipt(self, public_key: PublicKey) -> None:
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
        """Your copy of the model against the record: config.json field by field, the tokenizer
        files, and the model digest (weights, config.json, generation_config.json, tokenizer)."""
        rec, served = self.record, self.served
        if served.hf_config != rec.model["config"]:
            diff = sorted(k for k in set(served.hf_config) | set(rec.model["config"])
                          if served.hf_config.get(k) != rec.model["config"].get(k))
            self._error("model", f"the served config.json differs from your model's in the fields {diff[:6]}: the "
                        "provider ran the model under another architecture config")
        mine = self._client_tokenizer_files()
        mine_root = files_root(rec.algorithm, mine).hex() if mine else None
        if rec.model.get("tokenizer") != mine_root:
            self._error("model", "the record's tokenizer is not your model's tokenizer files",
                        expected=str(rec.model.get("tokenizer"))[:16] + "…", actual=str(mine_root)[:16] + "…")
        if served.algorithm != rec.algorithm or served.digest != rec.model_digest:
            self._error("model", "the model's weights are not the ones the record commits to, or its config.json, "
                        "generation_config.json or tokenizer files differ: the served model is not your copy",
                        expected=_short(rec.model_digest), actual=_short(served.digest))

    def _client_tokenizer_files(self) -> dict[str, bytes] | None:
        """The tokenizer files of your model directory (bound by its model digest), or None; read
        once, so that the bytes whose root is compared are the bytes the tokenizer is built from."""
        if not hasattr(self, "_tokenizer_bytes"):
            src = self.served.source
            present = src is not None and any((src.model_dir / n).is_file() for n in TOKENIZER_FILES)
            self._tokenizer_bytes = tokenizer_files(src.model_dir) if present else None
        return self._tokenizer_bytes

    def _check_policy(self) -> None:
        """The committed policy, nonce and seed (SPEC.md 8.8 step 6): the policy digest follows
        from the policy; with yours, the policy equals it field by field and the nonce equals
        yours; a sampled record's seed follows from its nonce, input and policy."""
        rec = self.record
        if rec.task != "causal_lm":
            return
        policy, digest, nonce = rec.policy, rec.policy_digest, rec.request_nonce
        if policy.digest(rec.algorithm) != digest:
            self._error("policy", "generation.policy_digest is not the digest of the committed policy",
                        expected=_short(digest), actual=_short(policy.digest(rec.algorithm)))
        if self.client_policy is not None:
            for line in self.client_policy.describe_differences(policy):
                self._error("policy", f"generation.policy.{line}: the answer was not generated under the policy "
                            "you asked for")
        # the serving dtype (SPEC.md 8.6.1, 8.8 step 6): model.dtype is the dtype the weights were loaded
        # and computed in, and the model digest is over them in that dtype, so a copy of your float32
        # model matches a bfloat16 record's digest too: only the pinned dtype tells them apart
        served = rec.model["dtype"]
        if policy.dtype is not None and policy.dtype != served:
            self._error("policy", f"model.dtype: the record's model was served in {served}, but its own policy pins "
                        f"dtype {policy.dtype}", expected=policy.dtype, actual=served)
        want = self.client_policy.dtype if self.client_policy is not None else None
        if want is not None and want != served:
            self._error("policy", f"model.dtype: the model was served in {served}, your policy pins dtype {want}: "
                        "not the computation you asked for", expected=want, actual=served)
        if (policy.numerics == "portable") != (rec.portable is not None):
            self._error("policy", f"numerics: the committed policy says {policy.numerics}, but the record "
                        f"{'has' if rec.portable is not None else 'has no'} portable logs", fatal=True)
        if self.client_nonce is not None and nonce != self.client_nonce:
            self._error("nonce", f"request_nonce: the record answers nonce {_short(nonce) if nonce else 'none'}, not "
                        f"yours {_short(self.client_nonce)}: another (or a replayed) request")
        seed = rec.seed
        if policy.sampling:
            if nonce is None:
                self._error("seed", "generation.seed: a sampled record without a request nonce: the seed was the "
                            "provider's choice, not derived from your nonce")
            else:
                want = request_seed(rec.algorithm, nonce, rec.declared_digest("input"), digest)
                if seed != want:
                    self._error("seed", f"generation.seed: the record samples with seed {seed}, not {want} derived "
                                "from the request nonce, input and policy: the provider chose the seed")
        elif seed is not None:
            self._error("seed", "generation.seed: a greedy record carries a seed")

    def _check_run(self, public_key, run_dir, transcript) -> None:
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
        """Your model's tokenizer (never the record's copy), loaded once."""
        if getattr(self, "_loaded_tokenizer", None) is None:
            files = self._client_tokenizer_files()
            if files is None:
                raise InputError(f"your model directory {self.served.source.model_dir if self.served.source else ''} "
                                 "has no tokenizer files: the prompt cannot be re-tokenised")
            self._loaded_tokenizer = client_tokenizer(files)
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
            # the record's chat template, unless yours differs (then yours: a hostile one is never rendered)
            template = rec.policy.chat_template
            if self.client_policy is not None and self.client_policy.chat_template != template:
                template = self.client_policy.chat_template
            try:
                ids = prompt_ids(self._tokenizer(), prompt, template)
            except InputError as exc:
                self._error("input", f"the recorded prompt cannot be tokenised: {exc}", fatal=True)
                return
            if not torch.equal(ids, self.inputs["input_ids"]):
                how = " rendered with the chat template" if template is not None else ""
                self._error("input", f"the committed input ids are not the tokens of the recorded prompt{how}: the "
                            "model was run on another prompt", tensor="input/input_ids")
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

    def _check_stop_strings(self, policy, tokens: list[int], out: dict) -> bool:
        """Stop strings (SPEC.md 8.8 step 8): generation stops at the first step whose decoded text
        contains one, not earlier (the caller's truncation check) and not later; `output.stop_offset`
        is where the first one starts. Returns whether the last step is that stop."""
        if not policy.stop:
            if "stop_offset" in out:
                self._error("output", "output.stop_offset is present, and the committed policy has no stop strings")
            return False
        tokenizer = self._tokenizer()

        def decode(ids):
            return tokenizer.decode(ids, skip_special_tokens=True)

        k = first_stop_step(tokens, policy.stop, decode)
        if k is not None and k < len(tokens) - 1:
            at = stop_offset(decode(tokens[:k + 1]), policy.stop)
            self._error("output", f"generation went on after step {k}, whose text already contains a stop string "
                        f"(at character {at}; stop {list(policy.stop)}): {len(tokens) - 1 - k} token(s) past the stop")
        offset = stop_offset(decode(tokens), policy.stop)
        committed = out.get("stop_offset", "absent")
        if not (committed is None or _is_int(committed)) or committed != offset:
            self._error("output", f"output.stop_offset is {str(committed)[:20]}, and the first stop string of the "
                        f"committed text starts at {offset}")
        return k == len(tokens) - 1

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
        policy = rec.policy  # the committed one: compared with yours in _check_policy
        p = self.inputs["input_ids"].shape[1] if "input_ids" in self.inputs else 0
        want_steps = [(0, p)] + [(p + k - 1, 1) for k in range(1, len(tokens))]
        if steps != want_steps or not tokens:
            self._error("output", f"the committed steps {steps[:3]}… do not match a prompt of {p} tokens and "
                        f"{len(tokens)} generated tokens", fatal=True)
            return
        if len(tokens) > policy.max_new_tokens:
            self._error("output", f"{len(tokens)} tokens generated, max_new_tokens is {policy.max_new_tokens}")
        early = [i for i, tok in enumerate(tokens[:-1]) if policy.stops_at(tok)]
        if early:
            self._error("output", f"generation went on after an end-of-sequence token at step {early[0]}")
        stopped = self._check_stop_strings(policy, tokens, out)
        if len(tokens) < policy.max_new_tokens and not policy.stops_at(tokens[-1]) and not stopped:
            self._error("output", f"generation stopped after {len(tokens)} of max_new_tokens {policy.max_new_tokens} "
                        f"tokens without an end-of-sequence token (eos_token_ids {list(policy.eos_token_ids)}, "
                        f"stop_rule {policy.stop_rule})" + (f" or a stop string {list(policy.stop)}" if policy.stop
                                                            else "") + ": a truncated answer")
        text = out.get("text")
        if text != self._tokenizer().decode(tokens, skip_special_tokens=True):
            self._error("output", "the committed text is not the decoding of the committed tokens")
