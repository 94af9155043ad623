"""Report rendering: the HTML grid, escaping of hostile text, the PNG, and a real headless browser.

    python -m pytest tests/test_report_render.py -q
    (apt-get install -y chromium  to run the browser test; it is skipped without it)
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from aftune.protocol.challenge import derive_challenge
from aftune.errors import InputError, MissingExtra
from aftune.protocol.planner import Threat, threat_table
from aftune.reporting.html import FAIL, MISSING, NOT_SAMPLED, PASS, block_grid, render_html

HOSTILE_REASON = 'differs <script>alert("x")</script> from the committed one'
HOSTILE_TENSOR = '"><img src=x onerror=alert(1)>'
L, S = 4, 8


@pytest.fixture
def audit():
    """A synthetic audit: 10 challenged blocks; 2 fail, 1 has no result, 7 pass."""
    c = derive_challenge(bytes(range(32)), bytes([7]) * 32, L, S, "uniform", count=10)
    blocks, expected = [], {}
    for i, (l, s) in enumerate(c.blocks):
        if i == 9:
            expected[(l, s)] = MISSING  # the provider never opened it
            continue
        bad = i in (2, 5)
        findings = [{"layer_block": l, "step_block": s, "check": "output", "reason": HOSTILE_REASON,
                     "tensor": HOSTILE_TENSOR, "step": 2 * s + 1, "micro": 0, "expected": "dc2684028748a6e8",
                     "actual": "2ea0e8cc1dc764c6", "error": None}] if bad else []
        blocks.append({"layer_block": l, "step_block": s, "label": f"layer block {l} (layer.{2 * l}..layer.{2 * l + 1})",
                       "verdict": FAIL.upper() if bad else "PASS", "compared": 78, "max_error": 0.0,
                       "max_elem_error": 0.0, "errors_by_kind": {}, "seconds": 0.5, "findings": findings})
        expected[(l, s)] = FAIL if bad else PASS
    report = {"verdict": "FAIL", "mode": "strict", "run_dir": "bundle/<iframe src=http://evil>", "errors": [],
              "blocks": blocks}
    config = {"format": "aftune.run.v1", "settings": {"steps": 16, "steps_per_block": 2, "lr": 0.001,
                                                      "optimizer": "adamw", "seed": 0},
              "model": {"config": {"model_type": "llama</td><script>", "architectures": ["LlamaForCausalLM"]},
                        "base_weights": "ab" * 32},
              "layout": {"stages": [f"layer.{i}" for i in range(8)], "layer_blocks": [[0, 2], [2, 4], [4, 6], [6, 8]]}}
    threats = threat_table(c, [Threat("tampered_blocks", 2), Threat("skip_steps", 0.125)])
    return report, c, config, threats, expected


class _Page(HTMLParser):
    """Collects the tags, attributes and grid cells of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.cells, self.text = set(), [], {}, []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += [name for name, _ in attrs]
        a = dict(attrs)
        if tag == "td" and "data-l" in a:
            classes = a["class"].split()
            self.cells[(int(a["data-l"]), int(a["data-s"]))] = classes[1]

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


def test_grid_cells_carry_the_right_class(audit):
    report, c, config, threats, expected = audit
    page = parse(render_html(report, c.to_json(), config, threats))
    assert len(page.cells) == L * S
    for l in range(L):
        for s in range(S):
            assert page.cells[(l, s)] == expected.get((l, s), NOT_SAMPLED), (l, s)
    grid = block_grid(report, c.to_json())
    assert grid.counts() == {PASS: 7, FAIL: 2, MISSING: 1, NOT_SAMPLED: L * S - 10}


def test_hostile_strings_are_inert(audit):
    report, c, config, threats, _ = audit
    html = render_html(report, c.to_json(), config, threats)
    page = parse(html)
    allowed = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "p", "span", "section", "div",
               "table", "tr", "th", "td", "ul", "li", "code", "pre", "details", "summary", "br"}
    assert page.tags <= allowed, page.tags - allowed  # no script, img, iframe: the text stayed text
    assert not any(a.startswith("on") for a in page.attrs)
    text = "".join(page.text)
    assert HOSTILE_REASON in text and HOSTILE_TENSOR in text and "<iframe src=http://evil>" in text
    assert "&lt;script&gt;" in html and "<script" not in html.lower()


def test_page_is_self_contained(audit):
    report, c, config, threats, _ = audit
    html = render_html(report, c.to_json(), config, threats)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    head = html.split("</style>")[0]
    for needle in ("http://", "https://", "url(", "@import", "<link", "src="):
        assert needle not in head
    # The only external-looking text is the escaped hostile run_dir, as text.
    assert html.count("http://") == html.count("&lt;iframe src=http://evil&gt;")


