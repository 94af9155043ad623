"""The README's demo commands run as written (in a scratch directory) and PASS."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(name: str) -> list[str]:
    text = README.read_text()
    block = re.search(rf"<!-- readme-test: {name} -->\s*```bash\n(.*?)```", text, re.S)
    assert block, f"README lost its {name} block"
    joined = block.group(1).replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_commands(commands: list[str], cwd: Path) -> str:
    for command in commands:
        argv = shlex.split(command)
        env = dict(os.environ)
        while "=" in argv[0]:  # VAR=value prefixes, as a shell reads them
            name, _, value = argv.pop(0).partition("=")
            env[name] = value
        assert argv[0] == "aftune"
        done = subprocess.run([sys.executable, "-m", "aftune", *argv[1:]], cwd=cwd, capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_readme_setup_commands_come_first():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].startswith("pip install torch==2.13.0") and "aftune train" in first_block[0]
    assert "pytest" in first_block[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest -q -n auto" in ci and "torch==2.13.0" in ci


def test_readme_demo_and_two_party_flow_run_and_pass(tmp_path):
    commands = readme_commands("demo")
    assert commands[0].startswith("aftune agree") and commands[1].startswith("aftune train")
    assert commands[-1].endswith("--all") and all("--agreement agreement.json" in c for c in commands[1:])
    assert "PASS: 32/32 blocks pass" in run_commands(commands, tmp_path)
    # the client's files, as the two-party section describes them
    shutil.copy(tmp_path / "runs/demo/transcript.jsonl", tmp_path / "transcript.jsonl")
    shutil.copy(tmp_path / "runs/demo/config.json", tmp_path / "config.json")
    shutil.copy(tmp_path / "runs/demo/provider.key.pub", tmp_path / "provider.pub")
    infer, verify, receipt = readme_commands("inference")
    run_commands([infer, verify], tmp_path)
    expanded = str(next((tmp_path / "records" / "receipts").glob("*.json")))  # as the shell expands the glob
    assert "VALID receipt" in run_commands([receipt.replace("records/receipts/*.json", expanded)], tmp_path)
    out = run_commands(readme_commands("two-party"), tmp_path)
    assert "PASS: 4/4 blocks pass" in out  # 10% of 32 blocks, rounded up
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "grid.png").stat().st_size > 0


def test_readme_python_api_example_runs(tmp_path):
    text = README.read_text()
    block = re.search(r"<!-- readme-test: python-api -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its python-api block"
    done = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS: 8/8 blocks pass (strict mode)" in done.stdout


def test_readme_portable_run_passes_on_other_kernels(tmp_path):
    """The portable block: a run agreed in portable numerics verifies strict under ATen's default
    kernels and one thread."""
    commands = readme_commands("portable")
    assert "--numerics portable" in commands[0] and "ATEN_CPU_CAPABILITY=default" in commands[-1]
    assert "PASS: 8/8 blocks pass (strict mode)" in run_commands(commands, tmp_path)
