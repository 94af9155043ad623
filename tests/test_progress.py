"""Progress of the long commands (issue 25): on stderr, what is being done, done/total in steps,
blocks or rows, the rate, elapsed time and ETA (training: the last loss too); drawn only when
stderr is a terminal and never with --quiet, so that pipes, CI logs and these tests get exactly
the command's output.

CliRunner's stderr is not a terminal; the `terminal` fixture swaps the CLI's stderr console for
one that says it is (rich's `force_terminal`), as a terminal would."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import invoke
from rich.console import Console

SETTINGS = ("--steps", 4, "--batch-size", 4, "--steps-per-block", 2, "--layers-per-block", 4, "--boundaries", "stored")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    return _ANSI.sub("", text)


def drawn(text: str) -> bool:
    """Whether any progress display is in `text`."""
    text = plain(text)
    return "ETA" in text or "elapsed" in text or "━" in text


@pytest.fixture
def terminal(monkeypatch):
    """stderr is a terminal, for the CLI's progress helper."""
    import aftune.cli  # noqa: F401  (aftune.cli.app, the module: `aftune.cli.app` is the Typer app's name too)

    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys.modules["aftune.cli.app"], "err", Console(stderr=True, force_terminal=True, width=120))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of the built-in model, trained as in a pipe (CliRunner: stderr is no terminal)."""
    run = tmp_path_factory.mktemp("progress") / "run"
    r = invoke("train", "--run-dir", run, *SETTINGS)
    assert r.exit_code == 0, r.output
    return run, r


def test_train_on_a_terminal_shows_steps_rate_elapsed_eta_and_loss(terminal, tmp_path):
    r = invoke("train", "--run-dir", tmp_path / "run", *SETTINGS)
    assert r.exit_code == 0, r.output
    last = [line for line in re.split(r"[\r\n]", plain(r.stderr)) if "4/4 steps" in line][-1]
    assert last.startswith("training")
    assert re.search(r"(steps/s|s/step)", last) and "elapsed" in last and "ETA" in last
    assert re.search(r"loss \d+\.\d{4}", last)
    assert r.stdout.startswith("run recorded in ") and not drawn(r.stdout)


def test_train_with_quiet_draws_no_progress_on_a_terminal(terminal, tmp_path):
    r = invoke("train", "--run-dir", tmp_path / "run", *SETTINGS, "--quiet")
    assert r.exit_code == 0, r.output
    assert not drawn(r.stderr) and "steps" not in plain(r.stderr)
    assert r.stdout.startswith("run recorded in ")


def test_train_in_a_pipe_prints_no_progress(trained):
    _, r = trained
    assert not drawn(r.stderr) and not drawn(r.stdout) and "4/4 steps" not in r.output
    assert r.stdout.startswith("run recorded in ")
    assert all(f"\n{head}" in r.stdout for head in ("run root:", "model:", "provider public key:"))


def _verify(run, *extra):
    return invoke("verify", run, "--public-key", run / "provider.key.pub", "--unsafe-no-agreement",
                  "--transcript", run / "transcript.jsonl", "--all", *extra)


def test_verify_all_on_a_terminal_shows_blocks_and_stdout_is_unchanged(terminal, trained):
    run, _ = trained
    r = _verify(run)
    assert r.exit_code == 0, r.output
    last = [line for line in re.split(r"[\r\n]", plain(r.stderr)) if line.startswith("verifying")][-1]
    assert "4/4 blocks" in last and re.search(r"(blocks/s|s/block)", last) and "ETA" in last
    assert "PASS: 4/4 blocks pass" in r.stdout and not drawn(r.stdout)


def test_verify_all_with_quiet_or_in_a_pipe_prints_no_progress(trained, monkeypatch):
    run, _ = trained
    piped = _verify(run)
    assert piped.exit_code == 0, piped.output
    assert not drawn(piped.stderr) and "verifying" not in piped.output
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys.modules["aftune.cli.app"], "err", Console(stderr=True, force_terminal=True, width=120))
    quiet = _verify(run, "-q")
    assert quiet.exit_code == 0, quiet.output
    assert not drawn(quiet.stderr) and quiet.stdout == piped.stdout


def test_a_local_audit_shows_the_opening_then_the_audit(terminal, trained):
    run, _ = trained
    r = invoke("audit", run, "--public-key", run / "provider.key.pub", "--unsafe-no-agreement", "--strategy", "all")
    assert r.exit_code == 0, r.output
    lines = re.split(r"[\r\n]", plain(r.stderr))
    assert any(line.startswith("opening") and "4/4 blocks" in line for line in lines)
    assert any(line.startswith("auditing") and "4/4 blocks" in line and "PASS" in line for line in lines)
    assert not drawn(r.stdout)


def _fake_eval_detection(monkeypatch):
    """eval-detection's table without its runs: each row announced through `progress`, as the real one."""
    import aftune.attacks.evaluate as evaluate

    def fake(out_dir, *, attacks=None, extra_rows=(), progress=None, **_):
        for name in ("honest run", *attacks, "quant-serving"):
            progress(name)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval-detection.md").write_text("| attack |\n")
        return {"rows": [], "seconds": 1.0}

    monkeypatch.setattr(evaluate, "eval_detection", fake)


def test_eval_detection_counts_its_rows(terminal, monkeypatch, tmp_path):
    _fake_eval_detection(monkeypatch)
    r = invoke("eval-detection", "--out", tmp_path / "eval", "--attacks", "bitflip,quant-serving")
    assert r.exit_code == 0, r.output
    lines = re.split(r"[\r\n]", plain(r.stderr))
    last = [line for line in lines if line.startswith("evaluating")][-1]
    assert "3/3 rows" in last and "elapsed" in last and "ETA" in last
    assert "bitflip…" not in plain(r.stderr)  # on a terminal the progress line says it


def test_eval_detection_in_a_pipe_prints_its_lines_and_with_quiet_nothing(monkeypatch, tmp_path):
    _fake_eval_detection(monkeypatch)
    r = invoke("eval-detection", "--out", tmp_path / "eval", "--attacks", "bitflip,quant-serving")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == ["honest run…", "bitflip…", "quant-serving…"]
    r = invoke("eval-detection", "--out", tmp_path / "eval2", "--attacks", "bitflip,quant-serving", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
