"""The Ray runtime, the only module that imports Ray: connect, clamp resources, execute a plan.Graph.

A task runs once every task it depends on has finished; a Ref argument receives that task's result (a cached task's
stored value, or the object Ray holds). A failed task never stops the others: the tasks that depend on it are
reported as not run. `on_result` sees each result the moment its task ends, so a command saves its work as it
arrives and an interrupted run keeps it. Tasks with runner "tune" run as one Ray Tune search per group.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError, first_line
from .plan import Graph, Ref, Task

CONNECT_TIMEOUT_S = 15.0


@dataclass
class TaskRecord:
    """One row of tasks.parquet: what happened to one task of the graph."""

    name: str
    kind: str
    status: str  # computed | reused | failed
    seconds: float = 0.0
    node: str = ""  # the address of the node that ran it
    node_id: str = ""  # Ray's id of that node (nodes of one machine share an address)
    gpu_ids: str = ""  # the GPU ids Ray gave the task, comma-separated; empty when it asked for none
    error: str = ""


@dataclass
class Execution:
    """The outcome of executing a graph: task records in plan order, results by task name, failures by task name,
    and the first failure a user can fix (its message), if any."""

    records: dict[str, TaskRecord] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    user_error: str | None = None
    user_error_task: str | None = None

    def computed(self, kind: str | None = None) -> int:
        return sum(r.status == "computed" and kind in (None, r.kind) for r in self.records.values())

    def reused(self, kind: str | None = None) -> int:
        return sum(r.status == "reused" and kind in (None, r.kind) for r in self.records.values())

    def failed(self, kind: str | None = None) -> int:
        return sum(r.status == "failed" and kind in (None, r.kind) for r in self.records.values())

    def table(self) -> list[dict[str, Any]]:
        return [r.__dict__ for r in self.records.values()]


# ------------------------------------------------------------------------------------------------ connecting
def _ray():
    """Import Ray with local runs on loopback (FACTS.md): Ray otherwise binds the machine's interface address. Ray
    reads this switch once, when it is imported, so set it for the processes ray.init spawns and for this one."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("0", "false"):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    return ray


def _reachable(address: str, timeout: float) -> bool:
    """Whether host:port accepts a TCP connection within `timeout` (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # not host:port (e.g. "auto", ray://...): let Ray resolve it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Join `address`, or start a fresh single-node Ray in-process bound to loopback. True if we started it (the
    caller then shuts it down); False when this process already has a Ray."""
    cpus = os.cpu_count() or 1
    if not address and num_cpus and num_cpus > cpus:
        raise UserError(f"resources.num_cpus: {num_cpus} is more than the {cpus} CPUs of this machine; a local run "
                        f"can use 1 to {cpus} (use --address to run on a cluster)")  # fmt: skip
    ray = _ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        if not _reachable(address, CONNECT_TIMEOUT_S):
            raise UserError(f"--address {address}: nothing answers there within {CONNECT_TIMEOUT_S:.0f} s; give the "
                            "head node's host:port (ray start --head prints it), 'auto', or leave it out")  # fmt: skip
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"--address {address}: cannot join a Ray cluster there ({first_line(err)})") from None
        return True
    ray.init(address="local", num_cpus=num_cpus or cpus, _node_ip_address="127.0.0.1", **kwargs)
    return True


@contextmanager
def session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Ray for the duration of a block: joined or started, and stopped only if this block started it."""
    started = connect(address, num_cpus)
    try:
        yield
    finally:
        if started:
            _ray().shutdown()


def cluster_limits() -> tuple[float, float]:
    """(most CPUs, most GPUs) on any one live node: what a single task can be given."""
    ray = _ray()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return (max((n["Resources"].get("CPU", 0) for n in nodes), default=0),
            max((n["Resources"].get("GPU", 0) for n in nodes), default=0))  # fmt: skip


MAX_AUTO_CPUS = 4  # what a task with cpus=None gets at most: enough decode workers to feed one GPU


def clamp(task: Task, max_cpu: float, max_gpu: float) -> tuple[float, float]:
    """The (CPUs, GPUs) a task asks Ray for: never more than one node has (a task asking for a GPU on a cluster
    without one would wait forever), a GPU share only where GPUs exist. `cpus` None: the node's CPUs per GPU (at
    most MAX_AUTO_CPUS) when the task gets a GPU, else 1."""
    if max_cpu < 1:
        raise UserError("the Ray cluster has no node with a CPU; every task needs at least 1 CPU")
    gpus = min(task.gpus, max_gpu) if max_gpu else 0.0
    cpus = task.cpus
    if cpus is None:
        cpus = max(1, min(MAX_AUTO_CPUS, int(max_cpu // max_gpu))) if gpus else 1
    return min(cpus, max_cpu), gpus


# ------------------------------------------------------------------------------------------------ task bodies
def resolve(path: str) -> Callable[..., Any]:
    """The function a task names as "module:function"."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _call(fn: str, keys: tuple[str, ...], *values: Any) -> tuple[Any, float, tuple[str, str, str]]:
    """A task body as Ray runs it: fn(*args, **kwargs) with the last len(keys) values as the keyword arguments
    (every argument is top-level, so Ray resolves the object references among them); returns (result, seconds in
    the function, where it ran: (node address, node id, the GPU ids it was given))."""
    import ray

    t0 = time.perf_counter()
    n = len(values) - len(keys)
    value = resolve(fn)(*values[:n], **dict(zip(keys, values[n:], strict=True)))
    gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
    where = (ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(), gpu_ids)
    return value, time.perf_counter() - t0, where


