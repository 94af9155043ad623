"""Recording overhead of a 2-rank DDP run on CPU (gloo): recorded step time / plain step time,
and the bytes each rank commits per step (SPEC.md 5.5).

    PYTHONPATH=$PWD/src python benchmarks/distributed.py                 # built-in model, 2 ranks
    PYTHONPATH=$PWD/src python benchmarks/distributed.py --steps 24 --rounds 3 --strategy fsdp

Both modes train the built-in model from the same weights on the same batches, on 2 spawned
processes of this machine with one intra-op thread each:

* plain    - torch's DistributedDataParallel over the Hugging Face model: each rank runs its
             micro-batches (m mod 2, as aftune shards them) with `no_sync` until its last one,
             `model(**batch).loss * weight` backward, `clip_grad_norm_`, `torch.optim.AdamW.step()`.
             DDP's gradient all_reduce divides by the world size; the loss weight 1/grad_accum x 2
             makes the gradients the agreed ones up to summation order.
* recorded - `aftune train` on 2 ranks (training/launch.py): block by block, the rank-order
             reduction by all_gather, everything committed, rank 0 signing.

Rounds alternate the modes (plain, recorded; recorded, plain; ...) so load from other processes
falls on both alike; per mode the median step time over every round's steps after the first
--skip steps. Step times come from rank 0 (a step ends at the same collective on both ranks).
Bytes per step per rank: the object files and manifest rows each rank committed (5.5 says which),
divided by the steps; digest-only rows (the ranks' gradients) take no object.

This is a benchmark, not a test: it asserts nothing and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aftune import builtin
from aftune.training.train import Deviation


class StepClock(Deviation):
    """Not a deviation: rank 0 notes the time at the end of every step (after the update)."""

    def __init__(self, path: str):
        self.path = path

    def after_update(self, step, blocked):
        if os.environ.get("RANK") == "0":
            with open(self.path, "a") as f:
                f.write(f"{time.perf_counter()}\n")


def _plain_rank(rank: int, world: int, port: int, settings_json: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from aftune.data import OrderCache, build_batch, load_dataset
    from aftune.models import load_pretrained, tokenizer_files, tokenizer_from_files
    from aftune.training.agreement import make_agreement
    from aftune.training.settings import TrainSettings

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    settings = TrainSettings.from_json(settings_json)
    _, model = load_pretrained(builtin.MODEL_DIR, settings.attn_implementation, torch.float32)
    dataset = load_dataset(builtin.DATA_FILE)
    spec = make_agreement(builtin.MODEL_DIR, builtin.DATA_FILE, settings).batch_spec()
    tokenizer = tokenizer_from_files(tokenizer_files(builtin.MODEL_DIR))
    order = OrderCache(settings.hash_algorithm, settings.seed, len(dataset.examples))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2),
                            eps=settings.eps, weight_decay=settings.weight_decay)
    mine = list(settings.micro_batches_of(rank))
    times = []
    for t in range(settings.steps):
        batches = [build_batch(dataset, order.indices(t * settings.grad_accum + m, settings.batch_size), spec, tokenizer)
                   for m in mine]
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            ctx = ddp.no_sync() if not last else _nothing()
            with ctx:
                loss = ddp(**batch).loss * (world / settings.grad_accum)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    if rank == 0:
        Path(out).write_text("\n".join(map(str, times)) + "\n")
    dist.destroy_process_group()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def plain(settings, world: int, out: Path) -> list[float]:
    import torch.multiprocessing as mp

    from aftune.training.launch import free_port

    mp.start_processes(_plain_rank, args=(world, free_port(), settings.to_json(), str(out)), nprocs=world,
                       start_method="spawn", join=True)
    return _step_times(out)


def recorded(settings, world: int, run: Path, out: Path) -> list[float]:
    from aftune.training.agreement import make_agreement
    from aftune.training.launch import spawn_training

    agreement = make_agreement(builtin.MODEL_DIR, builtin.DATA_FILE, settings)
    spawn_training(world, threads=1, model_dir=None, data_path=None, run_dir=run, agreement=agreement,
                   deviation=StepClock(str(out)))
    return _step_times(out)


def _step_times(path: Path) -> list[float]:
    stamps = [float(x) for x in path.read_text().split()]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bytes_per_rank(run: Path, world: int, steps: int) -> dict[int, dict[str, float]]:
    """Object bytes and manifest rows each rank committed, per step (SPEC.md 5.5: who commits what)."""
    from aftune.core.store import ObjectStore

    store = ObjectStore(run / "objects", "blake3")
    out = {r: {"stored_bytes": 0, "rows": 0, "digest_only_rows": 0} for r in range(world)}
    seen: set[str] = set()
    for path in sorted((run / "manifests").glob("*.json")):
        m = json.loads(path.read_text())
        rows = [(row, None) for row in m["common"]] + [(row, b) for b, rows in enumerate(m["blocks"]) for row in rows]
        for (key, name, dtype, shape, digest), _ in rows:
            if "/rank/" in key:
                r = int(key.split("/rank/")[1].split("/")[0])
            elif "/shard/" in key:
                r = int(key.rsplit("/shard/", 1)[1])
            elif "/micro/" in key:
                r = int(key.split("/micro/")[1].split("/")[0]) % world
            else:
                r = 0
            out[r]["rows"] += 1
            p = store.path(bytes.fromhex(digest))
            if p.exists():
                if digest not in seen:
                    seen.add(digest)
                    out[r]["stored_bytes"] += p.stat().st_size
            else:
                out[r]["digest_only_rows"] += 1
    meta = sum(p.stat().st_size for p in (run / "manifests").glob("*.json")) + (run / "transcript.jsonl").stat().st_size
    out[0]["manifests_and_transcript"] = meta
    return {r: {k: v / steps for k, v in d.items()} for r, d in out.items()}


def main() -> None:
    from aftune.training.settings import DistributedSettings, TrainSettings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2, help="steps dropped at the start of every run")
    ap.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"))
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    world = 2
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                             seq_len=args.seq_len, steps_per_block=8, layers_per_block=2,
                             distributed=DistributedSettings(world, args.strategy))
    times: dict[str, list[float]] = {"plain": [], "recorded": []}
    last_run = None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            order = ("plain", "recorded") if i % 2 == 0 else ("recorded", "plain")
            for mode in order:
                out = Path(tmp) / f"{mode}{i}.times"
                if mode == "plain":
                    steps = plain(settings, world, out)
                else:
                    last_run = Path(tmp) / f"run{i}"
                    steps = recorded(settings, world, last_run, out)
                times[mode] += steps[args.skip:]
            print(f"round {i}: plain {statistics.median(times['plain']) * 1e3:.1f} ms, recorded "
                  f"{statistics.median(times['recorded']) * 1e3:.1f} ms (medians so far)", flush=True)
        sizes = bytes_per_rank(last_run, world, args.steps)
    p, r = statistics.median(times["plain"]), statistics.median(times["recorded"])
    print(f"\n2-rank {args.strategy} on CPU (gloo, 1 thread per rank), built-in model, {args.steps} steps x "
          f"{args.rounds} rounds, grad_accum {args.grad_accum}, batch {args.batch_size}, seq_len {args.seq_len}")
    print(f"median step: plain (torch DDP) {p * 1e3:.1f} ms, recorded (aftune) {r * 1e3:.1f} ms; "
          f"recorded/plain {r / p:.2f} ({len(times['plain'])} and {len(times['recorded'])} steps)")
    for rank, d in sizes.items():
        extra = f", manifests+transcript {d['manifests_and_transcript'] / 1e3:.1f} kB" if rank == 0 else ""
        print(f"rank {rank}: {d['stored_bytes'] / 1e3:.1f} kB stored objects per step, {d['rows']:.0f} rows per step "
              f"({d['digest_only_rows']:.0f} digest only){extra}")
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
