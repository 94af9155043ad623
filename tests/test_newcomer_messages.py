"""A newcomer's first hour (issue 25): --version, help texts that describe every flag and write
defaults one way, messages that say what is wrong (an empty data file, a missing model
directory, a floored calibration, a FAIL that is not about a block), inference challenges that
list inference threats, demo outputs ignored by git, skip reasons shown, and no secret ever
echoed. Built-in tiny model; every CLI call in-process."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from conftest import invoke

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("--steps", 2, "--batch-size", 4, "--steps-per-block", 2, "--layers-per-block", 4,  # 2 blocks
            "--boundaries", "stored")
PROMPT = "Q: What is 3 plus 4? A:"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The built-in demo at its smallest: an agreement, a run, one inference record, and a private
    key made by `aftune keygen` (to be passed where a public key is expected)."""
    root = tmp_path_factory.mktemp("newcomer")
    run, agreement, records = root / "demo", root / "agreement.json", root / "records"
    assert invoke("agree", *SETTINGS, "--out", agreement).exit_code == 0
    r = invoke("train", "--run-dir", run, "--agreement", agreement)
    assert r.exit_code == 0, r.output
    r = invoke("infer", "--model", run, "--prompt", PROMPT, "--record-dir", records, "--max-new-tokens", 3)
    assert r.exit_code == 0, r.output
    assert invoke("keygen", root / "secret.key").exit_code == 0
    return {"root": root, "run": run, "agreement": agreement, "records": records, "pub": run / "provider.key.pub",
            "secret": root / "secret.key"}


# --- --version -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_the_version_and_exits_0(flag):
    from aftune.version import __version__

    r = invoke(flag)
    assert r.exit_code == 0 and r.stdout == f"aftune {__version__}\n"


# --- help texts -------------------------------------------------------------------------------------

def _commands():
    """(path, command) of every command, groups included."""
    import typer
    from typer._click.core import Context

    from aftune.cli import app

    def walk(command, path, ctx):
        yield path, command
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                yield from walk(sub, path + [name], Context(sub, parent=ctx, info_name=name))

    root = typer.main.get_command(app)
    return list(walk(root, [], Context(root, info_name="aftune")))


def _help(*path: str) -> str:
    from typer.testing import CliRunner

    from aftune.cli import app

    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    return r.output


def test_every_flag_has_help_and_defaults_are_written_one_way():
    short = set()
    for path, command in _commands():
        for p in command.params:
            if getattr(p, "hidden", False):
                continue
            text = (p.help or "").strip()
            assert text, f"aftune {' '.join(path)} {p.opts}: no help text"
            # a default is typer's "[default: ...]" (show_default=...), never written into the help
            assert not re.search(r"\(default\b|\bdefault:", text, re.I), f"aftune {' '.join(path)} {p.opts}: {text}"
            short |= {(" ".join(path), o) for o in p.opts if re.fullmatch(r"-[a-zA-Z]", o)}
    assert {("verify", "-l"), ("verify", "-s"), ("prepare", "-l"), ("prepare", "-s")} <= short


def test_rendered_help_has_no_type_tags_on_flags_and_one_default_style():
    for path in (["verify"], ["train"], ["agree"], ["prepare"], []):
        text = _help(*path)
        assert "<bool>" not in text, path
        assert not re.search(r"\(default\b|(?<!\[)\bdefault:", text), path
    verify = _help("verify")
    for flag, words in (("--layer-block", "The layer block to verify"), ("--step-block", "The step block to verify"),
                        ("--transcript", "[default: (the run directory's")):
        row = next(line for line in verify.splitlines() if flag in line)
        assert words in row or words in verify.split(flag, 1)[1][:400], (flag, row)
    assert "[default: strict]" in verify
    train = _help("train")
    assert "[default: (the built-in tiny Llama)]" in train and "[default: 32]" in train
    assert "[default: (the built-in tiny Llama)]" in _help("agree")
    assert "--version" in _help() and "Print aftune's version" in _help()


