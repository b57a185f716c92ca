"""The task bodies of `featrec-grid invert SPEC`: the spec's models and data -> one StageJob per inversion stage
(plan.plan_invert makes them tasks, grid.run_invert runs them) -> rows, transfer rows and images the driver writes.

Task bodies (`run_stage_job`) load their classifiers from the spec's store and their images from the spec's data
themselves, run on "cuda" when the task was given a GPU, and return rows and CPU image tensors: a worker's disk is
not the driver's, so tasks never write to the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import UserError
from ..refs import DataRef, ModelRef
from .experiments import Outcome

if TYPE_CHECKING:
    from ..spec import GridSpec
from .run import (
    InversionConfig,
    check_images,
    plan_stages,
    run_stage,
    stage_models,
    stage_name,
    torch_threads,
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


def stage_jobs(spec: GridSpec, keys: list[str]) -> dict[str, StageJob]:
    """Every inversion stage of models `keys` as a StageJob by task name, in report order. The models must share one
    label space."""
    config = InversionConfig.from_dict(spec.inversion)
    labels = {k: _Labels(k, class_count(spec.models[k])) for k in keys}
    if len({c.num_classes for c in labels.values()}) > 1:
        raise UserError(f"{spec.path}: models: inversion compares models on one label space; got class counts "
                        f"{ {k: c.num_classes for k, c in labels.items()} }")  # fmt: skip
    heldout = heldout_map(labels)
    jobs: dict[str, StageJob] = {}
    for stage, arg in plan_stages(labels, config, heldout):
        keys = stage_models(stage, arg, labels, heldout, config)
        jobs[stage_name(stage, arg)] = StageJob(
            stage, arg, {k: spec.models[k] for k in keys}, heldout, spec.store,
            spec.train if stage == "decoder" else None, spec.test if stage in ("match", "decoder") else None, config,
        )  # fmt: skip
    return jobs