def test_page_sections(audit):
    report, c, config, threats, _ = audit
    text = "".join(parse(render_html(report, c.to_json(), config, threats)).text)
    assert "FAIL" in text and "7 pass, 3 fail" in text
    assert "tampered-blocks 2" in text and "skip-steps 0.125" in text and "%" in text  # per-threat P(detect)
    assert "adamw" in text and "LlamaForCausalLM" in text  # config summary
    assert "Failures (2)" in text and "dc2684028748a6e8" in text and c.digest in text
    # Run-level errors (layer block -1) are listed as the run's.
    report = {**report, "errors": [{"layer_block": -1, "step_block": -1, "check": "opening", "reason": "bundle <b>bad"}]}
    text = "".join(parse(render_html(report)).text)
    assert "Failures (3)" in text and "bundle <b>bad" in text


def test_grid_without_challenge_or_config():
    report = {"verdict": "PASS", "blocks": [{"layer_block": 1, "step_block": 2, "verdict": "PASS", "findings": []}]}
    grid = block_grid(report)
    assert (grid.num_layer_blocks, grid.num_step_blocks) == (2, 3) and grid.state(1, 2) == PASS
    page = parse(render_html(report))
    assert page.cells[(1, 2)] == PASS and page.cells[(0, 0)] == NOT_SAMPLED
    # A block without an explicit PASS verdict is a failure.
    report["blocks"].append({"layer_block": 0, "step_block": 0, "verdict": "maybe"})
    assert block_grid(report).state(0, 0) == FAIL


@pytest.mark.parametrize("report", [
    [], {"blocks": "x"}, {"blocks": [{"layer_block": "1", "step_block": 0}]},
    {"blocks": [{"layer_block": True, "step_block": 0}]},
])
def test_malformed_reports_are_input_errors(report):
    with pytest.raises(InputError):
        render_html(report)


def test_block_outside_the_challenge_grid_is_an_input_error(audit):
    report, c, *_ = audit
    report["blocks"].append({"layer_block": L, "step_block": 0, "verdict": "PASS"})
    with pytest.raises(InputError):
        render_html(report, c.to_json())


def _colour_counts(path):
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    red = int(((r > 180) & (g < 90) & (b < 90)).sum())
    green = int(((g > 130) & (r < 100) & (b < 100)).sum())
    grey = int(((abs(r - 208) < 12) & (abs(g - 208) < 12) & (abs(b - 208) < 12)).sum())
    return red, green, grey


def test_png_grid(audit, tmp_path):
    pytest.importorskip("matplotlib")
    from aftune.reporting.plot import plot_grid

    report, c, config, *_ = audit
    path = plot_grid(report, tmp_path / "grid.png", challenge=c.to_json(), config=config)
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    red, green, grey = _colour_counts(path)
    assert red > 500 and green > 500 and grey > 1000  # fail, pass and not-sampled cells are drawn
    assert grey > green > red  # 22 grey cells, 7 green, 2 red (+ the legend's keys)


def test_png_needs_the_plot_extra(audit, tmp_path, monkeypatch):
    import sys

    from aftune.reporting.plot import plot_grid

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingExtra, match=r"aftune\[plot\]"):
        plot_grid(audit[0], tmp_path / "grid.png")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(audit, tmp_path):
    report, c, config, threats, _ = audit
    page = tmp_path / "report.html"
    page.write_text(render_html(report, c.to_json(), config, threats), encoding="utf-8")
    shot = tmp_path / "shot.png"
    cmd = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file() and shot.stat().st_size > 1000, "Chromium wrote no screenshot"
    red, green, grey = _colour_counts(shot)
    assert red > 200 and green > 500 and grey > 1000  # the grid is drawn, with its pass and fail cells


def test_cli_report(audit, tmp_path):
    import aftune.cli.plan  # noqa: F401  (registers the commands until cli.py imports it)
    from aftune.cli import app

    report, c, config, *_ = audit
    (tmp_path / "report.json").write_text(json.dumps({**report, "challenge": c.to_json()}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(app, ["report", str(tmp_path / "report.json"), "--config", str(tmp_path / "config.json"),
                                 "--html", str(tmp_path / "r.html"), "--png", str(tmp_path / "r.png"),
                                 "--poison-examples", "0.1"])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "r.html").read_text()
    assert "poison-examples 0.1" in html and c.digest in html and (tmp_path / "r.png").stat().st_size > 1000
    edited = {**report, "challenge": {**c.to_json(), "blocks": [[0, 0]]}}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    r = CliRunner().invoke(app, ["report", str(tmp_path / "edited.json"), "--html", str(tmp_path / "e.html")])
    assert r.exit_code == 2 and not (tmp_path / "e.html").exists()
