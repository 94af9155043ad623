"""`aftune serve`, `aftune serve-keys` and `aftune policy`: serving a model to clients with API keys,
under the generation policy agreed with them, optionally over HTTPS and from inside a TEE.

    aftune policy runs/demo --max-new-tokens 64 --out policy.json       # the client's (or agreement's)
    aftune policy runs/demo --dtype float32 --numerics portable --out policy.json  # bitwise on any hardware
    aftune serve-keys add alice --file api-keys.txt                     # prints alice's key once
    aftune serve runs/demo --policy policy.json --api-keys api-keys.txt --tls-cert cert.pem --tls-key key.pem
    aftune serve runs/demo --policy policy.json --api-keys api-keys.txt --attest configfs-tsm
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import InputError
from ..inference.batching import BatchingSettings
from ..inference.limits import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_REQUEST_BYTES
from .app import AftuneTyper, app, err, escape, out
from .options import deprecated_flags

keys_app = AftuneTyper(no_args_is_help=True, help="The API keys of `aftune serve` (kept hashed; each key shown once).")
app.add_typer(keys_app, name="serve-keys")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
@deprecated_flags({"--key": "--provider-signing-key"})
def serve(
    run_dir: Path = typer.Argument(..., help="A run directory from `aftune train` (or a model directory)."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="The generation policy agreed with the clients (required for a causal LM)."),
    api_keys: Path = typer.Option(..., "--api-keys", help="The clients' API keys file (`aftune serve-keys add NAME`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="The address to listen on (beyond loopback: serve HTTPS)."),
    port: int = typer.Option(8000, "--port", help="The port to listen on."),
    record_dir: Optional[Path] = typer.Option(None, "--record-dir", help="Where records go.", show_default="RUN/inference"),
    provider_signing_key: Optional[Path] = typer.Option(None, "--provider-signing-key", help="The provider's private signing key, which signs receipts.", show_default="the run's"),
    layers_per_block: int = typer.Option(2, "--layers-per-block", help="B_L: layers per layer block of each record."),
    activation_interval: int = typer.Option(0, "--activation-interval", help="I_A: store boundary activations every I_A boundaries; 0: none."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute (serving) dtype; a policy that pins another is an error.", show_default="the policy's, the run's, or float32"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="Serve HTTPS with this certificate (PEM)."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="The certificate's private key (PEM)."),
    attest: Optional[str] = typer.Option(None, "--attest", help="Serve GET /v1/attestation with this TEE evidence provider "
                                                                "(gramine, configfs-tsm, auto, unsafe-simulated); the "
                                                                "receipt key is then made inside this process."),
    max_request_bytes: int = typer.Option(DEFAULT_MAX_REQUEST_BYTES, "--max-request-bytes", help="Refuse a larger request body with 413, before reading it."),
    max_concurrent: int = typer.Option(DEFAULT_MAX_CONCURRENT, "--max-concurrent", help="Refuse a request beyond this many in flight with 429."),
    max_batch_size: int = typer.Option(BatchingSettings.max_batch_size, "--max-batch-size", help="Compute up to this many concurrent generations as one batch (1: one at a time)."),
    batch_window_ms: float = typer.Option(BatchingSettings.window_ms, "--batch-window-ms", help="How long the first request of a batch waits for others (milliseconds)."),
):
    """Serve the model over HTTP(S) to clients with API keys: POST /v1/generate, GET /v1/model,
    GET /v1/records/{id} (a client's own), GET /v1/attestation (with --attest), and the OpenAI
    API: POST /v1/completions, POST /v1/chat/completions, GET /v1/models. The model is
    loaded in the serving dtype the policy pins; a portable policy records in portable numerics."""
    from ..core.signing import SigningKey
    from ..inference.access import ApiKeys
    from ..inference.engine import InferenceEngine, load_served
    from ..inference.keys import provider_key
    from ..inference.limits import ServingLimits
    from ..inference.policy import GenerationPolicy
    from ..inference.serve import create_app, run_server
    from ..inference.settings import RecordingSettings

    limits = ServingLimits(max_request_bytes, max_concurrent).validate()
    batching = BatchingSettings(max_batch_size, batch_window_ms).validate()
    rdir = record_dir or (run_dir / "inference")
    keys = ApiKeys.load(api_keys)
    gen = GenerationPolicy.load(policy) if policy is not None else None
    if attest is not None:
        if provider_signing_key is not None:
            raise InputError("--attest makes the receipt key inside the serving process, so that the host never "
                             "holds it: --provider-signing-key would sign receipts with a key the host has")
        signing_key, pub = SigningKey.generate(), None
    else:
        signing_key, pub = provider_key(provider_signing_key, run_dir, rdir)
    engine = InferenceEngine(load_served(run_dir, gen, dtype=dtype), rdir, signing_key,
                             RecordingSettings(layers_per_block, activation_interval).validate(), batching=batching)
    application = create_app(engine, policy=gen, api_keys=keys, attestation=_attestation(attest, engine),
                             limits=limits)
    if (tls_cert is None) != (tls_key is None):
        raise InputError("HTTPS needs both --tls-cert and --tls-key")
    scheme = "https" if tls_cert else "http"
    if tls_cert is None and host not in _LOOPBACK:
        err.print("[yellow]warning:[/] serving plain HTTP beyond loopback: API keys, prompts and answers cross the "
                  "network in clear (--tls-cert, --tls-key)", highlight=False)
    numerics = f", {gen.numerics} numerics" if gen is not None else ""
    err.print(f"serving model {engine.served.digest.hex()[:16]}… ({engine.served.dtype}{numerics}) on "
              f"{scheme}://{host}:{port} to {len(keys.clients)} "
              f"client(s) (records in {rdir}; receipt key {engine.key.public_key.text}"
              + (f", {pub}" if pub else ", made in this process") + ")", highlight=False)
    run_server(application, host, port, tls_cert=tls_cert, tls_key=tls_key)


def _attestation(name: Optional[str], engine):
    """GET /v1/attestation?nonce=HEX: evidence binding the nonce, the served model digest and
    the receipt key (SPEC.md 10.5), from the named provider."""
    if name is None:
        return None
    from ..attestation.providers import provider_by_name
    from ..attestation.serving import attestation_response

    provider = provider_by_name(name)
    if provider.kind == "simulated":
        err.print("[bold yellow]warning:[/] --attest unsafe-simulated: the evidence is SIMULATED (no TEE) and proves "
                  "nothing", highlight=False)

    def answer(nonce: str) -> dict:
        return attestation_response(provider, nonce, algorithm=engine.served.algorithm,
                                    model_digest=engine.served.digest, receipt_key=engine.key.public_key)

    return answer


@keys_app.command("add")
def keys_add(name: str = typer.Argument(..., help="The client's name (A-Z a-z 0-9 . _ -)."),
             file: Path = typer.Option(..., "--file", help="The API keys file (created, mode 0600).")):
    """Add a client and print its key, once: the file keeps only its SHA-256."""
    from ..inference.access import add_client

    key = add_client(file, name)
    err.print(f"client {escape(name)} added to {escape(str(file))}; its key (shown once, never stored):",
              highlight=False)
    out.print(key, highlight=False)


@keys_app.command("remove")
def keys_remove(name: str = typer.Argument(..., help="The client's name."),
                file: Path = typer.Option(..., "--file", help="The API keys file.")):
    """Remove a client: its key no longer authenticates (restart the server)."""
    from ..inference.access import remove_client

    remove_client(file, name)
    out.print(f"client {escape(name)} removed from {escape(str(file))}", highlight=False)


@app.command("policy")
def policy_command(
    model: Path = typer.Argument(..., help="The model (or run) directory: its config.json gives the end-of-sequence tokens."),
    out_file: Path = typer.Option(..., "--out", help="Where to write the policy (aftune.generation-policy.v2: it pins the serving dtype)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sampling (seeds from the client's nonce)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    eos_token_id: List[int] = typer.Option([], "--eos-token-id", help="End-of-sequence token (repeatable).", show_default="the config's"),
    stop_rule: str = typer.Option("eos_or_length", "--stop-rule", help="eos_or_length, or length (never stop early)."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="A Jinja chat template file to render prompts with."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="The serving dtype: float32, bfloat16, float16 or float64.", show_default="the run's, the config's, or float32"),
    numerics: str = typer.Option("native", "--numerics", help="native (the provider's kernels: strict replay needs its hardware) or portable (float32 on a bfloat16 grid: bitwise on any hardware)."),
    stop: List[str] = typer.Option([], "--stop", help="A stop string (repeatable, at most 4): generation stops once the text contains one; the answer is cut before it."),
):
    """Write a generation policy: what every answer must be generated under, the serving dtype
    and numerics included (aftune.generation-policy.v2; v3 with stop strings)."""
    from ..core import jsonio
    from ..inference.policy import MAX_CHAT_TEMPLATE_CHARS, GenerationPolicy

    values = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_rule=stop_rule,
                  numerics=numerics)
    if dtype is not None:
        values["dtype"] = dtype
    if eos_token_id:
        values["eos_token_ids"] = tuple(eos_token_id)
    if stop:
        values["stop"] = tuple(stop)
    if chat_template is not None:
        data = jsonio.read_bytes(chat_template, MAX_CHAT_TEMPLATE_CHARS * 4, "chat template", InputError)
        try:
            values["chat_template"] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"chat template {chat_template} is not UTF-8 text") from None
    p = GenerationPolicy.for_model(model, **values)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(p.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    out.print(f"policy written to {escape(str(out_file))}: {escape(json.dumps(p.to_json(), sort_keys=True))}",
              highlight=False, soft_wrap=True)
    out.print(f"digest (blake3) {p.digest('blake3').hex()}", highlight=False)
