"""The Ray plan: zoo training, extraction per (model, split), source statistics, one fit task per ordered pair.

Ray lives here only. Task bodies are the plain functions of zoo, extract and pairs; this module wraps them
with `ray.remote`, wires their dependencies as object references, asks only for resources the cluster has,
saves each finished pair at once, and hands the rows to the reducer and the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import reduce
from .errors import UserError, first_line
from .extract import shard_key
from .model_table import placeholder_row
from .publish import CKA_COLUMNS, used_models
from .refs import DataRef
from .spec import Cell, GridSpec
from .store import Store

PAIR_VERSION = 1


@dataclass(frozen=True)
class PlannedTask:
    """One unit of work, as `featrec-grid plan` prints it."""

    kind: str  # train_zoo | extract | source_stats | fit
    name: str
    model: str | None = None
    data: DataRef | None = None
    pair: tuple[str, str] | None = None
    method: str | None = None
    cell: Cell | None = None


def pair_todo(spec: GridSpec) -> list[tuple[Cell, str, str, str]]:
    """Every (cell, source, target, method) the spec asks for, in order."""
    return [(c, s, t, m) for c in spec.cells() for m in c.fit.methods for s, t in c.fit.pairs_for(m, spec.pairs)]


def _fit_name(spec: GridSpec, cell: Cell, s: str, t: str, method: str) -> str:
    where = f" {cell.setting}/{cell.mode}" if len(spec.cells()) > 1 else ""
    return f"fit {s} -> {t} [{method}]{where}"


def plan(spec: GridSpec) -> list[PlannedTask]:
    """Every task of the grid in dependency order (before looking at what is already stored)."""
    used = used_models(spec)
    cells = spec.cells()
    tasks = [PlannedTask("train_zoo", f"train_zoo {m}", model=m) for m in used if spec.models[m].source == "zoo"]
    datas = list(dict.fromkeys(d for c in cells for d in (c.train, c.test)))
    for m in used:
        for d in datas:
            tasks.append(PlannedTask("extract", f"extract {m} {d.key}/{d.split}", model=m, data=d))
    stats = dict.fromkeys((s, c.train) for c, s, _, method in pair_todo(spec) if method == "ridge")
    for m, d in stats:
        tasks.append(PlannedTask("source_stats", f"source_stats {m} {d.key}/{d.split}", model=m, data=d))
    for c, s, t, method in pair_todo(spec):
        tasks.append(PlannedTask("fit", _fit_name(spec, c, s, t, method), pair=(s, t), method=method, cell=c))
    return tasks


def pair_key(spec: GridSpec, cell: Cell, source: str, target: str, method: str) -> str:
    """Everything a pair's result depends on: the four shard sets and the fit settings of its method."""
    m = spec.models
    fit = {"method": method, "version": PAIR_VERSION}
    if method == "ridge":
        fit.update(alphas=cell.fit.alphas, val_fraction=cell.fit.val_fraction)
        if source == target and cell.fit.self_alpha is not None:
            fit.update(self_alpha=cell.fit.self_alpha)
    elif method == "sgd":
        fit.update(sgd=cell.fit.sgd)
    else:
        fit.update(mlp=cell.fit.mlp, val_fraction=cell.fit.val_fraction)
    payload = [*(_shard_key(spec, m[k], d) for k in (source, target) for d in (cell.train, cell.test)), fit]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class GridOutcome:
    """What a run did: counts, failures (task name -> message), where the tables and report are."""

    computed: int = 0
    reused: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    user_error: str | None = None
    report: Path | None = None
    results: pd.DataFrame | None = None

    @property
    def exit_code(self) -> int:
        if self.user_error:
            return 2
        return 1 if self.failed or self.failures else 0

    def summary(self) -> str:
        return f"pairs: computed={self.computed} reused={self.reused} failed={self.failed}"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("featrec_grid", "torch", "torchvision", "timm", "ray", "numpy", "pyarrow", "pandas", "plotly"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Join `address`, or start a fresh single-node Ray in-process bound to loopback. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"--address {address}: cannot join a Ray cluster there ({first_line(err)})") from None
        return True
    # Local runs stay on loopback (FACTS.md): Ray otherwise binds the machine's interface address. Ray reads
    # this switch once, when it is imported, so set it for the processes ray.init spawns and for this one.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("0", "false"):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1", **kwargs)
    return True


