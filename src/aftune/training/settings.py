"""Training settings and the run config that commits to them (SPEC.md 4.3).

`TrainSettings` is what the user chooses; `validate` reports every problem at once. The run
config is a JSON document written once to RUN/config.json; its digest (over the file's exact
bytes) is the first link of the step-block chain, so every signed root binds it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..core.encoding import HASH_ALGORITHMS
from ..data.sft import SftSettings
from ..errors import InputError
from .optim import OPTIMIZERS, SCHEDULES, OptimizerSpec

RUN_FORMAT = "aftune.run.v1"
DTYPES = ("float32", "bfloat16", "float16", "float64")
ATTENTION = ("sdpa", "eager")
NUMERICS = ("native", "portable")  # training/portable.py


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: tuple[str, ...] = ()  # empty: PEFT's default for the architecture


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 32  # optimizer steps
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 64  # token budget per example (text)
    image_size: int = 0  # pixels per side (vision); 0: from the model config
    optimizer: str = "adamw"  # adamw | sgd (with momentum)
    lr: float = 1e-3  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled for AdamW, L2 for SGD; matrices only
    momentum: float = 0.9  # SGD only
    schedule: str = "constant"  # constant | linear | cosine, after warmup
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables it
    seed: int = 0  # example order, dropout and LoRA initialisation
    layers_per_block: int = 2  # B_L: layers per layer block
    steps_per_block: int = 4  # B_S: optimizer steps per step block
    checkpoint_interval: int = 1  # I_C: full state stored every I_C step blocks
    dtype: str = "float32"  # parameter and compute dtype
    attn_implementation: str = "sdpa"  # sdpa | eager
    hash_algorithm: str = "blake3"  # blake3 | sha256
    lora: LoraSettings | None = None  # None: full fine-tuning
    # native: the provider's own kernels (strict replay is bitwise on the same hardware); portable:
    # float64 compute rounded to the float32 grid with a near-boundary log (training/portable.py),
    # bitwise on any hardware
    numerics: str = "native"
    # supervised fine-tuning as TRL defines it (chat template, loss mask; data/sft.py, SPEC.md 4.4.1);
    # None: every token of text/messages data is trained on (SPEC.md 4.4)
    sft: SftSettings | None = None

    def problems(self) -> list[str]:
        out = []
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "layers_per_block", "steps_per_block",
                     "checkpoint_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                out.append(f"{name} must be a positive integer, got {v!r}")
        for name in ("image_size", "warmup_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                out.append(f"{name} must be an integer in [0, 2^63), got {v!r}")
        for name in ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                out.append(f"{name} must be a finite non-negative number, got {v!r}")
        if isinstance(self.lr, (int, float)) and self.lr == 0:
            out.append("lr must be positive")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, (int, float)) and not 0 <= v < 1:
                out.append(f"{name} must be in [0, 1), got {v!r}")
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "dtype": DTYPES,
                   "attn_implementation": ATTENTION, "hash_algorithm": HASH_ALGORITHMS, "numerics": NUMERICS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                out.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.numerics == "portable" and self.dtype != "float32":
            out.append(f"numerics portable computes in float64 and rounds to the float32 grid: dtype must be "
                       f"float32, got {self.dtype!r}")
        if self.lora is not None:
            lora = self.lora
            if isinstance(lora.r, bool) or not isinstance(lora.r, int) or lora.r < 1:
                out.append(f"lora.r must be a positive integer, got {lora.r!r}")
            if isinstance(lora.alpha, bool) or not isinstance(lora.alpha, int) or lora.alpha < 1:
                out.append(f"lora.alpha must be a positive integer, got {lora.alpha!r}")
            if (isinstance(lora.dropout, bool) or not isinstance(lora.dropout, (int, float))
                    or not 0 <= lora.dropout < 1):
                out.append(f"lora.dropout must be in [0, 1), got {lora.dropout!r}")
            if not isinstance(lora.target_modules, tuple) or not all(
                    isinstance(m, str) and 0 < len(m) <= 256 for m in lora.target_modules):
                out.append("lora.target_modules must be a list of module names")
        if self.sft is not None:
            out += self.sft.problems()
        return out

    def validate(self) -> "TrainSettings":
        problems = self.problems()
        if problems:
            raise InputError("invalid training settings:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def num_step_blocks(self) -> int:
        return -(-self.steps // self.steps_per_block)

    def steps_of(self, step_block: int) -> range:
        first = step_block * self.steps_per_block
        return range(first, min(first + self.steps_per_block, self.steps))

    def is_checkpoint(self, step_block: int) -> bool:
        """Whether full state is stored at the start of `step_block` (the final state always is)."""
        return step_block % self.checkpoint_interval == 0 or step_block >= self.num_step_blocks

    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec(
            name=self.optimizer, lr=float(self.lr), beta1=float(self.beta1), beta2=float(self.beta2),
            eps=float(self.eps), weight_decay=float(self.weight_decay), momentum=float(self.momentum),
            schedule=self.schedule, warmup_steps=self.warmup_steps, total_steps=self.steps,
            max_grad_norm=float(self.max_grad_norm),
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.numerics == "native":
            del d["numerics"]  # the form of runs and agreements made before numerics existed (same digests)
        if self.sft is None:
            del d["sft"]  # likewise before sft existed
        else:
            d["sft"] = self.sft.to_json()
        if self.lora is not None:
            d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d

    @classmethod
    def from_json(cls, obj: Any) -> "TrainSettings":
        if not isinstance(obj, dict):
            raise InputError("run config: 'settings' must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise InputError(f"run config: unknown settings {unknown} (written by a newer aftune?)")
        values = dict(obj)
        lora = values.get("lora")
        if lora is not None:
            if not isinstance(lora, dict) or set(lora) - {f.name for f in fields(LoraSettings)}:
                raise InputError("run config: 'settings.lora' is malformed")
            tm = lora.get("target_modules", [])
            if not isinstance(tm, list) or not all(isinstance(x, str) for x in tm):
                raise InputError("run config: 'settings.lora.target_modules' must be a list of strings")
            values["lora"] = LoraSettings(**{**lora, "target_modules": tuple(tm)})
        if values.get("sft") is not None:
            values["sft"] = SftSettings.from_json(values["sft"])
        try:
            settings = cls(**values)
        except TypeError as exc:
            raise InputError(f"run config: {exc}") from None
        return settings.validate()


@dataclass(frozen=True)
class LayerBlocks:
    """Partition of stages [embedding, layer 0..n-1, head] into layer blocks of B_L layers.

    Block 0 also holds the embedding and the last block the head."""

    num_layers: int
    layers_per_block: int
    ranges: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self):
        n, k = self.num_layers, self.layers_per_block
        nb = max(1, -(-n // k))
        ranges = []
        for b in range(nb):
            first = 0 if b == 0 else 1 + b * k
            last = n + 2 if b == nb - 1 else 1 + (b + 1) * k  # exclusive, in stage indices
            ranges.append((first, last))
        object.__setattr__(self, "ranges", tuple(ranges))

    def __len__(self) -> int:
        return len(self.ranges)

    def stages(self, block: int) -> range:
        return range(*self.ranges[block])

    def block_of_stage(self, stage: int) -> int:
        for b, (lo, hi) in enumerate(self.ranges):
            if lo <= stage < hi:
                return b
        raise IndexError(stage)

    def describe(self, block: int, stage_names: list[str]) -> str:
        names = [stage_names[i] for i in self.stages(block)]
        return f"layer block {block} ({names[0]}..{names[-1]})" if len(names) > 1 else f"layer block {block} ({names[0]})"
