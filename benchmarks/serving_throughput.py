"""Serving throughput: requests and tokens a second at 1, 4 and 16 concurrent clients, for the
recorded server batching concurrent requests and serialising them, against the same HTTP stack
with recording off and with plain transformers generation, measured side by side in one process.

    python benchmarks/serving_throughput.py                       # built-in tiny Llama, about a minute
    python benchmarks/serving_throughput.py --requests 64 --tokens 32 --rounds 3 --threads 0

Four servers, each uvicorn on loopback (in a thread of this process) answering `POST
/v1/completions` in the OpenAI wire format (`openai_wire.parse_request` for the request) under one
greedy policy of exactly --tokens new tokens (stop rule `length`):

* batched    - `aftune serve`'s own app (`serve.create_app`): API key, block-decomposed generation,
               every boundary hashed, the record written, the receipt signed, the record given to
               the client; the answer carries the receipt. Concurrent requests are computed as one
               batch (`--max-batch-size`, default 16, `--batch-window-ms` 2; SPEC.md 8.5.1);
* serialised - the same app with `--max-batch-size 1`: one generation at a time (a lock);
* unrecorded - the same engine's block-decomposed generation (`InferenceEngine._generate`) and
               decoding one at a time, nothing hashed, stored or signed;
* plain      - Hugging Face `model.generate(ids, max_new_tokens=N, do_sample=False)` and decoding,
               one at a time.

The last three handle one generation at a time (one model, a lock), so concurrency overlaps only
the HTTP, parsing and, when recorded, the hashing, writing and signing that run outside the
engine's lock; `batched` also runs the model once per step for every request in the batch. Clients are asyncio tasks
(`httpx.AsyncClient`) in the main thread; the modes take turns in rotating order, each round, so
load from other processes falls on all alike. Reported per mode and concurrency: requests/s,
tokens/s and the median latency, and the ratios batched / serialised, batched / unrecorded and
batched / plain of requests/s. A benchmark, not a test: it asserts nothing.
"""

# No `from __future__ import annotations`: FastAPI reads `Request` from the endpoint's annotation.

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin" / "model"
PROMPTS = ["Q: what colour is the sky on a clear day? A:", "Q: name three animals that live in the sea. A:",
           "Q: how many legs does a spider have? A:", "Q: what is the capital of France? A:"]


class Server:
    """uvicorn serving `app` in a thread on a free loopback port."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()


def bare_app(policy, model_id: str, generate):
    """The OpenAI completions route without recording: the request translated as the recorded
    server does, `generate(prompt, policy) -> tokens` under one lock, the text decoded."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from aftune.core import jsonio
    from aftune.inference.openai_wire import WireError, parse_request, usage

    app, lock = FastAPI(), threading.Lock()

    def run(req):
        with lock:
            return generate(req.prompt, req.policy)

    @app.post("/v1/completions")
    async def completions(request: Request):
        from starlette.concurrency import run_in_threadpool

        try:
            req = parse_request(jsonio.loads(await request.body()), "completion", policy, model_id)
        except WireError as exc:
            return JSONResponse(status_code=exc.status, content=exc.to_json())
        tokens, text, prompt_tokens = await run_in_threadpool(run, req)
        return {"id": "cmpl-bare", "object": "text_completion", "created": int(time.time()), "model": model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
                "usage": usage(prompt_tokens, len(tokens))}

    return app


