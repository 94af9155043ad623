"""The `aftune` command line: a thin layer over the library, one module per command group.

    aftune --help

`app.py` holds the Typer app, `main` and `report_error`, the only place that turns an
`AftuneError` into a message and an exit code (commands just raise); each other module registers
its commands on the app. Flag names and their meaning: docs/cli.md. Nothing below `aftune.cli`
imports it.
"""

from . import training, inference, audit, plan, attack  # noqa: F401,I001  (register their commands, in this order)
from . import serving  # noqa: F401,E402  (`aftune serve`, `aftune serve-keys`, `aftune policy`)
from . import attestation  # noqa: F401,E402  (`aftune attestation ...`)
from . import partition  # noqa: F401,E402  (`aftune partition ...`)
from . import check  # noqa: F401,E402  (`aftune check`)
from . import models  # noqa: F401,E402  (`aftune model list`, `aftune model export`)
from .app import app, main

__all__ = ["app", "main"]
