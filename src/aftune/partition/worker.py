"""The untrusted worker: multiplies what it is sent by the weights it is shown, mod p.

Started by `PartitionRuntime` in its own process (spawn); it never imports the trusted side's
state and holds only what crossed the pipe: the exposed quantized weights, the public modulus,
blinded operands (and, for the `none-shielded` baseline only, the whole model in plaintext).
With `device="cuda"` the weights live on the GPU and products run there in binary64 (the same
exact limb arithmetic as on the CPU: `Field.matmul_small`).

Messages it accepts (wire.py frames; site and step in the fields, one tensor each):

| kind | tensor | answer |
|---|---|---|
| `session` | empty; fields `modulus` | none; forgets every weight |
| `weight` | I16 [d_out, d_in], the exposed quantized weight of `site` | none |
| `product` | I64 [n, d_in], the blinded operand | `result`: I64 [n, d_out] = operand @ W^T mod p |
| `model` | empty; fields `config`, `dtype`, `attn_implementation`, `task` | none (none-shielded) |
| `parameter` | one parameter of the whole model, `site` = its name | none (none-shielded) |
| `build` | empty | `built` (empty), once the model is assembled (none-shielded) |
| `forward` | input ids [1, q] or pixels (none-shielded) | `logits`: F32 [V] of the last position |
| `end` / `shutdown` | empty | none |
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

import torch

from .field import Field
from .link import exit_process, listen
from .wire import FrameError, Message, decode, encode

MAX_FRAME_BYTES = 1 << 34


class Worker:
    """The honest worker. Subclasses (dishonest.py) override `compute` to misbehave."""

    def __init__(self, conn: Connection, *, device: str = "cpu", adversary: Connection | None = None):
        self.conn, self.device, self.adversary = conn, torch.device(device), adversary
        self.field: Field | None = None
        self.weights: dict[str, torch.Tensor] = {}
        self._model_spec: dict[str, Any] | None = None
        self._parameters: dict[str, torch.Tensor] = {}
        self._model = None
        self._cache = None
        self._seen = 0

    # --- the loop ------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            try:
                frame = self.conn.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                msg = decode(frame, max_bytes=MAX_FRAME_BYTES)
            except FrameError as exc:
                self._answer("error", "?", -1, {"reason": f"bad frame: {exc}"})
                continue
            if msg.kind == "shutdown":
                return
            self.handle(msg)

    def handle(self, msg: Message) -> None:
        site, step = str(msg.fields.get("site", "")), int(msg.fields.get("step", -1))
        tensor = msg.tensors.get("tensor", torch.zeros(0, dtype=torch.int64))
        try:
            if msg.kind == "session":
                self.field = Field(int(msg.fields["modulus"]))
                self.weights.clear()
                self._model = self._cache = self._model_spec = None
                self._parameters, self._seen = {}, 0
            elif msg.kind == "weight":
                self.weights[site] = tensor.T.contiguous().to(self.device, torch.float64)  # W^T, exact in binary64
            elif msg.kind == "product":
                self._answer("result", site, step, {}, self.compute(site, step, tensor))
            elif msg.kind == "model":
                self._model_spec = dict(msg.fields)
            elif msg.kind == "parameter":
                self._parameters[site] = tensor
            elif msg.kind == "build":
                self._build_model()
                self._answer("built", site, step, {})
            elif msg.kind == "forward":
                self._answer("logits", site, step, {}, self.forward(step, tensor))
            elif msg.kind == "end":
                self.weights.clear()
                self._model = self._cache = None
                self._parameters, self._seen = {}, 0
            else:
                self._answer("error", site, step, {"reason": f"unknown message kind {msg.kind!r}"})
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:  # answered, never swallowed
            self._answer("error", site, step, {"reason": f"{type(exc).__name__}: {exc}"})

    def _answer(self, kind: str, site: str, step: int, fields: dict, tensor: torch.Tensor | None = None) -> None:
        t = torch.zeros(0, dtype=torch.int64) if tensor is None else tensor
        self.conn.send_bytes(encode(kind, {"site": site, "step": step, **fields}, {"tensor": t}))

    # --- computation ---------------------------------------------------------------------
    def compute(self, site: str, step: int, operand: torch.Tensor) -> torch.Tensor:
        """operand @ W_site^T mod p (exact)."""
        if self.field is None:
            raise ValueError("no session: the modulus is unknown")
        return self.field.matmul_small(operand.to(self.device), self.weights[site]).cpu()

    def forward(self, step: int, inputs: torch.Tensor) -> torch.Tensor:
        """none-shielded: the whole model on this side, with its own KV cache."""
        from .execute import cache_argument, returned_cache

        if self._model is None:
            self._build_model()
        spec = self._model_spec or {}
        with torch.no_grad():
            if spec.get("task") == "causal_lm":
                self._seen += inputs.shape[1]
                mask = torch.ones(1, self._seen, dtype=torch.int64, device=self.device)
                out = self._model(input_ids=inputs.to(self.device), attention_mask=mask, use_cache=True,
                                  logits_to_keep=1, **cache_argument(self._model, self._cache))
                self._cache = returned_cache(out)
                return out.logits[0, -1].float().cpu()
            out = self._model(pixel_values=inputs.to(self.device))
            return out.logits[0].float().cpu()

    def _build_model(self) -> None:
        from ..models import build_model
        from ..core.encoding import DTYPE_BY_NAME

        spec = self._model_spec
        if spec is None:
            raise ValueError("forward before the model was sent")
        model = build_model(spec["config"], spec["attn_implementation"], DTYPE_BY_NAME[spec["dtype"]])
        result = model.load_state_dict(self._parameters, strict=False)  # tied aliases are not sent
        if result.unexpected_keys:
            raise ValueError(f"unexpected parameters {result.unexpected_keys[:3]}")
        model.tie_weights()
        self._model = model.eval().to(self.device)
        self._parameters = {}


def worker_main(address: str, authkey: bytes, adversary: Connection | None, worker_class: type, device: str,
                threads: int | None) -> None:
    """Entry point of the worker process: listen on `address`, serve the one trusted process
    that connects (authenticated with `authkey`), exit when it hangs up."""
    if threads:
        torch.set_num_threads(threads)
    with listen(address, authkey) as listener:
        conn = listener.accept()
    worker_class(conn, device=device, adversary=adversary).serve()
    exit_process()
