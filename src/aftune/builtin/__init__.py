"""The built-in default, shipped inside the package so `aftune train` needs no download: a tiny
Llama (`model/`, made by scripts/make_builtin.py) and a small instruction dataset (`data/`)."""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
DATA_FILE = Path(__file__).parent / "data" / "train.jsonl"
