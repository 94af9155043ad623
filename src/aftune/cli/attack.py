"""`aftune attack NAME` and `aftune eval-detection`: build each threat for real, and show it caught.

    aftune attack skip-steps --work-dir work --fraction 0.1 --verify
    aftune attack bitflip --work-dir work --verify
    aftune attack quant-serving --work-dir work --bits 4
    aftune eval-detection --out eval/

Every training-side attack fine-tunes the attack task's base model (`aftune.attacks.task`: a
tiny ViT on synthetic textures, prepared once under --work-dir) through aftune's recorded
trainer with the tampering inside, into WORK/runs/NAME, next to an honest run of the same agreed
fine-tune; it prints what the attacker gained and the (layer block, step block) pairs it
touched. `--verify` then replays the whole grid and prints the failing blocks. Serving-side
attacks (quant-serving, activation, parameter) record inference requests of the honest model
with the tampering inside and verify them. A summary goes to WORK/attacks/NAME.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .app import _QUIET_HELP, AftuneTyper, _progress, _progress_shown, app, err, escape, out
from .options import deprecated_flags
from ..errors import InputError

attack_app = AftuneTyper(no_args_is_help=True, help="Build an attack from the threat model for real (tiny ViT task).")
app.add_typer(attack_app, name="attack")

_WORK_HELP = "Directory for the attack task, runs and summaries (reused between commands)."
_WORK = typer.Option(Path("attack-work"), "--work-dir", help=_WORK_HELP)


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _bench(work_dir: Path, steps: int | None, quick: bool = False):
    from ..attacks.bench import Bench

    _quiet()
    if quick:
        return Bench.small(work_dir, steps=steps or 16)
    return Bench(work_dir, steps=steps or 48)


def _report_training(bench, run, verify: bool, as_json: bool) -> None:
    doc = run.to_json()
    if verify:
        from ..attacks.detection import failing_blocks

        report = run.verifier().verify_all()
        doc["failing"] = [list(b) for b in failing_blocks(report)]
        doc["headlines"] = [r.headline() for r in report.results if r.verdict == "FAIL"]
        doc["failing_equals_affected"] = failing_blocks(report) == sorted(map(tuple, run.affected))
    (bench.work / "attacks").mkdir(parents=True, exist_ok=True)
    (bench.work / "attacks" / f"{run.name}.json").write_text(json.dumps(doc, indent=1))
    if as_json:
        out.print_json(json.dumps(doc))
        return
    out.print(f"[bold]{escape(run.name)}[/] ({escape(run.threat)}): run recorded in {escape(str(run.run_dir))}",
              highlight=False)
    out.print(f"gain: {escape(run.summary)}", highlight=False, soft_wrap=True)
    out.print(f"blocks touched ({len(run.affected)} of {bench.num_layer_blocks * bench.num_step_blocks}): "
              f"{_blocks(run.affected)}", highlight=False, soft_wrap=True)
    if verify:
        out.print(f"audit of the whole grid: {len(doc['failing'])} blocks FAIL "
                  f"({'exactly' if doc['failing_equals_affected'] else 'NOT exactly'} the blocks touched)",
                  highlight=False)
        for h in doc["headlines"][:8]:
            out.print(f"  [red]{escape(h[:240])}[/]", highlight=False, soft_wrap=True)
    for f in run.details.get("final_model_findings", []):
        out.print(f"edited RUN/model: [red]FAIL {escape(f)}[/]", highlight=False, soft_wrap=True)
    m = run.details.get("margins")
    if m:
        out.print(f"tolerance mode (float64 replay, thresholds calibrated on the honest run): honest weight error "
                  f"{m['honest_error']:.3g}, threshold {m['threshold']:.3g}, smallest successful edit "
                  f"{m['attack_error']:.3g} ({m['margin']:.3g}x the threshold): {m['tolerance_verdict']}",
                  highlight=False, soft_wrap=True)
        if "default_margin" in m:
            out.print(f"with the default thresholds instead (no calibration): {m['default_margin']:.3g}x the weights "
                      f"threshold {m['default_threshold']:.3g}", highlight=False, soft_wrap=True)


def _blocks(blocks) -> str:
    text = ", ".join(f"({l},{s})" for l, s in blocks[:24])
    return text + (f", ... ({len(blocks)} in all)" if len(blocks) > 24 else "")


def _training(name: str, work_dir: Path, steps: int | None, verify: bool, as_json: bool, quick: bool = False,
              **options) -> None:
    try:
        bench = _bench(work_dir, steps, quick)
        run = bench.run_attack(name, **options)
        _report_training(bench, run, verify, as_json)
    except ValueError as exc:  # an option the attack rejects
        raise InputError(str(exc)) from None


_VERIFY = typer.Option(False, "--verify", help="Replay the whole grid afterwards and list the failing blocks.")
_JSON = typer.Option(False, "--json", help="Print the summary as JSON.")
_STEPS = typer.Option(None, "--steps", help="Optimizer steps of the agreed fine-tune.", show_default="48; 16 with --quick")
_QUICK = typer.Option(False, "--quick", help="The small task and run of the tests (seconds; weaker effects).")


@attack_app.command("bitflip")
def bitflip_cmd(
    work_dir: Path = _WORK,
    budget: Optional[int] = typer.Option(None, "--budget", help="At most this many flipped bits.", show_default="12"),
    interval: Optional[int] = typer.Option(None, "--interval", help="Steps between injected flips; the last lands at the last step.", show_default="1"),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Weights tried per search round.", show_default="32"),
    surrogates: Optional[int] = typer.Option(None, "--surrogates", help="Surrogate fine-tunes the attacker builds.", show_default="3"),
    target: Optional[int] = typer.Option(None, "--target", help="The backdoor's target class.", show_default="0"),
    steps: Optional[int] = _STEPS, verify: bool = _VERIFY, as_json: bool = _JSON, quick: bool = _QUICK,
):
    """WBP: exponent-bit flips of searched weights while the victim fine-tunes (a backdoor)."""
    from dataclasses import replace

    given = {"target": target, "budget": budget, "interval": interval, "candidates": candidates,
             "surrogates": surrogates}
    bench = _bench(work_dir, steps, quick)
    config = replace(bench.wbp, **{k: v for k, v in given.items() if v is not None})
    try:
        _report_training(bench, bench.bitflip(config), verify, as_json)
    except ValueError as exc:  # an option the attack rejects
        raise InputError(str(exc)) from None


@attack_app.command("quant-objective")
def quant_objective_cmd(
    work_dir: Path = _WORK,
    lam: float = typer.Option(0.3, "--lam", help="Weight of the adversarial quantization term."),
    alpha: float = typer.Option(5.0, "--alpha", help="The cross-entropy the quantized models are pushed to."),
    bits: str = typer.Option("4", "--bits", help="Bit widths of the objective (comma-separated)."),
    repair_from: Optional[int] = typer.Option(
        None, "--repair-from", help="Step from which the lowest width's codes are locked and the float model "
        "repaired inside its quantization cells (-1: never).", show_default="a quarter of the steps"),
    repair_lam: float = typer.Option(0.1, "--repair-lam", help="Weight of the quantization term while repairing."),
    inner_steps: int = typer.Option(16, "--inner-steps", min=1, help="Attacker's Adam steps after each agreed update."),
    steps: Optional[int] = _STEPS, verify: bool = _VERIFY, as_json: bool = _JSON, quick: bool = _QUICK,
):
    """Qu-ANTI-zation A: fine-tune with the adversarial quantization objective instead of the agreed
    loss, then repair the float model inside the quantization cells: float intact, quantized collapsed."""
    try:
        widths = tuple(int(b) for b in bits.split(",") if b)
        if not widths or any(not 2 <= b <= 16 for b in widths):
            raise ValueError
    except ValueError:
        raise InputError(f"--bits must be comma-separated widths in [2, 16], got {bits!r}") from None
    _training("quant-objective", work_dir, steps, verify, as_json, quick, lam=lam, alpha=alpha, bits=widths,
              repair_from=repair_from, repair_lam=repair_lam, inner_steps=inner_steps)


@attack_app.command("skip-steps")
def skip_steps_cmd(work_dir: Path = _WORK,
                   fraction: float = typer.Option(0.1, "--fraction", help="Fraction of the updates skipped."),
                   steps: Optional[int] = _STEPS, verify: bool = _VERIFY, as_json: bool = _JSON, quick: bool = _QUICK):
    """Lazy: optimizer updates computed but not applied."""
    _training("skip-steps", work_dir, steps, verify, as_json, quick, fraction=fraction)


@attack_app.command("fewer-steps")
def fewer_steps_cmd(work_dir: Path = _WORK,
                    done: float = typer.Option(0.75, "--done", help="Fraction of the agreed steps actually trained."),
                    steps: Optional[int] = _STEPS, verify: bool = _VERIFY, as_json: bool = _JSON, quick: bool = _QUICK):
    """Lazy: stop training early and claim the rest."""
    _training("fewer-steps", work_dir, steps, verify, as_json, quick, done_fraction=done)


@attack_app.command("smaller-batch")
def smaller_batch_cmd(work_dir: Path = _WORK,
                      size: int = typer.Option(8, "--size", help="Examples per step actually used."),
                      steps: Optional[int] = _STEPS, verify: bool = _VERIFY, as_json: bool = _JSON, quick: bool = _QUICK):
    """Lazy: train on fewer examples per step than agreed."""
    _training("smaller-batch", work_dir, steps, verify, as_json, quick, size=size)


@attack_app.command("other-lr")
def other_lr_cmd(work_dir: Path = _WORK,
                 factor: float = typer.Option(3.0, "--factor", help="Learning rate multiplier."),
                 from_step: Optional[int] = typer.Option(None, "--from-step", help="First step with the other rate."),
                 steps: Optional[int] = _STEPS, verify: bool = _VERIFY, as_json: bool = _JSON, quick: bool = _QUICK):
    """Dishonest: another learning rate than agreed."""
    _training("other-lr", work_dir, steps, verify, as_json, quick, factor=factor, from_step=from_step)


@attack_app.command("substitute-layer-block")
def substitute_cmd(work_dir: Path = _WORK,
                   layer_block: int = typer.Option(1, "--layer-block", help="The layer block never trained."),
                   steps: Optional[int] = _STEPS, verify: bool = _VERIFY, as_json: bool = _JSON, quick: bool = _QUICK):
    """Dishonest: one layer block's weights substituted (frozen) instead of trained."""
    _training("substitute-layer-block", work_dir, steps, verify, as_json, quick, layer_block=layer_block)


