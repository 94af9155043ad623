"""Recording overhead of `aftune train`: recorded step time / plain step time, and bytes stored.

    python benchmarks/record_overhead.py --config builtin
    python benchmarks/record_overhead.py --config llama100m

One process trains the same model on the same batches in three ways, one whole run after another,
in rotating order (plain, recorded, blocked; then recorded, blocked, plain; ...), so that noise from
the machine falls on every mode alike:

* plain    - the standard Hugging Face way: `model(**batch).loss.backward()`, gradient clipping,
             `torch.optim.AdamW.step()`, `zero_grad()`; the batch is built by aftune's own
             `build_batch` from the same example order, so every mode sees the same tokens.
* recorded - `aftune.train.train()` with the same settings (B_L, B_S, I_C from the flags), timed
             step by step through its `progress` callback. A thin `Recorder` subclass (patched into
             `aftune.train` for the duration of the call, library code untouched) adds timestamps:
             start of the training loop, each step block's state snapshot, the final flush.
* blocked  - aftune's block-decomposed step driven directly through `BlockedModel` (forward per
             layer block on detached inputs, backward block by block, per-tensor update) with no
             recording at all: it separates the cost of the decomposition from the cost of recording.

Reported per mode: median and mean step time over the steady-state steps (the first --skip-steps
of every run are dropped), the training-loop wall time (recorded: from the start of the loop to
the end of `Recorder.close()`, so including the state snapshots and the final flush of hashing,
compression and signing), and process CPU time. The headline is the ratio of the median recorded
step to the median plain step (target <= 1.05 at B_L=4, B_S=8, I_C=8); the ratio of loop totals
including the flush is printed next to it. Bytes stored per step = (RUN/objects + RUN/manifests +
transcript) / steps, split into state checkpoints and per-step (common) tensors, with an estimate
for a long run where a full state checkpoint is stored only every B_S * I_C steps.

Configs: `builtin` is the shipped model (src/aftune/builtin/model, 8-layer Llama, hidden 64) on
the built-in data. `llama100m` is a randomly initialised LlamaConfig (hidden 768, 12 layers, 12
heads, intermediate 2048, vocab 32000, tied embeddings: 109.5M parameters) saved as safetensors
to a temporary directory, with the built-in tokenizer (512 tokens; the model's vocabulary is
larger, so the tokens used are a subset, but the embedding, LM head and softmax cost that of a
32k vocabulary) and a synthetic JSONL data set whose examples fill --seq-len tokens.

This is a benchmark, not a test: it asserts nothing and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

import aftune.train as aftune_train
from aftune.config import LayerBlocks, TrainSettings
from aftune.data import OrderCache, build_batch, load_dataset
from aftune.engine import BlockedModel
from aftune.instantiate import instantiate
from aftune.models import adapter_class, load_pretrained, read_config
from aftune.recorder import Recorder

DEFAULTS = {
    "builtin": dict(steps=48, batch_size=8, seq_len=64, repeats=3, warmup_steps=8),
    "llama100m": dict(steps=16, batch_size=4, seq_len=128, repeats=1, warmup_steps=2),
}
MODES = ("plain", "recorded", "blocked")
LABELS = {"plain": "HF plain (AdamW)", "recorded": "aftune train() recorded", "blocked": "aftune blocked, unrecorded"}


# --- inputs ------------------------------------------------------------------------------------

def prepare(config: str, seq_len: int, work: Path) -> tuple[Path, Path, str]:
    """(model dir, data file, description) for a config name."""
    if config == "builtin":
        model_dir = aftune_train.BUILTIN / "model"
        data = aftune_train.BUILTIN / "data" / "train.jsonl"
        return model_dir, data, "built-in model (src/aftune/builtin/model) on the built-in data"
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = work / "llama100m"
    tok_src = aftune_train.BUILTIN / "model"
    tokenizer = aftune_train.load_tokenizer(tok_src)
    cfg = LlamaConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
        intermediate_size=2048, vocab_size=32000, max_position_embeddings=max(512, seq_len),
        tie_word_embeddings=True, rms_norm_eps=1e-5, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(str(model_dir))  # safetensors
    tokenizer.save_pretrained(str(model_dir))
    params = sum(p.numel() for p in model.parameters())
    del model

    # Synthetic text: random words, long enough that every example is truncated to seq_len tokens.
    rng = random.Random(0)
    words = ["river", "stone", "castle", "mirror", "anchor", "basket", "lantern", "orchard", "valley", "signal",
             "copper", "harbor", "meadow", "thunder", "quiet", "seven", "twelve", "north", "winter", "garden"]
    data = work / "synthetic.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for _ in range(256):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq_len))}) + "\n")
    desc = (f"LlamaConfig hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000, tied embeddings "
            f"({params / 1e6:.1f}M params, random init), built-in 512-token tokenizer, 256 synthetic examples")
    return model_dir, data, desc


@dataclass
class Inputs:
    model_dir: Path
    data: Path
    hf_config: dict
    dataset: object
    tokenizer: object
    spec: object


def load_inputs(model_dir: Path, data: Path, settings: TrainSettings) -> Inputs:
    hf_config = read_config(model_dir)
    adapter_cls = adapter_class(hf_config["model_type"])
    dataset = load_dataset(data)
    tokenizer = aftune_train.load_tokenizer(model_dir)
    spec = aftune_train.batch_spec(hf_config, settings, adapter_cls.batch_fields, adapter_cls.task)
    return Inputs(model_dir, data, hf_config, dataset, tokenizer, spec)


# --- timings -------------------------------------------------------------------------------------

@dataclass
class RunTiming:
    mode: str
    steps: list[float]  # wall seconds of every step, in order
    loop: float  # wall seconds of the training loop (recorded: including snapshots and the flush)
    cpu: float  # process CPU seconds over the same span (all threads)
    final_loss: float
    extra: dict = field(default_factory=dict)


def _batch(inp: Inputs, order: OrderCache, step: int, settings: TrainSettings) -> dict[str, torch.Tensor]:
    return build_batch(inp.dataset, order.indices(step, settings.batch_size), inp.spec, inp.tokenizer)


def run_plain(inp: Inputs, settings: TrainSettings) -> RunTiming:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(inp.model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2),
                            eps=settings.eps, weight_decay=settings.weight_decay)
    order = OrderCache(settings.hash_algorithm, settings.seed, len(inp.dataset.examples))
    times, loss = [], float("nan")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(settings.steps):
        t0 = time.perf_counter()
        batch = _batch(inp, order, step, settings)
        out = model(**batch)
        out.loss.backward()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        times.append(time.perf_counter() - t0)
    return RunTiming("plain", times, time.perf_counter() - wall0, time.process_time() - cpu0, loss)


def run_blocked(inp: Inputs, settings: TrainSettings) -> RunTiming:
    """aftune's block-decomposed step (as in aftune.train._train_step) with every recording call removed."""
    hf_config, base = load_pretrained(inp.model_dir, settings.attn_implementation, torch.float32)
    _, model, adapter = instantiate(hf_config, settings, base)  # as aftune.train.train builds it
    blocked = BlockedModel(model, adapter, settings)
    nb = len(blocked.blocks)
    order = OrderCache(settings.hash_algorithm, settings.seed, len(inp.dataset.examples))
    times, loss_value = [], float("nan")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(settings.steps):
        t0 = time.perf_counter()
        losses = []
        for m in range(settings.grad_accum):
            batch = build_batch(inp.dataset, order.indices(step * settings.grad_accum + m, settings.batch_size),
                                inp.spec, inp.tokenizer)
            ctx = blocked.context(batch)
            inputs, outputs, aliases = [], [], []
            for b in range(nb):
                x_in = None if b == 0 else outputs[-1].detach().requires_grad_(True)
                out, alias = blocked.forward(b, x_in, ctx, step, m)
                inputs.append(x_in)
                outputs.append(out)
                aliases.append(alias)
            grad_out = blocked.loss_gradient(outputs[-1])
            alias_parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
            for b in reversed(range(nb)):
                r = blocked.backward(b, outputs[b], grad_out, inputs[b], aliases[b])
                if b > 0:
                    grad_out = r.input_grad
                for name, part in r.alias_parts.items():
                    alias_parts.setdefault(name, []).append((b, part))
            for name, parts in alias_parts.items():
                param = dict(blocked.layout[blocked.owner[name]].params)[name]
                for _, part in sorted(parts, key=lambda x: x[0]):
                    blocked.add_gradient(param, part)
            losses.append(float(outputs[-1].detach()))
        norms = [blocked.grad_norms(b) for b in range(nb)]
        coef = blocked.clip(norms)
        for b in range(nb):
            blocked.update(b, step, coef)
        loss_value = sum(losses) / len(losses)
        times.append(time.perf_counter() - t0)
    return RunTiming("blocked", times, time.perf_counter() - wall0, time.process_time() - cpu0, loss_value)


