"""Does a run conform to the client's agreement? (SPEC.md 6.2 step 0)

Every field of the run config that a verifier could use is compared with the value the
agreement gives or derives: the agreement's digest, the settings, the architecture config, the
base weights, the tokenizer, the dataset, the batch spec and the layer-block layout. Each
difference is a finding that names the field, with the agreed and the committed value. The
verifier itself then uses the agreement's values only.

    findings = run_conformance(record.config, agreement, layout=(stage_names, ranges))

Without an agreement (`unsafe_no_agreement`), `agreement_of_run` builds one from the run's own
config: the verdict then says only that the record is consistent with itself.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..verdict.findings import Finding
from .agreement import Agreement, canonical_config, differences
from .settings import TrainSettings

NO_AGREEMENT_NOTE = ("no agreement was given (--unsafe-no-agreement): only the record's consistency with itself was "
                     "checked; the base model, the data, the settings and the architecture were compared with "
                     "nothing the client holds")


def expected_run_config(agreement: Agreement, layout: tuple[list[str], list[list[int]]]) -> dict[str, Any]:
    """The run config fields a run made under `agreement` must commit (SPEC.md 4.3, 4.5)."""
    spec = agreement.batch_spec()
    stages, ranges = layout
    return {
        "agreement": agreement.digest().hex(),
        "settings": agreement.settings.to_json(),
        "model": {"config": agreement.base_config, "base_weights": agreement.base_weights.hex(),
                  "tokenizer": agreement.tokenizer.hex() if agreement.tokenizer is not None else None},
        "data": {"kind": agreement.data_kind, "root": agreement.data_root.hex(),
                 "num_examples": agreement.num_examples, "labels": list(agreement.labels)},
        "batch": spec.to_json(),
        "layout": {"stages": list(stages), "layer_blocks": [list(r) for r in ranges]},
    }


def committed_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same fields as the run config commits them (the architecture config canonicalised)."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    hf = model.get("config")
    return {
        "agreement": config.get("agreement"),
        "settings": config.get("settings"),
        "model": {"config": canonical_config(hf) if isinstance(hf, dict) else hf,
                  "base_weights": model.get("base_weights"), "tokenizer": model.get("tokenizer")},
        "data": {k: data.get(k) for k in ("kind", "root", "num_examples", "labels")},
        "batch": config.get("batch"),
        "layout": config.get("layout"),
    }


# What a difference in each part of the run config means, most specific first.
MEANINGS = (
    ("agreement", "the run was made under another agreement"),
    ("settings", "the run used other training settings than agreed"),
    ("model.config", "the run's architecture is not the agreed one"),
    ("model.base_weights", "the run did not start from the agreed base model"),
    ("model.tokenizer", "the run's tokenizer is not the agreed one"),
    ("data.root", "the run was not trained on the agreed dataset"),
    ("data.labels", "the run's class labels are not the agreed ones (renamed or permuted)"),
    ("data", "the run's dataset is not the agreed one"),
    ("batch", "the run builds its batches otherwise than the agreement gives"),
    ("layout", "the run's layer blocks are not those of the agreed architecture and settings"),
)


def meaning(field: str) -> str:
    return next(text for prefix, text in MEANINGS if field == prefix or field.startswith(prefix + "."))


def run_conformance(config: dict[str, Any], agreement: Agreement, layout, check_digest: bool = True) -> list[Finding]:
    """Findings (check `agreement`) for every field where the run differs from the agreement."""
    expected, committed = expected_run_config(agreement, layout), committed_run_config(config)
    if isinstance(committed["settings"], dict):  # compare settings as the reader fills them (defaults)
        try:
            committed["settings"] = TrainSettings.from_json(committed["settings"]).to_json()
        except InputError:  # an invalid value stays as written and is reported as a difference below
            pass
    for side in (expected, committed):  # native numerics is written by omission (settings.to_json): name it
        if isinstance(side["settings"], dict):
            side["settings"] = {"numerics": "native", **side["settings"]}
    if not check_digest:
        expected.pop("agreement"), committed.pop("agreement")
    out = []
    lines = differences(expected, committed)
    lines.sort(key=lambda line: line.startswith("agreement:"))  # the specific fields first, the digest last
    for line in lines:
        field, _, detail = line.partition(": ")
        reason = f"{meaning(field)}: {detail.replace('got', 'the run commits', 1)}"
        out.append(Finding(-1, -1, "agreement", reason, tensor=f"config.{field}"))
    return out


def agreement_of_run(record) -> Agreement:
    """An 'agreement' read back from the run's own config and base_model.json: for
    --unsafe-no-agreement only, which then checks the record against itself."""
    from ..core.encoding import parse_hex_digest

    model, data = record.section("model"), record.section("data")
    tok = model.get("tokenizer")
    hf = model.get("config")
    return Agreement(record.algorithm, canonical_config(hf) if isinstance(hf, dict) else {}, None,
                     record.base_digests(), None if tok is None else parse_hex_digest(tok, "run config: model.tokenizer"),
                     str(data.get("kind")), parse_hex_digest(data.get("root"), "run config: data.root"),
                     record.num_examples, tuple(str(x) for x in data.get("labels") or ()), record.settings)
