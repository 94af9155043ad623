"""The generation policy (`aftune.generation-policy.v2`, SPEC.md 8.6.1): what a client asks of every
generated answer, stated by the client, committed in each record and compared field by field.

    aftune policy runs/demo --max-new-tokens 8 --out policy.json      # the client writes one
    policy = GenerationPolicy.from_json(read_json("policy.json", ...)) # hostile input: every problem named
    policy.digest("blake3")                  # H(TAG_GENERATION_POLICY || canonical_json(policy))
    policy.check(record.policy)              # -> [] or the differing fields, e.g. ["temperature"]

A policy is a standalone document (a request or policy file, `--policy FILE`) and is embedded as
is in the client's agreement (`agreement.json`, member "inference"). It fixes the temperature
(0: greedy), top_p, max_new_tokens, the end-of-sequence tokens, the stop rule and the chat template
(its exact text, or null), the serving dtype (the compute dtype of the served weights: a float32
model served in bfloat16 is another computation) and the numerics (`native`: the provider's
kernels, strict replay needs its hardware; `portable`: boundary activations rounded to a coarser
grid so that any hardware replays them bitwise, `portable.py`, SPEC.md 8.13). A policy without a
dtype is an `aftune.generation-policy.v1` document (read, and written back in its v1 form so that
its digest stays the one old records commit); every other policy is v2. A server takes its
max_new_tokens as a limit (a request may ask for fewer) and every other field as fixed. The client's request nonce (16 to 64 bytes) is checked here
too: sampling seeds are derived from it (`sampling.request_seed`), never chosen by the provider.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..core.encoding import TAG_GENERATION_POLICY, canonical_json, hash_message
from ..errors import InputError

POLICY_FORMAT = "aftune.generation-policy.v2"  # written for every policy that pins the serving dtype, without stop
POLICY_FORMAT_V3 = "aftune.generation-policy.v3"  # v2 and stop strings: written for a policy that has some
POLICY_FORMAT_V1 = "aftune.generation-policy.v1"  # read; a policy without dtype is written in this form
SERVING_DTYPES = ("float32", "bfloat16", "float16", "float64")
NUMERICS = ("native", "portable")  # portable: SPEC.md 8.13 (float32 compute, bfloat16 grid)
PORTABLE_DTYPES = ("float32",)  # the compute dtypes portable numerics has a grid for
STOP_RULES = ("eos_or_length", "length")  # stop at an end-of-sequence token or after max_new_tokens | only after
MAX_NEW_TOKENS = 4096
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0  # or exactly 0 (greedy)
MAX_TOKEN_ID = 2**31 - 1
MAX_EOS_TOKENS = 64
MAX_CHAT_TEMPLATE_CHARS = 1 << 16
MAX_POLICY_BYTES = 1 << 20
REQUEST_NONCE_BYTES = (16, 64)
POLICY_FIELDS_V1 = ("temperature", "top_p", "max_new_tokens", "eos_token_ids", "stop_rule", "chat_template")
POLICY_FIELDS_V2 = POLICY_FIELDS_V1 + ("dtype", "numerics")
POLICY_FIELDS = POLICY_FIELDS_V2 + ("stop",)
MAX_STOP_STRINGS = 4  # as OpenAI's `stop`
MAX_STOP_CHARS = 256


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def policy_problems(values: dict[str, Any]) -> list[str]:
    """Every problem of the policy fields in `values` (types and ranges), each naming its field."""
    out = []
    t = values.get("temperature")
    if not _is_number(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        out.append(f"temperature: must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t!r}")
    p = values.get("top_p")
    if not _is_number(p) or not 0 < p <= 1:
        out.append(f"top_p: must be a number in (0, 1], got {p!r}")
    n = values.get("max_new_tokens")
    if not _is_int(n) or not 1 <= n <= MAX_NEW_TOKENS:
        out.append(f"max_new_tokens: must be an integer in [1, {MAX_NEW_TOKENS}], got {n!r}")
    eos = values.get("eos_token_ids")
    if not isinstance(eos, (list, tuple)) or len(eos) > MAX_EOS_TOKENS or not all(
            _is_int(i) and 0 <= i <= MAX_TOKEN_ID for i in eos):
        out.append(f"eos_token_ids: must be a list of at most {MAX_EOS_TOKENS} token ids in [0, 2^31), "
                   f"got {str(eos)[:80]}")
    elif len(set(eos)) != len(eos):
        out.append("eos_token_ids: a token id is listed twice")
    rule = values.get("stop_rule")
    if rule not in STOP_RULES:
        out.append(f"stop_rule: must be one of {', '.join(STOP_RULES)}, got {str(rule)[:40]!r}")
    elif rule == "length" and isinstance(eos, (list, tuple)) and eos:
        out.append("stop_rule: 'length' never stops at an end-of-sequence token, so eos_token_ids must be empty")
    tpl = values.get("chat_template")
    if tpl is not None:
        if not isinstance(tpl, str) or not tpl or len(tpl) > MAX_CHAT_TEMPLATE_CHARS:
            out.append(f"chat_template: must be null or a non-empty string of at most {MAX_CHAT_TEMPLATE_CHARS} "
                       "characters")
        else:
            try:
                tpl.encode("utf-8")
            except UnicodeEncodeError:
                out.append("chat_template: is not valid Unicode text (lone surrogate)")
    dtype, numerics = values.get("dtype"), values.get("numerics", "native")
    if dtype is not None and dtype not in SERVING_DTYPES:
        out.append(f"dtype: must be one of {', '.join(SERVING_DTYPES)}, got {str(dtype)[:40]!r}")
    if numerics not in NUMERICS:
        out.append(f"numerics: must be one of {', '.join(NUMERICS)}, got {str(numerics)[:40]!r}")
    elif numerics == "portable" and dtype not in PORTABLE_DTYPES:
        out.append(f"numerics: portable numerics needs dtype {' or '.join(PORTABLE_DTYPES)} (float32 compute, "
                   f"bfloat16 grid), got {dtype!r}")
    stop = values.get("stop", ())
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS or not all(
            isinstance(x, str) and 1 <= len(x) <= MAX_STOP_CHARS for x in stop):
        out.append(f"stop: must be a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
                   f"{MAX_STOP_CHARS} characters, got {str(stop)[:80]}")
    elif len(set(stop)) != len(stop):
        out.append("stop: a stop string is listed twice")
    elif stop:
        if any(_lone_surrogate(x) for x in stop):
            out.append("stop: a stop string is not valid Unicode text (lone surrogate)")
        if rule == "length":
            out.append("stop: stop_rule 'length' never stops early, so it has no stop strings")
        if dtype is None:
            out.append(f"stop: a policy with stop strings ({POLICY_FORMAT_V3}) pins the serving dtype")
    return out


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass(frozen=True)
class GenerationPolicy:
    """What a client asks of every generated answer; all of it is committed in the record."""

    max_new_tokens: int  # tokens to generate at most (a server's limit; a request may ask fewer)
    eos_token_ids: tuple[int, ...]  # end-of-sequence tokens: generation stops after one (stop rule eos_or_length)
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sampling with a seed derived from the client's nonce
    top_p: float = 1.0  # nucleus: sample among the most likely tokens holding this much mass
    stop_rule: str = "eos_or_length"  # eos_or_length | length (always max_new_tokens tokens)
    chat_template: str | None = None  # exact Jinja text the prompt is rendered with (data.inputs.render_chat), or None
    # the serving (parameter and compute) dtype; None: not pinned (an aftune.generation-policy.v1 policy)
    dtype: str | None = None
    numerics: str = "native"  # native | portable (boundaries on a bfloat16 grid: bitwise on any hardware)
    # stop strings: generation stops once the decoded text contains one (SPEC.md 8.6.2); the answer is cut before it
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(values["eos_token_ids"], list):
            values["eos_token_ids"] = tuple(values["eos_token_ids"])
        if isinstance(values["stop"], list):
            values["stop"] = tuple(values["stop"])
        problems = policy_problems(values)
        if problems:
            raise InputError("invalid generation policy:\n  - " + "\n  - ".join(problems))
        # one form for each value, so that equal policies have equal bytes and digests
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "eos_token_ids", tuple(sorted(values["eos_token_ids"])))
        object.__setattr__(self, "stop", tuple(sorted(values["stop"])))

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def stops_at(self, token: int) -> bool:
        """Whether generation stops after `token` (before max_new_tokens is reached); stop strings
        are matched on the decoded text (`stops.StopStrings`)."""
        return self.stop_rule == "eos_or_length" and token in self.eos_token_ids

    # --- bytes -----------------------------------------------------------------------------
    @property
    def format(self) -> str:
        """v3 with stop strings, else v2 when the serving dtype is pinned; a policy without one is v1."""
        if self.stop:
            return POLICY_FORMAT_V3
        return POLICY_FORMAT_V1 if self.dtype is None else POLICY_FORMAT

    def to_json(self) -> dict[str, Any]:
        """The normal form: v2 with `dtype` and `numerics`, v3 with `stop` too when it has stop
        strings; the v1 form (without them) for a policy that pins no dtype (numerics is then
        native), so that a v1 or v2 policy keeps its digest."""
        doc = {"format": self.format, "temperature": self.temperature, "top_p": self.top_p,
               "max_new_tokens": self.max_new_tokens, "eos_token_ids": list(self.eos_token_ids),
               "stop_rule": self.stop_rule, "chat_template": self.chat_template}
        if self.dtype is not None:
            doc.update(dtype=self.dtype, numerics=self.numerics)
        if self.stop:
            doc["stop"] = list(self.stop)
        return doc

    def digest(self, algorithm: str) -> bytes:
        """H(TAG_GENERATION_POLICY || canonical_json(to_json())) (SPEC.md 8.6.1)."""
        return hash_message(algorithm, TAG_GENERATION_POLICY, canonical_json(self.to_json()))

    @classmethod
    def from_json(cls, obj: Any, what: str = "generation policy") -> "GenerationPolicy":
        """Parse hostile input: exactly the fields of `aftune.generation-policy.v2` (or of v1,
        which has no dtype and numerics: it reads as dtype None, numerics native), each of its
        type and range; every problem is named at once (InputError)."""
        if not isinstance(obj, dict):
            raise InputError(f"{what}: must be a JSON object ({POLICY_FORMAT}), got {type(obj).__name__}")
        problems = []
        v1, v3 = obj.get("format") == POLICY_FORMAT_V1, obj.get("format") == POLICY_FORMAT_V3
        fmt = POLICY_FORMAT_V1 if v1 else POLICY_FORMAT_V3 if v3 else POLICY_FORMAT
        expected = ("format", *(POLICY_FIELDS_V1 if v1 else POLICY_FIELDS if v3 else POLICY_FIELDS_V2))
        missing = [k for k in expected if k not in obj]
        unknown = sorted(str(k)[:40] for k in obj if k not in expected)
        if missing:
            problems.append(f"missing fields {missing}")
        if unknown:
            problems.append(f"unknown fields {unknown}" + (" (an aftune.generation-policy.v1 policy has no dtype and "
                                                           "numerics: make it a v2 policy)" if v1 else
                                                           f" (stop strings make it an {POLICY_FORMAT_V3} policy)"
                                                           if "stop" in unknown and not v3 else ""))
        if "format" in obj and obj["format"] not in (POLICY_FORMAT, POLICY_FORMAT_V1, POLICY_FORMAT_V3):
            problems.append(f"format: must be {POLICY_FORMAT!r} (or {POLICY_FORMAT_V1!r}, {POLICY_FORMAT_V3!r}), got "
                            f"{str(obj['format'])[:40]!r}")
        if v3 and isinstance(obj.get("stop"), list) and not obj["stop"]:
            problems.append(f"stop: an {POLICY_FORMAT_V3} policy has stop strings (a policy without any is "
                            f"{POLICY_FORMAT})")
        if not v1 and "dtype" in obj and obj["dtype"] is None:
            problems.append(f"dtype: must be one of {', '.join(SERVING_DTYPES)} (a policy that pins no serving dtype "
                            f"is an {POLICY_FORMAT_V1} policy)")
        problems += [p for p in policy_problems(obj) if p.split(":")[0] not in missing]
        if problems:
            raise InputError(f"{what} is not a valid {fmt}:\n  - " + "\n  - ".join(problems))
        extra = {} if v1 else {"dtype": obj["dtype"], "numerics": obj["numerics"]}
        if v3:
            extra["stop"] = tuple(obj["stop"])
        return cls(max_new_tokens=obj["max_new_tokens"], eos_token_ids=tuple(obj["eos_token_ids"]),
                   temperature=obj["temperature"], top_p=obj["top_p"], stop_rule=obj["stop_rule"],
                   chat_template=obj["chat_template"], **extra)

    @classmethod
    def load(cls, path: str | Path) -> "GenerationPolicy":
        from ..core import jsonio

        return cls.from_json(jsonio.read_json(path, MAX_POLICY_BYTES, "generation policy", InputError),
                             f"generation policy {path}")

    # --- comparing -------------------------------------------------------------------------
    def check(self, other: Any) -> list[str]:
        """The fields in which `other` differs from this policy (empty when equal). `other` is a
        GenerationPolicy, a policy document, or a record's `generation` member."""
        if isinstance(other, dict) and "policy" in other:
            other = other["policy"]
        if not isinstance(other, GenerationPolicy):
            other = GenerationPolicy.from_json(other, "the record's generation policy")
        # a policy without a dtype (v1) pins none: the dtype is then compared with the record's
        # model.dtype by whoever pins one (checks._check_policy), not field against field
        return [name for name in POLICY_FIELDS if getattr(self, name) != getattr(other, name)
                and not (name == "dtype" and None in (self.dtype, other.dtype))]

    def describe_differences(self, other: "GenerationPolicy", mine: str = "yours") -> list[str]:
        """One line per differing field: `temperature: the record's 3.0, yours 0.0`."""
        return [f"{name}: the record's {_show(getattr(other, name))}, {mine} {_show(getattr(self, name))}"
                for name in self.check(other)]

    # --- requests --------------------------------------------------------------------------
    def with_max_new_tokens(self, n: int) -> "GenerationPolicy":
        """This policy for a request asking `n` new tokens (at most the policy's)."""
        if not _is_int(n) or not 1 <= n <= self.max_new_tokens:
            raise InputError(f"max_new_tokens: the policy allows 1 to {self.max_new_tokens}, got {n!r}")
        return replace(self, max_new_tokens=n)

    def for_request(self, asked: dict[str, Any]) -> tuple["GenerationPolicy", list[str]]:
        """The policy of one request that restates some fields (`asked`: field -> value, absent
        fields omitted): max_new_tokens may be lower than the policy's, every other field must be
        the policy's. Returns the request's policy and the problems, one per field outside."""
        problems, policy = [], self
        for name, value in asked.items():
            if name not in POLICY_FIELDS:
                problems.append(f"{name}: not a field of the generation policy")
            elif name == "max_new_tokens":
                try:
                    policy = policy.with_max_new_tokens(value)
                except InputError as exc:
                    problems.append(str(exc))
            else:
                mine = getattr(self, name)
                given = value
                if name == "eos_token_ids" and isinstance(value, list) and all(_is_int(i) for i in value):
                    given = tuple(sorted(value))
                if name == "stop" and isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
                    given = tuple(sorted(value))
                if isinstance(mine, float) and _is_number(given):
                    given = float(given)
                if given != mine:
                    problems.append(f"{name}: the policy fixes {_show(mine)}, the request asks {_show(value)}")
        return policy, problems

    @classmethod
    def for_model(cls, model: Any, **values: Any) -> "GenerationPolicy":
        """A policy for `model` (a model or run directory, its config.json as a dict, or a loaded
        ServedModel): the end-of-sequence tokens of its config unless given, greedy, 32 tokens
        unless given, and the serving dtype unless given: a ServedModel's, a run's (its
        settings.dtype: the run's final model digest is over it), else the config's `dtype`
        (`torch_dtype` in older configs), else float32 (what aftune loads a plain directory in)."""
        dtype = None
        if hasattr(model, "hf_config") and isinstance(getattr(model, "dtype", None), str):
            model, dtype = model.hf_config, model.dtype  # a ServedModel: the dtype it is served in
        elif not isinstance(model, dict):
            from ..core import jsonio

            p = Path(model)
            if (p / "transcript.jsonl").is_file() and (p / "model" / "config.json").is_file():
                run = jsonio.read_json(p / "config.json", 16 << 20, "run config", InputError)
                settings = run.get("settings") if isinstance(run, dict) else None
                dtype = settings.get("dtype") if isinstance(settings, dict) else None
                p = p / "model"  # a run directory (its config.json is the run's): its fine-tuned model
            model = jsonio.read_json(p / "config.json", 16 << 20, "model config", InputError)
        if dtype is None and isinstance(model, dict):
            dtype = model.get("dtype", model.get("torch_dtype"))
        if "dtype" not in values:
            values["dtype"] = dtype if dtype in SERVING_DTYPES else "float32"
        values.setdefault("max_new_tokens", 32)
        if "eos_token_ids" not in values:
            values["eos_token_ids"] = tuple(config_eos_token_ids(model)) if values.get("stop_rule") != "length" else ()
        return cls(**values)