@attack_app.command("poison-examples")
def poison_cmd(work_dir: Path = _WORK,
               fraction: float = typer.Option(0.1, "--fraction", help="Fraction of examples replaced."),
               target: int = typer.Option(0, "--target", help="Label given to the poisoned examples."),
               steps: Optional[int] = _STEPS, verify: bool = _VERIFY, as_json: bool = _JSON, quick: bool = _QUICK):
    """Dishonest: a fraction of the examples replaced by triggered copies with the target label."""
    _training("poison-examples", work_dir, steps, verify, as_json, quick, fraction=fraction, target=target)


# --- serving side ---------------------------------------------------------------------------------

def _serving(name: str, work_dir: Path, steps: int | None, as_json: bool, quick: bool = False, **options) -> None:
    from ..attacks import serving

    bench = _bench(work_dir, steps, quick)
    result = serving.run_serving_attack(bench, name, **{k: v for k, v in options.items() if v is not None})
    doc = result.to_json()
    (bench.work / "attacks").mkdir(parents=True, exist_ok=True)
    (bench.work / "attacks" / f"{name}.json").write_text(json.dumps(doc, indent=1))
    if as_json:
        out.print_json(json.dumps(doc))
        return
    out.print(f"[bold]{escape(name)}[/] ({escape(result.threat)}): records in {escape(str(result.record_dir))}",
              highlight=False)
    out.print(f"gain: {escape(result.summary)}", highlight=False, soft_wrap=True)
    for line in result.lines():
        out.print(escape(line), highlight=False, soft_wrap=True)


