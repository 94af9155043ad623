"""A Hugging Face `TrainingArguments` / TRL `SFTConfig` as aftune training settings (SPEC.md 4.6).

The client writes the agreement from the configuration the provider's Trainer script will run
(`aftune agree --trainer-config sft_config.json`), and the provider's `AftuneCallback` maps the
Trainer's own arguments the same way and refuses to start when they differ. One function does
the mapping for both, so they cannot disagree:

    settings = settings_from_trainer_config(json.load(open("sft_config.json")), chat_template=tok.chat_template)

What aftune cannot replay is refused here, each with what and why (never recorded wrongly).
The mapping reads plain JSON values (`TrainingArguments.to_dict()` gives them): no transformers
import.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..data.sft import SftSettings
from ..errors import InputError, MissingExtra
from ..training.settings import TrainSettings

# Trainer optimizers aftune replays (SPEC.md 5.3: AdamW written out per tensor).
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")
# The Trainer's schedules as aftune's (SPEC.md 4.6, 5.3.2; `constant` has no warm-up in the Trainer).
SCHEDULES = {"constant": "constant", "constant_with_warmup": "trainer_constant", "linear": "trainer_linear",
             "cosine": "trainer_cosine"}

# field: (allowed values, why another value is refused). A field absent from the config is allowed.
_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "packing": ((False,), "packing is not replayed yet: rows are built one example per row (SPEC.md 4.4.1)"),
    "padding_free": ((False,), "padding-free batches are not replayed yet (SPEC.md 4.4.1)"),
    "dataset_text_field": (("text",), "aftune's text data has the field 'text' (SPEC.md 4.1)"),
    "truncation_mode": (("keep_start",), "aftune keeps the first max_length tokens (SPEC.md 4.4.1)"),
    "loss_type": (("nll", "chunked_nll"), "aftune replays the mean negative log-likelihood only"),
    "label_smoothing_factor": ((0, 0.0), "label smoothing changes the loss aftune replays"),
    "neftune_noise_alpha": ((None,), "NEFTune adds embedding noise aftune does not replay"),
    "use_liger_kernel": ((False,), "Liger kernels replace the layers aftune replays"),
    "deepspeed": ((None, ""), "DeepSpeed runs its own optimizer and partitioning"),
    "fsdp": ((None, "", [], False), "FSDP shards the model across processes"),
    "fp16": ((False,), "float16 autocast (mixed precision) is not replayed: load the model in bfloat16 instead"),
    "bf16": ((False,), "bfloat16 autocast (mixed precision, float32 master weights) is not replayed: load the "
                       "model in bfloat16 (model_init_kwargs dtype) and set bf16 false"),
    "optim_args": ((None, ""), "optimizer arguments beyond the betas, epsilon and weight decay are not replayed"),
    "lr_scheduler_kwargs": ((None, {}), "schedule arguments (cycles, min lr) are not replayed"),
    "warmup_ratio": ((None, 0, 0.0), "give the warm-up as a whole number of warmup_steps"),
    "shuffle_dataset": ((False,), "aftune orders the agreed examples itself (SPEC.md 4.2)"),
    "group_by_length": ((False,), "aftune orders the agreed examples itself (SPEC.md 4.2)"),
    "pad_to_multiple_of": ((None, "auto"), "rows are padded to the longest row of the micro-batch (SPEC.md 4.4.1)"),
    "eos_token": ((None,), "the eos token is the agreed tokenizer's"),
    "pad_token": ((None,), "the pad token is the agreed tokenizer's"),
    "chat_template_path": ((None,), "give the template in the tokenizer files instead (its text is agreed)"),
    "router_aux_loss_coef": ((None,), "mixture-of-experts losses are not replayed"),
    "dataset_kwargs": ((None, {}), "the dataset is prepared as SPEC.md 4.4.1 says, never skipped"),
    "gradient_checkpointing_kwargs": ((None, {}, {"use_reentrant": False}, {"use_reentrant": True}),
                                      "only plain gradient checkpointing leaves the arithmetic unchanged"),
}


def settings_from_trainer_config(config: dict[str, Any], chat_template: str | None = None,
                                 base: TrainSettings | None = None) -> TrainSettings:
    """The training settings of a Trainer configuration (SPEC.md 4.6); `base` gives aftune's own
    fields (layer and step blocks, checkpoints, hash, LoRA, numerics). Every refused field and
    every problem is reported at once (InputError naming the fields)."""
    if not isinstance(config, dict):
        raise InputError("a Trainer configuration is a JSON object of TrainingArguments / SFTConfig fields")
    problems = []
    for name, (allowed, why) in _REFUSED.items():
        if name in config and config[name] not in allowed:
            problems.append(f"{name}={config[name]!r}: {why}")
    optim = config.get("optim", "adamw_torch")
    if optim not in ADAMW_OPTIMS:
        problems.append(f"optim={optim!r}: aftune replays AdamW ({', '.join(ADAMW_OPTIMS)}) only")
    schedule = config.get("lr_scheduler_type", "linear")
    if schedule not in SCHEDULES:
        problems.append(f"lr_scheduler_type={schedule!r}: aftune replays {', '.join(SCHEDULES)} only")
    steps = config.get("max_steps", -1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        problems.append(f"max_steps={steps!r}: set max_steps (the Trainer's epochs end on a partial batch that "
                        "aftune's order, SPEC.md 4.2, does not have)")
    warmup = config.get("warmup_steps", 0)
    if isinstance(warmup, float) and warmup.is_integer() and warmup >= 1:
        warmup = int(warmup)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0 or (
            isinstance(warmup, float) and warmup != 0):
        problems.append(f"warmup_steps={warmup!r}: give the warm-up as a whole number of steps (a fraction is "
                        "a ratio of the Trainer's total)")
    elif warmup and schedule == "constant":
        warmup = 0  # the Trainer's `constant` ignores warmup_steps
    max_length = config.get("max_length", 1024)  # SFTConfig's default
    if max_length is None:
        problems.append("max_length=None: aftune cuts rows to an agreed length; set max_length")
    dtype = (config.get("model_init_kwargs") or {}).get("dtype", "float32")
    dtype = {"auto": "float32", None: "float32"}.get(dtype, dtype)
    if problems:
        raise InputError("the Trainer configuration has what aftune cannot replay:\n  - " + "\n  - ".join(problems))
    assistant_only = bool(config.get("assistant_only_loss", False))
    sft = SftSettings(chat_template=chat_template, completion_only_loss=config.get("completion_only_loss"),
                      assistant_only_loss=assistant_only)
    weight_decay = config.get("weight_decay", 0.0)
    values = dict(steps=steps, batch_size=config.get("per_device_train_batch_size", 8),
                  grad_accum=config.get("gradient_accumulation_steps", 1), seq_len=max_length, optimizer="adamw",
                  lr=config.get("learning_rate", 5e-5), beta1=config.get("adam_beta1", 0.9),
                  beta2=config.get("adam_beta2", 0.999), eps=config.get("adam_epsilon", 1e-8),
                  weight_decay=weight_decay, schedule=SCHEDULES[schedule], warmup_steps=int(warmup),
                  max_grad_norm=config.get("max_grad_norm", 1.0), seed=config.get("seed", 42), dtype=dtype, sft=sft)
    for name in ("lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm"):
        if isinstance(values[name], float) and not math.isfinite(values[name]):
            raise InputError(f"the Trainer configuration's {name} is not finite")
    return replace(base or TrainSettings(), **values).validate()


def trainer_config_settings(base_model: str | Path, config: dict[str, Any] | str | Path,
                            base: TrainSettings | None = None) -> TrainSettings:
    """`settings_from_trainer_config` with the chat template TRL's SFTTrainer would use for the
    base model's tokenizer files: the tokenizer's own, or, for `assistant_only_loss` with a
    template that has no `{% generation %}` markers, TRL's training version of it."""
    from ..core import jsonio
    from ..models.loading import tokenizer_files, tokenizer_from_files

    if not isinstance(config, dict):
        config = jsonio.read_json(config, 1 << 20, "Trainer configuration", InputError)
    tokenizer = tokenizer_from_files(tokenizer_files(base_model), "the base model's tokenizer files")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(config, dict) and config.get("assistant_only_loss") and template:
        try:
            from trl.chat_template_utils import get_training_chat_template, has_generation_markers
        except ImportError:
            raise MissingExtra("trl", "trl") from None
        if not has_generation_markers(template):
            template = get_training_chat_template(tokenizer)
    return settings_from_trainer_config(config, template, base)


