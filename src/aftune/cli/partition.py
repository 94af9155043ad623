"""`aftune partition`: TEE-shielded DNN partition (TAOISM's strategies), checked and blinded.

    aftune partition strategies models/llama
    aftune partition run models/llama --strategy shield-nonlinear --prompt "Q: hi" --record-dir records
    aftune partition run models/vit --strategy shield-deep --image cat.png
    aftune partition check records/<id>.json --public-key ed25519:... --crossings records/<id>.crossings

On a machine without a TEE the trusted side is a separate process and nothing more; every
command says so. Exit codes: 0 PASS, 1 FAIL (a worker's answer rejected, or a record that does
not check), 2 bad input or a session that could not run, 3 internal error.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

import typer

from .app import AftuneTyper, app, escape, out
from .options import deprecated_flags
from ..errors import AftuneError

LABEL = "trusted side: process isolation only (no TEE: no memory encryption, no attestation)"

partition_app = AftuneTyper(no_args_is_help=True, help="Partitioned inference: shielded layers in a trusted "
                            "process, offloaded linear layers blinded and checked with Freivalds.")
app.add_typer(partition_app, name="partition")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@partition_app.command("strategies")
def strategies(
    model: Path = typer.Argument(None, help="Model directory.", show_default="the built-in model"),
    backbone: Optional[Path] = typer.Option(None, "--backbone", help="Public backbone the model was fine-tuned from (teeslice)."),
    prompt_tokens: int = typer.Option(16, "--prompt-tokens", help="Decoders: prompt length assumed for the activation counts."),
    new_tokens: int = typer.Option(16, "--new-tokens", help="Decoders: generated tokens assumed."),
    shield_fraction: float = typer.Option(0.25, "--shield-fraction", help="Layer strategies: fraction of layers shielded."),
    magnitude_fraction: float = typer.Option(0.01, "--magnitude-fraction", help="shield-large-magnitude: fraction of weights kept."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable table."),
):
    """What the untrusted worker would see under each strategy (no process is started)."""
    from ..partition.catalog import strategy_table

    model = model or Path(__file__).resolve().parents[1] / "builtin" / "model"
    rows = strategy_table(model, backbone=backbone, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                          shield_fraction=shield_fraction, magnitude_fraction=magnitude_fraction)
    if as_json:
        out.print_json(json.dumps({"trusted_side": LABEL, "strategies": [
            {"strategy": r.strategy, "description": r.description, "note": r.note,
             "shielded_stages": list(r.shielded_stages), "exposure": r.exposure.fractions() if r.exposure else None}
            for r in rows]}))
        return
    from rich.table import Table

    from ..partition.strategies import ORIGINS

    out.print(LABEL, highlight=False, soft_wrap=True)
    table = Table(title=f"what the untrusted worker sees ({escape(str(model))})")
    table.add_column("strategy", no_wrap=True)
    for col in ("params in clear", "activations blinded", "activations in clear", "MACs in trusted", "as in"):
        table.add_column(col, justify="right" if col != "as in" else "left")
    for r in rows:
        if r.exposure is None:
            table.add_row(r.strategy, "-", "-", "-", "-", escape(r.note))
            continue
        f = r.exposure.fractions()
        table.add_row(r.strategy, _pct(f["parameters_plaintext"]), _pct(f["activations_blinded"]),
                      _pct(f["activations_plaintext"]), _pct(f["macs_trusted"]), ORIGINS[r.strategy])
    out.print(table)


@partition_app.command("run")
@deprecated_flags({"--key": "--provider-signing-key"})
def run(
    model: Path = typer.Argument(..., help="Model directory (decoder LM, ViT or ResNet)."),
    strategy: str = typer.Option(..., "--strategy", help="shield-deep, shield-shallow, shield-large-magnitude, shield-intermediate, shield-nonlinear, teeslice, all-shielded, none-shielded."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt for a decoder LM."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image for a vision classifier."),
    backbone: Optional[Path] = typer.Option(None, "--backbone", help="teeslice: the public backbone the model was fine-tuned from."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Tokens to generate (greedy)."),
    record_dir: Path = typer.Option(Path("partition-records"), "--record-dir", help="Where the signed record is written."),
    store_crossings: bool = typer.Option(False, "--store-crossings", help="Also store every crossing (for `check --crossings`)."),
    repetitions: int = typer.Option(2, "--repetitions", help="Freivalds vectors per layer: a wrong product passes w.p. <= p^-k."),
    shield_fraction: float = typer.Option(0.25, "--shield-fraction", help="Layer strategies: fraction of layers shielded."),
    magnitude_fraction: float = typer.Option(0.01, "--magnitude-fraction", help="shield-large-magnitude: fraction of weights kept."),
    device: str = typer.Option("cpu", "--device", help="The worker's device: cpu or cuda."),
    threads: int = typer.Option(1, "--threads", help="Torch threads per process."),
    provider_signing_key: Optional[Path] = typer.Option(None, "--provider-signing-key", help="The private signing key of the provider's trusted side, which signs the record (PEM).", show_default="a fresh one per run"),
    trusted_command: Optional[str] = typer.Option(None, "--trusted-command", help="Start the trusted side as this program (it runs aftune.partition.trusted), e.g. 'gramine-sgx aftune-partition' with --transport tcp (docs/partition.md)."),
    transport: str = typer.Option("unix", "--transport", help="unix sockets, or tcp on 127.0.0.1 (needed under Gramine)."),
    unsafe_unchecked: bool = typer.Option(False, "--unsafe-unchecked", help="Allow none-shielded: the worker runs everything, nothing is checked."),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="Also run the unpartitioned model in the trusted process and compare."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result."),
):
    """Run one partitioned inference; exit 1 if the worker's answer fails a check."""
    from ..partition import Arithmetic, FreivaldsSpec, IntegrityFailure, PartitionRuntime, StrategyConfig, save_crossings

    if not as_json:
        out.print(LABEL, highlight=False, soft_wrap=True)
    if (prompt is None) == (image is None):
        raise AftuneError("give exactly one input: --prompt (decoder LM) or --image (vision classifier)")
    config = StrategyConfig(strategy, shield_fraction=shield_fraction, magnitude_fraction=magnitude_fraction)
    arithmetic = Arithmetic(freivalds=FreivaldsSpec(repetitions))
    inputs, decode = _inputs(model, prompt, image)
    command = shlex.split(trusted_command) if trusted_command else None
    with PartitionRuntime(device=device, threads=threads, key_path=provider_signing_key, trusted_command=command,
                          transport=transport) as rt:
        try:
            result = rt.run(model, strategy=config, backbone=backbone, max_new_tokens=max_new_tokens,
                            arithmetic=arithmetic, store_crossings=store_crossings,
                            unsafe_unchecked=unsafe_unchecked, reference=reference, **inputs)
        except IntegrityFailure as failure:
            path = failure.record.write(record_dir)
            if failure.crossings:
                save_crossings(path.with_suffix(".crossings"), failure.crossings)
            out.print(f"[bold red]{escape(str(failure))}[/]", highlight=False, soft_wrap=True)
            out.print(f"record of the failed session: {path} (key {rt.public_key.text})", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(1) from None
        public_key = rt.public_key
    path = result.record.write(record_dir)
    if result.crossings:
        save_crossings(path.with_suffix(".crossings"), result.crossings)
    _report(result, decode, path, public_key.text, arithmetic, as_json)


def _inputs(model: Path, prompt: Optional[str], image: Optional[Path]):
    from ..data.inputs import image_pixels, prompt_ids
    from ..models import load_tokenizer
    from ..models import read_config

    hf_config = read_config(model)
    if prompt is not None:
        tokenizer = load_tokenizer(model)
        return {"input_ids": prompt_ids(tokenizer, prompt)}, \
            (lambda tokens: tokenizer.decode(list(tokens), skip_special_tokens=True))
    size = hf_config.get("image_size")
    pixels, _ = image_pixels(image, size if isinstance(size, int) and size > 0 else 64, "blake3")
    names = hf_config.get("id2label") or {}
    return {"pixel_values": pixels}, (lambda label: names.get(str(label)))


def _report(result, decode, path: Path, key_text: str, arithmetic, as_json: bool) -> None:
    t, traffic, f = result.timing, result.traffic, result.exposure.fractions()
    ref = result.reference
    answer = result.label if result.label is not None else list(result.tokens)
    same = ref is not None and (ref.label if result.label is not None else list(ref.tokens)) == answer
    if as_json:
        out.print_json(json.dumps({"trusted_side": LABEL, "strategy": result.strategy, "answer": answer,
                                   "same_as_unpartitioned": same, "exposure": f, "timing": t, "traffic": traffic,
                                   "record": str(path), "public_key": key_text}))
        return
    if result.label is not None:
        name = decode(result.label)
        out.print(f"label:     {result.label}" + (f" ({escape(str(name))})" if name else ""), highlight=False, soft_wrap=True)
    else:
        out.print(f"text:      {escape(repr(decode(result.tokens)))}", highlight=False, soft_wrap=True)
        out.print(f"tokens:    {list(result.tokens)}", highlight=False, soft_wrap=True)
    if ref is not None:
        ratio = t["online"] / ref.seconds if ref.seconds > 0 else float("nan")
        out.print(f"unpartitioned model (same trusted process): {'same answer' if same else 'DIFFERENT answer'}; "
                  f"latency {ratio:.2f}x", highlight=False, soft_wrap=True)
    out.print(f"exposure:  parameters in clear {_pct(f['parameters_plaintext'])}; activations blinded "
              f"{_pct(f['activations_blinded'])}, in clear {_pct(f['activations_plaintext'])}; multiply-adds in the "
              f"trusted process {_pct(f['macs_trusted'])}", highlight=False, soft_wrap=True)
    for note in result.exposure.notes:
        out.print(f"           {escape(note)}", highlight=False, soft_wrap=True)
    share = t.get("freivalds", 0.0) / t["online"] if t.get("online") else 0.0
    out.print(f"checks:    Freivalds, k = {arithmetic.freivalds.repetitions} per layer over Z_p, p = "
              f"{arithmetic.field.modulus}: a wrong product passes w.p. <= {arithmetic.freivalds.miss_probability(arithmetic.field):.1e}"
              if result.error_bounds else "checks:    none (no product was offloaded)", highlight=False, soft_wrap=True)
    out.print(f"crossings: {traffic['messages']} messages, {traffic['bytes']} bytes", highlight=False, soft_wrap=True)
    out.print(f"time:      online {t['online']:.3f} s (Freivalds {_pct(share)}), offline {t['offline']:.3f} s",
              highlight=False, soft_wrap=True)
    out.print(f"record:    {path}", highlight=False, soft_wrap=True)
    out.print(f"key:       {key_text}", highlight=False, soft_wrap=True)


@partition_app.command("check")
def check(
    record: Path = typer.Argument(..., help="The record <id>.json (its <id>.sig next to it)."),
    public_key: str = typer.Option(..., "--public-key", help="The trusted side's key (.pub file or 'ed25519:<hex>'), pinned out of band."),
    crossings: Optional[Path] = typer.Option(None, "--crossings", help="Stored crossings: every digest is checked and every product replayed."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
):
    """Check a partition record: signature, Merkle root, and with --crossings every crossing."""
    from ..core.signing import PublicKey
    from ..partition import PartitionRecord, check_record, load_crossings

    report = check_record(PartitionRecord.read(record), public_key=PublicKey.load(public_key),
                          crossings=load_crossings(crossings) if crossings else None)
    if as_json:
        out.print_json(json.dumps({"record": report.record_id, "strategy": report.strategy, "outcome": report.outcome,
                                   "crossings": report.crossings, "digests_checked": report.digests_checked,
                                   "products_replayed": report.products_replayed}))
    else:
        out.print(escape(report.summary()), highlight=False, soft_wrap=True)
        out.print(f"outcome recorded by the trusted side: {report.outcome}", highlight=False)
    raise typer.Exit(0 if report.outcome == "PASS" else 1)
