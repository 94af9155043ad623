"""Rounding to an agreed grid, with a log of the elements near a rounding boundary (SPEC.md 2.6).

The mechanism of portable numerics, for inference (bfloat16 grid over float32 compute:
inference/portable.py) and training (float32 grid over float64 compute: training/portable.py),
after Srivastava, Arora and Boneh, "Optimistic Verifiable Training by Controlling Hardware
Nondeterminism" (NeurIPS 2024):

- the writer rounds its own value x to the grid (to nearest, ties to even; -0 becomes +0) and
  logs `(flat index, grid bits)` of every element whose x lies within `tau * scale` of a rounding
  midpoint (another machine's x could round the other way);
- a replayer rounds its own value y, and takes a logged element's committed value where it
  differs only if that value is the rounding of some value within `tau * scale(y)` of y. Every
  other element is its own rounding. The result must then match the commitment bitwise.

    g = to_grid(x, torch.float32); idx, bits = near_boundary(x, g, tau, scale)
    adjusted = adjust(y, idx, bits, tau, scale_y, torch.float32)

Grid values are handled by their bit patterns (`bits_of`, as int64 0..2^w-1) and compared in
float64, in which every grid value and every midpoint of two adjacent grid values is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

# grid dtype -> (integer view dtype, bit width)
GRIDS = {torch.bfloat16: (torch.int16, 16), torch.float32: (torch.int32, 32)}


def _width(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    try:
        return GRIDS[dtype]
    except KeyError:
        raise ValueError(f"no grid for {dtype}") from None


def to_grid(x: torch.Tensor, dtype: torch.dtype, what: str = "a value") -> torch.Tensor:
    """`x` rounded to the grid `dtype` (to nearest, ties to even); -0 becomes +0. Non-finite: error."""
    g = x.to(dtype) + 0.0  # IEEE: -0 + 0 is +0, and any other value is unchanged
    if not bool(torch.isfinite(g).all()):  # a non-finite x gives a non-finite g
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"portable numerics: {what} is not finite")
        raise InputError(f"portable numerics: {what} overflows {str(dtype).removeprefix('torch.')}")
    return g


def bits_of(g: torch.Tensor) -> torch.Tensor:
    """The bit patterns of grid values, as int64 in [0, 2^w)."""
    view, w = _width(g.dtype)
    return g.contiguous().view(view).to(torch.int64) & ((1 << w) - 1)


def values_of(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The grid values (as float64) of bit patterns in [0, 2^w)."""
    view, w = _width(dtype)
    b = bits.to(torch.int64)
    b = torch.where(b >= (1 << (w - 1)), b - (1 << w), b).to(view)
    return b.view(dtype).to(torch.float64)


def is_valid_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Which patterns are a finite grid value other than -0 (what `to_grid` can give)."""
    _, w = _width(dtype)
    sign = 1 << (w - 1)
    exponent = {16: 0x7F80, 32: 0x7F800000}[w]
    return (bits >= 0) & (bits < (1 << w)) & ((bits & exponent) != exponent) & (bits != sign)


def _key(bits: torch.Tensor, w: int) -> torch.Tensor:
    """A monotone integer key of grid values (+0 is 0; the next value up is key + 1)."""
    sign = 1 << (w - 1)
    return torch.where(bits >= sign, -(bits & (sign - 1)), bits)


def _bits(key: torch.Tensor, w: int) -> torch.Tensor:
    return torch.where(key >= 0, key, (-key) | (1 << (w - 1)))


def midpoints(bits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rounding interval of each grid value: the midpoints with its lower and upper
    neighbours (float64, exact; +-inf beyond the largest finite values)."""
    _, w = _width(dtype)
    key = _key(bits, w)
    v = values_of(bits, dtype)
    return (v + values_of(_bits(key - 1, w), dtype)) / 2, (v + values_of(_bits(key + 1, w), dtype)) / 2


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """|x| + the rms of x's row (the last dimension; a scalar is its own row), in float64: the
    scale of errors of a computation that sums over a row's terms."""
    xd = x.detach().to(torch.float64)
    if xd.dim() == 0:
        return 2 * xd.abs()
    return xd.abs() + xd.pow(2).mean(dim=-1, keepdim=True).sqrt()


def interval(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`midpoints` of a whole tensor of grid values (as a grid dtype tensor), with the neighbours
    from `torch.nextafter` (toward -inf and +inf; +0's lower neighbour is the least negative
    subnormal, as the keys give it): two vectorised passes instead of the integer dance of
    `midpoints`, which tests/test_grid.py checks it agrees with, edge values included."""
    far = torch.full_like(g, float("inf"))
    gd = g.to(torch.float64)
    return (gd + torch.nextafter(g, -far).to(torch.float64)) / 2, (gd + torch.nextafter(g, far).to(torch.float64)) / 2


def near_boundary(x: torch.Tensor, g: torch.Tensor, tau: float, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The writer's rule: (flat indices, grid bits) of the elements whose own value x lies within
    tau * scale of a midpoint of the grid (their rounding would change under such an error)."""
    lo, hi = interval(g)
    xd, band = x.detach().to(torch.float64), tau * scale
    near = ((xd - lo <= band) | (hi - xd <= band)).reshape(-1)
    idx = torch.nonzero(near).reshape(-1)
    return idx, bits_of(g.reshape(-1)[idx])


@dataclass
class Adjusted:
    """A replayer's grid rounding of its own value, with the log applied."""

    grid: torch.Tensor  # its own rounding, logged elements replaced where the rule allows
    taken: int  # logged elements whose committed value differs from its own rounding, accepted
    refused: list[int]  # flat indices of logged elements whose committed value breaks the rule


def adjust(y: torch.Tensor, idx: torch.Tensor, bits: torch.Tensor, tau: float, scale: torch.Tensor,
           dtype: torch.dtype, what: str = "a value") -> Adjusted:
    """Round the replayer's own `y` to the grid and take a logged element's committed `bits`
    where they differ only if that value is the rounding of some value within tau * scale of y."""
    a = to_grid(y, dtype, what)
    if idx.numel() == 0:
        return Adjusted(a, 0, [])
    flat = a.reshape(-1)
    differs = bits_of(flat[idx]) != bits
    if not bool(differs.any()):
        return Adjusted(a, 0, [])
    idx, bits = idx[differs], bits[differs]
    yv = y.detach().to(torch.float64).reshape(-1)[idx]
    band = tau * scale.expand(y.shape).reshape(-1)[idx]
    v = values_of(bits, dtype)
    lo, hi = midpoints(bits, dtype)
    distance = torch.where(v > yv, lo - yv, yv - hi)  # from y to v's rounding interval
    ok = distance <= band
    grid = flat.clone()
    grid[idx[ok]] = v[ok].to(dtype)
    grid = grid.reshape(a.shape)
    return Adjusted(grid, int(ok.sum()), idx[~ok].tolist())
