"""The `aftune` application: the Typer app, its consoles, and the one place that turns an
`AftuneError` into a message and an exit code.

    aftune train --run-dir runs/demo                      # built-in model and data
    aftune verify runs/demo --public-key runs/demo/provider.key.pub --all

Exit codes: 0 PASS (or success), 1 FAIL, 2 bad input or usage, 3 internal error. Only
`AftuneError` (and OS errors about files) are expected: a command raises it from wherever it
arises and `report_error` prints it, for `main()` and for `CliRunner.invoke(app, ...)` alike
(`AftuneGroup.invoke`). Anything else is a bug, shown with its traceback and exit code 3 so it can
never be mistaken for a verdict. Flag names and their meaning: docs/cli.md.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from ..errors import AftuneError, CommitmentMismatch
from .options import DEPRECATED_FLAGS, replace_deprecated_flags

err = Console(stderr=True)
out = Console()


@dataclass
class Reporting:
    """How the running command wants an `AftuneError` reported (kept in the click context's
    `meta`, which every nested context shares): as JSON when it was asked `--json`, and under which
    verdict word a `CommitmentMismatch` prints (FAIL; verify-receipt: INVALID)."""

    as_json: bool = False
    mismatch_word: str = "FAIL"


_REPORTING = "aftune.reporting"
_MISMATCH_WORD = "__aftune_mismatch_word__"  # set by @mismatch_reads on a command's function


def mismatch_reads(word: str):
    """Under `@app.command()`: this command's `CommitmentMismatch` verdict reads `word`, not FAIL."""

    def mark(command):
        setattr(command, _MISMATCH_WORD, word)
        return command

    return mark


def report_error(exc: AftuneError, reporting: Reporting | None = None) -> int:
    """Print `exc` as the CLI reports it and return its exit code: a `CommitmentMismatch` is a
    verdict (`FAIL: why` on stdout, or its JSON report; exit 1), any other error is `error: why`
    on stderr (exit `exc.exit_code`: 2 bad input, 1 for a FAIL that is not about the record)."""
    reporting = reporting or Reporting()
    if isinstance(exc, CommitmentMismatch):
        if reporting.as_json:
            out.print_json(json.dumps({"verdict": "FAIL", "errors": [{"check": "record", "reason": str(exc)}]}))
        else:
            out.print(f"[bold red]{reporting.mismatch_word}:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    else:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return exc.exit_code


class _PlainFlags:
    """A flag takes no value: show none in --help (typer would print `<bool>`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:
            if getattr(p, "is_flag", False):
                p.metavar = ""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class AftuneCommand(_PlainFlags, TyperCommand):
    """Every `aftune` command: its deprecated flag names (`options.deprecated_flags`) still work,
    with a note, and it records for `report_error` whether it was asked `--json`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        renames = getattr(self.callback, DEPRECATED_FLAGS, None)
        if renames:
            takes_value = {o for p in self.params if p.param_type_name == "option" and not p.is_flag
                           for o in (*p.opts, *p.secondary_opts)}
            args, notes = replace_deprecated_flags(args, renames, takes_value)
            for note in notes:
                err.print(note, markup=False, highlight=False, soft_wrap=True)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        as_json = any("--json" in p.opts and ctx.params.get(p.name) for p in self.params if p.param_type_name == "option")
        ctx.meta[_REPORTING] = Reporting(bool(as_json), getattr(self.callback, _MISMATCH_WORD, "FAIL"))
        return super().invoke(ctx)


class AftuneGroup(_PlainFlags, TyperGroup):
    """The `aftune` group (and its sub-groups): an `AftuneError` raised by any command below it
    ends here, printed by `report_error`, as its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AftuneError as exc:
            raise typer.Exit(report_error(exc, ctx.meta.get(_REPORTING))) from None


class AftuneTyper(typer.Typer):
    """A Typer whose groups are `AftuneGroup`s and whose commands are `AftuneCommand`s."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", AftuneGroup)
        kwargs.setdefault("pretty_exceptions_enable", False)
        super().__init__(**kwargs)

    def command(self, name: str | None = None, *, cls: type | None = None, **kwargs: Any):
        return super().command(name, cls=cls or AftuneCommand, **kwargs)


