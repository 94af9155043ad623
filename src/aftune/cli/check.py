"""`aftune check`: the static check of a run directory, an inference record directory or a bundle
(SPEC.md 6.9): every file hashed against its commitments, nothing replayed.

    aftune check runs/demo --public-key runs/demo/provider.key.pub [--json]

Exit codes: 0 intact, 1 damaged (a damaged or missing file), 2 bad usage or not a record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import _PUBKEY_HELP, _progress, app, out

_COLOURS = {"damaged": "red", "missing": "red", "unreferenced": "yellow", "unfinished": "yellow"}


@app.command()
def check(
    path: Path = typer.Argument(..., help="A run directory, an inference record directory or an audit bundle."),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help="Your own copy of the transcript (needed "
                                              "for a training bundle; for a run, checked instead of its own)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
):
    """Check every file of a record against its commitments, without replay. Exit 0 intact, 1 damaged, 2 bad input."""
    from ..core.signing import PublicKey
    from ..protocol.check import check_path

    key = PublicKey.load(public_key)
    with _progress() as bar:
        task = bar.add_task("hashing", total=None, note="")
        report = check_path(path, key, transcript=transcript,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        for line in report.described:
            out.print(escape(line), highlight=False, soft_wrap=True)
        for p in report.problems:
            out.print(f"[{_COLOURS.get(p.kind, 'red')}]{escape(p.describe())}[/]", highlight=False, soft_wrap=True)
        for note in report.notes:
            out.print(f"[yellow]note: {escape(note)}[/]", highlight=False, soft_wrap=True)
        out.print(f"[bold]{escape(report.summary())}[/]", highlight=False, soft_wrap=True)
    raise typer.Exit(report.exit_code)
