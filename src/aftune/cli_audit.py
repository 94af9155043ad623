"""`aftune` commands for the audit component; they register on the shared Typer app."""

from __future__ import annotations

from .cli import app  # noqa: F401
