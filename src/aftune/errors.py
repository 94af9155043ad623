"""The error hierarchy. The CLI catches `AftuneError` only; anything else is a bug.

- `InputError`: bad arguments or unreadable, malformed or hostile input (exit code 2).
- `RecordError`: a record file is missing, truncated or unparsable (exit code 2): nothing can be
  concluded about the block, and nothing PASSes.
- `CommitmentMismatch` (a `RecordError`): a record file is readable but contradicts what was
  signed: evidence of tampering, a FAIL (exit code 1) naming the block or step block.
- `ClusterError`: the Ray cluster an audit was spread over could not finish it (a node died, a
  worker could not start): nothing is concluded (exit code 2); run the audit again.

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


class ClusterError(AftuneError):
    """The Ray cluster could not finish the work given to it (a node or worker died mid-audit):
    nothing is concluded about the blocks it held, so no verdict is given (exit code 2)."""
