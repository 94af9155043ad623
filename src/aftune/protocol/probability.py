"""Exact detection probabilities of the challenge strategies (SPEC.md 9.5.1): the chance that a
challenge of K blocks drawn by a strategy hits at least one of the tampered blocks.

    1 - hypergeometric_miss(num_blocks=32, tampered=1, count=8)   # uniform: 0.25
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

import numpy as np

from ..errors import InputError
from .challenge import DEFAULT_EDGE_WEIGHT, STRATEGIES, columns_for



def hypergeometric_miss(num_blocks: int, tampered: int, count: int) -> float:
    """P(no tampered block among K drawn uniformly without replacement) = C(N-m, K) / C(N, K),
    evaluated as the product over the shorter of m and K of (N-K-i)/(N-i) or (N-m-i)/(N-i)
    (the same ratio, no huge integers; relative error below min(m, K) * 2^-53)."""
    n, m, k = num_blocks, tampered, count
    if not 0 <= m <= n or not 0 <= k <= n:
        raise InputError(f"need 0 <= tampered ({m}) <= N ({n}) and 0 <= K ({k}) <= N")
    if m == 0 or k == 0:
        return 1.0
    if m > n - k:
        return 0.0
    a, b = (n - k, m) if m <= k else (n - m, k)
    if b <= 64:
        p = 1.0
        for i in range(b):
            p *= (a - i) / (n - i)
        return p
    i = np.arange(b, dtype=np.float64)
    return float(np.prod((a - i) / (n - i)))


def hypergeometric_miss_exact(num_blocks: int, tampered: int, count: int) -> Fraction:
    """C(N-m, K) / C(N, K) as an exact fraction (for tests and small grids)."""
    return Fraction(math.comb(num_blocks - tampered, count), math.comb(num_blocks, count))


def detection_probability(num_blocks: int, tampered: int, count: int) -> float:
    """Uniform sampling: P(detect) = 1 - C(N-m, K) / C(N, K) (docs/threats.md)."""
    return 1.0 - hypergeometric_miss(num_blocks, tampered, count)


def edge_layer_blocks(num_layer_blocks: int) -> int:
    """How many layer blocks count as 'edge' (first or last) for the weighted strategy: 1 or 2."""
    return min(num_layer_blocks, 2)


def weighted_miss(num_layer_blocks: int, num_step_blocks: int, count: int, edge_tampered: int,
                  interior_tampered: int, edge_weight: int = DEFAULT_EDGE_WEIGHT) -> float:
    """P(miss) for the weighted strategy: Efraimidis-Spirakis top-K keys u^(1/w) are distributed
    as K successive draws without replacement, each block drawn with probability proportional to
    its weight among those left (Efraimidis & Spirakis 2006). Exact recursion over the draws on
    the all-miss path, state i = untampered edge blocks drawn so far (t - i interior):

        p_{t+1}(i+1) += p_t(i) * w (E_u - i) / R,   p_{t+1}(i) += p_t(i) * (I_u - (t - i)) / R,
        R = w (E - i) + (I - (t - i)),

    with E = e*S edge blocks (e = min(L, 2)), I = (L - e)*S interior, E_u, I_u the untampered
    ones; P(miss) = sum_i p_K(i). O(K * min(K, E)) operations."""
    if not 0 <= count <= num_layer_blocks * num_step_blocks:
        raise InputError(f"K = {count} is not in [0, {num_layer_blocks * num_step_blocks}]")
    miss = 1.0
    for k, miss in enumerate(weighted_miss_curve(num_layer_blocks, num_step_blocks, edge_tampered,
                                                  interior_tampered, edge_weight)):
        if k == count or miss == 0.0:
            break
    return miss


def weighted_miss_curve(num_layer_blocks: int, num_step_blocks: int, edge_tampered: int, interior_tampered: int,
                         edge_weight: int):
    """Yield P(miss) of the weighted strategy for K = 0, 1, 2, ... (one recursion serves every K)."""
    L, S, w = num_layer_blocks, num_step_blocks, edge_weight
    e = edge_layer_blocks(L)
    edge, interior = e * S, (L - e) * S
    if not 0 <= edge_tampered <= edge or not 0 <= interior_tampered <= interior:
        raise InputError(f"tampered blocks out of range: {edge_tampered} of {edge} edge blocks, "
                         f"{interior_tampered} of {interior} interior blocks")
    edge_u, interior_u = edge - edge_tampered, interior - interior_tampered
    if interior == 0 or w == 1:  # every weight equal: plain uniform sampling
        for k in range(L * S + 1):
            yield hypergeometric_miss(L * S, edge_tampered + interior_tampered, k)
        return
    width = edge_u + 1  # i never exceeds the untampered edge blocks
    p = np.zeros(width)
    p[0] = 1.0
    yield 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in range(edge_u + interior_u):
            top = min(t, width - 1)
            i = np.arange(top + 1, dtype=np.float64)
            j = t - i
            remaining = w * (edge - i) + (interior - j)
            to_edge = np.where(remaining > 0, w * np.maximum(edge_u - i, 0) / remaining, 0.0)
            to_interior = np.where(remaining > 0, np.maximum(interior_u - j, 0) / remaining, 0.0)
            nxt = np.zeros(width)
            nxt[:top + 1] += p[:top + 1] * to_interior
            up = min(top + 1, width - 1)
            nxt[1:up + 1] += (p[:top + 1] * to_edge)[:up]
            p = nxt
            yield float(p.sum())
    while True:  # more draws than untampered blocks: a tampered one is always drawn
        yield 0.0


def stratified_miss(num_layer_blocks: int, num_step_blocks: int, count: int, per_step_tampered: Iterable[int]) -> float:
    """P(miss) for the stratified strategy. With k, r = divmod(K, S), every step block gets k
    draws and a uniformly random r of them one more; within a step block holding m_s tampered
    blocks the draw misses them with q(m_s, j) = C(L - m_s, j) / C(L, j). Exact recursion over
    the tampered step blocks (the untampered ones contribute 1), state x = extra draws given so
    far among them: the next step block gets an extra draw with probability (r - x) / (S - idx)."""
    L, S, k_total = num_layer_blocks, num_step_blocks, count
    counts = [m for m in per_step_tampered if m]
    if len(counts) > S or any(not 0 < m <= L for m in counts):
        raise InputError(f"per-step tampered counts {counts[:8]} do not fit {S} step blocks of {L} layer blocks")
    if not 0 <= k_total <= L * S:
        raise InputError(f"K = {k_total} is not in [0, {L * S}]")
    k, r = divmod(k_total, S)
    f = np.zeros(r + 1)
    f[0] = 1.0
    x = np.arange(r + 1, dtype=np.float64)
    for idx, m in enumerate(counts):
        extra = (r - x) / (S - idx)
        base, more = hypergeometric_miss(L, m, k), hypergeometric_miss(L, m, k + 1) if k < L else 0.0
        nxt = f * (1.0 - extra) * base
        nxt[1:] += (f * extra * more)[:-1]
        f = nxt
    return float(f.sum())


def placement_detection(strategy: str, count: int, num_layer_blocks: int, num_step_blocks: int,
                        tampered: Iterable[tuple[int, int]], *, edge_weight: int = DEFAULT_EDGE_WEIGHT) -> float:
    """P(detect) for a concrete set of tampered blocks (layer_block, step_block)."""
    L, S = num_layer_blocks, num_step_blocks
    blocks = set(tampered)
    if any(not (0 <= l < L and 0 <= s < S) for l, s in blocks):
        raise InputError("a tampered block lies outside the grid")
    if strategy == "all":
        return 1.0 if blocks else 0.0
    if strategy == "uniform":
        return 1.0 - hypergeometric_miss(L * S, len(blocks), count)
    if strategy == "weighted":
        edge = sum(1 for l, _ in blocks if l in (0, L - 1))
        return 1.0 - weighted_miss(L, S, count, edge, len(blocks) - edge, edge_weight)
    if strategy == "columns":
        return 1.0 - hypergeometric_miss(S, len({s for _, s in blocks}), columns_for(count, L))
    if strategy == "stratified":
        per_step: dict[int, int] = {}
        for _, s in blocks:
            per_step[s] = per_step.get(s, 0) + 1
        return 1.0 - stratified_miss(L, S, count, per_step.values())
    raise InputError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