# --- messages ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_data_file_says_it_is_empty(tmp_path, content):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    for args in (("train", "--run-dir", tmp_path / "r", "--data", data, "--steps", 1),
                 ("agree", "--data", data, "--out", tmp_path / "a.json")):
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        assert "is empty" in r.stderr and "not JSON" not in r.output and "Traceback" not in r.output
    from aftune.data.datasets import load_dataset
    from aftune.errors import InputError

    for kind in (None, "text", "labeled_text"):
        with pytest.raises(InputError, match="is empty"):
            load_dataset(data, kind)


def test_a_missing_model_directory_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-model"
    for args in (("train", "--run-dir", tmp_path / "r", "--base-model", missing, "--steps", 1),
                 ("agree", "--base-model", missing, "--out", tmp_path / "a.json"),
                 ("digest", missing)):
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        assert f"model directory {missing} does not exist" in r.stderr and "config.json" not in r.output
    (tmp_path / "empty").mkdir()
    r = invoke("digest", tmp_path / "empty")  # a directory that is there but holds no model: say what it lacks
    assert r.exit_code == 2 and "it has no config.json" in r.stderr


def test_calibrate_says_when_it_floors_a_threshold(demo):
    r = invoke("calibrate", demo["run"], "--public-key", demo["pub"], "--agreement", demo["agreement"])
    assert r.exit_code == 0, r.output
    # a replay on the machine that recorded is bitwise: every honest error is 0, every threshold the floor
    assert re.search(r"note: thresholds floored at the minimum 1e-07 for activation\b", r.stdout), r.stdout
    assert "--rel-l2 1e-07" in r.stdout


def test_a_fail_that_is_not_about_a_block_never_reads_as_blocks_passing(demo):
    args = ("verify-inference", demo["records"], "--all", "--public-key", demo["pub"], "--run-dir", demo["run"],
            "--max-new-tokens", 3)
    good = invoke(*args, "--prompt", PROMPT)
    assert good.exit_code == 0 and good.stdout.splitlines()[-1].startswith("PASS: "), good.output
    blocks = re.search(r"PASS: (\d+)/\1 blocks pass", good.stdout).group(1)
    wrong = invoke(*args, "--prompt", "Q: What is 2 plus 2? A:")
    assert wrong.exit_code == 1, wrong.output
    summary = wrong.stdout.splitlines()[-1]
    assert summary.startswith("FAIL: record: input: the record answers another prompt"), summary
    assert f"{blocks}/{blocks} blocks pass" not in summary and f"{blocks}/{blocks} replayed blocks pass" in summary


def test_training_and_inference_summaries_read_alike():
    from aftune.verdict.findings import RECORD, RUN, BlockResult, Finding, Report

    for scope, label in ((RUN, "run"), (RECORD, "record")):
        report = Report("x", "strict", results=[BlockResult(0, 0, "layer block 0", compared=3, scope=scope)])
        assert report.summary() == "PASS: 1/1 blocks pass (strict mode)"
        report.errors.append(Finding(-1, -1, "config", "not the agreed settings", scope=scope))
        assert report.summary() == f"FAIL: {label}: config: not the agreed settings (strict mode; 1/1 replayed blocks pass)"
        report.results.append(BlockResult(1, 0, "layer block 1", compared=0, scope=scope))
        assert report.summary().startswith(f"FAIL: {label}: config: not the agreed settings (strict mode; 1/2 "
                                           "replayed blocks pass); first failing block: FAIL layer block 1")
        assert Report("x", "strict", errors=report.errors[:1]).summary().endswith("(strict mode; nothing replayed)")
        blocks_only = Report("x", "strict", results=report.results)
        assert blocks_only.summary().startswith("FAIL: 1/2 blocks pass (strict mode); first failure: FAIL layer block 1")


# --- inference challenges list inference threats ------------------------------------------------------

_TRAINING_THREATS = ("skipped step", "poisoned example", "skip-steps", "poison-examples")


