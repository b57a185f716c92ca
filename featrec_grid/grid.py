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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import reduce
from .errors import UserError
from .extract import shard_key
from .publish import CKA_COLUMNS, used_models
from .refs import DataRef
from .spec import GridSpec
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


def plan(spec: GridSpec) -> list[PlannedTask]:
    """Every task of the grid in dependency order (before looking at what is already stored)."""
    used = used_models(spec)
    tasks = [PlannedTask("train_zoo", f"train_zoo {m}", model=m) for m in used if spec.models[m].source == "zoo"]
    for m in used:
        for d in (spec.train, spec.test):
            tasks.append(PlannedTask("extract", f"extract {m} {d.key}/{d.split}", model=m, data=d))
    if "ridge" in spec.fit.methods:
        for m in dict.fromkeys(s for s, _ in spec.pairs):
            tasks.append(PlannedTask("source_stats", f"source_stats {m} {spec.train.key}/{spec.train.split}", model=m))
    for method in spec.fit.methods:
        for s, t in spec.pairs:
            tasks.append(PlannedTask("fit", f"fit {s} -> {t} [{method}]", pair=(s, t), method=method))
    return tasks


def pair_key(spec: GridSpec, source: str, target: str, method: str) -> str:
    """Everything a pair's result depends on: the four shard sets and the fit settings of its method."""
    m = spec.models
    fit = {"method": method, "version": PAIR_VERSION}
    if method == "ridge":
        fit.update(alphas=spec.fit.alphas, val_fraction=spec.fit.val_fraction)
    else:
        fit.update(sgd=spec.fit.sgd)
    payload = [
        shard_key(m[source], spec.train), shard_key(m[source], spec.test),
        shard_key(m[target], spec.train), shard_key(m[target], spec.test), fit,
    ]  # fmt: skip
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
            raise UserError(f"--address {address}: cannot join a Ray cluster there ({_first_line(err)})") from None
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


def _extract(model, data, store, batch_size, rows_per_shard, rebuild, *after):
    from .extract import extract_split

    return extract_split(model, data, store, batch_size=batch_size, rows_per_shard=rows_per_shard, rebuild=rebuild)


def _source_stats(store, model, train, fit, *after):
    from .pairs import source_stats

    return source_stats(store, model, train, fit)


def _fit(store, source, target, train, test, fit, method, stats, *after):
    from .pairs import fit_pair

    return fit_pair(store, source, target, train, test, fit, method, stats)


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
    from tqdm import tqdm

    t_start = time.perf_counter()
    out_dir = Path(output or spec.output)
    store = Store(spec.store)
    store.check_writable()
    outcome = GridOutcome()
    rows: dict[tuple[str, str, str], dict] = {}
    todo: list[tuple[str, str, str]] = []
    for method in spec.fit.methods:
        for s, t in spec.pairs:
            row = None if rebuild else reduce.load_pair(out_dir, s, t, method, pair_key(spec, s, t, method))
            if row is None:
                todo.append((s, t, method))
            else:
                rows[(s, t, method)] = row
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
        }
        names: dict[Any, str] = {}
        fits: dict[Any, tuple[str, str, str]] = {}
        needed = list(dict.fromkeys(k for s, t, _ in todo for k in (s, t)))
        if any(reduce.load_cka(out_dir, c, cka_key(spec, used_models(spec))) is None for c in CKA_COLUMNS):
            needed = used_models(spec)  # CKA reads every model's test shards
        extracted: dict[str, list] = {}
        r = spec.resources
        for m in needed:
            ref = spec.models[m]
            deps = []
            if ref.source == "zoo" and (rebuild or any(_needs_extract(store, ref, d) for d in (spec.train, spec.test))):
                zref = remote["train_zoo"].remote(ref, store)
                names[zref] = f"train_zoo {m}"
                deps.append(zref)
            extracted[m] = []
            for d in (spec.train, spec.test):
                eref = remote["extract"].remote(ref, d, store, r.batch_size, r.rows_per_shard, rebuild, *deps)
                names[eref] = f"extract {m} {d.key}/{d.split}"
                extracted[m].append(eref)
        stats: dict[str, Any] = {}
        for s, t, method in todo:
            if method == "ridge" and s not in stats:
                stats[s] = remote["source_stats"].remote(store, s, spec.train, spec.fit, extracted[s][0])
                names[stats[s]] = f"source_stats {s}"
            fref = remote[f"fit_{method}"].remote(
                store, s, t, spec.train, spec.test, spec.fit, method, stats.get(s), *extracted[s], *extracted[t]
            )
            names[fref] = f"fit {s} -> {t} [{method}]"
            fits[fref] = (s, t, method)
        ckas: dict[Any, str] = {}
        models_used = used_models(spec)
        similarity_key = cka_key(spec, models_used)
        for column in CKA_COLUMNS:
            if rebuild or reduce.load_cka(out_dir, column, similarity_key) is None:
                deps = [e for m in models_used for e in extracted.get(m, [])]
                cref = remote["model_cka"].remote(store, models_used, spec.test, column, *deps)
                names[cref] = f"cka {column} ({len(models_used)} models)"
                ckas[cref] = column

        pending = list(names)
        bar = tqdm(total=len(pending), desc="tasks", unit="task", disable=not progress, file=sys.stderr)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ref = done[0]
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                cause = err.cause if isinstance(err.cause, Exception) else err
                if isinstance(cause, UserError) and outcome.user_error is None:
                    outcome.user_error = str(cause)
                outcome.failures[names[ref]] = _first_line(cause)
                if ref in fits:
                    outcome.failed += 1
            except ray.exceptions.RayError as err:
                outcome.failures[names[ref]] = _first_line(err)
                if ref in fits:
                    outcome.failed += 1
            else:
                if ref in fits:
                    s, t, method = fits[ref]
                    reduce.save_pair(out_dir, value, pair_key(spec, s, t, method))
                    rows[(s, t, method)] = value
                    outcome.computed += 1
                elif ref in ckas:
                    reduce.save_cka(out_dir, ckas[ref], value, similarity_key)
            bar.set_postfix_str(names[ref][:40])
            bar.update(1)
        bar.close()
        models = _models_frame(spec, store, rows)
    finally:
        if started:
            ray.shutdown()

    _finish(spec, out_dir, outcome, rows, models, time.perf_counter() - t_start, echo)
    return outcome