class _Probe:
    """Timestamps collected by TimedRecorder during one recorded run."""

    def __init__(self):
        self.lock = threading.Lock()
        self.begin: dict[int, float] = {}
        self.last_state: dict[int, float] = {}
        self.end_wait = 0.0
        self.close_start = self.close_end = 0.0
        self.cpu_begin = self.cpu_close = 0.0
        self.job_wall = 0.0  # summed over the worker threads
        self.put_wall = 0.0  # of which serialising, compressing and writing objects
        self.jobs = 0


class TimedRecorder(Recorder):
    """aftune's Recorder, unchanged, plus timestamps (patched into aftune.train for one run)."""

    probe: _Probe | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._p = TimedRecorder.probe
        put = self.store.put

        def timed_put(ref, tensor):
            t0 = time.perf_counter()
            try:
                return put(ref, tensor)
            finally:
                with self._p.lock:
                    self._p.put_wall += time.perf_counter() - t0

        self.store.put = timed_put

    def _job(self, name, tensor, store):
        t0 = time.perf_counter()
        try:
            return super()._job(name, tensor, store)
        finally:
            with self._p.lock:
                self._p.job_wall += time.perf_counter() - t0
                self._p.jobs += 1

    def begin(self, step_block, first_step, num_steps):
        now = time.perf_counter()
        if step_block == 0:
            self._p.cpu_begin = time.process_time()
        self._p.begin[step_block] = now
        self._p.last_state[step_block] = now
        super().begin(step_block, first_step, num_steps)

    def state(self, step_block, block, key, name, tensor, store):
        super().state(step_block, block, key, name, tensor, store)
        self._p.last_state[step_block] = time.perf_counter()

    def end(self, step_block):
        t0 = time.perf_counter()
        super().end(step_block)
        self._p.end_wait += time.perf_counter() - t0

    def close(self):
        self._p.close_start = time.perf_counter()
        try:
            super().close()
        finally:
            self._p.close_end = time.perf_counter()
            self._p.cpu_close = time.process_time()


