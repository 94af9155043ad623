"""`aftune audit --ray` on a two-node Ray cluster started as a user starts one across machines.

    pytest tests/test_ray_cluster.py --long

Two raylets on this machine are two Ray nodes (`ray start --head`, then `ray start --address`),
each with one CPU, so that the audit's one-task-per-block replays must use both. The nodes get
this checkout's `src` on PYTHONPATH (their workers import aftune from it, as the driver does); the
bundle and transcript are read by path on each node (one machine: shared storage trivially).
The cluster tests are marked long: starting the nodes takes ~20 s and each node's worker imports torch and aftune
afresh (see docs/ray.md for the times measured). The cluster's processes are found by its own
temp dir and stopped by their ids (not `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import aftune
from aftune.protocol.audit import audit_bundle
from aftune.protocol.challenge import challenge_from_transcript
from aftune.protocol.opening import open_bundle
from conftest import agreement_for, agreement_path
from test_tampering import FlipExponentBit

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

PY = [sys.executable, "-m", "aftune"]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter
# token authentication with a token of this test's own, given to every node and driver: without
# it, whether Ray authenticates depends on whether ~/.ray/auth_token exists (a local ray.init()
# writes one), and a node started without the token cannot join a head started with it
TOKEN_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(temp_dir: str) -> list:
    """Every process of the cluster: those naming its temp dir, and their children (workers)."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in (p.info["cmdline"] or [])):
            found[p.pid] = p
            for c in p.children(recursive=True):
                found[c.pid] = c
    return list(found.values())


def _raylet(temp_dir: str, second: bool):
    """The head's raylet, or the second node's (its socket is `raylet.1`)."""
    for p in _cluster_processes(temp_dir):
        cmd = " ".join(p.cmdline()) if p.is_running() else ""
        if "raylet/raylet" in cmd and ("sockets/raylet.1 " in cmd) == second:
            return p
    raise AssertionError("no raylet of this cluster")


def _node_id(raylet) -> str:
    return next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))


