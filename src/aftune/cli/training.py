"""Training commands: `aftune keygen`, `train`, `verify`, `calibrate`, `prepare`, `digest`.

    aftune train --run-dir runs/demo                      # built-in model and data
    aftune verify runs/demo --public-key runs/demo/provider.key.pub --all
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import AftuneError, CommitmentMismatch
from .app import (_PUBKEY_HELP, _TRANSCRIPT_HELP, _fail, _progress, app, err, fail_on_mismatch, finish_report, out,
                  tolerance_from_options)


@app.command()
def keygen(path: Path = typer.Argument(..., help="Where to write the private key; the public key goes to PATH.pub.")):
    """Create a provider signing key (Ed25519)."""
    from ..core.signing import SigningKey

    if path.exists():
        _fail(AftuneError(f"{path} exists: keys are never overwritten"))
    pub = SigningKey.generate().save(path)
    out.print(f"private key: {path}\npublic key:  {pub} ({pub.read_text().strip()})")


@app.command()
def train(
    run_dir: Path = typer.Option(..., "--run-dir", help="New directory for the record and the fine-tuned model."),
    model: Optional[Path] = typer.Option(None, "--model", help="Hugging Face model directory (default: built-in tiny Llama)."),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL file or image folder (default: built-in dataset)."),
    steps: int = typer.Option(32, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(64, "--seq-len", help="Maximum tokens per example."),
    image_size: int = typer.Option(0, "--image-size", help="Image side in pixels (0: from the model config)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or sgd (momentum)."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    schedule: str = typer.Option("constant", "--schedule", help="constant, linear or cosine."),
    warmup_steps: int = typer.Option(0, "--warmup-steps"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Global gradient clipping; 0 disables."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (PEFT) instead of all weights."),
    lora_r: int = typer.Option(8, "--lora-r"),
    lora_alpha: int = typer.Option(16, "--lora-alpha"),
    lora_targets: str = typer.Option("", "--lora-targets", help="Comma-separated module names (default: PEFT's)."),
    steps_per_block: int = typer.Option(4, "--steps-per-block", help="B_S: steps per step block."),
    layers_per_block: int = typer.Option(2, "--layers-per-block", help="B_L: layers per layer block."),
    checkpoint_interval: int = typer.Option(1, "--checkpoint-interval", help="I_C: store full state every I_C step blocks."),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or float64."),
    hash_algorithm: str = typer.Option("blake3", "--hash", help="blake3 or sha256."),
    key: Optional[Path] = typer.Option(None, "--key", help="Provider signing key (default: a new one in RUN)."),
):
    """Fine-tune with recording: every block committed, every step block signed as it ends."""
    from ..training.settings import LoraSettings, TrainSettings
    from ..training.train import train as run_training

    settings = TrainSettings(
        steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, image_size=image_size, lr=lr,
        optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, seed=seed, layers_per_block=layers_per_block,
        steps_per_block=steps_per_block, checkpoint_interval=checkpoint_interval, dtype=dtype,
        hash_algorithm=hash_algorithm,
        lora=LoraSettings(r=lora_r, alpha=lora_alpha,
                          target_modules=tuple(t for t in lora_targets.split(",") if t)) if lora else None,
    )
    try:
        with _progress() as bar:
            task = bar.add_task("training", total=steps, note="")

            def progress(done, total, loss):
                bar.update(task, completed=done, note=f"loss {loss:.4f}")

            result = run_training(model, data, run_dir, settings, key_path=key, progress=progress)
    except AftuneError as exc:
        _fail(exc)
    out.print(f"run recorded in {result.run_dir} (final loss {result.final_loss:.4f})")
    out.print(f"run root:  {result.run_root.hex()}")
    out.print(f"model:     {result.run_dir / 'model'} (digest {result.final_model_digest.hex()[:16]}…)")
    if result.public_key_path:
        out.print(f"provider public key: {result.public_key_path}")


def _verifier(run_dir, public_key, mode="strict", dtype=None, rel_l2=None, max_elem=None, transcript=None,
              tolerance_file=None):
    from ..core.signing import PublicKey
    from ..training.verify import Verifier

    tol = tolerance_from_options(mode, None, tolerance_file, rel_l2, max_elem)
    return Verifier(run_dir, PublicKey.load(public_key), mode=mode, tolerance=tol, replay_dtype=dtype,
                    transcript=transcript)



@app.command()
def verify(
    run_dir: Path = typer.Argument(..., help="The run directory."),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    layer_block: Optional[int] = typer.Option(None, "--layer-block", "-l"),
    step_block: Optional[int] = typer.Option(None, "--step-block", "-s"),
    all_blocks: bool = typer.Option(False, "--all", help="Verify every block and the final model."),
    mode: str = typer.Option("strict", "--mode", help="strict (bitwise) or tolerance."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Replay in this dtype (tolerance mode)."),
    rel_l2: Optional[float] = typer.Option(None, "--rel-l2", help="Tolerance: max relative L2 error per tensor."),
    max_elem: Optional[float] = typer.Option(None, "--max-elem", help="Tolerance: max element error / rms."),
    tolerance_file: Optional[Path] = typer.Option(None, "--tolerance", help="Per-kind thresholds from `aftune calibrate --out`."),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help=_TRANSCRIPT_HELP),
    base_model: Optional[Path] = typer.Option(None, "--base-model", help="Your copy of the agreed base model: the run must start from it."),
    data: Optional[Path] = typer.Option(None, "--data", help="Your copy of the agreed dataset: the run must commit to it."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
):
    """Replay blocks and compare them with their commitments. Exit 0 PASS, 1 FAIL, 2 bad input."""
    from ..verdict.findings import Report

    try:
        if all_blocks == (layer_block is not None or step_block is not None):
            raise AftuneError("give either --all or both --layer-block and --step-block")
        if not all_blocks and (layer_block is None or step_block is None):
            raise AftuneError("give both --layer-block and --step-block")
        v = _verifier(run_dir, public_key, mode, dtype, rel_l2, max_elem, transcript, tolerance_file)
        v.check_agreed(base_model, data)
        if transcript is None:
            err.print("note: verifying against the run directory's transcript; pass --transcript with the copy you "
                      "received during training, so that a rewritten record cannot pass", highlight=False)
        if all_blocks:
            total = len(v.blocked.blocks) * v.record.num_step_blocks
            with _progress() as bar:
                task = bar.add_task("verifying", total=total, note="")
                report = v.verify_all(lambda r: bar.update(task, advance=1, note=r.verdict))
        else:
            report = Report(str(run_dir), mode)
            report.results.append(v.verify_block(layer_block, step_block)[0])
    except CommitmentMismatch as exc:  # the record contradicts its signed commitments
        fail_on_mismatch(exc, as_json)
    except AftuneError as exc:
        _fail(exc)
    finish_report(report, report.to_json(), as_json, error_label="final model")


@app.command()
def calibrate(
    run_dir: Path = typer.Argument(..., help="An honest run, replayed to measure floating-point error."),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Replay dtype the audit will use."),
    margin: float = typer.Option(4.0, "--margin", help="Thresholds = margin x the largest honest error."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the per-kind thresholds (JSON) for --tolerance."),
):
    """Measure honest replay error and suggest tolerance-mode thresholds."""
    from ..training.calibrate import calibrate as run_calibration

    try:
        c = run_calibration(run_dir, _verifier(run_dir, public_key).record.transcript.public_key, dtype, margin)
    except AftuneError as exc:
        _fail(exc)
    out.print(f"{c.blocks} honest blocks replayed; largest honest errors (relative L2, element / rms):")
    for kind, (rel, elem) in c.observed.items():
        out.print(f"  {kind:<10} {rel:.3g}  {elem:.3g}")
    if out_file:
        out_file.write_text(json.dumps(c.suggested.to_json(), indent=1), encoding="utf-8")
        out.print(f"thresholds ({margin:g} x) written to {out_file}: verify with --mode tolerance"
                  f"{' --dtype ' + dtype if dtype else ''} --tolerance {out_file}")
    else:
        out.print(f"suggested: --mode tolerance{' --dtype ' + dtype if dtype else ''} "
                  f"--rel-l2 {c.suggested.rel_l2:.3g} --max-elem {c.suggested.max_elem:.3g} (or --out FILE for per-kind thresholds)")


@app.command()
def prepare(
    run_dir: Path = typer.Argument(...),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    layer_block: int = typer.Option(..., "--layer-block", "-l"),
    step_block: int = typer.Option(..., "--step-block", "-s"),
):
    """Regenerate a block's start state from the nearest stored checkpoint (I_C > 1)."""
    from ..training.regenerate import prepare as run_prepare

    try:
        v = _verifier(run_dir, public_key)
        done = run_prepare(run_dir, v.record.transcript.public_key, layer_block, step_block, verifier=v)
    except AftuneError as exc:
        _fail(exc)
    if done:
        out.print(f"regenerated layer block {layer_block} at step blocks {done}; every tensor matched its digest")
    else:
        out.print(f"layer block {layer_block}, step block {step_block}: already stored")


@app.command()
def digest(
    model_dir: Path = typer.Argument(..., help="A Hugging Face model directory."),
    dtype: str = typer.Option("float32", "--dtype", help="The dtype the weights are trained in."),
    hash_algorithm: str = typer.Option("blake3", "--hash"),
):
    """Print a model's weights digest (compare with a run's base_weights) and its model digest
    (weights, config, generation config and tokenizer: compare with a run's final model)."""
    from ..core.encoding import DTYPE_BY_NAME
    from ..core.merkle import model_digest, tensors_root
    from ..models import load_pretrained, model_files, model_weights

    try:
        if dtype not in DTYPE_BY_NAME:
            raise AftuneError(f"--dtype must be one of {', '.join(DTYPE_BY_NAME)}")
        _, model = load_pretrained(model_dir, "eager", DTYPE_BY_NAME[dtype])
        root, _ = tensors_root(hash_algorithm, model_weights(model))
        whole = model_digest(hash_algorithm, root, model_files(model_dir))
    except AftuneError as exc:
        _fail(exc)
    out.print(f"weights {root.hex()}\nmodel   {whole.hex()}")