@contextlib.contextmanager
def _patched_recorder(probe: _Probe):
    saved = aftune_train.Recorder
    TimedRecorder.probe = probe
    aftune_train.Recorder = TimedRecorder
    try:
        yield
    finally:
        aftune_train.Recorder = saved
        TimedRecorder.probe = None


def run_recorded(inp: Inputs, settings: TrainSettings, run_dir: Path) -> RunTiming:
    probe = _Probe()
    marks: list[float] = []
    t_call = time.perf_counter()
    with _patched_recorder(probe):
        result = aftune_train.train(inp.model_dir, inp.data, run_dir, settings,
                                    progress=lambda step, total, loss: marks.append(time.perf_counter()))
    t_return = time.perf_counter()
    start = probe.begin[0]
    steps = [marks[0] - start] + [b - a for a, b in zip(marks, marks[1:])]
    snapshots = [probe.last_state[s] - probe.begin[s] for s in sorted(probe.begin)]
    extra = {
        "setup": start - t_call,  # model load, base-weight hashing, tokenizer and data copy, config
        "flush": probe.close_end - marks[-1],  # last end(), final state snapshot, close()
        "close": probe.close_end - probe.close_start,
        "after": t_return - probe.close_end,  # save RUN/model, hash it, sign the run root
        "snapshot_total": sum(snapshots),  # state clones on the training thread, all step blocks
        "snapshot_each": snapshots,
        "end_wait": probe.end_wait,
        "job_wall": probe.job_wall,
        "put_wall": probe.put_wall,
        "jobs": probe.jobs,
    }
    return RunTiming("recorded", steps, probe.close_end - start, probe.cpu_close - probe.cpu_begin,
                     result.final_loss, extra)


