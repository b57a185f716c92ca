"""The planner: a spec and what the store and output folder already hold -> a typed task graph.

Every command that computes (`run`, `cka`, `invert`, `bench scale`) builds its graph here, `featrec-grid plan` prints
that same graph, and runtime.py executes it: one description of the work, never two. A task names a plain function
("module:function") and its arguments, so this module imports neither Ray nor torch; it owns every cache key and
the "models the pairs use" logic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import reduce
from .errors import UserError
from .extract import shard_key
from .refs import DataRef, ModelRef
from .spec import Cell, FitSpec, GridSpec
from .store import Store

SIMILARITY_VERSION = 1
PAIR_VERSION = 3  # 2: bootstrap intervals and drill-down data in every pair row; 3: ridge rows' train_logit_rank
CKA_COLUMNS = ("features", "logits")
TODO, CACHED = "todo", "cached"


@dataclass(frozen=True)
class Ref:
    """An argument placeholder: the result of the task named `task`, passed in when this task runs."""

    task: str


@dataclass
class Task:
    """One unit of work. `fn` is "module:function", called as fn(*args, **kwargs) with every Ref replaced by the
    named task's result. `cpus` and `gpus` are what the task asks for (the GPU share only where the cluster has
    GPUs). `runner` "tune" tasks of one `group` run as one Ray Tune search (`search`: the space, samples, metric).
    `status` is "cached" when `key` matches a stored result (`value` holds it) and "todo" otherwise; `meta` holds
    the plain facts a command needs to save the result (setting, mode, source, target, method, model, ...)."""

    name: str
    kind: str
    fn: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    deps: tuple[str, ...] = ()
    cpus: float | None = 1.0  # None: a GPU node's CPUs per GPU (at most 4) when the task gets a GPU, else 1
    gpus: float = 0.0
    retries: int = 2
    key: str | None = None
    status: str = TODO
    value: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    runner: str = "ray"
    group: str | None = None
    search: dict[str, Any] | None = None

    def all_deps(self) -> list[str]:
        """Declared dependencies and every task whose result is an argument, in order, once each."""
        refs = [a.task for a in (*self.args, *self.kwargs.values()) if isinstance(a, Ref)]
        return list(dict.fromkeys([*self.deps, *refs]))

    def record(self) -> dict[str, Any]:
        """What `plan --json` prints for this task."""
        return {"name": self.name, "kind": self.kind, "status": self.status, "deps": self.all_deps(),
                "resources": {"cpus": self.cpus, "gpus": self.gpus}, "runner": self.runner}  # fmt: skip


@dataclass
class Graph:
    """Tasks in dependency order (every task after the tasks it depends on), by name."""

    tasks: dict[str, Task] = field(default_factory=dict)

    def add(self, task: Task) -> Task:
        if task.name in self.tasks:
            raise ValueError(f"duplicate task name {task.name!r}")
        missing = [d for d in task.all_deps() if d not in self.tasks]
        if missing:
            raise ValueError(f"task {task.name!r} depends on unplanned tasks {missing}")
        self.tasks[task.name] = task
        return task

    def get(self, name: str) -> Task | None:
        return self.tasks.get(name)

    def todo(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.status == TODO]

    def cached(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.status == CACHED]

    def of_kind(self, *kinds: str) -> list[Task]:
        return [t for t in self.tasks.values() if t.kind in kinds]

    def records(self) -> list[dict[str, Any]]:
        return [t.record() for t in self.tasks.values()]

    def counts(self) -> dict[str, dict[str, int]]:
        """{kind: {"todo": n, "cached": m}} in plan order."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tasks.values():
            out.setdefault(t.kind, {TODO: 0, CACHED: 0})[t.status] += 1
        return out


# ------------------------------------------------------------------------------------------------ keys
def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def used_models(spec: GridSpec) -> list[str]:
    """The models some pair of the spec uses, in spec order: the only ones extracted, analysed and compared."""
    return list(dict.fromkeys(k for p in spec.pairs for k in p))


_PASS_KEYS: ContextVar[dict[tuple[str, str, str], str] | None] = ContextVar("pass_keys", default=None)