def test_an_inference_challenge_lists_only_inference_threats(tmp_path):
    challenge = tmp_path / "challenge.json"
    r = invoke("challenge", "--record-root", "ab" * 32, "--layer-blocks", 4, "--sample-blocks", 2, "--out", challenge)
    assert r.exit_code == 0, r.output
    assert "one tampered layer block" in r.stdout and "another model served" in r.stdout
    assert not any(t in r.stdout for t in _TRAINING_THREATS), r.stdout
    r = invoke("plan", "--challenge", challenge)
    assert r.exit_code == 0 and "one tampered layer block" in r.stdout
    assert not any(t in r.stdout for t in _TRAINING_THREATS), r.stdout
    r = invoke("plan", "--challenge", challenge, "--skip-steps", 0.1)
    assert r.exit_code == 2 and "threat to training" in r.stderr
    from aftune.protocol.challenge import derive_challenge
    from aftune.protocol.planner import assess_challenge

    training = assess_challenge(derive_challenge(bytes(32), bytes(32), 4, 2, "uniform", count=2))
    assert {m.threat.kind for m in training.threats} >= {"skip_steps", "poison_examples"}  # training: unchanged


# --- the repository ----------------------------------------------------------------------------------

_OUTPUT_FLAGS = {"--out", "--run-dir", "--record-dir", "--report-html", "--report-png", "--report-json", "--file",
                 "--api-keys", "--attest-out", "--work-dir"}


def _readme_commands() -> list[list[str]]:
    """Every `aftune` command of the README: its bash blocks, and inline `aftune ...` spans."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`(aftune [^`]+)`", text)
    commands = []
    for line in lines:
        line = line.split(" #")[0].split("&&")[-1].strip()
        try:
            argv = shlex.split(line)
        except ValueError:
            continue
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            argv.pop(0)  # VAR=value prefixes
        if argv[:1] == ["aftune"]:
            commands.append(argv)
    return commands


def _written_names(argv: list[str]) -> set[str]:
    """The top-level names a README command writes (or reads, where an earlier one wrote them)."""
    names = set()
    for i, arg in enumerate(argv[1:], start=1):
        arg, given_to = arg.strip("[]"), argv[i - 1].strip("[]")
        if not arg or arg.startswith("-") or re.fullmatch(r"[A-Z_]+", arg) or "://" in arg:
            continue  # a flag, a placeholder (RUN, PUB) or an address
        pathlike = "/" in arg or re.search(r"\.(json|jsonl|pub|key|html|png|txt|pem)$", arg)
        if given_to in _OUTPUT_FLAGS or (pathlike and given_to not in ("--prompt", "--text")):
            names.add(arg.split("/")[0])
        if argv[1:2] == ["keygen"] and i == 2:
            names |= {arg, arg + ".pub"}
    return names


def _ignored(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        anchored = p.startswith("/")
        p = p.strip("/")
        if fnmatch.fnmatch(name, p) and (anchored or "/" not in p):
            return True
    return False


def test_what_the_readme_commands_write_is_ignored_by_git():
    patterns = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = {"src", "tests", "docs", "benchmarks", "scripts", "README.md", "SPEC.md", "pyproject.toml"}
    names = set().union(*(_written_names(argv) for argv in _readme_commands())) - tracked
    assert {"runs", "agreement.json", "records", "bundle", "challenge.json"} <= names  # the parse finds them
    # defaults of commands the README runs without naming where they write
    names |= {"attack-work", "partition-records", "transcript.jsonl", "provider.pub"}
    missing = sorted(n for n in names if not _ignored(n, patterns))
    assert not missing, f".gitignore misses what the README's commands write: {missing}"


def test_pytest_lists_why_tests_skip():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-rs" in shlex.split(options["addopts"])


# --- no secret material in any message ------------------------------------------------------------------

def _secret_texts(path: Path) -> list[str]:
    """The private key's text as it could leak: its base64 body, and its raw seed in hex and base64."""
    import base64

    from cryptography.hazmat.primitives import serialization

    pem = path.read_text()
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    return [body, body[:24], seed.hex(), seed.hex()[:24], base64.b64encode(seed).decode()[:24]]


