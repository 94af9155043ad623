"""How a request is recorded: layer blocks, activation interval, hash. (How its tokens are chosen
is the client's generation policy: `policy.GenerationPolicy`.)

    RecordingSettings(layers_per_block=2, activation_interval=0).validate()   # 0: no activation stored
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.encoding import HASH_ALGORITHMS
from ..errors import InputError


@dataclass(frozen=True)
class RecordingSettings:
    """How a request is recorded."""

    layers_per_block: int = 2  # B_L: layers per layer block
    # I_A: boundary activations stored in full every I_A boundaries; 0 stores none (a record keeps
    # only their roots, and the provider regenerates them when challenged: SPEC.md 8.4, 8.9). The
    # library default keeps every boundary; `aftune infer` and `aftune serve` default to 0.
    activation_interval: int = 1
    hash_algorithm: str = "blake3"

    def validate(self) -> "RecordingSettings":
        problems = []
        for name, least in (("layers_per_block", 1), ("activation_interval", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                problems.append(f"{name} must be an integer of at least {least}, got {v!r}")
        if self.hash_algorithm not in HASH_ALGORITHMS:
            problems.append(f"hash algorithm must be one of {', '.join(HASH_ALGORITHMS)}")
        if problems:
            raise InputError("invalid record settings:\n  - " + "\n  - ".join(problems))
        return self

    def stored(self, boundary: int) -> bool:
        """Whether boundary `boundary` (input of layer block `boundary`) is stored in full."""
        return self.activation_interval > 0 and boundary % self.activation_interval == 0


