"""The grid on a two-node Ray cluster on loopback: the same results as one node, and a node lost mid-grid
costs nothing (Ray retries its tasks on the node that is left).

Each node declares one logical GPU (`ray start --num-gpus=1`; this machine has no CUDA): extraction tasks ask for
and receive a GPU id and fall back to the CPU inside, one split's row ranges are tasks either node can take, and
the closed-form fits ask for none, while the numbers stay those of a one-node, GPU-less, one-task-per-split run.

The nodes are `ray start` processes of their own (not this pytest process, whose session may hold the
in-process Ray of conftest's `ray_session`), and the grid runs as `featrec-grid run --address` in a
subprocess. Each node is started in a session of its own with a temp dir of its own; teardown kills the
processes of those sessions only, never `ray stop` (which would take every Ray on the machine with it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"
METRICS = ["mse", "mse_total_seed", "r2", "agreement", "cosine", "accuracy_real", "accuracy_recon"]
KEYS = ["source", "target", "method"]

# `ray start --address=...` (a worker node) aborts when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("Multi-node Ray
# clusters are not supported on Windows and OSX"), yet that variable is what keeps every Ray address on
# loopback (FACTS.md); without it the CLI rewrites --address 127.0.0.1 to the machine's interface address.
# This is Ray's own `ray` CLI with that one guard (it guards the worker-node branch only) lifted, run by
# this interpreter.
_RAY_CLI = textwrap.dedent(
    """
    import sys
    import ray._private.ray_constants as constants
    import ray.scripts.scripts as cli

    class _Constants:
        def __getattr__(self, name):
            return True if name == "ENABLE_RAY_CLUSTER" else getattr(constants, name)

    cli.ray_constants = _Constants()
    sys.argv[0] = "ray"
    cli.main()
    """
)

MODELS = """
models:
  mlp: {source: zoo, architecture: mlp, options: {epochs: 2}}
  cnn: {source: zoo, architecture: cnn, options: {epochs: 2}}
  lite0: {source: lite, architecture: tf_efficientnet_lite0, options: {img_size: 32}}
