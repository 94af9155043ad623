"""Several training processes (DDP, FSDP) recorded as one run (SPEC.md 5.5).

    aftune train --nproc-per-node 2 --run-dir RUN ...                 # spawns 2 ranks (launch.py)
    torchrun --nproc-per-node 2 -m aftune train --run-dir RUN ...     # the same run under torchrun

Each process is one rank of `settings.distributed.world_size`. Rank r runs aftune's engine over
micro-batches m = r, r + W, ... of every step (`TrainSettings.micro_batches_of`); the ranks'
local gradients are exchanged with `all_gather` (a copy, no arithmetic) and summed in rank order
on every rank (`BlockedModel.reduce_gradients`), never by the backend's `all_reduce`, whose
summation order is not pinned. Under FSDP each rank updates its flat shard of every tensor and
the shards are gathered back. Rank 0 writes the run directory and signs; the other ranks store
their objects in the same `RUN/objects` (the run directory must be on storage every rank can
write: one machine, or a shared file system) and send their manifest rows to rank 0 at the end
of every step block. Collectives use gloo (aftune trains on the CPU); the manifest rows always
go over a gloo group, also in a process group another backend started.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..core.rows import rows_from_json, rows_to_json
from ..errors import InputError
from .engine import BlockedModel
from .sharding import shard_bounds

ENV_RANK, ENV_WORLD = "RANK", "WORLD_SIZE"


@dataclass
class Exchange:
    """This process's rank and the collectives the engine and the recorder use."""

    rank: int
    world_size: int
    rows_group: Any = None  # a gloo group for the manifest rows and errors (objects, not tensors)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def gradients(self, local: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every rank's local gradients, by rank (an all_gather per tensor: copies only)."""
        import torch.distributed as dist

        out: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world_size)]
        for name, g in local.items():
            g = g.contiguous()
            parts = [torch.empty_like(g) for _ in range(self.world_size)]
            dist.all_gather(parts, g)
            for r in range(self.world_size):
                out[r][name] = g if r == self.rank else parts[r]
        return out

    @torch.no_grad()
    def parameters(self, blocked: BlockedModel) -> None:
        """FSDP: after each rank updated its shard of every trainable tensor, gather the shards
        so that every rank holds the whole updated tensors."""
        import torch.distributed as dist

        for lay in blocked.layout:
            for _, p in lay.trainable:
                flat = p.data.view(-1)
                bounds = shard_bounds(flat.numel(), self.world_size)
                width = bounds[0][1] - bounds[0][0]
                if width == 0:
                    continue
                mine = torch.zeros(width, dtype=flat.dtype, device=flat.device)
                lo, hi = bounds[self.rank]
                mine[: hi - lo] = flat[lo:hi]
                parts = [torch.empty_like(mine) for _ in range(self.world_size)]
                dist.all_gather(parts, mine)
                for r, (lo, hi) in enumerate(bounds):
                    if r != self.rank and hi > lo:
                        flat[lo:hi] = parts[r][: hi - lo]

    def all_objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank (JSON-able values only: no process unpickles what another one
        could not have written honestly; they are this provider's own processes)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, json.dumps(obj), group=self.rows_group)
        return [json.loads(x) for x in out]

    def check_all(self, error: BaseException | None) -> None:
        """A collective: raises on every rank when any rank failed (so none waits forever)."""
        said = self.all_objects(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        wrong = [(r, e) for r, e in enumerate(said) if e is not None]
        if wrong:
            r, e = wrong[0]
            raise InputError(f"rank {r} of {self.world_size} stopped: {e}")

    def rows(self, step_block: int, rows: tuple[dict, list[dict]] | None) -> list[tuple[dict, list[dict]]]:
        """Rank 0 receives every other rank's rows of `step_block` (its common and block rows)."""
        mine = None if rows is None else [rows_to_json(rows[0]), [rows_to_json(b) for b in rows[1]]]
        said = self.all_objects(mine)
        out = []
        for r, item in enumerate(said):
            if r == self.rank or item is None:
                continue
            where = f"rank {r}'s rows of step block {step_block}"
            out.append((rows_from_json(item[0], where), [rows_from_json(b, where) for b in item[1]]))
        return out


def commits_state(exchange: Exchange | None, key: str) -> bool:
    """Which rank commits a state tensor (SPEC.md 5.5): rank 0 the weights, buffers and (DDP)
    optimizer state; under FSDP rank r the shard `optim/.../shard/{r:04d}`."""
    if exchange is None:
        return True
    if "/shard/" in key:
        return int(key.rpartition("/shard/")[2]) == exchange.rank
    return exchange.rank == 0


def from_environment() -> Exchange | None:
    """The process group of a launched rank (RANK and WORLD_SIZE set, as torchrun and
    `aftune train --nproc-per-node` set them), or None for one process."""
    world = int(os.environ.get(ENV_WORLD, "1") or "1")
    if world <= 1:
        return None
    import torch.distributed as dist

    rank = int(os.environ[ENV_RANK])
    if not dist.is_initialized():
        # aftune's trainer computes on the CPU in this revision, so the ranks exchange CPU tensors
        # over gloo. With CUDA tensors the same all_gathers would run on NCCL (not measured here).
        dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Exchange(rank, world, group)


def close(exchange: Exchange | None) -> None:
    import torch.distributed as dist

    if exchange is not None and dist.is_initialized():
        dist.destroy_process_group()


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get(ENV_WORLD, "1") or "1"))
    except ValueError:
        raise InputError(f"{ENV_WORLD}={os.environ.get(ENV_WORLD)!r} is not a number") from None


def settings_for(settings, world_size: int):
    """`settings` on `world_size` ranks (DDP, the defaults of SPEC.md 5.5)."""
    from dataclasses import replace

    from .settings import DistributedSettings

    return replace(settings, distributed=DistributedSettings(world_size=world_size)).validate()
