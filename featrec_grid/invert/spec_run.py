"""`featrec-grid invert SPEC`: the spec's models and data -> run_inversion -> inversion.parquet + PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..spec import GridSpec
from .run import InversionConfig, run_inversion


def _images(spec: GridSpec, part: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images as [N, 3, size, size] in [0, 1] (each classifier normalises inside)."""
    from ..data import load_dataset

    ds = load_dataset(spec.train if part == "train" else spec.test)
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


def run_invert_spec(spec: GridSpec, output: Path, progress: bool = True):
    """Load the spec's models (zoo models trained on first use), run every inversion, write tables and images."""
    from ..models import load_classifier
    from ..store import Store
    from ..zoo import ensure_trained

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
    size = config.decoder.size
    train_x, train_y = _images(spec, "train", size)
    test_x, test_y = _images(spec, "test", size)
    table = run_inversion(classifiers, heldout_map(classifiers), train_x, train_y, test_x, test_y, config,
                          output_dir=output, progress=progress)  # fmt: skip
    return table
