"""Batch invariance of serving, measured: is a request's computation inside a batch reproduced
bit for bit by replaying its row alone in a batch of the same shape with filler rows?

    python benchmarks/batch_invariance.py                      # built-in Llama + a wider Llama config
    python benchmarks/batch_invariance.py --sizes 1,2,3,8 --threads 2 --tokens 6

For each model, batch size B and trial, B prompts of random lengths are left-padded and generated
together (greedy and sampled), layer block by layer block (`inference/batching.py`). For every
row r and every layer block l the row's committed inputs are then replayed the verifier's way: in
a batch of B rows where every other row is filler (token 0, zero activations, full length), with
a fresh cache, step by step; the row's outputs (boundaries, logits) are compared bitwise with the
provider's. Three other replays show what does not hold: the row alone (B = 1, no padding: the
serialised path of SPEC.md 8.5), the row at another row index of the same batch, the row in a
batch of B + 1 rows, and the row padded to one more slot. Prints, per model and B, the rows that matched bitwise out of those tried.
A measurement, not a test: it asserts nothing (tests/test_inference_batching.py does).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin" / "model"


def wide_llama(root: Path) -> Path:
    """A randomly initialised Llama of width 256 (4 layers), saved with the built-in tokenizer."""
    import shutil

    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, max_position_embeddings=256, vocab_size=512, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)
    d = root / "llama-256"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(str(d))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN / f, d / f)
    return d


@torch.inference_mode()
def provider(served, blocks, prompts: list[list[int]], tokens: int, policy, seed) -> tuple[list, list, list]:
    """Generate `prompts` as one batch: per row, the per-step inputs of every block (its real
    slots), the per-step logits and the tokens."""
    from aftune.inference.batching import batch_context, run_block_batched
    from aftune.inference.sampling import choose_token
    from aftune.models.cache import KVCache

    nb, bsz = len(blocks), len(prompts)
    lengths = [len(p) for p in prompts]
    length = max(lengths)
    ids = torch.zeros(bsz, length, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p)
    caches = [KVCache() for _ in range(nb)]
    seen = [[[] for _ in range(nb + 1)] for _ in range(bsz)]  # row -> boundary -> per-step slices (nb: logits)
    out_tokens = [[] for _ in range(bsz)]
    for step in range(tokens):
        ctx = batch_context(served, step, ids, lengths, length)
        h = None
        for b in range(nb):
            if b > 0:
                for i in range(bsz):
                    seen[i][b].append(h[i:i + 1, h.shape[1] - (lengths[i] if step == 0 else 1):].clone())
            h = run_block_batched(served, blocks, b, h, ctx, caches[b])
        nxt = []
        for i in range(bsz):
            seen[i][nb].append(h[i].clone())
            t = choose_token(h[i], policy, seed + i if seed is not None else None, "blake3", step)
            out_tokens[i].append(t)
            nxt.append(t)
        ids = torch.tensor(nxt, dtype=torch.int64)[:, None]
    return seen, out_tokens, lengths


@torch.inference_mode()
def replay_row(served, blocks, l: int, row: int, size: int, length: int, prompt: list[int], toks: list[int],
               inputs: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The verifier's replay of block l for one row in a batch of `size` filler rows (size 0: the
    row alone, the serialised path). Returns the row's per-step outputs (last block: logits)."""
    from aftune.inference.batching import batch_context, run_block_batched
    from aftune.models.cache import KVCache

    cache, outs = KVCache(), []
    nsteps = len(toks)
    first = 0
    for k in range(nsteps):
        step_ids = torch.tensor([prompt], dtype=torch.int64) if k == 0 else torch.tensor([[toks[k - 1]]])
        if size == 0:
            ctx = served.step_context(first, {"input_ids": step_ids})
            h = inputs[k] if l > 0 else None
            out = served.run_block(blocks, l, h, ctx, cache)
            first += step_ids.shape[1]
            outs.append(out.clone() if l == len(blocks) - 1 else out.clone())
            continue
        q = length if k == 0 else 1
        ids = torch.zeros(size, q, dtype=torch.int64)
        ids[row, q - step_ids.shape[1]:] = step_ids[0]
        lengths = [length] * size
        lengths[row] = len(prompt)
        ctx = batch_context(served, k, ids, lengths, length)
        h = None
        if l > 0:
            x = inputs[k]
            h = torch.zeros(size, q, x.shape[-1], dtype=x.dtype)
            h[row, q - x.shape[1]:] = x[0]
        out = run_block_batched(served, blocks, l, h, ctx, cache)
        if l == len(blocks) - 1:
            outs.append(out[row].clone())
        else:
            outs.append(out[row:row + 1, q - step_ids.shape[1]:].clone())
    return outs


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--layers-per-block", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--models", default="builtin,wide")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(args.threads)
    from aftune.inference.policy import GenerationPolicy
    from aftune.inference.served import ServedModel

    rng = random.Random(0)
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}, "
          f"B_L {args.layers_per_block}, {args.tokens} tokens, {args.trials} trials")
    print("| model | B | decoding | filler rows, same shape | alone (B=1, unpadded) | other row index | B+1 rows | 1 more padding slot |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"builtin": BUILTIN, "wide": None}
        for name in args.models.split(","):
            path = paths[name] or wide_llama(Path(tmp))
            served = ServedModel.load(path, dtype=args.dtype)
            blocks = served.blocks(args.layers_per_block)
            nb = len(blocks)
            for size in sizes:
                for decoding, policy, seed in (
                        ("greedy", GenerationPolicy.for_model(served, max_new_tokens=args.tokens), None),
                        ("sampled", GenerationPolicy.for_model(served, max_new_tokens=args.tokens, temperature=1.0),
                         12345)):
                    counts = {k: [0, 0] for k in ("filler", "alone", "other", "bigger", "longer")}
                    for _ in range(args.trials):
                        prompts = [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 20))]
                                   for _ in range(size)]
                        seen, toks, lengths = provider(served, blocks, prompts, args.tokens, policy, seed)
                        length = max(lengths)
                        for r in range(size):
                            for l in range(nb):
                                inputs = seen[r][l] if l > 0 else None
                                want = seen[r][l + 1]
                                trials = {"filler": (r, size), "alone": (0, 0)}
                                if size > 1:
                                    trials["other"] = ((r + 1) % size, size)
                                trials["bigger"] = (r, size + 1)
                                trials["longer"] = (r, size)
                                for key, (row, sz) in trials.items():
                                    got = replay_row(served, blocks, l, row, sz, length + (key == "longer"),
                                                     prompts[r], toks[r], inputs)
                                    counts[key][0] += same(got, want)
                                    counts[key][1] += 1
                    cell = {k: (f"{v[0]}/{v[1]}" if v[1] else "-") for k, v in counts.items()}
                    print(f"| {name} | {size} | {decoding} | {cell['filler']} | {cell['alone']} | {cell['other']} | "
                          f"{cell['bigger']} | {cell['longer']} |", flush=True)
    print("(each cell: row x layer-block replays whose every step matched the provider's bits / replays tried)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
