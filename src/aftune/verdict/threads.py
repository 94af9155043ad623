"""Thread pinning for strict replay on CPUs.

CPU matrix products reduce in an order that depends on torch's intra-op thread count, so a
bitwise replay runs with the count the provider recorded (committed in the run config or the
inference record, `environment.torch_threads`).

    with pinned_threads(recorded_threads(doc.get("environment")), enabled=policy.strict):
        replay()
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

MAX_THREADS = 4096


def recorded_threads(environment: Any) -> int | None:
    """The thread count a record names, or None when it names none (or an implausible one)."""
    n = environment.get("torch_threads") if isinstance(environment, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_THREADS else None


@contextlib.contextmanager
def pinned_threads(threads: int | None, enabled: bool = True) -> Iterator[None]:
    """Run the body with `threads` intra-op threads (when given and enabled), then restore."""
    previous = torch.get_num_threads()
    if threads and enabled:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
