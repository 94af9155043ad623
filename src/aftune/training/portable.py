"""Portable numerics for training (SPEC.md 5.5): a run whose replay is bitwise on any hardware.

    aftune agree --base-model DIR --data FILE --numerics portable --out agreement.json

Strict verification of a native run is bitwise only on the provider's kind of CPU and thread
count: a matrix product sums in another order under other vector kernels. A portable run fixes
that as Srivastava, Arora and Boneh do ("Optimistic Verifiable Training by Controlling Hardware
Nondeterminism", NeurIPS 2024): it computes in float64 and rounds every value that crosses from
one verified unit to the next to the agreed float32 grid (core/grid.py), logging the few elements
whose float64 value lies so close to a rounding midpoint that another machine's float64 value
could round the other way. Rounded here, per optimizer step:

- each layer-block boundary activation and boundary gradient, and each micro-batch loss
  (tau = TAU, scale |x| + rms of its row);
- each trainable tensor's gradient after all micro-batches (TAU, same scale), and the vector of
  a layer block's gradient norms, computed in float64 from those (TAU);
- each weight and optimizer-state tensor after the update (TAU_STATE, scale |before| + |after|:
  the update is elementwise, so its error is a few float64 roundings of the values involved).

The global clipping coefficient is computed from the committed float32 norms exactly (math.fsum,
then one correctly rounded square root), the same on every machine. Inside a layer block every
operation runs in float64: `KeepFloat64` keeps the model's own casts to float32 (RMSNorm's upcast,
rotary tables, float32 softmax and loss) in float64.

A verifier replays in float64 on its own hardware, rounds its own values, and takes a logged
value where it differs only if it is the rounding of a value within tau * scale of its own
(`ReplayGrid`): the replay reaches the committed float32 tensors bitwise or FAILs. tau was
measured (benchmarks/portable_training.py --measure, every process settled to the same roundings):
the largest cross-kernel and cross-thread difference over the scale was 2.2e-14 for boundaries and
3.3e-13 for weight gradients (SmolLM2-135M's first six layers; AVX2 against ATen's default kernels,
2 threads against 1), 7.3e-16 for the update over the state scale: TAU = 2^-36 = 1.5e-11 leaves
45x, TAU_STATE = 2^-44 = 5.7e-14 100x.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch.overrides import TorchFunctionMode

from ..core import grid
from ..core.encoding import TAG_LORA_INIT, hashed_uniforms
from ..errors import CommitmentMismatch
from .manifest import common_key
from .settings import NUMERICS  # noqa: F401  (native | portable)

GRID_DTYPE = torch.float32  # the agreed dtype of a portable run: what is committed and stored
COMPUTE_DTYPE = torch.float64
TAU = 2.0 ** -36  # values summed over a row: boundaries, losses, weight gradients, norms
TAU_STATE = 2.0 ** -44  # the optimizer's elementwise update of weights and state
LOG_NAME = "numerics_log"  # the tensor name of every log in digests
_LOWER = (torch.float32, torch.bfloat16, torch.float16)


def log_key(step: int, micro: int | None, *what: str) -> str:
    """The manifest key of the log of one rounded value (SPEC.md 5.5.2)."""
    return common_key(step, micro, "numerics", *what)


def _lower(a) -> bool:
    return isinstance(a, torch.dtype) and a in _LOWER


class KeepFloat64(TorchFunctionMode):
    """Inside a portable block, casts of float64 values to a lower float dtype stay float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16):
            if args and isinstance(args[0], torch.Tensor) and args[0].dtype == COMPUTE_DTYPE:
                return args[0]
        elif func is torch.Tensor.to:
            if any(_lower(a) for a in args[1:]) or _lower(kwargs.get("dtype")):
                if isinstance(args[0], torch.Tensor) and args[0].dtype == COMPUTE_DTYPE:
                    args = tuple(COMPUTE_DTYPE if _lower(a) else a for a in args)
                    if _lower(kwargs.get("dtype")):
                        kwargs = {**kwargs, "dtype": COMPUTE_DTYPE}
        elif _lower(kwargs.get("dtype")) and any(isinstance(a, torch.Tensor) and a.dtype == COMPUTE_DTYPE
                                                   for a in args):
            kwargs = {**kwargs, "dtype": COMPUTE_DTYPE}  # softmax(x, dtype=float32) and the like
        return func(*args, **kwargs)


def compute(portable: bool):
    """The context a block's forward runs in."""
    return KeepFloat64() if portable else nullcontext()


