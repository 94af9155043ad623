"""The client's inference workflow: verify a record, its receipt, or an opened challenge of it.

    import aftune

    request = aftune.InferenceRequest(prompt="Q: What is 3 plus 4? A:", policy=policy)  # what you asked
    verifier = aftune.RecordVerifier(request, model="runs/demo", provider_key="runs/demo/provider.key.pub")
    report = verifier.verify("records")                          # every layer block of the one record
    receipt_report = verifier.verify_receipt("records/receipts/ID.json", record_dir="records")

The record is compared with what the client holds: its own copy of the model (`model`, or `run`
with the provider's key: the run's signed final model), its input, its generation policy and its
request nonce. A check is skipped only by an `Unsafe...` object, and the report says so. A record
that contradicts itself is a FAIL `Report`; bad input raises an `AftuneError`. Nothing prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CommitmentMismatch, InputError
from ..verdict.comparison import MODES, Tolerance
from ..verdict.findings import RECORD, BlockResult, Finding, Report
from . import expect
from .expect import Unsafe, UnsafeSignatureOnly, UnsafeSkipInputCheck, UnsafeSkipPolicyCheck
from .quiet import quiet


@dataclass(frozen=True)
class InferenceRequest:
    """What the client asked: exactly one input (a `prompt` for a causal LM, `text` for an encoder
    classifier, `image` for a vision classifier), the generation `policy` (a GenerationPolicy,
    its JSON or a file path) and the `request_nonce` (hex or bytes; needed when sampling)."""

    prompt: str | None = None
    text: str | None = None
    image: str | Path | None = None
    policy: Any = None
    request_nonce: Any = None

    def __post_init__(self):
        if sum(x is not None for x in (self.prompt, self.text, self.image)) > 1:
            raise InputError("a request has one input: prompt=, text= or image=")
        object.__setattr__(self, "policy", expect.generation_policy(self.policy))
        object.__setattr__(self, "request_nonce", expect.request_nonce(self.request_nonce))

    @property
    def has_input(self) -> bool:
        return (self.prompt, self.text, self.image) != (None, None, None)


def _fail_report(target, mode: str, exc: CommitmentMismatch, check: str = "record") -> Report:
    report = Report(str(target), mode)
    report.errors.append(Finding(-1, 0, check, str(exc), scope=RECORD))
    return report


class RecordVerifier:
    """Verifies inference records against what the client asked, stated once.

    `request`: an InferenceRequest. `model`: the client's own copy of the model (a model or run
    directory); or `run`, the training run the model must be the signed final model of (needs
    `provider_key`). `provider_key`: the provider's public key (checks the receipt and the run).
    `transcript`: the client's copy of the run's transcript. `mode`, `dtype`, `tolerance` as for
    RunVerifier; `max_layers_per_block`: the deepest layer block tolerance defaults widen for.
    `unsafe`: UnsafeSkipInputCheck() and/or UnsafeSkipPolicyCheck()."""

    def __init__(self, request: InferenceRequest, *, model: str | Path | None = None, run: str | Path | None = None,
                 provider_key=None, transcript: str | Path | None = None, mode: str = "strict",
                 dtype: str | None = None, tolerance: Tolerance | None = None, max_layers_per_block: int = 2,
                 unsafe: Iterable[Unsafe] | Unsafe | None = None):
        if not isinstance(request, InferenceRequest):
            raise InputError("request must be an InferenceRequest (what you asked: input, policy, request nonce)")
        skipped = expect.unsafe_set(unsafe, (UnsafeSkipInputCheck, UnsafeSkipPolicyCheck))
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if run is not None and provider_key is None:
            raise InputError("run= needs provider_key= (--run-dir needs --public-key): a run is only evidence under the "
                             "provider's pinned key")
        self.request, self.model, self.run, self.transcript = request, model, run, transcript
        self.provider_key = expect.public_key(provider_key) if provider_key is not None else None
        self.mode, self.dtype, self.tolerance, self.max_layers_per_block = mode, dtype, tolerance, max_layers_per_block
        self.skip_input = UnsafeSkipInputCheck in skipped
        self.skip_policy = UnsafeSkipPolicyCheck in skipped

    def require_request(self, task: str) -> None:
        """No PASS on half a check: the input, and for a causal LM the policy (and, when sampling,
        the nonce), must be the client's, unless an Unsafe object skips that comparison."""
        r, missing = self.request, []
        if self.model is None and self.run is None:
            missing.append("your copy of the model: --model DIR or --run-dir RUN with --public-key (Python: model=, "
                           "or run= with provider_key=)")
        if not r.has_input and not self.skip_input:
            missing.append("the input you sent: --prompt TEXT, --text TEXT or --image FILE (Python: prompt=, text= or "
                           f"image=); or {UnsafeSkipInputCheck.flag} (UnsafeSkipInputCheck())")
        if task == "causal_lm" and not self.skip_policy:
            if r.policy is None:
                missing.append("the generation policy you asked for: --policy FILE, --agreement FILE, or "
                               "--max-new-tokens N [--temperature T --top-p P] (Python: policy=); or "
                               f"{UnsafeSkipPolicyCheck.flag} (UnsafeSkipPolicyCheck())")
            elif r.policy.sampling and r.request_nonce is None:
                missing.append("your request nonce: --request-nonce HEX (Python: request_nonce=; a sampled answer's "
                               f"seed is derived from it); or {UnsafeSkipPolicyCheck.flag} (UnsafeSkipPolicyCheck())")
        if missing:
            raise InputError("the record is compared with what you asked for; give:\n  - " + "\n  - ".join(missing))

    def _verifier(self, record_dir, record_id):
        from ..inference.verify import InferenceVerifier

        r = self.request
        return InferenceVerifier(record_dir, record_id, model=self.model, mode=self.mode, tolerance=self.tolerance,
                                 replay_dtype=self.dtype, public_key=self.provider_key, run_dir=self.run,
                                 transcript=self.transcript, expected_prompt=r.prompt, expected_text=r.text,
                                 expected_image=r.image, policy=r.policy, request_nonce=r.request_nonce,
                                 max_layers_per_block=self.max_layers_per_block)

    def verify(self, record_dir: str | Path, record_id: str | bytes | None = None, *,
               layer_blocks: list[int] | None = None, on_block: Callable[[BlockResult], None] | None = None) -> Report:
        """Replay layer blocks (all when None) of one record and check every token. `record_id` is
        the record's hex id (or a unique prefix); optional when the directory holds one record."""
        from ..inference.record import InferenceRecord

        rid = expect.record_id(record_id)
        with quiet():
            try:
                record = InferenceRecord.open(record_dir, rid)
                self.require_request(record.task)
                v = self._verifier(record_dir, record.record_id.hex())
                return v.verify(layer_blocks, on_block)
            except CommitmentMismatch as exc:  # the record contradicts its own digest
                return _fail_report(record_dir, self.mode, exc)

    def block_count(self, record_dir: str | Path, record_id: str | bytes | None = None) -> int:
        """How many layer blocks `verify` replays by default (for progress bars)."""
        from ..inference.record import InferenceRecord

        record = InferenceRecord.open(record_dir, expect.record_id(record_id))
        return len(record.doc["layout"]["layer_blocks"])  # its structure is checked on open

    def audit(self, bundle: str | Path, challenge, *, on_block=None) -> Report:
        """Replay the challenged layer blocks of an opened inference challenge (`aftune audit`)."""
        from ..errors import RecordError
        from ..inference.record import InferenceRecord
        from ..protocol.audit import audit_inference_bundle
        from ..protocol.challenge import Challenge

        challenge = challenge if isinstance(challenge, Challenge) else Challenge.load(challenge)
        if challenge.kind != "inference":
            raise InputError(f"this is a {challenge.kind} challenge: audit it with RunVerifier.audit")
        if self.model is None:
            raise InputError("auditing an inference record needs your copy of the model or run: --model DIR (Python: "
                             "model=)")
        with quiet():
            try:
                rec = InferenceRecord.open(bundle, challenge.run_root)
            except (InputError, RecordError):
                rec = None  # not (properly) in the bundle: the audit names that as an opening failure
            if rec is not None:
                self.require_request(rec.task)
            r = self.request
            return audit_inference_bundle(bundle, challenge, self.provider_key, self.model, mode=self.mode,
                                          replay_dtype=self.dtype, expected_prompt=r.prompt, expected_text=r.text,
                                          expected_image=r.image, policy=r.policy, request_nonce=r.request_nonce,
                                          on_block=on_block, max_layers_per_block=self.max_layers_per_block)


