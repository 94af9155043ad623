"""The Python API (README "Python API"): the same verdicts as the CLI, as return values and
exceptions, for an honest run and record and for tampered ones."""

from __future__ import annotations

import pytest

import aftune
from conftest import DATA_KIND


def test_api_verdicts_for_honest_and_tampered_runs(model_dir, datasets, tmp_path):
    result = aftune.train(tmp_path / "run", model_dir("llama"), datasets[DATA_KIND["llama"]], steps=4, batch_size=4,
                          seq_len=32, steps_per_block=2)
    key = aftune.PublicKey.load(result.public_key_path)
    report = aftune.verify_run(tmp_path / "run", key, all_blocks=True)
    assert report.verdict == "PASS" and len(report.results) == 4
    one = aftune.verify_run(tmp_path / "run", key, layer_block=1, step_block=0)
    assert one.verdict == "PASS" and len(one.results) == 1
    with pytest.raises(aftune.InputError, match="layer_block"):
        aftune.verify_run(tmp_path / "run", key, layer_block=1)
    other = aftune.SigningKey.generate().public_key
    with pytest.raises(aftune.CommitmentMismatch, match="not by the pinned provider key"):
        aftune.verify_run(tmp_path / "run", other, all_blocks=True)


def test_api_inference_record_passes_and_an_edited_one_is_rejected(model_dir, tmp_path):
    answer = aftune.infer(model_dir("llama"), "Q: what colour is the sky?", record_dir=tmp_path / "rec",
                          generation=aftune.GenerationSettings(max_new_tokens=4))
    key = answer.receipt.key
    report = aftune.verify_inference(tmp_path / "rec", answer.record_id.hex(), model=model_dir("llama"), public_key=key)
    assert report.verdict == "PASS", report.summary()
    text = answer.record_path.read_text().replace('"temperature":0.0', '"temperature":0.5')
    answer.record_path.write_text(text)
    with pytest.raises(aftune.CommitmentMismatch, match="edited after it was written"):
        aftune.verify_inference(tmp_path / "rec", answer.record_id.hex(), model=model_dir("llama"), public_key=key)
