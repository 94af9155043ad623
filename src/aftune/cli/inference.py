"""`aftune` commands for auditable inference; they register on the shared Typer app.

    aftune infer --model runs/demo --prompt "Q: hi" --record-dir records --policy policy.json
    aftune verify-inference records --all --run-dir runs/demo --public-key runs/demo/provider.key.pub \\
        --prompt "Q: hi" --policy policy.json [--request-nonce HEX]
    aftune prepare-inference records --record ID --layer-block 2 --model runs/demo
    aftune verify-receipt records/receipts/ID.json --public-key runs/demo/provider.key.pub --record-dir records

`aftune serve`, `aftune serve-keys` and `aftune policy` are in `serving.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import AftuneError, InputError
from .app import (_PUBKEY_HELP, _QUIET_HELP, _progress, app, err, escape, finish_report, mismatch_reads, out,
                  tolerance_from_options)
from .options import deprecated_flags

_RECORD_HELP = "Record id (its full digest, or a unique prefix); optional when the directory holds one record."
_POLICY_HELP = "The generation policy you asked for (aftune.generation-policy.v2, or v1; write one with `aftune policy`)."
_AGREEMENT_HELP = "Your agreement.json: its 'inference' member is the generation policy you asked for."
_MAX_NEW_HELP = "The max_new_tokens you asked for (at most the policy's); without a policy file: a greedy policy."
_NONCE_HELP = "Your request nonce (hex, 16 to 64 bytes): sampled answers derive their seed from it."


def client_policy(model, policy: Optional[Path], agreement: Optional[Path],
                  max_new_tokens: Optional[int], temperature: Optional[float] = None, top_p: Optional[float] = None):
    """The generation policy from --policy FILE, --agreement FILE (its 'inference' member), or
    flags (greedy unless --temperature, the end-of-sequence tokens of the model's config.json);
    --max-new-tokens narrows a file's policy to one request. None when nothing says one."""
    from ..core import jsonio
    from ..inference.policy import GenerationPolicy

    if policy is not None and agreement is not None:
        raise InputError("give --policy or --agreement, not both")
    doc = None
    if policy is not None:
        doc, what = jsonio.read_json(policy, 1 << 20, "generation policy", InputError), f"generation policy {policy}"
    elif agreement is not None:
        from ..training.agreement import Agreement

        doc = Agreement.load(agreement).inference  # the whole agreement is read and validated (SPEC 4.5)
        if doc is None:
            raise InputError(f"agreement {agreement} states no generation policy (its 'inference' member): give "
                             "--policy FILE")
        what = f"agreement {agreement}: inference"
    if doc is not None:
        if temperature is not None or top_p is not None:
            raise InputError("--temperature and --top-p are fields of the policy file: edit it, or drop the file")
        p = GenerationPolicy.from_json(doc, what)
        return p.with_max_new_tokens(max_new_tokens) if max_new_tokens is not None else p
    if (max_new_tokens, temperature, top_p) == (None, None, None):
        return None
    if model is None:
        raise InputError("a policy from flags takes its end-of-sequence tokens from the model: give --model or --run")
    values = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p))
              if v is not None}
    return GenerationPolicy.for_model(model, **values)


def request_nonce(text: Optional[str]):
    from ..inference.policy import parse_request_nonce

    return parse_request_nonce(text.strip().lower(), "--request-nonce") if text is not None else None


