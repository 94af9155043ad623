"""The trusted side's end of the channel to the worker: every crossing is counted and committed.

    ledger = CrossingLedger("blake3", store=True)
    link = WorkerLink(conn, ledger, timeout_s=120)
    link.send("product", "lm_head", step, operand)
    reply = link.receive("result", "lm_head", step)     # IntegrityFailure on a malformed answer

Each message carries exactly one tensor (control messages an empty I64 [0]); crossing n of a
session is committed as `tensor_digest("crossing/{n:06d}/{site}/{direction}", tensor)`, and the
ledger's rows (kind, step, dtype, shape, frame bytes, digest) go into the signed record
(SPEC.md 11.5). The digest is taken of what was parsed from the worker's frame *before* any
check, so a wrong answer is committed as evidence. Bytes are counted as the frame's length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from ..core.encoding import dtype_name, tensor_digest
from ..core.merkle import merkle_root
from .errors import IntegrityFailure, PartitionError
from .wire import FrameError, Message, decode, encode

TO_WORKER, FROM_WORKER = "to-worker", "from-worker"
EMPTY = torch.zeros(0, dtype=torch.int64)


@dataclass(frozen=True)
class Crossing:
    index: int
    site: str
    direction: str
    kind: str
    step: int
    dtype: str
    shape: tuple[int, ...]
    frame_bytes: int
    digest: bytes

    @property
    def name(self) -> str:
        return crossing_name(self.index, self.site, self.direction)

    def to_row(self) -> list:
        return [self.index, self.site, self.direction, self.kind, self.step, self.dtype, list(self.shape),
                self.frame_bytes, self.digest.hex()]


def crossing_name(index: int, site: str, direction: str) -> str:
    return f"crossing/{index:06d}/{site}/{direction}"


class CrossingLedger:
    """The session's crossings in order, with their digests (and tensors when `store`)."""

    def __init__(self, algorithm: str, *, store: bool = False):
        self.algorithm, self.store = algorithm, store
        self.crossings: list[Crossing] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def commit(self, direction: str, kind: str, site: str, step: int, tensor: torch.Tensor, frame_bytes: int) -> Crossing:
        index = len(self.crossings)
        name = crossing_name(index, site, direction)
        c = Crossing(index, site, direction, kind, step, dtype_name(tensor.dtype), tuple(int(d) for d in tensor.shape),
                     frame_bytes, tensor_digest(name, tensor, self.algorithm))
        self.crossings.append(c)
        if self.store:
            self.tensors[name] = tensor.detach().cpu().contiguous().clone()
        return c

    def root(self) -> bytes:
        return merkle_root(self.algorithm, {c.name: c.digest for c in self.crossings})

    def totals(self) -> dict[str, int]:
        out = {"messages": len(self.crossings), "bytes": sum(c.frame_bytes for c in self.crossings)}
        for d in (TO_WORKER, FROM_WORKER):
            out[f"bytes_{d.replace('-', '_')}"] = sum(c.frame_bytes for c in self.crossings if c.direction == d)
        return out


class WorkerLink:
    """Send and receive on the worker's pipe; waits are timed in `seconds`."""

    def __init__(self, conn: Connection, ledger: CrossingLedger, *, timeout_s: float, max_frame_bytes: int = 1 << 34):
        self.conn, self.ledger = conn, ledger
        self.timeout_s, self.max_frame_bytes = timeout_s, max_frame_bytes
        self.seconds = 0.0  # time spent sending, waiting and receiving (includes the worker's compute)

    def send(self, kind: str, site: str, step: int, tensor: torch.Tensor = EMPTY,
             fields: dict[str, Any] | None = None) -> None:
        t0 = time.perf_counter()
        frame = encode(kind, {"site": site, "step": step, **(fields or {})}, {"tensor": tensor})
        self.ledger.commit(TO_WORKER, kind, site, step, tensor, len(frame))
        try:
            self.conn.send_bytes(frame)
        except (OSError, ValueError) as exc:
            raise PartitionError(f"cannot send {kind} for layer {site}, step {step} to the worker: {exc}") from None
        self.seconds += time.perf_counter() - t0

    def receive(self, kind: str, site: str, step: int) -> Message:
        """The worker's next message, which must be `kind` for this site and step with one tensor."""
        t0 = time.perf_counter()
        try:
            if not self.conn.poll(self.timeout_s):
                raise PartitionError(f"the worker did not answer within {self.timeout_s:.0f} s at layer {site}, step {step}")
            frame = self.conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise PartitionError(f"the worker's pipe closed at layer {site}, step {step}: {exc or 'EOF'}") from None
        self.seconds += time.perf_counter() - t0
        try:
            msg = decode(frame, max_bytes=self.max_frame_bytes)
            tensor = msg.tensor("tensor")
        except FrameError as exc:
            raise IntegrityFailure(site, step, "frame", f"the worker's answer is not a valid frame: {exc}") from None
        self.ledger.commit(FROM_WORKER, msg.kind, site, step, tensor, len(frame))
        if msg.kind == "error":
            raise IntegrityFailure(site, step, "worker-error", f"the worker reported: {str(msg.fields.get('reason'))[:300]}")
        if msg.kind != kind or msg.fields.get("site") != site or msg.fields.get("step") != step or len(msg.tensors) != 1:
            raise IntegrityFailure(site, step, "order", f"expected a {kind!r} answer for this layer and step, got "
                                   f"{msg.kind!r} for layer {str(msg.fields.get('site'))[:100]}, "
                                   f"step {str(msg.fields.get('step'))[:20]}")
        return msg


def _socket_address(address: str) -> tuple[str, object]:
    """("AF_UNIX", path) for "unix:PATH", ("AF_INET", (host, port)) for "tcp:HOST:PORT"."""
    if address.startswith("unix:"):
        return "AF_UNIX", address[5:]
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        if host not in ("127.0.0.1", "localhost") or not port.isdigit():
            raise PartitionError(f"tcp addresses must be tcp:127.0.0.1:PORT (loopback only), got {address!r}")
        return "AF_INET", (host, int(port))
    raise PartitionError(f"an address is unix:PATH or tcp:127.0.0.1:PORT, got {address!r}")


def listen(address: str, authkey: bytes):
    """A multiprocessing Listener on `address` (callers use it as a context manager)."""
    from multiprocessing.connection import Listener

    family, where = _socket_address(address)
    return Listener(where, family=family, authkey=authkey)


def free_tcp_address() -> str:
    """A loopback port free right now (the runtime picks the trusted side's and the worker's)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp:127.0.0.1:{s.getsockname()[1]}"


def connect(address: str, authkey: bytes, *, timeout_s: float, alive=None) -> Connection:
    """A client connection to a listener that may not exist yet (a process still starting):
    retried until `timeout_s`, or until `alive()` says the listening process died."""
    import os
    from multiprocessing.connection import Client

    family, where = _socket_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        if family == "AF_INET" or os.path.exists(where):
            try:
                return Client(where, family=family, authkey=authkey)
            except (ConnectionRefusedError, FileNotFoundError):
                pass
        if alive is not None and not alive():
            raise PartitionError(f"the process that should listen on {address} exited before accepting")
        if time.monotonic() > deadline:
            raise PartitionError(f"nothing accepted a connection on {address} within {timeout_s:.0f} s")
        time.sleep(0.02)


def exit_process() -> None:
    """End a partition process without the interpreter's teardown (seconds with torch loaded):
    its session is over and nothing but stdout and stderr is buffered."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
