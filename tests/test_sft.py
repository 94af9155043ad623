"""Supervised fine-tuning as TRL defines it, in aftune's loop (data/sft.py, SPEC.md 4.4.1): the
chat template and the loss mask are agreed, committed and rebuilt by the verifier.

    PYTHONPATH=src python -m pytest tests/test_sft.py -p no:cacheprovider -x -q -n 0
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from aftune.data import load_dataset
from aftune.data.batches import build_batch
from aftune.data.sft import SftSettings, accumulation_weights, sft_example
from aftune.errors import InputError
from aftune.models.loading import tokenizer_files, tokenizer_from_files
from aftune.training.agreement import Agreement, make_agreement
from aftune.training.settings import TrainSettings
from aftune.training.train import Deviation, train
from aftune.training.verify import Verifier

from conftest import failing

# a ChatML-like template whose assistant turns are marked for assistant_only_loss
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}"
            "{{ m['content'] }}<|eos|>{% endgeneration %}\n{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
QA = [("How many letters are in 'castle'?", "6."), ("What is 18 minus 3?", "15."), ("Capital of Arcadia?", "Lyra."),
      ("What is 2 plus 2?", "4."), ("Spell cat backwards.", "tac."), ("What colour is the sky?", "Blue.")]


@pytest.fixture(scope="module")
def chat_model(model_dir, tmp_path_factory):
    """The tiny llama with TEMPLATE as its chat template."""
    d = tmp_path_factory.mktemp("chat") / "llama"
    shutil.copytree(model_dir("llama"), d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return d


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sftdata")
    chat, pc, pc_text = root / "chat.jsonl", root / "pc.jsonl", root / "pc_text.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                        "content": a}]}) + "\n"
                            for q, a in QA * 2))
    pc.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                      "completion": [{"role": "assistant", "content": a}]}) + "\n" for q, a in QA * 2))
    pc_text.write_text("".join(json.dumps({"prompt": f"Q: {q} A:", "completion": f" {a}"}) + "\n" for q, a in QA * 2))
    return {"chat": chat, "pc": pc, "pc_text": pc_text}


def _tokenizer(model):
    return tokenizer_from_files(tokenizer_files(model))


def _settings(**sft) -> TrainSettings:
    return TrainSettings(steps=4, batch_size=3, seq_len=48, layers_per_block=2, steps_per_block=2, lr=1e-2,
                         boundaries="stored", sft=SftSettings(chat_template=TEMPLATE, **sft))


def _record(chat_model, data, tmp_path, settings, deviation=None, name="run"):
    agreement = make_agreement(chat_model, data, settings)
    run = tmp_path / name
    result = train(chat_model, data, run, agreement=agreement, deviation=deviation)
    from aftune.core.signing import PublicKey

    return run, PublicKey.load(result.public_key_path), agreement


# --- the rows ---------------------------------------------------------------------------------------
def test_rows_follow_trl_masks(chat_model, sft_data):
    tok = _tokenizer(chat_model)
    ex = load_dataset(sft_data["chat"]).examples[0]
    ids, labels = sft_example(ex, tok, SftSettings(chat_template=TEMPLATE, assistant_only_loss=True), 64)
    rendered = tok.apply_chat_template([{"role": "user", "content": QA[0][0]}, {"role": "assistant",
                                                                                 "content": QA[0][1]}],
                                       chat_template=TEMPLATE, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(rendered)
    trained = tok.decode([t for t in labels if t != -100])
    assert trained.replace(" ", "") == "6.<|eos|>"  # the answer and its end of turn, nothing of the question
    ids_all, labels_all = sft_example(ex, tok, SftSettings(chat_template=TEMPLATE), 64)
    assert labels_all == ids_all  # TRL's default for messages: loss on every token

    pc = load_dataset(sft_data["pc"]).examples[0]
    ids, labels = sft_example(pc, tok, SftSettings(chat_template=TEMPLATE), 64)
    assert ids == list(rendered)
    assert 0 < sum(x != -100 for x in labels) < len(ids)  # completion only by default
    _, labels_off = sft_example(pc, tok, SftSettings(chat_template=TEMPLATE, completion_only_loss=False), 64)
    assert all(x != -100 for x in labels_off)

    pt = load_dataset(sft_data["pc_text"]).examples[0]
    ids, labels = sft_example(pt, tok, SftSettings(), 64)
    assert ids[-1] == tok.eos_token_id  # eos appended to the completion, as TRL does
    assert tok.decode([t for t in labels if t != -100]).strip() == "6.<|eos|>"


def test_refusals(chat_model, sft_data):
    tok = _tokenizer(chat_model)
    ex = load_dataset(sft_data["chat"]).examples[0]
    with pytest.raises(InputError, match="chat_template"):
        sft_example(ex, tok, SftSettings(), 64)
    pc = load_dataset(sft_data["pc"]).examples[0]
    with pytest.raises(InputError, match="no token to train on"):  # the prompt alone fills max_length
        sft_example(pc, tok, SftSettings(chat_template=TEMPLATE), 3)
    with pytest.raises(InputError, match="generation"):
        sft_example(ex, tok, SftSettings(chat_template=TEMPLATE.replace("{% generation %}", "").replace(
            "{% endgeneration %}", ""), assistant_only_loss=True), 64)
    with pytest.raises(InputError, match="sft"):  # prompt/completion data without sft settings
        make_agreement(chat_model, sft_data["pc"], TrainSettings(steps=1, seq_len=32))
    with pytest.raises(InputError, match="assistant_only_loss needs a chat_template"):
        TrainSettings(sft=SftSettings(assistant_only_loss=True)).validate()


def test_settings_sft_only_when_set(chat_model, sft_data):
    assert "sft" not in TrainSettings().to_json()  # older agreements and runs keep their bytes
    settings = _settings(assistant_only_loss=True)
    assert TrainSettings.from_json(settings.to_json()) == settings
    agreement = make_agreement(chat_model, sft_data["chat"], settings)
    assert Agreement.from_json(agreement.to_json()).digest() == agreement.digest()
    other = make_agreement(chat_model, sft_data["chat"], _settings())
    assert other.digest() != agreement.digest()


# --- recorded and verified --------------------------------------------------------------------------
@pytest.mark.parametrize("data,sft,accum", [("chat", {"assistant_only_loss": True}, 1), ("pc", {}, 1),
                                            ("pc", {}, 2)])
def test_sft_run_verifies_strict(chat_model, sft_data, tmp_path, data, sft, accum):
    settings = replace(_settings(**sft), grad_accum=accum, batch_size=3 if accum == 1 else 2)
    run, key, agreement = _record(chat_model, sft_data[data], tmp_path, settings)
    config = json.loads((run / "config.json").read_text())
    assert config["batch"]["sft"]["chat_template"] == TEMPLATE
    report = Verifier(run, key, agreement).verify_all()
    assert report.verdict == "PASS", report


def test_accumulation_weights_are_the_trainers():
    """Micro-batches weigh by their predicted tokens (labels after position 0), as the Trainer's
    num_items_in_batch does: 2 and 6 of 8 here."""
    a = torch.tensor([[-100, 5, 6, -100], [7, -100, -100, -100]])
    b = torch.tensor([[1, 2, 3, 4], [-100, 8, 9, 10]])
    assert accumulation_weights([a, b]) == [0.25, 0.75]
    assert accumulation_weights([a[:, :1], b[:, :1]]) == [0.5, 0.5]  # no predicted token at all


class TrainOnPrompt(Deviation):
    """A provider that takes the loss on the prompt tokens too (labels = every real token)."""

    def batch(self, step, micro, batch):
        return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def test_loss_on_prompt_tokens_fails_naming_the_block(chat_model, sft_data, tmp_path):
    run, key, agreement = _record(chat_model, sft_data["pc"], tmp_path, _settings(), deviation=TrainOnPrompt())
    report = Verifier(run, key, agreement).verify_all()
    assert report.verdict == "FAIL"
    head = agreement.grid()[0] - 1
    assert failing(report) == [(head, 0), (head, 1)]  # labels enter the head's layer block
    tensors = {f.tensor for r in report.results for f in r.findings if f.check == "batch"}
    assert "step/00000000/micro/0000/batch/labels" in tensors, report


def test_other_template_fails(chat_model, sft_data, tmp_path):
    """The provider renders with another template than the agreed one: the committed input ids
    differ from what the verifier rebuilds."""
    class OtherTemplate(Deviation):
        def batch(self, step, micro, batch):
            tok = _tokenizer(chat_model)
            examples = load_dataset(sft_data["chat"])
            from aftune.data.order import OrderCache

            indices = OrderCache("blake3", 0, len(examples.examples)).indices(step, 3)
            spec = agreement.batch_spec()
            other = type(spec)(**{**spec.__dict__, "sft": SftSettings(chat_template=TEMPLATE.replace(
                "<|assistant|>", "<|bot|>"))})
            return build_batch(examples, indices, other, tok)

    agreement = make_agreement(chat_model, sft_data["chat"], _settings())
    run = tmp_path / "other"
    result = train(chat_model, sft_data["chat"], run, agreement=agreement, deviation=OtherTemplate())
    from aftune.core.signing import PublicKey

    report = Verifier(run, PublicKey.load(result.public_key_path), agreement).verify_all()
    assert report.verdict == "FAIL"
    assert (0, 0) in failing(report)  # input ids enter layer block 0
    tensors = {f.tensor for r in report.results for f in r.findings if f.check == "batch"}
    assert "step/00000000/micro/0000/batch/input_ids" in tensors, report
    assert torch.is_tensor(build_batch(load_dataset(sft_data["chat"]), [0], agreement.batch_spec(),
                                       _tokenizer(chat_model))["labels"])
