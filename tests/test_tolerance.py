"""Tolerance mode: replays in another precision pass on honest runs, with thresholds calibrated on
honest replays, and still catch a flipped exponent bit. The margins are printed (pytest -s)."""

from __future__ import annotations

import pytest

from aftune.training.calibrate import calibrate
from aftune.training.verify import Verifier
from conftest import failing
from test_tampering import FlipExponentBit

TARGET = "model.layers.2.mlp.up_proj.weight"


@pytest.mark.parametrize("record_dtype, replay_dtype", [("float32", "float64"), ("bfloat16", "float32")])
def test_calibrated_tolerance_passes_honest_and_catches_bitflip(record, record_dtype, replay_dtype):
    honest, key = record("llama", dtype=record_dtype)
    c = calibrate(honest, key, replay_dtype=replay_dtype)
    assert c.max_rel_l2 > 0  # the replay really ran in another precision
    report = Verifier(honest, key, mode="tolerance", replay_dtype=replay_dtype, tolerance=c.suggested).verify_all()
    assert report.verdict == "PASS", report.summary()

    flipped, key2 = record("llama", dtype=record_dtype, deviation=FlipExponentBit(step=2, name=TARGET, bit=None))
    report = Verifier(flipped, key2, mode="tolerance", replay_dtype=replay_dtype, tolerance=c.suggested).verify_all()
    assert failing(report) == [(1, 1)], report.summary()
    bad = next(r for r in report.results if r.verdict == "FAIL")
    honest_elem = c.observed["weights"][1]
    flip_elem = bad.errors_by_kind["weights"][1]
    print(f"\n{record_dtype} replayed in {replay_dtype}: honest weights max element error {honest_elem:.3g} x rms, "
          f"bit flip {flip_elem:.3g} x rms ({flip_elem / honest_elem:.0f}x the honest error); calibration {c.observed}")
    assert flip_elem > c.suggested.limits("weights")[1]  # the flip sits above the calibrated threshold


def test_strict_mode_rejects_another_dtype(record):
    from aftune.errors import InputError

    run, key = record("llama", steps=2)
    with pytest.raises(InputError, match="tolerance"):
        Verifier(run, key, replay_dtype="float64")


def test_lora_run_replayed_in_float64_checks_the_seeded_init(record):
    """A replay in another dtype cannot take the adapters' init from its own model (float64
    draws differ): it re-instantiates them in the run's dtype, and the honest run passes."""
    import torch

    from aftune.training.settings import LoraSettings

    run, key = record("llama", lora=LoraSettings(r=4, alpha=8), steps=4, steps_per_block=2)
    c = calibrate(run, key, replay_dtype="float64")
    report = Verifier(run, key, mode="tolerance", replay_dtype="float64", tolerance=c.suggested).verify_all()
    assert report.verdict == "PASS", report.summary()
    v = Verifier(run, key, mode="tolerance", replay_dtype="float64", tolerance=c.suggested)
    assert v._lora_initial() and all(t.dtype == torch.float32 for t in v._lora_initial().values())