def verify_receipt(receipt, provider_key, *, record_dir: str | Path | None = None, request_nonce=None, policy=None,
                   unsafe: Iterable[Unsafe] | Unsafe | None = None) -> Report:
    """Check a receipt (a Receipt, its path, or the path of a saved OpenAI-format answer carrying
    one, SPEC.md 8.10.1): signed by the pinned provider key, answering your `request_nonce` under
    your `policy` (each compared when given; the report's notes say which were not), and, with
    `record_dir`, that the record it names agrees; a saved answer must name the receipt's record
    and model and, with `record_dir`, hold exactly the record's text. Without `record_dir`, only
    `UnsafeSignatureOnly()` proceeds. A receipt that fails a check is a FAIL report."""
    from ..inference.openai_wire import check_claims, load_receipt_or_response
    from ..inference.receipt import Receipt, committed_request
    from ..inference.receipt import verify_receipt as check

    skipped = expect.unsafe_set(unsafe, (UnsafeSignatureOnly,))
    if record_dir is None and UnsafeSignatureOnly not in skipped:
        raise InputError("give record_dir=: the record the receipt names is checked too (or UnsafeSignatureOnly() "
                         "to check the signature alone)")
    if record_dir is not None and UnsafeSignatureOnly in skipped:
        raise InputError("give record_dir= or UnsafeSignatureOnly(), not both")
    r, claims = (receipt, None) if isinstance(receipt, Receipt) else load_receipt_or_response(receipt)
    key = expect.public_key(provider_key)
    nonce = expect.request_nonce(request_nonce)
    gen = expect.generation_policy(policy)
    report = Report(str(receipt if not isinstance(receipt, Receipt) else r.record_root.hex()), "strict")
    result = BlockResult(-1, 0, f"receipt for record {r.record_root.hex()[:16]}…", scope=RECORD)
    committed = committed_request(r, record_dir)
    for what, given, value, how in (("request nonce", nonce, committed[0], "request_nonce"),
                                    ("generation policy", gen, committed[1], "policy")):
        if given is None and value is not None:
            report.notes.append(f"the receipt's {what} was not compared with yours ({how})")
    if UnsafeSignatureOnly in skipped:
        report.notes.append(UnsafeSignatureOnly.note)
    with quiet():
        try:
            check(r, key, record_dir, request_nonce=nonce, policy_digest=gen.digest(r.algorithm) if gen else None)
            if claims is not None:
                check_claims(claims, r, record_dir)
            result.compared = 2 + (nonce is not None) + (gen is not None) + (record_dir is not None) + (claims is not None)
        except CommitmentMismatch as exc:
            result.fail("receipt", str(exc))
    report.results.append(result)
    return report
