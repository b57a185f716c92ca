"""`featrec-grid cka SPEC`: layer-by-layer CKA of chosen model pairs on the spec's test images, one task per pair.

Each model sees the same test images through its own input transform; the comparison is featrec_grid.cka.CKA,
the drop-in replacement for torch-cka (minibatch unbiased HSIC, float64 accumulation).
"""

from __future__ import annotations

from typing import Any

from .refs import DataRef, ModelRef
from .store import Store


def pair_layer_cka(a: ModelRef, b: ModelRef, store: Store, test: DataRef, cfg: dict[str, Any]) -> dict[str, Any]:
    """A task body: CKA between every layer of model a and every layer of model b on the first `max_images` test
    images; returns the export (CKA matrix as nested lists, names, layers, notes)."""
    import torch

    from .cka import CKA
    from .data import TransformedDataset, load_dataset
    from .models import load_classifier

    dataset = load_dataset(test)
    rows = list(range(min(cfg["max_images"], len(dataset))))

    def loader(ref: ModelRef):
        clf = load_classifier(ref, store)
        subset = torch.utils.data.Subset(TransformedDataset(dataset, clf.input.transform()), rows)
        return clf, torch.utils.data.DataLoader(subset, batch_size=cfg["batch_size"], drop_last=True)

    (clf_a, load_a), (clf_b, load_b) = loader(a), loader(b)
    cka = CKA(
        clf_a.model or clf_a.backbone, clf_b.model or clf_b.backbone, model1_name=a.key, model2_name=b.key,
        model1_layers=cfg["layers"].get(a.key), model2_layers=cfg["layers"].get(b.key),
        max_features=cfg["max_features"],
    )
    cka.compare(load_a, load_b)
    res = cka.export()
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in res.items()}