def _task_options(spec: GridSpec) -> dict[str, dict[str, Any]]:
    """Ray options per task kind, asking for GPUs only when some node has them (never an unschedulable task)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    max_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    max_gpu = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    if max_cpu < 1:
        raise UserError(f"{spec.path}: the Ray cluster has no node with a CPU; tasks need 1 CPU each")
    extract_gpus = min(spec.resources.gpus_per_extract, max_gpu) if max_gpu else 0
    retries = {"max_retries": spec.resources.max_retries, "retry_exceptions": False}
    return {
        "train_zoo": {"num_cpus": 1, "num_gpus": extract_gpus, **retries},
        "extract": {"num_cpus": 1, "num_gpus": extract_gpus, **retries},
        "source_stats": {"num_cpus": 1, **retries},
        "fit_ridge": {"num_cpus": 1, **retries},
        "fit_sgd": {"num_cpus": 1, "num_gpus": min(spec.resources.gpus_per_fit, max_gpu) if max_gpu else 0, **retries},
    }


def _train_zoo(model, store):
    from .zoo import ensure_trained

    return ensure_trained(model, store)


def _extract(model, data, store, resources, rebuild, *after):
    from .extract import extract_split

    return extract_split(model, data, store, batch_size=resources.batch_size, rows_per_shard=resources.rows_per_shard,
                         precision=resources.precision, rebuild=rebuild)  # fmt: skip


def _model_row(store, model, test, *after):
    from .model_table import model_row

    return model_row(store, model, test)


def _source_stats(store, model, train, fit, *after):
    from .pairs import source_stats

    return source_stats(store, model, train, fit)


def _fit(store, source, target, train, test, fit, method, stats, *after):
    from .pairs import fit_pair

    return fit_pair(store, source, target, train, test, fit, method, stats)


def _mlp_trial(config: dict[str, Any], tasks: list[tuple]) -> None:
    """One Ray Tune trial: the MLP map of pair config["pair"] with the sampled hyperparameters, reporting held-out
    MSE each epoch and, last, the best epoch's held-out MSE with the results row (scored on test) as JSON."""
    from ray import tune

    from .pairs import fit_pair

    store, s, t, train, test, fit = tasks[config["pair"]]
    hp = {k: v for k, v in config.items() if k != "pair"}
    row = fit_pair(store, s, t, train, test, fit, "mlp", mlp_config=hp,
                   report=lambda epoch, val_mse: tune.report({"val_mse": val_mse, "epoch": epoch}))  # fmt: skip
    tune.report({"val_mse": row["val_mse"], "row": json.dumps(row, default=float)})