@app.command()
@deprecated_flags({"--nonce": "--request-nonce", "--key": "--provider-signing-key"})
def infer(
    model: Path = typer.Option(..., "--model", help="Hugging Face model directory, or a run directory from `aftune train` (or its model/)."),
    record_dir: Path = typer.Option(..., "--record-dir", help="Directory of records (created; may hold many)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt for a causal LM."),
    text: Optional[str] = typer.Option(None, "--text", help="Text for an encoder classifier (BERT)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image for a vision classifier (ViT, DINOv2, ResNet)."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="The client's generation policy file."),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help="The agreement whose 'inference' policy to follow."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Tokens to generate at most.", show_default="the policy's, or 32"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0: greedy; > 0: sampling (needs --request-nonce)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass."),
    request_nonce_hex: Optional[str] = typer.Option(None, "--request-nonce", help="The client's request nonce (hex); sampling derives its seed from it."),
    layers_per_block: int = typer.Option(2, "--layers-per-block", help="B_L: layers per layer block."),
    activation_interval: int = typer.Option(0, "--activation-interval", help="I_A: store boundary activations every I_A boundaries; 0: store none, regenerate them when challenged."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute (serving) dtype; a policy that pins another is an error.", show_default="the policy's, the run's, or float32"),
    hash_algorithm: Optional[str] = typer.Option(None, "--hash", help="blake3 or sha256.", show_default="the run's, or blake3"),
    provider_signing_key: Optional[Path] = typer.Option(None, "--provider-signing-key", help="The provider's private signing key.", show_default="the run's, or RECORD_DIR/provider.key"),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result."),
):
    """Run one recorded inference: tokens or label, a record named by its digest, a signed receipt.
    A policy that pins the serving dtype loads the model in it; a portable policy records in
    portable numerics (SPEC.md 8.13)."""
    from ..inference.engine import InferenceEngine, load_served
    from ..inference.keys import provider_key
    from ..inference.settings import RecordingSettings

    given = [x for x in (prompt, text, image) if x is not None]
    if len(given) != 1:
        raise AftuneError("give exactly one input: --prompt (causal LM), --text (BERT) or --image (vision)")
    nonce_bytes = request_nonce(request_nonce_hex)
    settings = RecordingSettings(layers_per_block, activation_interval).validate()
    gen = None
    if prompt is not None and (policy is not None or agreement is not None):  # the file's policy: before loading
        gen = client_policy(None, policy, agreement, max_new_tokens, temperature, top_p)
    signing_key, pub = provider_key(provider_signing_key, model, record_dir)
    served = load_served(model, gen, dtype=dtype, hash_algorithm=hash_algorithm)
    if prompt is not None and gen is None:  # a policy from flags: the served model's (its dtype is the served one)
        gen = client_policy(served, None, None, max_new_tokens, temperature, top_p) or client_policy(served, None,
                                                                                                    None, 32)
    engine = InferenceEngine(served, record_dir, signing_key, settings)
    if prompt is not None:
        with _progress() as bar:
            task = bar.add_task("generating", total=gen.max_new_tokens, note="")
            result = engine.generate(prompt, gen, request_nonce=nonce_bytes,
                                     on_token=lambda done, total: bar.update(task, completed=done))
    else:
        result = engine.classify(text=text, image=image, request_nonce=nonce_bytes)
    rid = result.record_id
    if as_json:
        out.print_json(json.dumps({"record_id": rid, "text": result.text, "tokens": list(result.tokens),
                                   "label": result.label, "label_name": result.label_name,
                                   "receipt": result.receipt.to_json(), "record": str(result.record_path)}))
        return
    if result.text is not None:
        out.print(f"text:    {escape(repr(result.text))}", highlight=False)
        out.print(f"tokens:  {list(result.tokens)}", highlight=False)
    else:
        out.print(f"label:   {result.label}" + (f" ({escape(result.label_name)})" if result.label_name else ""),
                  highlight=False)
    out.print(f"record:  {result.record_path}", highlight=False, soft_wrap=True)
    out.print(f"receipt: {result.receipt_path}", highlight=False, soft_wrap=True)
    out.print(f"model:   {served.digest.hex()}" + (" (the run's final model)" if served.run else ""), highlight=False,
              soft_wrap=True)
    if gen is not None:
        out.print(f"policy:  {gen.digest(served.algorithm).hex()}", highlight=False, soft_wrap=True)
    out.print(f"provider public key: {pub} ({signing_key.public_key.text})", highlight=False, soft_wrap=True)


@app.command("verify-inference")
@deprecated_flags({"--run": "--run-dir"})
def verify_inference(
    record_dir: Path = typer.Argument(..., help="The record directory."),
    record: Optional[str] = typer.Option(None, "--record", "-r", help=_RECORD_HELP),
    model: Optional[Path] = typer.Option(None, "--model", help="Your own copy of the model (model or run directory)."),
    layer_block: Optional[int] = typer.Option(None, "--layer-block", "-l", help="The layer block to verify (index, from 0)."),
    all_blocks: bool = typer.Option(False, "--all", help="Verify every layer block."),
    mode: str = typer.Option("strict", "--mode", help="strict (bitwise) or tolerance."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Replay in this dtype (tolerance mode): float32 or float64."),
    rel_l2: Optional[float] = typer.Option(None, "--rel-l2", help="Tolerance: max relative L2 error per activation.", show_default="by record dtype"),
    max_elem: Optional[float] = typer.Option(None, "--max-elem", help="Tolerance: max element error / rms.", show_default="by record dtype"),
    logit_tol: Optional[float] = typer.Option(None, "--logit-tol", help="Tolerance: logit error / largest |logit| for token checks."),
    max_layers_per_block: int = typer.Option(2, "--max-layers-per-block", help="Tolerance: the deepest layer block (layers the record chose per block) the default thresholds widen for."),
    public_key: Optional[str] = typer.Option(None, "--public-key", help=_PUBKEY_HELP + " Checks the receipt (and --run-dir)."),
    run: Optional[Path] = typer.Option(None, "--run-dir", help="The training run the model must come from (needs --public-key); its model/ is your copy unless --model."),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help="Your own copy of the run's transcript."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Your prompt: the record must answer it."),
    text: Optional[str] = typer.Option(None, "--text", help="Your text (classifiers)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Your image (vision classifiers)."),
    policy: Optional[Path] = typer.Option(None, "--policy", help=_POLICY_HELP),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help=_AGREEMENT_HELP),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help=_MAX_NEW_HELP),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Without a policy file: the temperature you asked for."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Without a policy file: the top_p you asked for."),
    nonce: Optional[str] = typer.Option(None, "--request-nonce", help=_NONCE_HELP),
    unsafe_skip_input: bool = typer.Option(False, "--unsafe-skip-input-check", help="UNSAFE: do not compare the record's input with yours."),
    unsafe_skip_policy: bool = typer.Option(False, "--unsafe-skip-policy-check", help="UNSAFE: do not compare the record's generation policy and request nonce with yours."),
    response: Optional[Path] = typer.Option(None, "--response", help="A saved OpenAI-format answer: its receipt (needs --public-key), record and text are checked, and it names the record."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
):
    """Replay layer blocks of an inference record and check every token against what you asked.
    Exit 0 PASS, 1 FAIL, 2 bad input."""
    from ..inference.record import InferenceRecord
    from ..inference.thresholds import default_tolerance
    from ..workflows import InferenceRequest, RecordVerifier

    if all_blocks == (layer_block is not None):
        raise AftuneError("give either --all or --layer-block")
    claims = None
    if response is not None:
        claims = _response_checked(response, record, record_dir, public_key, nonce, model or run, policy, agreement,
                                   max_new_tokens, temperature, top_p)
        record = claims.record_id
    rec = InferenceRecord.open(record_dir, record)
    tol = None  # the verifier's defaults (default_tolerance), unless a threshold is given
    if (rel_l2, max_elem, logit_tol) != (None, None, None):
        base = default_tolerance(rec, dtype, max_layers_per_block)[0] if mode == "tolerance" else None
        tol = tolerance_from_options(mode, base, None, rel_l2, max_elem, logit_tol)
    gen = None
    if model is not None or run is not None or policy is not None or agreement is not None:
        gen = client_policy(model or run, policy, agreement, max_new_tokens, temperature, top_p)
    request = InferenceRequest(prompt=prompt, text=text, image=image, policy=gen, request_nonce=request_nonce(nonce))
    verifier = RecordVerifier(request, model=model, run=run, provider_key=public_key, transcript=transcript, mode=mode,
                              dtype=dtype, tolerance=tol, max_layers_per_block=max_layers_per_block,
                              unsafe=unsafe_options(unsafe_skip_input, unsafe_skip_policy))
    rid = rec.record_id.hex()
    if all_blocks:
        with _progress(quiet) as bar:
            task = bar.add_task("verifying", total=verifier.block_count(record_dir, rid), unit="blocks", note="")
            report = verifier.verify(record_dir, rid, on_block=lambda r: bar.update(task, advance=1, note=r.verdict))
    else:
        report = verifier.verify(record_dir, rid, layer_blocks=[layer_block])
    doc = report.to_json()
    doc["record_id"] = rid
    finish_report(report, doc, as_json, heading=f"record {rid}")


