"""The error hierarchy. The CLI catches `AftuneError` only; anything else is a bug.

- `InputError`: bad arguments or unreadable, malformed or hostile input (exit code 2).
- `RecordError`: a record file is missing, truncated or unparsable (exit code 2): nothing can be
  concluded about the block, and nothing PASSes.
- `CommitmentMismatch` (a `RecordError`): a record file is readable but contradicts what was
  signed: evidence of tampering, a FAIL (exit code 1) naming the block or step block.

The CLI exits 3 on any other exception: that is a bug in aftune, never a verdict.
"""

from __future__ import annotations


class AftuneError(Exception):
    """Base class for every error aftune raises on purpose."""

    exit_code = 2


class InputError(AftuneError):
    """Bad usage or malformed input: names what is wrong and how to fix it."""


class RecordError(AftuneError):
    """A record file is missing, truncated, corrupt or does not match its digest."""


class MissingExtra(InputError):
    """A heavy optional dependency is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"this needs the '{module}' package: install it with `pip install 'aftune[{extra}]'`"
        )


class CommitmentMismatch(RecordError):
    """A record file is readable but contradicts what was signed: evidence of tampering, so the
    verdict is FAIL (exit code 1), naming the block or step block concerned."""

    exit_code = 1
