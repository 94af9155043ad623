"""Block-decomposed execution: the one code path that both the provider's trainer and the
verifier's replay run (SPEC.md 5).

The provider trains by running each layer block on a detached copy of the previous block's
output, then back-propagating block by block from the loss. The tensors crossing block
boundaries are exactly what is recorded, and a verifier that replays one block alone, fed the
committed boundary tensors, performs the same arithmetic in the same order. That is what makes
strict (bitwise) verification possible on the same kind of hardware.

Parameters used by more than one layer block (tied input and output embeddings) are owned by the
first block that uses them. Other blocks use a detached alias, so each block's gradient
contribution is separate; the full gradient is accumulated in a fixed order: for each
micro-batch, the owner's contribution, then the others' in block order. These parts are not
committed (a tied embedding's part is vocab x hidden per micro-batch): the blocks that share a
trainable parameter form a tied group, and a verifier replays the whole group together, so
every part is recomputed from committed tensors (SPEC.md 5.2.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from .settings import LayerBlocks, TrainSettings
from ..core.encoding import TAG_RNG, hash_message, u64
from ..errors import InputError
from .manifest import common_key
from ..models.base import Adapter, Batch, Context
from .optim import STATE_NAMES, apply_update, clip_coefficient, decays, init_state, tensor_norms
from . import portable
from .portable import TAU, TAU_STATE, WriterGrid, log_key, state_scale
from ..core.grid import row_scale
from ..data.sft import accumulation_weights
from .sharding import rank_gradient_key, reduced_gradient_key, shard_bounds


def rng_seed(algorithm: str, seed: int, step: int, micro: int, block: int) -> int:
    """Seed of the global torch RNG before layer block `block` runs forward (dropout masks)."""
    d = hash_message(algorithm, TAG_RNG, u64(seed), u64(step), u64(micro), u64(block))
    return int.from_bytes(d[:8], "big") & ((1 << 63) - 1)


@dataclass
class BlockLayout:
    """Which tensors layer block b owns, and which shared parameters it uses but does not own."""

    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    foreign: list[tuple[str, nn.Parameter, int]] = field(default_factory=list)  # (name, param, owner)
    aliases: dict[int, dict[str, str]] = field(default_factory=dict)  # stage -> {local name: name}

    @property
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.params if p.requires_grad]


@dataclass
class MicroResult:
    output: torch.Tensor  # block output (the loss for the last block)
    input_grad: torch.Tensor | None  # gradient w.r.t. the block input (None for block 0)
    alias_parts: dict[str, torch.Tensor]  # shared params owned elsewhere: this block's gradient part


class BlockedModel:
    """A model split into layer blocks, with per-tensor optimizer state."""

    def __init__(self, model: nn.Module, adapter: Adapter, settings: TrainSettings):
        self.model, self.adapter, self.settings = model, adapter, settings
        self.algorithm = settings.hash_algorithm
        self.optimizer = settings.optimizer_spec()
        stages = adapter.stages
        self.stage_names = [s.name for s in stages]
        self.blocks = LayerBlocks(len(stages) - 2, settings.layers_per_block)
        self.layout = self._layout()
        self.optim_state: dict[str, dict[str, torch.Tensor]] = {}
        for layout in self.layout:
            for name, p in layout.trainable:
                self.optim_state[name] = init_state(self.optimizer, p.detach())
        self.owner = {name: b for b, lay in enumerate(self.layout) for name, _ in lay.params}
        # several processes (SPEC.md 5.5): world size 1 is the one-process run of every earlier version
        self.world_size = settings.world_size
        self.fsdp = settings.distributed is not None and settings.distributed.strategy == "fsdp"
        self.shard_rank: int | None = None  # FSDP provider: the one rank whose optimizer state this holds
        # portable numerics (training/portable.py): float64 compute, every crossing value rounded
        # to the float32 grid through a grid (WriterGrid for the provider, ReplayGrid to verify)
        self.portable = settings.numerics == "portable"
        if self.portable:
            running = [n for lay in self.layout for n, b in lay.buffers if b.is_floating_point()]
            if running:
                raise InputError(f"portable numerics cannot round running statistics such as {running[0]} "
                                 "(BatchNorm): train this model with native numerics")

    def committed(self, t: torch.Tensor) -> torch.Tensor:
        """A value as committed: a portable run commits float32 (its grid values, exactly)."""
        return t.to(portable.GRID_DTYPE) if self.portable and t.is_floating_point() else t

    # --- layout ------------------------------------------------------------------------------
    def _layout(self) -> list[BlockLayout]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        persistent = set(self.model.state_dict().keys())
        buffer_names = {id(b): n for n, b in self.model.named_buffers() if n in persistent}
        layouts = [BlockLayout() for _ in range(len(self.blocks))]
        owner: dict[str, int] = {}
        seen_buffers: set[str] = set()
        for b in range(len(self.blocks)):
            lay = layouts[b]
            for s in self.blocks.stages(b):
                module = self.adapter.stages[s].module
                for local, p in module.named_parameters(remove_duplicate=False):
                    name = names.get(id(p))
                    if name is None:
                        raise InputError(f"adapter bug: stage {self.stage_names[s]} uses a parameter outside the model")
                    if name not in owner:
                        owner[name] = b
                        lay.params.append((name, p))
                    elif owner[name] != b:
                        lay.aliases.setdefault(s, {})[local] = name
                        if all(n != name for n, _, _ in lay.foreign):
                            lay.foreign.append((name, p, owner[name]))
                for local, buf in module.named_buffers(remove_duplicate=False):
                    name = buffer_names.get(id(buf))
                    if name is not None and name not in seen_buffers:
                        seen_buffers.add(name)
                        lay.buffers.append((name, buf))
        uncovered = sorted(set(names.values()) - set(owner))
        if uncovered:
            raise InputError(f"adapter bug: parameters used by no stage: {uncovered[:5]}")
        return layouts

    def describe(self, block: int) -> str:
        text = self.blocks.describe(block, self.stage_names)
        others = [b for b in self.tied_group(block) if b != block]
        if others:
            text += f", replayed with tied layer block{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}"
        return text

    def tied_group(self, block: int) -> list[int]:
        """The layer blocks replayed together with `block` (SPEC.md 5.2.4): the smallest set that
        holds `block` and every block sharing a trainable parameter with a block of the set."""
        links: dict[int, set[int]] = {}
        for b, lay in enumerate(self.layout):
            for _, p, owner in lay.foreign:
                if p.requires_grad:
                    links.setdefault(b, set()).add(owner)
                    links.setdefault(owner, set()).add(b)
        group, todo = {block}, [block]
        while todo:
            for other in links.get(todo.pop(), ()):
                if other not in group:
                    group.add(other)
                    todo.append(other)
        return sorted(group)

    def parameter(self, name: str) -> nn.Parameter:
        return dict(self.layout[self.owner[name]].params)[name]

    # --- state -------------------------------------------------------------------------------
    def state_tensors(self, block: int) -> dict[str, tuple[str, torch.Tensor]]:
        """Live tensors of the block's state: {key: (digest name, tensor)} (SPEC.md 3.3)."""
        lay = self.layout[block]
        out: dict[str, tuple[str, torch.Tensor]] = {}
        for name, p in lay.params:
            out[f"state/{name}"] = (name, p.data)
        for name, buf in lay.buffers:
            out[f"state/{name}"] = (name, buf)
        for name, _ in lay.trainable:
            out.update(self.optim_tensors(name))
        return out

    def optim_tensors(self, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """The optimizer state of trainable `name` by key: one tensor per slot, or under FSDP one
        flat shard per slot and rank (`optim/{name}/{slot}/shard/{r:04d}`, SPEC.md 5.5)."""
        out = {}
        for slot in STATE_NAMES[self.optimizer.name]:
            t = self.optim_state[name][slot]
            if self.shard_rank is not None:  # only this rank's shard exists here
                r = self.shard_rank
                out[f"optim/{name}/{slot}/shard/{r:04d}"] = (f"{name}/{slot}/shard/{r:04d}", t)
                continue
            if not self.fsdp:
                out[f"optim/{name}/{slot}"] = (f"{name}/{slot}", t)
                continue
            flat = t.view(-1)
            for r, (lo, hi) in enumerate(shard_bounds(flat.numel(), self.world_size)):
                out[f"optim/{name}/{slot}/shard/{r:04d}"] = (f"{name}/{slot}/shard/{r:04d}", flat[lo:hi])
        return out

    def foreign_state_keys(self, block: int) -> list[tuple[str, int]]:
        """(key in the owner's subtree, owner) for each shared tensor this block needs."""
        keys = []
        for name, p, owner in self.layout[block].foreign:
            keys.append((f"state/{name}", owner))
            if p.requires_grad:
                keys += [(k, owner) for k in self.optim_tensors(name)]
        return keys

    @torch.no_grad()
    def assign(self, key: str, tensor: torch.Tensor) -> None:
        """Load one committed state tensor (by key) into the live model or optimizer state."""
        kind, _, rest = key.partition("/")
        if kind == "state":
            target = self._state_target(rest)
        elif kind == "optim" and self.fsdp:
            name, _, slot = rest.partition("/shard/")[0].rpartition("/")
            found = self.optim_tensors(name).get(key) if name in self.optim_state else None
            if found is None:
                raise InputError(f"unknown optimizer state {key!r}")
            target = found[1]
        elif kind == "optim":
            name, _, slot = rest.rpartition("/")
            if name not in self.optim_state or slot not in self.optim_state[name]:
                raise InputError(f"unknown optimizer state {key!r}")
            target = self.optim_state[name][slot]
        else:
            raise InputError(f"unknown state key {key!r}")
        if self.portable and tensor.dtype == portable.GRID_DTYPE and target.dtype == portable.COMPUTE_DTYPE:
            tensor = tensor.to(target.dtype)  # committed float32, held in float64
        if target.shape != tensor.shape or target.dtype != tensor.dtype:
            raise InputError(f"{key}: committed {tensor.dtype}{list(tensor.shape)}, model has {target.dtype}{list(target.shape)}")
        target.copy_(tensor)

    def _state_target(self, name: str) -> torch.Tensor:
        for lay in self.layout:
            for n, p in lay.params:
                if n == name:
                    return p.data
            for n, b in lay.buffers:
                if n == name:
                    return b
        raise InputError(f"unknown state tensor {name!r}")

    # --- one micro-batch through one block -----------------------------------------------------
    def context(self, batch: Batch) -> Context:
        if self.portable:
            batch = {k: v.to(portable.COMPUTE_DTYPE) if v.is_floating_point() else v for k, v in batch.items()}
        with torch.no_grad(), portable.compute(self.portable):
            return self.adapter.context(batch)

    def forward(self, block: int, x_in: torch.Tensor | None, context: Context, step: int, micro: int):
        """Run layer block `block`; returns (output, aliases used for foreign parameters)."""
        lay = self.layout[block]
        aliases = {name: p.detach().requires_grad_(p.requires_grad) for name, p, _ in lay.foreign}
        torch.manual_seed(rng_seed(self.algorithm, self.settings.seed, step, micro, block))
        h = x_in
        with portable.compute(self.portable):
            for s in self.blocks.stages(block):
                module = self.adapter.stages[s].module
                local = lay.aliases.get(s)
                if local:
                    h = functional_call(module, {ln: aliases[n] for ln, n in local.items()}, (h, context))
                else:
                    h = module(h, context)
        return h, aliases

    def backward(self, block: int, output: torch.Tensor, grad_output: torch.Tensor, x_in: torch.Tensor | None,
                 aliases: dict[str, torch.Tensor]) -> MicroResult:
        """Back-propagate through the block: owned parameters accumulate their gradient (a shared
        one: the owner's part); the parts of foreign parameters are returned, to be added in the
        fixed order by `add_tied_parts`."""
        torch.autograd.backward(output, grad_tensors=grad_output)
        alias_parts = {}
        for name, a in aliases.items():
            if a.requires_grad:
                alias_parts[name] = a.grad if a.grad is not None else torch.zeros_like(a)
        return MicroResult(output.detach(), None if x_in is None else x_in.grad, alias_parts)

    def loss_gradient(self, loss: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """The loss's output gradient: 1/A, or the micro-batch's agreed weight (SFT: 5.2.1)."""
        return torch.full_like(loss, 1.0 / self.settings.grad_accum if weight is None else weight)

    @torch.no_grad()
    def add_gradient(self, param: torch.Tensor, part: torch.Tensor) -> None:
        """Accumulate one gradient part into `param.grad` (the order is fixed by the caller)."""
        if param.grad is None:
            param.grad = part.clone()
        else:
            param.grad.add_(part)

    def add_tied_parts(self, alias_parts: dict[str, list[tuple[int, torch.Tensor]]]) -> None:
        """After a micro-batch's backward: add the foreign blocks' parts {name: [(block, part)]} to
        their owners' gradients in ascending block order (the owner's part is already in)."""
        for name, parts in alias_parts.items():
            param = self.parameter(name)
            for _, part in sorted(parts, key=lambda x: x[0]):
                self.add_gradient(param, part)

    # --- one optimizer step of the whole model (the provider's side) ------------------------
    def train_step(self, step: int, batches: list[Batch], fields: tuple[str, ...], commit=None,
                   before_update=None, after_update=None, exchange=None, on_local_gradients=None) -> float:
        """Run optimizer step `step` over its micro-batches, block by block. `commit(key, name,
        tensor)` receives every cross-block tensor under its manifest key (SPEC.md 3.3): the batch,
        boundary activations and gradients, losses and gradient norms (tied-weight gradient parts
        are not committed: 5.2.4). Returns the mean loss of the micro-batches run here.

        Several processes (SPEC.md 5.5; `settings.distributed`): `batches` are all the step's
        micro-batches (SFT weights need them all); `exchange` (training/distributed.py) is this
        process's rank and its collectives, and it runs only its rank's micro-batches. Without
        one, every rank is computed here in turn (a verifier's regeneration): the same record.
        `on_local_gradients(step, rank, grads)` sees each rank's local gradients before they are
        committed and exchanged (a dishonest rank in the tests)."""
        commit = commit or (lambda key, name, tensor: None)
        grid = WriterGrid(commit) if self.portable else None
        nb = len(self.blocks)
        weights = [None] * len(batches)
        if self.settings.sft is not None:  # the Trainer's weighting of micro-batches (SPEC.md 4.4.1)
            weights = accumulation_weights([batch["labels"] for batch in batches])
        losses = []
        lead = exchange is None or exchange.rank == 0  # commits what every rank computes alike
        if self.world_size == 1:
            for m, batch in enumerate(batches):
                losses.append(self.micro_step(step, m, batch, fields, weights[m], commit, grid))
        else:
            ranks = range(self.world_size) if exchange is None else [exchange.rank]
            local = {}
            for r in ranks:
                for m in self.settings.micro_batches_of(r):
                    losses.append(self.micro_step(step, m, batches[m], fields, weights[m], commit, grid))
                grads = self.take_gradients(range(nb))
                if on_local_gradients:
                    on_local_gradients(step, r, grads)
                for name, g in grads.items():
                    commit(rank_gradient_key(step, r, name), f"gradient/{name}", g)
                local[r] = grads
            gathered = [local[r] for r in range(self.world_size)] if exchange is None else \
                exchange.gradients(local[exchange.rank])
            self.reduce_gradients(gathered, step, commit if lead else None)
        for b in range(nb):
            self.settle_gradients(b, step, grid)
        norms = [self.grad_norms(b, step, grid) for b in range(nb)]
        if lead:
            for b in range(nb):
                commit(common_key(step, None, "grad_norms", f"{b:04d}"), "grad_norms", self.committed(norms[b]))
        coef = self.clip(norms)
        if before_update:
            before_update(step, self)
        for b in range(nb):
            self.update(b, step, coef, grid, shards=None if exchange is None else [exchange.rank])
        if exchange is not None and self.fsdp:
            exchange.parameters(self)  # every rank's updated shards, to every rank
        if after_update:
            after_update(step, self)
        return sum(losses) / len(losses)

    def micro_step(self, step: int, m: int, batch: Batch, fields: tuple[str, ...], weight: float | None, commit,
                   grid) -> float:
        """Forward and backward of micro-batch `m` of `step` through every block (SPEC.md 5.2.1);
        its parameter gradients accumulate into the owners' `.grad`."""
        nb = len(self.blocks)
        for field_name in fields:
            commit(common_key(step, m, "batch", field_name), field_name, batch[field_name])
        ctx = self.context(batch)
        inputs, outputs, aliases, crossing = [], [], [], []
        for b in range(nb):
            x_in = None if b == 0 else crossing[-1].detach().requires_grad_(True)
            out, alias = self.forward(b, x_in, ctx, step, m)
            inputs.append(x_in)
            outputs.append(out)
            aliases.append(alias)
            if b < nb - 1:
                crossing.append(self.settle(grid, log_key(step, m, "boundary", f"{b + 1:04d}", "activation"),
                                            out.detach()))
        loss = self.settle(grid, log_key(step, m, "loss"), outputs[-1].detach())
        grad_out = self.loss_gradient(outputs[-1], weight)
        alias_parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for b in reversed(range(nb)):
            r = self.backward(b, outputs[b], grad_out, inputs[b], aliases[b])
            if b > 0:
                grad_in = self.settle(grid, log_key(step, m, "boundary", f"{b:04d}", "gradient"), r.input_grad)
                commit(common_key(step, m, "boundary", f"{b:04d}", "activation"), "activation",
                       self.committed(crossing[b - 1]))
                commit(common_key(step, m, "boundary", f"{b:04d}", "gradient"), "gradient", self.committed(grad_in))
                grad_out = grad_in
            for name, part in r.alias_parts.items():
                alias_parts.setdefault(name, []).append((b, part))
        self.add_tied_parts(alias_parts)  # the fixed order: owner's part (autograd), then by block
        commit(common_key(step, m, "loss"), "loss", loss.float())
        return float(loss)

    # --- several processes (SPEC.md 5.5) ------------------------------------------------------
    def take_gradients(self, blocks) -> dict[str, torch.Tensor]:
        """The accumulated gradient of every trainable tensor the `blocks` own (zeros where none),
        in ownership order; the parameters' gradients are cleared."""
        out = {}
        for b in blocks:
            for name, p in self.layout[b].trainable:
                out[name] = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = None
        return out

    @torch.no_grad()
    def reduce_gradients(self, gathered: list[dict[str, torch.Tensor]], step: int, commit=None) -> None:
        """The pinned reduction: each trainable tensor's gradient is the sum of the ranks' local
        gradients in rank order, ((g_0 + g_1) + g_2) + ... (elementwise, in the gradient's dtype),
        set as the parameter's gradient; `commit` receives it under its reduced-gradient key."""
        for name in gathered[0]:
            total = gathered[0][name] + gathered[1][name]
            for r in range(2, len(gathered)):
                total.add_(gathered[r][name])
            if commit is not None:
                commit(reduced_gradient_key(step, name), f"gradient/{name}", total.clone())  # update scales it in place
            self.parameter(name).grad = total

    # --- portable numerics ----------------------------------------------------------------------
    @staticmethod
    def settle(grid, key: str, x: torch.Tensor, tau: float = TAU, scale: torch.Tensor | None = None) -> torch.Tensor:
        """A crossing value as the next computation uses it: native, `x` itself; portable, its
        rounding to the grid (the provider logs near-boundary elements, a verifier applies the log)."""
        if grid is None:
            return x
        return grid.settle(key, x, tau, row_scale(x) if scale is None else scale)

    @torch.no_grad()
    def settle_gradients(self, block: int, step: int, grid) -> None:
        """Portable: each trainable tensor's gradient, after every micro-batch, on the grid."""
        if grid is None:
            return
        for name, p in self.layout[block].trainable:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = self.settle(grid, log_key(step, None, "gradient", name), g)

    # --- optimizer ---------------------------------------------------------------------------
    def grad_norms(self, block: int, step: int | None = None, grid=None) -> torch.Tensor:
        """The block's per-tensor gradient norms: float32 (native); portable, computed in float64
        from the settled gradients and settled themselves."""
        grads = []
        for name, p in self.layout[block].trainable:
            grads.append(p.grad if p.grad is not None else torch.zeros_like(p))
        if grid is None:
            return tensor_norms(grads)
        norms = torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]) if grads else \
            torch.zeros(0, dtype=portable.COMPUTE_DTYPE)
        return self.settle(grid, log_key(step, None, "grad_norms", f"{block:04d}"), norms)

    def clip(self, all_norms: list[torch.Tensor]) -> float | None:
        if self.portable:
            return portable.exact_clip_coefficient(self.optimizer.max_grad_norm, all_norms)
        return clip_coefficient(self.optimizer.max_grad_norm, all_norms)

    @torch.no_grad()
    def update(self, block: int, step: int, coef: float | None, grid=None, shards=None) -> None:
        """Clip and apply the optimizer to the block's trainable tensors, then clear gradients
        (portable: the new weights and optimizer state settled on the grid). FSDP: the update runs
        shard by shard (SPEC.md 5.5), over the ranks in `shards` (None: all)."""
        for name, p in self.layout[block].trainable:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if coef is not None:
                g.mul_(coef)  # in place: the gradient is dropped below (a copy costs a large tensor's page faults)
            if self.fsdp:
                self.update_shards(name, p, g, step, shards)
                p.grad = None
                continue
            state = self.optim_state[name]
            before = {"": p.data.clone(), **{k: t.clone() for k, t in state.items()}} if grid is not None else None
            apply_update(self.optimizer, p.data, g, state, step)
            if before is not None:
                p.data.copy_(self.settle(grid, log_key(step, None, "state", name), p.data, TAU_STATE,
                                         state_scale(before[""], p.data)))
                for slot, t in state.items():
                    t.copy_(self.settle(grid, log_key(step, None, "optim", name, slot), t, TAU_STATE,
                                        state_scale(before[slot], t)))
            p.grad = None

    def keep_only_shard(self, rank: int) -> None:
        """FSDP on the provider's rank `rank`: hold only this rank's shard of the optimizer state
        (a 1-D tensor per slot), the memory sharding saves (SPEC.md 5.5). Before the first step."""
        self.shard_rank = rank
        for name, state in self.optim_state.items():
            lo, hi = shard_bounds(state[next(iter(state))].numel(), self.world_size)[rank]
            for slot, t in state.items():
                state[slot] = t.reshape(-1)[lo:hi].clone()

    @torch.no_grad()
    def update_shards(self, name: str, p: torch.Tensor, g: torch.Tensor, step: int, shards=None) -> None:
        """FSDP: the optimizer on each flat shard of `p` on its own (weight decay as for the whole
        tensor), as rank r runs it on its shard; elementwise, so the shards make the whole update."""
        flat_p, flat_g = p.data.view(-1), g.reshape(-1)
        bounds = shard_bounds(flat_p.numel(), self.world_size)
        for r in range(self.world_size) if shards is None else shards:
            lo, hi = bounds[r]
            if lo == hi:
                continue
            if self.shard_rank is None:
                state = {slot: t.view(-1)[lo:hi] for slot, t in self.optim_state[name].items()}
            elif r == self.shard_rank:
                state = self.optim_state[name]
            else:
                raise RuntimeError(f"rank {self.shard_rank} holds no optimizer state of shard {r}")
            apply_update(self.optimizer, flat_p[lo:hi], flat_g[lo:hi], state, step, decay=decays(p))