def _response_checked(response, record, record_dir, public_key, nonce, model, policy, agreement, max_new_tokens,
                      temperature, top_p):
    """A saved OpenAI-format answer (`--response`): its receipt verifies under the pinned key, for
    your nonce and policy, agrees with the record it names, and its text is the record's."""
    from ..core.signing import PublicKey
    from ..inference.openai_wire import check_claims, load_receipt_or_response
    from ..inference.receipt import verify_receipt as check

    receipt, claims = load_receipt_or_response(response)
    if claims is None:
        raise InputError(f"--response {response} is a receipt, not a saved answer: give the answer's JSON")
    if public_key is None:
        raise InputError("--response needs --public-key: the answer's receipt is checked against the provider's key")
    if record is not None and record != claims.record_id:
        raise InputError(f"--record {record[:16]} is not the record the answer names ({claims.record_id[:16]}…)")
    gen = None
    if model is not None or policy is not None or agreement is not None:
        gen = client_policy(model, policy, agreement, max_new_tokens, temperature, top_p)
    check(receipt, PublicKey.load(public_key), record_dir, request_nonce=request_nonce(nonce),
          policy_digest=gen.digest(receipt.algorithm) if gen else None)
    check_claims(claims, receipt, record_dir)
    return claims


def unsafe_options(skip_input: bool, skip_policy: bool) -> list:
    """The Unsafe objects the --unsafe-skip-... flags name, each announced on stderr."""
    from ..workflows import UnsafeSkipInputCheck, UnsafeSkipPolicyCheck

    chosen = [u() for u, on in ((UnsafeSkipInputCheck, skip_input), (UnsafeSkipPolicyCheck, skip_policy)) if on]
    for u, what in ((UnsafeSkipInputCheck, "the input"), (UnsafeSkipPolicyCheck, "the generation policy and request "
                                                                                  "nonce")):
        if any(isinstance(c, u) for c in chosen):
            err.print(f"[yellow]warning:[/] {u.flag}: {what} will not be compared with yours", highlight=False)
    return chosen


