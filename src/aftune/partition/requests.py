"""What the runtime asks the trusted process to do: one `RunRequest` per session.

    req = RunRequest(model="models/llama", strategy=StrategyConfig("shield-deep"), max_new_tokens=8)
    frame = encode("run", req.to_fields(), {"input": input_ids})

The request crosses from the (untrusted) host to the trusted process as JSON in a wire.py frame
and is re-validated there (`from_fields`): every field is typed and range-checked, unknown fields
are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.encoding import HASH_ALGORITHMS
from ..errors import InputError
from .field import Field
from .freivalds import FreivaldsSpec
from .offload import Arithmetic
from .quantize import QuantSpec
from .strategies import StrategyConfig

DTYPES = ("float32", "float64", "bfloat16", "float16")
MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class RunRequest:
    model: str  # model directory, read by the trusted process itself
    strategy: StrategyConfig
    backbone: str | None = None  # teeslice: the public backbone's directory
    max_new_tokens: int = 8  # causal LMs (greedy)
    arithmetic: Arithmetic = field(default_factory=Arithmetic)
    hash_algorithm: str = "blake3"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    store_crossings: bool = False  # return every crossing's tensor (for check_record's replay)
    reference: bool = False  # also run the unpartitioned model, timed, on the same input
    unsafe_unchecked: bool = False  # required for none-shielded: nothing is checked

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            problems.append(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens!r}")
        if self.hash_algorithm not in HASH_ALGORITHMS:
            problems.append(f"hash must be one of {HASH_ALGORITHMS}, got {self.hash_algorithm!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            problems.append(f"attn_implementation must be sdpa or eager, got {self.attn_implementation!r}")
        if problems:
            raise InputError("; ".join(problems))

    def to_fields(self) -> dict[str, Any]:
        a = self.arithmetic
        return {"model": self.model, "backbone": self.backbone, "strategy": self.strategy.to_json(),
                "max_new_tokens": self.max_new_tokens, "hash_algorithm": self.hash_algorithm, "dtype": self.dtype,
                "attn_implementation": self.attn_implementation, "store_crossings": self.store_crossings,
                "reference": self.reference, "unsafe_unchecked": self.unsafe_unchecked,
                "arithmetic": {"modulus": a.field.modulus, "weight_bits": a.quant.weight_bits,
                               "activation_bits": a.quant.activation_bits,
                               "freivalds_repetitions": a.freivalds.repetitions,
                               "unsafe_reuse_masks": a.unsafe_reuse_masks, "unsafe_no_blinding": a.unsafe_no_blinding}}

    @classmethod
    def from_fields(cls, f: Any) -> RunRequest:
        keys = {"model", "backbone", "strategy", "max_new_tokens", "hash_algorithm", "dtype", "attn_implementation",
                "store_crossings", "reference", "unsafe_unchecked", "arithmetic"}
        if not isinstance(f, dict) or set(f) != keys:
            raise InputError(f"malformed run request: fields {sorted(f) if isinstance(f, dict) else type(f).__name__}")
        a = f["arithmetic"]
        akeys = {"modulus", "weight_bits", "activation_bits", "freivalds_repetitions", "unsafe_reuse_masks",
                 "unsafe_no_blinding"}
        if not isinstance(a, dict) or set(a) != akeys:
            raise InputError("malformed run request: arithmetic")
        for name in ("store_crossings", "reference", "unsafe_unchecked"):
            if not isinstance(f[name], bool):
                raise InputError(f"run request: {name} must be true or false")
        if not isinstance(f["model"], str) or not (f["backbone"] is None or isinstance(f["backbone"], str)):
            raise InputError("run request: model and backbone must be paths")
        arithmetic = Arithmetic(Field(a["modulus"]), QuantSpec(a["weight_bits"], a["activation_bits"]),
                                FreivaldsSpec(a["freivalds_repetitions"]), unsafe_reuse_masks=bool(a["unsafe_reuse_masks"]),
                                unsafe_no_blinding=bool(a["unsafe_no_blinding"]))
        return cls(f["model"], StrategyConfig.from_json(f["strategy"]), f["backbone"], f["max_new_tokens"], arithmetic,
                   f["hash_algorithm"], f["dtype"], f["attn_implementation"], f["store_crossings"], f["reference"],
                   f["unsafe_unchecked"])
