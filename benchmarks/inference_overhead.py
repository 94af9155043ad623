"""Recording overhead of auditable inference: recorded / plain generation time, side by side.

    python benchmarks/inference_overhead.py                       # built-in tiny Llama
    python benchmarks/inference_overhead.py --config llama100m    # 134M-parameter Llama, random weights

One process loads the same weights once and generates greedily from the same prompts in three
ways, interleaved in rotating order so that load from other processes falls on every mode alike:

* plain    - the standard Hugging Face way: `model.generate(ids, max_new_tokens=N, do_sample=False)`
             with its KV cache, plus tokenisation and decoding;
* recorded - `InferenceEngine.generate`: layer-block decomposed generation with per-block KV
             caches, every boundary activation hashed and stored, the record written (canonical
             JSON, named by its digest) and the receipt signed: everything a request costs;
* blocked  - the same block-decomposed generation with no recording at all (separates the cost
             of the decomposition from that of recording).

Reported: median seconds per request for each mode over the measured repeats (the first
--warmup repeats are dropped), the headline ratio median(recorded) / median(plain) (issue
target: <= 1.05), the median of the paired per-request ratios, whether the recorded tokens equal
Hugging Face's, and the bytes each record stores. This is a benchmark, not a test: it asserts
nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from aftune.inference.engine import InferenceEngine
from aftune.inference.served import ServedModel
from aftune.inference.policy import GenerationPolicy
from aftune.inference.settings import RecordingSettings
from aftune.core.signing import SigningKey

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin" / "model"
PROMPTS = ["Q: what colour is the sky on a clear day?", "Q: name three animals that live in the sea.",
           "Q: how many legs does a spider have?", "Q: what is the capital of France?"]


def make_model(config: str, directory: Path) -> Path:
    if config == "builtin":
        return BUILTIN
    import shutil

    import transformers as tf

    sizes = {"llama30m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                              num_key_value_heads=6),
             "llama100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                               num_key_value_heads=12)}[config]
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False, **sizes)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN / name, directory / name)
    return directory


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="builtin", choices=["builtin", "llama30m", "llama100m"])
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 (builtin), 32 (others)")
    ap.add_argument("--repeats", type=int, default=None, help="measured rounds over all prompts")
    ap.add_argument("--warmup", type=int, default=1, help="rounds dropped before measuring")
    ap.add_argument("--layers-per-block", type=int, default=2)
    ap.add_argument("--activation-interval", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    n = args.max_new_tokens or (64 if args.config == "builtin" else 32)
    repeats = args.repeats or (6 if args.config == "builtin" else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    with tempfile.TemporaryDirectory() as tmp:
        model_path = make_model(args.config, Path(tmp) / "model")
        served = ServedModel.load(model_path)
        engine = InferenceEngine(served, Path(tmp) / "records", SigningKey.generate(),
                                 RecordingSettings(args.layers_per_block, args.activation_interval))
        gen = GenerationPolicy.for_model(served.hf_config, max_new_tokens=n)
        tok, model = served.tokenizer, served.model
        params = sum(p.numel() for p in model.parameters())

        def plain(prompt):
            ids = served.prompt_inputs(prompt)["input_ids"]
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
            tokens = out[0, ids.shape[1]:].tolist()
            tok.decode(tokens, skip_special_tokens=True)
            return tokens

        def recorded(prompt):
            return list(engine.generate(prompt, gen).tokens)

        def blocked(prompt):
            trace = engine._generate(served.prompt_inputs(prompt), gen, None, None)
            tok.decode(trace.tokens, skip_special_tokens=True)
            return trace.tokens

        modes = {"plain": plain, "recorded": recorded, "blocked": blocked}
        times = {m: [] for m in modes}
        paired = []
        agree = True
        order = list(modes)
        for r in range(args.warmup + repeats):
            for i, prompt in enumerate(PROMPTS):
                rot = order[(r + i) % 3:] + order[:(r + i) % 3]
                got, took = {}, {}
                for m in rot:
                    t0 = time.perf_counter()
                    got[m] = modes[m](prompt)
                    took[m] = time.perf_counter() - t0
                agree &= got["plain"] == got["recorded"] == got["blocked"]
                if r >= args.warmup:
                    for m in modes:
                        times[m].append(took[m])
                    paired.append(took["recorded"] / took["plain"])
        store = Path(tmp) / "records"
        nrec = len(list((store / "records").iterdir()))
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file() and "tokenizers" not in f.parts)

    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"config {args.config}: {params / 1e6:.1f}M parameters, {len(served.stage_names) - 2} layers, "
          f"{len(engine.blocks)} layer blocks (B_L={args.layers_per_block}, I_A={args.activation_interval}), "
          f"{n} new tokens, {len(PROMPTS)} prompts x {repeats} rounds, torch threads {torch.get_num_threads()}")
    for m in modes:
        print(f"  {m:9s} median {med[m] * 1e3:8.1f} ms/request   mean {statistics.mean(times[m]) * 1e3:8.1f} ms "
              f"  ({med[m] / n * 1e3:.2f} ms/token)")
    print(f"  recorded / blocked (cost of recording alone): {med['recorded'] / med['blocked']:.3f}")
    print(f"  bytes stored per record: {size / max(nrec, 1) / 1024:.1f} KiB ({nrec} records)")
    print(f"  tokens identical in all three modes: {agree}")
    print(f"recorded / plain generation time: {med['recorded'] / med['plain']:.3f} "
          f"(median of paired ratios {statistics.median(paired):.3f}; target <= 1.05)")


if __name__ == "__main__":
    sys.exit(main())