@app.command("prepare-inference")
def prepare_inference(
    record_dir: Path = typer.Argument(..., help="The record directory."),
    record: Optional[str] = typer.Option(None, "--record", "-r", help=_RECORD_HELP),
    model: Path = typer.Option(..., "--model", help="Your copy of the model (model or run directory)."),
    layer_block: Optional[int] = typer.Option(None, "--layer-block", "-l", help="Only what this layer block needs (index).", show_default="every missing boundary"),
):
    """Regenerate boundary activations committed by digest only (I_A > 1) from the nearest stored one."""
    from ..inference.regenerate import prepare_inference as run_prepare

    done = run_prepare(record_dir, record, layer_block, model)
    if done:
        out.print(f"regenerated boundaries {done}; every tensor matched its committed digests", highlight=False)
    else:
        out.print("nothing to regenerate: the boundaries are stored", highlight=False)


_MEASUREMENT = typer.Option([], "--measurement", help="Attestation: reference value NAME=HEX (rim, mrtd, mrenclave, ...).")
_PLATFORM_KEY = typer.Option([], "--platform-key", help="Attestation: trusted Arm CCA platform key, PEM (repeatable).")


@app.command("verify-receipt")
@deprecated_flags({"--nonce": "--attestation-nonce"})
@mismatch_reads("INVALID")
def verify_receipt(
    receipt: Path = typer.Argument(..., help="A receipt file (JSON), or a saved OpenAI-format answer carrying one (its text is then checked against the record)."),
    public_key: Optional[str] = typer.Option(None, "--public-key", help=_PUBKEY_HELP + " (With --attestation: optional, compared with the attested key.)"),
    record_dir: Optional[Path] = typer.Option(None, "--record-dir", help="The record directory: the record the receipt names must agree."),
    unsafe_signature_only: bool = typer.Option(False, "--unsafe-signature-only", help="UNSAFE: check the signature only, not the record."),
    nonce: Optional[str] = typer.Option(None, "--request-nonce", help="Your request nonce: the receipt must answer it."),
    policy: Optional[Path] = typer.Option(None, "--policy", help=_POLICY_HELP + " Its digest must be the receipt's."),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help=_AGREEMENT_HELP),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="The max_new_tokens you asked for (with --policy or --agreement)."),
    attestation: Optional[Path] = typer.Option(None, "--attestation", help="The server's GET /v1/attestation answer (JSON)."),
    attestation_nonce: Optional[str] = typer.Option(None, "--attestation-nonce", help="The nonce you sent to /v1/attestation (hex)."),
    model_digest: Optional[str] = typer.Option(None, "--model-digest", help="The agreed model digest (the run's final model): the attested one must equal it."),
    collateral: Optional[Path] = typer.Option(None, "--collateral", help="Attestation: Intel collateral JSON."),
    platform_key: List[Path] = _PLATFORM_KEY,
    measurement: List[str] = _MEASUREMENT,
    accept_tcb: List[str] = typer.Option([], "--accept-tcb", help="Attestation: Intel TCB status to accept besides UpToDate."),
    unsafe_root_ca: Optional[Path] = typer.Option(None, "--unsafe-root-ca", help="UNSAFE: replace the pinned Intel/NVIDIA root."),
    unsafe_allow_debug: bool = typer.Option(False, "--unsafe-allow-debug", help="UNSAFE: accept debug enclaves/TDs."),
    unsafe_accept_simulated: bool = typer.Option(False, "--unsafe-accept-simulated", help="UNSAFE: accept simulated evidence (no TEE)."),
):
    """Check a receipt's signature, that it answers your request and policy, and that its record
    agrees; with --attestation, the chain evidence -> model and receipt key -> receipt -> record.
    Exit 0 valid, 1 invalid, 2 bad input."""
    from ..inference.openai_wire import check_claims, load_receipt_or_response
    from ..inference.receipt import committed_request, verify_receipt as check
    from ..core.signing import PublicKey

    if record_dir is None and not unsafe_signature_only:
        raise InputError("give --record-dir R: the record the receipt names is checked too (or "
                         "--unsafe-signature-only to check the signature alone)")
    if record_dir is not None and unsafe_signature_only:
        raise InputError("give --record-dir or --unsafe-signature-only, not both")
    if public_key is None and attestation is None:
        raise InputError("give --public-key (the provider's pinned key), or --attestation with --attestation-nonce and "
                         "--model-digest (a key attested by the serving TEE)")
    r, claims = load_receipt_or_response(receipt)
    gen = client_policy(None, policy, agreement, max_new_tokens) if (policy or agreement) else None
    if gen is None and max_new_tokens is not None:
        raise InputError("--max-new-tokens narrows a policy: give --policy or --agreement too")
    wanted = dict(request_nonce=request_nonce(nonce), policy_digest=gen.digest(r.algorithm) if gen else None)
    if unsafe_signature_only:
        err.print("[yellow]warning:[/] --unsafe-signature-only: the record is not checked", highlight=False)
    if attestation is not None:  # a receipt or chain that does not hold raises CommitmentMismatch: INVALID
        report = _attested(r, attestation, attestation_nonce, model_digest, public_key, record_dir,
                           (collateral, platform_key, measurement, accept_tcb, unsafe_root_ca, unsafe_allow_debug,
                            unsafe_accept_simulated))
        check(r, r.key, record_dir, **wanted)  # the attested chain checked the signature; now your request
    else:
        check(r, PublicKey.load(public_key), record_dir, **wanted)
    if claims is not None:  # a saved answer: it is the receipt's, and its text the record's
        check_claims(claims, r, record_dir)
    committed = committed_request(r, record_dir)
    for what, given, value, how in (("request nonce", nonce, committed[0], "--request-nonce"),
                                    ("generation policy", gen, committed[1], "--policy or --agreement")):
        if given is None and value is not None:
            out.print(f"[yellow]note: the receipt's {what} was not compared with yours ({how})[/]", highlight=False)
    if attestation is not None:
        from .attestation import _chain_finish

        _chain_finish(report, False, require_pass=False)
    out.print(f"VALID receipt for record {r.record_root.hex()} (model {r.model_digest.hex()[:16]}…, {r.time})"
              + (", record agrees" if record_dir else "")
              + ((", the answer's text is the record's" if record_dir else ", the answer's text NOT compared (no "
                  "--record-dir)") if claims else ""), highlight=False, soft_wrap=True)


