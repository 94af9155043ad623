"""The command line: exit codes 0 PASS, 1 FAIL, 2 bad input; clear messages, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import invoke, loose_objects, manifest_doc



SETTINGS = ("--steps", 4, "--batch-size", 4, "--steps-per-block", 2, "--layers-per-block", 4, "--boundaries", "stored")


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    """The client writes its agreement for the built-in model and data; the provider trains under it."""
    from aftune.builtin import DATA_FILE, MODEL_DIR

    run = tmp_path_factory.mktemp("cli") / "demo"
    r = invoke("agree", "--base-model", MODEL_DIR, "--data", DATA_FILE, *SETTINGS, "--out", agreement(run))
    assert r.exit_code == 0, r.output
    r = invoke("train", "--run-dir", run, "--agreement", agreement(run))
    assert r.exit_code == 0, r.output
    assert "run root" in r.output
    return run


@pytest.fixture
def run_copy(builtin_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(builtin_run, dst)
    shutil.copy(agreement(builtin_run), agreement(dst))
    return dst


def pub(run):
    return run / "provider.key.pub"


def agreement(run):
    return run.with_name(run.name + ".agreement.json")


def test_honest_builtin_run_passes_with_exit_0(builtin_run):
    r = invoke("verify", builtin_run, "--agreement", agreement(builtin_run), "--public-key", pub(builtin_run), "--all")
    assert r.exit_code == 0, r.output
    assert "PASS: 4/4 blocks pass" in r.output
    r = invoke("verify", builtin_run, "--agreement", agreement(builtin_run), "--public-key", pub(builtin_run), "-l", 1, "-s", 1, "--json")
    assert r.exit_code == 0
    report = json.loads(r.stdout)
    assert report["verdict"] == "PASS" and report["blocks"][0]["compared"] > 0


def test_model_written_in_hugging_face_format(builtin_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(builtin_run / "model")
    tok = AutoTokenizer.from_pretrained(builtin_run / "model")
    assert model.config.model_type == "llama" and tok("Q: hi")["input_ids"]
    digest = invoke("digest", builtin_run / "model")
    final = json.loads((builtin_run / "transcript.jsonl").read_text().splitlines()[-1])["final_model_digest"]
    assert f"model   {final}" in digest.output  # the run root binds weights, config and tokenizer files
    config = json.loads((builtin_run / "config.json").read_text())
    assert f"weights {config['model']['base_weights']}" not in digest.output  # fine-tuned: not the base weights


@pytest.mark.parametrize("args, message", [
    ((), "Usage"),
    (("verify", "RUN", "--all"), "--public-key"),
    (("verify", "RUN", "--public-key", "PUB", "--all"), "aftune agree"),
    (("verify", "RUN", "--agreement", "/nonexistent.json", "--public-key", "PUB", "--all"), "is missing"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "-l", "0"), "--step-block"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "-l", "9", "-s", "0"), "layer block 9 does not exist"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "-l", "0", "-s", "7"), "step block 7 does not exist"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "ed25519:zz", "--all"), "not hex"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "/nonexistent.pub", "--all"), "does not exist"),
    (("verify", "/nonexistent-run", "--agreement", "AGR", "--public-key", "PUB", "--all"), "does not exist"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "--all", "--mode", "fuzzy"), "mode must be one of"),
    (("verify", "RUN", "--agreement", "AGR", "--public-key", "PUB", "--all", "--dtype", "float64"), "--mode tolerance"),
])
def test_bad_usage_exits_2(builtin_run, args, message):
    names = {"RUN": builtin_run, "PUB": pub(builtin_run), "AGR": agreement(builtin_run)}
    args = [str(names.get(a, a)) for a in args]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_bad_training_settings_are_all_reported(tmp_path):
    r = invoke("train", "--run-dir", tmp_path / "r", "--steps", 0, "--lr", -1, "--optimizer", "lion")
    assert r.exit_code == 2
    for problem in ("steps must be a positive integer", "lr must be", "optimizer must be one of"):
        assert problem in r.output


def test_existing_run_dir_is_never_overwritten(builtin_run):
    r = invoke("train", "--run-dir", builtin_run, "--steps", 1)
    assert r.exit_code == 2 and "never overwritten" in r.output


def test_malformed_dataset_lines_are_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok"}\n{"txt": 1}\nnot json\n')
    r = invoke("train", "--run-dir", tmp_path / "r", "--data", data, "--steps", 1)
    assert r.exit_code == 2 and "line 2" in r.output and "line 3" in r.output


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("target, message", [
    ("manifest", "truncated or corrupt"),
    ("pack", "truncated"),
    ("object", "truncated or corrupt"),
    ("transcript", "not JSON"),
    ("missing-manifest", "is missing"),
    ("missing-object", "is not stored"),
    ("data", "does not match the committed dataset root"),
])
def test_damaged_records_exit_2_or_fail_never_pass(run_copy, target, message):
    if target == "manifest":
        _truncate(run_copy / "manifests" / "000001.json.zst")
    elif target == "missing-manifest":
        (run_copy / "manifests" / "000001.json.zst").unlink()
    elif target == "pack":
        _truncate(sorted((run_copy / "objects" / "pack").glob("000001-*.pack"))[0])
    elif target in ("object", "missing-object"):
        row = next(r for r in manifest_doc(run_copy, 1)["common"] if r[0].endswith("boundary/0001/gradient"))
        loose_objects(run_copy)  # one object alone is cut or removed
        path = run_copy / "objects" / row[4][:2] / f"{row[4]}.safetensors.zst"
        _truncate(path) if target == "object" else path.unlink()
    elif target == "transcript":
        _truncate(run_copy / "transcript.jsonl", 0.7)
    elif target == "data":
        path = next((run_copy / "data").iterdir())
        path.write_text(path.read_text().replace("plus", "minus", 1))
    r = invoke("verify", run_copy, "--agreement", agreement(run_copy), "--public-key", pub(run_copy), "--all")
    expected = 1 if target == "data" else 2  # edited data contradicts the commitment: FAIL
    assert r.exit_code == expected, r.output
    assert message in r.output
    assert "PASS:" not in r.output


def test_edited_config_fails_with_exit_1(run_copy):
    cfg = run_copy / "config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b'"lr":0.001', b'"lr":0.002'))
    r = invoke("verify", run_copy, "--agreement", agreement(run_copy), "--public-key", pub(run_copy), "--all")
    assert r.exit_code == 1 and "does not match the config digest" in r.output


def test_wrong_public_key_fails_with_exit_1(run_copy, tmp_path):
    invoke("keygen", tmp_path / "other.key")
    r = invoke("verify", run_copy, "--agreement", agreement(run_copy), "--public-key", tmp_path / "other.key.pub", "--all")
    assert r.exit_code == 1 and "not by the pinned provider key" in r.output


def test_tampered_block_exits_1_and_is_named(run_copy):
    from aftune.core.store import ObjectStore, TensorRef
    from safetensors.torch import save
    import zstandard

    row = next(r for r in manifest_doc(run_copy, 1)["common"] if r[0].endswith("boundary/0001/gradient"))
    ref = TensorRef(row[1], row[2], tuple(row[3]), bytes.fromhex(row[4]))
    t = ObjectStore(run_copy / "objects", "blake3").get(ref, "test") * 1.001
    loose_objects(run_copy)  # the edited object replaces the packed one
    (run_copy / "objects" / row[4][:2] / f"{row[4]}.safetensors.zst").write_bytes(
        zstandard.ZstdCompressor().compress(save({row[1]: t})))
    r = invoke("verify", run_copy, "--agreement", agreement(run_copy), "--public-key", pub(run_copy), "--all")
    assert r.exit_code == 1
    assert "FAIL layer block 0" in r.output and "step block 1" in r.output and "altered" in r.output


def test_keygen_refuses_to_overwrite(tmp_path):
    assert invoke("keygen", tmp_path / "k").exit_code == 0
    r = invoke("keygen", tmp_path / "k")
    assert r.exit_code == 2 and "never overwritten" in r.output


def test_console_script_exit_codes(builtin_run):
    ok = subprocess.run([sys.executable, "-m", "aftune", "verify", str(builtin_run), "--public-key",
                         str(pub(builtin_run)), "--agreement", str(agreement(builtin_run)), "-l", "0", "-s", "0"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "aftune", "verify", str(builtin_run)], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_agreed_base_model_and_data_are_checked(builtin_run, tmp_path):
    """The client's own agreement, written from other data or another base model, FAILs the run,
    naming what differs; the honest one PASSes; none at all is refused unless the user says unsafe."""
    from aftune.builtin import DATA_FILE, MODEL_DIR

    ok = invoke("verify", builtin_run, "--agreement", agreement(builtin_run), "--public-key", pub(builtin_run),
                "-l", 0, "-s", 0)
    assert ok.exit_code == 0, ok.output
    other = tmp_path / "other.jsonl"
    other.write_text((DATA_FILE).read_text().replace("plus", "minus", 1))
    assert invoke("agree", "--base-model", MODEL_DIR, "--data", other, *SETTINGS, "--out", tmp_path / "a1").exit_code == 0
    r = invoke("verify", builtin_run, "--agreement", tmp_path / "a1", "--public-key", pub(builtin_run), "-l", 0, "-s", 0)
    assert r.exit_code == 1 and "not trained on the agreed dataset" in r.output and "config.data.root" in r.output
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(MODEL_DIR, tmp_path / "base")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # a base model one weight away from the agreed one
    m.save_pretrained(tmp_path / "base")
    assert invoke("agree", "--base-model", tmp_path / "base", "--data", DATA_FILE, *SETTINGS,
                  "--out", tmp_path / "a2").exit_code == 0
    r = invoke("verify", builtin_run, "--agreement", tmp_path / "a2", "--public-key", pub(builtin_run), "--all")
    assert r.exit_code == 1 and "did not start from the agreed base model" in r.output
    assert "config.model.base_weights" in r.output
    r = invoke("verify", builtin_run, "--public-key", pub(builtin_run), "--all")
    assert r.exit_code == 2 and "aftune agree" in r.output and "PASS" not in r.output
    r = invoke("verify", builtin_run, "--public-key", pub(builtin_run), "--all", "--unsafe-no-agreement")
    assert r.exit_code == 0 and "only the record's consistency with itself was checked" in r.output


# --- one place maps AftuneError to an exit code (cli/app.py: report_error) -----------------------

def _deep_failure(monkeypatch, error):
    """`aftune check` with its library call raising `error` from deep inside."""
    import aftune.protocol.check as library

    def check_path(*args, **kwargs):
        raise error

    monkeypatch.setattr(library, "check_path", check_path)


def _key_text():
    from aftune.core.signing import SigningKey

    return SigningKey.generate().public_key.text


def test_an_error_from_deep_in_the_library_exits_2_without_traceback(monkeypatch, tmp_path):
    from aftune.errors import InputError

    _deep_failure(monkeypatch, InputError("the deep input is wrong"))
    r = invoke("check", tmp_path, "--public-key", _key_text())
    assert r.exit_code == 2 and "error: the deep input is wrong" in r.stderr and r.stdout == ""


def test_a_commitment_mismatch_from_deep_in_the_library_is_a_fail(monkeypatch, tmp_path):
    from aftune.errors import CommitmentMismatch

    _deep_failure(monkeypatch, CommitmentMismatch("the deep record is tampered"))
    r = invoke("check", tmp_path, "--public-key", _key_text())
    assert r.exit_code == 1 and r.stdout.startswith("FAIL: the deep record is tampered") and r.stderr == ""
    r = invoke("check", tmp_path, "--public-key", _key_text(), "--json")  # asked for JSON: JSON
    assert r.exit_code == 1
    assert json.loads(r.stdout) == {"verdict": "FAIL", "errors": [{"check": "record",
                                                                  "reason": "the deep record is tampered"}]}


_MAIN = """
import sys
import aftune.protocol.check as library
from aftune.errors import {cls}

