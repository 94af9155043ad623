"""What a client expects, given once: its keys, its agreement, its ids, and each weakening of a
check as an explicitly named `Unsafe...` object.

    verifier = RunVerifier("agreement.json", "provider.key.pub")                 # everything checked
    verifier = RunVerifier(None, "provider.key.pub", unsafe=[UnsafeNoAgreement()])  # says what is not

Every value a workflow takes may be given the way a user holds it (a path, `ed25519:<hex>`, a
hex id, a loaded object); `public_key`, `agreement`, `generation_policy`, `request_nonce` and
`record_id` turn each into the one type the library uses, or raise an `InputError` naming it.
An `Unsafe...` object is the only way to skip a check, and each says in words (`note`) what was
not checked; the report carries that sentence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.signing import PublicKey
from ..errors import InputError
from ..training.conformance import NO_AGREEMENT_NOTE


@dataclass(frozen=True)
class Unsafe:
    """A named weakening of one check. `flag` is the CLI's name for it; `note` what goes unchecked."""

    flag = ""
    note = ""


@dataclass(frozen=True)
class UnsafeNoAgreement(Unsafe):
    """Verify a training run without the client's agreement: only self-consistency is checked."""

    flag = "--unsafe-no-agreement"
    note = NO_AGREEMENT_NOTE  # the verifier's own note, which the report carries


@dataclass(frozen=True)
class UnsafeSkipInputCheck(Unsafe):
    """Verify an inference record without comparing its input with the client's."""

    flag = "--unsafe-skip-input-check"
    note = "the input was not compared with yours: the record may answer another input"


@dataclass(frozen=True)
class UnsafeSkipPolicyCheck(Unsafe):
    """Verify a causal-LM record without comparing its generation policy and request nonce."""

    flag = "--unsafe-skip-policy-check"
    note = "the generation policy and request nonce were not compared with yours"


@dataclass(frozen=True)
class UnsafeSignatureOnly(Unsafe):
    """Check a receipt's signature without the record it names."""

    flag = "--unsafe-signature-only"
    note = "only the receipt's signature was checked, not the record it names"


def unsafe_set(unsafe: Iterable[Unsafe] | Unsafe | None, allowed: tuple[type, ...]) -> frozenset[type]:
    """The kinds of Unsafe given, each one a workflow accepts (InputError otherwise)."""
    if unsafe is None:
        return frozenset()
    items = [unsafe] if isinstance(unsafe, Unsafe) else list(unsafe)
    for u in items:
        if not isinstance(u, allowed):
            names = ", ".join(a.__name__ for a in allowed) or "none"
            raise InputError(f"unsafe= takes Unsafe... objects this workflow knows ({names}), not {u!r}")
    return frozenset(type(u) for u in items)


def public_key(key: Any, what: str = "the provider's public key") -> PublicKey:
    """A public key from a `PublicKey`, a path to a .pub file, or 'ed25519:<hex>'."""
    if key is None:
        raise InputError(f"give {what}: a .pub path, 'ed25519:<hex>' or a PublicKey")
    return PublicKey.load(key)


def agreement(value: Any):
    """An `Agreement` from an Agreement or the path of agreement.json (None stays None)."""
    from ..training.agreement import Agreement

    if value is None or isinstance(value, Agreement):
        return value
    if isinstance(value, (str, Path)):
        return Agreement.load(value)
    raise InputError(f"an agreement is an Agreement or the path of agreement.json, not a {type(value).__name__}")


def generation_policy(value: Any):
    """A `GenerationPolicy` from one, its JSON document, or the path of a policy file."""
    from ..core import jsonio
    from ..inference.policy import GenerationPolicy

    if value is None or isinstance(value, GenerationPolicy):
        return value
    if isinstance(value, dict):
        return GenerationPolicy.from_json(value)
    if isinstance(value, (str, Path)):
        return GenerationPolicy.from_json(jsonio.read_json(value, 1 << 20, "generation policy", InputError),
                                          f"generation policy {value}")
    raise InputError(f"a generation policy is a GenerationPolicy, its JSON or a file path, not a {type(value).__name__}")


def request_nonce(value: Any) -> bytes | None:
    """The client's request nonce from bytes or hex text."""
    from ..inference.policy import check_request_nonce, parse_request_nonce

    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return check_request_nonce(bytes(value))
    if isinstance(value, str):
        return parse_request_nonce(value.strip().lower(), "request_nonce")
    raise InputError(f"a request nonce is hex text or bytes, not a {type(value).__name__}")


def record_id(value: Any) -> str | None:
    """A record id as hex text (a unique prefix is allowed; bytes are turned into hex)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, str):
        return value.strip().lower()
    raise InputError(f"a record id is hex text, not a {type(value).__name__}")
