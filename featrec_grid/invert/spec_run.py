"""`featrec-grid invert SPEC`: the spec's models and data -> one Ray task per inversion stage (grid.map_tasks) ->
inversion.parquet, inversion_cross.parquet, inversion_transfer.parquet + PNGs, written by the driver alone.

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

from ..errors import UserError, first_line
from ..refs import DataRef, ModelRef
from ..spec import GridSpec
from .experiments import Outcome
from .gallery import transfer_table
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
    transfer: pd.DataFrame | None = None

    @property
    def exit_code(self) -> int:
        return 2 if self.user_error else 1 if self.failures else 0


def run_invert_spec(
    spec: GridSpec, output: Path, progress: bool = True, address: str | None = None
) -> InversionOutcome:
    """Train the spec's zoo models (in this process, so tasks find them in the store), check the models share one
    label space, run every inversion stage as a Ray task (joining `address`, or the running Ray, or a fresh
    single-node one), then write the PNG grids under `output`. A failed task is reported and the others' results
    are kept. Returns the tables for reduce.save_inversion."""
    from .. import grid
    from ..models import load_classifier
    from ..store import Store
    from ..zoo import ensure_trained

    t0 = time.perf_counter()
    config = InversionConfig.from_dict(spec.inversion)
    store = Store(spec.store)
    used = list(dict.fromkeys(k for p in spec.pairs for k in p))
    classifiers = {}
    for key in used:
        ref = spec.models[key]
        if ref.source == "zoo":
            ensure_trained(ref, store)
        classifiers[key] = load_classifier(ref, store)
    if len({c.num_classes for c in classifiers.values()}) > 1:
        raise UserError(f"{spec.path}: models: inversion compares models on one label space; got class counts "
                        f"{ {k: c.num_classes for k, c in classifiers.items()} }")  # fmt: skip
    heldout = heldout_map(classifiers)
    jobs: dict[str, StageJob] = {}
    for stage, arg in plan_stages(classifiers, config, heldout):
        keys = stage_models(stage, arg, classifiers, heldout, config)
        jobs[stage_name(stage, arg)] = StageJob(
            stage, arg, {k: spec.models[k] for k in keys}, heldout, spec.store,
            spec.train if stage == "decoder" else None, spec.test if stage in ("match", "decoder") else None, config,
        )  # fmt: skip
    # the decoders take longest: submit them first so they start while the optimisation stages fill other CPUs
    order = sorted(jobs, key=lambda name: jobs[name].stage != "decoder")
    results: dict[str, Outcome] = {}
    failures: dict[str, str] = {}
    user_error = None
    tasks = grid.map_tasks(
        run_stage_job,
        {name: (jobs[name],) for name in order},
        address=address,
        num_cpus=spec.resources.num_cpus,
        gpus=config.gpus,
        progress=progress,
        desc="inversion",
    )
    for name, value, error in tasks:
        if error is None:
            results[name] = value
            continue
        if isinstance(error, UserError) and user_error is None:
            user_error = f"{name}: {error}"
        failures[name] = first_line(error)
    merged = Outcome()
    for name in jobs:  # report order, whatever order the tasks ended in
        if name in results:
            merged.add(results[name])
    table, images, cross = write_outcome(merged, Path(output))
    return InversionOutcome(table, cross, images, failures, user_error, len(jobs), time.perf_counter() - t0,
                            transfer_table(merged.transfer))  # fmt: skip