app = AftuneTyper(add_completion=False, no_args_is_help=True,
                  help="Auditable fine-tuning: record, commit and verify by replay.")


def _print_version(value: bool) -> None:
    """`aftune --version` / `-V`: print `aftune <version>` and exit 0, before any command runs."""
    if value:
        from ..version import __version__

        out.print(f"aftune {__version__}", markup=False, highlight=False)
        raise typer.Exit(0)


@app.callback()
def _aftune(version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                         help="Print aftune's version and exit.")) -> None:
    pass


_QUIET_HELP = "Draw no progress on stderr (none is drawn when stderr is not a terminal)."


def _progress_shown(quiet: bool = False) -> bool:
    """Progress is drawn on stderr only when it is an interactive terminal, and never with --quiet:
    pipes, CI logs and tests get exactly the command's output."""
    return not quiet and err.is_terminal and not err.is_dumb_terminal


def _clock(seconds: float | None) -> str:
    """m:ss, or h:mm:ss from an hour; -:-- while unknown."""
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:d}:{secs:02d}"


def _progress(quiet: bool = False):
    """The one progress display of the CLI, on stderr: what is being done, done/total in the
    task's unit (steps, blocks, rows), the rate, elapsed time, ETA and the task's note (the
    last loss, the last verdict). A task is `bar.add_task(description, total=N, unit="steps",
    note="")`. Drawn only where `_progress_shown(quiet)`; otherwise nothing is printed at all."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
    from rich.table import Column
    from rich.text import Text

    class Cell(ProgressColumn):  # kept whole, on one line
        def __init__(self):
            super().__init__(Column(no_wrap=True))

    class Counts(Cell):
        def render(self, task) -> Text:
            unit = task.fields.get("unit", "")
            total = "?" if task.total is None else f"{int(task.total)}"
            return Text(f"{int(task.completed)}/{total}" + (f" {unit}" if unit else ""), style="progress.download")

    class Rate(Cell):
        def render(self, task) -> Text:
            unit, speed = task.fields.get("unit", "") or "items", task.speed
            if task.finished and task.finished_time:  # done: the whole task's rate (blocks may arrive all at once)
                speed = task.completed / task.finished_time
            if not speed:
                return Text(f"-- {unit}/s", style="progress.data.speed")
            if speed >= 1:
                return Text(f"{speed:.1f} {unit}/s", style="progress.data.speed")
            return Text(f"{1 / speed:.1f} s/{unit.removesuffix('s') or unit}", style="progress.data.speed")

    class Times(Cell):
        def render(self, task) -> Text:
            elapsed = task.finished_time if task.finished else task.elapsed
            remaining = 0.0 if task.finished else task.time_remaining
            return Text(f"{_clock(elapsed)} elapsed, ETA {_clock(remaining)}", style="progress.elapsed")

    class Note(ProgressColumn):  # the one column that gives way on a narrow terminal: cut short, on one line
        def render(self, task) -> Text:
            return Text(str(task.fields.get("note", "")), no_wrap=True, overflow="ellipsis")

    # while running, the rate since the first update, however long ago (an eval-detection row takes minutes)
    return Progress(TextColumn("{task.description}", table_column=Column(no_wrap=True)), BarColumn(bar_width=10),
                    Counts(), Rate(), Times(), Note(), console=err, transient=False, redirect_stdout=False,
                    speed_estimate_period=24 * 3600, disable=not _progress_shown(quiet))


def _distinct_checks(findings, limit: int = 6):
    """The first finding of each kind of check: the cause, then its consequences."""
    seen, out = set(), []
    for f in findings:
        if f.check not in seen:
            seen.add(f.check)
            out.append(f)
    return out[:limit]


def tolerance_from_options(mode: str, base=None, tolerance_file=None, rel_l2=None, max_elem=None, logit=None):
    """The thresholds of tolerance mode: `base` (the defaults), or those of `aftune calibrate
    --out FILE`, overridden by --rel-l2/--max-elem/--logit-tol. Every threshold must be finite
    and positive (InputError, exit 2); in strict mode none may be given."""
    from dataclasses import replace

    from ..core import jsonio
    from ..errors import InputError
    from ..verdict.comparison import Tolerance

    given = (tolerance_file, rel_l2, max_elem, logit) != (None, None, None, None)
    if mode != "tolerance" and given:
        raise InputError("--tolerance, --rel-l2, --max-elem and --logit-tol apply to --mode tolerance")
    if base is None and not given:
        return None  # the verifier's defaults for the agreed dtype and the replay dtype
    tol = base if base is not None else Tolerance()
    if tolerance_file is not None:
        tol = Tolerance.from_json(jsonio.read_json(tolerance_file, 1 << 20, "tolerance file", InputError))
    if rel_l2 is not None or max_elem is not None:
        tol = replace(tol, rel_l2=rel_l2 if rel_l2 is not None else tol.rel_l2,
                      max_elem=max_elem if max_elem is not None else tol.max_elem, per_kind=())
    if logit is not None:
        tol = replace(tol, logit=logit)
    return tol


_AGREEMENT_HELP = "Your agreement.json (aftune agree): the base model, data and settings you agreed to."
_UNSAFE_AGREEMENT_HELP = ("Proceed without an agreement: only the record's consistency with itself is checked, and "
                          "the report says so.")


def load_agreement(path, unsafe: bool, client_public_key: str | None = None):
    """The client's agreement from --agreement (its client signature checked with --client-public-key),
    or None with --unsafe-no-agreement; neither is bad input that says how to write one."""
    from ..core.signing import PublicKey
    from ..errors import InputError
    from ..training.agreement import Agreement
    from ..training.verify import NEEDS_AGREEMENT

    if path is not None and unsafe:
        raise InputError("give --agreement or --unsafe-no-agreement, not both")
    if path is None:
        if not unsafe:
            raise InputError(NEEDS_AGREEMENT)
        return None
    agreement = Agreement.load(path)
    if client_public_key is not None:
        agreement.check_signature(PublicKey.load(client_public_key))
    return agreement


_PUBKEY_HELP = "The provider's public key (.pub file or 'ed25519:<hex>'), obtained out of band."
_TRANSCRIPT_HELP = "Your own copy of the transcript, received while training ran."
_TRANSCRIPT_DEFAULT = "the run directory's, which the provider could rewrite"


def finish_report(report, document: dict, as_json: bool, error_label: str = "", heading: str = "") -> None:
    """Print a verdict (or its JSON document) and exit with its code: 0 PASS, 1 FAIL."""
    if as_json:
        out.print_json(json.dumps(document))
    else:
        if heading:
            out.print(escape(heading), highlight=False)
        for note in report.notes:
            out.print(f"[yellow]note: {escape(note)}[/]", highlight=False, soft_wrap=True)
        for r in report.results:
            colour = "green" if r.verdict == "PASS" else "red"
            where = f" [dim]({escape(r.replayed_on.describe())})[/]" if r.replayed_on else ""
            out.print(f"[{colour}]{escape(r.headline())}[/]{where}", highlight=False, soft_wrap=True)
            for f in _distinct_checks(r.findings)[1:]:
                out.print(f"    also: {escape(f.describe(r.label))}", highlight=False, soft_wrap=True)
        for f in report.errors:
            out.print(f"[red]FAIL {escape(f.describe(error_label))}[/]", highlight=False, soft_wrap=True)
        if report.nodes():  # an audit over a Ray cluster: which nodes replayed the blocks
            out.print(escape(report.nodes()), highlight=False, soft_wrap=True)
        out.print(f"[bold]{escape(report.summary())}[/]", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.verdict == "PASS" else 1)


def main() -> None:
    """`aftune`: run the app; the exit code is 0, 1 (FAIL), 2 (bad input) or 3 (a bug). A command's
    `AftuneError` is reported where the command ends (`AftuneGroup.invoke`, which `CliRunner`
    goes through too); one raised outside any command is reported here, by the same function."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # aftune draws its own progress bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except AftuneError as exc:  # raised outside any command
        sys.exit(report_error(exc))
    except OSError as exc:  # unreadable or unwritable files: bad input, not a bug
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as exc:  # a bug in aftune: never let it read as a verdict (1) or bad input (2)
        if isinstance(exc, SystemExit):
            raise
        import traceback

        traceback.print_exc()
        err.print("[bold red]internal error[/] (exit 3): this is a bug in aftune, please report it")
        sys.exit(3)
