"""The host side: starts the trusted process and the untrusted worker, and runs sessions.

    from aftune.partition import PartitionRuntime, StrategyConfig
    with PartitionRuntime() as rt:                       # two spawned processes
        result = rt.run("models/llama", strategy="shield-nonlinear", input_ids=ids, max_new_tokens=8)
        result.tokens, result.exposure.fractions(), result.timing["freivalds"]

Processes (multiprocessing, spawn start method: fresh interpreters, no inherited memory):

    host (this process) --control socket--> trusted process --worker socket--> untrusted worker
                        `--adversary pipe (TamperingWorker only) ----------------^

The host never talks to the worker (except to steer a test adversary); it hands the trusted side
paths and inputs and receives outputs. The sockets are AF_UNIX in a private temporary directory
(or loopback TCP with `transport="tcp"`), authenticated with a random key (multiprocessing's
HMAC challenge). `trusted_command` starts the trusted side as a program instead (e.g.
`["gramine-sgx", "aftune-partition"]` with `transport="tcp"`, see docs/partition.md, or
`python_command()` for the plain interpreter);
`device="cuda"` puts the worker's products on the GPU.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.signing import PublicKey
from ..errors import InputError
from .errors import IntegrityFailure, PartitionError
from .link import connect, free_tcp_address
from .offload import Arithmetic
from .record import PartitionRecord
from .requests import RunRequest
from .strategies import Exposure, StrategyConfig
from .wire import FrameError, decode, encode
from .worker import Worker

MAX_OUTCOME_FRAME = 1 << 36


@dataclass(frozen=True)
class Reference:
    tokens: tuple[int, ...]
    label: int | None
    logits: tuple[torch.Tensor, ...]
    seconds: float


@dataclass(frozen=True)
class PartitionResult:
    strategy: str
    tokens: tuple[int, ...]  # causal LMs
    label: int | None  # classifiers
    logits: tuple[torch.Tensor, ...]  # per step, computed by the trusted side
    record: PartitionRecord
    timing: dict[str, float]  # seconds: offline, online, quantize, blinding, freivalds, transfer, shielded, reference
    traffic: dict[str, int]  # messages, bytes, bytes_to_worker, bytes_from_worker
    exposure: Exposure
    error_bounds: dict[str, float]  # per offloaded site: largest dequantization error bound of an output
    reference: Reference | None
    crossings: dict[str, torch.Tensor] | None
    stats: dict[str, Any]


class PartitionRuntime:
    """A trusted process and an untrusted worker, kept for many sessions (close() ends them)."""

    def __init__(self, *, worker_class: type = Worker, device: str = "cpu", threads: int | None = 1,
                 key_path: str | Path | None = None, trusted_command: list[str] | None = None,
                 transport: str = "unix", timeout_s: float = 300.0):
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise InputError(f"worker device must be cpu or cuda[:N], got {device!r}")
        if transport not in ("unix", "tcp"):
            raise InputError(f"transport must be unix (default) or tcp (loopback; needed by Gramine), got {transport!r}")
        self.transport = transport
        self.worker_class, self.device, self.threads = worker_class, device, threads
        self.key_path = str(key_path) if key_path else None
        self.trusted_command, self.timeout_s = trusted_command, timeout_s
        self._dir: tempfile.TemporaryDirectory | None = None
        self._worker = self._trusted = self._control = self._adversary = None
        self.public_key: PublicKey | None = None
        self._broken: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> PartitionRuntime:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="aftune-partition-")
        os.chmod(self._dir.name, 0o700)
        if self.transport == "unix":
            worker_addr, control_addr = (f"unix:{os.path.join(self._dir.name, n)}" for n in ("w.sock", "c.sock"))
        else:  # Gramine's AF_UNIX sockets do not cross the enclave boundary: loopback TCP
            worker_addr, control_addr = free_tcp_address(), free_tcp_address()
        authkey = os.urandom(32)
        from .worker import worker_main

        adversary_host, adversary_worker = ctx.Pipe()
        self._adversary = adversary_host
        self._worker = ctx.Process(target=worker_main, name="aftune-untrusted-worker", daemon=True,
                                   args=(worker_addr, authkey, adversary_worker, self.worker_class, self.device,
                                         self.threads))
        self._worker.start()
        if self.trusted_command is None:
            from .trusted import trusted_main

            self._trusted = ctx.Process(target=trusted_main, name="aftune-trusted", daemon=True,
                                        args=(control_addr, worker_addr, authkey, self.key_path, self.threads,
                                              self.timeout_s))
            self._trusted.start()
            alive = self._trusted.is_alive
        else:
            env = {**os.environ, "AFTUNE_PARTITION_CONTROL": control_addr, "AFTUNE_PARTITION_WORKER": worker_addr,
                   "AFTUNE_PARTITION_AUTHKEY": authkey.hex(), "AFTUNE_PARTITION_KEY": self.key_path or "",
                   "AFTUNE_PARTITION_THREADS": str(self.threads or ""), "AFTUNE_PARTITION_TIMEOUT": str(self.timeout_s)}
            self._trusted = subprocess.Popen(list(self.trusted_command), env=env)  # runs aftune.partition.trusted
            alive = lambda: self._trusted.poll() is None
        self._control = connect(control_addr, authkey, timeout_s=self.timeout_s, alive=alive)
        hello = self._receive()
        if hello.kind != "hello":
            raise PartitionError(f"the trusted process answered {hello.kind!r} instead of hello")
        self.public_key = PublicKey.from_text(str(hello.fields["public_key"]))

    def close(self) -> None:
        if self._control is not None:
            try:
                self._control.send_bytes(encode("shutdown"))
            except OSError:
                pass  # already gone: nothing to shut down
            self._control.close()
            self._control = None
        for proc in (self._trusted, self._worker):
            if proc is None:
                continue
            if isinstance(proc, subprocess.Popen):
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
        self._trusted = self._worker = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def instruct_worker(self, attack) -> None:
        """Steer a TamperingWorker (dishonest.py): the host plays the adversary."""
        self._adversary.send_bytes(attack.frame())

    # --- sessions ----------------------------------------------------------------------------
    def run(self, model: str | Path, *, strategy: str | StrategyConfig, input_ids: torch.Tensor | None = None,
            pixel_values: torch.Tensor | None = None, backbone: str | Path | None = None, max_new_tokens: int = 8,
            arithmetic: Arithmetic | None = None, store_crossings: bool = False, reference: bool = False,
            unsafe_unchecked: bool = False, hash_algorithm: str = "blake3", dtype: str = "float32",
            attn_implementation: str = "sdpa") -> PartitionResult:
        """One session; raises IntegrityFailure (with the signed record) if the worker cheated.
        `reference=True` also runs the unpartitioned model in the trusted process, timed, on the
        same input (`result.reference`): for tests and benchmarks, it doubles the trusted work."""
        if self._control is None:
            raise PartitionError("the runtime is not started (use `with PartitionRuntime() as rt:`)")
        if self._broken:
            raise PartitionError(f"this runtime is unusable after: {self._broken}; start a new one")
        if (input_ids is None) == (pixel_values is None):
            raise InputError("give exactly one input: input_ids (causal LM) or pixel_values (vision)")
        config = strategy if isinstance(strategy, StrategyConfig) else StrategyConfig(strategy)
        req = RunRequest(str(model), config, str(backbone) if backbone else None, max_new_tokens,
                         arithmetic or Arithmetic(), hash_algorithm, dtype, attn_implementation, store_crossings,
                         reference, unsafe_unchecked)
        x = input_ids if input_ids is not None else pixel_values
        try:
            self._control.send_bytes(encode("run", req.to_fields(), {"input": x}))
        except OSError as exc:
            self._broken = f"the trusted process is gone ({exc})"
            raise PartitionError(self._broken) from None
        msg = self._receive()
        if msg.kind == "error":
            reason = str(msg.fields.get("reason"))
            if msg.fields.get("error") == "input":
                raise InputError(reason)
            if msg.fields.get("error") == "internal":
                self._broken = "an internal error in the trusted process"
                raise RuntimeError(f"internal error in the trusted process:\n{reason}")
            self._broken = reason
            raise PartitionError(reason)
        return self._result(config, msg)

    def _receive(self):
        try:
            if not self._control.poll(self.timeout_s):
                self._broken = f"no answer from the trusted process within {self.timeout_s:.0f} s"
                raise PartitionError(self._broken)
            return decode(self._control.recv_bytes(), max_bytes=MAX_OUTCOME_FRAME)
        except (EOFError, OSError) as exc:
            self._broken = f"the trusted process closed its connection ({exc or 'EOF'})"
            raise PartitionError(self._broken) from None
        except FrameError as exc:
            self._broken = f"bad frame from the trusted process: {exc}"
            raise PartitionError(self._broken) from None

    def _result(self, config: StrategyConfig, msg) -> PartitionResult:
        f, t = msg.fields, msg.tensors
        record = PartitionRecord(bytes(t["record"].numpy().tobytes()), bytes(t["signature"].numpy().tobytes()),
                                 PublicKey.from_text(str(f["public_key"])))
        outcome = f["outcome"]
        crossings = {k: v for k, v in t.items() if k.startswith("crossing/")}
        if outcome["verdict"] != "PASS":
            raise IntegrityFailure(outcome["site"], outcome["step"], outcome["check"], outcome["reason"], record,
                                   crossings or None)
        stats = f["stats"]
        e = stats["exposure"]
        exp = Exposure(**{k: v for k, v in e.items() if k not in ("notes", "fractions")}, notes=tuple(e["notes"]))
        ref = None
        if f["reference"] is not None:
            r = f["reference"]
            ref = Reference(tuple(r["tokens"]), r["label"], _series(t, "reference_logits/"), float(r["seconds"]))
        out = f["output"]
        return PartitionResult(config.name, tuple(out.get("tokens", ())), out.get("label"), _series(t, "logits/"),
                               record, stats["timing"], stats["traffic"], exp, stats["error_bounds"], ref,
                               crossings if crossings else None, stats)


def _series(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, ...]:
    return tuple(tensors[k] for k in sorted(k for k in tensors if k.startswith(prefix)))


def python_command() -> list[str]:
    """The trusted side as a plain program, without a TEE (tests, debugging)."""
    return [sys.executable, "-m", "aftune.partition.trusted"]
