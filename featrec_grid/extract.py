"""Run one classifier over one dataset split into the store: features and logits from a single forward pass."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UserError
from .refs import DataRef, ModelRef
from .store import Store

if TYPE_CHECKING:
    import torch

    from .models import Classifier

FORMAT_VERSION = 1
PRECISIONS = ("fp32", "bf16")  # fp32: plain float32 forward; bf16: torch.autocast(bfloat16) around the backbone
CPU_AUTO_BATCH = 64  # what batch_size="auto" means off CUDA
AUTO_START = 1024  # the first batch size batch_size="auto" tries on CUDA


def check_precision(precision: Any) -> str:
    """`precision` if it is one of PRECISIONS, else a UserError naming it and the allowed values."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
    return precision


def shard_key(model: ModelRef, data: DataRef, precision: str = "fp32") -> str:
    """Cache key of a shard set: everything that determines its content, known before loading anything.

    `precision` is the extraction setting that changes the numbers. fp32 adds nothing to the payload, so keys
    of fp32 sets are those from before precision existed and existing stores stay valid; any other precision
    enters the payload, so e.g. bf16 shards never pass for fp32 ones (or the reverse). The data option
    `download` only says how to get the files, not what they hold, so it is left out.

    Content enters too: a local weights file's sha256 (models.weights_fingerprint, in place of the path string, so
    an overwritten checkpoint or the same relative path from another folder gives another key) and a folder
    dataset's file list with sizes and times (data.data_fingerprint). Sources with no such file add nothing, so
    their keys are unchanged.
    """
    from .data import data_fingerprint
    from .models import weights_fingerprint

    weights = weights_fingerprint(model)
    payload: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": [model.source, model.architecture, weights or model.weights, model.options],
        "data": [data.dataset, data.split, {k: v for k, v in data.options.items() if k != "download"}],
    }
    files = data_fingerprint(data)
    if files is not None:
        payload["data_files"] = files
    if check_precision(precision) != "fp32":
        payload["extraction"] = {"precision": precision}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def split_status(store: Store, model: ModelRef, data: DataRef, precision: str = "fp32"):
    """The store's verdict on this (model, split) at this precision: missing, stale, corrupt or complete."""
    return store.check_split(store.split_dir(model.key, data), shard_key(model, data, precision))


def check_head(
    features: torch.Tensor, logits: torch.Tensor, W: torch.Tensor, b: torch.Tensor, *, where: str
) -> None:
    """Raise RuntimeError naming `where` unless W f + b reproduces the directly computed logits (scale-relative)."""
    predicted = features.double() @ W.double().T + b.double()
    diff = float((predicted - logits.double()).abs().max())
    tolerance = 1e-3 * (float(logits.double().abs().max()) + 1.0)
    if not diff <= tolerance:
        raise RuntimeError(
            f"{where}: the linear head on the backbone features does not reproduce the model's own logits "
            f"(max abs difference {diff:.4g} > tolerance {tolerance:.4g}); the backbone/head split is wrong"
        )


CHECK_ROWS = 8  # rows of the first batch run through the original model to check the backbone + head split