@contextmanager
def planning_pass() -> Iterator[None]:
    """Within this block each (model, split) shard key is computed once. A key hashes the weights file and walks a
    folder dataset, and every pair asks for four of them: N^2 walks of an ImageNet folder otherwise. Scoped to one
    pass, not the process, so a checkpoint rewritten between two plans still changes the key."""
    if _PASS_KEYS.get() is not None:
        yield
        return
    token = _PASS_KEYS.set({})
    try:
        yield
    finally:
        _PASS_KEYS.reset(token)


def spec_shard_key(spec: GridSpec, ref: ModelRef, data: DataRef) -> str:
    """The cache key of one (model, split) shard set at the spec's extraction precision (once per planning_pass)."""
    memo = _PASS_KEYS.get()
    if memo is None:
        return shard_key(ref, data, spec.resources.precision)
    at = (repr(ref), repr(data), spec.resources.precision)
    if at not in memo:
        memo[at] = shard_key(ref, data, spec.resources.precision)
    return memo[at]


def pair_key(spec: GridSpec, cell: Cell, source: str, target: str, method: str) -> str:
    """Everything a pair's result depends on: the four shard sets and the fit settings of its method."""
    m = spec.models
    fit: dict[str, Any] = {"method": method, "version": PAIR_VERSION}
    if method == "ridge":
        fit.update(alphas=cell.fit.alphas, val_fraction=cell.fit.val_fraction)
        if source == target and cell.fit.self_alpha is not None:
            fit.update(self_alpha=cell.fit.self_alpha)
    elif method == "sgd":
        fit.update(sgd=cell.fit.sgd)
    else:
        fit.update(mlp=cell.fit.mlp, val_fraction=cell.fit.val_fraction)
    shards = [spec_shard_key(spec, m[k], d) for k in (source, target) for d in (cell.train, cell.test)]
    return _digest([*shards, fit, {"report": bootstrap(spec)}])


def bootstrap(spec: GridSpec) -> dict[str, Any]:
    """The bootstrap settings every pair task gets (the spec's `report` block): fit_pair's ci, resamples, seed."""
    return {"ci": spec.report.ci, "resamples": spec.report.resamples, "seed": spec.report.seed}


def cka_key(spec: GridSpec, models: list[str]) -> str:
    """The key of the model-level CKA matrices: the test shard sets of the models compared."""
    payload = [[m, spec_shard_key(spec, spec.models[m], spec.test)] for m in models]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:20]


def head_key(spec: GridSpec, model: str) -> str:
    """The key of a model's head analysis: its test shard set."""
    return spec_shard_key(spec, spec.models[model], spec.test)


# ------------------------------------------------------------------------------------------------ names
def fit_name(spec: GridSpec, cell: Cell, source: str, target: str, method: str) -> str:
    where = f" {cell.setting}/{cell.mode}" if len(spec.cells()) > 1 else ""
    return f"fit {source} -> {target} [{method}]{where}"


def extract_name(model: str, data: DataRef) -> str:
    return f"extract {model} {data.key}/{data.split}"


def stats_name(model: str, data: DataRef) -> str:
    return f"source_stats {model} {data.key}/{data.split}"


def pair_todo(spec: GridSpec) -> list[tuple[Cell, str, str, str]]:
    """Every (cell, source, target, method) the spec asks for, in order."""
    return [(c, s, t, m) for c in spec.cells() for m in c.fit.methods for s, t in c.fit.pairs_for(m, spec.pairs)]


# ------------------------------------------------------------------------------------------------ inputs
def check_inputs(spec: GridSpec) -> None:
    """What a run reads, checked before anything starts: every timm/torchvision name, tag and weights enum (nothing is
    loaded or downloaded), every weight file a model names, every dataset split's files (unless `download` is set,
    when torchvision fetches them). Raises the first problem as a UserError naming file and field."""
    from .data import load_dataset
    from .models import _is_path, check_architecture

    for key in used_models(spec):
        ref = spec.models[key]
        check_architecture(ref)
        if ref.weights and (ref.source == "checkpoint" or (ref.source != "lite" and _is_path(ref.weights))):
            path = Path(ref.weights).expanduser()
            if not path.is_file():
                what = "is a directory, not a weight file" if path.is_dir() else "does not exist"
                raise UserError(f"{spec.path}: models.{key}.weights: {ref.weights!r} {what}")
    for data in dict.fromkeys(d for st in spec.settings for d in (st.train, st.test)):
        if not data.options.get("download"):
            load_dataset(data)
    for name, location in (("store", spec.store), ("output", spec.output)):
        path = Path(location)
        if "://" not in location and (path.is_file() or any(p.is_file() for p in path.parents)):
            raise UserError(f"{spec.path}: {name}: {location!r} is (inside) a file, not a folder; give a folder path")


