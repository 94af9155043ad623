"""`aftune` commands for auditable inference; they register on the shared Typer app.

    aftune infer --model runs/demo --prompt "Q: hi" --record-dir records
    aftune verify-inference records --record ID --all --public-key runs/demo/provider.key.pub
    aftune prepare-inference records --record ID --layer-block 2
    aftune verify-receipt records/receipts/ID.json --public-key runs/demo/provider.key.pub --record-dir records
    aftune serve runs/demo --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import _fail, _progress, app, err, escape, fail_on_mismatch, finish_report, out, tolerance_from_options
from ..errors import AftuneError, CommitmentMismatch

_PUBKEY_HELP = "The provider's public key (.pub file or 'ed25519:<hex>'), obtained out of band."
_RECORD_HELP = "Record id (its full digest, or a unique prefix); optional when the directory holds one record."


@app.command()
def infer(
    model: Path = typer.Option(..., "--model", help="Hugging Face model directory, or a run directory from `aftune train` (or its model/)."),
    record_dir: Path = typer.Option(..., "--record-dir", help="Directory of records (created; may hold many)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt for a causal LM."),
    text: Optional[str] = typer.Option(None, "--text", help="Text for an encoder classifier (BERT)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image for a vision classifier (ViT, DINOv2, ResNet)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: seeded sampling."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (committed)."),
    layers_per_block: int = typer.Option(2, "--layers-per-block", help="B_L: layers per layer block."),
    activation_interval: int = typer.Option(1, "--activation-interval", help="I_A: store boundary activations every I_A boundaries."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype (default: the run's, or float32)."),
    hash_algorithm: Optional[str] = typer.Option(None, "--hash", help="blake3 or sha256 (default: the run's, or blake3)."),
    key: Optional[Path] = typer.Option(None, "--key", help="Provider signing key (default: the run's, or RECORD_DIR/provider.key)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result."),
):
    """Run one recorded inference: tokens or label, a record named by its digest, a signed receipt."""
    from ..inference.engine import InferenceEngine
    from ..inference.keys import provider_key
    from ..inference.served import ServedModel
    from ..inference.settings import GenerationSettings, RecordingSettings

    try:
        given = [x for x in (prompt, text, image) if x is not None]
        if len(given) != 1:
            raise AftuneError("give exactly one input: --prompt (causal LM), --text (BERT) or --image (vision)")
        gen = GenerationSettings(max_new_tokens, temperature, top_p, seed).validate()
        settings = RecordingSettings(layers_per_block, activation_interval).validate()
        signing_key, pub = provider_key(key, model, record_dir)
        served = ServedModel.load(model, dtype=dtype, hash_algorithm=hash_algorithm)
        engine = InferenceEngine(served, record_dir, signing_key, settings)
        if prompt is not None:
            with _progress() as bar:
                task = bar.add_task("generating", total=max_new_tokens, note="")
                result = engine.generate(prompt, gen, on_token=lambda done, total: bar.update(task, completed=done))
        else:
            result = engine.classify(text=text, image=image)
    except AftuneError as exc:
        _fail(exc)
    rid = result.record_id.hex()
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
    out.print(f"provider public key: {pub} ({signing_key.public_key.text})", highlight=False, soft_wrap=True)


@app.command("verify-inference")
def verify_inference(
    record_dir: Path = typer.Argument(..., help="The record directory."),
    record: Optional[str] = typer.Option(None, "--record", "-r", help=_RECORD_HELP),
    model: Optional[Path] = typer.Option(None, "--model", help="Your copy of the model (directory or run directory); default: the one the record names."),
    layer_block: Optional[int] = typer.Option(None, "--layer-block", "-l"),
    all_blocks: bool = typer.Option(False, "--all", help="Verify every layer block."),
    mode: str = typer.Option("strict", "--mode", help="strict (bitwise) or tolerance."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Replay in this dtype (tolerance mode): float32 or float64."),
    rel_l2: Optional[float] = typer.Option(None, "--rel-l2", help="Tolerance: max relative L2 error per activation (default by record dtype)."),
    max_elem: Optional[float] = typer.Option(None, "--max-elem", help="Tolerance: max element error / rms (default by record dtype)."),
    logit_tol: Optional[float] = typer.Option(None, "--logit-tol", help="Tolerance: logit error / largest |logit| for token checks."),
    public_key: Optional[str] = typer.Option(None, "--public-key", help=_PUBKEY_HELP + " Checks the receipt (and --run)."),
    run: Optional[Path] = typer.Option(None, "--run", help="The training run the model must come from (needs --public-key)."),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help="Your own copy of the run's transcript."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Your prompt: the record must answer it."),
    text: Optional[str] = typer.Option(None, "--text", help="Your text (classifiers)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Your image (vision classifiers)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
):
    """Replay layer blocks of an inference record and check every token. Exit 0 PASS, 1 FAIL, 2 bad input."""
    from ..core.signing import PublicKey
    from ..inference.record import InferenceRecord
    from ..inference.verify import InferenceVerifier
    from ..verdict.policy import Tolerance

    try:
        if all_blocks == (layer_block is not None):
            raise AftuneError("give either --all or --layer-block")
        if run is not None and public_key is None:
            raise AftuneError("--run needs --public-key: a run is only evidence under the provider's pinned key")
        key = PublicKey.load(public_key) if public_key else None
        tol = None
        if mode == "tolerance" or (rel_l2, max_elem, logit_tol) != (None, None, None):
            base = Tolerance.for_dtype(InferenceRecord.open(record_dir, record).model["dtype"])
            tol = tolerance_from_options(mode, base, None, rel_l2, max_elem, logit_tol)
        v = InferenceVerifier(record_dir, record, model=model, mode=mode, tolerance=tol, replay_dtype=dtype,
                              public_key=key, run_dir=run, transcript=transcript, expected_prompt=prompt,
                              expected_text=text, expected_image=image)
        if all_blocks:
            with _progress() as bar:
                task = bar.add_task("verifying", total=len(v.blocks), note="")
                report = v.verify(None, lambda r: bar.update(task, advance=1, note=r.verdict))
        else:
            report = v.verify([layer_block])
    except CommitmentMismatch as exc:  # the record contradicts its own digest
        fail_on_mismatch(exc, as_json)
    except AftuneError as exc:
        _fail(exc)
    doc = report.to_json()
    doc["record_id"] = v.record.record_id.hex()
    heading = f"record {doc['record_id']}"
    if public_key is None:
        heading += "\nnote: no --public-key, so the receipt's signature was not checked"
    finish_report(report, doc, as_json, heading=heading)


@app.command("prepare-inference")
def prepare_inference(
    record_dir: Path = typer.Argument(...),
    record: Optional[str] = typer.Option(None, "--record", "-r", help=_RECORD_HELP),
    model: Optional[Path] = typer.Option(None, "--model", help="The model (default: the one the record names)."),
    layer_block: Optional[int] = typer.Option(None, "--layer-block", "-l", help="Only what this block needs (default: every missing boundary)."),
):
    """Regenerate boundary activations committed by digest only (I_A > 1) from the nearest stored one."""
    from ..inference.regenerate import prepare_inference as run_prepare

    try:
        done = run_prepare(record_dir, record, layer_block, model)
    except AftuneError as exc:
        _fail(exc)
    if done:
        out.print(f"regenerated boundaries {done}; every tensor matched its committed digests", highlight=False)
    else:
        out.print("nothing to regenerate: the boundaries are stored", highlight=False)


@app.command("verify-receipt")
def verify_receipt(
    receipt: Path = typer.Argument(..., help="A receipt file (JSON)."),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    record_dir: Optional[Path] = typer.Option(None, "--record-dir", help="Also check the record it names."),
):
    """Check a receipt's signature (and, with --record-dir, that its record agrees). Exit 0 valid, 1 invalid."""
    from ..inference.receipt import Receipt
    from ..inference.receipt import verify_receipt as check
    from ..core.signing import PublicKey

    try:
        r = Receipt.load(receipt)
        check(r, PublicKey.load(public_key), record_dir)
    except CommitmentMismatch as exc:
        out.print(f"[bold red]INVALID:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except AftuneError as exc:
        _fail(exc)
    out.print(f"VALID receipt for record {r.record_root.hex()} (model {r.model_digest.hex()[:16]}…, {r.time})"
              + (", record agrees" if record_dir else ""), highlight=False, soft_wrap=True)


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., help="A run directory from `aftune train` (or a model directory)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    record_dir: Optional[Path] = typer.Option(None, "--record-dir", help="Where records go (default: RUN/inference)."),
    key: Optional[Path] = typer.Option(None, "--key", help="Provider signing key (default: the run's)."),
    layers_per_block: int = typer.Option(2, "--layers-per-block"),
    activation_interval: int = typer.Option(1, "--activation-interval"),
    max_new_tokens_limit: int = typer.Option(512, "--max-new-tokens-limit", help="Largest max_new_tokens a request may ask."),
):
    """Serve the model over HTTP: POST /v1/generate, GET /v1/model, GET /v1/records/{id}."""
    from ..inference.engine import InferenceEngine
    from ..inference.keys import provider_key
    from ..inference.serve import create_app, run_server
    from ..inference.served import ServedModel
    from ..inference.settings import RecordingSettings

    try:
        rdir = record_dir or (run_dir / "inference")
        signing_key, pub = provider_key(key, run_dir, rdir)
        engine = InferenceEngine(ServedModel.load(run_dir), rdir, signing_key,
                                 RecordingSettings(layers_per_block, activation_interval).validate())
        application = create_app(engine, max_new_tokens_limit=max_new_tokens_limit)
    except AftuneError as exc:
        _fail(exc)
    err.print(f"serving model {engine.served.digest.hex()[:16]}… on http://{host}:{port} "
              f"(records in {rdir}, public key {pub})", highlight=False)
    run_server(application, host, port)
