"""Run one classifier over one dataset split into the store: features and logits from a single forward pass."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import UserError
from .refs import DataRef, ModelRef
from .store import Store

FORMAT_VERSION = 1


def shard_key(model: ModelRef, data: DataRef) -> str:
    """Cache key of a shard set: everything that determines its content, known before loading anything."""
    payload = {
        "format": FORMAT_VERSION,
        "model": [model.source, model.architecture, model.weights, model.options],
        "data": [data.dataset, data.split, data.options],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def split_status(store: Store, model: ModelRef, data: DataRef):
    """The store's verdict on this (model, split): missing, stale, corrupt or complete."""
    return store.check_split(store.split_dir(model.key, data), shard_key(model, data))


def extract_split(
    model: ModelRef,
    data: DataRef,
    store: Store,
    *,
    batch_size: int = 64,
    rows_per_shard: int = 65536,
    rebuild: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Write (index, label, logits, features) of `model` on `data` to the store unless a valid set exists.

    Returns the manifest plus `reused` (True when nothing was computed). A corrupt set is an error naming
    its path unless `rebuild` is set.
    """
    import torch

    from .data import TransformedDataset, load_dataset
    from .models import extract_batch, load_classifier

    rel = store.split_dir(model.key, data)
    key = shard_key(model, data)
    status = store.check_split(rel, key)
    if status.state == "complete" and not rebuild:
        return {**status.manifest, "reused": True}
    if status.state == "corrupt" and not rebuild:
        raise UserError(f"corrupt shard set at {store.full_path(rel)}: {status.reason}; rerun with --rebuild")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    clf = load_classifier(model, store)
    clf.backbone.to(device)
    if device == "cuda":
        clf.backbone.to(memory_format=torch.channels_last)
    dataset = load_dataset(data)
    loader = torch.utils.data.DataLoader(
        TransformedDataset(dataset, clf.input.transform()), batch_size=batch_size, shuffle=False, num_workers=0
    )

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        with torch.inference_mode():
            for x, label, index in loader:
                feats, logits = extract_batch(clf, x.to(device))
                yield (
                    index.numpy().astype(np.int64),
                    label.numpy().astype(np.int64),
                    logits.float().cpu().numpy(),
                    feats.float().cpu().numpy(),
                )

    meta = {
        "key": key,
        "model": model.key,
        "source": model.source,
        "architecture": model.architecture,
        "family": clf.family,
        "weights": model.weights,
        "weights_digest": clf.weights_digest,
        "dataset": data.dataset,
        "dataset_key": data.key,
        "split": data.split,
        "data_options": data.options,
        "label_space": clf.info.get("label_space"),
        "dataset_label_space": getattr(dataset, "label_space", None),
        "transform": clf.input.as_dict(),
        "model_info": {k: v for k, v in clf.info.items() if isinstance(v, str | int | float | bool | None)},
        "device": device,
        "torch": torch.__version__,
    }
    head = (clf.head_weight.detach().float().cpu().numpy(), clf.head_bias.detach().float().cpu().numpy())
    manifest = store.write_split(rel, meta=meta, batches=batches(), head=head, rows_per_shard=rows_per_shard)
    return {**manifest, "reused": False, "seconds": time.perf_counter() - t0}
