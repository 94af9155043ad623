"""Flags declared once for every command that takes them.

The training-settings flags (`aftune train`, `aftune agree`): `@with_settings_options` adds them
to a command's signature and hands the command one `settings` argument (a `TrainSettings`, or
None when no flag was given).

    @app.command()
    @with_settings_options
    def agree(..., settings=None): ...

Renamed flags (docs/cli.md): `@deprecated_flags({"--nonce": "--request-nonce"})` keeps an old
name working for one release, hidden from --help, with a note on stderr; `AftuneCommand`
(app.py) applies it before parsing.

    @app.command()
    @deprecated_flags({"--nonce": "--request-nonce", "--key": "--provider-signing-key"})
    def infer(..., request_nonce=None, provider_signing_key=None): ...
"""

from __future__ import annotations

import functools
import inspect

import typer

from ..errors import InputError

# name -> (type, default, flag, help): the defaults are TrainSettings' own
SETTINGS_FLAGS = {
    "steps": (int, 32, "--steps", "Optimizer steps."),
    "batch_size": (int, 8, "--batch-size", "Examples per micro-batch."),
    "grad_accum": (int, 1, "--grad-accum", "Micro-batches per optimizer step."),
    "seq_len": (int, 64, "--seq-len", "Maximum tokens per example."),
    "image_size": (int, 0, "--image-size", "Image side in pixels (0: from the model config)."),
    "lr": (float, 1e-3, "--lr", "Peak learning rate."),
    "optimizer": (str, "adamw", "--optimizer", "adamw or sgd (momentum)."),
    "momentum": (float, 0.9, "--momentum", "SGD momentum."),
    "weight_decay": (float, 0.0, "--weight-decay", "Decoupled (AdamW) or L2 (SGD) weight decay."),
    "schedule": (str, "constant", "--schedule", "constant, linear or cosine; trainer_constant, trainer_linear, trainer_cosine: the Hugging Face Trainer's (SPEC.md 5.3.2)."),
    "warmup_steps": (int, 0, "--warmup-steps", "Linear warm-up steps."),
    "max_grad_norm": (float, 1.0, "--max-grad-norm", "Global gradient clipping; 0 disables."),
    "lora": (bool, False, "--lora", "Train LoRA adapters (PEFT) instead of all weights."),
    "lora_r": (int, 8, "--lora-r", "LoRA rank."),
    "lora_alpha": (int, 16, "--lora-alpha", "LoRA scaling numerator (scale = alpha / r)."),
    "lora_targets": (str, "", "--lora-targets", "Comma-separated module names (empty: PEFT's default)."),
    "steps_per_block": (int, 4, "--steps-per-block", "B_S: steps per step block."),
    "layers_per_block": (int, 2, "--layers-per-block", "B_L: layers per layer block."),
    "checkpoint_interval": (int, 1, "--checkpoint-interval", "I_C: store full state every I_C step blocks."),
    "seed": (int, 0, "--seed", "Seed of the example order, dropout and LoRA initialisation."),
    "dtype": (str, "float32", "--dtype", "float32, bfloat16, float16 or float64."),
    "hash_algorithm": (str, "blake3", "--hash", "blake3 or sha256."),
    "numerics": (str, "native", "--numerics", "native, or portable: float64 compute rounded to a float32 grid, "
                 "verified bitwise on any hardware (SPEC.md 5.4)."),
    "boundaries": (str, "digest", "--boundaries", "digest: boundary tensors, the base and the final state committed by "
                   "digest only and regenerated on challenge (aftune prepare, SPEC.md 3.8); or stored: every "
                   "tensor kept."),
    "world_size": (int, 1, "--world-size", "Processes (ranks) training together; >= 2: data-parallel training recorded "
                   "per rank (SPEC.md 5.5); grad-accum must be a multiple of it."),
    "distributed_strategy": (str, "ddp", "--distributed-strategy", "With --world-size >= 2: ddp (every rank holds the "
                             "whole state) or fsdp (optimizer state and updates sharded by rank)."),
}


def settings_from_flags(values: dict):
    """A TrainSettings from the flags' values (None: not given), or None when no flag was given."""
    from ..training.settings import DistributedSettings, LoraSettings, TrainSettings

    if all(values[name] is None for name in SETTINGS_FLAGS):
        return None
    v = {name: (values[name] if values[name] is not None else SETTINGS_FLAGS[name][1]) for name in SETTINGS_FLAGS}
    lora = LoraSettings(r=v.pop("lora_r"), alpha=v.pop("lora_alpha"),
                        target_modules=tuple(t for t in v.pop("lora_targets").split(",") if t))
    world, strategy = v.pop("world_size"), v.pop("distributed_strategy")
    if world == 1 and values["distributed_strategy"] is not None:
        raise InputError("--distributed-strategy needs --world-size 2 or more")
    distributed = DistributedSettings(world_size=world, strategy=strategy) if world != 1 else None
    return TrainSettings(**{k: x for k, x in v.items() if k != "lora"}, lora=lora if v["lora"] else None,
                         distributed=distributed)


def with_settings_options(command):
    """Add the settings flags to `command`'s signature (each with its TrainSettings default, shown
    in --help); it receives `settings` instead: each flag's value, None where it was not given."""
    signature = inspect.signature(command)
    params = [p for name, p in signature.parameters.items() if name != "settings"]
    for name, (kind, default, flag, help_text) in SETTINGS_FLAGS.items():
        option = typer.Option(default, flag, help=help_text)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    params.append(inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

    @functools.wraps(command)
    def wrapper(**kwargs):
        ctx = kwargs.pop(_CONTEXT)
        values = {name: kwargs.pop(name) for name in SETTINGS_FLAGS}
        given = {name: None if ctx.get_parameter_source(name).name == "DEFAULT" else value
                 for name, value in values.items()}
        return command(**kwargs, settings=given)

    wrapper.__signature__ = signature.replace(parameters=params)
    return wrapper


_CONTEXT = "_settings_context"

DEPRECATED_FLAGS = "__aftune_deprecated_flags__"  # {old flag: new flag}, on a command's function


def deprecated_flags(renames: dict[str, str]):
    """Under `@app.command()`: each old flag of `renames` still works for one release, as its new
    name, hidden from --help and with a note on stderr ("note: --nonce is deprecated here; use
    --request-nonce"). "here": an old name may have meant different things in different commands."""

    def mark(command):
        setattr(command, DEPRECATED_FLAGS, {**getattr(command, DEPRECATED_FLAGS, {}), **renames})
        return command

    return mark


def replace_deprecated_flags(args: list[str], renames: dict[str, str],
                             takes_value: set[str]) -> tuple[list[str], list[str]]:
    """`args` with every deprecated flag (`--old V` or `--old=V`) written as its new name, and the
    notes to print. The values of options (`takes_value`) and everything after `--` are left as they are."""
    result, notes, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            result.extend(args[i:])
            break
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in renames:
            notes.append(f"note: {name} is deprecated here; use {renames[name]}")
            name = renames[name]
            arg = name + eq + value
        result.append(arg)
        if not eq and name in takes_value and i + 1 < len(args):
            result.append(args[i + 1])  # the option's value, even if it looks like a flag
            i += 1
        i += 1
    return result, notes
