"""The state rule of tolerance mode (SPEC.md 6.3): honest measures and a drifting provider.

    python benchmarks/state_rule.py                       # tiny Llama and Mistral, bfloat16 and float32, lr 1e-3 and 1e-2
    python benchmarks/state_rule.py --family builtin --steps 16 --steps-per-block 8 --seq 64
    python benchmarks/state_rule.py --attack 0.025        # + a rank-1 move of 2.5 % of one matrix per step block

For each configuration one run is trained (aftune's recorded `train`, every state stored) and
replayed one precision up with limits no honest replay reaches (`aftune calibrate`'s way), and
the largest state-rule measures per (scope, kind) are printed: element (x (ulp + update)), norm
(in units of the run dtype's u) and count; then whether the defaults PASS it. With --attack the
run's provider adds a fixed rank-1 change of that fraction of its norm to one weight matrix after
the last update of every step block, and the tolerance (defaults) and strict verdicts are printed.
This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from aftune.core.signing import PublicKey
from aftune.training.agreement import make_agreement
from aftune.training.settings import TrainSettings
from aftune.training.train import Deviation, train
from aftune.training.verify import Verifier
from aftune.verdict.comparison import STATE_KINDS, STATE_SCOPES, UNIT_ROUNDOFF, Tolerance

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin"
REPLAY = {"bfloat16": "float32", "float32": "float64"}
NEVER = 1e300


def tiny_model(family: str, work: Path) -> Path:
    """The tiny configurations of tests/conftest.py, saved once."""
    if family == "builtin":
        return BUILTIN / "model"
    import transformers as tf

    d = work / f"model-{family}"
    if not d.exists():
        text = dict(vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=32, intermediate_size=64,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        config = {"llama": lambda: tf.LlamaConfig(num_hidden_layers=4, **text),
                  "mistral": lambda: tf.MistralConfig(num_hidden_layers=3, **text)}[family]()
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(str(d))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(BUILTIN / "model" / f, d / f)
    return d


def data_for(family: str, work: Path) -> Path:
    if family == "builtin":
        return BUILTIN / "data" / "train.jsonl"
    p = work / "text.jsonl"
    if not p.exists():
        p.write_text("\n".join((BUILTIN / "data" / "train.jsonl").read_text().splitlines()[:48]) + "\n")
    return p


class RankOneDrift(Deviation):
    def __init__(self, name: str, fraction: float, every: int):
        self.name, self.fraction, self.every, self.direction = name, fraction, every, None

    def after_update(self, step, blocked):
        if (step + 1) % self.every:
            return
        w = dict(p for lay in blocked.layout for p in lay.params)[self.name].data
        if self.direction is None:
            g = torch.Generator().manual_seed(26)
            left = torch.randn(w.shape[0], generator=g, dtype=torch.float64)
            right = torch.randn(w.shape[1], generator=g, dtype=torch.float64)
            self.direction = torch.outer(left / left.norm(), right / right.norm())
        w.copy_((w.double() + self.fraction * float(w.double().norm()) * self.direction).to(w.dtype))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="llama,mistral", help="llama, mistral, builtin (comma-separated)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--lrs", default="1e-3,1e-2")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--steps-per-block", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--attack", type=float, default=0.0, help="rank-1 move per step block, as a fraction of the norm")
    ap.add_argument("--target", default="model.layers.2.mlp.up_proj.weight")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="aftune-state-rule-"))
    for family in args.family.split(","):
        for dtype in args.dtypes.split(","):
            for lr in (float(x) for x in args.lrs.split(",")):
                s = TrainSettings(steps=args.steps, batch_size=args.batch, seq_len=args.seq, layers_per_block=2,
                                  steps_per_block=args.steps_per_block, dtype=dtype, lr=lr).validate()
                model, data = tiny_model(family, work), data_for(family, work)
                run = work / f"run-{family}-{dtype}-{lr:g}"
                agreement = make_agreement(model, data, s)
                drift = RankOneDrift(args.target, args.attack, args.steps_per_block) if args.attack else None
                key = PublicKey.load(train(model, data, run, agreement=agreement, deviation=drift).public_key_path)
                tag = f"{family} {dtype}->{REPLAY[dtype]} lr {lr:g}, {args.steps} steps, B_S {args.steps_per_block}"
                if drift is not None:
                    for mode, replay in (("tolerance", REPLAY[dtype]), ("strict", None)):
                        report = Verifier(run, key, agreement, mode=mode, replay_dtype=replay).verify_all()
                        bad = [f"{r.layer_block},{r.step_block}" for r in report.results if r.verdict == "FAIL"]
                        chain = sorted({f.step_block for r in report.results for f in r.findings if "chain" in f.reason})
                        print(f"{tag}, drift {args.attack:g}: {mode} {report.verdict}, failing blocks {bad}"
                              + (f", chain findings in step blocks {chain}" if mode == "tolerance" else ""))
                    continue
                never = Tolerance(NEVER, NEVER, state=tuple((sc, k, NEVER, NEVER, NEVER) for sc in STATE_SCOPES
                                                            for k in STATE_KINDS))
                v = Verifier(run, key, agreement, mode="tolerance", replay_dtype=REPLAY[dtype], tolerance=never)
                v.verify_all()
                u = UNIT_ROUNDOFF[dtype]
                seen = " | ".join(f"{sc} {k}: element {e:.3g}, norm {n / u:.3g} u, count {c:.3g}"
                                  for (sc, k), (e, n, c) in sorted(v.state_observed.items()))
                verdict = Verifier(run, key, agreement, mode="tolerance", replay_dtype=REPLAY[dtype]).verify_all()
                print(f"{tag}: {seen}; defaults: {verdict.summary()[:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