# ------------------------------------------------------------------------------------------------ shared pieces
def _train_zoo(graph: Graph, spec: GridSpec, store: Store, model: str, rebuild: bool = False) -> list[str]:
    """The train_zoo task a task loading `model` must wait for (planned once; cached when the store holds it intact,
    to do when it is missing or damaged, or with `rebuild`)."""
    from .zoo import is_cached

    ref = spec.models[model]
    if ref.source != "zoo":
        return []
    name = f"train_zoo {model}"
    if graph.get(name) is None:
        cached = not rebuild and is_cached(ref, store)
        graph.add(Task(name, "train_zoo", "featrec_grid.zoo:ensure_trained", (ref, store), {"rebuild": rebuild},
                       cpus=1.0, gpus=spec.resources.gpus_per_extract, retries=spec.resources.max_retries,
                       status=CACHED if cached else TODO, meta={"model": model}))  # fmt: skip
    return [name]


def _extract(graph: Graph, spec: GridSpec, store: Store, model: str, data: DataRef, rebuild: bool) -> str:
    """The extract task of (model, data), named extract_name(...): cached when the store holds a complete, checksum-
    valid set under its key. A split longer than resources.rows_per_task is extracted as row ranges, one task each
    (cached when that range is complete), and this task then only writes the split's manifest. A corrupt set is a
    UserError before anything runs, unless `rebuild`."""
    from .extract import row_ranges, split_rows

    name = extract_name(model, data)
    if graph.get(name) is not None:
        return name
    ref = spec.models[model]
    key = spec_shard_key(spec, ref, data)
    rel = store.split_dir(model, data)
    r = spec.resources
    meta = {"model": model, "data": data}
    if not rebuild:
        state = store.check_split(rel, key)
        if state.state == "corrupt":
            raise UserError(f"corrupt shard set at {store.full_path(rel)}: {state.reason}; rerun with --rebuild")
        if state.state == "complete":
            graph.add(Task(name, "extract", "featrec_grid.extract:extract_split", key=key, status=CACHED, meta=meta))
            return name
    settings = {"batch_size": r.batch_size, "rows_per_shard": r.rows_per_shard, "precision": r.precision,
                "rebuild": rebuild, "cpus": r.cpus_per_extract}  # cpus None: what the runtime gives the task
    common = {"cpus": r.cpus_per_extract, "gpus": r.gpus_per_extract, "retries": r.max_retries, "key": key}
    ranges = row_ranges(split_rows(data), r.rows_per_task, r.batch_size)
    zoo = _train_zoo(graph, spec, store, model, rebuild)
    if len(ranges) == 1:
        graph.add(Task(name, "extract", "featrec_grid.extract:extract_split", (ref, data, store), settings,
                       deps=tuple(zoo), meta=meta, **common))  # fmt: skip
        return name
    parts = []
    for start, stop in ranges:
        done = not rebuild and store.check_range(rel, key, start, stop).complete
        parts.append(graph.add(Task(f"{name} rows {start}-{stop}", "extract", "featrec_grid.extract:extract_range",
                                    (ref, data, store, start, stop), settings, deps=() if done else tuple(zoo),
                                    status=CACHED if done else TODO, meta=meta, **common)).name)  # fmt: skip
    graph.add(Task(name, "finish_split", "featrec_grid.extract:finish_split", (ref, data, store, ranges),
                   {"precision": r.precision}, deps=tuple(parts), retries=r.max_retries, key=key, meta=meta))  # fmt: skip
    return name


def ridge_tasks(graph: Graph, store: Store, source: str, target: str, train: DataRef, test: DataRef, fit: FitSpec,
                *, name: str, deps: Iterable[str], retries: int = 2, meta: dict | None = None,
                kwargs: dict | None = None) -> Task:  # fmt: skip
    """A closed-form fit of source -> target after its source's statistics (planned once per source and train
    split, shared by every target). Used by the grid and by `bench scale`."""
    stats = stats_name(source, train)
    source_deps = [d for d in deps if d == extract_name(source, train)]
    if graph.get(stats) is None:
        graph.add(Task(stats, "source_stats", "featrec_grid.pairs:source_stats", (store, source, train, fit),
                       deps=tuple(source_deps), retries=retries, meta={"model": source}))  # fmt: skip
    return graph.add(Task(name, "fit", "featrec_grid.pairs:fit_pair",
                          (store, source, target, train, test, fit, "ridge", Ref(stats)), kwargs or {},
                          deps=tuple(deps), retries=retries, meta=meta or {}))  # fmt: skip


