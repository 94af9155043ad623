"""Partitioned execution, in-process parts: the field, quantization, Freivalds' bound, blinding
and the wire format. No process is started; everything runs in a second or two.

Some tests draw from the operating system's CSPRNG (as the trusted side does), so they are not
seeded; their acceptance bands are 5 standard deviations or p-values of 1e-6, which a correct
implementation fails with probability below 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from aftune.errors import InputError
from aftune.partition.blinding import MaskPool
from aftune.partition.errors import IntegrityFailure
from aftune.partition.field import DEFAULT_MODULUS, Field, is_prime
from aftune.partition.freivalds import FreivaldsCheck, FreivaldsSpec
from aftune.partition.quantize import (QuantSpec, activation_levels, dequantize, product_error_bound,
                                       quantize_activation, quantize_weight)
from aftune.partition.wire import FrameError, decode, encode


def _reference_product(a: torch.Tensor, b: torch.Tensor, p: int) -> list[list[int]]:
    rows, inner, cols = a.shape[0], a.shape[1], b.shape[1]
    return [[sum(int(a[i, k]) * int(b[k, j]) for k in range(inner)) % p for j in range(cols)] for i in range(rows)]


# --- the field -----------------------------------------------------------------------------------

def test_default_modulus_is_the_largest_prime_below_2_42():
    assert DEFAULT_MODULUS == 2**42 - 11 and is_prime(DEFAULT_MODULUS)
    assert not any(is_prime(n) for n in range(DEFAULT_MODULUS + 1, 2**42))


@pytest.mark.parametrize("p", [DEFAULT_MODULUS, 2**31 - 1, 257])
def test_field_products_are_exact(p):
    f = Field(p)
    a = f.uniform((2, 2100))  # > one chunk of matmul
    w = torch.randint(-(2**15 - 1), 2**15, (2100, 3))
    s = f.uniform((2100, 2))
    assert f.matmul_small(a, w).tolist() == _reference_product(a, w, p)
    assert f.matmul(a, s).tolist() == _reference_product(a, s, p)
    assert f.matmul(a, f.limbs(s)).tolist() == _reference_product(a, s, p)


def test_field_extremes_do_not_overflow():
    f = Field()
    top = f.modulus - 1
    assert f.matmul(torch.full((1, 4096), top), torch.full((4096, 1), top)).item() == 4096 * top * top % f.modulus
    inner = 1 << 17
    got = f.matmul_small(torch.full((1, inner), top), torch.full((inner, 1), -(2**15 - 1))).item()
    assert got == inner * top * -(2**15 - 1) % f.modulus


def test_field_refuses_bad_moduli():
    for bad in (256, 2**42 + 15, 1, 2**40 + 1):
        with pytest.raises(InputError):
            Field(bad)


def test_uniform_is_in_range_and_uniform():
    f = Field(257)
    x = f.uniform((200_000,))
    assert int(x.min()) >= 0 and int(x.max()) < 257
    counts = torch.bincount(x, minlength=257).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 256 + 5 * math.sqrt(2 * 256)  # 5 sigma of the chi-square(256) statistic


# --- quantization -----------------------------------------------------------------------------

def test_quantized_product_is_within_its_stated_bound():
    torch.manual_seed(0)
    f, spec = Field(), QuantSpec()
    w = torch.randn(48, 64) * 0.05
    x = torch.randn(5, 64) * 3
    qw = quantize_weight(w, spec, site="fc")
    levels = activation_levels(qw, f, spec, site="fc")
    x_q, s_x = quantize_activation(x, levels, site="fc", step=0)
    y = dequantize(f.lift(f.matmul_small(f.reduce(x_q), qw.q.T)), s_x, qw.scale)
    exact = x.double() @ w.double().T
    err = float((y - exact).abs().max())
    bound = product_error_bound(qw, x, s_x)
    assert 0 < err <= bound
    assert bound < 1e-3 * float(exact.abs().max())  # the bound is also small


def test_worst_case_input_does_not_wrap_around():
    """The activation budget makes even the largest possible product exact: every x_q at +-A
    aligned with the signs of the row of largest L1 norm."""
    f, spec = Field(), QuantSpec(weight_bits=16, activation_bits=40)
    w = torch.randn(8, 4096)
    qw = quantize_weight(w, spec, site="wide")
    levels = activation_levels(qw, f, spec, site="wide")
    row = int(qw.q.abs().sum(dim=1).argmax())
    x_q = torch.sign(qw.q[row]).unsqueeze(0) * levels
    y = f.lift(f.matmul_small(f.reduce(x_q), qw.q.T))
    assert y[0, row].item() == int((x_q[0] * qw.q[row]).sum()) == levels * qw.row_l1_max
    assert levels * qw.row_l1_max <= f.half


def test_too_small_a_field_is_refused_naming_the_layer():
    qw = quantize_weight(torch.randn(4, 64), QuantSpec(), site="model.layers.0.mlp.up_proj")
    with pytest.raises(InputError, match="model.layers.0.mlp.up_proj"):
        activation_levels(qw, Field(257), QuantSpec(), site="model.layers.0.mlp.up_proj")


def test_non_finite_activations_are_refused():
    with pytest.raises(InputError, match="layer lm_head, step 4"):
        quantize_activation(torch.tensor([[1.0, float("nan")]]), 100, site="lm_head", step=4)


# --- Freivalds ---------------------------------------------------------------------------------

def _small_case(f: Field):
    w_q = torch.randint(-3, 4, (4, 3))
    operand = f.uniform((2, 3))
    return w_q, operand, f.matmul_small(operand, w_q.T)


def test_freivalds_accepts_the_honest_product():
    f = Field()
    w_q = torch.randint(-(2**15 - 1), 2**15, (96, 64))
    operand = f.uniform((7, 64))
    FreivaldsCheck(f, w_q, FreivaldsSpec(2), site="fc").verify(operand, f.matmul_small(operand, w_q.T), step=0)


@pytest.mark.parametrize("p,k,trials", [(11, 1, 600), (5, 2, 600)])
def test_single_wrong_element_detection_rate_matches_the_bound(p, k, trials):
    """A single wrong element passes a k-vector check exactly when the k secret entries at its
    column are all zero: probability p^-k. Trials with fresh secrets through `verify`, the
    measured miss rate compared with p^-k within 5 sigma."""
    f = Field(p)
    spec = FreivaldsSpec(k)
    misses = 0
    for _ in range(trials):
        w_q, operand, honest = _small_case(f)
        wrong = honest.clone()
        wrong[1, 2] = (wrong[1, 2] + int(torch.randint(1, p, ()))) % p
        try:
            FreivaldsCheck(f, w_q, spec, site="fc").verify(operand, wrong, step=0)
            misses += 1
        except IntegrityFailure as exc:
            assert exc.check == "freivalds" and exc.site == "fc"
    _assert_rate(misses, trials, spec.miss_probability(f))


def _assert_rate(misses: int, trials: int, bound: float) -> None:
    sigma = math.sqrt(trials * bound * (1 - bound))
    assert abs(misses - trials * bound) <= 5 * sigma, (misses, trials * bound)


@pytest.mark.parametrize("p", [257, 1021])
def test_detection_rate_over_many_secret_vectors(p):
    """The same measurement at p = 2^8..2^10 over 65,536 independent secret vectors (one check
    with that many repetitions: each column is a fresh uniform vector): single wrong elements and
    wrong rows pass a one-vector check at rate 1/p, and a k = 2 check (pairs of columns) at 1/p^2."""
    f = Field(p)
    trials = 1 << 16  # the most repetitions a spec allows
    w_q, operand, honest = _small_case(f)
    check = FreivaldsCheck(f, w_q, FreivaldsSpec(trials), site="fc")
    one = honest.clone()
    one[0, 3] = (one[0, 3] + 1) % p
    row = honest.clone()
    row[1] = (row[1] * 2 + 1) % p
    for wrong in (one, row):
        passed = check.repetitions_passed(operand, wrong)
        _assert_rate(int(passed.sum()), trials, 1 / p)
    pairs = check.repetitions_passed(operand, one).reshape(-1, 2).all(dim=1)
    assert int(pairs.sum()) <= 5 + trials // 2 * 5 / p**2  # expected 0.1-1.5 at these p
    assert bool(check.repetitions_passed(operand, honest).all())


def test_freivalds_failure_names_layer_step_row():
    f = Field()
    w_q, operand, honest = _small_case(f)
    wrong = honest.clone()
    wrong[1] = wrong[1] * 2 % f.modulus
    check = FreivaldsCheck(f, w_q, FreivaldsSpec(2), site="model.layers.3.self_attn.o_proj")
    with pytest.raises(IntegrityFailure, match=r"layer model\.layers\.3\.self_attn\.o_proj, step 5 \(freivalds\).*row 1"):
        check.verify(operand, wrong, step=5)
    with pytest.raises(IntegrityFailure, match="range"):
        check.verify(operand, torch.full_like(honest, f.modulus), step=5)
    with pytest.raises(IntegrityFailure, match="shape"):
        check.verify(operand, honest[:, :-1], step=5)


# --- blinding ----------------------------------------------------------------------------------

def _chi2_p(a: torch.Tensor, b: torch.Tensor, bins: int) -> float:
    from scipy.stats import chi2_contingency

    table = torch.stack([torch.bincount(a, minlength=bins), torch.bincount(b, minlength=bins)])
    return float(chi2_contingency(table[:, table.sum(dim=0) > 0].numpy())[1])  # bins seen at least once


def test_blinded_operand_is_independent_of_the_input():
    """Two very different inputs (all zeros; a ramp at the largest magnitudes) are blinded with
    fresh masks many times. Justification: b = x + r mod p with r uniform is uniform whatever x
    is, so (1) each sample of b is uniform on Z_p (chi-square goodness of fit), (2) the two
    samples come from the same distribution (chi-square homogeneity), (3) b is uncorrelated with
    x element by element. The same test without blinding fails, so it has power."""
    from scipy.stats import chisquare, pearsonr

    f = Field(257)
    w_q = torch.randint(-1, 2, (2, 16))
    rows = 2000
    zeros = torch.zeros(rows, 16, dtype=torch.int64)
    ramp = (torch.arange(16) * 8 - 60).repeat(rows, 1)  # -60 .. 60, far from zero
    b0, _ = MaskPool(f, w_q, site="fc").blind(zeros)
    b1, _ = MaskPool(f, w_q, site="fc").blind(ramp)
    for b in (b0, b1):
        assert chisquare(torch.bincount(b.flatten(), minlength=257).numpy()).pvalue > 1e-6
    assert _chi2_p(b0.flatten(), b1.flatten(), 257) > 1e-6
    x = torch.randint(-100, 101, (rows, 16))
    bx, _ = MaskPool(f, w_q, site="fc").blind(x)
    assert abs(pearsonr(x.flatten().numpy(), bx.flatten().numpy())[0]) < 5 / math.sqrt(x.numel())
    plain, _ = MaskPool(f, w_q, site="fc", unsafe_no_blinding=True).blind(x)
    assert pearsonr(x.flatten().numpy(), f.lift(plain).flatten().numpy())[0] > 0.99
    assert _chi2_p(MaskPool(f, w_q, site="fc", unsafe_no_blinding=True).blind(zeros)[0].flatten(),
                   MaskPool(f, w_q, site="fc", unsafe_no_blinding=True).blind(ramp)[0].flatten(), 257) < 1e-6


def test_blinding_round_trip_and_one_time_masks():
    f = Field()
    w_q = torch.randint(-(2**15 - 1), 2**15, (8, 16))
    pool = MaskPool(f, w_q, site="fc")
    pool.precompute(3)
    x = torch.randint(-1000, 1000, (2, 16))
    b1, u1 = pool.blind(x)
    b2, u2 = pool.blind(x)  # one row precomputed is left: one drawn online
    assert pool.rows_online == 1 and not torch.equal(b1, b2)
    for b, u in ((b1, u1), (b2, u2)):
        assert torch.equal(pool.unblind(f.matmul_small(b, w_q.T), u), x @ w_q.T)


def test_reused_masks_leak_differences(caplog):
    """With one mask per row reused (unsafe), b1 - b2 = x1 - x2 mod p exactly: the worker learns
    every difference of inputs; with one-time masks it does not."""
    f = Field()
    w_q = torch.randint(-5, 6, (4, 16))
    x1, x2 = torch.randint(-50, 50, (3, 16)), torch.randint(-50, 50, (3, 16))
    reused = MaskPool(f, w_q, site="fc", unsafe_reuse_masks=True)
    assert "UNSAFE" in caplog.text
    leak = f.lift(torch.remainder(reused.blind(x1)[0] - reused.blind(x2)[0], f.modulus))
    assert torch.equal(leak, x1 - x2)
    fresh = MaskPool(f, w_q, site="fc")
    diff = f.lift(torch.remainder(fresh.blind(x1)[0] - fresh.blind(x2)[0], f.modulus))
    assert not torch.equal(diff, x1 - x2)


# --- wire format ------------------------------------------------------------------------------

def test_frames_round_trip_every_dtype():
    tensors = {"i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "f": torch.randn(3),
               "b": torch.tensor([True, False]), "u": torch.arange(4, dtype=torch.uint8), "e": torch.zeros(0, 5)}
    msg = decode(encode("x", {"site": "a", "step": 2}, tensors), max_bytes=1 << 20)
    assert msg.kind == "x" and msg.fields == {"site": "a", "step": 2}
    for k, t in tensors.items():
        assert msg.tensors[k].dtype == t.dtype and torch.equal(msg.tensors[k], t)


def _frame(header: bytes, payload: bytes = b"") -> bytes:
    import struct

    return b"AFTP" + struct.pack(">II", 1, len(header)) + header + payload


@pytest.mark.parametrize("mutate,why", [
    (lambda fr: b"XXXX" + fr[4:], "magic"),
    (lambda fr: fr[:-1], "past the end"),
    (lambda fr: fr + b"\x00", "stray"),
    (lambda fr: _frame(b'{"fields":{},"kind":"r","tensors":[["t","Q64",[2,3]]]}', fr[-48:]), "dtype"),
    (lambda fr: _frame(b'{"fields":{},"kind":"r","tensors":[["t","I64",[2,-3]]]}', fr[-48:]), "shape"),
    (lambda fr: _frame(b'{"fields":{},"kind":"r","tensors":[["t","I64",[6]],["t","I64",[0]]]}', fr[-48:]), "twice"),
])
def test_hostile_frames_are_rejected(mutate, why):
    frame = encode("result", {"site": "a"}, {"tensor": torch.zeros(2, 3, dtype=torch.int64)})
    with pytest.raises(FrameError, match=why):
        decode(mutate(frame), max_bytes=1 << 20)
    with pytest.raises(FrameError, match="exceeds"):
        decode(frame, max_bytes=10)


def test_duplicate_keys_in_a_header_are_rejected():
    with pytest.raises(FrameError, match="strict JSON"):
        decode(_frame(b'{"fields":{},"kind":"a","kind":"b","tensors":[]}'), max_bytes=1 << 10)


def test_spec_vectors():
    """SPEC.md 11.9: the record id, a frame's bytes and a crossing digest."""
    from aftune.core.encoding import tensor_digest
    from aftune.partition.record import record_id

    body = b'{"format":"aftune.partition.v1"}'
    assert record_id("blake3", body).hex() == "e21db484bda16784a498a5592597ccd6f81685ae83dbf7b4ff753938c053cf63"
    assert record_id("sha256", body).hex() == "d9c998582444bccf0b13ed015120141232fc6572e48c2d31bc998681c7062d15"
    t = torch.tensor([[5, DEFAULT_MODULUS - 1]], dtype=torch.int64)
    frame = encode("result", {"site": "lm_head", "step": 2}, {"tensor": t})
    header = b'{"fields":{"site":"lm_head","step":2},"kind":"result","tensors":[["tensor","I64",[1,2]]]}'
    assert frame == bytes.fromhex("414654500000000100000059") + header + bytes.fromhex("0500000000000000f4ffffffff030000")
    name = "crossing/000007/lm_head/from-worker"
    assert tensor_digest(name, t, "blake3").hex() == "3f0c713856b4d233b6c43a1cad52085a45d77afdefeef04d76bb1ebfe2ae987a"
    assert tensor_digest(name, t, "sha256").hex() == "457f468a9b8aa809ae2c5582e3dd7cf1cbd177b0a208d11e418e685a56158636"
