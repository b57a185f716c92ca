"""`featrec-grid run`: plan the grid, execute it on Ray, save each result as it arrives, write the tables and the
report. The graph comes from plan.py, Ray from runtime.py; this module only wires them to the output folder."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import reduce, runtime
from .model_table import placeholder_row
from .plan import Task, check_inputs, plan_grid
from .spec import GridSpec
from .store import Store, check_output_dir, run_lock


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
    t_start = time.perf_counter()
    out_dir = Path(output or spec.output)
    check_inputs(spec)
    with _locked(spec, out_dir):
        return _run_grid(spec, out_dir, address, rebuild, progress, echo, t_start)


@contextmanager
def _locked(spec: GridSpec, out_dir: Path) -> Iterator[None]:
    """The output folder (and a local store) held by this run alone: a second run on them is refused with one
    line, so no two runs interleave their writes. Checks both are writable first."""
    store = Store(spec.store)
    store.check_writable()
    check_output_dir(out_dir)
    with ExitStack() as stack:
        stack.enter_context(run_lock(out_dir))
        if store.is_local:
            stack.enter_context(run_lock(store.full_path("")))
        yield


def _run_grid(spec: GridSpec, out_dir: Path, address: str | None, rebuild: bool, progress: bool,
              echo: Callable[[str], None], t_start: float) -> GridOutcome:  # fmt: skip
    graph = plan_grid(spec, out_dir, rebuild=rebuild)
    rows: dict[str, dict] = {t.name: t.value for t in graph.of_kind("fit") if t.value is not None}
    heads: dict[str, dict] = {t.meta["model"]: t.value for t in graph.of_kind("head") if t.value is not None}

    def save(task: Task, value: Any) -> None:
        if task.kind == "fit":
            row = {"setting": task.meta["setting"], "mode": task.meta["mode"], **value}
            reduce.save_pair(out_dir, row, task.key)
            rows[task.name] = row
        elif task.kind == "head":
            reduce.save_keyed(reduce.head_path(out_dir, task.meta["model"]), value, task.key)
            heads[task.meta["model"]] = value
        elif task.kind == "cka":
            reduce.save_cka(out_dir, task.meta["column"], value, task.key)
        elif task.kind == "similarity":
            reduce.save_similarity(out_dir, task.meta["setting"], task.meta["column"], value, task.key)

    with runtime.session(address, spec.resources.num_cpus):
        run = runtime.execute(graph, on_result=save, progress=progress)
    outcome = GridOutcome(computed=run.computed("fit"), reused=run.reused("fit"), failed=run.failed("fit"),
                          failures=run.failures, user_error=run.user_error)  # fmt: skip
    reduce.save_tasks(out_dir, "run", run.table())
    reduce.write_similarity(out_dir, [row for t in graph.of_kind("similarity") if run.values.get(t.name)
                                      for row in run.values[t.name]])  # fmt: skip
    fits = [rows[t.name] for t in graph.of_kind("fit") if t.name in rows]  # spec order
    models = pd.DataFrame.from_records([heads.get(m) or placeholder_row(ref) for m, ref in spec.models.items()])
    _finish(spec, out_dir, outcome, fits, models, time.perf_counter() - t_start, echo)
    return outcome


def _finish(spec, out_dir, outcome, rows, models, seconds, echo) -> None:
    """Tables, provenance and the report of a grid run, then its summary lines."""
    from .publish import headline, provenance_fields, publish

    versions = _versions()
    results = reduce.results_frame(rows, versions)
    cells = [(c.setting, c.mode, m) for c in spec.cells() for m in c.fit.methods]
    provenance = {
        **provenance_fields(sys.argv),
        "versions": versions,
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "run seconds": round(seconds, 1),
        "pairs computed": outcome.computed,
        "pairs reused": outcome.reused,
        "pairs failed": outcome.failed,
    }
    reduce.write_outputs(
        out_dir, results=results, models=models, resolved_spec=spec.resolved(), cells=cells,
        order=list(spec.models), provenance=provenance,
    )
    outcome.results = results
    outcome.report = publish(out_dir, spec)
    for name, msg in list(outcome.failures.items())[:20]:
        echo(f"failed: {name}: {msg}")
    if len(outcome.failures) > 20:
        echo(f"... and {len(outcome.failures) - 20} more failed tasks (tasks.parquet lists them all)")
    for line in headline(results, outcome.report):
        echo(line)
    echo(outcome.summary())


@dataclass
class StageOutcome:
    """What `cka` (or another stage beside the grid) did: tasks, failures, the report."""

    tasks: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    user_error: str | None = None
    report: Path | None = None

    @property
    def exit_code(self) -> int:
        return 2 if self.user_error else 1 if self.failures else 0


def run_layer_cka(spec: GridSpec, *, address: str | None = None, output: str | None = None,
                  progress: bool = True) -> StageOutcome:  # fmt: skip
    """`featrec-grid cka`: one task per pair of the spec's `cka:` block, then layer_cka.json and the report."""
    from .plan import plan_layer_cka
    from .publish import publish

    out_dir = Path(output or spec.output)
    check_inputs(spec)
    with _locked(spec, out_dir):
        graph = plan_layer_cka(spec)
        with runtime.session(address, spec.resources.num_cpus):
            run = runtime.execute(graph, progress=progress, desc="layer CKA")
        reduce.save_tasks(out_dir, "cka", run.table())
        exports = [run.values[t.name] for t in graph.of_kind("layer_cka") if t.name in run.values]
        reduce.save_layer_cka(out_dir, exports)
        return StageOutcome(len(graph.todo()), run.failures, run.user_error, publish(out_dir, spec))


@dataclass
class InversionOutcome:
    """What `featrec-grid invert` computed: the tables and images of the tasks that finished, and the failures
    (task name -> one line); user_error holds the first task failure a user can fix."""

    table: pd.DataFrame
    cross: pd.DataFrame
    images: list[tuple[str, str]]
    failures: dict[str, str] = field(default_factory=dict)
    user_error: str | None = None
    tasks: int = 0
    seconds: float = 0.0
    transfer: pd.DataFrame | None = None

    @property
    def exit_code(self) -> int:
        return 2 if self.user_error else 1 if self.failures else 0


def run_invert(spec: GridSpec, output: str | Path, progress: bool = True,
               address: str | None = None) -> InversionOutcome:  # fmt: skip
    """`featrec-grid invert`: every inversion stage as a task of plan.plan_invert (zoo models trained first, as tasks
    of the same graph) on the joined, running or a fresh single-node Ray; then the PNG grids under `output`. A
    failed task is reported and the others' results are kept. Returns the tables for reduce.save_inversion."""
    from .invert.experiments import Outcome
    from .invert.gallery import transfer_table
    from .invert.run import write_outcome
    from .plan import plan_invert

    t0 = time.perf_counter()
    check_inputs(spec)
    with _locked(spec, Path(output)):
        graph = plan_invert(spec)
        with runtime.session(address, spec.resources.num_cpus):
            run = runtime.execute(graph, progress=progress, desc="inversion")
        reduce.save_tasks(output, "invert", run.table())
    merged = Outcome()
    stages = graph.of_kind("invert")
    for task in stages:  # report order, whatever order the tasks ended in
        if task.name in run.values:
            merged.add(run.values[task.name])
    table, images, cross = write_outcome(merged, Path(output))
    user_error = f"{run.user_error_task}: {run.user_error}" if run.user_error else None
    return InversionOutcome(table, cross, images, run.failures, user_error, len(stages), time.perf_counter() - t0,
                            transfer_table(merged.transfer))  # fmt: skip