# --- storage ---------------------------------------------------------------------------------------

def storage(run_dir: Path, settings: TrainSettings) -> dict:
    files = {p.name: p.stat().st_size for p in (run_dir / "objects").rglob("*") if p.is_file()}
    manifests = sorted((run_dir / "manifests").glob("*.json"))
    state_digests, common_digests = set(), set()
    stored_checkpoints = 0
    for path in manifests:
        m = json.loads(path.read_bytes())
        common_digests.update(row[4] for row in m["common"])
        for block in m["blocks"]:
            state_digests.update(row[4] for row in block)
        stored_checkpoints += int(settings.is_checkpoint(m["step_block"]))

    def size_of(digests):
        return sum(sz for name, sz in files.items() if name.split(".", 1)[0] in digests)

    state_bytes = size_of(state_digests - common_digests)
    common_bytes = size_of(common_digests)
    manifest_bytes = sum(p.stat().st_size for p in manifests)
    transcript_bytes = (run_dir / "transcript.jsonl").stat().st_size
    objects_bytes = sum(files.values())
    record = objects_bytes + manifest_bytes + transcript_bytes
    other = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()) - record
    steps = settings.steps
    per_checkpoint = state_bytes / max(1, stored_checkpoints)
    steady = (common_bytes + manifest_bytes + transcript_bytes) / steps + per_checkpoint / (
        settings.steps_per_block * settings.checkpoint_interval)
    return {
        "objects": len(files), "objects_bytes": objects_bytes, "manifest_bytes": manifest_bytes,
        "transcript_bytes": transcript_bytes, "record_bytes": record, "per_step": record / steps,
        "state_bytes": state_bytes, "common_bytes": common_bytes, "checkpoints": stored_checkpoints,
        "per_checkpoint": per_checkpoint, "common_per_step": common_bytes / steps, "steady_per_step": steady,
        "other_bytes": other,
    }


# --- driver ----------------------------------------------------------------------------------------

