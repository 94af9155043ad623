"""How a request is recorded: layer blocks, activation interval, hash. (How its tokens are chosen
is the client's generation policy: `policy.GenerationPolicy`.)

    RecordingSettings(layers_per_block=2, activation_interval=1).validate()
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.encoding import HASH_ALGORITHMS
from ..errors import InputError


@dataclass(frozen=True)
class RecordingSettings:
    """How a request is recorded."""

    layers_per_block: int = 2  # B_L: layers per layer block
    activation_interval: int = 1  # I_A: boundary activations stored in full every I_A boundaries
    hash_algorithm: str = "blake3"

    def validate(self) -> "RecordingSettings":
        problems = []
        for name in ("layers_per_block", "activation_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if self.hash_algorithm not in HASH_ALGORITHMS:
            problems.append(f"hash algorithm must be one of {', '.join(HASH_ALGORITHMS)}")
        if problems:
            raise InputError("invalid record settings:\n  - " + "\n  - ".join(problems))
        return self

    def stored(self, boundary: int) -> bool:
        """Whether boundary `boundary` (input of layer block `boundary`) is stored in full."""
        return boundary % self.activation_interval == 0


