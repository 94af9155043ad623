"""The `aftune` application: the Typer app, its consoles, and the shared ways of ending a command.

    aftune train --run-dir runs/demo                      # built-in model and data
    aftune verify runs/demo --public-key runs/demo/provider.key.pub --all

Exit codes: 0 PASS (or success), 1 FAIL, 2 bad input or usage, 3 internal error. Only
`AftuneError` (and OS errors about files) are expected: anything else is a bug, shown with its
traceback and exit code 3 so it can never be mistaken for a verdict.
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import AftuneError, CommitmentMismatch

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Auditable fine-tuning: record, commit and verify by replay.")
err = Console(stderr=True)
out = Console()


def _fail(exc: AftuneError) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[note]}"), console=err, transient=False, disable=not err.is_terminal)


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


def load_agreement(path, unsafe: bool, client_key: str | None = None):
    """The client's agreement from --agreement (its client signature checked with --client-key),
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
    if client_key is not None:
        agreement.check_signature(PublicKey.load(client_key))
    return agreement


_PUBKEY_HELP = "The provider's public key (.pub file or 'ed25519:<hex>'), obtained out of band."
_TRANSCRIPT_HELP = ("Your own copy of the transcript, received while training ran (default: the run "
                    "directory's, which the provider could rewrite).")


def fail_on_mismatch(exc: CommitmentMismatch, as_json: bool) -> None:
    """A record that contradicts its commitments before any block was replayed: FAIL (exit 1)."""
    if as_json:
        out.print_json(json.dumps({"verdict": "FAIL", "errors": [{"check": "record", "reason": str(exc)}]}))
    else:
        out.print(f"[bold red]FAIL:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


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
            out.print(f"[{colour}]{escape(r.headline())}[/]", highlight=False, soft_wrap=True)
            for f in _distinct_checks(r.findings)[1:]:
                out.print(f"    also: {escape(f.describe(r.label))}", highlight=False, soft_wrap=True)
        for f in report.errors:
            out.print(f"[red]FAIL {escape(f.describe(error_label))}[/]", highlight=False, soft_wrap=True)
        out.print(f"[bold]{escape(report.summary())}[/]", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.verdict == "PASS" else 1)



def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # aftune draws its own progress bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
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
