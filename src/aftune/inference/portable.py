"""Portable numerics (SPEC.md 8.13): records whose replay is bitwise on any hardware.

After Srivastava, Arora and Boneh, "Optimistic Verifiable Training by Controlling Hardware
Nondeterminism" (NeurIPS 2024): compute in a higher precision, round each operation's output to a
coarser agreed grid, and log the rare elements whose value lies within the cross-hardware error of
a rounding boundary. Here the "operation" is one layer block, the compute dtype float32 and the
grid bfloat16:

- the provider rounds every layer-block boundary activation (each step's new positions) to the
  grid, feeds the rounded value to the next block and commits the grid values (digests, steps
  roots, stored objects: SPEC.md 8.4 with dtype BF16);
- it logs, per boundary, every element whose own float32 value x lies within tau * s of a
  rounding midpoint of the grid (s = |x| + rms of x's row), with the grid value it committed;
- a verifier replays each block from the committed grid input, rounds its own float32 output y,
  and takes the committed value where it differs from its own rounding only for a logged element
  whose committed value is the rounding of some value within tau * s(y) of y (one grid step for
  ordinary elements). The adjusted tensor must then hash to the committed digest and steps root:
  the verdict stays bitwise, on any hardware.

Tokens: greedy steps whose top two logits lie within 2 eps (eps = TAU_LOGIT * max|z|) and
sampled steps whose draw could pick another token under logits within eps are logged; a
verifier accepts a token that is not its own choice only at a logged step, and only if its own
logits make that token possible within eps too.

tau was measured (benchmarks/portable_inference.py --measure, docs/precision.md): the largest
cross-kernel and cross-thread-count difference of one layer block over s was 1.6e-6 (SmolLM2-135M,
first six layers, two layers per block; ATen default vs AVX2 kernels), 6.1e-7 on the built-in
model; TAU = 2^-17 = 7.6e-6 leaves 4.8x and 12x.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import torch

from ..core import grid
from ..errors import InputError, RecordError
from .policy import GenerationPolicy
from .sampling import possible_tokens, sample_uniform

GRID = "bfloat16"  # the grid of float32 compute
GRID_DTYPE = torch.bfloat16
COMPUTE_DTYPE = "float32"
TAU = 2.0 ** -17  # boundary elements: |x - midpoint| <= TAU * (|x| + rms(row)), per 2 layers of a block
TAU_LOGIT = 2.0 ** -18  # logits: eps = TAU_LOGIT * max|z|, per 2 layers of a block
MAX_BITS = 0xFFFF


def tau_for(layers_per_block: int) -> tuple[float, float]:
    """(tau, tau_logit) for blocks of `layers_per_block` layers: the measured constants hold for
    blocks of up to 2 layers; deeper blocks widen them proportionally."""
    f = max(1.0, layers_per_block / 2.0)
    return TAU * f, TAU_LOGIT * f


def boundary_cap(numel: int) -> int:
    """The most elements a boundary's near-boundary log may list: 64 + numel / 8 (honest logs
    measured 2 to 6 percent of the elements: 3.3% on the built-in model, 5.9% on SmolLM2-135M,
    whose outlier dimensions make the row rms large next to its ordinary elements)."""
    return 64 + numel // 8


def token_cap(num_tokens: int) -> int:
    """The most steps the near-tie log may list."""
    return 4 + num_tokens // 8


# --- the grid (core/grid.py, with the bfloat16 grid) ------------------------------------------------

def to_grid(x: torch.Tensor) -> torch.Tensor:
    """Round float32 `x` to bfloat16, to nearest, ties to even; -0 becomes +0. Non-finite: error."""
    return grid.to_grid(x.to(torch.float32), GRID_DTYPE, "a boundary activation")


def bits_of(g: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns (int64, 0..65535) of bfloat16 values."""
    return grid.bits_of(g)


def values_of(bits: torch.Tensor) -> torch.Tensor:
    """bfloat16 values (as float64) of 16-bit patterns."""
    return grid.values_of(bits, GRID_DTYPE)


