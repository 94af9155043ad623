"""Qu-ANTI-zation, threat B (seed 004): the provider serves an 8- or 4-bit copy of the model the
client paid for, and claims the float model.

    aftune attack quant-serving --work-dir work --bits 4

`QuantizedServing` is an `aftune.inference.ServingDeviation`: the engine takes the committed
digest of the float model, then the provider rounds every Linear and Conv2d weight
(`quantize.fake_quant`: symmetric, per layer) and answers with that. Every layer block computes
with other weights, so the inference verifier's replay with the committed float weights fails
at every layer block, in strict mode and in tolerance mode alike: the quantization error of the
activations is orders of magnitude above honest floating-point noise.
"""

from __future__ import annotations

import torch

from ..inference.engine import ServingDeviation
from .quantize import quantize_model_


class QuantizedServing(ServingDeviation):
    def __init__(self, bits: int):
        if bits not in range(2, 17):
            raise ValueError(f"bits must be in [2, 16], got {bits}")
        self.bits = bits

    def weights(self, model: torch.nn.Module) -> None:
        quantize_model_(model, self.bits)

    @property
    def memory_ratio(self) -> float:
        """Weight memory of the served copy relative to float32 (what the provider saves)."""
        return self.bits / 32