def _cause(err: BaseException) -> BaseException:
    ray = _ray()
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, Exception):
        return err.cause
    return err


# ------------------------------------------------------------------------------------------------ executing
def execute(
    graph: Graph,
    *,
    on_result: Callable[[Task, Any], None] | None = None,
    progress: bool = True,
    desc: str = "tasks",
) -> Execution:
    """Run every to-do task of `graph` on the connected Ray (see session), in dependency order, and return what
    happened. A keyword argument `cpus` set to None receives the CPUs the task was given (see clamp). Cached tasks count as reused and their stored value is what dependants receive. The result of a task
    that other tasks take as an argument stays in Ray's object store (its value in the Execution is None)."""
    ray = _ray()
    from tqdm import tqdm

    run = Execution()
    for t in graph.cached():
        run.values[t.name] = t.value
        run.records[t.name] = TaskRecord(t.name, t.kind, "reused")
    todo = {t.name: t for t in graph.todo()}
    if not todo:
        return run
    max_cpu, max_gpu = cluster_limits()
    remote = ray.remote(num_returns=3)(_call)
    as_ref = {a.task for t in todo.values() for a in (*t.args, *t.kwargs.values()) if isinstance(a, Ref)}
    refs: dict[str, Any] = {}  # task name -> ObjectRef of its result, for tasks whose result is an argument
    inflight: dict[Any, tuple[Task, Any, Any]] = {}  # seconds ref -> (task, value ref, node ref)
    waiting = {n: sum(d in todo for d in t.all_deps()) for n, t in todo.items()}
    dependants: dict[str, list[str]] = {}
    for n, t in todo.items():
        for d in t.all_deps():
            dependants.setdefault(d, []).append(n)
    groups: dict[str, list[Task]] = {}
    for t in todo.values():
        if t.runner == "tune":
            groups.setdefault(t.group or t.name, []).append(t)
    ready = [n for n, k in waiting.items() if k == 0]
    total_kind: dict[str, int] = {}
    done_kind: dict[str, int] = {}
    for t in todo.values():
        total_kind[t.kind] = total_kind.get(t.kind, 0) + 1

    def arg(a: Any) -> Any:
        if not isinstance(a, Ref):
            return a
        return refs[a.task] if a.task in refs else run.values[a.task]

    fmt = "{desc}: {n_fmt}/{total_fmt} [{elapsed}] {postfix}"
    bar = tqdm(total=len(todo), desc=desc, unit="task", disable=not progress, file=sys.stderr, bar_format=fmt)

    def finish(task: Task, record: TaskRecord, value: Any = None) -> None:
        run.records[task.name] = record
        if record.status == "failed":
            run.failures[task.name] = record.error
        else:
            run.values[task.name] = value
            if on_result is not None:
                on_result(task, value)
        done_kind[task.kind] = done_kind.get(task.kind, 0) + 1
        bar.set_postfix_str(" ".join(f"{k} {done_kind.get(k, 0)}/{n}" for k, n in total_kind.items()))
        bar.update(1)
        for d in dependants.get(task.name, []):
            if record.status == "failed":
                if d not in run.records:
                    fail(todo[d], f"not run: it needs {task.name!r}, which failed")
                continue
            waiting[d] -= 1
            if waiting[d] == 0:
                ready.append(d)

    def fail(task: Task, err: BaseException | str) -> None:
        if isinstance(err, UserError) and run.user_error is None:
            run.user_error, run.user_error_task = str(err), task.name
        finish(task, TaskRecord(task.name, task.kind, "failed", error=err if isinstance(err, str) else first_line(err)))

    try:
        while len(run.records) < len(graph.tasks):
            while ready:
                t = todo[ready.pop(0)]
                if t.name in run.records:
                    continue
                if t.runner == "tune":
                    continue  # searched once its whole group is ready, below
                cpus, gpus = clamp(t, max_cpu, max_gpu)
                opts = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": t.retries, "retry_exceptions": False}
                kwargs = {k: int(cpus) if k == "cpus" and v is None else v for k, v in t.kwargs.items()}
                values = [arg(a) for a in (*t.args, *kwargs.values())]
                value_ref, seconds_ref, node_ref = remote.options(**opts, name=t.name[:100]).remote(
                    t.fn, tuple(t.kwargs), *values)
                inflight[seconds_ref] = (t, value_ref, node_ref)
            for group, members in list(groups.items()):
                left = [m for m in members if m.name not in run.records]
                if not left:
                    del groups[group]
                elif all(waiting[m.name] == 0 for m in left):
                    del groups[group]
                    for task, outcome in tune_search(left, run.values, max_gpu):
                        if isinstance(outcome, BaseException | str):
                            fail(task, outcome)
                        else:
                            finish(task, TaskRecord(task.name, task.kind, "computed", outcome[1], "tune"), outcome[0])
            if not inflight:
                if not ready and len(run.records) < len(graph.tasks) and not groups:
                    stuck = [n for n in todo if n not in run.records]
                    raise RuntimeError(f"the graph cannot make progress; waiting: {stuck[:5]}")
                continue
            done, _ = ray.wait(list(inflight), num_returns=1)
            t, value_ref, node_ref = inflight.pop(done[0])
            try:
                seconds, where = ray.get([done[0], node_ref])
                value = None if t.name in as_ref else ray.get(value_ref)
            except ray.exceptions.RayError as err:
                with suppress(ray.exceptions.RayError):
                    ray.get(value_ref)  # the error is handled here: Ray need not log it as unhandled
                fail(t, _cause(err))
            else:
                if t.name in as_ref:
                    refs[t.name] = value_ref
                finish(t, TaskRecord(t.name, t.kind, "computed", seconds, *where), value)
    finally:
        bar.close()
    return run