def _tune_mlp(
    spec: GridSpec, store: Store, out_dir: Path, todo: list[tuple[Cell, str, str, str]], gpus: float
) -> tuple[list[tuple[tuple[Cell, str, str, str], dict]], dict[str, str]]:
    """The MLP maps of `todo`, each chosen by a Ray Tune search: `fit.mlp.trials` configurations per pair sampled
    (seeded) from `fit.mlp.search` (default mlpmap.SEARCH_SPACE); the trial with the lowest held-out MSE gives the
    pair's row. Selection never sees test rows. Returns (todo item, row) pairs, and failures by task name."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .mlpmap import SEARCH_SPACE

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new console output ignores verbose=0
    rows: list[tuple[tuple[Cell, str, str, str], dict]] = []
    failures: dict[str, str] = {}
    for where in dict.fromkeys((c.setting, c.mode) for c, *_ in todo):
        items = [item for item in todo if (item[0].setting, item[0].mode) == where]
        cell = items[0][0]
        mlp = cell.fit.mlp
        search = {k: list(v) for k, v in (mlp.get("search") or SEARCH_SPACE).items()}
        space = {k: tune.choice(v) for k, v in search.items()}
        tasks = [(store, s, t, cell.train, cell.test, cell.fit) for _, s, t, _ in items]
        trainable = tune.with_resources(tune.with_parameters(_mlp_trial, tasks=tasks), {"cpu": 1, "gpu": gpus})
        tuner = tune.Tuner(
            trainable,
            param_space={"pair": tune.grid_search(list(range(len(items)))), **space},
            tune_config=tune.TuneConfig(num_samples=int(mlp.get("trials", 4)),
                                        search_alg=BasicVariantGenerator(random_state=0)),
            run_config=tune.RunConfig(name=f"mlp_{cell.setting}_{cell.mode}", storage_path=str(out_dir.absolute() / "tune"),
                                      verbose=0),
        )  # fmt: skip
        finished: dict[int, list[tuple[float, dict]]] = {}
        errors: dict[int, str] = {}
        for result in tuner.fit():
            k = result.config["pair"]
            if result.error is not None or "row" not in (result.metrics or {}):
                errors.setdefault(k, first_line(result.error or RuntimeError("the trial reported no result")))
            else:
                finished.setdefault(k, []).append((float(result.metrics["val_mse"]), json.loads(result.metrics["row"])))
        searched = "ray tune, random over " + json.dumps(search)
        for k, item in enumerate(items):
            if k in finished:
                _, row = min(finished[k], key=lambda trial: trial[0] if trial[0] == trial[0] else float("inf"))
                rows.append((item, {**row, "mlp_trials": len(finished[k]), "mlp_search": searched}))
            else:
                failures[_fit_name(spec, *item)] = errors.get(k, "no trial finished")
    return rows, failures


def _model_cka(store, models, test, column, *after):
    from .pairs import model_cka

    return model_cka(store, models, test, column)


def run_grid(
    spec: GridSpec,
    *,
    address: str | None = None,
    output: str | None = None,
    rebuild: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> GridOutcome:
    """Run the whole grid; finished pairs are saved as they arrive and reused by a rerun."""
    import ray

    from .models import check_architecture

    t_start = time.perf_counter()
    for ref in spec.models.values():  # a misspelt name or tag fails here, before Ray starts
        check_architecture(ref)
    out_dir = Path(output or spec.output)
    store = Store(spec.store)
    store.check_writable()
    outcome = GridOutcome()
    rows: dict[tuple[str, str, str, str, str], dict] = {}
    todo: list[tuple[Cell, str, str, str]] = []
    for cell, s, t, method in pair_todo(spec):
        key = pair_key(spec, cell, s, t, method)
        row = None if rebuild else reduce.load_pair(out_dir, cell.setting, cell.mode, s, t, method, key)
        if row is None:
            todo.append((cell, s, t, method))
        else:
            rows[(cell.setting, cell.mode, s, t, method)] = row
    outcome.reused = len(rows)

    started = connect(address, spec.resources.num_cpus)
    try:
        opts = _task_options(spec)
        remote = {
            "train_zoo": ray.remote(_train_zoo).options(**opts["train_zoo"]),
            "extract": ray.remote(_extract).options(**opts["extract"]),
            "source_stats": ray.remote(_source_stats).options(**opts["source_stats"]),
            "fit_ridge": ray.remote(_fit).options(**opts["fit_ridge"]),
            "fit_sgd": ray.remote(_fit).options(**opts["fit_sgd"]),
            "model_cka": ray.remote(_model_cka).options(**opts["source_stats"]),
            "model_row": ray.remote(_model_row).options(**opts["source_stats"]),
        }
        names: dict[Any, str] = {}
        fits: dict[Any, tuple[Cell, str, str, str]] = {}
        needed = list(dict.fromkeys((k, d) for c, s, t, _ in todo for k in (s, t) for d in (c.train, c.test)))
        models_used = used_models(spec)
        similarity_key = cka_key(spec, models_used)
        if any(reduce.load_cka(out_dir, c, similarity_key) is None for c in CKA_COLUMNS):
            needed += [(m, spec.test) for m in models_used]  # CKA reads every model's test shards
        heads = {m: None if rebuild else reduce.load_keyed(reduce.head_path(out_dir, m), _shard_key(spec, ref, spec.test))
                 for m, ref in spec.models.items() if m in models_used}  # fmt: skip
        needed += [(m, spec.test) for m, row in heads.items() if row is None]
        extracted: dict[tuple[str, DataRef], Any] = {}
        trained: dict[str, list] = {}
        for m, d in dict.fromkeys(needed):
            ref = spec.models[m]
            if m not in trained:
                trained[m] = []
                stale = any(_needs_extract(spec, store, ref, d2) for k, d2 in needed if k == m)
                if ref.source == "zoo" and (rebuild or stale):
                    zref = remote["train_zoo"].remote(ref, store)
                    names[zref] = f"train_zoo {m}"
                    trained[m].append(zref)
            eref = remote["extract"].remote(ref, d, store, spec.resources, rebuild, *trained[m])
            names[eref] = f"extract {m} {d.key}/{d.split}"
            extracted[(m, d)] = eref
        stats: dict[tuple[str, DataRef], Any] = {}
        for cell, s, t, method in todo:
            if method == "mlp":
                continue  # searched with Ray Tune once the shards exist, below
            deps = [extracted[(k, d)] for k in (s, t) for d in (cell.train, cell.test)]
            if method == "ridge" and (s, cell.train) not in stats:
                sref = remote["source_stats"].remote(store, s, cell.train, cell.fit, extracted[(s, cell.train)])
                stats[(s, cell.train)] = sref
                names[sref] = f"source_stats {s} {cell.train.key}/{cell.train.split}"
            fref = remote[f"fit_{method}"].remote(
                store, s, t, cell.train, cell.test, cell.fit, method, stats.get((s, cell.train)), *deps
            )
            names[fref] = _fit_name(spec, cell, s, t, method)
            fits[fref] = (cell, s, t, method)
        head_tasks: dict[Any, str] = {}
        for m, row in heads.items():
            if row is None:
                href = remote["model_row"].remote(store, spec.models[m], spec.test, extracted[(m, spec.test)])
                names[href] = f"head analysis {m}"
                head_tasks[href] = m
        ckas: dict[Any, str] = {}
        for column in CKA_COLUMNS:
            if rebuild or reduce.load_cka(out_dir, column, similarity_key) is None:
                deps = [extracted[(m, spec.test)] for m in models_used if (m, spec.test) in extracted]
                cref = remote["model_cka"].remote(store, models_used, spec.test, column, *deps)
                names[cref] = f"cka {column} ({len(models_used)} models)"
                ckas[cref] = column

        def keep_pair(item: tuple[Cell, str, str, str], value: dict) -> None:
            cell, s, t, method = item
            value = {"setting": cell.setting, "mode": cell.mode, **value}
            reduce.save_pair(out_dir, value, pair_key(spec, cell, s, t, method))
            rows[(cell.setting, cell.mode, s, t, method)] = value
            outcome.computed += 1

        failed_refs = set()
        for ref, value, error in _completed(names, progress):
            if error is not None:
                if isinstance(error, UserError) and outcome.user_error is None:
                    outcome.user_error = str(error)
                outcome.failures[names[ref]] = first_line(error)
                outcome.failed += ref in fits
                failed_refs.add(ref)
            elif ref in fits:
                keep_pair(fits[ref], value)
            elif ref in ckas:
                reduce.save_cka(out_dir, ckas[ref], value, similarity_key)
            elif ref in head_tasks:
                m = head_tasks[ref]
                reduce.save_keyed(reduce.head_path(out_dir, m), value, _shard_key(spec, spec.models[m], spec.test))
                heads[m] = value
        # an MLP search starts only if the shards its pair needs were extracted
        mlp_todo = [(c, s, t, m) for c, s, t, m in todo if m == "mlp"
                    and not any(extracted[(k, d)] in failed_refs for k in (s, t) for d in (c.train, c.test))]  # fmt: skip
        mlp_rows, mlp_failures = _tune_mlp(spec, store, out_dir, mlp_todo, opts["fit_sgd"]["num_gpus"])
        for item, value in mlp_rows:
            keep_pair(item, value)
        outcome.failures.update(mlp_failures)
        outcome.failed += len(mlp_failures) + len([i for i in todo if i[3] == "mlp" and i not in mlp_todo])
        models = pd.DataFrame.from_records([heads.get(m) or placeholder_row(ref) for m, ref in spec.models.items()])
    finally:
        if started:
            ray.shutdown()

    _finish(spec, out_dir, outcome, rows, models, time.perf_counter() - t_start, echo)
    return outcome


def _completed(names: dict[Any, str], progress: bool, desc: str = "tasks") -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Wait on every submitted task, yielding (ref, value, None) or (ref, None, cause) as each one ends; a task's
    failure never stops the others. The cause is the task's own exception when it raised one."""
    import ray
    from tqdm import tqdm

    pending = list(names)
    with tqdm(total=len(pending), desc=desc, unit="task", disable=not progress, file=sys.stderr) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ref = done[0]
            try:
                yield ref, ray.get(ref), None
            except ray.exceptions.RayTaskError as err:
                yield ref, None, err.cause if isinstance(err.cause, Exception) else err
            except ray.exceptions.RayError as err:
                yield ref, None, err
            bar.set_postfix_str(names[ref][:40])
            bar.update(1)


