"""Plain references to a model and a dataset split, as a spec names them; no heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL_SOURCES = ("timm", "torchvision", "checkpoint", "zoo", "lite")
DATASETS = ("digits", "cifar10", "cifar100", "places365", "folder")


@dataclass(frozen=True)
class ModelRef:
    """One classifier: `key` is the spec's name for it and flows unchanged into paths, columns and labels."""

    key: str
    source: str
    architecture: str
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class DataRef:
    """One split of one dataset: `dataset` is a name from DATASETS, `split` e.g. 'train' or 'test'."""

    dataset: str
    split: str
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    @property
    def key(self) -> str:
        """The dataset's path component: its name plus a view suffix when options select one."""
        view = self.options.get("view")
        return f"{self.dataset}-{view}" if view else self.dataset
