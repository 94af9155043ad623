"""Token choice (SPEC.md 8.6.2-8.6.5): greedy, or sampling whose uniform is derived from the seed
and the step by a hash, so any verifier re-derives every token; the seed itself derived from the
client's request nonce, the input and the policy, so the provider cannot choose it; and the sound
test of tolerance mode that asks whether logits within eps of the recomputed ones could have made a
draw pick a token.

    seed = request_seed("blake3", nonce, input_digest, policy.digest("blake3"))
    choose_token(logits, policy, seed, "blake3", step=3)
"""

from __future__ import annotations

import math

import torch

from ..core.encoding import TAG_REQUEST_SEED, TAG_SAMPLE, hash_message, length_prefixed, u64
from ..errors import InputError
from .policy import GenerationPolicy, check_request_nonce


def request_seed(algorithm: str, request_nonce: bytes, input_digest: bytes, policy_digest: bytes) -> int:
    """The sampling seed of a request: the first 8 bytes of H(TAG_REQUEST_SEED || lp(nonce) ||
    input digest || policy digest), big-endian, top bit cleared (in [0, 2^63))."""
    check_request_nonce(request_nonce)
    if len(input_digest) != 32 or len(policy_digest) != 32:
        raise InputError("request seed: the input and policy digests are 32 bytes each")
    d = hash_message(algorithm, TAG_REQUEST_SEED, length_prefixed(request_nonce), input_digest, policy_digest)
    return int.from_bytes(d[:8], "big") >> 1


def sample_uniform(algorithm: str, seed: int, step: int) -> float:
    """The uniform of generation step `step`: the first 8 bytes of H(TAG_SAMPLE || u64(seed) ||
    u64(step)), big-endian, top 53 bits, divided by 2^53: in [0, 1), exact in binary64."""
    d = hash_message(algorithm, TAG_SAMPLE, u64(seed), u64(step))
    return (int.from_bytes(d[:8], "big") >> 11) / float(1 << 53)


def greedy_token(logits: torch.Tensor) -> int:
    """The index of the largest logit; the smallest such index on ties."""
    z = logits.detach().double()
    return int(torch.nonzero(z == z.max())[0, 0])


def nucleus_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Binary64 probabilities after temperature and nucleus filtering (unnormalised inside the
    nucleus, zero outside). The nucleus: tokens sorted by probability (ties by index) are kept
    while the mass before them is below top_p (the first is always kept)."""
    z = logits.detach().double() / float(temperature)
    p = torch.softmax(z, dim=-1)
    if top_p >= 1.0:
        return p
    order = torch.sort(p, descending=True, stable=True).indices
    sorted_p = p[order]
    before = torch.cumsum(sorted_p, dim=0) - sorted_p
    keep_sorted = before < float(top_p)
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return torch.where(keep, p, torch.zeros_like(p))


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, u: float) -> int:
    """Inverse-CDF draw in vocabulary order: the first index j with u * total < C[j], where C is
    the running sum of the nucleus probabilities and total its last value."""
    q = nucleus_probabilities(logits, temperature, top_p)
    c = torch.cumsum(q, dim=0)
    x = torch.tensor([u * float(c[-1])], dtype=torch.float64)
    j = int(torch.searchsorted(c, x, right=True)[0])
    if j >= q.numel():  # rounding at the very top: the last token of the nucleus
        j = int(torch.nonzero(q > 0)[-1, 0])
    return j


def choose_token(logits: torch.Tensor, policy: GenerationPolicy, seed: int | None, algorithm: str, step: int) -> int:
    """Token `step` under `policy`: the argmax, or the draw with the uniform of (seed, step)."""
    if not bool(torch.isfinite(logits).all()):
        raise InputError(f"generation step {step}: the model produced non-finite logits")
    if not policy.sampling:
        return greedy_token(logits)
    if seed is None:
        raise InputError("sampling needs a seed (derived from the client's request nonce)")
    return sample_token(logits, policy.temperature, policy.top_p, sample_uniform(algorithm, seed, step))


def sampled_token_possible(z: torch.Tensor, token: int, temperature: float, top_p: float, u: float,
                           eps: float) -> bool:
    """Could logits within `eps` (each) of `z` make the seeded draw pick `token`? A sound,
    conservative test for tolerance mode: every probability of the provider's distribution lies
    within a factor r = exp(2 eps / T) of ours, which bounds nucleus membership and the
    cumulative sums on both sides of the token (`possible_tokens`, for one token)."""
    return bool(possible_tokens(z, temperature, top_p, u, eps)[token])


def possible_tokens(z: torch.Tensor, temperature: float, top_p: float, u: float, eps: float) -> torch.Tensor:
    """Every token that logits within `eps` (each) of `z` could make the seeded draw pick: every
    probability of the provider's distribution lies within r = exp(2 eps / T) of ours, which
    bounds nucleus membership and the cumulative sums on both sides of each token."""
    p = torch.softmax(z.double() / float(temperature), dim=-1)
    r = math.exp(2.0 * eps / float(temperature))
    n = p.numel()
    if top_p >= 1.0:
        maybe = torch.ones(n, dtype=torch.bool)
        surely = maybe
    else:
        ps = torch.sort(p, descending=True).values
        cs = torch.cumsum(ps, dim=0)
        neg = -ps

        def mass_above(x: torch.Tensor, inclusive: bool) -> torch.Tensor:
            count = torch.searchsorted(neg, -x, right=inclusive)
            return torch.where(count > 0, cs[(count - 1).clamp(min=0)], torch.zeros_like(x))

        sure_above = mass_above(p * r * r, inclusive=False) / r
        maybe_above = (mass_above(p / (r * r), inclusive=True) - p).clamp(min=0) * r
        maybe = (sure_above < top_p) | (p * r * r >= float(ps[0]))
        surely = (maybe_above < top_p) & maybe
    ps_sure = torch.where(surely, p, torch.zeros_like(p))
    ps_maybe = torch.where(maybe, p, torch.zeros_like(p))
    lo = (torch.cumsum(ps_sure, 0) - ps_sure) / r
    hi = torch.cumsum(ps_maybe, 0) * r
    tot_lo, tot_hi = float(ps_sure.sum()) / r, float(ps_maybe.sum()) * r
    return maybe & (u * tot_hi >= lo) & (u * tot_lo < hi)


def needed_logit_tolerance(z: torch.Tensor, token: int, gen: GenerationPolicy, u: float) -> float:
    """The smallest absolute logit error under which `sampled_token_possible` accepts the token
    (bisection; for calibration only, never a verdict)."""
    if sampled_token_possible(z, token, gen.temperature, gen.top_p, u, 0.0):
        return 0.0
    lo, hi = 0.0, max(float(z.abs().max()), 1.0)
    while not sampled_token_possible(z, token, gen.temperature, gen.top_p, u, hi):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return math.inf
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if sampled_token_possible(z, token, gen.temperature, gen.top_p, u, mid) else (mid, hi)
    return hi
