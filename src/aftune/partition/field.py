"""The prime field Z_p in which offloaded products are computed exactly, and its randomness.

    from aftune.partition.field import Field
    f = Field()                                   # p = 2^42 - 11
    z = f.matmul_small(f.uniform((3, 64)), w_q.T)  # (b @ W^T) mod p, exact

Every offloaded product is an integer product reduced mod a prime `p < 2^42` (SPEC.md 11.3).
torch has no modular GEMM, and CUDA has no int64 GEMM, so products are computed in binary64,
which is exact for integers below 2^53, on 21-bit limbs:

- `matmul_small(a, b)`: `a` in [0, p), `b` signed with |b| <= 2^15 - 1 (quantized weights).
  `a = a1 * 2^21 + a0`; each limb product sums at most m terms below 2^21 * 2^15, exact while
  m <= MAX_INNER_SMALL = 2^17. One GEMM of the stacked limbs [a1; a0] (2n rows).
- `matmul(a, b)`: both in [0, p) (Freivalds checks). The four limb products come from one GEMM
  [a1; a0] @ [b1 | b0] per chunk of at most 2^11 inner terms (2^11 * (2^21 - 1)^2 < 2^53).

Limb results are reduced mod p in int64 and recombined with 2^21 and `2^42 mod p`; the field
requires `(p - 1) * (2^42 mod p) < 2^63` so that no int64 product overflows.

Secret randomness (blinding masks, Freivalds vectors) comes from the operating system's CSPRNG
(`os.urandom`) by rejection sampling, so it is exactly uniform on Z_p; never from torch's
Mersenne Twister, whose state an observer of enough outputs can reconstruct.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import InputError

DEFAULT_MODULUS = (1 << 42) - 11  # the largest prime below 2^42
MAX_MODULUS_BITS = 42
LIMB_BITS = 21
SMALL_OPERAND_MAX = (1 << 15) - 1  # |quantized weight| bound of matmul_small
MAX_INNER_SMALL = 1 << 17  # (2^21 - 1) * (2^15 - 1) * 2^17 < 2^53
CHUNK_FULL = 1 << 11  # (2^21 - 1)^2 * 2^11 < 2^53
_EXACT = 1 << 53
_INT64_MAX = (1 << 63) - 1
_LIMB_MASK = (1 << LIMB_BITS) - 1


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3 * 10^24 (the first 13 prime bases suffice)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for b in bases:
        if n % b == 0:
            return n == b
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@dataclass(frozen=True)
class Field:
    """Z_p for a prime 2 < p < 2^42, with exact modular products of int64 matrices."""

    modulus: int = DEFAULT_MODULUS

    def __post_init__(self) -> None:
        p = self.modulus
        if not isinstance(p, int) or isinstance(p, bool) or not 2 < p < (1 << MAX_MODULUS_BITS):
            raise InputError(f"the field modulus must be an integer in (2, 2^{MAX_MODULUS_BITS}), got {p!r}")
        if not is_prime(p):
            raise InputError(f"the field modulus {p} is not prime: Freivalds' bound 1/p needs a prime field")
        if (p - 1) * self.c42 > _INT64_MAX:
            raise InputError(f"modulus {p}: (p - 1) * (2^42 mod p) overflows int64; use a prime below 2^31 "
                             f"or one just below 2^42 (default {DEFAULT_MODULUS})")

    @property
    def half(self) -> int:
        """Largest |value| a centred element can hold: (p - 1) / 2."""
        return (self.modulus - 1) // 2

    @property
    def c42(self) -> int:
        return (1 << (2 * LIMB_BITS)) % self.modulus

    # --- randomness ----------------------------------------------------------------------
    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Int64 tensor of independent elements uniform on [0, p), from os.urandom."""
        n = 1
        for d in shape:
            n *= int(d)
        mask = (1 << self.modulus.bit_length()) - 1
        out = _random_int64(n) & mask
        bad = torch.nonzero(out >= self.modulus).flatten()
        while bad.numel():  # rejection sampling: each draw is rejected with probability < 1/2
            out[bad] = _random_int64(bad.numel()) & mask
            bad = bad[out[bad] >= self.modulus]
        return out.reshape(shape)

    # --- element-wise --------------------------------------------------------------------
    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """t mod p in [0, p) (int64)."""
        return torch.remainder(t.to(torch.int64), self.modulus)

    def lift(self, t: torch.Tensor) -> torch.Tensor:
        """The centred representative in [-(p-1)/2, (p-1)/2] of elements in [0, p)."""
        return torch.where(t > self.half, t - self.modulus, t)

    def in_range(self, t: torch.Tensor) -> bool:
        return bool(((t >= 0) & (t < self.modulus)).all())

    # --- products ------------------------------------------------------------------------
    def matmul_small(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ b) mod p for a in [0, p) [n, m] and |b| <= 2^15 - 1 [m, k] (int64, or binary64
        holding integers: the caller may keep b converted), exactly: one binary64 GEMM of the
        stacked limbs [a1; a0] by b."""
        n, m = a.shape
        if m > MAX_INNER_SMALL:
            raise InputError(f"inner dimension {m} exceeds {MAX_INNER_SMALL}: the binary64 limb "
                             "products would no longer be exact")
        b64 = b if b.dtype == torch.float64 else b.to(torch.float64)
        stacked = torch.cat([a >> LIMB_BITS, a & _LIMB_MASK]).to(torch.float64)
        prod = torch.remainder(_exact_int(stacked @ b64), self.modulus)  # [2n, k]: a1 b, a0 b
        hi, lo = prod[:n], prod[n:]
        return torch.remainder(torch.remainder(hi * (1 << LIMB_BITS), self.modulus) + lo, self.modulus)

    def limbs(self, b: torch.Tensor) -> torch.Tensor:
        """b in [0, p) [m, k] as binary64 [m, 2k]: its high limbs, then its low limbs (the right
        operand of `matmul`, precomputed once for a fixed b)."""
        return torch.cat([b >> LIMB_BITS, b & _LIMB_MASK], dim=1).to(torch.float64)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ b) mod p for a in [0, p) [n, m] and b in [0, p) [m, k] (int64, or `limbs(b)`),
        exactly: per inner chunk of at most 2^11, one binary64 GEMM [a1; a0] @ [b1 | b0]."""
        p = self.modulus
        bl = b if b.dtype == torch.float64 else self.limbs(b)
        n, m, k = a.shape[0], a.shape[1], bl.shape[1] // 2
        acc = torch.zeros(n, k, dtype=torch.int64, device=a.device)
        for lo_i in range(0, m, CHUNK_FULL):
            ac = a[:, lo_i:lo_i + CHUNK_FULL]
            stacked = torch.cat([ac >> LIMB_BITS, ac & _LIMB_MASK]).to(torch.float64)
            prod = torch.remainder(_exact_int(stacked @ bl[lo_i:lo_i + CHUNK_FULL]), p)  # [[a1b1, a1b0], [a0b1, a0b0]]
            t2, t0 = prod[:n, :k], prod[n:, k:]
            t1 = torch.remainder(prod[:n, k:] + prod[n:, :k], p)
            part = torch.remainder(t2 * self.c42, p) + torch.remainder(t1 * (1 << LIMB_BITS), p) + t0
            acc = torch.remainder(acc + part, p)
        return acc

    def describe(self) -> str:
        return f"Z_p, p = {self.modulus} ({self.modulus.bit_length()} bits)"


def _random_int64(n: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64) if n else torch.empty(0, dtype=torch.int64)


def _exact_int(t: torch.Tensor) -> torch.Tensor:
    """A binary64 GEMM result as int64; the callers' bounds keep every value below 2^53."""
    return t.to(torch.int64)
