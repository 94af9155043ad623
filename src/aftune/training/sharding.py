"""Who computes and commits what when several processes train one run (SPEC.md 5.5): the flat
shard of a tensor that each FSDP rank updates, and the manifest keys of the ranks' gradients.

    shard_bounds(10, 4)  ->  [(0, 3), (3, 6), (6, 9), (9, 10)]
"""

from __future__ import annotations


def shard_bounds(numel: int, world_size: int) -> list[tuple[int, int]]:
    """FSDP (SPEC.md 5.5): rank r's flat shard of a tensor of `numel` elements is elements
    [min(r*c, n), min((r+1)*c, n)) of its row-major flattening, c = ceil(n / world_size)."""
    c = -(-numel // world_size)
    return [(min(r * c, numel), min((r + 1) * c, numel)) for r in range(world_size)]


def rank_gradient_key(step: int, rank: int, name: str) -> str:
    """The commitment of rank `rank`'s local gradient of parameter `name` in step `step`."""
    return f"step/{step:08d}/rank/{rank:04d}/gradient/{name}"


def reduced_gradient_key(step: int, name: str) -> str:
    """The commitment of the reduced (applied, before clipping) gradient of `name` in `step`."""
    return f"step/{step:08d}/gradient/{name}"