async def load(url: str, key: str, model_id: str, concurrency: int, requests: int, tokens: int) -> dict:
    """`requests` completions from `concurrency` clients at once: wall time, latencies, tokens."""
    import httpx

    todo = list(range(requests))
    latencies, got = [], []

    async def client(http):
        while todo:
            i = todo.pop()
            body = {"model": model_id, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                    "aftune_nonce": os.urandom(32).hex()}
            t0 = time.perf_counter()
            r = await http.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")
            got.append(r.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers={"authorization": f"Bearer {key}"}) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"wall": wall, "latency": statistics.median(latencies), "tokens": sum(got)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=BUILTIN, help="a model directory (default: the built-in Llama)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per answer (exactly: stop rule length)")
    ap.add_argument("--requests", type=int, default=32, help="requests per mode, concurrency and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--layers-per-block", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=16, help="rows of one batch (the batched server)")
    ap.add_argument("--batch-window-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; on a shared 2-core "
                                                            "machine 2 threads spin against other jobs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads:
        torch.set_num_threads(args.threads)
    from aftune.core.signing import SigningKey
    from aftune.inference.access import ApiKeys, add_client
    from aftune.inference.batching import BatchingSettings
    from aftune.inference.engine import InferenceEngine
    from aftune.inference.policy import GenerationPolicy
    from aftune.inference.serve import create_app
    from aftune.inference.served import ServedModel
    from aftune.inference.settings import RecordingSettings

    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        served = ServedModel.load(args.model)
        settings = RecordingSettings(args.layers_per_block, 0)
        engine = InferenceEngine(served, Path(tmp) / "records", SigningKey.generate(), settings,
                                 batching=BatchingSettings(args.max_batch_size, args.batch_window_ms))
        serial = InferenceEngine(served, Path(tmp) / "records", engine.key, settings,
                                 batching=BatchingSettings(max_batch_size=1))
        policy = GenerationPolicy.for_model(served, max_new_tokens=args.tokens, stop_rule="length", eos_token_ids=())
        key = add_client(Path(tmp) / "keys.txt", "bench")
        model_id = served.digest.hex()
        tok, model = served.tokenizer, served.model

        def unrecorded(prompt, p):
            inputs = served.prompt_inputs(prompt, p.chat_template)
            trace = engine._generate(inputs, p, None, None)
            return trace.tokens, tok.decode(trace.tokens, skip_special_tokens=True), inputs["input_ids"].shape[1]

        def plain(prompt, p):
            ids = served.prompt_inputs(prompt, p.chat_template)["input_ids"]
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_new_tokens,
                                     min_new_tokens=p.max_new_tokens, do_sample=False)
            tokens = out[0, ids.shape[1]:].tolist()
            return tokens, tok.decode(tokens, skip_special_tokens=True), ids.shape[1]

        keys = ApiKeys.load(Path(tmp) / "keys.txt")
        apps = {"batched": create_app(engine, policy=policy, api_keys=keys),
                "serialised": create_app(serial, policy=policy, api_keys=keys),
                "unrecorded": bare_app(policy, model_id, unrecorded), "plain": bare_app(policy, model_id, plain)}
        results = {(m, c): [] for m in apps for c in levels}
        order = list(apps)
        for r in range(args.rounds + 1):  # round 0 warms up (first calls, caches) and is dropped
            for c in levels:
                rot = order[(r + c) % len(order):] + order[:(r + c) % len(order)]
                for m in rot:
                    with Server(apps[m]) as url:
                        got = asyncio.run(load(url, key, model_id, c, args.requests if r else min(4, args.requests),
                                               args.tokens))
                    if r:
                        results[m, c].append(got)
                    print(f"  round {r} {m:10s} x{c:<3d} {got['wall']:.2f} s", file=sys.stderr, flush=True)
    layers = len(served.stage_names) - 2
    print(f"model {args.model.name} ({layers} layers, B_L={args.layers_per_block}, I_A=0), {args.tokens} tokens per "
          f"answer, {args.requests} requests per cell x {args.rounds} rounds, torch threads {torch.get_num_threads()}, "
          f"batches of at most {args.max_batch_size} ({args.batch_window_ms:g} ms window)")
    print("| clients | mode | requests/s | tokens/s | median latency (s) |")
    print("|---|---|---|---|---|")
    rate = {}
    for c in levels:
        for m in apps:
            runs = results[m, c]
            wall = sum(x["wall"] for x in runs)
            rate[m, c] = args.requests * len(runs) / wall
            toks = sum(x["tokens"] for x in runs) / wall
            lat = statistics.median(x["latency"] for x in runs)
            print(f"| {c} | {m} | {rate[m, c]:.1f} | {toks:.0f} | {lat:.3f} |")
    for c in levels:
        print(f"clients {c}: requests/s batched / serialised {rate['batched', c] / rate['serialised', c]:.2f}, "
              f"batched / unrecorded {rate['batched', c] / rate['unrecorded', c]:.2f}, "
              f"batched / plain {rate['batched', c] / rate['plain', c]:.2f}, "
              f"serialised / unrecorded {rate['serialised', c] / rate['unrecorded', c]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