def map_tasks(
    fn: Callable[..., Any],
    calls: dict[str, tuple],
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    gpus: float = 0.0,
    max_retries: int = 1,
    progress: bool = True,
    desc: str = "tasks",
) -> Iterator[tuple[str, Any, BaseException | None]]:
    """Run fn(*args) for every named call as one Ray task each, yielding (name, value, error) as they end.

    Each task asks for 1 CPU and `gpus` of a GPU, but only when some node has a GPU (never an unschedulable task).
    Joins `address` or starts a single-node Ray in-process, and stops only a Ray it started. Task bodies return
    their results (images included) instead of writing files, so the driver alone writes the output directory.
    """
    import ray

    started = connect(address, num_cpus)
    try:
        max_gpu = max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        opts = {"num_cpus": 1, "num_gpus": min(gpus, max_gpu) if max_gpu else 0, "max_retries": max_retries,
                "retry_exceptions": False}  # fmt: skip
        remote = ray.remote(fn).options(**opts)
        names = {remote.remote(*args): name for name, args in calls.items()}
        for ref, value, error in _completed(names, progress, desc):
            yield names[ref], value, error
    finally:
        if started:
            ray.shutdown()


def cka_key(spec: GridSpec, models: list[str]) -> str:
    payload = [[m, _shard_key(spec, spec.models[m], spec.test)] for m in models]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:20]