def _public_key_commands(demo, tmp_path):
    """(command, args with KEY where a public key goes) for every command that takes one."""
    from aftune.attestation.providers import provider_by_name
    from aftune.attestation.serving import serving_evidence
    from aftune.core.signing import PublicKey

    run, agreement, records, pub = demo["run"], demo["agreement"], demo["records"], str(demo["pub"])
    nonce = "11" * 32
    receipt = next((records / "receipts").glob("*.json"))
    verdict = tmp_path / "verdict.json"
    r = invoke("verify", run, "--public-key", pub, "--agreement", agreement, "--all", "--attest", "unsafe-simulated",
               "--attestation-nonce", nonce, "--attest-out", verdict)
    assert r.exit_code == 0, r.output
    run_root = json.loads(verdict.read_text())["run"]["run_root"]
    serving = tmp_path / "attestation.json"
    evidence = serving_evidence(provider_by_name("unsafe-simulated"), bytes.fromhex(nonce), algorithm="blake3",
                                model_digest=bytes(32), receipt_key=PublicKey.load(pub))
    serving.write_text(json.dumps(evidence.to_json()))
    # a signed partition record (what `aftune partition check` reads before the key); its content does
    # not matter here, and `aftune partition run` would start a trusted worker process
    from aftune.core.signing import SigningKey
    from aftune.partition.record import new_body, sign_record

    partition_record = sign_record(new_body(hash="blake3"), SigningKey.generate()).write(tmp_path / "partition")
    return [
        ("verify", ["verify", run, "--public-key", "KEY", "--agreement", agreement, "--all"]),
        ("verify --client-public-key", ["verify", run, "--public-key", pub, "--client-public-key", "KEY",
                                        "--agreement", agreement, "--all"]),
        ("calibrate", ["calibrate", run, "--public-key", "KEY", "--agreement", agreement]),
        ("prepare", ["prepare", run, "--public-key", "KEY", "-l", 0, "-s", 0, "--agreement", agreement]),
        ("verify-inference", ["verify-inference", records, "--all", "--public-key", "KEY", "--run-dir", run,
                              "--prompt", PROMPT, "--max-new-tokens", 3]),
        ("verify-receipt", ["verify-receipt", receipt, "--public-key", "KEY", "--record-dir", records]),
        ("audit", ["audit", run, "--public-key", "KEY", "--agreement", agreement, "--sample-rate", 0.5]),
        ("challenge", ["challenge", run / "transcript.jsonl", "--public-key", "KEY", "--agreement", agreement,
                       "--sample-rate", 0.5, "--out", tmp_path / "challenge.json"]),
        ("check", ["check", run, "--public-key", "KEY"]),
        ("attestation verify-run", ["attestation", "verify-run", run, "--public-key", "KEY", "--attestation-nonce",
                                    nonce, "--attest", "unsafe-simulated", "--out", tmp_path / "v2.json",
                                    "--agreement", agreement]),
        ("attestation check-verdict", ["attestation", "check-verdict", verdict, "--attestation-nonce", nonce,
                                       "--run-root", run_root, "--public-key", "KEY", "--agreement", agreement,
                                       "--unsafe-accept-simulated"]),
        ("attestation check-serving", ["attestation", "check-serving", serving, "--attestation-nonce", nonce,
                                       "--model-digest", "00" * 32, "--public-key", "KEY",
                                       "--unsafe-accept-simulated"]),
        ("partition check", ["partition", "check", partition_record, "--public-key", "KEY"]),
    ]


def test_every_command_taking_a_public_key_refuses_a_private_one_without_echoing_it(demo, tmp_path):
    secret = demo["secret"]
    leaks = _secret_texts(secret)
    pem = secret.read_text()
    body = leaks[0]
    commands = _public_key_commands(demo, tmp_path)
    # every option that takes a public key is exercised (a new one must be added above)
    taking = {(" ".join(path), o) for path, command in _commands() if not hasattr(command, "list_commands")
              for p in command.params for o in p.opts if re.fullmatch(r"--(\w+-)*public-key", o)}
    exercised = {(name.split(" --")[0], args[args.index("KEY") - 1]) for name, args in commands}
    assert taking <= exercised, sorted(taking - exercised)
    for name, args in commands:
        for given in (str(secret), pem, pem.strip(), body):  # the key file, or its text pasted in place of a path
            r = invoke(*[given if a == "KEY" else a for a in args])
            assert r.exit_code == 2, (name, r.output)
            assert "Traceback" not in r.output
            for leak in leaks:
                assert leak not in r.output, (name, given == str(secret), r.output)
            if given == str(secret):
                assert "private key" in r.stderr and "not shown" in r.stderr, (name, r.output)