def config_eos_token_ids(hf_config: dict[str, Any]) -> list[int]:
    """The end-of-sequence tokens a Hugging Face config.json names (`eos_token_id`, int or list)."""
    eos = hf_config.get("eos_token_id")
    if _is_int(eos):
        return [eos]
    if isinstance(eos, list):
        return sorted({e for e in eos if _is_int(e) and 0 <= e <= MAX_TOKEN_ID})
    return []


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:40] + "…")
    if isinstance(value, tuple):
        return str(list(value))
    return repr(value)


# --- the client's request nonce ------------------------------------------------------------------

def check_request_nonce(nonce: Any, what: str = "request nonce") -> bytes:
    """A request nonce: 16 to 64 bytes (clients should use 32 random bytes)."""
    lo, hi = REQUEST_NONCE_BYTES
    if not isinstance(nonce, (bytes, bytearray)) or not lo <= len(nonce) <= hi:
        size = len(nonce) if isinstance(nonce, (bytes, bytearray)) else type(nonce).__name__
        raise InputError(f"{what}: must be {lo} to {hi} bytes, got {size} (make one with "
                         "`python3 -c 'import secrets; print(secrets.token_hex(32))'`)")
    return bytes(nonce)


def parse_request_nonce(text: Any, what: str = "request nonce") -> bytes:
    """A request nonce from hostile input: lowercase hex of 16 to 64 bytes."""
    if not isinstance(text, str) or len(text) % 2 or text.strip("0123456789abcdef"):
        raise InputError(f"{what}: expected lowercase hex digits, got {str(text)[:40]!r}")
    return check_request_nonce(bytes.fromhex(text), what)
