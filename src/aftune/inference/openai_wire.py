"""The OpenAI wire format of `aftune serve` (SPEC.md 8.10.1): requests to `POST /v1/completions` and
`POST /v1/chat/completions` translated into a prompt, the client's generation policy and nonce,
and answers (whole or streamed) translated back, each carrying its receipt. Pure functions.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    r = client.completions.create(model=MODEL_DIGEST, prompt="Q: 2+2?", max_tokens=8,
                                  extra_body={"aftune_nonce": secrets.token_hex(32)})
    r.model_extra["aftune"]        # {"record_id", "receipt", "tokens"}
    aftune verify-receipt response.json --public-key provider.pub --record-dir R --request-nonce HEX

The model id is the served model's digest (64 hex digits): a client names the model it agreed to.
The policy maps onto `max_tokens` (at most the policy's), `temperature` and `top_p` (the policy's,
if given), `stop` (the policy's stop strings, if given: the answer is cut before the first) and `seed` (only under a greedy
policy, where it changes nothing; a sampled answer's seed is derived from `aftune_nonce`). Any
other field, or a value outside the policy, is refused in OpenAI's error format naming it. A chat
is one user message, rendered with the policy's chat template (or none), exactly as a completion's
prompt is. `response_claims` reads a saved answer back for `aftune verify-receipt` and
`verify-inference`: its receipt, its record id and its text, which must be the record's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..errors import CommitmentMismatch, InputError
from .policy import MAX_STOP_STRINGS, GenerationPolicy, parse_request_nonce
from .stops import answer_text, stop_offset

NONCE_FIELD = "aftune_nonce"
RESPONSE_FIELD = "aftune"
RECORD_HEADER = "x-aftune-record-id"
MAX_SAVED_RESPONSE_BYTES = 16 << 20
# OpenAI fields a client may send at their neutral value: they change nothing of the computation
_NEUTRAL = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (None, False),
            "top_logprobs": (None, 0), "echo": (False,), "logit_bias": (None, {}), "best_of": (None, 1),
            "suffix": (None,), "user": None, "parallel_tool_calls": None, "response_format": (None, {"type": "text"})}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", NONCE_FIELD}
_FIELDS = {"chat": _COMMON | {"messages", "max_completion_tokens"}, "completion": _COMMON | {"prompt"}}


class WireError(InputError):
    """A request the server refuses, in OpenAI's error format: {"error": {message, type, param, code}}."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def to_json(self) -> dict[str, Any]:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class WireRequest:
    """One request, translated: what the engine runs and how the answer is shaped."""

    kind: str  # "chat" or "completion"
    prompt: str
    policy: GenerationPolicy  # the policy with the request's max_tokens
    nonce: bytes | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage only


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_request(body: Any, kind: str, policy: GenerationPolicy, model_id: str) -> WireRequest:
    """Translate a request body (parsed JSON, hostile) under `policy` for the model `model_id`.
    Raises WireError naming the first field outside (the OpenAI format has one `param`)."""
    if not isinstance(body, dict):
        raise WireError("the request body must be a JSON object", None)
    for name in sorted(body):
        if name in _FIELDS[kind]:
            continue
        if name in _NEUTRAL and (_NEUTRAL[name] is None or any(body[name] == v and type(body[name]) is type(v)
                                                               for v in _NEUTRAL[name])):
            continue
        raise WireError(f"{name}: not supported by this server: the generation policy agreed with you fixes every "
                        "generation setting (it maps max_tokens, temperature, top_p, stop and seed)", name,
                        "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or model != model_id:
        raise WireError(f"the model {str(model)[:80]!r} does not exist: this server serves {model_id} (the model's "
                        "digest; GET /v1/models)", "model", "model_not_found", status=404)
    prompt = _chat_prompt(body.get("messages")) if kind == "chat" else _completion_prompt(body.get("prompt"))
    asked: dict[str, Any] = {}
    for name in ("max_tokens", "max_completion_tokens"):
        n = body.get(name)
        if n is not None:
            if not isinstance(n, int) or isinstance(n, bool):
                raise WireError(f"{name}: must be an integer, got {str(n)[:40]!r}", name)
            asked["max_new_tokens"] = n
    for name in ("temperature", "top_p"):
        v = body.get(name)
        if v is not None:
            if not _is_number(v):
                raise WireError(f"{name}: must be a number, got {str(v)[:40]!r}", name)
            asked[name] = v
    stop = body.get("stop")
    if stop is not None:  # absent: the policy's stop strings; "" or []: none
        stops = ([stop] if stop else []) if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
            raise WireError(f"stop: must be a string or a list of non-empty strings, got {str(stop)[:60]!r}", "stop")
        if len(stops) > MAX_STOP_STRINGS:
            raise WireError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
        asked["stop"] = stops
    wanted, problems = policy.for_request(asked)
    if problems:
        field = problems[0].split(":", 1)[0]
        param = {"max_new_tokens": "max_tokens"}.get(field, field)
        raise WireError(problems[0].replace("max_new_tokens", "max_tokens", 1), param, "outside_policy")
    if body.get("seed") is not None:
        if wanted.sampling:
            raise WireError(f"seed: the policy samples and the seed is derived from your nonce ({NONCE_FIELD}), so "
                            "that the provider cannot choose it: send no seed", "seed", "outside_policy")
        if not isinstance(body["seed"], int) or isinstance(body["seed"], bool):
            raise WireError("seed: must be an integer", "seed")
    nonce = None
    if body.get(NONCE_FIELD) is not None:
        try:
            nonce = parse_request_nonce(body[NONCE_FIELD], NONCE_FIELD)
        except InputError as exc:
            raise WireError(str(exc), NONCE_FIELD) from None
    elif wanted.sampling:
        raise WireError(f"{NONCE_FIELD}: required: the policy samples, and the seed is derived from your nonce (16 to "
                        "64 random bytes, hex; with the openai SDK: extra_body={\"aftune_nonce\": ...})", NONCE_FIELD)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise WireError("stream: must be true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not stream:
            raise WireError("stream_options: only {\"include_usage\": bool}, with stream: true", "stream_options")
        include_usage = options.get("include_usage") is True
    return WireRequest(kind, prompt, wanted, nonce, bool(stream), include_usage)


def _chat_prompt(messages: Any) -> str:
    """A chat of one user message (text, or text parts): the prompt the policy's template renders."""
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise WireError("messages: this server answers a chat of exactly one user message (the policy's chat "
                        "template renders one prompt)", "messages")
    m = messages[0]
    if m.get("role") != "user" or set(m) - {"role", "content", "name"}:
        raise WireError("messages: the one message must be {\"role\": \"user\", \"content\": TEXT}", "messages")
    content = m.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str) or not content:
        raise WireError("messages: the message content must be non-empty text", "messages")
    return content


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise WireError("prompt: must be one non-empty string (token-id prompts and batches are not served)", "prompt")
    return prompt


# --- answers --------------------------------------------------------------------------------------

def finish_reason(tokens: tuple[int, ...] | list[int], policy: GenerationPolicy, stopped: bool = False) -> str:
    """`stop` after an end-of-sequence token or at a stop string (`stopped`), else `length`."""
    return "stop" if stopped or (tokens and policy.stops_at(tokens[-1])) else "length"


def response_id(kind: str, record_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + record_id[:32]


def attachment(result) -> dict[str, Any]:
    """The `aftune` member of an answer: what the client checks (SPEC.md 8.10.1)."""
    return {"record_id": result.record_id, "receipt": result.receipt.to_json(), "tokens": list(result.tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def whole_response(req: WireRequest, result, model_id: str, created: int) -> dict[str, Any]:
    """The answer to a request without `stream`."""
    reason = finish_reason(result.tokens, req.policy, result.stop_offset is not None)
    text = answer_text(result.text, result.stop_offset)  # cut before the stop string, as OpenAI does
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    return {"id": response_id(req.kind, result.record_id), "object": obj, "created": created, "model": model_id,
            "choices": [choice], "usage": usage(result.prompt_tokens, len(result.tokens)),
            RESPONSE_FIELD: attachment(result)}


def stream_chunk(req: WireRequest, stream_id: str, model_id: str, created: int, text: str | None,
                 reason: str | None = None, extra: dict[str, Any] | None = None, first: bool = False) -> dict[str, Any]:
    """One server-sent event's data. `text` None: a chunk without a choice (the usage chunk)."""
    choices = []
    if text is not None:
        if req.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choices = [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": stream_id, "object": obj, "created": created, "model": model_id, "choices": choices, **(extra or {})}


def sse(data: dict[str, Any] | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))).encode() + b"\n\n"


class TextDeltas:
    """Text deltas of a growing token sequence. Only text that later tokens are not known to change
    is released: never a trailing partial UTF-8 character (U+FFFD) nor trailing whitespace (a
    decoder's clean-up may drop a space before the punctuation that follows), and only text that
    extends what was sent. With stop strings, nothing from a stop string on is released, nor a
    tail that may begin one. The deltas and `rest` add up to the answer."""

    def __init__(self, decode, stops: tuple[str, ...] = ()):
        self.decode, self.tokens, self.sent, self.stops = decode, [], "", tuple(stops)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens).rstrip()
        if self.stops:
            at = stop_offset(text, self.stops)
            text = text[:at] if at is not None else text[:len(text) - _stop_prefix(text, self.stops)]
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def rest(self, final_text: str) -> str | None:
        """What remains of `final_text` (the record's text) after what was sent; None if what was
        sent is not its beginning (a decoder that rewrites earlier text: the stream must fail)."""
        return final_text[len(self.sent):] if final_text.startswith(self.sent) else None


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of `text` that a stop string begins with (held back)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


# --- reading a saved answer back (the client's side) ---------------------------------------------

@dataclass(frozen=True)
class ResponseClaims:
    """What a saved answer claims: its receipt (JSON), record id, text and model id."""

    receipt: dict[str, Any]
    record_id: str
    text: str
    model: str | None


def response_claims(data: bytes) -> ResponseClaims:
    """Parse a saved answer (hostile): a whole response (JSON object), its streamed chunks (a JSON
    array of chunks), or the server-sent events as received (`data: ...` lines)."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError:
        raise InputError("saved response: not UTF-8 text") from None
    stripped = text.lstrip()
    if stripped.startswith("data:"):
        chunks = []
        for line in text.splitlines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                if payload != "[DONE]":
                    chunks.append(_json(payload))
        doc: Any = chunks
    else:
        doc = _json(text)
    if isinstance(doc, dict):
        if not isinstance(doc.get("choices"), list) or len(doc["choices"]) != 1 or not isinstance(doc["choices"][0], dict):
            raise InputError("saved response: expected one choice")
        c = doc["choices"][0]
        out = c["message"].get("content") if isinstance(c.get("message"), dict) else c.get("text")
        chunks_att = [doc.get(RESPONSE_FIELD)]
        model = doc.get("model")
    elif isinstance(doc, list) and doc and all(isinstance(c, dict) for c in doc):
        parts = []
        for chunk in doc:
            for c in chunk.get("choices") or []:
                piece = c.get("delta", {}).get("content") if isinstance(c.get("delta"), dict) else c.get("text")
                if isinstance(piece, str):
                    parts.append(piece)
        out = "".join(parts)
        chunks_att = [c[RESPONSE_FIELD] for c in doc if RESPONSE_FIELD in c]
        models = {c.get("model") for c in doc}
        if len(models) != 1:
            raise CommitmentMismatch("saved response: its chunks name different models")
        model = models.pop()
    else:
        raise InputError("saved response: expected a completion (JSON object), its chunks (JSON array) or its "
                         "server-sent events")
    if len(chunks_att) != 1 or not isinstance(chunks_att[0], dict):
        raise InputError(f"saved response: expected exactly one '{RESPONSE_FIELD}' member (the receipt); an answer "
                         "without one is not auditable")
    att = chunks_att[0]
    if not isinstance(att.get("receipt"), dict) or not isinstance(att.get("record_id"), str):
        raise InputError(f"saved response: '{RESPONSE_FIELD}' needs a receipt and a record_id")
    if not isinstance(out, str):
        raise InputError("saved response: no answer text")
    return ResponseClaims(att["receipt"], att["record_id"], out, model if isinstance(model, str) else None)


def looks_like_response(data: bytes) -> bool:
    """A saved answer rather than a receipt file (which has a `signature` at the top)."""
    if data.lstrip()[:5] == b"data:":
        return True
    try:
        doc = jsonio.loads(data)
    except ValueError:
        return False
    if isinstance(doc, list):  # streamed chunks
        return bool(doc) and all(isinstance(c, dict) and "choices" in c for c in doc)
    return isinstance(doc, dict) and "choices" in doc


def check_claims(claims: ResponseClaims, receipt, record_dir=None) -> None:
    """The answer is the receipt's: same record id and model; with the record, the same text.
    Raises CommitmentMismatch naming the field that differs."""
    if claims.record_id != receipt.record_root.hex():
        raise CommitmentMismatch(f"the response names record {claims.record_id[:16]}…, its receipt record "
                                 f"{receipt.record_root.hex()[:16]}…")
    if claims.model is not None and claims.model != receipt.model_digest.hex():
        raise CommitmentMismatch(f"the response names model {claims.model[:24]}…, its receipt was signed for model "
                                 f"{receipt.model_digest.hex()[:16]}…")
    if record_dir is None:
        return
    from .record import InferenceRecord

    record = InferenceRecord.open(record_dir, claims.record_id)
    output = record.doc.get("output") or {}
    committed = output.get("text")
    offset = output.get("stop_offset")  # the answer is cut before the first stop string (SPEC.md 8.10.1)
    if isinstance(committed, str) and isinstance(offset, int) and not isinstance(offset, bool) \
            and 0 <= offset <= len(committed):
        committed = answer_text(committed, offset)
    if committed != claims.text:
        raise CommitmentMismatch(f"the response text {claims.text[:40]!r} differs from the text of record "
                                 f"{claims.record_id[:16]}… {str(committed)[:40]!r}: the answer was altered")


def _json(text: str) -> Any:
    return jsonio.parse(text.encode("utf-8"), "saved response", InputError)


def load_receipt_or_response(path: str | Path):
    """A receipt file, or a saved answer carrying one: (Receipt, ResponseClaims or None)."""
    from .receipt import MAX_RECEIPT_BYTES, Receipt

    if not Path(path).is_file():
        raise InputError(f"receipt {path} does not exist")
    data = jsonio.read_bytes(path, MAX_SAVED_RESPONSE_BYTES, "receipt or saved response", InputError)
    if looks_like_response(data):
        claims = response_claims(data)
        return Receipt.from_json(claims.receipt), claims
    if len(data) > MAX_RECEIPT_BYTES:
        raise InputError(f"receipt {path} is larger than {MAX_RECEIPT_BYTES} bytes")
    return Receipt.from_json(jsonio.parse(data, f"receipt {path}", InputError)), None
