"""Checks of the state training starts from (SPEC.md 6.2 step 3, 6.4): step block 0 must begin
at the agreed base model, LoRA adapters at the initialisation the agreed seed gives, and an
empty optimizer. A violation is a `base_weights` or `initial_state` finding of the block.
"""

from __future__ import annotations

import torch

from ..core.encoding import tensor_digest
from ..verdict.findings import BlockResult
from .instantiate import base_name, is_lora_tensor


def _short(d: bytes) -> str:
    return d.hex()[:16] + "…"


class InitialState:
    """What step block 0 must start from: base digests (by base tensor name) and the seed's
    LoRA initialisation (by adapter tensor name, in the run's dtype)."""

    def __init__(self, base_digests: dict[str, bytes], lora_init, algorithm: str):
        self.base_digests = base_digests
        self._lora_init = lora_init  # a callable: {name: tensor}, built on first use
        self.algorithm = algorithm

    def check_state(self, res: BlockResult, name: str, tensor: torch.Tensor) -> None:
        """A `state/` tensor at step block 0: the agreed base model's, or the seeded adapter init."""
        if is_lora_tensor(name):
            self._check_lora_init(res, name, tensor)
            return
        bname = base_name(name)
        committed = self.base_digests.get(bname)
        if committed is None:
            res.fail("base_weights", "this tensor is not part of the agreed base model", tensor=name)
            return
        res.compared += 1
        got = tensor_digest(bname, tensor, self.algorithm)
        if got != committed:
            res.fail("base_weights", "the starting weights are not the agreed base model's", tensor=name,
                     expected=_short(committed), actual=_short(got))

    def _check_lora_init(self, res: BlockResult, name: str, tensor: torch.Tensor) -> None:
        expected = self._lora_init().get(name)
        if expected is None:
            res.fail("initial_state", "an adapter tensor this LoRA configuration does not create", tensor=name)
            return
        res.compared += 1
        want = tensor_digest(name, expected, self.algorithm)
        got = tensor_digest(name, tensor, self.algorithm)
        if got != want:
            res.fail("initial_state", "the starting adapter weights are not the initialisation the agreed seed gives "
                     "(PEFT's default init after torch.manual_seed(settings.seed))", tensor=name,
                     expected=_short(want), actual=_short(got))

    @staticmethod
    def check_optimizer(res: BlockResult, key: str, tensor: torch.Tensor) -> None:
        """Training starts with an empty optimizer: every slot is zeros at step block 0."""
        res.compared += 1
        nonzero = int(torch.count_nonzero(tensor))
        if nonzero:
            res.fail("initial_state", f"the optimizer state at the start of training must be zeros; {nonzero} of "
                     f"{tensor.numel()} entries are not", tensor=key)
