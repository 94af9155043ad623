"""Portable numerics (SPEC.md 8.13): what it costs, and the cross-hardware error its tau rests on.

    python benchmarks/portable_inference.py                    # built-in tiny Llama, cost table
    python benchmarks/portable_inference.py --model DIR        # any float32 causal LM directory
    python benchmarks/portable_inference.py --measure          # tau: one block's error across kernels/threads
    python benchmarks/portable_inference.py --measure --model DIR --layers-per-block 2

Cost (one process, same weights, same prompts, modes interleaved in rotating order so that load
from other processes falls on every mode alike; medians over the measured repeats):

* plain    - Hugging Face `model.generate(ids, max_new_tokens=N, do_sample=False)`;
* native   - `InferenceEngine.generate` with native numerics (everything a request costs);
* portable - the same with numerics "portable": every boundary rounded to bfloat16, its elements
             near a rounding midpoint logged;
* verify   - `InferenceVerifier.verify_all` of the portable record (strict, every block).

Reported: seconds per request, the ratios portable / native and portable / plain, logged elements
per generated token (per boundary and in all), near-tie steps, record bytes per token.

--measure: a reference process (default kernels, 2 threads) generates with portable rounding and
saves each block's float32 outputs; replay processes with ATEN_CPU_CAPABILITY=default or avx2 and
1 or 2 threads recompute every block from the same grid inputs. Printed per configuration: the
largest |x - y| / (|x| + rms(row)) per boundary (what TAU must bound), bfloat16 roundings that
differ, and the largest logit difference / max|z| (what TAU_LOGIT must bound). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin" / "model"
PROMPTS = ["Q: what colour is the sky on a clear day?", "Q: name three animals that live in the sea.",
           "Q: how many legs does a spider have?", "Q: what is the capital of France?"]
REPLAYS = {"threads-1": {"THREADS": "1"}, "aten-default": {"ATEN_CPU_CAPABILITY": "default", "THREADS": "2"},
           "aten-default-threads-1": {"ATEN_CPU_CAPABILITY": "default", "THREADS": "1"},
           "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "THREADS": "2"}}


# --- cost ----------------------------------------------------------------------------------------

def cost(args) -> None:
    from aftune.core.signing import SigningKey
    from aftune.inference.engine import InferenceEngine
    from aftune.inference.policy import GenerationPolicy
    from aftune.inference.record import InferenceRecord
    from aftune.inference.served import ServedModel
    from aftune.inference.settings import RecordingSettings
    from aftune.inference.verify import InferenceVerifier

    model = Path(args.model)
    served = ServedModel.load(model, dtype="float32")
    key = SigningKey.generate()
    policies = {m: GenerationPolicy.for_model(served, max_new_tokens=args.tokens, eos_token_ids=(), stop_rule="length",
                                              numerics=m) for m in ("native", "portable")}
    tmp = Path(tempfile.mkdtemp(prefix="aftune-portable-"))
    engines = {m: InferenceEngine(served, tmp / m, key, RecordingSettings(args.layers_per_block, 0))
               for m in ("native", "portable")}
    times: dict[str, list[float]] = {"plain": [], "native": [], "portable": [], "verify": []}
    logged, ties, nbytes, tokens = [], 0, [], 0
    modes = ["plain", "native", "portable"]
    for r in range(args.warmup + args.repeats):
        prompt = PROMPTS[r % len(PROMPTS)]
        order = modes[r % 3:] + modes[:r % 3]
        for mode in order:
            t0 = time.perf_counter()
            if mode == "plain":
                with torch.inference_mode():
                    ids = served.prompt_inputs(prompt)["input_ids"]
                    out = served.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                                do_sample=False, min_new_tokens=args.tokens)
                    served.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            else:
                result = engines[mode].generate(prompt, policies[mode])
            elapsed = time.perf_counter() - t0
            if r >= args.warmup:
                times[mode].append(elapsed)
            if mode == "portable":
                if r >= args.warmup:
                    log = InferenceRecord.open(tmp / mode, result.record_id).portable
                    logged.append({f"{b:04d}": len(v) for b, v in log.boundaries.items()})
                    ties += len(log.token_steps)
                    tokens += len(result.tokens)
                    nbytes.append(result.record_path.stat().st_size)
                    t1 = time.perf_counter()
                    v = InferenceVerifier(tmp / mode, result.record_id, model=served, policy=policies[mode],
                                          expected_prompt=prompt)
                    report = v.verify_all()
                    times["verify"].append(time.perf_counter() - t1)
                    assert report.verdict == "PASS", report.summary()
    med = {m: statistics.median(v) for m, v in times.items()}
    boundaries = sorted(logged[0])
    per_boundary = {b: sum(d[b] for d in logged) / tokens for b in boundaries}
    print(f"model {model}  tokens/request {args.tokens}  layers/block {args.layers_per_block}  "
          f"repeats {args.repeats} (+{args.warmup} warm-up)  threads {torch.get_num_threads()}")
    print(f"{'mode':<10}{'s/request':>11}{'vs plain':>10}")
    for m in ("plain", "native", "portable", "verify"):
        print(f"{m:<10}{med[m]:>11.4f}{med[m] / med['plain']:>10.2f}")
    print(f"portable / native recording: {med['portable'] / med['native']:.3f}")
    print("logged elements per generated token, per boundary: "
          + ", ".join(f"{b}: {n:.1f}" for b, n in per_boundary.items())
          + f"; all boundaries: {sum(per_boundary.values()):.1f}")
    hidden = served.hf_config.get("hidden_size")
    if hidden:
        print(f"  = {100 * sum(per_boundary.values()) / len(boundaries) / hidden:.2f}% of each boundary's elements "
              f"(hidden size {hidden})")
    print(f"near-tie steps: {ties} of {tokens}; portable record bytes per token: "
          f"{statistics.median(nbytes) / args.tokens:.0f}")


# --- measuring tau --------------------------------------------------------------------------------

def _child(mode: str, model: str, path: str, ref_path: str, lpb: int, tokens: int) -> None:
    """In a fresh process (kernels chosen by the environment before torch loaded)."""
    threads = int(os.environ.get("THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    from aftune.inference.portable import to_grid
    from aftune.inference.served import ServedModel
    from aftune.models.cache import KVCache

    s = ServedModel.load(model, dtype="float32")
    blocks = s.blocks(lpb)
    nb = len(blocks)
    with torch.inference_mode():
        if mode == "ref":
            saved = []
            for prompt in PROMPTS[:2]:
                ids = s.prompt_inputs(prompt)["input_ids"]
                caches = [KVCache() for _ in range(nb)]
                G, X, Z, toks = {b: [] for b in range(1, nb)}, {b: [] for b in range(1, nb)}, [], []
                step, first = {"input_ids": ids}, 0
                for _ in range(tokens):
                    ctx, h = s.step_context(first, step), None
                    for b in range(nb):
                        if b > 0:
                            X[b].append(h.clone())
                            G[b].append(to_grid(h))
                            h = G[b][-1].float()
                        h = s.run_block(blocks, b, h, ctx, caches[b])
                    Z.append(h.clone())
                    toks.append(int(h.argmax()))
                    first += step["input_ids"].shape[1]
                    step = {"input_ids": torch.tensor([[toks[-1]]])}
                saved.append(dict(ids=ids, G=G, X=X, Z=Z, toks=toks))
            torch.save(saved, path)
            return
        ref = torch.load(ref_path)
        out = []
        for r in ref:
            Y, Z = {b: [] for b in range(1, nb)}, []
            for l in range(nb):
                cache, first = KVCache(), 0
                for k in range(len(r["toks"])):
                    step = {"input_ids": r["ids"] if k == 0 else torch.tensor([[r["toks"][k - 1]]])}
                    y = s.run_block(blocks, l, r["G"][l][k].float() if l > 0 else None, s.step_context(first, step),
                                    cache)
                    (Z if l == nb - 1 else Y[l + 1]).append(y.clone())
                    first += step["input_ids"].shape[1]
            out.append(dict(Y=Y, Z=Z))
        torch.save(out, path)


def measure(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="aftune-tau-"))
    base = [sys.executable, __file__, "--child"]
    common = [str(args.model), str(args.layers_per_block), str(args.tokens)]
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
    subprocess.run(base + ["ref", str(tmp / "x.ref"), "-"] + common, env={**env, "THREADS": "2"}, check=True)
    ref = torch.load(tmp / "x.ref")
    print(f"model {args.model}  layers/block {args.layers_per_block}  {args.tokens} tokens x {len(ref)} prompts; "
          "reference: default kernels, 2 threads")
    for name, extra in REPLAYS.items():
        out = tmp / f"{name}.pt"
        subprocess.run(base + ["rep", str(out), str(tmp / "x.ref")] + common, env={**env, **extra}, check=True)
        rep = torch.load(out)
        worst, flips, total, zrel = {}, 0, 0, 0.0
        for r, p in zip(ref, rep):
            for b in r["X"]:
                x, y = torch.cat(r["X"][b], 1).double(), torch.cat(p["Y"][b], 1).double()
                s = x.abs() + x.pow(2).mean(-1, keepdim=True).sqrt()
                worst[b] = max(worst.get(b, 0.0), float(((x - y).abs() / s).max()))
                flips += int((x.float().to(torch.bfloat16) != y.float().to(torch.bfloat16)).sum())
                total += x.numel()
            for z, zz in zip(r["Z"], p["Z"]):
                zrel = max(zrel, float((z.double() - zz.double()).abs().max() / z.double().abs().max()))
        print(f"{name:<24} max err/s per boundary: " + " ".join(f"{worst[b]:.2e}" for b in sorted(worst))
              + f" | bfloat16 roundings differ: {flips}/{total} | logits err/max|z|: {zrel:.2e}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, path, ref_path, model, lpb, tokens = sys.argv[2:8]
        _child(mode, model, path, ref_path, int(lpb), int(tokens))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BUILTIN))
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--layers-per-block", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's)")
    ap.add_argument("--measure", action="store_true", help="measure the cross-kernel error that TAU bounds")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    (measure if args.measure else cost)(args)


if __name__ == "__main__":
    main()
