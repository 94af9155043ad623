"""Loading models and tokenizers from local Hugging Face directories, the one place aftune does it.

Weights are read from safetensors only (nothing pickled, no remote code); `config.json` is read
as strict, size-capped JSON; tokenizers are the files named in `TOKENIZER_FILES` and nothing else,
so a tokenizer digest never covers weights or configs.

    hf_config, model = load_pretrained("runs/demo/model", "sdpa", torch.float32)
    tokenizer = load_tokenizer("runs/demo/tokenizer")
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import jsonio
from ..errors import InputError, MissingExtra
from .heads import HeadInit, init_absent
from .registry import adapter_class, auto_class_name

MAX_CONFIG_BYTES = 1 << 20
MAX_TOKENIZER_FILE_BYTES = 256 << 20
# Every file a Hugging Face tokenizer may be saved as; a tokenizer is the subset present.
TOKENIZER_FILES = ("added_tokens.json", "chat_template.jinja", "chat_template.json", "merges.txt",
                   "sentencepiece.bpe.model", "special_tokens_map.json", "spiece.model", "tokenizer.json",
                   "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")
_NO_ATTENTION = ("resnet",)  # convolutional: transformers rejects an attention implementation
_CONFIG_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, ZeroDivisionError)
try:  # transformers' strict config dataclasses raise their own class (a wrong type, e.g. 0 for a bool)
    from huggingface_hub.errors import StrictDataclassError

    _CONFIG_ERRORS += (StrictDataclassError,)
except ImportError:  # older huggingface_hub: no strict dataclasses
    pass


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise MissingExtra("transformers", "hf") from None
    return transformers


def _attention_kwargs(model_type: str, attn_implementation: str) -> dict[str, str]:
    return {} if model_type in _NO_ATTENTION else {"attn_implementation": attn_implementation}


def build_model(hf_config: dict[str, Any], attn_implementation: str, dtype: torch.dtype,
                device: str = "cpu") -> nn.Module:
    """An untrained model of the given architecture (weights are loaded separately). The config
    is hostile input: any value transformers cannot build from is an InputError naming it."""
    transformers = transformers_module()
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        raise InputError("model config has no 'model_type'")
    adapter_class(model_type)
    # a deep copy: transformers fills nested defaults in place (rope_parameters), which must never
    # change the caller's config (an agreement's, whose digest is compared afterwards)
    fields = copy.deepcopy({k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version",
                                                                            "auto_map")})
    auto = getattr(transformers, auto_class_name(model_type))
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
        with torch.device(device):
            return auto.from_config(config, dtype=dtype, **_attention_kwargs(model_type, attn_implementation))
    except _CONFIG_ERRORS as exc:  # the config alone decides construction: its value is at fault
        raise InputError(f"model config is not a buildable {model_type} config{_culprit(fields, exc)}: "
                         f"{type(exc).__name__}: {str(exc)[:300]}") from None


def _culprit(fields: dict[str, Any], exc: Exception) -> str:
    """The config fields whose value the error message quotes, to name them."""
    message = str(exc)
    named = [k for k, v in fields.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)
             and len(str(v)) > 2 and str(v) in message]
    return f" (field {', '.join(named[:3])})" if named else ""


def _check_model_dir(d: Path) -> None:
    """A model directory must exist, be a directory and hold config.json: say which it is not."""
    if not d.exists():
        raise InputError(f"model directory {d} does not exist")
    if not d.is_dir():
        raise InputError(f"{d} is not a model directory: it is a file (give the Hugging Face directory that holds it)")
    if not (d / "config.json").is_file():
        raise InputError(f"{d} is not a model directory: it has no config.json")


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory, as a dict (checked, never executed)."""
    d = Path(model_dir)
    _check_model_dir(d)
    hf_config = jsonio.read_json(d / "config.json", MAX_CONFIG_BYTES, "model config", InputError)
    if not isinstance(hf_config, dict):
        raise InputError(f"{d / 'config.json'} must hold a JSON object")
    return hf_config


