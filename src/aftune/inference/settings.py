"""How a request is served and recorded: generation settings (committed in the record) and
recording settings (layer blocks, activation interval, hash).

    GenerationSettings(max_new_tokens=8, temperature=0.0).validate()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..core.encoding import HASH_ALGORITHMS
from ..errors import InputError

MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class GenerationSettings:
    """How a causal LM picks its tokens; all of it is committed in the record."""

    max_new_tokens: int = 32  # tokens to generate at most (fewer when an end-of-sequence token comes)
    temperature: float = 0.0  # 0: greedy (argmax); > 0: seeded sampling at this temperature
    top_p: float = 1.0  # nucleus: sample among the most likely tokens holding this much mass
    seed: int = 0  # sampling seed (the uniform of step k is derived from it and k)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def problems(self) -> list[str]:
        out = []
        v = self.max_new_tokens
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_NEW_TOKENS:
            out.append(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {v!r}")
        v = self.temperature
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 100:
            out.append(f"temperature must be a number in [0, 100] (0 for greedy), got {v!r}")
        v = self.top_p
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 1:
            out.append(f"top_p must be a number in (0, 1], got {v!r}")
        v = self.seed
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            out.append(f"seed must be an integer in [0, 2^63), got {v!r}")
        return out

    def validate(self) -> "GenerationSettings":
        problems = self.problems()
        if problems:
            raise InputError("invalid generation settings:\n  - " + "\n  - ".join(problems))
        return self

    def to_json(self, eos_token_ids: list[int]) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": float(self.temperature),
                "top_p": float(self.top_p), "seed": self.seed, "eos_token_ids": eos_token_ids}


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


