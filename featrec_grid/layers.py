"""`featrec-grid cka SPEC`: layer-by-layer CKA of chosen model pairs on the spec's test images.

Each model sees the same test images through its own input transform; the comparison is featrec_grid.cka.CKA,
the drop-in replacement for torch-cka (minibatch unbiased HSIC, float64 accumulation).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import UserError
from .spec import GridSpec

FIELDS = ("pairs", "layers", "max_images", "batch_size", "max_features")


def _settings(spec: GridSpec) -> dict[str, Any]:
    block = dict(spec.cka)
    where = f"{spec.path}: cka"
    if bad := sorted(set(block) - set(FIELDS)):
        raise UserError(f"{where}: unknown field(s) {bad}; allowed: {', '.join(FIELDS)}")
    used = list(dict.fromkeys(k for p in spec.pairs for k in p))
    pairs = block.get("pairs") or [[a, b] for i, a in enumerate(used) for b in used[i + 1 :]]
    for p in pairs:
        if not (isinstance(p, list) and len(p) == 2 and all(k in spec.models for k in p)):
            raise UserError(f"{where}.pairs: {p!r} must be a [model, model] pair of keys from {list(spec.models)}")
    layers = block.get("layers") or {}
    if not isinstance(layers, dict) or any(k not in spec.models for k in layers):
        raise UserError(f"{where}.layers: must map model keys of {list(spec.models)} to lists of module names")
    return {
        "pairs": pairs,
        "layers": layers,
        "max_images": int(block.get("max_images", 512)),
        "batch_size": int(block.get("batch_size", 64)),
        "max_features": block.get("max_features"),
    }


def run_layer_cka(spec: GridSpec, progress: bool = True) -> list[dict[str, Any]]:
    """One export() per pair (CKA matrix as nested lists), in the order of the spec's cka.pairs."""
    from tqdm import tqdm

    from .cka import CKA
    from .data import TransformedDataset, load_dataset
    from .models import load_classifier
    from .store import Store
    from .zoo import ensure_trained

    cfg = _settings(spec)
    store = Store(spec.store)
    dataset = load_dataset(spec.test)
    rows = list(range(min(cfg["max_images"], len(dataset))))
    clfs: dict[str, Any] = {}

    def loader(key: str):
        if key not in clfs:
            ref = spec.models[key]
            if ref.source == "zoo":
                ensure_trained(ref, store)
            clfs[key] = load_classifier(ref, store)
        clf = clfs[key]
        subset = torch.utils.data.Subset(TransformedDataset(dataset, clf.input.transform()), rows)
        return clf, torch.utils.data.DataLoader(subset, batch_size=cfg["batch_size"], drop_last=True)

    out = []
    for a, b in tqdm(cfg["pairs"], desc="layer CKA", disable=not progress):
        (clf_a, load_a), (clf_b, load_b) = loader(a), loader(b)
        cka = CKA(
            clf_a.model or clf_a.backbone, clf_b.model or clf_b.backbone, model1_name=a, model2_name=b,
            model1_layers=cfg["layers"].get(a), model2_layers=cfg["layers"].get(b), max_features=cfg["max_features"],
        )
        cka.compare(load_a, load_b)
        res = cka.export()
        out.append({k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in res.items()})
    return out