def extract_batch(
    clf: Classifier, x: torch.Tensor, *, check: bool | None = None, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One backbone pass -> (features [N, D], logits = f W^T + b [N, C]).

    The split is checked against the original model's own forward (clf.model) on the classifier's first batch
    (check=None), on every batch (check=True) or never (check=False). Works wherever the backbone was moved.
    precision "bf16" runs the backbone under torch.autocast(x's device type, bfloat16); its features come back
    as float32 and the head is applied in float32. The split check always compares float32 with float32
    (recomputing the checked rows without autocast), so bf16 rounding is never mistaken for a wrong split.
    """
    import torch

    autocast = check_precision(precision) == "bf16"
    with torch.no_grad():
        if autocast:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                features = clf.backbone(x)
            features = features.float()
        else:
            features = clf.backbone(x)
        W = clf.head_weight.to(features.device, features.dtype)
        b = clf.head_bias.to(features.device, features.dtype)
        logits = features @ W.T + b
        if clf.model is not None and (check or (check is None and not clf.head_checked)):
            # Eval mode: rows are independent, so a few rows check the split as well as a whole batch.
            k = CHECK_ROWS
            checked = clf.backbone(x[:k]) if autocast else features[:k]
            reference = clf.model.to(x.device)(x[:k])  # parameters are shared with the backbone: no copy
            check_head(checked, reference, W, b, where=f"model {clf.key}")
            clf.head_checked = True
    return features, logits


def largest_batch(
    try_batch: Callable[[int], None],
    start: int = AUTO_START,
    minimum: int = 1,
    on_oom: Callable[[], None] | None = None,
) -> int:
    """The first of start, start/2, start/4, ... (>= minimum) for which `try_batch(n)` returns without raising
    torch.cuda.OutOfMemoryError; `on_oom` (e.g. torch.cuda.empty_cache) runs after each failure, once the
    error and the frames it holds are released. Other errors propagate. UserError if even `minimum` fails.
    """
    import torch

    if not 1 <= minimum <= start:
        raise ValueError(f"need 1 <= minimum <= start, got minimum={minimum}, start={start}")
    batch = start
    while batch >= minimum:
        try:
            try_batch(batch)
            return batch
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first: it frees the failed attempt's tensors before on_oom
        if on_oom is not None:
            on_oom()
        batch //= 2
    raise UserError(
        f"out of GPU memory even at batch size {minimum} (tried {start} and halved down to {minimum}); "
        "free GPU memory, use a smaller input size or extract on CPU"
    )


def auto_batch_size(clf: Any, size: int, device: str, precision: str = "fp32", start: int = AUTO_START) -> int:
    """batch_size="auto": on CUDA the largest power of two <= `start` for which one extraction forward of `clf`
    (already on `device`) on a dummy [n, 3, size, size] channels_last batch fits in memory; CPU_AUTO_BATCH else."""
    import torch

    if torch.device(device).type != "cuda":
        return CPU_AUTO_BATCH

    def try_batch(n: int) -> None:
        x = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            extract_batch(clf, x, check=False, precision=precision)
        torch.cuda.synchronize(device)

    batch = largest_batch(try_batch, start, on_oom=torch.cuda.empty_cache)
    torch.cuda.empty_cache()
    return batch


def _check_batch_size(batch_size: Any) -> None:
    ok = batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0)
    if not ok:
        raise UserError(f"batch size {batch_size!r} is not allowed; use a positive integer or 'auto'")


def extract_split(
    model: ModelRef,
    data: DataRef,
    store: Store,
    *,
    precision: str = "fp32",
    batch_size: int | str = 64,
    rows_per_shard: int = 65536,
    rebuild: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Write (index, label, logits, features) of `model` on `data` to the store unless a valid set exists.

    Returns the manifest plus `reused` (True when nothing was computed). A corrupt set is an error naming
    its path unless `rebuild` is set.

    `precision` is one of PRECISIONS: "bf16" runs the backbone under torch.autocast(bfloat16); features and
    logits are stored as float32 either way, and the precision enters the cache key. `batch_size` is a
    positive integer or "auto" (see auto_batch_size). On CUDA the model and each input batch are channels_last.
    Precision and the batch size used are recorded in the manifest.
    """
    import torch

    from .data import TransformedDataset, load_dataset
    from .models import input_for, load_classifier

    check_precision(precision)
    _check_batch_size(batch_size)
    rel = store.split_dir(model.key, data)
    key = shard_key(model, data, precision)
    status = store.check_split(rel, key)
    if status.state == "complete" and not rebuild:
        return {**status.manifest, "reused": True}
    if status.state == "corrupt" and not rebuild:
        raise UserError(f"corrupt shard set at {store.full_path(rel)}: {status.reason}; rerun with --rebuild")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    clf = load_classifier(model, store)
    on_cuda = torch.device(device).type == "cuda"
    clf.backbone.to(device)
    if on_cuda:
        clf.backbone.to(memory_format=torch.channels_last)
    dataset = load_dataset(data)
    inp = input_for(clf, data.options)
    if batch_size == "auto":
        batch_size = auto_batch_size(clf, inp.size, device, precision)
    loader = torch.utils.data.DataLoader(
        TransformedDataset(dataset, inp.transform()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        pin_memory=on_cuda,
    )

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        with torch.inference_mode():
            for x, label, index in loader:
                x = x.to(device, non_blocking=on_cuda)
                if on_cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats, logits = extract_batch(clf, x, precision=precision)
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
        "transform": inp.as_dict(),
        "model_info": {k: v for k, v in clf.info.items() if isinstance(v, str | int | float | bool | None)},
        "device": device,
        "precision": precision,
        "batch_size": batch_size,
        "channels_last": on_cuda,
        "torch": torch.__version__,
    }
    head = (clf.head_weight.detach().float().cpu().numpy(), clf.head_bias.detach().float().cpu().numpy())
    manifest = store.write_split(rel, meta=meta, batches=batches(), head=head, rows_per_shard=rows_per_shard)
    return {**manifest, "reused": False, "seconds": time.perf_counter() - t0}
