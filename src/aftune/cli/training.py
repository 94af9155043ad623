"""Training commands: `aftune keygen`, `agree`, `train`, `verify`, `calibrate`, `prepare`, `digest`.

    aftune agree --base-model BASE --data data.jsonl --steps 32 --out agreement.json   # client
    aftune train --agreement agreement.json --base-model BASE --data data.jsonl --run-dir RUN  # provider
    aftune verify RUN --public-key provider.pub --agreement agreement.json --all         # client
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import AftuneError, CommitmentMismatch, InputError
from .app import (_AGREEMENT_HELP, _PUBKEY_HELP, _QUIET_HELP, _TRANSCRIPT_DEFAULT, _TRANSCRIPT_HELP,
                  _UNSAFE_AGREEMENT_HELP, _progress, app, err, finish_report, load_agreement, out, tolerance_from_options)
from .options import deprecated_flags, settings_from_flags, with_settings_options

_LAYER_BLOCK_HELP = "The layer block to verify (index, from 0); with --step-block."
_STEP_BLOCK_HELP = "The step block to verify (index, from 0); with --layer-block."
_PROVIDER_SIGNING_KEY_HELP = "The provider's private signing key (aftune keygen)"


@app.command()
def keygen(path: Path = typer.Argument(..., help="Where to write the private key; the public key goes to PATH.pub.")):
    """Create a provider signing key (Ed25519)."""
    from ..core.signing import SigningKey

    if path.exists():
        raise InputError(f"{path} exists: keys are never overwritten")
    pub = SigningKey.generate().save(path)
    out.print(f"private key: {path}\npublic key:  {pub} ({pub.read_text().strip()})")


@app.command()
@deprecated_flags({"--sign": "--client-signing-key"})
@with_settings_options
def agree(
    base_model: Optional[Path] = typer.Option(None, "--base-model", help="Your copy of the base model (Hugging Face directory).",
                                              show_default="the built-in tiny Llama"),
    data: Optional[Path] = typer.Option(None, "--data", help="Your copy of the dataset (JSONL file or image folder).",
                                        show_default="the built-in dataset"),
    out_path: Path = typer.Option(..., "--out", help="Where to write agreement.json (never overwritten)."),
    inference_policy: Optional[Path] = typer.Option(None, "--inference-policy", help="A generation policy (JSON) for serving the fine-tuned model."),
    client_signing_key: Optional[Path] = typer.Option(None, "--client-signing-key", help="Sign the agreement with your private client key (aftune keygen)."),
    max_recompute_steps: Optional[int] = typer.Option(None, "--max-recompute-steps", help="Checkpoint spacing: the most training steps you accept the provider re-runs to open one block (sets --checkpoint-interval)."),
    storage_budget: Optional[int] = typer.Option(None, "--storage-budget", help="Checkpoint spacing: the most bytes the record may take (sets --checkpoint-interval; aftune estimate)."),
    trainer_config: Optional[Path] = typer.Option(None, "--trainer-config", help="The SFTConfig / TrainingArguments (JSON) the provider's Trainer script runs with AftuneCallback: the training settings come from it."),
    settings=None,
):
    """Write the agreement: the base model, data and training settings a fine-tune must use (client side)."""
    from ..core import jsonio
    from ..core.signing import SigningKey
    from ..training.agreement import make_agreement
    from ..training.settings import TrainSettings

    from .. import builtin

    chosen = settings_from_flags(settings) or TrainSettings()
    if trainer_config is not None:
        from ..integrations.trainer_config import refuse_given_settings, trainer_config_settings

        refuse_given_settings(n for n, v in settings.items() if v is not None)
        chosen = trainer_config_settings(base_model or builtin.MODEL_DIR, trainer_config, chosen)
    policy = None
    if inference_policy is not None:
        from ..inference.policy import GenerationPolicy

        doc = jsonio.read_json(inference_policy, 1 << 20, "inference policy", InputError)
        policy = GenerationPolicy.from_json(doc, f"generation policy {inference_policy}").to_json()
    from ..training.estimate import spacing_for_model

    chosen = spacing_for_model(base_model or builtin.MODEL_DIR, chosen, max_recompute_steps, storage_budget,
                               interval_given=settings is not None and settings.get("checkpoint_interval") is not None)
    agreement = make_agreement(base_model or builtin.MODEL_DIR, data or builtin.DATA_FILE, chosen, policy)
    if client_signing_key is not None:
        agreement = agreement.signed(SigningKey.load(client_signing_key))
    agreement.save(out_path)
    out.print(f"agreement written to {out_path}: {agreement.settings.steps} steps of {agreement.base_config['model_type']} "
              f"on {agreement.num_examples} examples; digest {agreement.digest().hex()}", highlight=False, soft_wrap=True)
    out.print("give it to the provider (aftune train --agreement) and keep your copy for aftune verify --agreement",
              highlight=False, soft_wrap=True)
    from ..training.estimate import estimate as run_estimate

    out.print(run_estimate(agreement).line(), highlight=False, soft_wrap=True)


@app.command()
def estimate(
    agreement_path: Path = typer.Argument(..., help="The agreement (aftune agree)."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
):
    """Before the run: the record's size and the cost of opening one challenged block (SPEC.md 6.10)."""
    from ..training.agreement import Agreement
    from ..training.estimate import estimate as run_estimate

    e = run_estimate(Agreement.load(agreement_path))
    if as_json:
        out.print(json.dumps(e.to_json(), indent=1), highlight=False)
    else:
        out.print(e.line(), highlight=False, soft_wrap=True)