# The Trainer field each agreed setting comes from, to name it when they differ.
TRAINER_FIELD = {"steps": "max_steps", "batch_size": "per_device_train_batch_size",
                 "grad_accum": "gradient_accumulation_steps", "seq_len": "max_length", "lr": "learning_rate",
                 "beta1": "adam_beta1", "beta2": "adam_beta2", "eps": "adam_epsilon", "weight_decay": "weight_decay",
                 "schedule": "lr_scheduler_type", "warmup_steps": "warmup_steps", "max_grad_norm": "max_grad_norm", "seed": "seed",
                 "dtype": "the model's dtype", "sft.chat_template": "the chat template",
                 "sft.completion_only_loss": "completion_only_loss", "sft.assistant_only_loss": "assistant_only_loss",
                 "lora": "peft_config"}




def refuse_given_settings(names) -> None:
    """The settings a Trainer configuration decides may not also be given as flags or keywords
    (`aftune agree --trainer-config`, `aftune.agree(trainer_config=)`): InputError naming them."""
    clash = sorted(n for n in names if n != "lora" and (n in TRAINER_FIELD or n in ("optimizer", "warmup_steps", "dtype")))
    if clash:
        raise InputError(f"--trainer-config gives {', '.join(clash)}: set them in the Trainer configuration, "
                         "not as flags")


__all__ = ["TRAINER_FIELD", "refuse_given_settings", "settings_from_trainer_config", "trainer_config_settings"]