def _shard_key(spec: GridSpec, ref, data: DataRef) -> str:
    return shard_key(ref, data, spec.resources.precision)


def _needs_extract(spec: GridSpec, store: Store, ref, data: DataRef) -> bool:
    return store.check_split(store.split_dir(ref.key, data), _shard_key(spec, ref, data)).state != "complete"


def _finish(spec, out_dir, outcome, rows, models, seconds, echo) -> None:
    from .publish import publish
    from .report import model_order

    versions = _versions()
    results = reduce.results_frame(rows.values(), versions)
    cells = [(c.setting, c.mode, m) for c in spec.cells() for m in c.fit.methods]
    agree = reduce.matrix(results, "agreement", cells[0][2], list(spec.models), *cells[0][:2]) if len(results) else None
    provenance = {
        "versions": versions,
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "run seconds": round(seconds, 1),
        "pairs computed": outcome.computed,
        "pairs reused": outcome.reused,
        "pairs failed": outcome.failed,
    }
    reduce.write_outputs(
        out_dir, results=results, models=models, resolved_spec=spec.resolved(), cells=cells,
        order=model_order(models, agree), provenance=provenance,
    )
    outcome.results = results
    outcome.report = publish(out_dir, spec)
    for name, msg in list(outcome.failures.items())[:20]:
        echo(f"failed: {name}: {msg}")
    echo(outcome.summary())
