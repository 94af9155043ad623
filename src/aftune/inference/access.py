"""Who may use a server and read what (`aftune serve --api-keys FILE`, `aftune serve-keys`): bearer
API keys kept hashed in a file the provider keeps, and the index of which client owns which
record (SPEC.md 8.10).

    aftune serve-keys add alice --file api-keys.txt      # prints alice's key once; the file keeps its hash
    keys = ApiKeys.load("api-keys.txt"); keys.client_of("aftune_...")   # -> "alice" or None

The keys file has one client per line, `NAME sha256:<64 hex digits>` (SHA-256 of the key's UTF-8
bytes; a key is 32 random bytes, so a fast hash is enough), `#` comments and blank lines. The key
itself is never written anywhere. Record ownership is `R/access/<client>/<record id>` (an empty
file, created once): a client reads only the records, receipts and objects of its own records.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ..core import jsonio
from ..errors import InputError
from .record import RecordDir

KEY_PREFIX = "aftune_"
MAX_KEYS_FILE_BYTES = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh API key: `aftune_` and 43 URL-safe characters (32 random bytes)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_client_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"a client name is 1 to 64 of A-Z a-z 0-9 . _ - (starting with a letter or digit), "
                         f"got {str(name)[:70]!r}")
    return name


@dataclass(frozen=True)
class ApiKeys:
    """The clients of a server: name -> hash of its key."""

    clients: tuple[tuple[str, str], ...]  # (name, "sha256:<hex>"), in file order

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        """Read a keys file (the provider's own, but still checked line by line)."""
        p = Path(path)
        data = jsonio.read_bytes(p, MAX_KEYS_FILE_BYTES, "API keys file", InputError)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"API keys file {p} is not UTF-8 text") from None
        clients, problems, names, hashes = [], [], set(), set()
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not _NAME.fullmatch(parts[0]) or not _HASH.fullmatch(parts[1]):
                problems.append(f"line {number}: expected 'NAME sha256:<64 hex digits>' (a hash, never a key)")
            elif parts[0] in names or parts[1] in hashes:
                problems.append(f"line {number}: client {parts[0]!r} or its key hash is listed twice")
            else:
                names.add(parts[0])
                hashes.add(parts[1])
                clients.append((parts[0], parts[1]))
        if problems:
            raise InputError(f"API keys file {p}:\n  - " + "\n  - ".join(problems[:20]))
        if not clients:
            raise InputError(f"API keys file {p} lists no client: add one with `aftune serve-keys add NAME --file {p}`")
        return cls(tuple(clients))

    def client_of(self, key: str | None) -> str | None:
        """The client whose key this is, or None. Every entry is compared (in constant time)."""
        if not key:
            return None
        h = key_hash(key)
        found = None
        for name, stored in self.clients:
            if hmac.compare_digest(stored, h):
                found = name
        return found


def add_client(path: str | Path, name: str) -> str:
    """Add a client to a keys file (created with mode 0600) and return its new key, which is not
    stored anywhere: hand it to the client once."""
    check_client_name(name)
    p = Path(path)
    existing = ApiKeys.load(p).clients if p.is_file() and _has_clients(p) else ()
    if any(n == name for n, _ in existing):
        raise InputError(f"client {name!r} is already in {p}: remove it first (`aftune serve-keys remove`)")
    key = new_key()
    lines = [] if p.is_file() else ["# aftune API keys: NAME sha256:<hex of the key>; the keys themselves are "
                                    "never stored"]
    _append(p, lines + [f"{name} {key_hash(key)}"])
    return key


def remove_client(path: str | Path, name: str) -> None:
    p = Path(path)
    keys = ApiKeys.load(p)
    if not any(n == name for n, _ in keys.clients):
        raise InputError(f"client {name!r} is not in {p}")
    text = "\n".join(line for line in p.read_text(encoding="utf-8").splitlines()
                     if line.split()[:1] != [name]) + "\n"
    _write_private(p, text)


def _has_clients(p: Path) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in p.read_text(encoding="utf-8").splitlines())


def _append(p: Path, lines: list[str]) -> None:
    old = p.read_text(encoding="utf-8") if p.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    _write_private(p, old + "\n".join(lines) + "\n")


def _write_private(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
    try:
        os.chmod(tmp, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    finally:
        Path(tmp).unlink(missing_ok=True)


class RecordOwners:
    """Which client owns which record: R/access/<client>/<record id>. Thread-safe; the objects a
    client may fetch (those its records commit) are collected once per client, then kept up to date."""

    def __init__(self, records: RecordDir):
        self.records = records
        self.root = records.root / "access"
        self._lock = threading.Lock()
        self._objects: dict[str, set[bytes]] = {}

    def _path(self, client: str, rid: bytes) -> Path:
        return self.root / check_client_name(client) / rid.hex()

    def add(self, client: str, rid: bytes) -> None:
        """Give `client` the record `rid` (written by this server)."""
        path = self._path(client, rid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        with self._lock:
            if client in self._objects:
                self._objects[client] |= self._digests(rid)
            else:
                self._objects[client] = self._collect(client)

    def owns(self, client: str, rid: bytes) -> bool:
        return self._path(client, rid).is_file()

    def may_read_object(self, client: str, digest: bytes) -> bool:
        with self._lock:
            if client not in self._objects:
                self._objects[client] = self._collect(client)
            return digest in self._objects[client]

    def _digests(self, rid: bytes) -> set[bytes]:
        return self.records.row_digests(rid)

    def _collect(self, client: str) -> set[bytes]:
        found: set[bytes] = set()
        d = self.root / check_client_name(client)
        if d.is_dir():
            for p in d.iterdir():
                if len(p.name) == 64 and not p.name.strip("0123456789abcdef"):
                    found |= self._digests(bytes.fromhex(p.name))
        return found
