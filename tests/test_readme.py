"""The README as a newcomer runs it: in one fresh clone, after the set-up command, every block in
document order, as written, in a real shell, in that one directory.

Nothing is copied into place for it and no block gets a directory of its own: a block that needs a
file gets it from an earlier block, or the README is wrong. A block that cannot run here carries a
`<!-- readme-test: skip (REASON) -->` marker on the line before it; every other bash or python
block runs, and the test checks that each one did."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
SKIP = re.compile(r"skip \((.+)\)", re.S)
BLOCK_TIMEOUT_S = 900


@dataclass
class Block:
    lang: str  # "bash", "python" or "" (an output listing)
    body: str
    line: int  # the opening fence's line number, 1-based
    marker: str | None  # the readme-test marker on the line before the fence
    after: int | None  # index of the block this one directly follows (nothing but blank lines between)

    @property
    def label(self) -> str | None:
        return self.marker.split()[0] if self.marker else None

    @property
    def skip_reason(self) -> str | None:
        found = SKIP.fullmatch(self.marker or "")
        return found.group(1) if found else None


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i, last_close = 0, None  # last_close: the line index of the previous block's closing fence
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        assert j < len(lines), f"README line {i + 1}: a code block that never closes"
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        found = MARKER.fullmatch(lines[k].strip()) if k >= 0 else None
        follows = last_close is not None and all(not line.strip() for line in lines[last_close + 1:i])
        blocks.append(Block(lines[i][3:].strip(), "\n".join(lines[i + 1:j]) + "\n", i + 1,
                            found.group(1) if found else None, len(blocks) - 1 if follows else None))
        last_close, i = j, j + 1
    return blocks


def labelled(blocks: list[Block], label: str) -> Block:
    found = [b for b in blocks if b.label == label]
    assert len(found) == 1, f"README has {len(found)} blocks marked readme-test: {label}"
    return found[0]


def setup_train_command(block: Block) -> str:
    """The set-up block's first command, from its `aftune train`: the installs before it are this
    test's own environment."""
    command = block.body.splitlines()[0].split("&&")[-1].strip()
    assert command.startswith("aftune train --run-dir "), command
    return command