def cka_key(spec: GridSpec, models: list[str]) -> str:
    payload = [[m, shard_key(spec.models[m], spec.test)] for m in models]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:20]


def _needs_extract(store: Store, ref, data: DataRef) -> bool:
    return store.check_split(store.split_dir(ref.key, data), shard_key(ref, data)).state != "complete"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


def _models_frame(spec: GridSpec, store: Store, rows: dict) -> pd.DataFrame:
    """One row per model from its test-split manifest; test accuracy measured on the test split when possible."""
    records = []
    for key, ref in spec.models.items():
        rel = store.split_dir(key, spec.test)
        man = store.read_manifest(rel) if store.exists(f"{rel}/manifest.json") else {}
        acc = next(
            (r["accuracy_real"] for (_, t, _), r in rows.items() if t == key and r.get("accuracy_real") is not None),
            (man.get("model_info") or {}).get("test_accuracy"),
        )
        records.append(
            {
                "model": key,
                "source": ref.source,
                "architecture": ref.architecture,
                "family": man.get("family", ""),
                "features_dim": man.get("features_dim"),
                "logits_dim": man.get("logits_dim"),
                "label_space": man.get("label_space"),
                "test_accuracy": acc,
                "weights_digest": man.get("weights_digest"),
                "input_size": (man.get("transform") or {}).get("size"),
            }
        )
    return pd.DataFrame.from_records(records)


def _finish(spec, out_dir, outcome, rows, models, seconds, echo) -> None:
    from .publish import publish
    from .report import model_order

    versions = _versions()
    results = reduce.results_frame(rows.values(), versions)
    first = spec.fit.methods[0]
    agree = reduce.matrix(results, "agreement", first, list(spec.models)) if len(results) else None
    provenance = {
        "versions": versions,
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "run seconds": round(seconds, 1),
        "pairs computed": outcome.computed,
        "pairs reused": outcome.reused,
        "pairs failed": outcome.failed,
    }
    reduce.write_outputs(
        out_dir, results=results, models=models, resolved_spec=spec.resolved(), methods=spec.fit.methods,
        order=model_order(models, agree), provenance=provenance,
    )
    outcome.results = results
    outcome.report = publish(out_dir, spec)
    for name, msg in list(outcome.failures.items())[:20]:
        echo(f"failed: {name}: {msg}")
    echo(outcome.summary())