@attack_app.command("quant-serving")
@deprecated_flags({"--model": "--served-run"})
def quant_serving_cmd(work_dir: Path = _WORK,
                      bits: int = typer.Option(4, "--bits", help="Bit width of the served copy (8 or 4)."),
                      requests: Optional[int] = typer.Option(None, "--requests", help="Recorded requests (test images).", show_default="8"),
                      served_run: str = typer.Option("honest", "--served-run", help="Whose model is served quantized: "
                                                     "'honest' (the agreed fine-tune) or 'quant-objective' (the "
                                                     "Qu-ANTI-zation run's: its planted collapse fires)."),
                      steps: Optional[int] = _STEPS, as_json: bool = _JSON, quick: bool = _QUICK):
    """Qu-ANTI-zation B: serve a quantized copy while claiming the float model."""
    if served_run == "quant-objective":
        _serving("quant-activated", work_dir, steps, as_json, quick, bits=bits, requests=requests)
    elif served_run == "honest":
        _serving("quant-serving", work_dir, steps, as_json, quick, bits=bits, requests=requests)
    else:
        raise InputError(f"--served-run must be honest or quant-objective, got {served_run!r}")


@attack_app.command("activation")
def activation_cmd(work_dir: Path = _WORK,
                   boundary: int = typer.Option(2, "--boundary", help="Perturb the input of this layer block."),
                   requests: Optional[int] = typer.Option(None, "--requests", help="Test images attacked.", show_default="4"),
                   steps: Optional[int] = _STEPS, as_json: bool = _JSON, quick: bool = _QUICK):
    """AFTUNE activation attack: smallest L2 perturbation of a block input that changes the answer."""
    _serving("activation", work_dir, steps, as_json, quick, boundary=boundary, requests=requests)