def test_readme_setup_commands_come_first():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].startswith("pip install torch==2.13.0") and "aftune train" in first_block[0]
    assert "pytest" in first_block[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest -q -n auto" in ci and "torch==2.13.0" in ci


def test_every_readme_block_is_run_or_marked_with_a_reason():
    blocks = readme_blocks()
    assert blocks[0].lang == "bash" and blocks[0].label == "setup", "the set-up block must come first"
    for b in blocks:
        assert b.lang in ("bash", "python", ""), f"README line {b.line}: a ```{b.lang} block the test cannot run"
        if b.marker and b.marker.startswith("skip"):
            assert b.skip_reason and len(b.skip_reason) > 20, f"README line {b.line}: skip without a reason"
        if b.lang == "":
            assert b.marker is None, f"README line {b.line}: a marker on an output listing"
    # the blocks whose outputs the end-to-end test checks
    for label in ("demo", "inference", "openai", "two-party", "checkpoints", "portable", "python-api", "real-models",
                  "trainer", "digest-boundaries", "several-processes"):
        assert labelled(blocks, label).skip_reason is None
    demo = labelled(blocks, "demo").body.splitlines()
    assert demo[0].startswith("aftune agree") and demo[1].startswith("aftune train")
    assert demo[-1].endswith("--all") and all("--agreement agreement.json" in c for c in demo[1:])
    portable = labelled(blocks, "portable").body
    assert "--numerics portable" in portable and "ATEN_CPU_CAPABILITY=default" in portable
    # the set-up command's run is there before the first block: no block may train into it again
    setup_run = setup_train_command(blocks[0]).split()[-1]
    assert not any(f"--run-dir {setup_run}\n" in b.body or f"--run-dir {setup_run} " in b.body
                   for b in blocks[1:]), f"a README block trains into {setup_run}, which the set-up command made"


def fresh_clone(dest: Path) -> Path:
    """The repository's tracked files as a clone has them (taken from the working tree)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, so no clone to imitate: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not in a clone of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def shell_env(bin_dir: Path) -> dict[str, str]:
    """The user's shell: `aftune` and `python` are this interpreter's."""
    bin_dir.mkdir()
    for name, run in (("aftune", f'"{sys.executable}" -m aftune'), ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> str:
    if block.lang == "python":
        argv = [sys.executable, "-c", block.body]
    else:
        argv = ["bash", "-e", "-c", block.body]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, (f"README line {block.line} (exit {done.returncode}):\n{block.body}\n"
                                  f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    return done.stdout


@pytest.mark.slow
def test_readme_runs_top_to_bottom_in_one_fresh_clone(tmp_path):
    blocks = readme_blocks()
    clone = fresh_clone(tmp_path / "clone")
    env = shell_env(tmp_path / "bin")
    ran, outputs, seconds = [], {}, {}
    for index, block in enumerate(blocks):
        if block.lang == "" or block.skip_reason:
            continue
        start = time.monotonic()
        if index == 0:  # the set-up command: aftune is installed already; its test suite is this one's
            body = setup_train_command(block)
            assert not (clone / body.split()[-1]).exists()
            outputs[index] = run_block(Block("bash", body + "\n", block.line, block.marker, None), clone, env)
        else:
            outputs[index] = run_block(block, clone, env)
        seconds[block.label or f"line {block.line}"] = round(time.monotonic() - start)
        ran.append(index)
        # an output listing right after a block: each of its lines is printed ("..." elides; the CLI
        # wraps long lines at the terminal width, so whitespace runs compare as one space)
        listing = next((b for b in blocks if b.after == index and b.lang == ""), None)
        if listing:
            expected = [" ".join(line.split()) for line in listing.body.splitlines() if line.strip() not in ("", "...")]
            printed = " ".join(outputs[index].split())
            missing = [line for line in expected if line not in printed]
            assert not missing, f"README line {listing.line}: not printed by the block above it: {missing}"

    runnable = [i for i, b in enumerate(blocks) if b.lang and not b.skip_reason]
    assert ran == runnable, "a README block that is not marked skip did not run"
    out = {b.label: " ".join(outputs.get(i, "").split()) for i, b in enumerate(blocks) if b.label}
    assert "PASS: 32/32 blocks pass (strict mode)" in out["demo"]
    assert "PASS: 4/4 blocks pass (strict mode)" in out["inference"] and "VALID receipt" in out["inference"]
    assert "VALID receipt" in out["openai"] and "the answer's text is the record's" in out["openai"]
    assert "PASS: 4/4 blocks pass (strict mode)" in out["openai"]
    assert "PASS: 4/4 blocks pass (strict mode)" in out["two-party"]  # 10% of 32 blocks, rounded up
    assert (clone / "report.html").stat().st_size > 0 and (clone / "grid.png").stat().st_size > 0
    assert "every tensor matched its digest" in out["checkpoints"]
    assert "PASS: 1/1 blocks pass (strict mode)" in out["checkpoints"]
    assert "PASS: 8/8 blocks pass (strict mode)" in out["portable"]
    assert "checkpoint interval 2" in out["digest-boundaries"] and "every tensor matched its digest" in out["digest-boundaries"]
    assert "PASS: 16/16 blocks pass (strict mode)" in out["digest-boundaries"]
    assert "PASS: 8/8 blocks pass (strict mode)" in out["python-api"]
    assert "PASS: 8/8 blocks pass (strict mode)" in out["trainer"]
    assert "PASS: 8/8 blocks pass (strict mode)" in out["several-processes"]  # 2 ranks, verified on one process
    print("README block seconds:", seconds)
