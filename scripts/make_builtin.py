"""Generate aftune's built-in default model and dataset.

This script deterministically (re)creates the tiny assets that ship inside the
package and that ``aftune train`` falls back to when no model is given:

* ``src/aftune/builtin/data/train.jsonl`` -- a synthetic instruction-style
  corpus (short Q/A lines) generated from ``random.Random(0)``;
* ``src/aftune/builtin/data/README.md``   -- a short description of it;
* ``src/aftune/builtin/model/``           -- a byte-level BPE tokenizer
  (vocab 512) trained on that corpus plus a tiny Llama
  (hidden 64, 8 layers) briefly pretrained on it, saved as safetensors.

Run it from the repository root (CPU only, well under two minutes):

    python scripts/make_builtin.py

Re-running it gives the same dataset and a byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "src" / "aftune" / "builtin"
DATA_DIR = BUILTIN / "data"
MODEL_DIR = BUILTIN / "model"

SEED = 0
N_PER_KIND = 32  # 8 kinds -> 256 lines
MAX_CHARS = 120

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
VOCAB_SIZE = 512

TRAIN_STEPS = 300
BATCH_SIZE = 16
SEQ_LEN = 64
LR = 3e-3


# --------------------------------------------------------------------------
# 1. Dataset
# --------------------------------------------------------------------------

WORDS = [
    "garden", "river", "window", "pencil", "orange", "silver", "planet", "bridge",
    "candle", "forest", "rabbit", "button", "winter", "market", "castle", "yellow",
    "shadow", "ladder", "summer", "dragon", "anchor", "basket", "violin", "meadow",
    "tunnel", "harbor", "lantern", "mirror", "pepper", "rocket", "island", "marble",
    "cloud", "stone", "apple", "train", "music", "ocean", "tiger", "paper",
]

# Made-up countries and capitals (fiction, not facts about the real world).
CAPITALS = [
    ("Veloria", "Tarn"), ("Oskland", "Brill"), ("Marevia", "Sol Dara"),
    ("Quentaro", "Fenwick"), ("Lusitra", "Orbel"), ("Drammen Isles", "Kelp Harbor"),
    ("Norvane", "Aster"), ("Zembla", "Kirov Gate"), ("Palundia", "Merrow"),
    ("Tessaly", "Quill"), ("Hollin", "Greyford"), ("Arcadia Minor", "Lune"),
    ("Bravik", "Holt"), ("Calloway", "Pell"), ("Eskaran", "Durn"),
    ("Fyrland", "Emberton"),
]

UNITS = [
    # (big unit, small unit, factor)
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("liters", "milliliters", 1000),
    ("feet", "inches", 12),
    ("dozens", "items", 12),
]


def _addition(rng: random.Random) -> str:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return f"Q: What is {a} plus {b}? A: {a + b}."


def _subtraction(rng: random.Random) -> str:
    a = rng.randint(10, 99)
    b = rng.randint(1, a)
    return f"Q: What is {a} minus {b}? A: {a - b}."


def _multiplication(rng: random.Random) -> str:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"Q: What is {a} times {b}? A: {a * b}."


def _conversion(rng: random.Random) -> str:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 9)
    return f"Q: How many {small} are in {n} {big}? A: {n * factor} {small}."


def _backwards(rng: random.Random) -> str:
    w = rng.choice(WORDS)
    return f"Q: Spell the word '{w}' backwards. A: {w[::-1]}."


def _capital(rng: random.Random) -> str:
    country, city = rng.choice(CAPITALS)
    if rng.random() < 0.5:
        return f"Q: What is the capital of {country}? A: The capital of {country} is {city}."
    return f"Q: {city} is the capital of which country? A: {city} is the capital of {country}."


def _compare(rng: random.Random) -> str:
    a, b = rng.sample(range(1, 100), 2)
    if rng.random() < 0.5:
        return f"Q: Which is larger, {a} or {b}? A: {max(a, b)} is larger."
    return f"Q: Which is smaller, {a} or {b}? A: {min(a, b)} is smaller."


def _letters(rng: random.Random) -> str:
    w = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"Q: How many letters are in the word '{w}'? A: {len(w)}."
    return f"Q: What is the first letter of '{w}'? A: The first letter is '{w[0]}'."


KINDS = [_addition, _subtraction, _multiplication, _conversion,
         _backwards, _capital, _compare, _letters]


def make_corpus() -> list[str]:
    rng = random.Random(SEED)
    lines: list[str] = []
    for kind in KINDS:
        seen: set[str] = set()
        while len(seen) < N_PER_KIND:  # distinct lines within each kind
            s = kind(rng)
            if s not in seen:
                seen.add(s)
                lines.append(s)
    rng.shuffle(lines)
    assert all(len(s) < MAX_CHARS for s in lines)
    return lines


def write_dataset(lines: list[str]) -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with open(DATA_DIR / "train.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for s in lines:
            f.write(json.dumps({"text": s}, ensure_ascii=False) + "\n")
    (DATA_DIR / "README.md").write_text(
        "Built-in toy dataset for `aftune train`: 256 synthetic question/answer lines "
        "(arithmetic, unit conversions, spelling backwards, letter counts, made-up capitals).\n"
        "Generated deterministically from `random.Random(0)` by `python scripts/make_builtin.py`; "
        "the country and capital names are invented.\n",
        encoding="utf-8",
        newline="\n",
    )


# --------------------------------------------------------------------------
# 2. Tokenizer
# --------------------------------------------------------------------------

def train_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    bos_id = tok.token_to_id(BOS)
    # Llama-style: encoding a text prepends <|bos|> (no eos; append it when training).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=128,
    )


# --------------------------------------------------------------------------
# 3. Model
# --------------------------------------------------------------------------

def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.dtype = torch.float32
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def encode_corpus(tokenizer: PreTrainedTokenizerFast, lines: list[str]) -> list[list[int]]:
    out = []
    for s in lines:
        ids = tokenizer(s)["input_ids"] + [tokenizer.eos_token_id]
        out.append(ids[:SEQ_LEN])
    return out


def pretrain(model: LlamaForCausalLM, seqs: list[list[int]], pad_id: int) -> tuple[float, float]:
    rng = random.Random(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / 20) * max(0.1, 1 - step / TRAIN_STEPS)
    )
    model.train()
    first = last = float("nan")
    order: list[int] = []
    for step in range(TRAIN_STEPS):
        if len(order) < BATCH_SIZE:
            perm = list(range(len(seqs)))
            rng.shuffle(perm)
            order += perm
        batch = [seqs[i] for i in order[:BATCH_SIZE]]
        del order[:BATCH_SIZE]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, s in enumerate(batch):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == 0:
            first = loss.item()
        if step % 50 == 0 or step == TRAIN_STEPS - 1:
            print(f"  step {step:3d}  loss {loss.item():.4f}", flush=True)
        last = loss.item()
    model.eval()
    return first, last


# --------------------------------------------------------------------------

def main() -> int:
    t0 = time.perf_counter()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    lines = make_corpus()
    write_dataset(lines)
    print(f"dataset: {len(lines)} lines -> {DATA_DIR / 'train.jsonl'}")

    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    MODEL_DIR.mkdir(parents=True)

    tokenizer = train_tokenizer(lines)
    print(f"tokenizer: vocab {len(tokenizer)}")

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; pretraining {TRAIN_STEPS} steps")
    first, last = pretrain(model, encode_corpus(tokenizer, lines), tokenizer.pad_token_id)
    print(f"loss: start {first:.4f} -> end {last:.4f}")

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(MODEL_DIR)
    # transformers 5 writes its internal class name "TokenizersBackend"; the
    # public alias loads the same way there and also works with transformers 4.x.
    cfg_path = MODEL_DIR / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # Keep only the fast-tokenizer files and the safetensors model.
    keep = {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    for p in MODEL_DIR.iterdir():
        if p.name not in keep:
            print(f"removing unexpected file {p.name}")
            p.unlink() if p.is_file() else shutil.rmtree(p)

    for p in sorted(BUILTIN.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(ROOT)}  {p.stat().st_size:,} B")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