def _attested(r, attestation, attestation_nonce, model_digest, public_key, record_dir, options):
    """The attested-serving chain for receipt `r` (SPEC.md 10.5)."""
    from ..attestation.claims import parse_nonce
    from ..attestation.serving import ServingEvidence, check_serving
    from ..core.encoding import parse_hex_digest
    from ..core.signing import PublicKey
    from .attestation import endorsements_from_options, policy_from_options

    collateral, platform_key, measurement, accept_tcb, unsafe_root_ca, unsafe_allow_debug, unsafe_sim = options
    if attestation_nonce is None or model_digest is None:
        raise InputError("--attestation needs --attestation-nonce (the nonce you sent to /v1/attestation) and "
                         "--model-digest (the agreed model digest)")
    return check_serving(ServingEvidence.load(attestation), nonce=parse_nonce(attestation_nonce.strip().lower()),
                         expected_model_digest=parse_hex_digest(model_digest.strip().lower(), "--model-digest"),
                         receipt=r, pinned_receipt_key=PublicKey.load(public_key) if public_key else None,
                         record_dir=record_dir,
                         policy=policy_from_options(measurement, accept_tcb, [], unsafe_allow_debug, unsafe_sim),
                         endorsements=endorsements_from_options(collateral, platform_key, unsafe_root_ca))
