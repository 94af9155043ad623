"""HTTP serving with a receipt and a record for every request (`aftune serve`), for clients that
authenticate with an API key, under the generation policy agreed with them.

    aftune serve-keys add alice --file api-keys.txt            # prints alice's key once
    aftune serve runs/demo --policy policy.json --api-keys api-keys.txt --tls-cert c.pem --tls-key k.pem
    curl -s https://127.0.0.1:8000/v1/generate -H "authorization: Bearer $KEY" \\
         -H 'content-type: application/json' -d '{"prompt": "Q: what is 2+2?", "nonce": "'$NONCE'"}'

One model is loaded once. Every request needs `Authorization: Bearer KEY` (else 401). `POST
/v1/generate` runs a recorded generation under the policy (a request may ask fewer new tokens;
any other generation field must be the policy's, else 422 naming it; a sampling policy needs the
client's nonce, from which the seed is derived) and returns the text, the tokens and the signed
receipt (with the request nonce and the policy digest). `GET /v1/model` returns the model
commitment, the policy and the provider's public key; `GET /v1/records/{id}` what an auditor needs
to verify one of the client's own requests (another client's record is 404, exactly as a record
that does not exist), with its tensors at `GET /v1/objects/{digest}` and tokenizer files at `GET
/v1/tokenizers/{digest}/{name}`; `GET /v1/attestation?nonce=HEX` TEE evidence binding the model
and the receipt key (when served with `--attest`). `download_record` rebuilds a record directory
from those answers, for `aftune verify-inference`. SPEC.md 8.10.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model from the
# endpoint's annotation, which must be the class itself (it is defined inside `create_app`).
import json
from pathlib import Path
from typing import Any, Callable, List, Optional

from ..core.store import OBJECT_SUFFIX
from ..data.inputs import MAX_PROMPT_CHARS
from ..errors import AftuneError, InputError, MissingExtra
from .access import ApiKeys, RecordOwners
from .engine import InferenceEngine
from .limits import RequestLimits, ServingLimits
from .openai_wire import error_body
from .openai_routes import OPENAI_PATHS, add_openai_routes
from .policy import MAX_CHAT_TEMPLATE_CHARS, POLICY_FIELDS, GenerationPolicy, parse_request_nonce

_HEX = set("0123456789abcdef")
UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer KEY' (keys: `aftune serve-keys add NAME`)"


def _is_digest(text: str) -> bool:
    return len(text) == 64 and set(text) <= _HEX


def _fastapi():
    try:
        import fastapi
        import pydantic
    except ImportError:
        raise MissingExtra("fastapi", "serve") from None
    return fastapi, pydantic


def create_app(engine: InferenceEngine, *, policy: Optional[GenerationPolicy], api_keys: ApiKeys,
               attestation: Optional[Callable[[str], dict]] = None, limits: Optional[ServingLimits] = None):
    """The FastAPI application serving `engine` to the clients of `api_keys` under `policy`
    (required for a causal LM). `attestation(nonce_hex)` answers `GET /v1/attestation` (the CLI
    wires `aftune.attestation.serving.attestation_response` with the TEE's evidence provider);
    `limits`: the request-size and concurrency limits (413, 429; defaults when None)."""
    fastapi, pydantic = _fastapi()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field

    if engine.served.task == "causal_lm" and not isinstance(policy, GenerationPolicy):
        raise InputError("serving a causal LM needs the generation policy agreed with the clients (--policy FILE; "
                         "write one with `aftune policy`)")
    if isinstance(policy, GenerationPolicy) and policy.dtype is not None and policy.dtype != engine.served.dtype:
        raise InputError(f"the generation policy pins the serving dtype {policy.dtype}, and the model is loaded in "
                         f"{engine.served.dtype}: load it in {policy.dtype}")
    if not isinstance(api_keys, ApiKeys):
        raise InputError("serving needs the clients' API keys (--api-keys FILE; `aftune serve-keys add NAME`)")

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, strict=True)
        nonce: Optional[str] = Field(None, min_length=32, max_length=128, strict=True)
        max_new_tokens: Optional[int] = Field(None, strict=True)
        temperature: Optional[float] = Field(None, allow_inf_nan=False, strict=True)
        top_p: Optional[float] = Field(None, allow_inf_nan=False, strict=True)
        eos_token_ids: Optional[List[int]] = Field(None, max_length=64, strict=True)
        stop_rule: Optional[str] = Field(None, max_length=64, strict=True)
        chat_template: Optional[str] = Field(None, max_length=MAX_CHAT_TEMPLATE_CHARS, strict=True)
        dtype: Optional[str] = Field(None, max_length=16, strict=True)
        numerics: Optional[str] = Field(None, max_length=16, strict=True)
        stop: Optional[List[str]] = Field(None, max_length=4, strict=True)

    app = FastAPI(title="aftune", summary="Auditable inference: every answer with a signed receipt and a record.")
    app.state.engine = engine
    records = engine.records
    owners = RecordOwners(records)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": message})

    app.add_middleware(RequestLimits, limits=limits or ServingLimits())  # inside the key check: added first

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        client = api_keys.client_of(key.strip()) if scheme.lower() == "bearer" else None
        if client is None:
            content = (error_body(UNAUTHORIZED, "invalid_request_error", None, "invalid_api_key")
                       if request.url.path.startswith(OPENAI_PATHS) else {"error": UNAUTHORIZED})
            return JSONResponse(status_code=401, content=content, headers={"WWW-Authenticate": "Bearer"})
        request.state.client = client
        return await call_next(request)

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
    def generate(body: GenerateRequest, request: Request):
        if engine.served.task != "causal_lm":
            raise InputError(f"this server holds a {engine.served.family} classifier; /v1/generate needs a causal LM")
        asked = {name: getattr(body, name) for name in POLICY_FIELDS if getattr(body, name) is not None}
        wanted, problems = policy.for_request(asked)
        nonce = None
        if body.nonce is not None:
            try:
                nonce = parse_request_nonce(body.nonce, "nonce")
            except InputError as exc:
                problems.append(str(exc))
        elif wanted.sampling:
            problems.append("nonce: required: the policy samples, and the seed is derived from your nonce (16 to 64 "
                            "random bytes, hex)")
        if problems:
            return error(422, "invalid request: " + "; ".join(problems[:8]))
        result = engine.generate(body.prompt, wanted, request_nonce=nonce)
        owners.add(request.state.client, bytes.fromhex(result.record_id))
        return {"text": result.text, "tokens": list(result.tokens), "receipt": result.receipt.to_json(),
                "record_id": result.record_id}

    add_openai_routes(app, engine, policy, owners)

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        s = engine.served
        return {"model_digest": s.digest.hex(), "hash": s.algorithm, "dtype": s.dtype, "family": s.family,
                "task": s.task, "run": s.run.to_json() if s.run else None, "public_key": engine.key.public_key.text,
                "tokenizer": s.tokenizer_digest.hex() if s.tokenizer_digest else None,
                "layers_per_block": engine.settings.layers_per_block,
                "activation_interval": engine.settings.activation_interval, "config": s.hf_config,
                "policy": policy.to_json() if policy else None,
                "policy_digest": policy.digest(s.algorithm).hex() if policy else None}

    @app.get("/v1/records/{record_id}")
    def record(record_id: str, request: Request):
        if not _is_digest(record_id):
            return error(400, "a record id is the record's full digest: 64 lowercase hex digits")
        rid = bytes.fromhex(record_id)
        path = records.record_path(rid)
        # another client's record answers exactly as a record that does not exist
        if not owners.owns(request.state.client, rid) or not path.is_file():
            return error(404, f"no record {record_id}")
        data = path.read_bytes()
        doc = json.loads(data)
        receipt_path = records.receipt_path(rid)
        boundaries = records.boundaries_path(rid)  # v6: when the provider has it (kept or regenerated)
        objects = sorted(d.hex() for d in records.row_digests(rid) if records.store.has(d))
        gen = doc.get("generation")
        policy_doc = None  # v6: the generation policy in the policy file the record names
        if isinstance(gen, dict) and "policy" not in gen and _is_digest(gen.get("policy_digest")):
            policy_doc = {"digest": gen["policy_digest"],
                          "file": records.policy_path(bytes.fromhex(gen["policy_digest"])).read_bytes().decode("utf-8")}
        served_doc = None
        if doc.get("served") is not None:  # v5: model and layout in the served file the record names
            served_doc = {"digest": doc["served"],
                          "file": records.served_path(bytes.fromhex(doc["served"])).read_bytes().decode("utf-8")}
            tok = json.loads(served_doc["file"])["model"].get("tokenizer")
        else:
            tok = doc["model"].get("tokenizer")
        tokenizer = None
        if tok is not None:
            d = records.tokenizer_dir(bytes.fromhex(tok))
            tokenizer = {"digest": tok, "files": sorted(p.name for p in d.iterdir() if p.is_file()),
                         "url": f"/v1/tokenizers/{tok}/"}
        return {"record_id": record_id, "record": data.decode("utf-8"),
                "receipt": json.loads(receipt_path.read_bytes()) if receipt_path.is_file() else None,
                "objects": [{"digest": d, "url": f"/v1/objects/{d}"} for d in objects], "tokenizer": tokenizer,
                "served": served_doc, "policy": policy_doc,
                "boundaries": boundaries.read_bytes().decode("utf-8") if boundaries.is_file() else None}

    @app.get("/v1/objects/{digest}")
    def object_file(digest: str, request: Request):
        if not _is_digest(digest):
            return error(400, "an object is named by its tensor digest: 64 lowercase hex digits")
        path = records.store.path(bytes.fromhex(digest))
        if not owners.may_read_object(request.state.client, bytes.fromhex(digest)) or not path.is_file():
            return error(404, f"no object {digest}")
        return Response(path.read_bytes(), media_type="application/octet-stream")

    @app.get("/v1/tokenizers/{digest}/{name}")
    def tokenizer_file(digest: str, name: str):
        if not _is_digest(digest) or "/" in name or name.startswith("."):
            return error(400, "bad tokenizer file reference")
        served_tok = engine.served.tokenizer_digest
        path = records.tokenizer_dir(bytes.fromhex(digest)) / name
        if served_tok is None or digest != served_tok.hex() or not path.is_file():
            return error(404, f"no tokenizer file {name}")
        return Response(path.read_bytes(), media_type="application/octet-stream")

    @app.get("/v1/attestation")
    def attest(nonce: str):
        if attestation is None:
            return error(404, "this server makes no attestation evidence (serve it with `aftune serve --attest`)")
        return attestation(nonce)

    return app


def run_server(app, host: str, port: int, *, tls_cert: Optional[Path] = None, tls_key: Optional[Path] = None) -> None:
    """Serve `app` with uvicorn; HTTPS when given a certificate and its key (both or neither)."""
    try:
        import uvicorn
    except ImportError:
        raise MissingExtra("uvicorn", "serve") from None
    if (tls_cert is None) != (tls_key is None):
        raise InputError("HTTPS needs both --tls-cert and --tls-key")
    for f in (tls_cert, tls_key):
        if f is not None and not Path(f).is_file():
            raise InputError(f"TLS file {f} does not exist")
    uvicorn.run(app, host=host, port=port, log_level="info",
                ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None)


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
    served = doc.get("served")
    if served:  # v5: checked against the digest the record commits when the record is opened
        if not _is_digest(served.get("digest")) or not isinstance(served.get("file"), str):
            raise InputError("the server named a bad served file")
        (root / "served").mkdir(parents=True, exist_ok=True)
        (root / "served" / f"{served['digest']}.json").write_bytes(served["file"].encode("utf-8"))
    policy = doc.get("policy")
    if policy:  # v6: checked against the policy digest the record commits when the record is opened
        if not _is_digest(policy.get("digest")) or not isinstance(policy.get("file"), str):
            raise InputError("the server named a bad policy file")
        (root / "policies").mkdir(parents=True, exist_ok=True)
        (root / "policies" / f"{policy['digest']}.json").write_bytes(policy["file"].encode("utf-8"))
    if isinstance(doc.get("boundaries"), str):  # v6: checked against the committed root when opened
        (root / "boundaries").mkdir(parents=True, exist_ok=True)
        (root / "boundaries" / f"{record_id}.json").write_bytes(doc["boundaries"].encode("utf-8"))
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
