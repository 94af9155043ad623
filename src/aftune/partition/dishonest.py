"""Dishonest workers: the attacks the Freivalds check and the record must catch.

    with PartitionRuntime(worker_class=TamperingWorker) as rt:
        rt.instruct_worker(Attack("flip-one", site="model.layers.1.mlp.up_proj", step=1))
        rt.run(...)      # raises IntegrityFailure naming model.layers.1.mlp.up_proj, step 1

`TamperingWorker` is honest until the untrusted host (the runtime's owner, playing the
adversary) sends it an `Attack` on its own pipe; the trusted side is not involved. Attacks:

| name | what the worker returns |
|---|---|
| `flip-one` | the right product with one element changed by +`delta` mod p |
| `scale-row` | the right product with one row multiplied by 2 mod p |
| `stale` | the result it returned for the same layer at an earlier step (same shape) |
| `out-of-range` | one element set to p (not a field element) |
| `wrong-shape` | the product without its last column |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .wire import decode, encode
from .worker import MAX_FRAME_BYTES, Worker

ATTACKS = ("flip-one", "scale-row", "stale", "out-of-range", "wrong-shape")


@dataclass(frozen=True)
class Attack:
    name: str | None  # one of ATTACKS; None: honest again
    site: str | None = None  # None: any layer
    step: int | None = None  # None: any step
    row: int = 0
    col: int = 0
    delta: int = 1

    def frame(self) -> bytes:
        return encode("attack", asdict(self))


class TamperingWorker(Worker):
    """A worker that follows the adversary's instructions (honest by default)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attack = Attack(None)
        self._previous: dict[str, list[torch.Tensor]] = {}

    def _poll_adversary(self) -> None:
        while self.adversary is not None and self.adversary.poll():
            msg = decode(self.adversary.recv_bytes(), max_bytes=MAX_FRAME_BYTES)
            self.attack = Attack(**msg.fields)

    def compute(self, site: str, step: int, operand: torch.Tensor) -> torch.Tensor:
        self._poll_adversary()
        honest = super().compute(site, step, operand)
        earlier = self._previous.setdefault(site, [])
        earlier.append(honest)
        a = self.attack
        if a.name is None or (a.site is not None and a.site != site) or (a.step is not None and a.step != step):
            return honest
        p = self.field.modulus
        out = honest.clone()
        r, c = min(a.row, out.shape[0] - 1), min(a.col, out.shape[1] - 1)
        if a.name == "flip-one":
            out[r, c] = (out[r, c] + a.delta) % p
        elif a.name == "scale-row":
            out[r] = (out[r] * 2) % p
        elif a.name == "stale":
            same = [t for t in earlier[:-1] if t.shape == honest.shape]
            if same:
                out = same[-1]
        elif a.name == "out-of-range":
            out[r, c] = p
        elif a.name == "wrong-shape":
            out = out[:, :-1]
        return out