# ------------------------------------------------------------------------------------------------ the grid
def plan_grid(spec: GridSpec, output: str | Path | None = None, *, rebuild: bool = False) -> Graph:
    """The whole grid: pair fits (ridge after its source statistics, sgd, mlp searched with Ray Tune), each model's
    head analysis, model-level CKA of features and logits, the similarity measures of every setting, and the extraction and zoo training they need. A result
    whose key matches what `output` holds is cached, and then nothing it depends on is planned. Fits come in spec
    order (pair_todo)."""
    with planning_pass():
        return _plan_grid(spec, Path(output or spec.output), rebuild)


def _plan_grid(spec: GridSpec, out: Path, rebuild: bool) -> Graph:
    store = Store(spec.store)
    graph = Graph()
    r = spec.resources
    used = used_models(spec)

    for cell, s, t, method in pair_todo(spec):
        key = pair_key(spec, cell, s, t, method)
        meta = {"setting": cell.setting, "mode": cell.mode, "source": s, "target": t, "method": method}
        row = None if rebuild else reduce.load_pair(out, cell.setting, cell.mode, s, t, method, key)
        name = fit_name(spec, cell, s, t, method)
        if row is not None:
            graph.add(Task(name, "fit", "featrec_grid.pairs:fit_pair", key=key, status=CACHED, value={**meta, **row},
                           meta=meta))  # fmt: skip
            continue
        deps = [_extract(graph, spec, store, k, d, rebuild) for k in (s, t) for d in (cell.train, cell.test)]
        if method == "ridge":
            task = ridge_tasks(graph, store, s, t, cell.train, cell.test, cell.fit, name=name, deps=deps,
                               retries=r.max_retries, meta=meta, kwargs=bootstrap(spec))  # fmt: skip
            task.key = key
            continue
        args = (store, s, t, cell.train, cell.test, cell.fit, method)
        if method == "sgd":
            graph.add(Task(name, "fit", "featrec_grid.pairs:fit_pair", args, bootstrap(spec), deps=tuple(deps),
                           gpus=r.gpus_per_fit, retries=r.max_retries, key=key, meta=meta))  # fmt: skip
        else:
            graph.add(Task(name, "fit", "featrec_grid.pairs:fit_pair", args, bootstrap(spec), deps=tuple(deps),
                           gpus=r.gpus_per_fit, key=key, meta=meta, runner="tune", group=f"mlp {cell.setting}/{cell.mode}",
                           search={**mlp_search(cell.fit), "storage": str(out / "tune")}))  # fmt: skip

    for m in used:
        key = head_key(spec, m)
        name = f"head analysis {m}"
        row = None if rebuild else reduce.load_keyed(reduce.head_path(out, m), key)
        if row is not None:
            graph.add(Task(name, "head", "featrec_grid.model_table:model_row", key=key, status=CACHED, value=row,
                           meta={"model": m}))  # fmt: skip
            continue
        dep = _extract(graph, spec, store, m, spec.test, rebuild)
        graph.add(Task(name, "head", "featrec_grid.model_table:model_row", (store, spec.models[m], spec.test),
                       deps=(dep,), retries=r.max_retries, key=key, meta={"model": m}))  # fmt: skip

    for st in spec.settings:
        for column in CKA_COLUMNS:
            name = f"similarity {column} {st.label} ({len(used)} models)"
            key = _digest([[m, spec_shard_key(spec, spec.models[m], st.test)] for m in used] + [SIMILARITY_VERSION])
            meta = {"column": column, "setting": st.label}
            found = None if rebuild else reduce.load_keyed(reduce.similarity_path(out, st.label, column), key)
            if found is not None:
                graph.add(Task(name, "similarity", "featrec_grid.pairs:model_similarity_rows", key=key, status=CACHED,
                               value=found["rows"], meta=meta))  # fmt: skip
                continue
            deps = [_extract(graph, spec, store, m, st.test, rebuild) for m in used]
            graph.add(Task(name, "similarity", "featrec_grid.pairs:model_similarity_rows",
                           (store, used, st.test, column, st.label), deps=tuple(deps), retries=r.max_retries,
                           key=key, meta=meta))  # fmt: skip

    ckey = cka_key(spec, used)
    for column in CKA_COLUMNS:
        name = f"cka {column} ({len(used)} models)"
        found = None if rebuild else reduce.load_cka(out, column, ckey)
        if found is not None:
            graph.add(Task(name, "cka", "featrec_grid.pairs:model_cka", key=ckey, status=CACHED, value=found,
                           meta={"column": column}))  # fmt: skip
            continue
        deps = [_extract(graph, spec, store, m, spec.test, rebuild) for m in used]
        graph.add(Task(name, "cka", "featrec_grid.pairs:model_cka", (store, used, spec.test, column),
                       deps=tuple(deps), retries=r.max_retries, key=ckey, meta={"column": column}))  # fmt: skip
    return graph


