"""Benchmark: extraction into the store vs a bare forward loop over the same model, data and batches.

Both sides load the classifier and the dataset, run the same DataLoader under inference mode and compute
features and logits; extraction also checks the head, builds Arrow batches, hashes and writes shards,
head and manifest. The overhead is their time ratio minus one.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
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


# ---------------------------------------------------------------------------------------------------------------
# Throughput mode (meant for a GPU; runs on CPU with tiny settings): images/s of a torchvision model through the
# extraction path vs a bare forward loop of the same model, same batches, batch size, precision and memory format.


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, x, batches: int, device: str) -> float:
    """Seconds for `batches` calls of step(x), the device synchronised before both clock readings."""
    import torch

    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            step(x)
        _sync(device)
        return time.perf_counter() - t0


def run_throughput_bench(
    arch: str = "resnet50",
    size: int = 224,
    device: str | None = None,
    precision: str = "fp32",
    images: int = 8192,
    batch_size: int | str = "auto",
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """images/s of torchvision `arch` (random weights) on random size x size images, two ways:

    - extraction path: extract.extract_batch (backbone under optional bf16 autocast, float32 head, the split
      check on the first batch) plus copying float32 features and logits to the host, as extract_split does;
    - bare: the untouched model's own forward plus copying its logits to the host.

    Both use channels_last model and input on CUDA, the same precision (bf16 = autocast) and the same batch
    (`batch_size` "auto" = extract.auto_batch_size), on one random batch kept on the device, so data loading and
    host-to-device copies are left out of both. ceil(images / batch) batches per side after one warm-up batch
    each; the sides alternate `repeats` times and each keeps its best time. ratio = extraction / bare images/s.
    """
    import math

    import torch

    from ..errors import UserError
    from ..extract import _check_batch_size, auto_batch_size, check_precision, extract_batch
    from ..models import load_classifier

    check_precision(precision)
    _check_batch_size(batch_size)
    if images < 1 or size < 1 or repeats < 1:
        raise UserError(f"images, size and repeats must be >= 1, got {images}, {size}, {repeats}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = torch.device(device).type
    on_cuda = device_type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise UserError(f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu")

    clf = load_classifier(ModelRef("bench", "torchvision", arch))
    for module in (clf.backbone, clf.model):  # shared parameters, but .to() gives each module its own buffers
        module.to(device)
        if on_cuda:
            module.to(memory_format=torch.channels_last)
    batch = auto_batch_size(clf, size, device, precision) if batch_size == "auto" else batch_size
    batches = math.ceil(images / batch)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    if on_cuda:
        x = x.contiguous(memory_format=torch.channels_last)

    def ours(xb):
        features, logits = extract_batch(clf, xb, precision=precision)
        return features.float().cpu(), logits.float().cpu()

    def bare(xb):
        with torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext():
            logits = clf.model(xb)
        return logits.float().cpu()

    _timed(bare, x, 1, device)  # warm-up: allocator, kernels, and the head check of the extraction path
    _timed(ours, x, 1, device)
    bare_s, ours_s = [], []
    for _ in range(repeats):
        bare_s.append(_timed(bare, x, batches, device))
        clf.head_checked = False  # every extraction run checks its first batch, as extract_split does
        ours_s.append(_timed(ours, x, batches, device))
    n = batches * batch
    bare_ips, ours_ips = n / min(bare_s), n / min(ours_s)
    return {
        "model": f"torchvision:{arch} (random weights) @ {size} px",
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "precision": precision,
        "channels_last": on_cuda,
        "batch_size": batch,
        "batch_size_asked": batch_size,
        "images": n,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "bare_images_per_s": bare_ips,
        "extract_images_per_s": ours_ips,
        "ratio": ours_ips / bare_ips,
        "all_bare_seconds": bare_s,
        "all_extract_seconds": ours_s,
    }


def format_throughput_bench(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"extract throughput: {r['model']} on {r['device']}, {r['precision']}, batch {r['batch_size']} "
            f"(asked {r['batch_size_asked']}), channels_last {r['channels_last']}, {r['images']} images, "
            f"best of {r['repeats']}",
            f"  bare forward loop     {r['bare_images_per_s']:.1f} images/s",
            f"  extraction path       {r['extract_images_per_s']:.1f} images/s",
            f"  ratio extraction/bare {r['ratio']:.3f}",
        ]
    )
