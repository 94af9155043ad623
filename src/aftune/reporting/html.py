"""An audit report as one self-contained HTML page: the block grid, threats, failures, run config.

    aftune report REPORT.json --challenge CHALLENGE --config RUN/config.json --html report.html

The page loads nothing at view time (inline CSS, no script, no font, no image, and a
Content-Security-Policy that forbids them), and every string taken from the report, challenge or
config is HTML-escaped: reasons and tensor names can carry text a hostile provider wrote.
`block_grid` is shared with `aftune.plot`, which draws the same grid as a PNG.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

PASS, FAIL, NOT_SAMPLED, MISSING = "pass", "fail", "unsampled", "missing"
STATE_LABELS = {PASS: "pass", FAIL: "fail", MISSING: "challenged, no result (fail)", NOT_SAMPLED: "not sampled"}
COLOURS = {PASS: "#2ca02c", FAIL: "#d62728", MISSING: "#8c1515", NOT_SAMPLED: "#d0d0d0"}
MAX_TEXT = 4000  # characters of any one string shown (a hostile report may hold megabytes)
MAX_GRID_CELLS = 1 << 20


@dataclass(frozen=True)
class BlockGrid:
    """Every block of the run, with the state the audit left it in."""

    num_layer_blocks: int
    num_step_blocks: int
    states: dict[tuple[int, int], str]  # blocks absent here were not sampled
    layer_labels: tuple[str, ...]
    details: dict[tuple[int, int], str]  # one line per block with a result

    def state(self, layer_block: int, step_block: int) -> str:
        return self.states.get((layer_block, step_block), NOT_SAMPLED)

    def counts(self) -> dict[str, int]:
        counts = {PASS: 0, FAIL: 0, MISSING: 0}
        for state in self.states.values():
            counts[state] += 1
        counts[NOT_SAMPLED] = self.num_layer_blocks * self.num_step_blocks - sum(counts.values())
        return counts


def block_grid(report_json: dict[str, Any], challenge: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None) -> BlockGrid:
    """The grid of a report. Its shape comes from the challenge, else the run config, else the
    largest block in the report. A challenged block without a result is MISSING (a failure)."""
    if not isinstance(report_json, dict):
        raise InputError("report: expected a JSON object")
    blocks = report_json.get("blocks", [])
    if not isinstance(blocks, list):
        raise InputError("report: 'blocks' must be a list")
    results = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict):
            raise InputError(f"report: blocks[{i}] must be an object")
        results.append((_int(b.get("layer_block"), f"blocks[{i}].layer_block"),
                        _int(b.get("step_block"), f"blocks[{i}].step_block"), b))
    challenged: list[tuple[int, int]] = []
    shape = None
    if challenge is not None:
        if not isinstance(challenge, dict) or not isinstance(challenge.get("grid"), dict):
            raise InputError("challenge: expected an aftune.challenge.v1 object with a grid")
        shape = (_int(challenge["grid"].get("num_layer_blocks"), "challenge grid.num_layer_blocks", 1),
                 _int(challenge["grid"].get("num_step_blocks"), "challenge grid.num_step_blocks", 1))
        pairs = challenge.get("blocks", [])
        if not isinstance(pairs, list):
            raise InputError("challenge: 'blocks' must be a list")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InputError(f"challenge: blocks[{i}] must be a [layer_block, step_block] pair")
            challenged.append((_int(pair[0], f"challenge blocks[{i}][0]"), _int(pair[1], f"challenge blocks[{i}][1]")))
    elif config is not None:
        shape = _config_shape(config)
    if shape is None:
        seen = [(l, s) for l, s, _ in results] + challenged
        shape = (max((l for l, _ in seen), default=0) + 1, max((s for _, s in seen), default=0) + 1)
    L, S = shape
    if L * S > MAX_GRID_CELLS:
        raise InputError(f"the grid has {L * S} blocks, more than {MAX_GRID_CELLS} can be drawn")
    states: dict[tuple[int, int], str] = {}
    details: dict[tuple[int, int], str] = {}
    labels: dict[int, str] = {}
    for l, s, b in results:
        if l >= L or s >= S:
            raise InputError(f"report: block (layer block {l}, step block {s}) lies outside the {L} x {S} grid")
        verdict = b.get("verdict")
        state = PASS if verdict == "PASS" else FAIL  # anything but an explicit PASS is a failure
        if states.get((l, s)) == FAIL:
            state = FAIL
        states[(l, s)] = state
        if isinstance(b.get("label"), str):
            labels.setdefault(l, _clip(b["label"], 200))
        compared = b.get("compared")
        findings = b.get("findings") if isinstance(b.get("findings"), list) else []
        line = f"{_clip(b.get('label') or f'layer block {l}', 200)}, step block {s}: {'PASS' if state == PASS else 'FAIL'}"
        if isinstance(compared, int) and not isinstance(compared, bool):
            line += f", {compared} commitments compared"
        if findings:
            line += f", {len(findings)} finding(s)"
        details[(l, s)] = line
    for l, s in challenged:
        if l >= L or s >= S:
            raise InputError(f"challenge: block ({l}, {s}) lies outside its {L} x {S} grid")
        if (l, s) not in states:
            states[(l, s)] = MISSING
            details[(l, s)] = f"layer block {l}, step block {s}: challenged, but the report has no result for it"
    layer_labels = tuple(labels.get(l) or _config_label(config, l) or f"layer block {l}" for l in range(L))
    return BlockGrid(L, S, states, layer_labels, details)


def render_html(report_json: dict[str, Any], challenge: dict[str, Any] | None = None,
                config: dict[str, Any] | None = None, threats: dict[str, Any] | None = None) -> str:
    """The report as a self-contained HTML page.

    report_json: `Report.to_json()`; challenge: the challenge JSON (aftune.challenge.v1) or None;
    config: the run's config.json or None; threats: `ChallengeAssessment.to_json()` (a "threats"
    list of {threat, model, tampered_blocks, detection_probability}) or a plain {label: probability}."""
    grid = block_grid(report_json, challenge, config)
    counts = grid.counts()
    verdict = "PASS" if report_json.get("verdict") == "PASS" and not counts[FAIL] and not counts[MISSING] else "FAIL"
    failures = _failures(report_json)
    summary = (f"{counts[PASS]} pass, {counts[FAIL] + counts[MISSING]} fail, {counts[NOT_SAMPLED]} not sampled "
               f"of {grid.num_layer_blocks * grid.num_step_blocks} blocks "
               f"({grid.num_layer_blocks} layer blocks x {grid.num_step_blocks} step blocks)")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may load or run: the page is read offline and may hold hostile text.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>aftune audit: {verdict}</title>",
        f"<style>{_css(grid)}</style></head><body>",
        "<header><h1>aftune audit report</h1>",
        f'<p><span class="verdict {verdict.lower()}">{verdict}</span> {_e(summary)}</p>',
        f"<p class=\"meta\">mode {_e(report_json.get('mode', '?'))} · record {_e(report_json.get('run_dir', '?'))}</p>",
        "</header>",
        _grid_section(grid),
        _threat_section(threats),
        _failure_section(failures),
        _challenge_section(challenge),
        _config_section(config),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def write_html(path: str | Path, report_json: dict[str, Any], challenge: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None, threats: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.write_text(render_html(report_json, challenge, config, threats), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------

def _e(value: Any, limit: int = MAX_TEXT) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape(_clip(value, limit), quote=True)


def _clip(value: Any, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


def _int(value: Any, name: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < MAX_GRID_CELLS:
        raise InputError(f"{name} must be an integer in [{low}, {MAX_GRID_CELLS}), got {_clip(value, 40)!r}")
    return value


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    if isinstance(value, float) and not math.isfinite(value):
        return _e(value)
    return f"{value:.{digits}g}"


def _config_shape(config: dict[str, Any]) -> tuple[int, int] | None:
    try:
        layer_blocks = config["layout"]["layer_blocks"]
        settings = config["settings"]
        steps, per_block = settings["steps"], settings["steps_per_block"]
    except (KeyError, TypeError):
        return None
    if not isinstance(layer_blocks, list) or not layer_blocks or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (steps, per_block)):
        return None
    return len(layer_blocks), -(-steps // per_block)


def _config_label(config: dict[str, Any] | None, layer_block: int) -> str | None:
    try:
        first, last = config["layout"]["layer_blocks"][layer_block]  # type: ignore[index]
        stages = config["layout"]["stages"]  # type: ignore[index]
        return f"layer block {layer_block} ({_clip(stages[first], 60)}..{_clip(stages[last - 1], 60)})"
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def _css(grid: BlockGrid) -> str:
    S = grid.num_step_blocks
    cell = 24 if S <= 24 else 18 if S <= 48 else 10 if S <= 160 else 5
    return f"""
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1b1b1b; background: #fff; }}
h1 {{ font-size: 22px; margin: 0 0 8px; }} h2 {{ font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }}
.meta {{ color: #555; }}
.verdict {{ font-weight: 700; padding: 2px 10px; border-radius: 4px; color: #fff; }}
.verdict.pass {{ background: {COLOURS[PASS]}; }} .verdict.fail {{ background: {COLOURS[FAIL]}; }}
.gridwrap {{ overflow: auto; max-width: 100%; }}
table.grid {{ border-collapse: separate; border-spacing: 2px; }}
table.grid th {{ font-weight: 400; font-size: 11px; color: #555; white-space: nowrap; padding: 0 4px; }}
table.grid th.row {{ text-align: right; }}
table.grid td.c {{ width: {cell}px; min-width: {cell}px; height: {cell}px; padding: 0; border-radius: 2px;
  font-size: {max(cell - 6, 1)}px; line-height: {cell}px; text-align: center; color: #fff; }}
td.c.pass, .key.pass {{ background: {COLOURS[PASS]}; }}
td.c.fail, .key.fail {{ background: {COLOURS[FAIL]}; }}
td.c.missing, .key.missing {{ background: repeating-linear-gradient(45deg, {COLOURS[FAIL]} 0 4px, {COLOURS[MISSING]} 4px 8px); }}
td.c.unsampled, .key.unsampled {{ background: {COLOURS[NOT_SAMPLED]}; }}
ul.legend {{ list-style: none; padding: 0; display: flex; gap: 18px; flex-wrap: wrap; }}
.key {{ display: inline-block; width: 14px; height: 14px; border-radius: 2px; vertical-align: -2px; margin-right: 6px; }}
table.data {{ border-collapse: collapse; margin: 4px 0; }}
table.data th, table.data td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
table.data td.reason {{ max-width: 60ch; overflow-wrap: anywhere; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
code, pre {{ font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace; overflow-wrap: anywhere; }}
pre {{ background: #f6f6f6; padding: 8px; max-height: 480px; overflow: auto; white-space: pre-wrap; }}
.bar {{ display: inline-block; height: 8px; background: #4a78b5; vertical-align: middle; margin-right: 6px; }}
"""


def _grid_section(grid: BlockGrid) -> str:
    S = grid.num_step_blocks
    every = 1 if S <= 48 else 10 if S <= 400 else 50
    head = "".join(f"<th>{s if s % every == 0 else ''}</th>" for s in range(S))
    rows = [f'<tr><th class="row"></th>{head}</tr>']
    glyph = {PASS: "", FAIL: "✕", MISSING: "?", NOT_SAMPLED: ""} if S <= 48 else dict.fromkeys(STATE_LABELS, "")
    for l in range(grid.num_layer_blocks):
        cells = []
        for s in range(S):
            state = grid.state(l, s)
            title = grid.details.get((l, s), f"layer block {l}, step block {s}: not sampled")
            cells.append(f'<td class="c {state}" data-l="{l}" data-s="{s}" title="{_e(title)}">{glyph[state]}</td>')
        rows.append(f'<tr><th class="row">{_e(grid.layer_labels[l], 200)}</th>{"".join(cells)}</tr>')
    counts = grid.counts()
    legend = "".join(f'<li><span class="key {state}"></span>{_e(label)} ({counts[state]})</li>'
                     for state, label in STATE_LABELS.items())
    return (f'<section id="grid"><h2>Blocks: layer block (rows) x step block (columns)</h2>'
            f'<div class="gridwrap"><table class="grid">{"".join(rows)}</table></div>'
            f'<ul class="legend">{legend}</ul></section>')


def _threat_rows(threats: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    rows = []
    if isinstance(threats.get("threats"), list):
        for t in threats["threats"]:
            if isinstance(t, dict):
                rows.append((t.get("threat", "?"), t.get("model", ""), t.get("tampered_blocks", ""),
                             t.get("detection_probability")))
    else:
        for label, p in threats.items():
            rows.append((label, "", "", p))
    return rows


def _threat_section(threats: dict[str, Any] | None) -> str:
    if not threats:
        return ('<section id="threats"><h2>Detection probability per threat</h2>'
                "<p>No threat model was given (see <code>aftune plan --challenge</code>).</p></section>")
    if not isinstance(threats, dict):
        raise InputError("threats: expected a JSON object")
    intro = ""
    if "strategy" in threats:
        intro = (f"<p>Under this challenge ({_e(threats.get('strategy'))}, {_e(threats.get('count'))} of "
                 f"{_e(threats.get('num_blocks'))} blocks), for the placement of tampered blocks least likely "
                 "to be drawn:</p>")
    body = []
    for label, model, tampered, p in _threat_rows(threats):
        if isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and 0 <= p <= 1:
            text = "100%" if p >= 1 else f"1-{1 - p:.2g}" if p > 0.9999 else f"{100 * p:.4g}%"  # never rounded to certainty
            shown = f'<span class="bar" style="width:{round(80 * p)}px"></span>{text}'
        else:
            shown = _e(p)
        body.append(f'<tr><td>{_e(label)}</td><td class="num">{_e(tampered)}</td><td>{shown}</td>'
                    f'<td class="reason">{_e(model)}</td></tr>')
    return (f'<section id="threats"><h2>Detection probability per threat</h2>{intro}'
            '<table class="data"><tr><th>threat</th><th>blocks that fail</th><th>P(detect)</th><th>model</th></tr>'
            f'{"".join(body)}</table></section>')


def _failures(report_json: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    errors = report_json.get("errors", [])
    for f in errors if isinstance(errors, list) else []:
        if isinstance(f, dict):
            out.append(("run", f))
    blocks = report_json.get("blocks", [])
    for b in blocks if isinstance(blocks, list) else []:
        findings = b.get("findings") if isinstance(b, dict) else None
        where = b.get("label") or f"layer block {b.get('layer_block')}" if isinstance(b, dict) else "?"
        if isinstance(b, dict) and b.get("verdict") != "PASS" and not findings:
            out.append((where, {"layer_block": b.get("layer_block"), "step_block": b.get("step_block"),
                                "check": "compared", "reason": "nothing was compared: a check that compared "
                                "nothing is a failure"}))
        for f in findings if isinstance(findings, list) else []:
            if isinstance(f, dict):
                out.append((where, f))
    return out


def _failure_section(failures: list[tuple[str, dict[str, Any]]]) -> str:
    if not failures:
        return '<section id="failures"><h2>Failures</h2><p>None.</p></section>'
    rows = []
    for where, f in failures:
        lb, sb = f.get("layer_block"), f.get("step_block")
        block = "run" if not isinstance(lb, int) or lb < 0 else where
        step_block = "" if not isinstance(sb, int) or sb < 0 else sb
        digests = ""
        if f.get("expected") is not None or f.get("actual") is not None:
            digests = f"committed <code>{_e(f.get('expected'), 200)}</code><br>recomputed <code>{_e(f.get('actual'), 200)}</code>"
        error = _num(f.get("error")) if f.get("error") is not None else ""
        rows.append("<tr>" + "".join([
            f"<td>{_e(block, 200)}</td>", f'<td class="num">{_e(step_block)}</td>',
            f'<td class="num">{_e("" if f.get("step") is None else f.get("step"))}</td>',
            f'<td class="num">{_e("" if f.get("micro") is None else f.get("micro"))}</td>',
            f"<td>{_e(f.get('check', ''), 100)}</td>", f"<td><code>{_e(f.get('tensor', ''), 400)}</code></td>",
            f'<td class="reason">{_e(f.get("reason", ""))}</td>', f"<td>{digests}</td>", f'<td class="num">{error}</td>',
        ]) + "</tr>")
    return (f'<section id="failures"><h2>Failures ({len(failures)})</h2><table class="data">'
            "<tr><th>block</th><th>step block</th><th>step</th><th>micro-batch</th><th>check</th><th>tensor</th>"
            "<th>reason</th><th>digests</th><th>relative error</th></tr>"
            f'{"".join(rows)}</table></section>')


def _challenge_section(challenge: dict[str, Any] | None) -> str:
    if not challenge:
        return ""
    params = challenge.get("parameters") if isinstance(challenge.get("parameters"), dict) else {}
    items = [("kind", challenge.get("kind")), ("strategy", challenge.get("strategy")),
             ("parameters", ", ".join(f"{k} {v}" for k, v in params.items()) or "-"),
             ("blocks challenged", len(challenge.get("blocks") or [])),
             ("run root", challenge.get("run_root")), ("nonce", challenge.get("nonce")),
             ("hash", challenge.get("hash")), ("challenge digest", challenge.get("digest"))]
    return '<section id="challenge"><h2>Challenge</h2>' + _definition_table(items) + "</section>"


def _config_section(config: dict[str, Any] | None) -> str:
    if not config:
        return ""
    if not isinstance(config, dict):
        raise InputError("config: expected a JSON object")

    def get(*path: str) -> Any:
        node: Any = config
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    settings = get("settings") if isinstance(get("settings"), dict) else {}
    model = get("model", "config")
    arch = model.get("architectures") if isinstance(model, dict) else None
    items = [("model", f"{get('model', 'config', 'model_type') or '?'} {', '.join(map(str, arch)) if isinstance(arch, list) else ''}"),
             ("base weights", get("model", "base_weights")),
             ("data", f"{get('data', 'kind')}, {get('data', 'num_examples')} examples, root {get('data', 'root')}"
              if isinstance(get("data"), dict) else None),
             ("layer blocks", len(get("layout", "layer_blocks") or []))]
    items = [(k, v) for k, v in items if v is not None]
    for key in ("steps", "batch_size", "grad_accum", "seq_len", "lr", "optimizer", "schedule", "warmup_steps",
                "weight_decay", "max_grad_norm", "layers_per_block", "steps_per_block", "checkpoint_interval",
                "seed", "dtype", "hash_algorithm", "lora"):
        if key in settings:
            items.append((key, settings[key]))
    full = json.dumps(config, indent=1, sort_keys=True, default=str)
    return ('<section id="config"><h2>Run config</h2>' + _definition_table(items) +
            f"<details><summary>full config.json</summary><pre>{_e(full, 200_000)}</pre></details></section>")


def _definition_table(items: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v, 400)}</code></td></tr>" for k, v in items)
    return f'<table class="data">{rows}</table>'
