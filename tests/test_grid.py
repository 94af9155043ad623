"""core/grid.py: the vectorised rounding interval agrees with the bit-pattern definition of
SPEC.md 5.4 and 8.13 (keys and neighbours), edge values included; settling and adjusting."""

from __future__ import annotations

import pytest
import torch

from aftune.core import grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interval_agrees_with_the_bit_pattern_midpoints(dtype):
    fi = torch.finfo(dtype)
    edge = torch.tensor([0.0, fi.tiny, -fi.tiny, 2 * fi.tiny, fi.max, -fi.max, 1.0, -1.0, 2.0, 0.5, -0.5,
                         fi.smallest_normal / 2, 1e-45, -1e-45, 1e-40, -1e-40], dtype=torch.float64).to(dtype)
    g = torch.Generator().manual_seed(5)
    spread = torch.randn(50000, generator=g) * 10.0 ** torch.randint(-40, 38, (50000,), generator=g)
    values = torch.cat([spread.to(dtype), edge])
    values = values[torch.isfinite(values)]
    values = torch.where(values == 0, torch.zeros_like(values), values)
    lo, hi = grid.interval(values)
    lo_bits, hi_bits = grid.midpoints(grid.bits_of(values), dtype)
    assert torch.equal(lo, lo_bits) and torch.equal(hi, hi_bits)
    assert float(hi[values == fi.max][0]) == float("inf")


def test_adjust_takes_only_what_the_replay_allows():
    x = torch.tensor([1.0 + 2.0 ** -24 + 2.0 ** -50, 1.0 + 2.0 ** -10], dtype=torch.float64)  # 0: on a midpoint
    g = grid.to_grid(x, torch.float32)
    idx, bits = grid.near_boundary(x, g, 2.0 ** -36, grid.row_scale(x))
    assert idx.tolist() == [0]
    other = grid.bits_of(g.reshape(-1)[idx]) - 1  # the other rounding of element 0: allowed
    adjusted = grid.adjust(x, idx, other, 2.0 ** -36, grid.row_scale(x), torch.float32)
    assert adjusted.taken == 1 and not adjusted.refused
    far = torch.tensor([1], dtype=torch.int64)  # element 1 moved one step: far from a midpoint
    refused = grid.adjust(x, far, grid.bits_of(g.reshape(-1)[far]) + 1, 2.0 ** -36, grid.row_scale(x), torch.float32)
    assert refused.refused == [1] and torch.equal(refused.grid, g)
