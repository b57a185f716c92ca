"""`featrec-grid invert SPEC`: the spec's models and data -> one task per inversion stage (plan.plan_invert, run by
the runtime) -> inversion.parquet, inversion_cross.parquet + PNGs, written by the driver alone.

Task bodies (`run_stage_job`) load their classifiers from the spec's store and their images from the spec's data
themselves, run on "cuda" when the task was given a GPU, and return rows and CPU image tensors: a worker's disk is
not the driver's, so tasks never write to the output folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import UserError
from ..refs import DataRef, ModelRef
from ..spec import GridSpec
from .experiments import Outcome
from .run import (
    InversionConfig,
    check_images,
    plan_stages,
    run_stage,
    stage_models,
    stage_name,
    torch_threads,
    write_outcome,
)


def load_images(data: DataRef, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images as [N, 3, size, size] in [0, 1] (each classifier normalises inside), and their labels."""
    from ..data import load_dataset

    ds = load_dataset(data)
    pics, labels = [], []
    for i in range(len(ds)):
        img, label = ds[i]
        pics.append(np.asarray(img.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0)
        labels.append(label)
    return torch.from_numpy(np.stack(pics)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def heldout_map(classifiers: dict) -> dict[str, str]:
    """Each model is scored by the next model (cyclically) that shares its label space."""
    keys = list(classifiers)
    out = {}
    for i, k in enumerate(keys):
        others = keys[i + 1 :] + keys[:i]
        match = next((o for o in others if classifiers[o].num_classes == classifiers[k].num_classes), None)
        if match:
            out[k] = match
    return out


@dataclass(frozen=True)
class StageJob:
    """Everything one inversion task needs, as plain references: the stage, the models it uses (in spec order),
    where they are stored, the data splits it reads (None: not needed) and the settings."""

    stage: str
    arg: Any
    models: dict[str, ModelRef]
    heldout: dict[str, str]
    store: str
    train: DataRef | None
    test: DataRef | None
    config: InversionConfig


def task_device() -> str:
    """The torch device of this task: "cuda" when this process sees a GPU, else "cpu" (Ray hides GPUs from
    tasks that did not ask for one)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_stage_job(job: StageJob, device: str | None = None) -> Outcome:
    """A Ray task body: load the job's classifiers and images, run its stage on `device` (default: task_device()),
    return the Outcome (rows, cross rows, image grids on the CPU). Writes nothing."""
    from ..models import load_classifier
    from ..store import Store
    from .pixels import on_device

    device = device or task_device()
    cfg = job.config
    with torch_threads(cfg.threads):
        store = Store(job.store)
        classifiers = {k: on_device(load_classifier(ref, store), device) for k, ref in job.models.items()}
        train_x = test_x = test_y = None
        if job.train is not None:
            train_x, train_y = load_images(job.train, cfg.decoder.size)
            check_images("train images", train_x, train_y)
        if job.test is not None:
            test_x, test_y = load_images(job.test, cfg.decoder.size)
            check_images("test images", test_x, test_y)
        return run_stage(job.stage, job.arg, classifiers, job.heldout, train_x, test_x, test_y, cfg, device)


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

    @property
    def exit_code(self) -> int:
        return 2 if self.user_error else 1 if self.failures else 0


@dataclass(frozen=True)
class _Labels:
    """What stage planning needs of a classifier: its key and class count (nothing is loaded or trained)."""

    key: str
    num_classes: int


def class_count(ref: ModelRef) -> int:
    """The number of classes of a model, without training it: zoo models classify the 10 digits; others are loaded."""
    from ..models import load_classifier
    from ..zoo import NUM_CLASSES

    return NUM_CLASSES if ref.source == "zoo" else load_classifier(ref).num_classes


def stage_jobs(spec: GridSpec) -> dict[str, StageJob]:
    """Every inversion stage of the spec's used models as a StageJob by task name, in report order. The models must
    share one label space."""
    from ..plan import used_models

    config = InversionConfig.from_dict(spec.inversion)
    labels = {k: _Labels(k, class_count(spec.models[k])) for k in used_models(spec)}
    if len({c.num_classes for c in labels.values()}) > 1:
        raise UserError(f"{spec.path}: models: inversion compares models on one label space; got class counts "
                        f"{ {k: c.num_classes for k, c in labels.items()} }")  # fmt: skip
    heldout = heldout_map(labels)
    jobs: dict[str, StageJob] = {}
    for stage, arg in plan_stages(labels, config):
        keys = stage_models(stage, arg, labels, heldout, config)
        jobs[stage_name(stage, arg)] = StageJob(
            stage, arg, {k: spec.models[k] for k in keys}, heldout, spec.store,
            spec.train if stage == "decoder" else None, spec.test if stage in ("match", "decoder") else None, config,
        )  # fmt: skip
    return jobs


def run_invert_spec(
    spec: GridSpec, output: Path, progress: bool = True, address: str | None = None
) -> InversionOutcome:
    """Run every inversion stage of the spec as a task of plan.plan_invert (zoo models trained first, as tasks of
    the same graph), joining `address`, or the running Ray, or a fresh single-node one; then write the PNG grids
    under `output`. A failed task is reported and the others' results are kept. Returns the tables for
    reduce.save_inversion."""
    from .. import reduce, runtime
    from ..plan import plan_invert

    t0 = time.perf_counter()
    graph = plan_invert(spec)
    with runtime.session(address, spec.resources.num_cpus):
        run = runtime.execute(graph, progress=progress, desc="inversion")
    reduce.save_tasks(output, "invert", run.table())
    merged = Outcome()
    stages = graph.of_kind("invert")
    for task in stages:  # report order, whatever order the tasks ended in
        if task.name in run.values and task.name not in run.failures:
            merged.add(run.values[task.name])
    table, images, cross = write_outcome(merged, Path(output))
    user_error = f"{run.user_error_task}: {run.user_error}" if run.user_error else None
    return InversionOutcome(table, cross, images, run.failures, user_error, len(stages), time.perf_counter() - t0)
