"""Verification speed: the time to verify one block against its share of the recorded step time,
and the throughput of `verify --all`, sequential and over a process pool.

    python benchmarks/verify_speed.py --config builtin
    python benchmarks/verify_speed.py --config smollm135m          # 135M, tied embeddings: ~10 min here
    python benchmarks/verify_speed.py --config llama134m --workers 2

One process records a run with `aftune.training.train.train` (B_L=4, B_S=8, I_C=8 by default, as
record_overhead.py), timing each recorded step. It then measures, with the same model:

* each layer block's share of a step: an unrecorded `BlockedModel` step (the code path the
  verifier replays) timed per block (forward, backward and optimizer update of that block's
  tensors); share_b = recorded step time x (time of block b / time of all blocks);
* verifying one block: `Verifier.verify_block(l, 0)` (step block 0: its start state is stored),
  divided by the steps of the step block. The ratio verify time per step / share_l is the
  issue's measure (target <= 1.2). A block of a tied group is replayed with its whole group
  (SPEC.md 5.2.4), so its ratio is also given against the group's share;
* `verify --all`: `Verifier.verify_all()` in this process (each layer block chained through its
  step blocks, then the final model), as the CLI runs it; then the same layer blocks spread over
  `--workers` processes (spawned; each one builds its own Verifier and chains its layer blocks),
  as `aftune audit` spreads a challenge. Strict replay pins each process to the intra-op thread
  count the run was recorded with (bitwise CPU results depend on it), so a pool of w processes
  needs w x that many cores to run in parallel: that is what bounds the throughput here.

The machine is shared: the 1-minute load average is printed with every measurement. This is a
benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_overhead import ALIASES, DEFAULTS, BlockedTrainer, load_inputs, prepare  # noqa: E402

import aftune.training.train as aftune_train  # noqa: E402
from aftune.core.signing import PublicKey  # noqa: E402
from aftune.training.settings import TrainSettings  # noqa: E402
from aftune.training.verify import Verifier  # noqa: E402


def load() -> float:
    return os.getloadavg()[0]


def _verifier(run_dir: Path, key_text: str) -> Verifier:
    # the benchmark checks the record against itself; a client would pass its agreement
    return Verifier(run_dir, PublicKey.from_text(key_text), unsafe_no_agreement=True)


def _verify_layer_blocks(run_dir: str, key_text: str, layer_blocks: list[int]) -> tuple[float, list[str]]:
    """A pool worker: chain each of its layer blocks through every step block."""
    t0 = time.perf_counter()
    v = _verifier(Path(run_dir), key_text)
    verdicts = []
    for l in layer_blocks:
        state = None
        for s in range(v.num_step_blocks):
            result, state = v.verify_block(l, s, state)
            verdicts.append(result.verdict)
    return time.perf_counter() - t0, verdicts


def block_times(trainer: BlockedTrainer, steps: range) -> list[float]:
    """Seconds spent per layer block (forward, backward, update) in unrecorded blocked steps."""
    bm = trainer.blocked
    spent = [0.0] * len(bm.blocks)

    def timed(method):
        def run(block, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(block, *args, **kwargs)
            finally:
                spent[block] += time.perf_counter() - t0
        return run

    for name in ("forward", "backward", "update"):
        setattr(bm, name, timed(getattr(bm, name)))
    for t in steps:
        trainer.step(t)
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(DEFAULTS) + sorted(ALIASES), default="builtin")
    ap.add_argument("--steps", type=int, help="recorded steps (default: 2 step blocks)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--layers-per-block", type=int, default=4)
    ap.add_argument("--steps-per-block", type=int, default=8)
    ap.add_argument("--checkpoint-interval", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="processes for the pooled verify --all (default 2)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads for recording (and so for strict replay)")
    ap.add_argument("--work-dir", type=Path)
    args = ap.parse_args(argv)
    config = ALIASES.get(args.config, args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = DEFAULTS[config]
    settings = TrainSettings(
        steps=args.steps or 2 * args.steps_per_block, batch_size=args.batch_size or d["batch_size"],
        seq_len=args.seq_len or d["seq_len"], layers_per_block=args.layers_per_block,
        steps_per_block=args.steps_per_block, checkpoint_interval=args.checkpoint_interval,
    ).validate()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    work_ctx = tempfile.TemporaryDirectory(prefix="aftune-verify-") if args.work_dir is None else None
    work = Path(work_ctx.name if work_ctx else args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir, data, desc = prepare(config, settings.seq_len, False, work)
        inp = load_inputs(model_dir, data, settings)
        print(f"config {config}: {desc}")
        print(f"settings: steps={settings.steps} batch={settings.batch_size} seq_len={settings.seq_len} "
              f"B_L={settings.layers_per_block} B_S={settings.steps_per_block} I_C={settings.checkpoint_interval}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs")

        # 1. record, timing each step
        marks: list[float] = []
        run_dir = work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        l0 = load()
        t0 = time.perf_counter()
        result = aftune_train.train(model_dir, data, run_dir, settings,
                                    progress=lambda *a: marks.append(time.perf_counter()))
        steps_wall = [b - a for a, b in zip([t0] + marks, marks)][1:]  # the first step warms up
        step_s = statistics.median(steps_wall)
        key_text = PublicKey.load(result.public_key_path).text
        print(f"recorded {settings.steps} steps: median step {step_s:.4f} s (load {l0:.2f} -> {load():.2f})")

        # 2. each layer block's share of a step
        trainer = BlockedTrainer(inp, settings)
        trainer.step(0)  # warm-up
        l0 = load()
        spent = block_times(trainer, range(1, 1 + min(4, settings.steps)))
        del trainer
        total = sum(spent)
        shares = [step_s * t / total for t in spent]
        print(f"block shares of a recorded step (from unrecorded blocked steps, load {l0:.2f} -> {load():.2f}): "
              + ", ".join(f"{b}: {100 * t / total:.1f}%" for b, t in enumerate(spent)))

        # 3. one block at a time
        v = _verifier(run_dir, key_text)
        nb = len(v.blocked.blocks)
        print(f"\nverify one block (step block 0, {settings.steps_per_block} steps), strict:")
        print(f"{'layer block':<14}{'verify s':>10}{'per step s':>12}{'share s':>10}{'ratio':>8}"
              f"{'tied group':>14}{'vs group':>10}{'load':>7}")
        ratios, group_ratios = [], []
        for l in range(nb):
            group = v.blocked.tied_group(l)
            la = load()
            res, _ = v.verify_block(l, 0)
            per_step = res.seconds / settings.steps_per_block
            ratio = per_step / shares[l]
            group_share = sum(shares[b] for b in group)
            ratios.append(ratio)
            group_ratios.append(per_step / group_share)
            print(f"{l:<14}{res.seconds:>10.2f}{per_step:>12.4f}{shares[l]:>10.4f}{ratio:>8.2f}"
                  f"{','.join(map(str, group)):>14}{per_step / group_share:>10.2f}{la:>7.2f}  {res.verdict}")
        solo = [r for r, l in zip(ratios, range(nb)) if len(v.blocked.tied_group(l)) == 1]
        print(f"verify time per step / share: median {statistics.median(ratios):.2f} over all blocks; "
              + (f"blocks outside tied groups: median {statistics.median(solo):.2f}, max {max(solo):.2f}; " if solo else "")
              + f"against the group's share: median {statistics.median(group_ratios):.2f}, max {max(group_ratios):.2f} "
              f"(target <= 1.2)")

        # 4. verify --all, sequential, as the CLI runs it
        la = load()
        t0 = time.perf_counter()
        report = _verifier(run_dir, key_text).verify_all()
        seq = time.perf_counter() - t0
        train_s = step_s * settings.steps
        print(f"\nverify --all (sequential, {nb} x {settings.num_step_blocks} blocks + final model): {seq:.1f} s, "
              f"{report.verdict}; {settings.steps / seq:.3f} recorded steps verified per second; "
              f"{seq / train_s:.2f} x the recorded training time ({train_s:.1f} s) (load {la:.2f} -> {load():.2f})")

        # 5. verify --all over a process pool (layer blocks spread over the workers)
        if args.workers > 1:
            import multiprocessing

            chunks = [list(range(nb))[i::args.workers] for i in range(args.workers)]
            la = load()
            t0 = time.perf_counter()
            with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                outs = list(pool.map(_verify_layer_blocks, [str(run_dir)] * len(chunks), [key_text] * len(chunks),
                                     chunks))
            pooled = time.perf_counter() - t0
            verdicts = [x for _, vs in outs for x in vs]
            threads = v.recorded_threads() or torch.get_num_threads()
            print(f"verify --all over {args.workers} processes (blocks only, no final model): {pooled:.1f} s "
                  f"(workers {', '.join(f'{w:.1f}' for w, _ in outs)} s), "
                  f"{'all PASS' if set(verdicts) == {'PASS'} else 'NOT all PASS'}; speed-up {seq / pooled:.2f} x; "
                  f"bound: {os.cpu_count()} cores / {threads} intra-op threads per strict replay = "
                  f"{max(1, (os.cpu_count() or 1) // threads)} replay(s) at full speed at once "
                  f"(load {la:.2f} -> {load():.2f})")
        print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
