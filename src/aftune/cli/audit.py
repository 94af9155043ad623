"""`aftune open` and `aftune audit`: the provider opens a challenge, the client audits it.

    aftune open RUN --challenge challenge.json --out bundle/             # provider
    aftune audit bundle/ --transcript my-transcript.jsonl --challenge challenge.json --public-key provider.pub
    aftune audit RUN --public-key PUB --sample-rate 0.1                  # all three steps, locally
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import typer

from .app import (_AGREEMENT_HELP, _PUBKEY_HELP, _QUIET_HELP, _UNSAFE_AGREEMENT_HELP, _progress, app, finish_report,
                  load_agreement, out, tolerance_from_options)
from .options import deprecated_flags
from ..errors import CommitmentMismatch, InputError


_BASE_MODEL_HELP = ("Training runs with digest-only boundaries: the agreed base model, to regenerate what the "
                    "challenged blocks read when no later checkpoint is stored.")


@app.command("open")
def open_(
    run_dir: Path = typer.Argument(..., help="The provider's run directory (or record directory, for inference)."),
    challenge: Path = typer.Option(..., "--challenge", help="The client's challenge (aftune challenge)."),
    out_dir: Path = typer.Option(..., "--out", help="New directory for the bundle."),
    model: Optional[Path] = typer.Option(None, "--model", help="Inference: the served model.", show_default="the record's"),
    base_model: Optional[Path] = typer.Option(None, "--base-model", help=_BASE_MODEL_HELP, show_default="the built-in tiny Llama"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
):
    """Open the challenged blocks: a bundle with exactly what their replay needs, and proofs."""
    from ..protocol.opening import open_bundle
    from ..protocol.challenge import Challenge

    c = Challenge.load(challenge)
    if c.kind == "inference":
        from ..protocol.opening import open_inference_bundle

        summary = open_inference_bundle(run_dir, c, out_dir, model=model)
        out.print(f"bundle written to {out_dir}: {summary['blocks']} layer blocks, {summary['tensors']} tensors")
        return
    _check_run_root(c, run_dir / "transcript.jsonl", None, run_dir / "config.json")
    with _progress(quiet) as bar:
        task = bar.add_task("opening", total=len(c.blocks), unit="blocks", note="")
        summary = open_bundle(run_dir, c, out_dir, progress=lambda done, total: bar.update(task, completed=done),
                              base_model=base_model)
    out.print(f"bundle written to {out_dir}: {summary['blocks']} blocks, {summary['tensors']} tensors, "
              f"{summary['bytes'] / 1e6:.1f} MB")


def _check_run_root(challenge, transcript_path: Path, public_key, config_path: Path | None = None) -> None:
    from ..training.transcript import Transcript

    key = public_key or Transcript.header_key(transcript_path)
    t = Transcript.load(transcript_path, key)
    if challenge.kind != "training":
        raise InputError(f"this is an {challenge.kind} challenge; open and audit take training challenges here")
    if t.run is None or t.run.root.hex() != challenge.run_root:
        raise CommitmentMismatch("the challenge was drawn from another run root than this transcript signs: the "
                                 "transcript was re-signed after the challenge, or belongs to another run")
    if challenge.num_step_blocks != len(t.step_blocks) - 1:
        raise CommitmentMismatch("the challenge's grid does not match the transcript's step blocks")
    if config_path is not None and config_path.is_file():
        from ..training.run import signed_run_config

        layer_blocks = (signed_run_config(config_path, t).get("layout") or {}).get("layer_blocks")
        if not isinstance(layer_blocks, list) or len(layer_blocks) != challenge.num_layer_blocks:
            raise CommitmentMismatch("the challenge's grid does not match the run's layer blocks")


@app.command()
@deprecated_flags({"--blocks": "--sample-blocks"})
def audit(
    target: Path = typer.Argument(..., help="A bundle (from aftune open), or a run directory to audit locally."),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help=_AGREEMENT_HELP + " (training runs)"),
    unsafe_no_agreement: bool = typer.Option(False, "--unsafe-no-agreement", help=_UNSAFE_AGREEMENT_HELP),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help="Your copy of the transcript (bundle mode)."),
    challenge: Optional[Path] = typer.Option(None, "--challenge", help="Your challenge (bundle mode)."),
    sample_rate: Optional[float] = typer.Option(None, "--sample-rate", help="Local mode: fraction of blocks to check."),
    sample_blocks: Optional[int] = typer.Option(None, "--sample-blocks", help="Local mode: number of blocks to check (K)."),
    strategy: str = typer.Option("uniform", "--strategy", help="Local mode: uniform, weighted, stratified or all."),
    mode: str = typer.Option("strict", "--mode", help="strict (bitwise) or tolerance."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Replay in this dtype (tolerance mode)."),
    tolerance_file: Optional[Path] = typer.Option(None, "--tolerance", help="Per-kind thresholds from `aftune calibrate --out`."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Local processes.", show_default="as many replays as the cores run at full speed: cores / the recorded threads in strict mode, one per core in tolerance mode"),
    ray: Optional[str] = typer.Option(None, "--ray", help="Verify on an existing Ray cluster at this address (its head's HOST:PORT): one task per block, spread over the nodes; see docs/ray.md."),
    report_json: Optional[Path] = typer.Option(None, "--report-json", help="Write the JSON report here."),
    report_html: Optional[Path] = typer.Option(None, "--report-html", help="Write a self-contained HTML report."),
    report_png: Optional[Path] = typer.Option(None, "--report-png", help="Write a PNG of the block grid."),
    model: Optional[Path] = typer.Option(None, "--model", help="Inference: your copy of the model (or run directory)."),
    base_model: Optional[Path] = typer.Option(None, "--base-model", help="Local mode: " + _BASE_MODEL_HELP, show_default="the built-in tiny Llama"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Inference: your prompt, which the record must answer."),
    text: Optional[str] = typer.Option(None, "--text", help="Inference: your text (classifiers)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Inference: your image (vision classifiers)."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Inference: the generation policy you asked for (or --agreement)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Inference: the max_new_tokens you asked for."),
    request_nonce: Optional[str] = typer.Option(None, "--request-nonce", help="Inference: your request nonce (hex)."),
    max_layers_per_block: int = typer.Option(2, "--max-layers-per-block", help="Inference, tolerance: the deepest layer block the default thresholds widen for."),
    unsafe_skip_input: bool = typer.Option(False, "--unsafe-skip-input-check", help="UNSAFE (inference): do not compare the record's input with yours."),
    unsafe_skip_policy: bool = typer.Option(False, "--unsafe-skip-policy-check", help="UNSAFE (inference): do not compare the generation policy and request nonce."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
):
    """Verify an opened challenge (or challenge, open and verify a run locally). Exit 0 PASS, 1 FAIL, 2 bad input."""
    from ..protocol.audit import audit_bundle
    from ..protocol.challenge import Challenge, challenge_from_transcript
    from ..core.signing import PublicKey

    key = PublicKey.load(public_key)
    if (target / "bundle.json").is_file():
        if challenge is None:
            raise InputError("auditing a bundle needs --challenge (and --transcript, your copy, for a training run)")
        c = Challenge.load(challenge)
        if c.kind == "training" and transcript is None:
            raise InputError("auditing a training bundle needs --transcript (your copy)")
        if c.kind == "inference":
            report = _audit_inference(target, c, key, model, mode, dtype, (prompt, text, image), policy,
                                      agreement, max_new_tokens, request_nonce, unsafe_skip_input,
                                      unsafe_skip_policy, max_layers_per_block, quiet)
            finish_report(report, {**report.to_json(), "challenge": c.to_json()}, as_json, heading=c.describe())
        agreed = load_agreement(agreement, unsafe_no_agreement)
        bundle, transcript_path, scratch = target, transcript, None
    elif (target / "transcript.jsonl").is_file():
        if (sample_rate is None) == (sample_blocks is None) and strategy != "all":
            raise InputError("a local audit needs --sample-rate or --sample-blocks (or --strategy all)")
        transcript_path = transcript or target / "transcript.jsonl"
        agreed = load_agreement(agreement, unsafe_no_agreement)
        c = challenge_from_transcript(transcript_path, key, strategy, count=sample_blocks, sample_rate=sample_rate,
                                      config_path=target / "config.json", agreement=agreed)
        scratch = tempfile.TemporaryDirectory(prefix="aftune-bundle-")
        bundle = Path(scratch.name) / "bundle"
        from ..protocol.opening import open_bundle

        with _progress(quiet) as bar:  # local mode: the provider's side first (it replays each block too)
            task = bar.add_task("opening", total=len(c.blocks), unit="blocks", note="")
            open_bundle(target, c, bundle, progress=lambda done, total: bar.update(task, completed=done),
                        base_model=base_model)
    else:
        raise InputError(f"{target} is neither a bundle (bundle.json) nor a run directory (transcript.jsonl)")
    _check_run_root(c, transcript_path, key, bundle / "config.json")
    with _progress(quiet) as bar:
        task = bar.add_task("auditing", total=len(c.blocks), unit="blocks", note="")
        report = audit_bundle(bundle, transcript_path, key, c, agreement=agreed,
                              unsafe_no_agreement=unsafe_no_agreement, mode=mode,
                              tolerance=tolerance_from_options(mode, None, tolerance_file), replay_dtype=dtype,
                              workers=workers, ray_address=ray,
                              on_block=lambda r: bar.update(task, advance=1, note=r.verdict))
    document = {**report.to_json(), "challenge": c.to_json()}
    _write_reports(document, c, report_json, report_html, report_png, bundle)
    finish_report(report, document, as_json, heading=c.describe())


def _audit_inference(bundle: Path, c, key, model, mode, dtype, inputs, policy, agreement, max_new_tokens, nonce,
                     unsafe_input: bool, unsafe_policy: bool, max_layers_per_block: int = 2, quiet: bool = False):
    """Audit an opened inference challenge against what the client asked (as `verify-inference`)."""
    from ..workflows import InferenceRequest, RecordVerifier
    from .inference import client_policy, request_nonce, unsafe_options

    if model is None:
        raise InputError("auditing an inference record needs --model (your copy of the model or run)")
    prompt, text, image = inputs
    request = InferenceRequest(prompt=prompt, text=text, image=image,
                               policy=client_policy(model, policy, agreement, max_new_tokens),
                               request_nonce=request_nonce(nonce))
    verifier = RecordVerifier(request, model=model, provider_key=key, mode=mode, dtype=dtype,
                              max_layers_per_block=max_layers_per_block,
                              unsafe=unsafe_options(unsafe_input, unsafe_policy))
    with _progress(quiet) as bar:
        task = bar.add_task("auditing", total=len(c.blocks), unit="blocks", note="")
        return verifier.audit(bundle, c, on_block=lambda r: bar.update(task, advance=1, note=r.verdict))


def _write_reports(document, challenge, json_path, html_path, png_path, bundle: Path) -> None:
    if json_path:
        json_path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    if not (html_path or png_path):
        return
    config = None
    if (bundle / "config.json").is_file():
        from ..core import jsonio
        from ..training.run import MAX_CONFIG_BYTES

        config = jsonio.read_json(bundle / "config.json", MAX_CONFIG_BYTES, "run config")
    threats = _threats(challenge)
    if html_path:
        from ..reporting.html import render_html

        html_path.write_text(render_html(document, challenge.to_json(), config, threats), encoding="utf-8")
    if png_path:
        from ..reporting.plot import plot_grid

        plot_grid(document, png_path, challenge=challenge.to_json())


def _threats(challenge):
    """Detection probability each threat model had under this challenge (planner)."""
    try:
        from ..protocol.planner import threat_table
    except ImportError:
        return None
    return threat_table(challenge)