def _stop(procs) -> None:
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def two_nodes():
    """(address, env, temp_dir): a head node and a second node, one CPU each."""
    temp_dir = tempfile.mkdtemp(prefix="aftray-", dir="/tmp")  # short: Ray's socket paths are bounded
    src = str(Path(aftune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0", **TOKEN_AUTH}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        t0 = time.perf_counter()
        subprocess.run([*RAY, "start", "--head", "--port", str(port), "--temp-dir", temp_dir,
                        "--include-dashboard=false", "--dashboard-port", str(_free_port()), *common],
                       env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([*RAY, "start", "--address", address, *common], env=env, check=True,
                       capture_output=True, timeout=180)
        print(f"two nodes started in {time.perf_counter() - t0:.1f} s")
        yield address, env, temp_dir
    finally:
        _stop(_cluster_processes(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tampered_bundle(tmp_path_factory, model_dir, datasets):
    """(bundle, transcript, challenge file, key file, agreement file, run dir) of a run whose
    step 3 was tampered with (layer block 1, step block 1), every block challenged."""
    import torch

    from aftune.core.signing import PublicKey
    from aftune.training.agreement import make_agreement
    from aftune.training.settings import TrainSettings
    from aftune.training.train import train
    from conftest import DATA_KIND

    tmp = tmp_path_factory.mktemp("raycluster")
    run_dir = tmp / "run"
    settings = TrainSettings(steps=4, batch_size=4, seq_len=32, layers_per_block=2, steps_per_block=2, lr=1e-2,
                             boundaries="stored")
    agreement = make_agreement(model_dir("llama"), datasets[DATA_KIND["llama"]], settings)
    agreement.save(agreement_path(run_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each replay pins the recorded count: one core per node
    try:
        result = train(model_dir("llama"), datasets[DATA_KIND["llama"]], run_dir, agreement=agreement,
                       deviation=FlipExponentBit(step=3))
    finally:
        torch.set_num_threads(threads)
    key = PublicKey.load(result.public_key_path)
    c = challenge_from_transcript(run_dir / "transcript.jsonl", key, "all")
    challenge = c.save(tmp / "challenge.json")
    open_bundle(run_dir, c, tmp / "bundle")
    return (tmp / "bundle", run_dir / "transcript.jsonl", challenge, Path(result.public_key_path),
            agreement_path(run_dir), run_dir)


def _audit_argv(bundle, transcript, challenge, key, agreement, address, report) -> list[str]:
    return [*PY, "audit", str(bundle), "--transcript", str(transcript), "--challenge", str(challenge),
            "--public-key", str(key), "--agreement", str(agreement), "--ray", address,
            "--report-json", str(report), "--quiet"]


@pytest.mark.long
def test_audit_on_two_nodes_matches_the_local_audit_and_uses_both(two_nodes, tampered_bundle, tmp_path):
    address, env, temp_dir = two_nodes
    bundle, transcript, challenge, key, agreement, run_dir = tampered_bundle
    from aftune.core.signing import PublicKey
    from aftune.protocol.challenge import Challenge

    c = Challenge.load(challenge)
    local = audit_bundle(bundle, transcript, PublicKey.load(str(key)), c, agreement=agreement_for(run_dir),
                         workers=1)
    assert local.verdict == "FAIL" and [(r.layer_block, r.step_block) for r in local.results
                                        if r.verdict == "FAIL"] == [(1, 1)]
    report = tmp_path / "report.json"
    t0 = time.perf_counter()
    done = subprocess.run(_audit_argv(bundle, transcript, challenge, key, agreement, address, report),
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    print(f"audit of {len(c.blocks)} blocks on two nodes: {time.perf_counter() - t0:.1f} s")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    doc = json.loads(report.read_text())
    # 1. the same verdict, block by block, as the local audit
    assert [(b["layer_block"], b["step_block"], b["verdict"]) for b in doc["blocks"]] == \
        [(r.layer_block, r.step_block, r.verdict) for r in local.results]
    assert doc["verdict"] == "FAIL"
    # 2. the blocks ran on both nodes of the cluster, and the report says which
    cluster = {_node_id(_raylet(temp_dir, second)) for second in (False, True)}
    used = {b["replayed_on"]["ray_node_id"] for b in doc["blocks"]}
    assert len(cluster) == 2 and used == cluster, (used, cluster)
    assert all(b["replayed_on"]["hostname"] == socket.gethostname() for b in doc["blocks"])
    assert "replayed on 2 Ray nodes" in done.stdout
    for b in doc["blocks"]:  # the text names each block's node
        assert f"node {b['replayed_on']['ray_node_id'][:8]}" in done.stdout
    # a local audit's report has no such field (its format is unchanged)
    assert all("replayed_on" not in b for b in local.to_json()["blocks"])


@pytest.mark.long
def test_a_node_lost_mid_audit_is_a_clean_error_not_a_hang(two_nodes, tampered_bundle, tmp_path):
    """Kills the second node while it replays a block: exit 2 naming the block, no traceback.
    Runs last: the cluster has one node afterwards."""
    address, env, temp_dir = two_nodes
    bundle, transcript, challenge, key, agreement, _ = tampered_bundle
    audit = subprocess.Popen(_audit_argv(bundle, transcript, challenge, key, agreement, address,
                                         tmp_path / "report.json"),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        second = _raylet(temp_dir, second=True)
        deadline = time.monotonic() + 300
        while not any("_replay_on_node" in " ".join(p.cmdline()) for p in second.children(recursive=True)
                      if p.is_running()):
            assert audit.poll() is None, "the audit ended before the second node replayed anything"
            assert time.monotonic() < deadline, "the second node never started a replay"
            time.sleep(0.2)
        node = [second, *second.children(recursive=True)]
        for p in node:
            p.send_signal(signal.SIGKILL)
        t0 = time.perf_counter()
        out, err = audit.communicate(timeout=240)
        print(f"the audit ended {time.perf_counter() - t0:.1f} s after the node was killed")
    finally:
        if audit.poll() is None:
            audit.kill()
    assert audit.returncode == 2, out + err
    assert "Traceback" not in err
    assert "lost layer block" in err and "mid-audit" in err and "run the audit again" in err
    assert not (tmp_path / "report.json").exists()


def test_an_address_where_no_cluster_answers_is_bad_input(tmp_path):
    """No Ray cluster at the address: exit 2 at once (Ray itself would retry for minutes)."""
    from aftune.protocol.audit import _check_reachable
    from aftune.errors import InputError

    with pytest.raises(InputError, match="no Ray cluster answers at 127.0.0.1:"):
        _check_reachable(f"127.0.0.1:{_free_port()}")


def test_the_report_names_the_node_of_each_block_without_changing_a_verdict():
    """`replayed_on` is an extra member of a block (SPEC.md 9.7): the verdicts stay the same, and
    a block replayed locally has no such member."""
    from aftune.verdict.findings import BlockResult, Report, ReplayNode

    a, b = ReplayNode("8f3b23cd" * 7, "box-1"), ReplayNode("12d3d563" * 7, "box-2")
    report = Report("bundle", "strict")
    for i, node in enumerate([a, b, a]):
        r = BlockResult(i, 0, f"layer block {i}", compared=3, replayed_on=node)
        if i == 1:
            r.fail("output", "differs", tensor="h")
        report.results.append(r)
    doc = report.to_json()
    assert [blk["verdict"] for blk in doc["blocks"]] == ["PASS", "FAIL", "PASS"] and doc["verdict"] == "FAIL"
    assert doc["blocks"][1]["replayed_on"] == {"ray_node_id": "12d3d563" * 7, "hostname": "box-2"}
    assert report.nodes() == ("replayed on 2 Ray nodes: node 8f3b23cd on box-1 (2 blocks), "
                              "node 12d3d563 on box-2 (1 block)")
    local = Report("bundle", "strict", results=[BlockResult(0, 0, "layer block 0", compared=3)])
    assert "replayed_on" not in local.to_json()["blocks"][0] and local.nodes() == ""


class _FakeRay:
    """Just enough of `ray` for `_ray_map`'s bookkeeping, with no cluster: each task's outcome is
    given (a result or a Ray error), and the nodes' CPUs can change while tasks wait."""

    def __init__(self, outcomes, cpus=(1.0,), later_cpus=None):
        import types

        from ray import exceptions

        self.exceptions, self.outcomes, self.cpus, self.later_cpus = exceptions, list(outcomes), cpus, later_cpus
        self.cancelled, self.waits = [], 0
        self.module = types.SimpleNamespace(init=lambda **kw: None, nodes=self.nodes, remote=self.remote,
                                            wait=self.wait, get=self.get, cancel=self.cancel, exceptions=exceptions)

    def nodes(self):
        cpus = self.later_cpus if self.later_cpus is not None and self.waits else self.cpus
        return [{"Alive": True, "Resources": {"CPU": c}} for c in cpus]

    def remote(self, **options):
        assert options["max_retries"] == 0 and options["scheduling_strategy"] == "SPREAD"
        counter = iter(range(1000))
        return lambda fn: type("Task", (), {"remote": staticmethod(lambda *a: next(counter))})

    def wait(self, refs, num_returns, timeout):
        self.waits += 1
        return ([] if self.later_cpus is not None else refs[:1]), refs

    def get(self, ref):
        outcome = self.outcomes[ref]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def cancel(self, ref, force):
        self.cancelled.append(ref)


def _map(fake, monkeypatch, blocks=((0, 0), (1, 0)), cpus=1):
    from aftune.protocol import audit

    monkeypatch.setitem(sys.modules, "ray", fake.module)
    monkeypatch.setattr(audit, "_check_reachable", lambda address: None)
    return audit._ray_map("10.0.0.1:6379", ("b", "t", "k"), list(blocks), (), cpus, None)


def _done(block, versions=None):
    import torch

    from aftune.verdict.findings import BlockResult, ReplayNode
    from aftune.version import __version__

    node = ReplayNode("ab" * 28, "box-1")
    return node, versions or (__version__, torch.__version__), [BlockResult(*block, "b", compared=1, replayed_on=node)]


def test_a_lost_task_is_a_cluster_error_naming_the_block_and_the_rest_is_cancelled(monkeypatch):
    from aftune.errors import ClusterError

    fake = _FakeRay([_FakeRay([]).exceptions.NodeDiedError("node ab died"), _done((1, 0))])
    with pytest.raises(ClusterError, match=r"lost layer block 0, step block 0 mid-audit \(NodeDiedError"):
        _map(fake, monkeypatch)
    assert fake.cancelled == [1]


def test_a_node_with_another_aftune_or_torch_is_refused(monkeypatch):
    from aftune.errors import InputError

    fake = _FakeRay([_done((0, 0), versions=("0.0.1", "1.0")), _done((1, 0))])
    with pytest.raises(InputError, match="node abababab on box-1 runs aftune 0.0.1 with torch 1.0"):
        _map(fake, monkeypatch)


def test_replays_no_node_can_hold_are_refused_before_and_while_waiting(monkeypatch):
    from aftune.errors import ClusterError, InputError

    with pytest.raises(InputError, match="each replay needs 4 CPUs .* no node .* has more than 2"):
        _map(_FakeRay([], cpus=(2.0, 1.0)), monkeypatch, cpus=4)
    fake = _FakeRay([], cpus=(4.0,), later_cpus=(2.0,))  # the 4-CPU node left while tasks waited
    with pytest.raises(ClusterError, match="lost every node with 4 CPUs while layer block 0, step block 0 and 1 more"):
        _map(fake, monkeypatch, cpus=4)
    assert sorted(fake.cancelled) == [0, 1]


def test_honest_results_come_back_with_their_node(monkeypatch):
    results = _map(_FakeRay([_done((0, 0)), _done((1, 0))]), monkeypatch)
    assert [(r.layer_block, r.step_block, r.replayed_on.hostname) for r in results] == \
        [(0, 0, "box-1"), (1, 0, "box-1")]
