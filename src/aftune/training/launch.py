"""Starting the ranks of a run on this machine: `aftune train --nproc-per-node N` (SPEC.md 5.5).

    aftune train --agreement agreement.json --run-dir RUN --nproc-per-node 2

Spawns N processes with the environment torchrun would give them (RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, a free MASTER_PORT), each running `train.train` as one rank
(training/distributed.py), and returns rank 0's result. Several machines: start each with
torchrun instead (`torchrun --nnodes ... -m aftune train ...`), with the run directory on shared
storage.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from ..errors import AftuneError, InputError
from .distributed import ENV_RANK, ENV_WORLD, close, from_environment
from .train import TrainResult, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, nproc: int, port: int, threads: int, call: dict, results) -> None:
    """One spawned rank: the environment torchrun would give it, then `train`."""
    os.environ.update({ENV_RANK: str(rank), ENV_WORLD: str(nproc), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    exchange = from_environment()
    try:
        result = train(**call, exchange=exchange)
    except AftuneError as exc:
        # said, then raised: torch's spawn ends this rank nonzero and stops the others (which may
        # wait in a collective); the launcher raises the message as said
        results.put({"rank": rank, "error": type(exc).__name__, "message": str(exc)})
        close(exchange)
        raise
    close(exchange)
    if rank == 0:
        results.put({"rank": 0, "result": {k: (v.hex() if isinstance(v, bytes) else str(v) if isinstance(v, Path)
                                               else v) for k, v in result.__dict__.items()}})


def spawn_training(nproc: int, threads: int | None = None, **call):
    """Run `train(**call)` on `nproc` spawned ranks of this machine (gloo on CPU) and return
    rank 0's `TrainResult`. `threads`: each rank's intra-op thread count (the same on every rank:
    bitwise replay pins the recorded one); default: this process's count divided among ranks."""
    import torch.multiprocessing as mp

    from .. import errors

    agreed = call.get("agreement").settings if call.get("agreement") is not None else call.get("settings")
    if agreed is not None and agreed.world_size != nproc:  # refused before any process starts
        raise InputError(f"the settings say world size {agreed.world_size}, not {nproc} processes: start it with "
                         f"--nproc-per-node {agreed.world_size}" if agreed.world_size > 1 else
                         f"these settings are for one process (no distributed settings), not {nproc}")
    run = Path(call["run_dir"])
    if not call.get("resume") and run.exists() and any(run.iterdir()):  # train() says it too, after starting
        raise InputError(f"run directory {run} already exists and is not empty: records are never overwritten")
    threads = threads or max(1, torch.get_num_threads() // nproc)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    try:
        mp.start_processes(_rank_main, args=(nproc, free_port(), threads, call, results), nprocs=nproc,
                           start_method="spawn", join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        failed = sorted((x for x in _drain(results) if "error" in x), key=lambda x: x["rank"])
        if not failed:
            raise  # a rank died without saying why (killed, out of memory): not an input error
        kind = getattr(errors, failed[0]["error"], None)
        kind = kind if isinstance(kind, type) and issubclass(kind, AftuneError) else AftuneError
        raise kind(failed[0]["message"]) from None
    said = [x for x in _drain(results) if "result" in x]
    if not said:
        raise AftuneError("rank 0 ended without a result")
    r = said[0]["result"]
    return TrainResult(Path(r["run_dir"]), bytes.fromhex(r["config_digest"]), bytes.fromhex(r["run_root"]),
                       bytes.fromhex(r["final_model_digest"]),
                       Path(r["public_key_path"]) if r["public_key_path"] not in (None, "None") else None,
                       r["final_loss"])


def _drain(results) -> list[dict]:
    out = []
    while not results.empty():
        out.append(results.get())
    return out