def lora_init(algorithm: str, seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A LoRA A matrix [r, fan_in] of a portable run, the same on every machine (PEFT's default
    draws it with torch's CPU generator, whose float32 path differs between vector kernels): the
    bound of PEFT's Kaiming-uniform init, 1 / sqrt(fan_in), times 2u - 1, rounded once to float32.
    u_i = (w_i >> 11) * 2^-53 for the i-th big-endian u64 word of H(TAG_LORA_INIT || u64(seed) ||
    u32(len(name)) || name || u64(j)), j = 0, 1, ... (each digest gives its words in order)."""
    u = hashed_uniforms(algorithm, TAG_LORA_INIT, seed, name, math.prod(shape))
    bound = 1.0 / math.sqrt(shape[-1])
    return ((2.0 * u - 1.0) * bound).reshape(shape).to(GRID_DTYPE)


def exact_clip_coefficient(max_grad_norm: float, all_norms: list[torch.Tensor]) -> float | None:
    """Global clipping from the committed float32 norms, identical on every machine: the sum of
    squares exactly (each square of a float32 is exact in binary64; math.fsum rounds the exact
    sum once), one correctly rounded square root, then SPEC.md 5.3's coefficient."""
    if max_grad_norm <= 0:
        return None
    values = [float(v) for n in all_norms for v in n.reshape(-1).tolist()]
    if not values:
        return None
    from .optim import CLIP_EPS

    total = math.sqrt(math.fsum(v * v for v in values))
    coef = max_grad_norm / (total + CLIP_EPS)
    return coef if coef < 1.0 else None


def state_scale(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return before.detach().to(torch.float64).abs() + after.detach().to(torch.float64).abs()


class WriterGrid:
    """The provider's rounding: rounds, commits each non-empty log, returns the grid values in
    the compute dtype. Counts logged elements (benchmarks)."""

    def __init__(self, commit):
        self.commit = commit
        self.logged = 0
        self.rounded = 0

    def settle(self, key: str, x: torch.Tensor, tau: float, scale: torch.Tensor) -> torch.Tensor:
        g = grid.to_grid(x.detach(), GRID_DTYPE, key)
        idx, bits = grid.near_boundary(x, g, tau, scale)
        self.rounded += x.numel()
        if idx.numel():
            self.logged += idx.numel()
            self.commit(key, LOG_NAME, torch.stack([idx, bits], dim=1))
        return g.to(COMPUTE_DTYPE)


def parse_log(t: torch.Tensor, numel: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A committed log (hostile input): int64 [n, 2] rows (flat index, float32 bits), indices
    ascending and distinct below `numel` (so n <= numel: each entry costs the verifier the same as
    the rounding of its element), each a finite float32 other than -0."""
    if t.dtype != torch.int64 or t.dim() != 2 or t.shape[1] != 2:
        raise CommitmentMismatch(f"{key}: a numerics log is an int64 [n, 2] tensor, committed "
                                 f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}")
    idx, bits = t[:, 0].contiguous(), t[:, 1].contiguous()
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or bool((idx[1:] <= idx[:-1]).any())):
        raise CommitmentMismatch(f"{key}: the log's indices must be distinct, ascending and below {numel}")
    if not bool(grid.is_valid_bits(bits, GRID_DTYPE).all()):
        raise CommitmentMismatch(f"{key}: the log holds a value that is not a finite float32 (or is -0)")
    return idx, bits


class ReplayGrid:
    """A verifier's rounding with the provider's logs: `settle` returns its own rounding with the
    logged values it accepts; a logged value it cannot accept is reported through `refuse`."""

    def __init__(self, common: dict, load, refuse):
        self.common, self.load, self.refuse = common, load, refuse

    def settle(self, key: str, x: torch.Tensor, tau: float, scale: torch.Tensor) -> torch.Tensor:
        ref = self.common.get(key)
        if ref is None:
            idx = bits = torch.zeros(0, dtype=torch.int64)
        else:
            idx, bits = parse_log(self.load(ref, key), x.numel(), key)
        adjusted = grid.adjust(x, idx, bits, tau, scale, GRID_DTYPE, key)
        if adjusted.refused:
            self.refuse(key, adjusted.refused)
        return adjusted.grid.to(COMPUTE_DTYPE)


__all__ = ["COMPUTE_DTYPE", "GRID_DTYPE", "KeepFloat64", "LOG_NAME", "NUMERICS", "ReplayGrid", "TAU", "TAU_STATE",
           "WriterGrid", "compute", "exact_clip_coefficient", "log_key", "parse_log", "state_scale"]
