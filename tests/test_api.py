"""The Python API (README "Python API"): the same verdicts as the CLI, as return values and
exceptions, for an honest run and record and for tampered ones."""

from __future__ import annotations

import pytest

import aftune
from conftest import DATA_KIND


def test_api_verdicts_for_honest_and_tampered_runs(model_dir, datasets, tmp_path):
    model, data = model_dir("llama"), datasets[DATA_KIND["llama"]]
    agreement = aftune.agree(model, data, steps=4, batch_size=4, seq_len=32, steps_per_block=2, boundaries="stored",
                             out=tmp_path / "agreement.json")
    result = aftune.train(tmp_path / "run", model, data, agreement=tmp_path / "agreement.json")
    key = aftune.PublicKey.load(result.public_key_path)
    report = aftune.verify_run(tmp_path / "run", key, agreement, all_blocks=True)
    assert report.verdict == "PASS" and len(report.results) == 4
    assert report.to_json()["agreement"] == agreement.digest().hex()
    one = aftune.verify_run(tmp_path / "run", key, agreement, layer_block=1, step_block=0)
    assert one.verdict == "PASS" and len(one.results) == 1
    with pytest.raises(aftune.InputError, match="layer_block"):
        aftune.verify_run(tmp_path / "run", key, agreement, layer_block=1)
    with pytest.raises(aftune.InputError, match="aftune agree"):
        aftune.verify_run(tmp_path / "run", key, all_blocks=True)  # no agreement: refused
    other = aftune.SigningKey.generate().public_key
    wrong = aftune.verify_run(tmp_path / "run", other, agreement, all_blocks=True)  # a FAIL, not an exception
    assert wrong.verdict == "FAIL" and "not by the pinned provider key" in wrong.summary()
    # the same run checked against another agreement (other learning rate) FAILs naming the field
    other_lr = aftune.agree(model, data, steps=4, batch_size=4, seq_len=32, steps_per_block=2, lr=5e-3)
    report = aftune.verify_run(tmp_path / "run", key, other_lr, all_blocks=True)
    assert report.verdict == "FAIL" and any(f.tensor == "config.settings.lr" for f in report.errors)


def test_api_inference_record_passes_and_an_edited_one_is_rejected(model_dir, tmp_path):
    prompt = "Q: what colour is the sky?"
    policy = aftune.GenerationPolicy.for_model(model_dir("llama"), max_new_tokens=4)
    answer = aftune.infer(model_dir("llama"), prompt, record_dir=tmp_path / "rec", policy=policy)
    key = answer.receipt.key
    ask = dict(model=model_dir("llama"), public_key=key, prompt=prompt, policy=policy)
    report = aftune.verify_inference(tmp_path / "rec", answer.record_id, **ask)
    assert report.verdict == "PASS" and not report.notes, report.summary()
    with pytest.raises(aftune.InputError, match="generation policy you asked for"):  # no PASS on half a check
        aftune.verify_inference(tmp_path / "rec", answer.record_id, model=model_dir("llama"), prompt=prompt)
    text = answer.record_path.read_text().replace('"text":"', '"text":"an edited answer: ')
    answer.record_path.write_text(text)
    edited = aftune.verify_inference(tmp_path / "rec", answer.record_id, **ask)  # a FAIL, not an exception
    assert edited.verdict == "FAIL" and "edited after it was written" in edited.summary()
