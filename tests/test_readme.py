"""The README's demo commands run as written (in a scratch directory) and PASS."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def demo_commands() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- readme-test: demo -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README lost its demo block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_setup_commands_come_first():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].startswith("pip install torch==2.13.0") and "aftune train" in first_block[0]
    assert "pytest" in first_block[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci and "torch==2.13.0" in ci


def test_readme_demo_runs_and_passes(tmp_path):
    commands = demo_commands()
    assert commands[0].startswith("aftune train") and commands[-1].endswith("--all")
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "aftune"
        done = subprocess.run([sys.executable, "-m", "aftune", *argv[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert "PASS: 32/32 blocks pass" in done.stdout
