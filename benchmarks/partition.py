"""Partitioned inference, strategy by strategy: latency against the unpartitioned model, exposure,
the Freivalds check's share of the time, bytes crossed.

    python benchmarks/partition.py                         # ~2-4 min on 2 CPU cores
    python benchmarks/partition.py --rounds 5 --json partition-bench.json
    python benchmarks/partition.py --device cuda           # the worker on the GPU (untested here)

Two random-weight models are built in a temporary directory: a Llama-shaped decoder (hidden 256,
4 layers, 8 heads, MLP 688, vocabulary 2048; prompt 32 tokens, 16 generated greedily) and a ViT
(hidden 192, 4 layers, 64x64 images in 8x8 patches, 10 labels). For `teeslice` each gets a
"fine-tuned" copy: the backbone plus a rank-8 update of the attention query and value weights
(a merged LoRA), and the backbone is passed as the public one.

One runtime (a trusted process and a worker, 1 torch thread each) serves every session. Each
request runs, in the trusted process, the unpartitioned model (no proxies: the reference) and
then the partitioned one on the same input, so the ratio online / reference is measured side by
side in one run; strategies are interleaved in rounds and the medians over rounds reported.
Columns: latency = median(online) / median(reference); offline = trace, weight quantization and
transfer, Freivalds secrets, one-time masks (Slalom's precomputation, not in the latency);
freivalds / blinding / transfer = shares of the online time (transfer includes the worker's
compute and the pipe); bytes = all frames both ways; exposure as `aftune partition strategies`.
It is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from aftune.partition import STRATEGIES, TRUSTED_SIDE_LABEL, PartitionRuntime
from aftune.partition.strategies import ORIGINS


def build_models(root: Path) -> dict[str, dict]:
    import transformers as tf

    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=2048, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    vit = tf.ViTForImageClassification(tf.ViTConfig(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768, image_size=64,
        patch_size=8, num_labels=10))
    models = {}
    targets = ("q_proj", "v_proj", "query", "value")  # attention query and value (names differ across versions)
    for name, model in (("llama", llama), ("vit", vit)):
        model.save_pretrained(root / name)
        with torch.no_grad():
            for mod_name, mod in model.named_modules():
                if mod_name.rsplit(".", 1)[-1] in targets:
                    d_out, d_in = mod.weight.shape
                    mod.weight += 0.02 * torch.randn(d_out, 8) @ torch.randn(8, d_in) / 8 ** 0.5
        model.save_pretrained(root / f"{name}-tuned")
        models[name] = {"dir": root / name, "tuned": root / f"{name}-tuned"}
    models["llama"]["input"] = {"input_ids": torch.randint(3, 2048, (1, 32))}
    models["vit"]["input"] = {"pixel_values": torch.randn(1, 3, 64, 64)}
    return models


def measure(rt: PartitionRuntime, spec: dict, strategy: str, new_tokens: int):
    kw = dict(strategy=strategy, max_new_tokens=new_tokens, unsafe_unchecked=strategy == "none-shielded",
              reference=True, **spec["input"])
    if strategy == "teeslice":
        return rt.run(spec["tuned"], backbone=spec["dir"], **kw)
    return rt.run(spec["dir"], **kw)


def summarize(results: list) -> dict:
    r0 = results[0]
    online = statistics.median(r.timing["online"] for r in results)
    reference = statistics.median(r.reference.seconds for r in results)

    def share(key: str) -> float:
        return statistics.median(r.timing.get(key, 0.0) / r.timing["online"] for r in results)

    answer = (lambda r: r.label if r.label is not None else r.tokens)
    return {"latency": online / reference, "online_s": online, "reference_s": reference,
            "offline_s": statistics.median(r.timing["offline"] for r in results),
            "freivalds_share": share("freivalds"), "blinding_share": share("blinding"),
            "transfer_share": share("transfer"), "bytes": r0.traffic["bytes"], "messages": r0.traffic["messages"],
            "same_answer": all(answer(r) == answer(r.reference) for r in results), **r0.exposure.fractions()}


def table(name: str, rows: dict[str, dict]) -> str:
    head = ("| strategy | as in | latency vs unpartitioned | online s | offline s | Freivalds | blinding | transfer "
            "| bytes crossed | params in clear | activations blinded | activations in clear | MACs in trusted | answer |")
    lines = [f"### {name}", "", head, "|" + "---|" * 14]
    for s, m in rows.items():
        lines.append(f"| {s} | {ORIGINS[s]} | {m['latency']:.2f}x | {m['online_s']:.3f} | {m['offline_s']:.3f} | "
                     f"{100 * m['freivalds_share']:.1f}% | {100 * m['blinding_share']:.1f}% | "
                     f"{100 * m['transfer_share']:.1f}% | {m['bytes']:,} | {100 * m['parameters_plaintext']:.1f}% | "
                     f"{100 * m['activations_blinded']:.1f}% | {100 * m['activations_plaintext']:.1f}% | "
                     f"{100 * m['macs_trusted']:.1f}% | {'same' if m['same_answer'] else 'DIFFERENT'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (strategies interleaved)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="the worker's device (cpu or cuda)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ap.add_argument("--models", default="llama,vit")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = ap.parse_args(argv)
    print(TRUSTED_SIDE_LABEL)
    print(f"torch {torch.__version__}, {args.threads} thread(s) per process, worker on {args.device}, "
          f"{args.rounds} rounds, python {sys.version.split()[0]}")
    report = {}
    with tempfile.TemporaryDirectory() as tmp, PartitionRuntime(device=args.device, threads=args.threads) as rt:
        models = build_models(Path(tmp))
        for name in args.models.split(","):
            spec = models[name]
            for warm in ("all-shielded", "shield-nonlinear"):  # load the model, import the worker's path
                measure(rt, spec, warm, args.new_tokens)
            runs: dict[str, list] = {s: [] for s in STRATEGIES}
            for _ in range(args.rounds):
                for s in STRATEGIES:
                    runs[s].append(measure(rt, spec, s, args.new_tokens))
            report[name] = {s: summarize(rs) for s, rs in runs.items()}
            ranks = runs["teeslice"][0].stats["slice_ranks"]
            print()
            print(table(name, report[name]))
            print(f"\nteeslice: {len(ranks)} private slices, ranks {sorted(set(ranks.values()))}; "
                  f"p = {runs['shield-nonlinear'][0].record.document['arithmetic']['modulus']}, k = "
                  f"{runs['shield-nonlinear'][0].record.document['arithmetic']['freivalds_repetitions']}")
            sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