def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(DEFAULTS), default="builtin")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default: builtin 48, llama100m 16)")
    ap.add_argument("--batch-size", type=int, help="examples per step (default: builtin 8, llama100m 4)")
    ap.add_argument("--seq-len", type=int, help="token budget per example (default: builtin 64, llama100m 128)")
    ap.add_argument("--layers-per-block", type=int, default=4, help="B_L (default 4)")
    ap.add_argument("--steps-per-block", type=int, default=8, help="B_S (default 8)")
    ap.add_argument("--checkpoint-interval", type=int, default=8, help="I_C (default 8)")
    ap.add_argument("--repeats", type=int, help="measured runs of every mode (default: builtin 3, llama100m 1)")
    ap.add_argument("--warmup-steps", type=int, help="steps of the unmeasured warm-up run of every mode "
                                                     "(0: none; default: builtin 8, llama100m 2)")
    ap.add_argument("--skip-steps", type=int, default=1, help="first steps of every run left out of the "
                                                              "per-step statistics (default 1)")
    ap.add_argument("--no-blocked", action="store_true", help="skip the unrecorded block-decomposed mode")
    ap.add_argument("--work-dir", type=Path, help="where models and runs are written (default: a temp dir)")
    args = ap.parse_args(argv)
    d = DEFAULTS[args.config]
    steps = args.steps or d["steps"]
    repeats = args.repeats or d["repeats"]
    warmup = d["warmup_steps"] if args.warmup_steps is None else args.warmup_steps
    settings = TrainSettings(
        steps=steps, batch_size=args.batch_size or d["batch_size"], seq_len=args.seq_len or d["seq_len"],
        layers_per_block=args.layers_per_block, steps_per_block=args.steps_per_block,
        checkpoint_interval=args.checkpoint_interval,
    ).validate()
    if args.skip_steps >= steps:
        ap.error("--skip-steps must be smaller than --steps")
    modes = [m for m in MODES if not (args.no_blocked and m == "blocked")]

    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    console = Console(width=None if sys.stdout.isatty() else 140)
    t_start = time.perf_counter()
    work_ctx = tempfile.TemporaryDirectory(prefix="aftune-bench-") if args.work_dir is None else contextlib.nullcontext(args.work_dir)
    with work_ctx as work:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, data, desc = prepare(args.config, settings.seq_len, work)
        inp = load_inputs(model_dir, data, settings)
        nblocks = len(LayerBlocks(int(inp.hf_config["num_hidden_layers"]), settings.layers_per_block))
        console.print(f"[bold]config[/] {args.config}: {desc}")
        console.print(f"settings: steps={settings.steps} batch={settings.batch_size} seq_len={settings.seq_len} "
                      f"B_L={settings.layers_per_block} B_S={settings.steps_per_block} I_C={settings.checkpoint_interval} "
                      f"({nblocks} layer blocks) lr={settings.lr} max_grad_norm={settings.max_grad_norm} "
                      f"{settings.dtype} {settings.hash_algorithm}; torch {torch.__version__}, "
                      f"{torch.get_num_threads()} intra-op threads")
        n_run = 0

        def one(mode: str, s: TrainSettings) -> RunTiming:
            nonlocal n_run
            n_run += 1
            if mode == "plain":
                return run_plain(inp, s)
            if mode == "blocked":
                return run_blocked(inp, s)
            run_dir = work / f"run{n_run:02d}"
            try:
                r = run_recorded(inp, s, run_dir)
                r.extra["storage"] = storage(run_dir, s)
                return r
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)

        if warmup:
            ws = TrainSettings(**{**settings.to_json(), "steps": warmup, "lora": None})
            for mode in modes:
                t0 = time.perf_counter()
                one(mode, ws)
                console.print(f"warm-up {mode:<8} {warmup} steps: {time.perf_counter() - t0:6.1f} s")

        results: dict[str, list[RunTiming]] = {m: [] for m in modes}
        for r in range(repeats):
            order = modes[r % len(modes):] + modes[: r % len(modes)]
            for mode in order:
                res = one(mode, settings)
                results[mode].append(res)
                steady = res.steps[args.skip_steps:]
                console.print(f"repeat {r + 1}/{repeats} {mode:<8} median step {statistics.median(steady):8.4f} s  "
                              f"loop {res.loop:7.2f} s  cpu {res.cpu:7.2f} s  loss {res.final_loss:.4f}")

    def pooled(mode):
        return [t for res in results[mode] for t in res.steps[args.skip_steps:]]

    med = {m: statistics.median(pooled(m)) for m in modes}
    mean = {m: statistics.fmean(pooled(m)) for m in modes}
    loop = {m: statistics.median([x.loop for x in results[m]]) for m in modes}
    cpu = {m: statistics.median([x.cpu for x in results[m]]) for m in modes}

    table = Table(title=f"recording overhead: {args.config} (B_L={settings.layers_per_block}, "
                        f"B_S={settings.steps_per_block}, I_C={settings.checkpoint_interval}, "
                        f"{settings.steps} steps x {repeats} runs per mode)")
    for col in ("mode", "median step s", "mean step s", "loop total s", "CPU s", "median / plain",
                "mean / plain", "loop / plain", "final loss"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for m in modes:
        table.add_row(LABELS[m], f"{med[m]:.4f}", f"{mean[m]:.4f}", f"{loop[m]:.2f}", f"{cpu[m]:.2f}",
                      f"{med[m] / med['plain']:.3f}", f"{mean[m] / mean['plain']:.3f}", f"{loop[m] / loop['plain']:.3f}",
                      f"{results[m][-1].final_loss:.4f}")
    console.print(table)

    rec = results["recorded"]
    ex = {k: statistics.median([x.extra[k] for x in rec]) for k in
          ("setup", "flush", "close", "after", "snapshot_total", "end_wait", "job_wall", "put_wall")}
    st = rec[-1].extra["storage"]
    ratio = med["recorded"] / med["plain"]
    verdict = "meets" if ratio <= 1.05 else "MISSES"
    console.print(f"[bold]recording overhead (median recorded step / median plain step): {ratio:.3f}[/] "
                  f"-> {verdict} the 1.05 target")
    console.print(f"total-time ratio incl. final flush (recorded loop to end of Recorder.close / plain loop): "
                  f"{loop['recorded'] / loop['plain']:.3f}")
    if "blocked" in modes:
        console.print(f"decomposition vs recording: blocked/plain {med['blocked'] / med['plain']:.3f} (median), "
                      f"recorded/blocked {med['recorded'] / med['blocked']:.3f} (median), "
                      f"{loop['recorded'] / loop['blocked']:.3f} (loop totals)")
    console.print(f"recorded run, training thread: state snapshots {ex['snapshot_total']:.2f} s over "
                  f"{settings.num_step_blocks + 1} step blocks, waiting in Recorder.end {ex['end_wait']:.2f} s, "
                  f"final flush {ex['flush']:.2f} s (of which close() {ex['close']:.2f} s)")
    console.print(f"recorded run, background: {rec[-1].extra['jobs']} hash/store jobs, {ex['job_wall']:.2f} s summed "
                  f"over the workers (store.put: {ex['put_wall']:.2f} s); CPU recorded - plain: "
                  f"{cpu['recorded'] - cpu['plain']:+.2f} s")
    console.print(f"outside the loop: train() setup {ex['setup']:.2f} s, saving RUN/model after close {ex['after']:.2f} s")
    console.print(f"[bold]bytes stored per step: {_fmt_bytes(st['per_step'])}[/] "
                  f"({st['objects']} objects, {_fmt_bytes(st['objects_bytes'])}; manifests "
                  f"{_fmt_bytes(st['manifest_bytes'])}; transcript {_fmt_bytes(st['transcript_bytes'])}; "
                  f"total {_fmt_bytes(st['record_bytes'])} over {settings.steps} steps)")
    console.print(f"  of which state checkpoints {_fmt_bytes(st['state_bytes'])} ({st['checkpoints']} stored, "
                  f"{_fmt_bytes(st['per_checkpoint'])} each) and per-step tensors {_fmt_bytes(st['common_per_step'])}/step; "
                  f"long-run estimate (one checkpoint every {settings.steps_per_block * settings.checkpoint_interval} "
                  f"steps): {_fmt_bytes(st['steady_per_step'])}/step; RUN/model etc. not counted: "
                  f"{_fmt_bytes(st['other_bytes'])}")
    console.print(f"benchmark wall time {time.perf_counter() - t_start:.0f} s, "
                  f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
