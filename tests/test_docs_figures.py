"""The attack figures in the docs are one `aftune eval-detection` run's, as written (issue 25: the
docs disagreed with a fresh run).

    python -m pytest -q tests/test_docs_figures.py

docs/eval-detection.json is the run's own output; its table (docs/eval-detection.md) must be what
`markdown_table` renders from it, docs/attacks.md must quote that table verbatim, and the README's
margin range and Qu-ANTI-zation figures must be the run's. Re-running `aftune eval-detection --out
eval/` and copying eval/eval-detection.{md,json,png} to docs/ changes all of them together.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aftune.attacks.evaluate import markdown_table

ROOT = Path(__file__).resolve().parent.parent
DOC = json.loads((ROOT / "docs/eval-detection.json").read_text())
ROWS = {row["name"]: row for row in DOC["rows"]}


def test_table_is_rendered_from_the_runs_json():
    assert (ROOT / "docs/eval-detection.md").read_text().strip() == markdown_table(DOC).strip()


def test_attacks_doc_quotes_the_table():
    table = (ROOT / "docs/eval-detection.md").read_text().strip()
    assert table in (ROOT / "docs/attacks.md").read_text()


def _margins() -> list[float]:
    out = []
    for row in DOC["rows"]:
        m = row.get("details", {}).get("margins") or row.get("detection", {}).get("margins")
        if m:
            out.append(m["margin"])
    return out


def test_readme_figures_are_the_runs():
    readme = (ROOT / "README.md").read_text()
    margins = _margins()
    assert len(margins) == 5
    lo, hi = (f"{round(x, -3):,.0f}x" for x in (min(margins), max(margins)))
    assert f"({lo} to {hi} above the threshold" in readme
    q = ROWS["quant-objective"]["gain"]
    assert (f"{q['accuracy_float']:.3f} (clean fine-tune {q['clean_float']:.3f}) while its 4-bit copy falls to "
            f"{q['accuracy_int4']:.3f}") in readme
    assert re.search(r"fails at all 48 blocks", readme) and len(ROWS["quant-objective"]["affected"]) == 48