@app.command()
@deprecated_flags({"--model": "--base-model", "--key": "--provider-signing-key"})
@with_settings_options
def train(
    run_dir: Path = typer.Option(..., "--run-dir", help="New directory for the record and the fine-tuned model."),
    base_model: Optional[Path] = typer.Option(None, "--base-model", help="The base model to fine-tune (Hugging Face directory).", show_default="the built-in tiny Llama"),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL file or image folder.", show_default="the built-in dataset"),
    agreement_path: Optional[Path] = typer.Option(None, "--agreement", help="The client's agreement.json: settings, base model and data come from it (no settings flags then)."),
    provider_signing_key: Optional[Path] = typer.Option(None, "--provider-signing-key", help=_PROVIDER_SIGNING_KEY_HELP + ".", show_default="a new one in RUN"),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in RUN from its last checkpoint "
                                "before the first unsigned step block (same machine, same --base-model; settings from "
                                "RUN/agreement.json)."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", help="Train on this many processes of this "
                                                 "machine (gloo), one rank each; the settings' "
                                                 "world size (SPEC.md 5.5). Under torchrun, leave it out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
    settings=None,
):
    """Fine-tune with recording: every block committed, every step block signed as it ends."""
    from ..training.agreement import Agreement
    from ..training.settings import TrainSettings
    from ..training.train import train as run_training

    chosen = settings_from_flags(settings)
    agreement = None
    if resume and agreement_path is None:
        if chosen is not None:
            raise InputError("--resume continues under the run's own agreement: drop the settings flags")
        agreement_path = run_dir / "agreement.json"
        if not agreement_path.is_file():
            raise InputError(f"{run_dir} holds no run to resume (no agreement.json)")
    if agreement_path is not None:
        if chosen is not None:
            raise InputError("with --agreement the settings come from it: drop the settings flags")
        agreement = Agreement.load(agreement_path)
    chosen = agreement.settings if agreement is not None else (chosen or TrainSettings())
    from ..training import distributed, launch

    launched = distributed.launched_world_size()  # under torchrun: this process is one rank
    if nproc_per_node is not None and launched > 1:
        raise InputError("--nproc-per-node starts the processes itself: under torchrun leave it out")
    procs = nproc_per_node or launched
    if procs < 1:
        raise InputError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if agreement is None and procs > 1 and chosen.distributed is None and settings.get("world_size") is None:
        chosen = distributed.settings_for(chosen, procs)  # the flags' settings on `procs` ranks
    if procs > 1 and nproc_per_node is not None:
        result = launch.spawn_training(procs, model_dir=base_model, data_path=data, run_dir=run_dir,
                                            settings=None if agreement else chosen, key_path=provider_signing_key,
                                            agreement=agreement, resume=resume)
        _print_trained(result)
        return
    if launched > 1:
        exchange = distributed.from_environment()
        try:
            result = run_training(base_model, data, run_dir, None if agreement else chosen,
                                  key_path=provider_signing_key, agreement=agreement, resume=resume, exchange=exchange)
        finally:
            distributed.close(exchange)
        if result is not None:
            _print_trained(result)
        return
    with _progress(quiet) as bar:
        task = bar.add_task("training", total=chosen.steps, unit="steps", note="")

        def progress(done, total, loss):
            bar.update(task, completed=done, total=total, note=f"loss {loss:.4f}")

        result = run_training(base_model, data, run_dir, None if agreement else chosen, key_path=provider_signing_key,
                              progress=progress, agreement=agreement, resume=resume)
    _print_trained(result)


