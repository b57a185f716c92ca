"""Benchmark: extraction into the store vs a bare forward loop over the same model, data and batches.

Both sides load the classifier and the dataset, run the same DataLoader under inference mode and compute
features and logits; extraction also checks the head, builds Arrow batches, hashes and writes shards,
head and manifest. The overhead is their time ratio minus one.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from ..refs import DataRef, ModelRef

DEFAULT_MODEL = ModelRef("lite0", "lite", "tf_efficientnet_lite0", options={"img_size": 96})
DEFAULT_DATA = DataRef("digits", "test")


def _bare(model: ModelRef, data: DataRef, batch_size: int) -> float:
    import torch

    from ..data import TransformedDataset, load_dataset
    from ..models import load_classifier

    t0 = time.perf_counter()
    clf = load_classifier(model)
    loader = torch.utils.data.DataLoader(
        TransformedDataset(load_dataset(data), clf.input.transform()), batch_size=batch_size, shuffle=False
    )
    with torch.inference_mode():
        for x, _, _ in loader:
            f = clf.backbone(x)
            (f @ clf.head_weight.T + clf.head_bias).numpy()
    return time.perf_counter() - t0


def _ours(model: ModelRef, data: DataRef, batch_size: int, root: str) -> float:
    from ..extract import extract_split
    from ..store import Store

    t0 = time.perf_counter()
    extract_split(model, data, Store(root), batch_size=batch_size, rebuild=True, device="cpu")
    return time.perf_counter() - t0


def run_extract_bench(
    model: ModelRef = DEFAULT_MODEL, data: DataRef = DEFAULT_DATA, batch_size: int = 64, repeats: int = 2
) -> dict[str, Any]:
    """Alternate bare and store runs `repeats` times and keep each side's fastest, to damp machine noise."""
    import torch

    bare, ours = [], []
    with tempfile.TemporaryDirectory() as root:
        for _ in range(repeats):
            bare.append(_bare(model, data, batch_size))
            ours.append(_ours(model, data, batch_size, root))
    return {
        "model": f"{model.source}:{model.architecture} @ {model.options.get('img_size', 'native')} px",
        "data": f"{data.dataset}/{data.split}",
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "bare_seconds": min(bare),
        "extract_seconds": min(ours),
        "overhead": min(ours) / min(bare) - 1.0,
        "target_overhead": 0.10,
        "all_bare": bare,
        "all_extract": ours,
    }


def format_extract_bench(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"extract benchmark: {r['model']} on {r['data']}, batch {r['batch_size']}, {r['torch_threads']} threads",
            f"  bare forward loop {r['bare_seconds']:.2f} s, extraction into the store {r['extract_seconds']:.2f} s",
            f"  overhead {100 * r['overhead']:.1f}% (target <= {100 * r['target_overhead']:.0f}%)",
        ]
    )
