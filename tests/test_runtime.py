"""The runtime on the session's Ray: dependency order, results passed on, failures contained, resources clamped,
and connection problems reported in seconds."""

import os
import socket
import subprocess
import sys

import pytest

from featrec_grid import runtime
from featrec_grid.errors import UserError
from featrec_grid.plan import CACHED, Graph, Ref, Task
from featrec_grid.store import Store


def _graph() -> Graph:
    g = Graph()
    g.add(Task("two", "num", "operator:add", (1, 1)))
    g.add(Task("cached", "num", "operator:add", status=CACHED, value=40))
    g.add(Task("sum", "num", "operator:add", (Ref("two"), Ref("cached"))))  # 2 + 40, both passed in
    g.add(Task("bad", "num", "math:sqrt", (-1.0,)))  # ValueError: math domain error
    g.add(Task("after bad", "num", "operator:neg", (Ref("bad"),)))
    g.add(Task("after after", "num", "operator:neg", (Ref("after bad"),)))
    g.add(Task("user", "num", "featrec_grid.spec:parse_spec", (None, "x.yaml")))  # UserError: the file is empty
    g.add(Task("gpu", "num", "operator:mul", (6, 7), gpus=1.0, cpus=64))  # clamped: no GPU, 2 CPUs here
    return g


@pytest.mark.slow
def test_execute_passes_results_contains_failures_and_records_each_task(ray_session):
    seen = []
    run = runtime.execute(_graph(), on_result=lambda t, v: seen.append((t.name, v)), progress=False)
    assert run.values["sum"] == 42 and run.values["gpu"] == 42
    assert run.values["two"] is None  # a result other tasks take stays in Ray's object store, never at the driver
    assert ("sum", 42) in seen and all(name != "bad" for name, _ in seen)  # each result as its task ended
    assert run.records["cached"].status == "reused" and run.records["sum"].status == "computed"
    assert run.failures["bad"] == "ValueError: math domain error"
    assert run.failures["after bad"] == "not run: it needs 'bad', which failed"
    assert run.failures["after after"] == "not run: it needs 'after bad', which failed"
    assert run.user_error_task == "user" and "x.yaml: the spec file is empty" in run.user_error
    assert run.computed() == 3 and run.reused() == 1 and run.failed() == 4
    rows = {r["name"]: r for r in run.table()}
    assert rows["sum"]["node"] == "127.0.0.1" and rows["sum"]["seconds"] >= 0
    assert set(rows) == set(_graph().tasks)


def test_clamp_asks_only_for_what_a_node_has():
    task = Task("t", "k", "operator:add", cpus=4, gpus=0.5)
    assert runtime.clamp(task, 2, 0) == (2, 0.0)
    assert runtime.clamp(task, 8, 1) == (4, 0.5)
    with pytest.raises(UserError, match="no node with a CPU"):
        runtime.clamp(task, 0, 0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: nothing listens there


@pytest.mark.slow
def test_unreachable_address_fails_in_seconds_with_one_line(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\nstore: {tmp_path}/st\noutput: {tmp_path}/out\nmodels: {{a: {{source: zoo, architecture: mlp}}}}\n"
                    "data: {train: {dataset: digits, split: train}, test: {dataset: digits, split: test}}\n"
                    )  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "featrec_grid.cli", "cka", str(spec), "--address", f"127.0.0.1:{_closed_port()}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing answers there" in lines[0] and "Traceback" not in proc.stderr


def test_more_cpus_than_this_machine_has_is_refused():
    with pytest.raises(UserError, match="resources.num_cpus: 100000 is more than the"):
        runtime.connect(None, 100_000)


@pytest.mark.slow
def test_row_range_extraction_equals_one_task_and_resumes(tmp_path, ray_session):
    """A split extracted as row-range tasks through the runtime holds the same rows, order and values as one
    extract_split; after a range is deleted, the plan recomputes only that range."""
    import numpy as np

    from featrec_grid.extract import extract_split
    from featrec_grid.grid import run_grid
    from featrec_grid.plan import plan_grid
    from featrec_grid.spec import load_spec

    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nstore: {tmp_path}/st\noutput: {tmp_path}/out\npairs: self\n"
                    "models: {l0: {source: lite, architecture: tf_efficientnet_lite0, options: {img_size: 32}}}\n"
                    "data: {train: {dataset: digits, split: train}, test: {dataset: digits, split: test}}\n"
                    "resources: {rows_per_task: 300}\n")  # fmt: skip
    spec = load_spec(path)
    outcome = run_grid(spec, progress=False, echo=lambda _: None)
    assert outcome.exit_code == 0, outcome.failures
    one = Store(tmp_path / "one")
    extract_split(spec.models["l0"], spec.train, one)
    ranged = Store(spec.store)
    a = ranged.read_split(ranged.split_dir("l0", spec.train))
    b = one.read_split(one.split_dir("l0", spec.train))
    for col in ("index", "label"):
        np.testing.assert_array_equal(a[col], b[col])
    for col in ("logits", "features"):  # a Ray task runs torch with 1 thread, this process with 2: float32 sums
        np.testing.assert_allclose(a[col], b[col], rtol=1e-5, atol=1e-5)  # in another order (seen: 7e-7)
    rel = tmp_path / "st" / "shards" / "digits" / "train" / "l0"
    (rel / "manifest.json").unlink()
    (rel / ranged.range_manifest_name(256, 512)).unlink()
    todo = [t.name for t in plan_grid(spec, tmp_path / "out2").todo() if t.kind in ("extract", "finish_split")]
    assert todo == ["extract l0 digits/train rows 256-512", "extract l0 digits/train"]
