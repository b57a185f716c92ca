"""One row per model for models.parquet: what its test-split manifest says, plus the head analysis on its shards.

No Ray here: grid.py runs `model_row` as one task per model and caches the rows under the output folder.
"""

from __future__ import annotations

from typing import Any

from .heads import head_analysis
from .refs import DataRef, ModelRef
from .store import Store


def model_row(store: Store, ref: ModelRef, test: DataRef) -> dict[str, Any]:
    """Manifest facts (family, dims, label space, transform) and heads.head_analysis of the model's head on its
    test shards; labels are used for test accuracy only when the model's label space is the dataset's."""
    rel = store.split_dir(ref.key, test)
    man = store.read_manifest(rel)
    weight, bias = store.read_head(rel)
    cols = store.read_split(rel, columns=["features", "logits", "label"])
    with_labels = man.get("label_space") is not None and man.get("label_space") == man.get("dataset_label_space")
    head = head_analysis(weight, bias, cols["features"], cols["logits"], cols["label"] if with_labels else None)
    return {
        "model": ref.key,
        "source": ref.source,
        "architecture": ref.architecture,
        "family": man.get("family", ""),
        "features_dim": man.get("features_dim"),
        "logits_dim": man.get("logits_dim"),
        "label_space": man.get("label_space"),
        "test_accuracy": head.pop("test_accuracy", None),
        "weights_digest": man.get("weights_digest"),
        "input_size": (man.get("transform") or {}).get("size"),
        **{k: v for k, v in head.items() if k not in ("feature_dim", "classes")},
        "classes": head["classes"],
        "feature_dim": head["feature_dim"],
    }


def placeholder_row(ref: ModelRef) -> dict[str, Any]:
    """The row of a model whose test shards are missing (its extraction failed): names only."""
    return {"model": ref.key, "source": ref.source, "architecture": ref.architecture, "family": ""}
