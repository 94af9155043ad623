"""The strategies side by side for one model: what the worker would see, without running one.

    rows = strategy_table("models/llama", prompt_tokens=16, new_tokens=16)
    rows[0].strategy, rows[0].exposure.fractions()

In this process (no worker is started): the model is loaded, its linear sites are placed by every
strategy, and one forward pass on an all-zero input of the request's shape counts the rows each
site processes (decoders: a prefill of `prompt_tokens`, plus one row per site for each later
step). Exposure then follows from the plan alone: parameters the worker would receive in clear,
activation elements it would see (blinded, or in clear for none-shielded), and multiply-adds
left inside the trusted process. `teeslice` needs the public backbone; without one its row says
so instead of inventing slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .offload import Arithmetic, Offloader
from .strategies import STRATEGIES, Exposure, StrategyConfig, exposure, find_sites, make_plan
from .teeslice import backbone_slices


@dataclass(frozen=True)
class StrategyRow:
    strategy: str
    description: str
    exposure: Exposure | None  # None when the strategy does not apply (teeslice without a backbone)
    shielded_stages: tuple[int, ...]
    note: str = ""


def strategy_table(model_dir: str | Path, *, backbone: str | Path | None = None, prompt_tokens: int = 16,
                   new_tokens: int = 16, shield_fraction: float = 0.25, magnitude_fraction: float = 0.01,
                   slice_tolerance: float = 1e-6) -> list[StrategyRow]:
    from ..models import adapter_class, load_pretrained

    hf_config, model = load_pretrained(model_dir, "sdpa", torch.float32)
    model.eval()
    family = str(hf_config.get("model_type"))
    sites = find_sites(model, family)
    n_layers = len(adapter_class(family)(model).stages) - 2
    causal = family in ("llama", "qwen2", "qwen3", "mistral", "gpt2")
    tracer = Offloader(model, make_plan(sites, StrategyConfig("all-shielded"), n_layers), None, Arithmetic())
    tracer.tracing = True
    with tracer.installed(), torch.no_grad():
        if causal:
            ids = torch.zeros(1, prompt_tokens, dtype=torch.int64)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)
        else:
            size = int(hf_config.get("image_size") or 64)
            model(pixel_values=torch.zeros(1, int(hf_config.get("num_channels") or 3), size, size))
    rows = {k: v + (new_tokens - 1 if causal else 0) for k, v in tracer.site_rows().items()}
    split = {s.name: max(1, math.ceil(magnitude_fraction * s.d_in * s.d_out)) for s in sites}
    slices = None
    if backbone is not None:
        _, bb = load_pretrained(backbone, "sdpa", torch.float32)
        slices, _ = backbone_slices(model, bb, sites, tolerance=slice_tolerance)
    out = []
    for name, description in STRATEGIES.items():
        config = StrategyConfig(name, shield_fraction=shield_fraction, magnitude_fraction=magnitude_fraction,
                                slice_tolerance=slice_tolerance)
        if name == "teeslice" and slices is None:
            out.append(StrategyRow(name, description, None, (), "needs the public backbone (--backbone)"))
            continue
        try:
            plan = make_plan(sites, config, n_layers, set(slices) if slices is not None else None)
        except InputError as exc:
            out.append(StrategyRow(name, description, None, (), str(exc)))
            continue
        ranks = {k: v.rank for k, v in (slices or {}).items()}
        exp = exposure(plan, model, rows, shielded_elements=split, slice_ranks=ranks)
        out.append(StrategyRow(name, description, exp, plan.shielded_stages))
    return out