def load_pretrained(model_dir: str | Path, attn_implementation: str, dtype: torch.dtype,
                    head_init: HeadInit | None = None) -> tuple[dict[str, Any], nn.Module]:
    """(config dict, model) from a local directory: safetensors weights only, no remote code.
    A tensor the checkpoint lacks (a new task head) is drawn from `head_init`, the agreement's
    seed (heads.py); without one it is refused.

    Loading goes through `from_pretrained` because checkpoints may store tensors under older
    names that transformers maps to the current module layout."""
    transformers = transformers_module()
    d = Path(model_dir)
    hf_config = read_config(d)
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        raise InputError(f"{d / 'config.json'} has no 'model_type'")
    adapter_class(model_type)
    if not any(d.glob("*.safetensors")):
        raise InputError(f"{d} has no *.safetensors weights (aftune never loads pickled .bin weights)")
    auto = getattr(transformers, auto_class_name(model_type))
    try:
        model, info = auto.from_pretrained(str(d), use_safetensors=True, local_files_only=True,
                                           trust_remote_code=False, dtype=dtype, output_loading_info=True,
                                           **_attention_kwargs(model_type, attn_implementation))
    except (OSError, RuntimeError) + _CONFIG_ERRORS as exc:
        raise InputError(f"cannot load the model in {d}: {type(exc).__name__}: {str(exc)[:300]}") from None
    weights = model_weights(model)
    init_absent(model, [k for k in info.get("missing_keys", ()) if k in weights], head_init, str(d))
    return hf_config, model


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state (parameters and persistent buffers) without tied aliases."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        else:
            seen[id(p)] = name
    return {k: v for k, v in model.state_dict().items() if k not in aliases}


MODEL_CONFIG_FILES = ("config.json", "generation_config.json")


def model_files(directory: str | Path) -> dict[str, bytes]:
    """{file name: bytes} of the files a model digest binds besides the weights: config.json,
    generation_config.json and the tokenizer files, those of them present (SPEC.md 3.6)."""
    d = Path(directory)
    files = {name: jsonio.read_bytes(d / name, MAX_CONFIG_BYTES, "model file", InputError)
             for name in MODEL_CONFIG_FILES if (d / name).is_file()}
    if "config.json" not in files:
        _check_model_dir(d)
    return {**files, **_present_tokenizer_files(d)}  # none for image models


def model_commitment(model: nn.Module, directory: str | Path, algorithm: str) -> tuple[bytes, dict[str, bytes]]:
    """(model digest, per-tensor weight digests) of `model` as loaded from `directory`."""
    from ..core.merkle import model_digest, tensors_root

    weights_root, digests = tensors_root(algorithm, model_weights(model))
    return model_digest(algorithm, weights_root, model_files(directory)), digests


def _present_tokenizer_files(d: Path) -> dict[str, bytes]:
    return {name: jsonio.read_bytes(d / name, MAX_TOKENIZER_FILE_BYTES, "tokenizer file", InputError)
            for name in TOKENIZER_FILES if (d / name).is_file()}


def tokenizer_files(directory: str | Path) -> dict[str, bytes]:
    """{file name: bytes} of the tokenizer files in `directory` (only names in TOKENIZER_FILES)."""
    files = _present_tokenizer_files(Path(directory))
    if not files:
        raise InputError(f"{directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return files


def tokenizer_from_files(files: dict[str, bytes], what: str = "the tokenizer files"):
    """A tokenizer built from exactly these files (written to a private directory first), so
    that the bytes a digest covers are the bytes that are loaded, and nothing else."""
    transformers = transformers_module()
    unknown = sorted(set(files) - set(TOKENIZER_FILES))
    if unknown:
        raise InputError(f"{what}: {unknown[:3]} are not tokenizer files ({', '.join(TOKENIZER_FILES)})")
    with tempfile.TemporaryDirectory(prefix="aftune-tokenizer-") as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        try:
            return transformers.AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise InputError(f"cannot load a tokenizer from {what}: {type(exc).__name__}: {str(exc)[:300]}") from None


def load_tokenizer(directory: str | Path):
    """A tokenizer from the tokenizer files of a local directory (no remote code, no other file)."""
    return tokenizer_from_files(tokenizer_files(directory), str(directory))
