"""`AftuneCallback`: record a Hugging Face `Trainer` / TRL `SFTTrainer` script's fine-tune so the
client verifies it (SPEC.md 4.6). Add the callback; the script is otherwise unchanged:

    trainer = SFTTrainer(model=model_dir, args=SFTConfig(**json.load(open("sft_config.json"))),
                         train_dataset=load_dataset("json", data_files="data.jsonl")["train"],
                         callbacks=[AftuneCallback("agreement.json", run_dir="RUN", data="data.jsonl")])
    trainer.train()          # then, client side: aftune verify RUN --all --agreement agreement.json

At `on_train_begin` the callback compares the Trainer's computation with the client's agreement
(its arguments through `settings_from_trainer_config`, the model's weights and dtype, LoRA
through `peft_config`, the chat template, and every prepared training row: ids and loss mask)
and refuses to start, naming the field, when they differ; what aftune cannot replay (a custom
`compute_loss`, another optimizer or collator, DeepSpeed, several processes, ...) is refused with
what and why. Then aftune's recorded engine (`training/train.py`) runs the agreed computation in
place of the Trainer's loop, and the fine-tuned weights are loaded into the Trainer's model, so
what the script does afterwards (save, evaluate, push) sees the result. At `on_train_end` the
arguments are compared again: a script that changed them after the check is refused too.
"""

from __future__ import annotations

import sys
from dataclasses import fields, replace
from enum import Enum
from pathlib import Path

import torch

from ..core.merkle import tensors_root
from ..data import load_dataset
from ..data.sft import sft_example
from ..errors import InputError
from ..models.loading import model_weights, tokenizer_files, tokenizer_from_files
from ..training.agreement import Agreement, differences
from ..training.settings import LoraSettings, TrainSettings
from .trainer_config import TRAINER_FIELD, settings_from_trainer_config

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - the extra is missing
    from ..errors import MissingExtra

    raise MissingExtra("transformers", "trl") from None