def midpoints(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rounding interval of each grid value: the midpoints with its lower and upper
    neighbours (float64, exact; +-inf beyond the largest finite values)."""
    return grid.midpoints(bits, GRID_DTYPE)


row_scale = grid.row_scale  # s = |x| + rms of x's row (the last dimension), in float64


def is_valid_bits(b: int) -> bool:
    """A finite bfloat16 other than -0."""
    return bool(grid.is_valid_bits(torch.tensor(b), GRID_DTYPE))


# --- the provider ----------------------------------------------------------------------------------

def round_and_log(x: torch.Tensor, tau: float, offset: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """One step's boundary activation on the grid, and its near-boundary log entries
    `[flat index + offset, committed bits]` (flat index into the step's tensor, row-major)."""
    g = to_grid(x)
    idx, bits = grid.near_boundary(x, g, tau, row_scale(x))
    return g, [[int(i) + offset, int(b)] for i, b in zip(idx.tolist(), bits.tolist())]


def logit_eps(z: torch.Tensor, tau_logit: float) -> float:
    return tau_logit * max(float(z.detach().double().abs().max()), 1e-30)


def near_tie(z: torch.Tensor, token: int, policy: GenerationPolicy, seed: int | None, algorithm: str, step: int,
             tau_logit: float) -> bool:
    """The provider's rule: could logits within eps of its own make the step choose another token?"""
    zd = z.detach().double()
    eps = logit_eps(zd, tau_logit)
    if not policy.sampling:
        top = torch.topk(zd, min(2, zd.numel())).values
        return zd.numel() > 1 and float(top[0] - top[1]) <= 2 * eps
    u = sample_uniform(algorithm, seed, step)
    possible = possible_tokens(zd, policy.temperature, policy.top_p, u, eps)
    possible[token] = False
    return bool(possible.any())


# --- the verifier ----------------------------------------------------------------------------------

def adjust(y: torch.Tensor, entries: list[list[int]], tau: float) -> grid.Adjusted:
    """Round the verifier's own float32 output `y` (one boundary, all steps concatenated) and
    take a logged element's committed value where it differs only if that value is the rounding
    of some value within tau * s(y) of y."""
    idx = torch.tensor([e[0] for e in entries], dtype=torch.int64)
    bits = torch.tensor([e[1] for e in entries], dtype=torch.int64)
    return grid.adjust(y.to(torch.float32), idx, bits, tau, row_scale(y), GRID_DTYPE, "a boundary activation")


def token_acceptable(z: torch.Tensor, token: int, policy: GenerationPolicy | None, seed: int | None,
                     algorithm: str, step: int, tau_logit: float) -> bool:
    """At a logged step: whether the verifier's own logits `z` make `token` possible within eps."""
    from .sampling import sampled_token_possible

    zd = z.detach().double()
    eps = logit_eps(zd, tau_logit)
    if policy is None or not policy.sampling:
        return float(zd.max() - zd[token]) <= 2 * eps
    u = sample_uniform(algorithm, seed, step)
    return sampled_token_possible(zd, token, policy.temperature, policy.top_p, u, eps)


# --- the record member ---------------------------------------------------------------------------

def encode_log(entries: list[list[int]]) -> str:
    """A boundary's log as text: base64 (RFC 4648, padded) of, per entry in ascending index order,
    ULEB128(index - previous index - 1) (previous index -1 before the first) and the 16 bits
    big-endian: about 3 bytes an entry instead of 14 as JSON pairs."""
    out, prev = bytearray(), -1
    for index, bits in entries:
        d = index - prev - 1
        if d < 0:
            raise InputError("a near-boundary log lists its elements in ascending order, each once")
        while True:
            byte, d = d & 0x7F, d >> 7
            out.append(byte | (0x80 if d else 0))
            if not d:
                break
        out += int(bits).to_bytes(2, "big")
        prev = index
    return base64.b64encode(bytes(out)).decode("ascii")


def decode_log(text: Any, numel: int, where: str) -> list[list[int]]:
    """Parse hostile input: the one encoding of `encode_log` (re-encoding gives the same text),
    indices below `numel`, each a finite bfloat16 other than -0."""
    if not isinstance(text, str) or len(text) > (numel * 8 + 8):
        raise RecordError(f"{where}: must be the base64 text of the log (at most a few bytes per element)")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise RecordError(f"{where}: not base64") from None
    entries, prev, pos = [], -1, 0
    while pos < len(raw):
        d, shift = 0, 0
        while True:
            if pos >= len(raw) or shift > 35:
                raise RecordError(f"{where}: a truncated or oversized index")
            byte = raw[pos]
            pos += 1
            d |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if pos + 2 > len(raw):
            raise RecordError(f"{where}: an entry without its 16 bits")
        index, bits = prev + 1 + d, int.from_bytes(raw[pos:pos + 2], "big")
        pos += 2
        if index >= numel:
            raise RecordError(f"{where}: index {index} outside the boundary's {numel} elements")
        if not is_valid_bits(bits):
            raise RecordError(f"{where}: {bits:#06x} is not a finite bfloat16 (nor -0)")
        entries.append([index, bits])
        prev = index
    if encode_log(entries) != text:
        raise RecordError(f"{where}: not in the one encoding of the log (minimal indices, padded base64)")
    return entries


@dataclass(frozen=True)
class PortableLog:
    """The record's `numerics` member (SPEC.md 8.13): the grid, the near-boundary log of every
    boundary (`[flat index, bfloat16 bits]`, ascending; `encode_log` text in JSON) and the
    near-tie steps."""

    boundaries: dict[int, list[list[int]]]
    token_steps: tuple[int, ...]
    grid: str = GRID

    def to_json(self) -> dict[str, Any]:
        return {"grid": self.grid,
                "boundary_logs": {f"{b:04d}": encode_log(v) for b, v in sorted(self.boundaries.items())},
                "token_log": list(self.token_steps)}

    @classmethod
    def from_json(cls, obj: Any, boundaries: dict[int, int], num_tokens: int) -> "PortableLog":
        """Parse hostile input. `boundaries`: boundary -> number of elements (from its row)."""
        if not isinstance(obj, dict) or set(obj) != {"grid", "boundary_logs", "token_log"}:
            raise RecordError("record: numerics must be null or exactly {grid, boundary_logs, token_log}")
        if obj["grid"] != GRID:
            raise RecordError(f"record: numerics.grid must be {GRID!r}, got {str(obj['grid'])[:20]!r}")
        logs = obj["boundary_logs"]
        if not isinstance(logs, dict) or sorted(logs) != [f"{b:04d}" for b in sorted(boundaries)]:
            raise RecordError("record: numerics.boundary_logs must have exactly the boundaries of boundary_roots")
        out: dict[int, list[list[int]]] = {}
        for b, numel in boundaries.items():
            out[b] = decode_log(logs[f"{b:04d}"], numel, f"record: numerics.boundary_logs.{b:04d}")
        steps = obj["token_log"]
        if (not isinstance(steps, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in steps)
                or steps != sorted(set(steps)) or any(not 0 <= k < num_tokens for k in steps)):
            raise RecordError("record: numerics.token_log must list distinct steps in ascending order")
        return cls(out, tuple(steps))
