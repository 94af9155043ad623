"""HTTP serving with a receipt and a record for every request (`aftune serve`).

    aftune serve runs/demo --host 127.0.0.1 --port 8000
    curl -s 127.0.0.1:8000/v1/generate -H 'content-type: application/json' \\
         -d '{"prompt": "Q: what is 2+2?", "max_new_tokens": 8}'

One model is loaded once. `POST /v1/generate` runs a recorded generation (the forward
computation is serialised by the engine's lock; hashing, storing and signing of each request's
own record are not) and returns the text, the tokens and the signed receipt. `GET /v1/model`
returns the model commitment and the provider's public key; `GET /v1/records/{id}` returns what
an auditor needs to verify one request: the record's exact bytes, its receipt, and where to fetch
its tensors (`GET /v1/objects/{digest}`) and tokenizer files (`GET /v1/tokenizers/{digest}/{name}`).
`download_record` rebuilds a record directory from those, for `aftune verify-inference`.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model from the
# endpoint's annotation, which must be the class itself (it is defined inside `create_app`).
import secrets
from pathlib import Path
from typing import Any, Optional

from ..errors import AftuneError, InputError, MissingExtra
from ..core.rows import rows_from_json
from ..data.inputs import MAX_PROMPT_CHARS
from .engine import InferenceEngine
from .record import InferenceRecord
from .settings import GenerationSettings
from ..core.store import OBJECT_SUFFIX

_HEX = set("0123456789abcdef")


def _is_digest(text: str) -> bool:
    return len(text) == 64 and set(text) <= _HEX


def _fastapi():
    try:
        import fastapi
        import pydantic
    except ImportError:
        raise MissingExtra("fastapi", "serve") from None
    return fastapi, pydantic


def create_app(engine: InferenceEngine, max_new_tokens_limit: int = 512):
    """The FastAPI application serving `engine`."""
    fastapi, pydantic = _fastapi()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, strict=True)
        max_new_tokens: int = Field(32, ge=1, le=max_new_tokens_limit, strict=True)
        temperature: float = Field(0.0, ge=0, le=100, allow_inf_nan=False, strict=True)
        top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, strict=True)
        seed: Optional[int] = Field(None, ge=0, lt=2**63, strict=True)

    app = FastAPI(title="aftune", summary="Auditable inference: every answer with a signed receipt and a record.")
    app.state.engine = engine
    records = engine.records

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": message})

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        return error(422, "invalid request: " + "; ".join(problems[:8]))

    @app.exception_handler(AftuneError)
    async def aftune_error(request: Request, exc: AftuneError):
        return error(400, str(exc))

    @app.post("/v1/generate")
    def generate(body: GenerateRequest) -> dict[str, Any]:
        if engine.served.task != "causal_lm":
            raise InputError(f"this server holds a {engine.served.family} classifier; /v1/generate needs a causal LM")
        seed = body.seed
        if seed is None:  # a sampled request without a seed gets a fresh one, committed in its record
            seed = secrets.randbelow(2**63) if body.temperature > 0 else 0
        gen = GenerationSettings(body.max_new_tokens, body.temperature, body.top_p, seed)
        result = engine.generate(body.prompt, gen)
        return {"text": result.text, "tokens": list(result.tokens), "receipt": result.receipt.to_json(),
                "record_id": result.record_id.hex()}

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        s = engine.served
        return {"model_digest": s.digest.hex(), "hash": s.algorithm, "dtype": s.dtype, "family": s.family,
                "task": s.task, "run": s.run.to_json() if s.run else None, "public_key": engine.key.public_key.text,
                "tokenizer": s.tokenizer_digest.hex() if s.tokenizer_digest else None,
                "layers_per_block": engine.settings.layers_per_block,
                "activation_interval": engine.settings.activation_interval, "config": s.hf_config}

    @app.get("/v1/records/{record_id}")
    def record(record_id: str):
        if not _is_digest(record_id):
            return error(400, "a record id is the record's full digest: 64 lowercase hex digits")
        path = records.record_path(bytes.fromhex(record_id))
        if not path.is_file():
            return error(404, f"no record {record_id}")
        data = path.read_bytes()
        rec = InferenceRecord.open(records.root, record_id)
        receipt_path = records.receipt_path(rec.record_id)
        objects = sorted({r.digest.hex() for k, r in rows_from_json(rec.doc["tensors"], "record: tensors").items()
                          if records.store.has(r.digest)})
        tok = rec.model.get("tokenizer")
        tokenizer = None
        if tok is not None:
            d = records.tokenizer_dir(bytes.fromhex(tok))
            tokenizer = {"digest": tok, "files": sorted(p.name for p in d.iterdir() if p.is_file()),
                         "url": f"/v1/tokenizers/{tok}/"}
        import json

        return {"record_id": record_id, "record": data.decode("utf-8"),
                "receipt": json.loads(receipt_path.read_bytes()) if receipt_path.is_file() else None,
                "objects": [{"digest": d, "url": f"/v1/objects/{d}"} for d in objects], "tokenizer": tokenizer}

    @app.get("/v1/objects/{digest}")
    def object_file(digest: str):
        if not _is_digest(digest):
            return error(400, "an object is named by its tensor digest: 64 lowercase hex digits")
        path = records.store.path(bytes.fromhex(digest))
        if not path.is_file():
            return error(404, f"no object {digest}")
        return Response(path.read_bytes(), media_type="application/octet-stream")

    @app.get("/v1/tokenizers/{digest}/{name}")
    def tokenizer_file(digest: str, name: str):
        if not _is_digest(digest) or "/" in name or name.startswith("."):
            return error(400, "bad tokenizer file reference")
        path = records.tokenizer_dir(bytes.fromhex(digest)) / name
        if not path.is_file():
            return error(404, f"no tokenizer file {name}")
        return Response(path.read_bytes(), media_type="application/octet-stream")

    return app


def run_server(app, host: str, port: int) -> None:
    try:
        import uvicorn
    except ImportError:
        raise MissingExtra("uvicorn", "serve") from None
    uvicorn.run(app, host=host, port=port, log_level="info")


def download_record(client, record_id: str, target: str | Path) -> Path:
    """Fetch one request's record, receipt, tensors and tokenizer from a server (an `httpx.Client`
    with its base_url) into the record directory `target`. Nothing fetched is trusted: the
    verifier checks every byte against the record's digest and the receipt's signature."""
    root = Path(target)
    if not _is_digest(record_id):
        raise InputError("a record id is 64 lowercase hex digits")
    r = client.get(f"/v1/records/{record_id}")
    if r.status_code != 200:
        raise InputError(f"the server answered {r.status_code} for record {record_id}: {r.text[:200]}")
    doc = r.json()
    (root / "records").mkdir(parents=True, exist_ok=True)
    (root / "records" / f"{record_id}.json").write_bytes(doc["record"].encode("utf-8"))
    if doc.get("receipt") is not None:
        from ..core.encoding import canonical_json

        (root / "receipts").mkdir(parents=True, exist_ok=True)
        (root / "receipts" / f"{record_id}.json").write_bytes(canonical_json(doc["receipt"]) + b"\n")
    for obj in doc.get("objects", []):
        d = obj["digest"]
        if not _is_digest(d):
            raise InputError(f"the server named a bad object {str(d)[:80]!r}")
        path = root / "objects" / d[:2] / (d + OBJECT_SUFFIX)
        if not path.is_file():
            body = client.get(f"/v1/objects/{d}")
            if body.status_code != 200:
                raise InputError(f"object {d} could not be fetched ({body.status_code})")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body.content)
    tok = doc.get("tokenizer")
    if tok:
        d = tok["digest"]
        if not _is_digest(d):
            raise InputError("the server named a bad tokenizer digest")
        tdir = root / "tokenizers" / d
        tdir.mkdir(parents=True, exist_ok=True)
        for name in tok["files"]:
            if "/" in name or name.startswith(".") or not name:
                raise InputError(f"the server named a bad tokenizer file {name[:80]!r}")
            body = client.get(f"/v1/tokenizers/{d}/{name}")
            if body.status_code != 200:
                raise InputError(f"tokenizer file {name} could not be fetched ({body.status_code})")
            (tdir / name).write_bytes(body.content)
    return root