class AftuneCallback(TrainerCallback):
    """Runs the client's agreed fine-tune, recorded, in place of the Trainer's loop."""

    def __init__(self, agreement: Agreement | str | Path, run_dir: str | Path, data: str | Path,
                 base_model: str | Path | None = None, provider_signing_key: str | Path | None = None):
        self.agreement = agreement if isinstance(agreement, Agreement) else Agreement.load(agreement)
        self.run_dir = Path(run_dir)
        self.data = Path(data)
        self.base_model = Path(base_model) if base_model is not None else None
        self.provider_signing_key = provider_signing_key
        self.result = None  # the TrainResult once recorded
        self._template: str | None = None  # the Trainer's chat template, as checked

    # --- the Trainer's events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        trainer = _calling_trainer()
        base_model = self.base_model or _model_dir(model)
        self.check(trainer, args, model, processing_class)
        self.result = self.record(base_model)
        _load_result(model, self.result.run_dir, self.agreement.settings)
        trainer._run_epoch = lambda *a, **k: None  # aftune ran the agreed steps: the Trainer's loop runs none
        state.global_step = state.max_steps = self.agreement.settings.steps
        _report_losses(trainer, state, self.result.losses)
        control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.result is not None:
            _refuse_differences(self.agreement, self.trainer_settings(args, model, self._template),
                                "the Trainer's arguments were changed after aftune's check")

    # --- what a subclass (a test's dishonest provider) may replace ------------------------------
    def record(self, base_model: Path):
        """Run the agreed fine-tune with aftune's recorded engine."""
        from ..training.train import train

        return train(base_model, self.data, self.run_dir, agreement=self.agreement, key_path=self.provider_signing_key)

    # --- checks -------------------------------------------------------------------------------
    def trainer_settings(self, args, model, chat_template: str | None) -> TrainSettings:
        """The settings the Trainer's arguments and model give, with the agreement's own fields."""
        own = settings_from_trainer_config(_args_values(args), chat_template, base=self.agreement.settings)
        return replace(own, dtype=_dtype_name(model), lora=_lora_settings(model))

    def check(self, trainer, args, model, processing_class) -> None:
        """Refuse (InputError naming what) a Trainer whose computation is not the agreed one."""
        _refuse_unreplayable(trainer, args)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self._template = getattr(trainer, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        _refuse_differences(self.agreement, self.trainer_settings(args, model, self._template),
                            "the Trainer would not run the agreed computation")
        _check_weights(self.agreement, model)
        _check_rows(self.agreement, trainer.train_dataset, self.data, self.base_model or _model_dir(model))


def _report_losses(trainer, state, losses: tuple[float, ...]) -> None:
    """The Trainer's own loss report from aftune's steps: each step's loss in `log_history`, and
    the running total its `_finalize_training` divides by the steps into `train_loss` (without it
    the Trainer would report the 0 of a loop that ran no step)."""
    for step, loss in enumerate(losses, start=1):
        state.log_history.append({"loss": loss, "step": step})
    trainer._total_loss_scalar = float(sum(losses))


def _calling_trainer():
    """The `Trainer` whose `train()` is calling this callback (the callback API passes no trainer)."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    raise InputError("AftuneCallback must be called by a transformers Trainer's train()")


def _refuse_unreplayable(trainer, args) -> None:
    from transformers import Trainer

    problems = []
    allowed_loss = {Trainer.compute_loss}
    try:
        from trl import SFTTrainer

        allowed_loss.add(SFTTrainer.compute_loss)
        sft_trainer = isinstance(trainer, SFTTrainer)
    except ImportError:
        sft_trainer = False
    if not sft_trainer:
        problems.append(f"{type(trainer).__name__}: aftune builds the rows as TRL's SFTTrainer does (SPEC.md "
                        "4.4.1); use trl.SFTTrainer")
    if type(trainer).compute_loss not in allowed_loss or getattr(trainer, "compute_loss_func", None) is not None:
        problems.append("a custom compute_loss: aftune replays the causal-LM loss of SPEC.md 5.2 only")
    collator = type(getattr(trainer, "data_collator", None)).__name__
    if sft_trainer and collator != "DataCollatorForLanguageModeling":
        problems.append(f"data collator {collator}: aftune pads rows as TRL's DataCollatorForLanguageModeling does")
    optimizer = getattr(trainer, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is not None and type(inner) is not torch.optim.AdamW:
        problems.append(f"optimizer {type(inner).__name__}: aftune replays AdamW only")
    if getattr(args, "world_size", 1) != 1:
        problems.append(f"{args.world_size} processes: aftune records one process")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        problems.append("DeepSpeed/FSDP: they run their own optimizer and sharding")
    if problems:
        raise InputError("aftune cannot replay this Trainer:\n  - " + "\n  - ".join(problems))


def _refuse_differences(agreement: Agreement, own: TrainSettings, why: str) -> None:
    wrong = differences(agreement.settings.to_json(), own.to_json())
    if wrong:
        named = [f"{_trainer_field(w.split(':')[0])} ({w})" for w in wrong]
        raise InputError(f"{why}; refused:\n  - " + "\n  - ".join(named[:12]))


def _args_values(args) -> dict:
    """The Trainer's arguments as plain values (`to_dict()` masks the token fields)."""
    return {f.name: (getattr(args, f.name).value if isinstance(getattr(args, f.name), Enum) else getattr(args, f.name))
            for f in fields(args) if f.init}


def _trainer_field(path: str) -> str:
    """The Trainer's name of an agreed setting: `lr` -> `learning_rate`, `lora.r` -> `peft_config.r`."""
    head, _, rest = path.partition(".")
    if path in TRAINER_FIELD or head not in TRAINER_FIELD:
        return TRAINER_FIELD.get(path, path)
    return f"{TRAINER_FIELD[head]}.{rest}"


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _lora_settings(model) -> LoraSettings | None:
    config = getattr(model, "peft_config", None)
    if not config:
        return None
    c = config["default"]
    modules = c.target_modules
    modules = tuple(sorted(modules)) if isinstance(modules, (set, list, tuple)) else ((modules,) if modules else ())
    return LoraSettings(r=c.r, alpha=c.lora_alpha, dropout=float(c.lora_dropout), target_modules=modules)


def _base_module(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _model_dir(model) -> Path:
    path = Path(getattr(_base_module(model), "name_or_path", "") or "")
    if not (path / "config.json").is_file():
        raise InputError("the Trainer's model was not loaded from a local directory: give AftuneCallback(base_model=)")
    return path


def _check_weights(agreement: Agreement, model) -> None:
    """The Trainer's model must hold the agreed base weights (before any step)."""
    weights = model_weights(_base_module(model))
    if agreement.settings.lora is not None:
        weights = {k.replace(".base_layer", ""): v for k, v in weights.items() if ".lora_" not in k}
    _, digests = tensors_root(agreement.algorithm, weights)
    wrong = sorted(set(digests) ^ set(agreement.base_tensors)) or \
        sorted(k for k in digests if digests[k] != agreement.base_tensors[k])
    if wrong:
        raise InputError(f"the Trainer's model is not the agreed base model: tensor {wrong[0]!r} "
                         f"({len(wrong)} tensors differ)")


def _check_rows(agreement: Agreement, train_dataset, data: Path, base_model: Path) -> None:
    """Every row the Trainer prepared (ids and labels) must be the row SPEC.md 4.4.1 builds from
    the agreed example of the same index: same data, template, loss mask and truncation."""
    dataset = load_dataset(data)
    if dataset.root(agreement.algorithm) != agreement.data_root:
        raise InputError(f"{data} is not the agreed dataset (its root differs from the agreement's data.root)")
    tokenizer = tokenizer_from_files(tokenizer_files(base_model))
    if len(train_dataset) != len(dataset.examples):
        raise InputError(f"the Trainer prepared {len(train_dataset)} rows from {len(dataset.examples)} agreed "
                         "examples (TRL dropped or added some)")
    spec = agreement.batch_spec()
    for i, example in enumerate(dataset.examples):
        row = train_dataset[i]
        ids, labels = sft_example(example, tokenizer, spec.sft, spec.seq_len)
        trainer_labels = row.get("labels", row["input_ids"])
        if list(row["input_ids"]) != ids:
            raise InputError(f"training row {i}: the Trainer's input ids are not the agreed rendering (chat template "
                             "or tokenizer differ)")
        if list(trainer_labels) != labels:
            raise InputError(f"training row {i}: the Trainer's loss mask (labels) is not the agreed one")


def _load_result(model, run_dir: Path, settings: TrainSettings) -> None:
    """Load the recorded fine-tune into the Trainer's model (LoRA: the adapter)."""
    from safetensors.torch import load_file

    if settings.lora is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(run_dir / "adapter" / "adapter_model.safetensors")))
        return
    state = load_file(str(run_dir / "model" / "model.safetensors"))
    missing, unexpected = _base_module(model).load_state_dict(state, strict=False)
    tied = {n for n, _ in _base_module(model).named_parameters(remove_duplicate=False)} - set(
        model_weights(_base_module(model)))
    if unexpected or set(missing) - tied:
        raise InputError(f"the fine-tuned model does not fit the Trainer's model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")


__all__ = ["AftuneCallback"]