# ------------------------------------------------------------------------------------------------ Ray Tune
def _trial(config: dict[str, Any], tasks: list[tuple[str, tuple, dict[str, Any], str, str]]) -> None:
    """One Ray Tune trial: task config["task"] called with the sampled hyperparameters (as its `config_arg`), its
    `report(epoch, score)` forwarded to Tune; last, the result's `metric` as the score and the result as JSON."""
    from ray import tune

    fn, args, kwargs, config_arg, metric = tasks[config["task"]]
    hp = {k: v for k, v in config.items() if k != "task"}
    t0 = time.perf_counter()
    value = resolve(fn)(*args, **kwargs, **{config_arg: hp},
                        report=lambda epoch, score: tune.report({"score": score, "epoch": epoch}))  # fmt: skip
    tune.report({"score": value[metric], "seconds": time.perf_counter() - t0,
                 "value": json.dumps(value, default=float)})  # fmt: skip


def tune_search(
    tasks: list[Task], values: dict[str, Any], max_gpu: float
) -> list[tuple[Task, tuple[Any, float] | BaseException | str]]:
    """One Ray Tune search over the tasks of one group: `search["samples"]` configurations per task sampled (seeded)
    from `search["space"]`; the trial with the lowest `search["metric"]` gives the task's result, extended with the
    number of trials and the space searched. Returns (task, (value, seconds) or the failure) for each task."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new console output ignores verbose=0
    search = tasks[0].search or {}
    plain = [(t.fn, tuple(values.get(a.task) if isinstance(a, Ref) else a for a in t.args), dict(t.kwargs),
              search["config_arg"], search["metric"]) for t in tasks]  # fmt: skip
    gpus = min(tasks[0].gpus, max_gpu) if max_gpu else 0.0
    trainable = tune.with_resources(tune.with_parameters(_trial, tasks=plain), {"cpu": 1, "gpu": gpus})
    storage = os.path.abspath(search["storage"])
    tuner = tune.Tuner(
        trainable,
        param_space={"task": tune.grid_search(list(range(len(tasks)))),
                     **{k: tune.choice(v) for k, v in search["space"].items()}},
        tune_config=tune.TuneConfig(num_samples=int(search["samples"]), search_alg=BasicVariantGenerator(random_state=0)),
        run_config=tune.RunConfig(name=(tasks[0].group or "search").replace(" ", "_").replace("/", "_"),
                                  storage_path=storage, verbose=0),
    )  # fmt: skip
    finished: dict[int, list[tuple[float, float, dict]]] = {}
    errors: dict[int, str] = {}
    for result in tuner.fit():
        k = result.config["task"]
        if result.error is not None or "value" not in (result.metrics or {}):
            errors.setdefault(k, first_line(result.error or RuntimeError("the trial reported no result")))
        else:
            m = result.metrics
            finished.setdefault(k, []).append((float(m["score"]), float(m["seconds"]), json.loads(m["value"])))
    searched, label = "ray tune, random over " + json.dumps(search["space"]), search["label"]
    out: list[tuple[Task, tuple[Any, float] | BaseException | str]] = []
    for k, task in enumerate(tasks):
        if k not in finished:
            out.append((task, errors.get(k, "no trial finished")))
            continue
        score, _, value = min(finished[k], key=lambda trial: trial[0] if trial[0] == trial[0] else float("inf"))
        seconds = sum(trial[1] for trial in finished[k])
        out.append((task, ({**value, f"{label}_trials": len(finished[k]), f"{label}_search": searched}, seconds)))
    return out
