"""Ed25519 keys and signatures (SPEC.md 2.6).

A signature covers TAG_SIGNATURE || length-prefixed context || message, so a signature made for
one purpose (a step-block root) can never be replayed as another (a receipt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .encoding import TAG_SIGNATURE, length_prefixed
from ..errors import InputError

PUBLIC_KEY_PREFIX = "ed25519:"


def signed_message(context: str, message: bytes) -> bytes:
    return TAG_SIGNATURE + length_prefixed(context.encode("ascii")) + message


def _shown_name(given: str) -> str:
    """`given`, a file name that names no file, as an error message may show it: not at all when it
    may be key material pasted in place of a path (a PEM block, or a long run of base64 or hex
    characters with no '.'), so that a private key given by mistake is never echoed."""
    if ("PRIVATE KEY" in given or any(c.isspace() or not c.isprintable() for c in given)
            or (len(given) >= 32 and "." not in given
                and all(c.isalnum() or c in "+/=_-" for c in given))):
        return f"(the {len(given)} characters given are not shown: they may be key material)"
    return given


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    def __post_init__(self):
        if len(self.raw) != 32:
            raise InputError(f"an Ed25519 public key has 32 bytes, got {len(self.raw)}")

    @property
    def text(self) -> str:
        return PUBLIC_KEY_PREFIX + self.raw.hex()

    @classmethod
    def from_text(cls, text: str) -> "PublicKey":
        # never echo what was given: it may be a private key passed by mistake
        text = text.strip()
        if not text.startswith(PUBLIC_KEY_PREFIX):
            what = "a private key" if "PRIVATE KEY" in text else f"{len(text)} characters of something else"
            raise InputError(f"a public key looks like '{PUBLIC_KEY_PREFIX}<64 hex digits>'; this is {what} (its "
                             "content is not shown)")
        try:
            return cls(bytes.fromhex(text[len(PUBLIC_KEY_PREFIX):]))
        except ValueError:
            raise InputError(f"a public key looks like '{PUBLIC_KEY_PREFIX}<64 hex digits>'; this one's digits are "
                             "not hex (its content is not shown)") from None

    @classmethod
    def load(cls, path_or_text: "str | Path | PublicKey") -> "PublicKey":
        """A key given inline ('ed25519:...'), as a file holding that text, or already loaded."""
        if isinstance(path_or_text, PublicKey):
            return path_or_text
        if not isinstance(path_or_text, (str, Path)):
            raise InputError(f"a public key is a .pub path, 'ed25519:<hex>' or a PublicKey, not a "
                             f"{type(path_or_text).__name__}")
        s = str(path_or_text)
        if s.startswith(PUBLIC_KEY_PREFIX):
            return cls.from_text(s)
        p = Path(s)
        try:
            found = p.is_file()
        except (OSError, ValueError):  # a name too long for a path, or with a NUL byte: not a path
            found = False
        if not found:
            raise InputError(f"public key file {_shown_name(s)} does not exist (pass the provider's .pub file or "
                             "'ed25519:<hex>')")
        return cls.from_text(p.read_text(encoding="utf-8", errors="replace")[:200])

    def verify(self, context: str, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, signed_message(context, message))
            return True
        except InvalidSignature:
            return False


class SigningKey:
    """The provider's private key. Stored as PKCS#8 PEM with mode 0600."""

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> "SigningKey":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"signing key {p} does not exist (create one with `aftune keygen {p}`)")
        try:
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{p} is not a PEM Ed25519 private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InputError(f"{p} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def save(self, path: str | Path) -> Path:
        """Write the private key (0600) and `<path>.pub`; returns the public key's path."""
        p = Path(path)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub = p.with_name(p.name + ".pub")
        pub.write_text(self.public_key.text + "\n", encoding="utf-8")
        return pub

    @property
    def public_key(self) -> PublicKey:
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey(raw)

    def sign(self, context: str, message: bytes) -> bytes:
        return self._key.sign(signed_message(context, message))