def _print_trained(result) -> None:
    out.print(f"run recorded in {result.run_dir} (final loss {result.final_loss:.4f})")
    out.print(f"run root:  {result.run_root.hex()}")
    out.print(f"model:     {result.run_dir / 'model'} (digest {result.final_model_digest.hex()[:16]}…)")
    if result.public_key_path:
        out.print(f"provider public key: {result.public_key_path}")


def _verifier(run_dir, public_key, agreement_path, unsafe, client_public_key=None, mode="strict", dtype=None,
              rel_l2=None, max_elem=None, transcript=None, tolerance_file=None):
    from ..core.signing import PublicKey
    from ..training.verify import Verifier

    agreement = load_agreement(agreement_path, unsafe, client_public_key)
    tol = tolerance_from_options(mode, None, tolerance_file, rel_l2, max_elem)
    return Verifier(run_dir, PublicKey.load(public_key), agreement, unsafe_no_agreement=unsafe, mode=mode,
                    tolerance=tol, replay_dtype=dtype, transcript=transcript)


_CLIENT_KEY_HELP = "Your public client key: the agreement must carry your signature."


@app.command()
@deprecated_flags({"--client-key": "--client-public-key", "--nonce": "--attestation-nonce"})
def verify(
    run_dir: Path = typer.Argument(..., help="The run directory."),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help=_AGREEMENT_HELP),
    unsafe_no_agreement: bool = typer.Option(False, "--unsafe-no-agreement", help=_UNSAFE_AGREEMENT_HELP),
    client_public_key: Optional[str] = typer.Option(None, "--client-public-key", help=_CLIENT_KEY_HELP),
    layer_block: Optional[int] = typer.Option(None, "--layer-block", "-l", help=_LAYER_BLOCK_HELP),
    step_block: Optional[int] = typer.Option(None, "--step-block", "-s", help=_STEP_BLOCK_HELP),
    all_blocks: bool = typer.Option(False, "--all", help="Verify every block and the final model."),
    mode: str = typer.Option("strict", "--mode", help="strict (bitwise) or tolerance."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Replay in this dtype (tolerance mode)."),
    rel_l2: Optional[float] = typer.Option(None, "--rel-l2", help="Tolerance: max relative L2 error per tensor."),
    max_elem: Optional[float] = typer.Option(None, "--max-elem", help="Tolerance: max element error / rms."),
    tolerance_file: Optional[Path] = typer.Option(None, "--tolerance", help="Per-kind thresholds from `aftune calibrate --out`."),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help=_TRANSCRIPT_HELP, show_default=_TRANSCRIPT_DEFAULT),
    attest: Optional[str] = typer.Option(None, "--attest", help="Inside a TEE: attest the report with this evidence "
                                         "provider (gramine, configfs-tsm, auto, unsafe-simulated); needs --all."),
    attestation_nonce: Optional[str] = typer.Option(None, "--attestation-nonce", help="With --attest: the client's attestation nonce (hex)."),
    attest_out: Optional[Path] = typer.Option(None, "--attest-out", help="With --attest: where to write the attested verdict."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
):
    """Replay blocks and compare them with their commitments and your agreement. Exit 0 PASS, 1 FAIL, 2 bad input."""

    if all_blocks == (layer_block is not None or step_block is not None):
        raise AftuneError("give either --all or both --layer-block and --step-block")
    if not all_blocks and (layer_block is None or step_block is None):
        raise AftuneError("give both --layer-block and --step-block")
    if (attest is None) != (attestation_nonce is None) or (attest is None) != (attest_out is None):
        raise AftuneError("--attest, --attestation-nonce and --attest-out go together")
    if attest is not None and not all_blocks:
        raise AftuneError("an attested verdict covers the whole run: give --all with --attest")
    v = _verifier(run_dir, public_key, agreement, unsafe_no_agreement, client_public_key, mode, dtype, rel_l2, max_elem,
                  transcript, tolerance_file)
    if transcript is None:
        err.print("note: verifying against the run directory's transcript; pass --transcript with the copy you "
                  "received during training, so that a rewritten record cannot pass", highlight=False)
    try:
        if all_blocks:
            total = len(v.blocked.blocks) * v.num_step_blocks
            with _progress(quiet) as bar:
                task = bar.add_task("verifying", total=total, unit="blocks", note="")
                report = v.verify_all(lambda r: bar.update(task, advance=1, note=r.verdict))
        else:
            report = v.new_report()
            report.errors.extend(v.conformance)
            report.results.append(v.verify_block(layer_block, step_block)[0])
    except CommitmentMismatch as exc:  # the record contradicts its signed commitments: FAIL, attested too
        if attest is not None:
            _attest(v, public_key, {"verdict": "FAIL", "errors": [{"check": "record", "reason": str(exc)}]}, attest,
                    attestation_nonce, attest_out)
        raise
    if attest is not None:
        _attest(v, public_key, report.to_json(), attest, attestation_nonce, attest_out)
    finish_report(report, report.to_json(), as_json, error_label="run")


