"""The trusted process: holds the models, the signing key and every secret; runs sessions.

Started by `PartitionRuntime` (spawn), or as its own program, e.g. under Gramine-SGX:

    AFTUNE_PARTITION_CONTROL=tcp:127.0.0.1:7001 AFTUNE_PARTITION_WORKER=tcp:127.0.0.1:7002 \\
    AFTUNE_PARTITION_AUTHKEY=<hex> gramine-sgx aftune-partition      # manifest: docs/partition.md

It connects to the worker's socket, listens for the runtime's control connection, and answers
each `run` request with an `outcome` (wire.py frames both ways: nothing is unpickled). A session:

1. load the model (and the public backbone for teeslice) from disk; digest its weights;
2. place every linear site by the strategy (strategies.py);
3. offline: trace the row counts on an all-zero input of the same shape, send the exposed
   quantized weights, draw the Freivalds secrets, precompute the one-time masks;
4. online: run the Hugging Face model with the proxies installed (offload.py);
5. optionally run the unpartitioned model on the same input (the reference, timed);
6. sign a record of every crossing (record.py) and answer with the output, statistics and,
   when asked, the crossings themselves.

An `IntegrityFailure` ends the session: the outcome is FAIL with a signed record whose last
crossing is the rejected answer. Process isolation is all this gives on a machine without a TEE.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from ..core.encoding import tensor_digest
from ..core.merkle import tensors_root
from ..core.signing import SigningKey
from ..errors import AftuneError, InputError
from .errors import IntegrityFailure
from .execute import classify, decode_steps, generate
from .link import CrossingLedger, WorkerLink, connect, exit_process, listen
from .offload import Offloader
from .record import sign_record, new_body
from .requests import RunRequest
from .strategies import exposure, find_sites, make_plan
from .teeslice import backbone_slices
from .wire import FrameError, decode, encode

MAX_CONTROL_FRAME = 1 << 32


@dataclass
class _Loaded:
    hf_config: dict
    model: torch.nn.Module
    digest: bytes
    family: str
    task: str


class TrustedSide:
    def __init__(self, control: Connection, worker: Connection, key: SigningKey, *, timeout_s: float):
        self.control, self.worker, self.key, self.timeout_s = control, worker, key, timeout_s
        self._models: dict[tuple, _Loaded] = {}

    def serve(self) -> None:
        self.control.send_bytes(encode("hello", {"public_key": self.key.public_key.text}))
        while True:
            try:
                frame = self.control.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                msg = decode(frame, max_bytes=MAX_CONTROL_FRAME)
            except FrameError as exc:
                self.control.send_bytes(encode("error", {"error": "input", "reason": f"bad request frame: {exc}"}))
                continue
            if msg.kind == "shutdown":
                return
            try:
                reply = self.run(RunRequest.from_fields(msg.fields), msg.tensor("input"))
            except (AftuneError, FrameError) as exc:
                reply = encode("error", {"error": "partition" if not isinstance(exc, InputError) else "input",
                                         "reason": str(exc)})
            except BaseException as exc:  # a bug: report it, then die with it
                self.control.send_bytes(encode("error", {"error": "internal", "reason": "".join(
                    traceback.format_exception(exc))[-4000:]}))
                raise
            self.control.send_bytes(reply)

    # --- one session -------------------------------------------------------------------------
    def _load(self, path: str, req: RunRequest) -> _Loaded:
        key = (os.path.realpath(path), req.dtype, req.attn_implementation, req.hash_algorithm)
        if key not in self._models:
            from ..models import load_pretrained, model_weights
            from ..core.encoding import DTYPE_BY_NAME

            hf_config, model = load_pretrained(path, req.attn_implementation, DTYPE_BY_NAME[req.dtype])
            model.eval()
            family = str(hf_config.get("model_type"))
            task = "causal_lm" if family in ("llama", "qwen2", "qwen3", "mistral", "gpt2") else "classification"
            if family in ("bert", "dinov2"):
                raise InputError(f"{family} models are not supported by partitioned execution yet "
                                 "(decoder LMs, ViT and ResNet are)")
            digest, _ = tensors_root(req.hash_algorithm, model_weights(model))
            self._models[key] = _Loaded(hf_config, model, digest, family, task)
        return self._models[key]

    def run(self, req: RunRequest, inputs: torch.Tensor) -> bytes:
        lm = self._load(req.model, req)
        _check_input(lm, inputs)
        sites = find_sites(lm.model, lm.family)
        n_layers = _n_layers(lm)
        slices = public = changed = None
        backbone_digest = None
        if req.strategy.name == "teeslice" and req.backbone is not None:
            bb = self._load(req.backbone, req)
            slices, public = backbone_slices(lm.model, bb.model, sites, tolerance=req.strategy.slice_tolerance)
            changed, backbone_digest = set(slices), bb.digest.hex()
        plan = make_plan(sites, req.strategy, n_layers, changed)
        whole = req.strategy.name == "none-shielded"
        if whole and not req.unsafe_unchecked:
            raise InputError("none-shielded runs the whole model on the worker and checks nothing: pass "
                             "unsafe_unchecked=True (--unsafe-unchecked) to run this baseline")
        ledger = CrossingLedger(req.hash_algorithm, store=req.store_crossings)
        link = WorkerLink(self.worker, ledger, timeout_s=self.timeout_s)
        off = Offloader(lm.model, plan, link, req.arithmetic, slices=slices, public_weights=public,
                        magnitude_fraction=req.strategy.magnitude_fraction)
        timers = off.timers
        reference = self._reference(lm, req, inputs, off) if req.reference else None
        failure: IntegrityFailure | None = None
        tokens: list[int] = []
        logits: list[torch.Tensor] = []
        label = None
        traced: dict[str, int] = {}
        try:  # a rejected answer (offline or online) ends the session with a signed FAIL record
            with timers.time("offline"):
                link.send("session", "session", -1, fields={"modulus": req.arithmetic.field.modulus})
                traced = self._trace(lm, req, inputs, off)
                if whole:
                    self._send_model(link, lm, req)
                else:
                    off.offline(traced)
            off.reset_rows()
            link.seconds = 0.0  # from here on: the online phase's waits only
            with timers.time("online"):
                if whole:
                    tokens, logits, label = self._run_on_worker(link, lm, req, inputs)
                else:
                    with off.installed():
                        tokens, logits, label = _infer(lm, req, inputs, on_step=lambda k: setattr(off, "step", k))
            link.send("end", "session", -1)
        except IntegrityFailure as exc:
            failure = exc
        rows = traced if whole else off.site_rows()
        exp = exposure(plan, lm.model, rows, shielded_elements=off.shielded_elements(),
                       slice_ranks=off.slice_ranks(), blinded=not req.arithmetic.unsafe_no_blinding)
        output = {"tokens": tokens} if lm.task == "causal_lm" else {"label": label}
        outcome = {"verdict": "PASS", "site": None, "step": None, "check": None, "reason": None} if failure is None \
            else {"verdict": "FAIL", "site": failure.site, "step": failure.step, "check": failure.check,
                  "reason": failure.reason}
        body = new_body(
            hash=req.hash_algorithm,
            model={"digest": lm.digest.hex(), "family": lm.family, "dtype": req.dtype,
                   "attn_implementation": req.attn_implementation},
            backbone=None if backbone_digest is None else {"digest": backbone_digest},
            strategy=req.strategy.to_json(), plan=plan.to_json()["sites"], arithmetic=req.arithmetic.to_json(),
            input={"kind": _input_kind(lm), "digest": tensor_digest(_input_kind(lm), inputs, req.hash_algorithm).hex()},
            output=output, outcome=outcome,
            crossings={"count": len(ledger.crossings), "bytes": ledger.totals()["bytes"], "root": ledger.root().hex(),
                       "rows": [c.to_row() for c in ledger.crossings]})
        record = sign_record(body, self.key)
        timing = {k: float(v) for k, v in timers.items()}
        timing["transfer"] = link.seconds
        stats = {"timing": timing, "traffic": ledger.totals(), "exposure": _exposure_json(exp),
                 "error_bounds": off.error_bounds(), "output_max": off.output_max(), "masks_online": off.masks_online(),
                 "plan": plan.to_json(),
                 "slice_ranks": off.slice_ranks(), "shielded_elements": off.shielded_elements()}
        tensors: dict[str, torch.Tensor] = {
            "record": torch.frombuffer(bytearray(record.body), dtype=torch.uint8),
            "signature": torch.frombuffer(bytearray(record.signature), dtype=torch.uint8)}
        tensors.update({f"logits/{k:04d}": z.float() for k, z in enumerate(logits)})
        ref_fields = None
        if reference is not None:
            ref_tokens, ref_logits, ref_label, seconds = reference
            ref_fields = {"tokens": ref_tokens, "label": ref_label, "seconds": seconds}
            tensors.update({f"reference_logits/{k:04d}": z.float() for k, z in enumerate(ref_logits)})
        tensors.update(ledger.tensors)
        return encode("outcome", {"verdict": outcome["verdict"], "outcome": outcome, "output": output, "stats": stats,
                                  "reference": ref_fields, "public_key": self.key.public_key.text}, tensors)

    def _reference(self, lm: _Loaded, req: RunRequest, inputs: torch.Tensor, off: Offloader):
        """The unpartitioned model on the same input in this process, timed (no proxies)."""
        import time

        t0 = time.perf_counter()
        tokens, logits, label = _infer(lm, req, inputs)
        return tokens, logits, label, time.perf_counter() - t0

    def _trace(self, lm: _Loaded, req: RunRequest, inputs: torch.Tensor, off: Offloader) -> dict[str, int]:
        """Rows each site will process, from an all-zero input of the same shape (no data)."""
        off.tracing = True
        try:
            with off.installed(), torch.no_grad():
                if lm.task == "causal_lm":
                    lm.model(input_ids=torch.zeros_like(inputs), attention_mask=torch.ones_like(inputs), use_cache=False,
                             logits_to_keep=1)
                else:
                    lm.model(pixel_values=torch.zeros_like(inputs))
        finally:
            off.tracing = False
        rows = off.site_rows()
        off.reset_rows()
        if lm.task == "causal_lm":  # one more row per site for each decode step
            rows = {k: v + req.max_new_tokens - 1 for k, v in rows.items()}
        return rows

    def _send_model(self, link: WorkerLink, lm: _Loaded, req: RunRequest) -> None:
        from ..models import model_weights

        link.send("model", "model", -1, fields={"config": lm.hf_config, "dtype": req.dtype, "task": lm.task,
                                                "attn_implementation": req.attn_implementation})
        for name, t in model_weights(lm.model).items():
            link.send("parameter", name, -1, t.detach())
        link.send("build", "model", -1)  # the worker builds the model now, not during the first step
        link.receive("built", "model", -1)

    def _run_on_worker(self, link: WorkerLink, lm: _Loaded, req: RunRequest, inputs: torch.Tensor):
        def forward(step: int, x: torch.Tensor) -> torch.Tensor:
            link.send("forward", "model", step, x)
            z = link.receive("logits", "model", step).tensor("tensor")
            if z.dtype != torch.float32 or z.dim() != 1 or not bool(torch.isfinite(z).all()):
                raise IntegrityFailure("model", step, "shape", f"expected finite F32 logits, got {z.dtype} {list(z.shape)}")
            return z

        if lm.task == "causal_lm":
            tokens, logits = decode_steps(forward, inputs, max_new_tokens=req.max_new_tokens,
                                          eos_token_ids=_eos(lm.hf_config))
            return tokens, logits, None
        from ..inference.sampling import greedy_token

        z = forward(0, inputs)
        return [], [z], greedy_token(z)


def _infer(lm: _Loaded, req: RunRequest, inputs: torch.Tensor, on_step=None):
    if lm.task == "causal_lm":
        tokens, logits = generate(lm.model, inputs, max_new_tokens=req.max_new_tokens,
                                  eos_token_ids=_eos(lm.hf_config), on_step=on_step)
        return tokens, logits, None
    label, logits = classify(lm.model, inputs.to(next(lm.model.parameters()).dtype), on_step=on_step)
    return [], logits, label


def _eos(hf_config: dict) -> list[int]:
    from ..inference.served import eos_token_ids

    return eos_token_ids(hf_config)


def _n_layers(lm: _Loaded) -> int:
    from ..models import adapter_class

    return len(adapter_class(lm.family)(lm.model).stages) - 2


def _input_kind(lm: _Loaded) -> str:
    return "input_ids" if lm.task == "causal_lm" else "pixel_values"


def _check_input(lm: _Loaded, x: torch.Tensor) -> None:
    if lm.task == "causal_lm":
        vocab = int(lm.hf_config.get("vocab_size", 0))
        if x.dtype != torch.int64 or x.dim() != 2 or x.shape[0] != 1 or x.shape[1] < 1:
            raise InputError(f"a {lm.family} model takes input ids I64 [1, P], got {x.dtype} {list(x.shape)}")
        if int(x.min()) < 0 or int(x.max()) >= vocab:
            raise InputError(f"input ids must lie in [0, {vocab})")
    elif x.dtype != torch.float32 or x.dim() != 4 or x.shape[0] != 1 or not bool(torch.isfinite(x).all()):
        raise InputError(f"a {lm.family} model takes finite pixels F32 [1, C, H, W], got {x.dtype} {list(x.shape)}")


def _exposure_json(exp) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(exp)
    d["notes"] = list(exp.notes)
    d["fractions"] = exp.fractions()
    return d


def trusted_main(control_address: str, worker_address: str, authkey: bytes, key_path: str | None,
                 threads: int | None, timeout_s: float) -> None:
    """Entry point of the trusted process (spawned, or `main_from_environment`)."""
    if threads:
        torch.set_num_threads(threads)
    key = SigningKey.load(key_path) if key_path else SigningKey.generate()
    worker = connect(worker_address, authkey, timeout_s=timeout_s)
    with listen(control_address, authkey) as listener:
        control = listener.accept()
    TrustedSide(control, worker, key, timeout_s=timeout_s).serve()
    worker.close()
    exit_process()


def main_from_environment() -> None:
    """`python -m aftune.partition.trusted`, configured by AFTUNE_PARTITION_* variables."""
    env = os.environ
    threads = env.get("AFTUNE_PARTITION_THREADS")
    trusted_main(env["AFTUNE_PARTITION_CONTROL"], env["AFTUNE_PARTITION_WORKER"],
                 bytes.fromhex(env["AFTUNE_PARTITION_AUTHKEY"]), env.get("AFTUNE_PARTITION_KEY") or None,
                 int(threads) if threads else None, float(env.get("AFTUNE_PARTITION_TIMEOUT", "300")))


if __name__ == "__main__":
    main_from_environment()