def check_path(*args, **kwargs):
    raise {cls}("raised deep in the library")

library.check_path = check_path
sys.argv[0] = "aftune"
from aftune.cli import main
main()
"""


@pytest.mark.parametrize("cls, code, stream, prefix", [("InputError", 2, "stderr", "error: "),
                                                       ("CommitmentMismatch", 1, "stdout", "FAIL: ")])
def test_main_gives_the_same_exit_codes(tmp_path, cls, code, stream, prefix):
    done = subprocess.run([sys.executable, "-c", _MAIN.format(cls=cls), "check", str(tmp_path), "--public-key",
                           _key_text()], capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    assert getattr(done, stream).startswith(prefix + "raised deep in the library") and "Traceback" not in done.stderr


def test_main_maps_an_error_raised_outside_any_command(monkeypatch, capsys):
    """AftuneError that reaches main() (past typer, which re-raises what is not click's) is mapped
    by the same function: exit 2, no traceback."""
    from aftune.cli import main
    from aftune.errors import InputError

    app_module = sys.modules["aftune.cli.app"]

    def broken_app():
        raise InputError("outside any command")

    monkeypatch.setattr(app_module, "app", broken_app)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "error: outside any command" in capsys.readouterr().err


def test_no_command_catches_aftune_error_itself():
    """The mapping lives in app.py only: no command wraps its body in `except AftuneError`, and
    every module prints through app.py's two consoles."""
    import re
    from pathlib import Path

    import aftune.cli

    for path in Path(aftune.cli.__file__).parent.glob("*.py"):
        text = path.read_text()
        if path.name != "app.py":
            assert not re.search(r"except \(?[\w, ]*AftuneError", text), path.name
            assert "Console(" not in text, path.name
        assert not re.search(r"(?<![\w.])print\(", text), path.name


# --- one flag name per concept: renamed flags, their deprecated aliases, the glossary ------------

def _commands():
    """(path, click command) of every command of the app."""
    import typer

    from aftune.cli import app

    def walk(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield " ".join(path), command

    return list(walk(typer.main.get_command(app), []))


def _options(command):
    return [p for p in command.params if p.param_type_name == "option"]


def _aliases():
    """(path, command, old flag, new flag) of every deprecated alias."""
    from aftune.cli.options import DEPRECATED_FLAGS

    return [(path, command, old, new) for path, command in _commands()
            for old, new in getattr(command.callback, DEPRECATED_FLAGS, {}).items()]


def test_every_deprecated_alias_sets_its_new_flag_and_says_so(capsys):
    aliases = _aliases()
    assert len(aliases) >= 20
    for path, command, old, new in aliases:
        flags = {o for p in _options(command) for o in (*p.opts, *p.secondary_opts)}
        assert old not in flags and new in flags, (path, old, new)
        param = next(p for p in _options(command) if new in p.opts)
        kind = param.type_descriptor.annotation  # int, float, str or Path
        value = {int: "3", float: "0.5"}.get(kind, "abcd")
        capsys.readouterr()
        ctx = command.make_context(path, [old, value], resilient_parsing=True)
        assert ctx.params[param.name] == kind(value), (path, old)
        assert f"note: {old} is deprecated here; use {new}" in capsys.readouterr().err, (path, old)


def test_deprecated_aliases_work_end_to_end():
    r = invoke("plan", "--blocks", 1000, "--tampered-blocks", 10)
    assert r.exit_code == 0, r.output
    assert "note: --blocks is deprecated here; use --total-blocks" in r.stderr and "--sample-blocks" in r.stdout
    new = invoke("plan", "--total-blocks", 1000, "--tampered-blocks", 10)
    assert new.stdout == r.stdout and "deprecated" not in new.output
    r = invoke("plan", "--blocks=1000", "--tampered-blocks", 10)
    assert r.exit_code == 0 and "use --total-blocks" in r.stderr
    r = invoke("challenge", "--record-root", "ab" * 32, "--layer-blocks", 4, "--nonce", "zz", "--out", "/nonexistent/c")
    assert r.exit_code == 2 and "use --challenge-nonce" in r.stderr and "--challenge-nonce must be hex" in r.stderr


def test_replacing_deprecated_flags_leaves_values_alone():
    from aftune.cli.options import replace_deprecated_flags

    args, notes = replace_deprecated_flags(["--prompt", "--nonce", "--nonce=ab", "--nonce", "cd", "--", "--nonce"],
                                           {"--nonce": "--request-nonce"}, {"--prompt", "--request-nonce"})
    assert args == ["--prompt", "--nonce", "--request-nonce=ab", "--request-nonce", "cd", "--", "--nonce"]
    assert notes == ["note: --nonce is deprecated here; use --request-nonce"] * 2


def _doc_tables():
    """The glossary's rows as (flags, commands), and the deprecated names' as (old, new, commands), from docs/cli.md."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    deprecated_part, glossary_part = text.split("## Deprecated names")[1].split("## Glossary")

    def rows(part):
        for line in part.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and not set(cells[0]) <= set("-") and "`" in line:
                yield [re.findall(r"`([^`]+)`", c) for c in cells]

    glossary = [(set(cells[1]), set(cells[2])) for cells in rows(glossary_part)]
    deprecated = [(cells[0][0], cells[1][0], set(cells[2])) for cells in rows(deprecated_part)]
    return glossary, deprecated


def test_the_glossary_lists_every_flag_of_every_command_and_nothing_else():
    glossary, deprecated = _doc_tables()
    taken = set()
    for path, command in _commands():
        for p in _options(command):
            if p.hidden:
                continue
            names = set(p.opts) | set(p.secondary_opts)
            long = next(n for n in p.opts if n.startswith("--"))
            assert any(names <= flags and path in commands for flags, commands in glossary), \
                f"docs/cli.md: no glossary row for {path} {'/'.join(sorted(names))}"
            taken |= {(path, n) for n in names}
            taken.add((path, long))
    listed = {(c, f) for flags, commands in glossary for c in commands for f in flags if f.startswith("--")}
    assert listed <= taken, f"docs/cli.md lists flags no command takes: {sorted(listed - taken)}"
    in_code = {(path, old, new) for path, _, old, new in _aliases()}
    in_doc = {(path, old, new) for old, new, commands in deprecated for path in commands}
    assert in_doc == in_code
