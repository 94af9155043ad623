"""Shared fixtures: tiny models of every family built from configs, tiny datasets, and helpers
that record and verify runs. Everything is CPU, seeded, and takes seconds."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="also run the tests marked long (fuzz budgets, sweeps): tens of minutes")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long check: run with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


# Under pytest-xdist (`-n auto`, the README's command) the cores are shared among the workers:
# give each worker its share of intra-op threads (and the CLI subprocesses it starts the same).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _configs():
    import transformers as tf

    text = dict(vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "llama": tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, **text),
        "qwen2": tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **text),
        "mistral": tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=128, **text),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, resid_pdrop=0.1, embd_pdrop=0.1,
                              attn_pdrop=0.1, **text),
        "bert": tf.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=128, num_labels=3, vocab_size=512, pad_token_id=0),
        "vit": tf.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                            image_size=16, patch_size=4, num_labels=3),
        "dinov2": tf.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2,
                                  image_size=16, patch_size=4, num_labels=3),
        "resnet": tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic",
                                  num_labels=3),
    }


AUTO = {"llama": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM", "mistral": "AutoModelForCausalLM",
        "gpt2": "AutoModelForCausalLM", "bert": "AutoModelForSequenceClassification",
        "vit": "AutoModelForImageClassification", "dinov2": "AutoModelForImageClassification",
        "resnet": "AutoModelForImageClassification"}
DATA_KIND = {"llama": "text", "qwen2": "text", "mistral": "text", "gpt2": "text", "bert": "labeled",
             "vit": "images", "dinov2": "images", "resnet": "images"}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(family) -> a saved tiny Hugging Face model directory (cached per session)."""
    import transformers as tf

    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def make(family: str) -> Path:
        if family not in cache:
            torch.manual_seed(0)
            config = _configs()[family]
            model = getattr(tf, AUTO[family]).from_config(config)
            d = root / family
            model.save_pretrained(str(d))
            if DATA_KIND[family] != "images":
                for f in TOKENIZER_FILES:
                    shutil.copy(BUILTIN / "model" / f, d / f)
            cache[family] = d
        return cache[family]

    return make


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    lines = (BUILTIN / "data" / "train.jsonl").read_text().splitlines()[:48]
    text = root / "text.jsonl"
    text.write_text("\n".join(lines) + "\n")
    rng = random.Random(0)
    labeled = root / "labeled.jsonl"
    words = ["good", "bad", "fine", "poor", "great", "awful", "okay"]
    with labeled.open("w") as f:
        for i in range(36):
            label = i % 3
            sent = " ".join(rng.choice(words) for _ in range(3 + i % 5))
            f.write(json.dumps({"text": f"{sent} {label}", "label": label}) + "\n")
    images = root / "images"
    from PIL import Image

    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (images / f"class{c}").mkdir(parents=True)
        for i in range(8):
            im = Image.new("RGB", (20, 20), colour)
            for _ in range(30):
                im.putpixel((rng.randrange(20), rng.randrange(20)), tuple(rng.randrange(256) for _ in range(3)))
            im.save(images / f"class{c}" / f"{i:02d}.png")
    return {"text": text, "labeled": labeled, "images": images}


@pytest.fixture
def record(model_dir, datasets, tmp_path):
    """record(family, deviation=None, **settings) -> (run_dir, public_key): a recorded run, trained
    under the client's agreement for those settings (`agreement_for(run_dir)` gives it back)."""
    from aftune.core.signing import PublicKey
    from aftune.training.agreement import make_agreement
    from aftune.training.settings import TrainSettings
    from aftune.training.train import train

    counter = iter(range(1000))

    def run(family: str, deviation=None, **kw):
        # stored boundaries: tests not about digest-only boundaries verify right after training
        defaults = dict(steps=4, batch_size=4, seq_len=32, layers_per_block=2, steps_per_block=2, lr=1e-2,
                        boundaries="stored")
        settings = TrainSettings(**{**defaults, **kw})
        run_dir = tmp_path / f"run{next(counter)}"
        agreement = make_agreement(model_dir(family), datasets[DATA_KIND[family]], settings)
        agreement.save(agreement_path(run_dir))
        result = train(model_dir(family), datasets[DATA_KIND[family]], run_dir, agreement=agreement,
                       deviation=deviation)
        return run_dir, PublicKey.load(result.public_key_path)

    return run


def agreement_path(run_dir: Path) -> Path:
    """Where the tests keep the client's agreement of a run: beside it, not inside it."""
    return Path(run_dir).with_name(Path(run_dir).name + ".agreement.json")


def agreement_for(run_dir):
    """The client's agreement of a run recorded by the `record` fixture."""
    from aftune.training.agreement import Agreement

    return Agreement.load(agreement_path(run_dir))


def verifier(run_dir, public_key, **kw):
    """The client's verifier of a run recorded by the `record` fixture, with its agreement."""
    from aftune.training.verify import Verifier

    return Verifier(run_dir, public_key, agreement_for(run_dir), **kw)


def verify_all(run_dir, public_key, **kw):
    return verifier(run_dir, public_key, **kw).verify_all()


def failing(report):
    """(layer_block, step_block) of each failing block."""
    return sorted({(r.layer_block, r.step_block) for r in report.results if r.verdict == "FAIL"})


def invoke(*args):
    """Run the `aftune` CLI in-process; a traceback in the output fails the test, and any
    exception other than the CLI's own exit is re-raised."""
    from typer.testing import CliRunner

    from aftune.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def manifest_doc(run_dir, s: int) -> dict:
    """The JSON document of step block `s`'s manifest, v3 (`.json.zst`) or older (`.json`)."""
    import zstandard

    from aftune.training.manifest import manifest_path

    path = manifest_path(Path(run_dir) / "manifests", s)
    data = path.read_bytes()
    return json.loads(zstandard.ZstdDecompressor().decompress(data) if path.name.endswith(".zst") else data)


def write_manifest_doc(run_dir, s: int, doc) -> Path:
    """Replace step block `s`'s manifest by `doc` (a dict, or JSON text), in the file it is in."""
    import zstandard

    from aftune.training.manifest import manifest_path

    path = manifest_path(Path(run_dir) / "manifests", s)
    text = (doc if isinstance(doc, str) else json.dumps(doc)).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(text) if path.name.endswith(".zst") else text)
    return path


def loose_objects(run_dir) -> None:
    """Unpack a run's packs into loose objects, for tests that edit or remove single objects."""
    from aftune.core.store import ObjectStore

    ObjectStore(Path(run_dir) / "objects", "blake3").unpack()