def mlp_search(fit: FitSpec) -> dict[str, Any]:
    """The Ray Tune search of an MLP map: `fit.mlp.trials` configurations sampled (seeded) from `fit.mlp.search`
    (default mlpmap.SEARCH_SPACE); the trial with the lowest held-out MSE gives the pair's row."""
    from .mlpmap import SEARCH_SPACE

    space = {k: list(v) for k, v in (fit.mlp.get("search") or SEARCH_SPACE).items()}
    return {"space": space, "samples": int(fit.mlp.get("trials", 4)), "metric": "val_mse", "config_arg": "mlp_config",
            "label": "mlp"}


# ------------------------------------------------------------------------------------------------ layer-wise CKA
def layer_cka_settings(spec: GridSpec) -> dict[str, Any]:
    """The spec's `cka:` block (validated with the spec) with its defaults: every pair of used models by default."""
    block = spec.cka
    used = used_models(spec)
    pairs = [list(p) for p in block.pairs] if block.pairs else [[a, b] for i, a in enumerate(used) for b in used[i + 1 :]]
    return {"pairs": pairs, "layers": {k: list(v) for k, v in block.layers.items()}, "max_images": block.max_images,
            "batch_size": block.batch_size, "max_features": block.max_features}  # fmt: skip


def plan_layer_cka(spec: GridSpec) -> Graph:
    """One task per model pair of the spec's `cka:` block (after training the zoo models it loads)."""
    cfg = layer_cka_settings(spec)
    store = Store(spec.store)
    graph = Graph()
    for a, b in cfg["pairs"]:
        deps = [d for k in dict.fromkeys((a, b)) for d in _train_zoo(graph, spec, store, k)]
        graph.add(Task(f"layer_cka {a} {b}", "layer_cka", "featrec_grid.layers:pair_layer_cka",
                       (spec.models[a], spec.models[b], store, spec.test, cfg), deps=tuple(deps),
                       retries=spec.resources.max_retries, gpus=spec.resources.gpus_per_fit,
                       meta={"pair": (a, b)}))  # fmt: skip
    return graph


# ------------------------------------------------------------------------------------------------ inversion
def plan_invert(spec: GridSpec) -> Graph:
    """One task per inversion stage (class and match per model, the pair objectives, a decoder per model) after the
    zoo models they load are trained; decoders first, since they take longest."""
    from .invert.spec_run import stage_jobs

    store = Store(spec.store)
    graph = Graph()
    jobs = stage_jobs(spec, used_models(spec))
    order = sorted(jobs, key=lambda name: jobs[name].stage != "decoder")
    for name in order:
        job = jobs[name]
        deps = [d for k in job.models for d in _train_zoo(graph, spec, store, k)]
        graph.add(Task(name, "invert", "featrec_grid.invert.spec_run:run_stage_job", (job,), deps=tuple(deps),
                       gpus=job.config.gpus, retries=spec.resources.max_retries,
                       meta={"stage": job.stage}))  # fmt: skip
    return graph


def plan_for(spec: GridSpec, command: str, output: str | Path | None = None, *, rebuild: bool = False) -> Graph:
    """The graph `command` (run, cka or invert) executes for this spec: what `featrec-grid plan --for` prints."""
    if command == "run":
        return plan_grid(spec, output, rebuild=rebuild)
    if command == "cka":
        return plan_layer_cka(spec)
    if command == "invert":
        return plan_invert(spec)
    raise ValueError(f"unknown command {command!r}; allowed: run, cka, invert")
