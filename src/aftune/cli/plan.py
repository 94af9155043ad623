"""`aftune challenge`, `aftune plan` and `aftune report`: choose blocks, size an audit, show its result.

    aftune plan --layer-blocks 2 --step-blocks 16 --target 0.99 --skip-steps 0.1
    aftune challenge MY_COPY.jsonl --public-key PUB --sample-blocks 6 --strategy stratified --out challenge.json
    aftune plan --challenge challenge.json --poison-examples 0.05
    aftune report report.json --challenge challenge.json --html report.html --png grid.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import _AGREEMENT_HELP, _PUBKEY_HELP, app, escape, load_agreement, out
from .options import deprecated_flags
from ..errors import InputError

MAX_REPORT_BYTES = 256 << 20

_THREAT_HELP = {
    "tampered_blocks": "Threat: this many blocks tampered, wherever the provider likes.",
    "skip_steps": "Threat: this fraction of optimizer steps skipped (fails every layer block of their step blocks).",
    "poison_examples": "Threat: this fraction of training examples poisoned (fails the last layer block).",
    "tamper_params": "Threat: this fraction of parameters edited once (equal-sized layer blocks assumed).",
    "substitute_layers": "Threat: this fraction of layers substituted for every step.",
}


def _threats(tampered_blocks, skip_steps, poison_examples, tamper_params, substitute_layers):
    from ..protocol.planner import Threat

    given = {"tampered_blocks": tampered_blocks, "skip_steps": skip_steps, "poison_examples": poison_examples,
             "tamper_params": tamper_params, "substitute_layers": substitute_layers}
    return [Threat(kind, amount) for kind, amount in given.items() if amount is not None]


def _percent(p: float) -> str:
    """A probability, never rounded up to certainty: 0.9999995 prints as 1-5e-07, not 100%."""
    if p >= 1.0:
        return "100%"
    if p > 0.9999:
        return f"1-{1 - p:.2g}"
    return f"{100 * p:.4g}%" if p >= 1e-4 else f"{p:.2g}"


def _blocks(n: int) -> str:
    return f"{n} block{'' if n == 1 else 's'}"


@app.command()
@deprecated_flags({"--blocks": "--sample-blocks", "--nonce": "--challenge-nonce"})
def challenge(
    transcript: Optional[Path] = typer.Argument(None, help="Your copy of the run's transcript (training runs)."),
    public_key: Optional[str] = typer.Option(None, "--public-key", help=_PUBKEY_HELP),
    sample_rate: Optional[float] = typer.Option(None, "--sample-rate", help="Fraction of blocks to challenge, in (0, 1]."),
    sample_blocks: Optional[int] = typer.Option(None, "--sample-blocks", help="Number of blocks to challenge (K)."),
    strategy: str = typer.Option("uniform", "--strategy", help="uniform, weighted, stratified or all."),
    challenge_nonce: Optional[str] = typer.Option(None, "--challenge-nonce", help="The challenge's nonce (hex, 16-64 bytes).", show_default="32 random bytes"),
    edge_weight: Optional[int] = typer.Option(None, "--edge-weight", help="Weighted: weight of first/last layer blocks.", show_default="4"),
    layer_blocks: Optional[int] = typer.Option(None, "--layer-blocks", help="Layer blocks (L).", show_default="from the run config"),
    config: Optional[Path] = typer.Option(None, "--config", help="Unsafe mode: the run's config.json.", show_default="beside the transcript"),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help=_AGREEMENT_HELP + " The grid comes from it."),
    unsafe_no_agreement: bool = typer.Option(False, "--unsafe-no-agreement", help="Take the grid from the run's own config (or --layer-blocks)."),
    record_root: Optional[str] = typer.Option(None, "--record-root", help="Inference: the signed record root (hex)."),
    hash_algorithm: str = typer.Option("blake3", "--hash", help="Inference: the record's hash, blake3 or sha256."),
    out_path: Path = typer.Option(..., "--out", help="Where to write the challenge (JSON)."),
):
    """Derive the challenged blocks from the signed run root and a fresh nonce."""
    from ..protocol.challenge import challenge_for_inference, challenge_from_transcript
    from ..protocol.planner import assess_challenge
    from ..core.signing import PublicKey

    if out_path.exists():
        raise InputError(f"{out_path} exists: a challenge is never overwritten (choose another --out)")
    raw_nonce = None
    if challenge_nonce is not None:
        try:
            raw_nonce = bytes.fromhex(challenge_nonce)
        except ValueError:
            raise InputError(f"--challenge-nonce must be hex, got {challenge_nonce[:80]!r}") from None
    if (transcript is None) == (record_root is None):
        raise InputError("give a transcript (training run) or --record-root (inference record), not both")
    if transcript is not None:
        if public_key is None:
            raise InputError("--public-key is required: the transcript's signatures are checked against it")
        agreed = load_agreement(agreement, unsafe_no_agreement)
        c = challenge_from_transcript(transcript, PublicKey.load(public_key), strategy, count=sample_blocks,
                                      sample_rate=sample_rate, nonce=raw_nonce, edge_weight=edge_weight,
                                      num_layer_blocks=layer_blocks, config_path=config, agreement=agreed)
    else:
        if layer_blocks is None:
            raise InputError("an inference challenge needs --layer-blocks")
        try:
            root = bytes.fromhex(record_root or "")
        except ValueError:
            raise InputError(f"--record-root must be 64 hex digits, got {record_root[:80]!r}") from None
        c = challenge_for_inference(root, layer_blocks, strategy, count=sample_blocks, sample_rate=sample_rate,
                                    nonce=raw_nonce, edge_weight=edge_weight, algorithm=hash_algorithm)
    assessment = assess_challenge(c)
    c.save(out_path)
    out.print(escape(c.describe()), highlight=False)
    shown = ", ".join(f"({l},{s})" for l, s in c.blocks[:40]) + (" …" if len(c.blocks) > 40 else "")
    out.print(f"blocks (layer block, step block): {shown}", highlight=False, soft_wrap=True)
    for model, p in zip(assessment.threats, assessment.detection):
        out.print(f"  P(detect) {_percent(p):>7}  {escape(model.threat.label)} ({_blocks(model.tampered)} fail{'s' if model.tampered == 1 else ''})",
                  highlight=False)
    out.print(f"challenge written to {escape(str(out_path))}", highlight=False)


@app.command()
@deprecated_flags({"--blocks": "--total-blocks"})
def plan(
    total_blocks: Optional[int] = typer.Option(None, "--total-blocks", help="Blocks in the grid (N); uniform sampling only."),
    layer_blocks: Optional[int] = typer.Option(None, "--layer-blocks", help="Layer blocks (L)."),
    step_blocks: Optional[int] = typer.Option(None, "--step-blocks", help="Step blocks (S)."),
    target: float = typer.Option(0.99, "--target", help="Detection probability to reach, in (0, 1]."),
    tampered_blocks: Optional[int] = typer.Option(None, "--tampered-blocks", help=_THREAT_HELP["tampered_blocks"]),
    skip_steps: Optional[float] = typer.Option(None, "--skip-steps", help=_THREAT_HELP["skip_steps"]),
    poison_examples: Optional[float] = typer.Option(None, "--poison-examples", help=_THREAT_HELP["poison_examples"]),
    tamper_params: Optional[float] = typer.Option(None, "--tamper-params", help=_THREAT_HELP["tamper_params"]),
    substitute_layers: Optional[float] = typer.Option(None, "--substitute-layers", help=_THREAT_HELP["substitute_layers"]),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Assess only this strategy."),
    edge_weight: int = typer.Option(4, "--edge-weight", help="Weighted: weight of the first and last layer blocks."),
    challenge: Optional[Path] = typer.Option(None, "--challenge", help="Assess this challenge instead of planning one."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """How many blocks to challenge, and how, to catch a threat (exact probabilities)."""
    from ..protocol.challenge import Challenge
    from ..protocol.planner import assess_challenge
    from ..protocol.planner import plan as make_plan

    threats = _threats(tampered_blocks, skip_steps, poison_examples, tamper_params, substitute_layers)
    if challenge is not None:
        if total_blocks is not None or layer_blocks is not None or step_blocks is not None:
            raise InputError("--challenge fixes the grid: do not give --total-blocks, --layer-blocks or --step-blocks")
        c = Challenge.load(challenge)
        assessment = assess_challenge(c, threats or None)
    else:
        p = make_plan(threats, target=target, num_blocks=total_blocks, num_layer_blocks=layer_blocks,
                      num_step_blocks=step_blocks, edge_weight=edge_weight,
                      strategies=[strategy] if strategy else None)
    if challenge is not None:
        if as_json:
            out.print_json(json.dumps(assessment.to_json()))
            return
        out.print(escape(c.describe()), highlight=False)
        for model, prob in zip(assessment.threats, assessment.detection):
            out.print(f"  P(detect) {_percent(prob):>7}  {escape(model.threat.label)}: {escape(model.model)}",
                      highlight=False, soft_wrap=True)
        return
    if as_json:
        out.print_json(json.dumps(p.to_json()))
        return
    shape = f"{p.num_layer_blocks} layer blocks x {p.num_step_blocks} step blocks = " if p.num_layer_blocks else ""
    out.print(f"grid: {shape}{p.num_blocks} blocks; target P(detect) >= {p.target:g}", highlight=False)
    for model in p.threats:
        out.print(f"  {escape(model.threat.label)}: {_blocks(model.tampered)} fail{'s' if model.tampered == 1 else ''} ({escape(model.model)})",
                  highlight=False, soft_wrap=True)
    for o in p.options:
        probs = ", ".join(f"{escape(m.threat.label)} {_percent(x)}" for m, x in zip(p.threats, o.detection))
        out.print(f"{o.strategy:>10}: challenge {o.count} blocks ({100 * o.count / p.num_blocks:.3g}%): {probs}",
                  highlight=False, soft_wrap=True)
    r = p.recommended
    how = "--strategy all" if r.strategy == "all" else f"--strategy {r.strategy} --sample-blocks {r.count}"
    out.print(f"[bold]recommended:[/] {how}" + (f" --edge-weight {p.edge_weight}" if r.strategy == "weighted"
                                                 and p.edge_weight != 4 else ""), highlight=False)
    for note in p.notes:
        out.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)


@app.command()
def report(
    report_json: Path = typer.Argument(..., help="A JSON report (aftune audit --report-json, or verify --json)."),
    challenge: Optional[Path] = typer.Option(None, "--challenge", help="The challenge.", show_default="the report's own"),
    config: Optional[Path] = typer.Option(None, "--config", help="The run's config.json, for the config summary."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML page here."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write a PNG of the block grid here (needs aftune[plot])."),
    tampered_blocks: Optional[int] = typer.Option(None, "--tampered-blocks", help=_THREAT_HELP["tampered_blocks"]),
    skip_steps: Optional[float] = typer.Option(None, "--skip-steps", help=_THREAT_HELP["skip_steps"]),
    poison_examples: Optional[float] = typer.Option(None, "--poison-examples", help=_THREAT_HELP["poison_examples"]),
    tamper_params: Optional[float] = typer.Option(None, "--tamper-params", help=_THREAT_HELP["tamper_params"]),
    substitute_layers: Optional[float] = typer.Option(None, "--substitute-layers", help=_THREAT_HELP["substitute_layers"]),
):
    """Render a report as an HTML page and/or a PNG grid."""
    from ..core import jsonio
    from ..protocol.challenge import Challenge
    from ..protocol.planner import threat_table

    if html is None and png is None:
        raise InputError("give --html and/or --png")
    document = _load_json(report_json, "report", jsonio)
    c = None
    if challenge is not None:
        c = Challenge.load(challenge)
    elif isinstance(document, dict) and document.get("challenge") is not None:
        c = Challenge.from_json(document["challenge"])
    run_config = _load_json(config, "config", jsonio) if config is not None else None
    threats = _threats(tampered_blocks, skip_steps, poison_examples, tamper_params, substitute_layers)
    table = threat_table(c, threats or None) if c is not None else None
    if threats and c is None:
        raise InputError("threat probabilities need the challenge: give --challenge")
    if html is not None:
        from ..reporting.html import write_html

        write_html(html, document, c.to_json() if c else None, run_config, table)
        out.print(f"HTML report written to {escape(str(html))}", highlight=False)
    if png is not None:
        from ..reporting.plot import plot_grid

        plot_grid(document, png, challenge=c.to_json() if c else None, config=run_config)
        out.print(f"grid written to {escape(str(png))}", highlight=False)


def _load_json(path: Path, what: str, jsonio):
    obj = jsonio.read_json(path, MAX_REPORT_BYTES, f"{what} file", InputError)
    if not isinstance(obj, dict):
        raise InputError(f"{what} file {path} must hold a JSON object")
    return obj