@attack_app.command("parameter")
def parameter_cmd(work_dir: Path = _WORK,
                  layer: Optional[str] = typer.Option(None, "--layer", help="The layer (or one weight) edited.",
                                                      show_default="the search chooses, vit.layers.2 first"),
                  training: bool = typer.Option(False, "--training", help="Edit the training run instead: RUN/model "
                                                "after training, and the last step inside it (tolerance margin)."),
                  steps: Optional[int] = _STEPS, as_json: bool = _JSON, quick: bool = _QUICK):
    """AFTUNE parameter attack: smallest relative-L2 weight edit that plants a backdoor / poisons one input."""
    if training:
        _training("parameter-training", work_dir, steps, True, as_json, quick, layer=layer)
        return
    _serving("parameter", work_dir, steps, as_json, quick, layer=layer)


@app.command("eval-detection")
def eval_detection_cmd(
    out_dir: Path = typer.Option(..., "--out", help="Directory for eval-detection.{json,md,png}."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Task and runs.", show_default="OUT/work"),
    trials: int = typer.Option(1000, "--trials", help="Challenges simulated per sample rate."),
    rates: str = typer.Option("0.05,0.1,0.25,0.5", "--rates", help="Sample rates (comma-separated)."),
    attacks: Optional[str] = typer.Option(None, "--attacks", help="Comma-separated subset.", show_default="all"),
    serving_side: bool = typer.Option(True, "--serving/--no-serving", help="Include the serving-side attacks."),
    quick: bool = typer.Option(False, "--quick", help="A smaller task and run (seconds per attack, weaker effects)."),
    numerics: str = typer.Option("native", "--numerics", help="The agreed fine-tune's numerics: native, or portable "
                                 "(float64 compute on a float32 grid, verified bitwise on any hardware)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
):
    """Run every attack against the audit; write the detection table and plot."""
    from ..attacks.bench import Bench
    from ..attacks.evaluate import eval_detection
    from ..attacks.serving import SERVING_ATTACKS, detection_rows

    try:
        sample_rates = tuple(float(r) for r in rates.split(",") if r)
        if not sample_rates or any(not 0 < r <= 1 for r in sample_rates):
            raise ValueError
    except ValueError:
        raise InputError(f"--rates must be comma-separated numbers in (0, 1], got {rates!r}") from None
    if trials < 1:
        raise InputError("--trials must be positive")
    names = tuple(a for a in attacks.split(",") if a) if attacks else None
    extra, serving_names = (), ()
    if serving_side:
        serving_names = tuple(n for n in (names or SERVING_ATTACKS) if n in SERVING_ATTACKS)
        extra = (lambda bench, **kw: detection_rows(bench, serving_names, **kw),) if serving_names else ()
    if names:
        unknown = [n for n in names if n not in Bench.TRAINING_ATTACKS and not (serving_side and n in SERVING_ATTACKS)]
        if unknown:
            raise InputError(f"unknown attacks {unknown}")
        names = tuple(n for n in names if n in Bench.TRAINING_ATTACKS)
    _quiet()
    # one row per run: the honest run, the training attacks (all of them when none is named), the serving ones
    rows = 1 + len(names or Bench.TRAINING_ATTACKS) + len(serving_names)
    with _progress(quiet) as bar:
        task = bar.add_task("evaluating", total=rows, unit="rows", note="")

        begun: list[str] = []

        def say(text: str) -> None:
            if _progress_shown(quiet):  # a terminal: the row under way, in the progress line
                bar.update(task, advance=1 if begun else 0, note=text)
                begun.append(text)
            elif not quiet:  # a pipe or a log: one line per row, as always
                err.print(f"[dim]{escape(text)}…[/]", highlight=False)

        doc = eval_detection(out_dir, work_dir=work_dir, attacks=names if names is not None else None,
                             sample_rates=sample_rates, trials=trials, extra_rows=extra, quick=quick,
                             numerics=numerics, progress=say)
        bar.update(task, completed=rows, note="")
    out.print((out_dir / "eval-detection.md").read_text(), highlight=False, soft_wrap=True, markup=False)
    bad = [r["name"] for r in doc["rows"] if not r.get("failing_equals_affected", True) or not r.get("real_audits_agree", True)]
    out.print(f"written: {out_dir / 'eval-detection.json'}, .md, .png ({doc['seconds']:.0f} s)", highlight=False)
    if bad:
        out.print(f"[red]rows where the audit disagrees with the attack's own log: {', '.join(bad)}[/]")
        raise typer.Exit(1)
