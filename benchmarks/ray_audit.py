"""Wall time of `aftune audit` on one machine vs spread over a two-node Ray cluster, side by side.

    python benchmarks/ray_audit.py                   # built-in tiny Llama, 8 steps, every block challenged
    python benchmarks/ray_audit.py --steps 16 --repeats 2

Records a run of the built-in model with one intra-op thread (so each strict replay takes one
core), challenges every block and opens the bundle, then starts a two-node Ray cluster on this
machine (`ray start --head` and `ray start --address`, one CPU each, this checkout's `src` on
PYTHONPATH) and times the same CLI audit three ways, in rotating order:

* local-1    - `aftune audit BUNDLE ... --workers 1` (one process);
* local      - `aftune audit BUNDLE ...` (the default local process pool);
* ray-2nodes - `aftune audit BUNDLE ... --ray 127.0.0.1:PORT` (one Ray task per block).

Each time is the whole command, interpreter start and imports included, as a user sees it. The
ratios to local-1 are printed, and the seconds the block replays themselves took (summed over the
blocks, whichever process ran them): the rest is start-up (processes, imports, opening).
A benchmark, not a test: it checks only that the verdicts agree.
The cluster's processes are stopped by their ids when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PY = [sys.executable, "-m", "aftune"]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv, env, cwd, ok=(0,)) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode not in ok:
        sys.exit(f"{' '.join(map(str, argv))} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def _cluster_processes(temp_dir: str) -> list:
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in (p.info["cmdline"] or [])):
            found[p.pid] = p
            for c in p.children(recursive=True):
                found[c.pid] = c
    return list(found.values())


def _stop(temp_dir: str) -> None:
    procs = _cluster_processes(temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    for p in psutil.wait_procs(procs, timeout=10)[1]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import aftune

    src = str(Path(aftune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    work = Path(tempfile.mkdtemp(prefix="aftune-ray-bench-"))
    try:
        _measure(args, env, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args, env: dict, work: Path) -> None:
    from aftune.builtin import DATA_FILE, MODEL_DIR

    t0 = time.perf_counter()
    _run([*PY, "agree", "--base-model", str(MODEL_DIR), "--data", str(DATA_FILE), "--steps", str(args.steps),
          "--batch-size", "4", "--layers-per-block", "2", "--steps-per-block", "2", "--out", "agreement.json"],
         env, work)
    _run([*PY, "train", "--run-dir", "run", "--agreement", "agreement.json"], {**env, "OMP_NUM_THREADS": "1"}, work)
    key = work / "run" / "provider.key.pub"
    _run([*PY, "challenge", "run/transcript.jsonl", "--public-key", str(key), "--agreement", "agreement.json",
          "--strategy", "all", "--out", "challenge.json"], env, work)
    _run([*PY, "open", "run", "--challenge", "challenge.json", "--out", "bundle"], env, work)
    blocks = len(json.loads((work / "challenge.json").read_text())["blocks"])
    print(f"recorded {args.steps} steps and opened {blocks} blocks in {time.perf_counter() - t0:.1f} s")

    temp_dir = tempfile.mkdtemp(prefix="aftray-", dir="/tmp")  # short: Ray's socket paths are bounded
    port = _free_port()
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        t0 = time.perf_counter()
        _run([*RAY, "start", "--head", "--port", str(port), "--temp-dir", temp_dir, "--include-dashboard=false",
              "--dashboard-port", str(_free_port()), *common], env, work)
        _run([*RAY, "start", "--address", f"127.0.0.1:{port}", *common], env, work)
        print(f"two Ray nodes started in {time.perf_counter() - t0:.1f} s")
        audit = [*PY, "audit", "bundle", "--transcript", "run/transcript.jsonl", "--challenge", "challenge.json",
                 "--public-key", str(key), "--agreement", "agreement.json", "--quiet"]
        modes = {"local-1": ["--workers", "1"], "local": [], "ray-2nodes": ["--ray", f"127.0.0.1:{port}"]}
        times: dict[str, list[float]] = {m: [] for m in modes}
        replay: dict[str, list[float]] = {m: [] for m in modes}  # the blocks' own replay seconds, summed
        verdicts = {}
        names = list(modes)
        for r in range(args.repeats):
            for m in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                report = work / f"{m}.json"
                t0 = time.perf_counter()
                _run([*audit, *modes[m], "--report-json", str(report)], env, work, ok=(0, 1))
                times[m].append(time.perf_counter() - t0)
                doc = json.loads(report.read_text())
                verdicts[m] = [(b["layer_block"], b["step_block"], b["verdict"]) for b in doc["blocks"]]
                replay[m].append(sum(b["seconds"] for b in doc["blocks"]))
        nodes = {b["replayed_on"]["ray_node_id"][:8]
                 for b in json.loads((work / "ray-2nodes.json").read_text())["blocks"]}
    finally:
        _stop(temp_dir)
    base = statistics.median(times["local-1"])
    print(f"\n{blocks} blocks, {os.cpu_count()} cores, {args.repeats} repeat(s); median wall seconds of the CLI:")
    for m, ts in times.items():
        med = statistics.median(ts)
        print(f"  {m:<11} {med:7.1f} s   x{med / base:.2f} of local-1   ({', '.join(f'{t:.1f}' for t in ts)}); "
              f"replays alone {statistics.median(replay[m]):.1f} s of work")
    print(f"ray-2nodes replayed on {len(nodes)} nodes; verdicts agree: {len(set(map(tuple, verdicts.values()))) == 1}")


if __name__ == "__main__":
    main()
