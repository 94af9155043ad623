"""The fine-tuned model a run hands over (`RUN/model`), checked against the run and the agreement
(SPEC.md 6.2 step 7).

    findings = check_final_model(verifier)

`RUN/model` must be the model whose digest the run root signs (weights, config, generation
config and tokenizer files: SPEC.md 3.6); its config, generation config and tokenizer must be the
agreed ones; its weights must be the final committed state of the run (full fine-tuning) or the
merge of the committed base weights and final adapters, recomputed here (LoRA).
"""

from __future__ import annotations

import torch

from ..core.encoding import DTYPE_BY_NAME, tensor_digest
from ..core.merkle import files_root
from ..errors import InputError
from ..models import TOKENIZER_FILES, load_pretrained, model_commitment, model_files, model_weights
from ..verdict.findings import Finding
from ..verdict.comparison import relative_errors
from .agreement import canonical_config, differences
from .conformance import NO_AGREEMENT_NOTE
from .instantiate import instantiate


def _short(d: bytes) -> str:
    return d.hex()[:16] + "…"


def check_final_model(v) -> list[Finding]:
    """Findings about RUN/model (`v` is the run's Verifier)."""
    run = v.record.transcript.run
    ns = v.num_step_blocks
    fail = lambda reason, **kw: Finding(-1, ns, "final_model", reason, **kw)  # noqa: E731
    if run is None:
        return [Finding(-1, ns, "record", "the transcript has no signed run root: training did not finish")]
    model_dir = v.record.root / "model"
    try:
        _, saved = load_pretrained(model_dir, v.run_settings.attn_implementation, DTYPE_BY_NAME[v.run_settings.dtype])
        files = model_files(model_dir)
    except InputError as exc:
        return [fail(str(exc))]
    root, digests = model_commitment(saved, model_dir, v.algorithm)
    if root != run.final_model_digest:
        return [fail("RUN/model is not the model whose digest the run root signs (its weights, config, generation "
                     "config or tokenizer files changed)", expected=_short(run.final_model_digest), actual=_short(root))]
    out = _check_files(v, files, fail)
    if v.run_settings.lora is not None:
        return out + _check_merge(v, saved, digests, fail)
    final = v.record.manifest(ns)
    committed = {k[len("state/"):]: r for b in final.blocks for k, r in b.items() if k.startswith("state/")}
    for name, d in digests.items():
        ref = committed.get(name)
        if ref is None or ref.digest != d:
            out.append(fail("RUN/model differs from the final committed state", tensor=name))
    return out


def _check_files(v, files: dict[str, bytes], fail) -> list[Finding]:
    """The config, generation config and tokenizer the client will run the model with are the
    agreed ones (fine-tuning changes weights only)."""
    from ..core import jsonio

    a, out = v.agreement, []
    config = jsonio.parse(files["config.json"], "RUN/model/config.json")
    for line in differences(a.base_config, canonical_config(config) if isinstance(config, dict) else config):
        out.append(fail(f"RUN/model/config.json is not the agreed architecture: {line}", tensor="config.json"))
    if NO_AGREEMENT_NOTE not in v.notes:  # without an agreement nothing fixes the generation config
        gen = files.get("generation_config.json")
        got = canonical_config(jsonio.parse(gen, "RUN/model/generation_config.json")) if gen is not None else None
        for line in differences(a.generation_config, got):
            out.append(fail(f"RUN/model/generation_config.json is not the agreed one: {line}",
                            tensor="generation_config.json"))
    tokenizer = {k: b for k, b in files.items() if k in TOKENIZER_FILES}
    got_root = files_root(v.algorithm, tokenizer) if tokenizer else None
    if got_root != a.tokenizer:
        out.append(fail("RUN/model's tokenizer files are not the agreed tokenizer",
                        expected=_short(a.tokenizer) if a.tokenizer else "none",
                        actual=_short(got_root) if got_root else "none", tensor="tokenizer"))
    return out


def _check_merge(v, saved: torch.nn.Module, digests: dict[str, bytes], fail) -> list[Finding]:
    """LoRA: RUN/model must be the merge of the committed final base weights and adapters,
    recomputed here with the same code the trainer merged with."""
    final = v.record.manifest(v.num_step_blocks)
    root, model, _ = instantiate(v._hf_config, v.run_settings)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for b in final.blocks:
            for key, ref in b.items():
                if not key.startswith("state/"):
                    continue
                name = key[len("state/"):]
                target = params.get(name, buffers.get(name))
                if target is None:
                    return [fail("the final committed state names a tensor the agreed LoRA model does not have",
                                 tensor=name)]
                target.copy_(v.record.store.get(ref, f"final state, {name}"))
    merged = model_weights(root.merge_and_unload())
    out = []
    saved_weights = model_weights(saved) if not v.comparison.strict or v.portable else {}
    for name, t in merged.items():
        if name not in digests:
            out.append(fail("RUN/model lacks a tensor of the merged model", tensor=name))
        elif v.portable:  # merged in float64 and rounded (SPEC.md 5.4): bitwise up to near-midpoint elements
            refused = merge_rounding_refused(t, saved_weights[name])
            if refused:
                out.append(fail(f"RUN/model is not the merge of the committed base weights and final adapters: "
                                f"{refused} elements are not the float32 rounding of the float64 merge (nor "
                                "within the cross-hardware bound of a rounding midpoint)", tensor=name))
        elif v.comparison.strict and tensor_digest(name, t, v.algorithm) != digests[name]:
            out.append(fail("RUN/model is not the merge of the committed base weights and final adapters",
                            tensor=name))
        elif not v.comparison.strict:
            rel, elem = relative_errors(t, saved_weights[name])  # the verifier's merge against RUN/model
            max_rel, max_elem = v.tolerance.limits("weights")
            if rel > max_rel or elem > max_elem:
                out.append(fail("RUN/model is not the merge of the committed base weights and final adapters "
                                f"(beyond the tolerance; largest element error {elem:.3g} x magnitude)", tensor=name,
                                error=rel))
    extra = sorted(set(digests) - set(merged))
    out += [fail("RUN/model has a tensor the merged model does not", tensor=n) for n in extra[:8]]
    return out


def merge_rounding_refused(merged: torch.Tensor, saved: torch.Tensor) -> int:
    """Portable numerics: the elements of the exported float32 tensor `saved` that are neither the
    rounding of the verifier's float64 merge nor a rounding the cross-hardware bound allows (each
    differing element is treated as a log entry of portable.settle, under TAU and the row scale)."""
    from ..core import grid
    from .portable import GRID_DTYPE, TAU

    if saved.dtype != GRID_DTYPE or saved.shape != merged.shape:
        return merged.numel()
    own = grid.bits_of(grid.to_grid(merged, GRID_DTYPE, "the merged model"))
    committed = grid.bits_of(saved.contiguous())
    idx = torch.nonzero((own != committed).reshape(-1)).reshape(-1)
    adjusted = grid.adjust(merged, idx, committed.reshape(-1)[idx], TAU, grid.row_scale(merged), GRID_DTYPE)
    return len(adjusted.refused)
