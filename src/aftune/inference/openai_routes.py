"""The OpenAI-compatible routes of `aftune serve` (SPEC.md 8.10.1): `POST /v1/completions`, `POST
/v1/chat/completions` (whole, or streamed as server-sent events) and `GET /v1/models`, on the app
`serve.create_app` builds (API keys, records and owners are the server's own).

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    for chunk in client.chat.completions.create(model=DIGEST, messages=[{"role": "user", "content": "hi"}],
                                                stream=True, extra_body={"aftune_nonce": NONCE}): ...

A whole answer carries its receipt in the member `aftune` (and the record id in the header
`x-aftune-record-id`); a stream carries it in its last chunk before `data: [DONE]` (the record id
is known only once the record is written). Translation is `openai_wire`'s; this file only wires it.
"""

# No `from __future__ import annotations`: FastAPI reads `Request` from the endpoints' annotations.
import json
import queue
import secrets
import threading
import time

from ..errors import AftuneError
from .stops import answer_text
from .openai_wire import (RECORD_HEADER, RESPONSE_FIELD, TextDeltas, WireError, attachment, error_body,
                          finish_reason, parse_request, sse, stream_chunk, usage, whole_response)

OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


def add_openai_routes(app, engine, policy, owners) -> None:
    """Add the OpenAI routes to `app`, serving `engine` under `policy`; each answer's record is
    given to the requesting client in `owners`."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    served = engine.served
    model_id = served.digest.hex()

    def refuse(exc: WireError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content=exc.to_json())

    def model_entry() -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "aftune",
                RESPONSE_FIELD: {"model_digest": model_id, "hash": served.algorithm, "dtype": served.dtype,
                                 "family": served.family, "public_key": engine.key.public_key.text,
                                 "policy_digest": policy.digest(served.algorithm).hex() if policy else None}}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{name}")
    def one_model(name: str):
        if name != model_id:
            return refuse(WireError(f"the model {name[:80]!r} does not exist", "model", "model_not_found", 404))
        return model_entry()

    async def answer(request: Request, kind: str):
        if served.task != "causal_lm":
            return refuse(WireError(f"this server holds a {served.family} classifier, not a causal LM", "model",
                                    "model_not_supported"))
        try:
            body = json.loads(await request.body())
        except ValueError:
            return refuse(WireError("the request body is not JSON", None, "invalid_json"))
        try:
            req = parse_request(body, kind, policy, model_id)
        except WireError as exc:
            return refuse(exc)
        client, created = request.state.client, int(time.time())
        if not req.stream:
            try:
                result = await run_in_threadpool(engine.generate, req.prompt, req.policy, request_nonce=req.nonce)
            except AftuneError as exc:
                return refuse(WireError(str(exc), "messages" if kind == "chat" else "prompt"))
            owners.add(client, bytes.fromhex(result.record_id))
            return JSONResponse(whole_response(req, result, model_id, created), headers={RECORD_HEADER: result.record_id})
        events: queue.Queue = queue.Queue()

        def work():
            try:
                result = engine.generate(req.prompt, req.policy, request_nonce=req.nonce,
                                         on_token_id=lambda t: events.put(("token", t)))
                owners.add(client, bytes.fromhex(result.record_id))
                events.put(("done", result))
            except BaseException as exc:  # handed to the stream: the client sees an error, never a hang
                events.put(("error", exc))

        threading.Thread(target=work, daemon=True, name="aftune-stream").start()
        first = await run_in_threadpool(events.get)
        if first[0] == "error":
            if isinstance(first[1], AftuneError):
                return refuse(WireError(str(first[1]), "messages" if kind == "chat" else "prompt"))
            raise first[1]
        return StreamingResponse(_events(req, first, events, served.tokenizer, model_id, created),
                                 media_type="text/event-stream", headers={"cache-control": "no-store"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, "chat")


def _events(req, first, events, tokenizer, model_id: str, created: int):
    """The server-sent events of one streamed answer (a sync generator: Starlette runs it in a
    thread). Text deltas as tokens come; the last chunk has the finish reason and the receipt."""
    sid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + secrets.token_hex(16)
    deltas = TextDeltas(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), req.policy.stop)
    if req.kind == "chat":
        yield sse(stream_chunk(req, sid, model_id, created, "", first=True))
    event = first
    while event[0] == "token":
        delta = deltas.add(event[1])
        if delta:
            yield sse(stream_chunk(req, sid, model_id, created, delta))
        event = events.get()
    if event[0] == "error":
        yield sse(error_body(f"the answer failed: {type(event[1]).__name__}: {str(event[1])[:200]}", "server_error"))
        return
    result = event[1]
    rest = deltas.rest(answer_text(result.text, result.stop_offset))
    if rest is None:  # never sends a text the record does not hold: the client sees a failure
        yield sse(error_body(f"the streamed text is not the beginning of record {result.record_id}'s text: "
                             "ask again without stream", "server_error"))
        return
    yield sse(stream_chunk(req, sid, model_id, created, rest,
                           finish_reason(result.tokens, req.policy, result.stop_offset is not None),
                           {RESPONSE_FIELD: attachment(result)}))
    if req.include_usage:
        yield sse(stream_chunk(req, sid, model_id, created, None,
                               extra={"usage": usage(result.prompt_tokens, len(result.tokens))}))
    yield sse("[DONE]")
