"""Tolerance mode: replays in another precision pass on honest runs, with thresholds calibrated on
honest replays, and still catch a flipped exponent bit. The margins are printed (pytest -s)."""

from __future__ import annotations

import pytest

from aftune.errors import InputError
from aftune.training.calibrate import calibrate
from conftest import agreement_for, failing, verifier
from test_tampering import FlipExponentBit

TARGET = "model.layers.2.mlp.up_proj.weight"


@pytest.mark.parametrize("record_dtype, replay_dtype", [("float32", "float64"), ("bfloat16", "float32")])
def test_calibrated_tolerance_passes_honest_and_catches_bitflip(record, record_dtype, replay_dtype):
    honest, key = record("llama", dtype=record_dtype)
    c = calibrate(honest, key, replay_dtype=replay_dtype, agreement=agreement_for(honest))
    assert c.max_rel_l2 > 0  # the replay really ran in another precision
    report = verifier(honest, key, mode="tolerance", replay_dtype=replay_dtype, tolerance=c.suggested).verify_all()
    assert report.verdict == "PASS", report.summary()

    flipped, key2 = record("llama", dtype=record_dtype, deviation=FlipExponentBit(step=2, name=TARGET, bit=None))
    report = verifier(flipped, key2, mode="tolerance", replay_dtype=replay_dtype, tolerance=c.suggested).verify_all()
    assert failing(report) == [(1, 1)], report.summary()
    bad = next(r for r in report.results if r.verdict == "FAIL")
    honest_elem = c.observed["weights"][1]
    flip_elem = bad.errors_by_kind["weights"][1]
    print(f"\n{record_dtype} replayed in {replay_dtype}: honest weights max element error {honest_elem:.3g} x magnitude, "
          f"bit flip {flip_elem:.3g} x magnitude ({flip_elem / honest_elem:.0f}x the honest error); calibration {c.observed}")
    assert flip_elem > c.suggested.limits("weights")[1]  # the flip sits above the calibrated threshold


def test_strict_mode_rejects_another_dtype(record):
    from aftune.errors import InputError

    run, key = record("llama", steps=2)
    with pytest.raises(InputError, match="tolerance"):
        verifier(run, key, replay_dtype="float64")


def test_lora_run_replayed_in_float64_checks_the_seeded_init(record):
    """A replay in another dtype cannot take the adapters' init from its own model (float64
    draws differ): it re-instantiates them in the run's dtype, and the honest run passes."""
    import torch

    from aftune.training.settings import LoraSettings

    run, key = record("llama", lora=LoraSettings(r=4, alpha=8), steps=4, steps_per_block=2)
    c = calibrate(run, key, replay_dtype="float64", agreement=agreement_for(run))
    report = verifier(run, key, mode="tolerance", replay_dtype="float64", tolerance=c.suggested).verify_all()
    assert report.verdict == "PASS", report.summary()
    v = verifier(run, key, mode="tolerance", replay_dtype="float64", tolerance=c.suggested)
    assert v._lora_initial() and all(t.dtype == torch.float32 for t in v._lora_initial().values())


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0.0, -float("inf")])
@pytest.mark.parametrize("field", ["rel_l2", "max_elem", "logit"])
def test_thresholds_must_be_finite_and_positive(field, value):
    """One Tolerance for training and inference: a threshold that would accept everything (inf,
    nan) or nothing (zero, negative) is bad input before anything is compared."""
    from aftune.verdict.comparison import Tolerance

    with pytest.raises(InputError, match=f"invalid tolerance: {field} must be a finite positive number"):
        Tolerance(**{field: value})
    with pytest.raises(InputError, match="activation.rel_l2 must be a finite positive number"):
        Tolerance(per_kind=(("activation", value, 1e-2),))
    assert Tolerance(**{field: 0.5}).to_json()[field] == 0.5  # honest values still build


@pytest.mark.parametrize("option", [("--rel-l2", "nan"), ("--rel-l2", "inf"), ("--max-elem", "-1"),
                                    ("--rel-l2", "0")])
def test_verify_cli_rejects_bad_thresholds_with_exit_2(record, option):
    from conftest import agreement_path, invoke

    run, key = record("llama", steps=2)
    r = invoke("verify", run, "--agreement", agreement_path(run), "--public-key", key.text, "--all",
               "--mode", "tolerance", *option)
    assert r.exit_code == 2, r.output
    assert "must be a finite positive number" in r.output
    # and thresholds given in strict mode are refused rather than ignored
    r = invoke("verify", run, "--agreement", agreement_path(run), "--public-key", key.text, "--all", "--rel-l2", "1e-3")
    assert r.exit_code == 2 and "apply to --mode tolerance" in r.output


def test_verify_inference_cli_rejects_bad_thresholds_with_exit_2(model_dir, tmp_path):
    from conftest import invoke
    from test_inference import infer

    infer(model_dir("llama"), tmp_path / "rec")
    asked = ("--prompt", "Q: what colour is the sky?", "--max-new-tokens", 6)  # what the client asked (test_inference)
    for option in (("--logit-tol", "inf"), ("--rel-l2", "nan"), ("--max-elem", "-0.5"), ("--logit-tol", "0")):
        r = invoke("verify-inference", tmp_path / "rec", "--all", "--model", model_dir("llama"),
                   "--mode", "tolerance", *option, *asked)
        assert r.exit_code == 2, r.output
        assert "must be a finite positive number" in r.output
    r = invoke("verify-inference", tmp_path / "rec", "--all", "--model", model_dir("llama"), "--mode", "tolerance",
               *asked)
    assert r.exit_code == 0, r.output  # the defaults of the record's dtype