def _attest(verifier, public_key: str, report_doc: dict, provider: str, nonce: str, out_file: Path) -> None:
    """Sign `report_doc` with a key bound to TEE evidence from `provider` (SPEC 10.4) into `out_file`."""
    from ..attestation.claims import parse_nonce
    from ..attestation.providers import provider_by_name
    from ..attestation.verdict import attest_report
    from ..core.signing import PublicKey

    run = verifier.record.transcript.run
    if run is None:
        raise InputError("the transcript has no signed run root yet: a verdict must name a finished run")
    doc = attest_report(report_doc, provider_by_name(provider), parse_nonce(nonce.lower()),
                        algorithm=verifier.record.algorithm, run_root=run.root, config_digest=run.config_digest,
                        provider_key=PublicKey.load(public_key))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(doc.to_json(), indent=1) + "\n", encoding="utf-8")
    if doc.simulated:
        err.print("[bold yellow]SIMULATED evidence (no TEE): this attested verdict proves nothing[/]", highlight=False)
    err.print(f"attested verdict ({doc.evidence.kind} evidence, verdict {doc.verdict}) written to {out_file}",
              highlight=False, soft_wrap=True)


@app.command()
def calibrate(
    run_dir: Path = typer.Argument(..., help="An honest run, replayed to measure floating-point error."),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help=_AGREEMENT_HELP),
    unsafe_no_agreement: bool = typer.Option(False, "--unsafe-no-agreement", help=_UNSAFE_AGREEMENT_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Replay dtype the audit will use."),
    margin: float = typer.Option(4.0, "--margin", help="Thresholds = margin x the largest honest error."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the per-kind thresholds (JSON) for --tolerance."),
):
    """Measure honest replay error and suggest tolerance-mode thresholds."""
    from ..core.signing import PublicKey
    from ..training.calibrate import calibrate as run_calibration

    c = run_calibration(run_dir, PublicKey.load(public_key), dtype, margin,
                        agreement=load_agreement(agreement, unsafe_no_agreement), unsafe_no_agreement=unsafe_no_agreement)
    out.print(f"{c.blocks} honest blocks replayed; largest honest errors (relative L2, element / rms):")
    for kind, (rel, elem) in c.observed.items():
        out.print(f"  {kind:<10} {rel:.3g}  {elem:.3g}")
    if c.floored:
        out.print(f"note: thresholds floored at the minimum {c.floor:g} for {', '.join(c.floored)}: {margin:g} x the "
                  f"largest honest error is below it (0 when the replay is bitwise, as on identical hardware)",
                  highlight=False, soft_wrap=True)
    if out_file:
        out_file.write_text(json.dumps(c.suggested.to_json(), indent=1), encoding="utf-8")
        out.print(f"thresholds ({margin:g} x) written to {out_file}: verify with --mode tolerance"
                  f"{' --dtype ' + dtype if dtype else ''} --tolerance {out_file}")
    else:
        out.print(f"suggested: --mode tolerance{' --dtype ' + dtype if dtype else ''} "
                  f"--rel-l2 {c.suggested.rel_l2:.3g} --max-elem {c.suggested.max_elem:.3g} (or --out FILE for per-kind thresholds)", soft_wrap=True)


@app.command()
def prepare(
    run_dir: Path = typer.Argument(..., help="The run directory."),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    layer_block: Optional[int] = typer.Option(None, "--layer-block", "-l", help="The layer block to prepare (index)."),
    step_block: Optional[int] = typer.Option(None, "--step-block", "-s", help="The step block to prepare (index)."),
    all_blocks: bool = typer.Option(False, "--all", help="Regenerate everything committed by digest only (for a local verify --all)."),
    base_model: Optional[Path] = typer.Option(None, "--base-model", help="The agreed base model (Hugging Face directory): "
                                              "digest-only runs regenerate from it when no later checkpoint is stored.",
                                              show_default="the built-in tiny Llama"),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help=_AGREEMENT_HELP),
    unsafe_no_agreement: bool = typer.Option(False, "--unsafe-no-agreement", help=_UNSAFE_AGREEMENT_HELP),
):
    """Regenerate what the run committed by digest only: a block's start state (I_C > 1) and,
    with digest-only boundaries, its boundary tensors; --all: everything."""
    from ..training.regenerate import prepare as run_prepare, prepare_digest

    if all_blocks == (layer_block is not None or step_block is not None):
        raise InputError("give --layer-block and --step-block, or --all")
    if not all_blocks and (layer_block is None or step_block is None):
        raise InputError("give both --layer-block and --step-block, or --all")
    v = _verifier(run_dir, public_key, agreement, unsafe_no_agreement)
    if v.run_settings.digest_boundaries:
        r = prepare_digest(v, layer_block, step_block, base_model)
        what = "every block" if all_blocks else f"layer block {layer_block}, step block {step_block}"
        if r.tensors:
            out.print(f"{what}: regenerated {r.boundaries} boundary and {r.states} state tensors by re-running step "
                      f"blocks {r.step_blocks[0]}..{r.step_blocks[-1]}; every tensor matched its digest",
                      highlight=False, soft_wrap=True)
        else:
            out.print(f"{what}: already stored", highlight=False)
        return
    key = v.record.transcript.public_key
    targets = [(layer_block, step_block)] if not all_blocks else \
        [(l, s) for l in range(len(v.blocked.blocks)) for s in range(v.num_step_blocks)]
    done = []
    for l, s in targets:
        done += run_prepare(run_dir, key, l, s, verifier=v)
    if done:
        out.print(f"regenerated {'every layer block' if all_blocks else f'layer block {layer_block}'} at step blocks "
                  f"{sorted(set(done))}; every tensor matched its digest", highlight=False)
    else:
        out.print(f"{'every block' if all_blocks else f'layer block {layer_block}, step block {step_block}'}: "
                  "already stored", highlight=False)


@app.command()
def digest(
    model_dir: Path = typer.Argument(..., help="A Hugging Face model directory."),
    dtype: str = typer.Option("float32", "--dtype", help="The dtype the weights are trained in."),
    hash_algorithm: str = typer.Option("blake3", "--hash", help="blake3 or sha256."),
):
    """Print a model's weights digest (compare with a run's base_weights) and its model digest
    (weights, config, generation config and tokenizer: compare with a run's final model)."""
    from ..core.encoding import DTYPE_BY_NAME
    from ..core.merkle import model_digest, tensors_root
    from ..models import load_pretrained, model_files, model_weights

    if dtype not in DTYPE_BY_NAME:
        raise AftuneError(f"--dtype must be one of {', '.join(DTYPE_BY_NAME)}")
    _, model = load_pretrained(model_dir, "eager", DTYPE_BY_NAME[dtype])
    root, _ = tensors_root(hash_algorithm, model_weights(model))
    whole = model_digest(hash_algorithm, root, model_files(model_dir))
    out.print(f"weights {root.hex()}\nmodel   {whole.hex()}")