data:
  train: {dataset: digits, split: train}
  test: {dataset: digits, split: test}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class _Node:
    """One `ray start` node: the session it was started in (every process it spawns keeps it), its temp dir.

    Ray puts each task worker in a process group of its own, so the session id, not the group, finds them.
    """

    sid: int
    temp_dir: Path

    def processes(self) -> dict[int, str]:
        """pid -> command line of every live process of this node."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getsid(int(entry.name)) != self.sid:
                    continue
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # gone meanwhile (ProcessLookupError is an OSError)
                continue
            if cmd and state != "Z":
                found[int(entry.name)] = cmd
        return found

    def kill(self) -> None:
        """SIGKILL every process of this node, and whatever it spawns while we are at it."""
        for _ in range(20):
            pids = self.processes()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)


def _start_node(args: list[str], env: dict[str, str], temp_dir: Path) -> _Node:
    """`ray start ARGS` on loopback with 1 CPU in a session of its own (found and killed alone)."""
    temp_dir.mkdir(parents=True)
    cmd = [sys.executable, "-c", _RAY_CLI, "start", *args, f"--node-ip-address={LOOPBACK}", "--num-cpus=1"]
    cmd += ["--num-gpus=1"]  # logical: Ray schedules on it and hands out id 0; torch sees no CUDA
    cmd += ["--object-store-memory=100000000", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    cmd += [f"--dashboard-agent-listen-port={_free_port()}"]  # the default, 52365, is the same for every node
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    node = _Node(proc.pid, temp_dir)  # a new session's id is its leader's pid
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        node.kill()
        raise
    if proc.returncode != 0:
        node.kill()
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-3000:]}")
    return node


def _env(**extra: str) -> dict[str, str]:
    """This environment, on loopback, never pointed at another cluster by RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, 1 CPU and 1 logical GPU each, everything on 127.0.0.1; yields (address, env, worker
    node)."""
    # A token of this cluster's own: ~/.ray/auth_token is neither needed nor written.
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    root = Path(tempfile.mkdtemp(prefix="fgc-"))  # a short path: Ray's unix sockets live under it
    port = _free_port()
    nodes: list[_Node] = []
    try:
        head = ["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}"]
        nodes.append(_start_node(head, env, root / "head"))
        address = f"{LOOPBACK}:{port}"
        nodes.append(_start_node([f"--address={address}"], env, root / "worker"))
        yield address, env, nodes[1]
    finally:
        for node in nodes:
            node.kill()
        shutil.rmtree(root, ignore_errors=True)


def _write_spec(path: Path, store: Path, output: Path, fit: str, resources: str = "{}") -> Path:
    path.write_text(f"name: {path.stem}\nstore: {store}\noutput: {output}\n{MODELS}fit: {fit}\nresources: {resources}\n")
    return path


def _grid_cmd(spec: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "featrec_grid.cli", "run", str(spec), "--no-progress", *args]


def _run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _results(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "results.parquet").sort_values(KEYS).reset_index(drop=True)


def _assert_same_pairs(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert len(got) == len(want) == 9
    assert not got.duplicated(KEYS).any()
    for col in [*KEYS, "train_rows", "test_rows"]:
        assert got[col].tolist() == want[col].tolist(), col
    for col in METRICS:
        np.testing.assert_allclose(got[col].astype(float), want[col].astype(float), rtol=1e-6, err_msg=col)


def _worker_ran_tasks(node: _Node, task: str) -> bool:
    """True if a worker process of `node` logged the start of a task whose name starts with `task` (Ray's
    ':task_name:' log marker; the runtime names each Ray task after its plan task)."""
    logs = node.temp_dir.glob("session_*/logs/worker-*.out")
    return any(f":task_name:{task}" in p.read_text(errors="replace") for p in logs)


@pytest.fixture(scope="module")
def cluster_store(cluster, tmp_path_factory):
    """Test A: the ridge grid on the two-node cluster, each train split (1,257 rows) in two row ranges, and on one
    local node without GPUs, one task per split; each from an empty store."""
    address, env, worker = cluster
    tmp = tmp_path_factory.mktemp("cluster")
    ridge = "{alpha: [0, 1]}"
    spec = _write_spec(tmp / "ridge.yaml", tmp / "store", tmp / "on_cluster", ridge, "{rows_per_task: 700}")
    on_cluster = _run(_grid_cmd(spec, "--address", address), env)
    whole = _write_spec(tmp / "ridge_whole.yaml", tmp / "store_local", tmp / "local", ridge)
    # the zoo models the cluster trained (seeded, checksummed entries): the reference differs in how it extracts
    # and fits, not in its inputs, and skips retraining them
    shutil.copytree(tmp / "store" / "zoo", tmp / "store_local" / "zoo")
    local = _run(_grid_cmd(whole), _env())
    return tmp, on_cluster, local, worker


def test_two_nodes_match_one_node(cluster_store):
    tmp, on_cluster, local, worker = cluster_store
    assert "pairs: computed=9 reused=0 failed=0" in on_cluster
    assert "pairs: computed=9 reused=0 failed=0" in local
    assert _worker_ran_tasks(worker, "extract ") or _worker_ran_tasks(worker, "fit "), (
        "the worker node did nothing"
    )
    _assert_same_pairs(_results(tmp / "on_cluster"), _results(tmp / "local"))


def test_gpu_resources_on_two_nodes(cluster_store):
    """Extraction asks for a GPU and gets one on either node; each split's rows are ranges of their own (tasks
    any node can take) and the GPU work ran on both nodes; fits ask for no GPU. Read from the run's tasks.parquet
    (node id and GPU ids as each task saw them inside Ray). Which node takes which range is Ray's choice: while
    the worker trains a zoo model (11 s when the machine is loaded), the head may take every range."""
    tasks = pd.read_parquet(cluster_store[0] / "on_cluster" / "tasks.parquet")
    computed = tasks[tasks["status"] == "computed"]
    ranges = computed[computed["name"].str.contains(" rows ")]
    assert len(ranges) == 6, computed["name"].tolist()  # 3 models x the train split's 2 ranges
    extracting = computed[computed["kind"].isin(["extract", "train_zoo"])]
    assert (extracting["gpu_ids"] == "0").all(), extracting[["name", "gpu_ids"]]
    assert extracting["node_id"].nunique() == 2, extracting[["name", "node_id"]]
    fits = computed[computed["kind"].isin(["fit", "source_stats", "head", "cka"])]
    assert len(fits) >= 9 and (fits["gpu_ids"] == "").all(), fits[["name", "gpu_ids"]]
    finished = computed[computed["kind"] == "finish_split"]
    assert len(finished) == 3


def test_worker_node_killed_mid_grid(cluster, cluster_store):
    """SIGKILL the worker node (raylet and its workers) while it runs a pair; retries finish on the head."""
    address, env, worker = cluster
    tmp = cluster_store[0]
    sgd = "{method: sgd, sgd: {epochs: 60}}"  # seeded, slow enough to kill a node in the middle
    # CPU-only fits: each node then runs one at a time, so the worker is busy with pairs throughout (with a GPU
    # share Ray packs the fractional-GPU fits onto one node and the worker may never hold one long enough)
    spec = _write_spec(tmp / "sgd.yaml", tmp / "store", tmp / "sgd_cluster", sgd, "{gpus_per_fit: 0}")
    reference = tmp / "sgd_local"
    _run(_grid_cmd(spec, "--output", str(reference)), _env())

    pairs, log = tmp / "sgd_cluster" / "pairs", tmp / "sgd_cluster.log"
    with open(log, "w") as sink:  # a file, not a pipe: nobody reads while we poll
        driver = subprocess.Popen(
            _grid_cmd(spec, "--address", address), env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline, killed = time.time() + 300, None
        while time.time() < deadline and driver.poll() is None:
            saved = len(list(pairs.glob("*.json"))) if pairs.is_dir() else 0
            busy = [cmd for cmd in worker.processes().values() if cmd.startswith("ray::fit ")]  # task names
            if 1 <= saved < 9 and busy:
                worker.kill()
                killed = saved
                break
            time.sleep(0.05)
        driver.wait(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
    out = log.read_text()
    assert killed is not None, "the worker node should be killed while it fits a pair:\n" + out
    assert not worker.processes(), "every process of the worker node is gone"
    assert driver.returncode == 0, out
    assert "pairs: computed=9 reused=0 failed=0" in out, out
    _assert_same_pairs(_results(tmp / "sgd_cluster"), _results(reference))
