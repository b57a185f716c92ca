"""Plain references to a model and a dataset split, as a spec names them; no heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The source table: each model source and the module whose @register_source loader serves it. models.py imports
# the module named here the first time a source is used, so it never imports zoo (or any later source) itself.
SOURCE_MODULES = {
    "timm": "featrec_grid.models",
    "torchvision": "featrec_grid.models",
    "checkpoint": "featrec_grid.models",
    "zoo": "featrec_grid.zoo",
    "lite": "featrec_grid.models",
}
MODEL_SOURCES = tuple(SOURCE_MODULES)
DATASETS = ("digits", "cifar10", "cifar100", "places365", "folder")
TRANSFORMS = ("model", "seed")  # data option `transform`: each model's own preprocessing, or the seed's


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
        """The dataset's path component: its name plus a view suffix and a `seed` suffix (the seed's transform) when
        options select them."""
        parts = [self.dataset, self.options.get("view"), "seed" if self.options.get("transform") == "seed" else None]
        return "-".join(str(p) for p in parts if p)
