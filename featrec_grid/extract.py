"""Run one classifier over one dataset split into the store: features and logits from a single forward pass."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
PIPELINES = ("auto", "pil", "tensor")  # input pipeline: auto = tensor on CUDA for in-memory datasets, else PIL
MAX_DEFAULT_CPUS_PER_EXTRACT = 4  # what an extract task asks for per GPU unless resources.cpus_per_extract says
DEFAULT_ROWS_PER_TASK = 200_000  # suggested resources.rows_per_task: CIFAR (50k) stays one task, ImageNet-1k is 7


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


def _check_count(value: Any, name: str, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(f"{name}={value!r} is not allowed; use an integer >= {low}")


def cpus_per_extract(cluster_cpus: float, cluster_gpus: float, requested: int | None = None) -> int:
    """CPUs one extract task asks Ray for: `requested` (resources.cpus_per_extract) when set; else, on a cluster with
    GPUs, its CPUs per GPU, at least 1 and at most MAX_DEFAULT_CPUS_PER_EXTRACT; 1 on a cluster without GPUs."""
    if requested is not None:
        _check_count(requested, "resources.cpus_per_extract", 1)
        return requested
    if cluster_gpus <= 0:
        return 1
    return max(1, min(MAX_DEFAULT_CPUS_PER_EXTRACT, int(cluster_cpus // cluster_gpus)))


def loader_workers(cpus: int, on_cuda: bool) -> int:
    """DataLoader workers of a task holding `cpus` CPUs: all of them on CUDA (the main process only feeds the GPU),
    one less on CPU (the main process runs the forward pass); so 1 CPU without a GPU decodes in-process, as before."""
    _check_count(cpus, "cpus", 1)
    return cpus if on_cuda else cpus - 1


def row_ranges(rows: int, rows_per_task: int, batch_size: int | str) -> list[tuple[int, int]]:
    """[start, stop) ranges covering a split of `rows` rows, one per extract task: one range when rows_per_task >=
    rows, else about rows_per_task rows each with every boundary on a multiple of the batch size (of AUTO_START for
    "auto", a multiple of every size it may pick), so each task runs exactly the batches a single task would."""
    _check_count(rows, "rows", 0)
    _check_count(rows_per_task, "resources.rows_per_task", 1)
    _check_batch_size(batch_size)
    if rows_per_task >= rows:
        return [(0, rows)]
    step = AUTO_START if batch_size == "auto" else int(batch_size)
    width = max(step, rows_per_task // step * step)
    return [(s, min(s + width, rows)) for s in range(0, rows, width)]


def split_rows(data: DataRef) -> int:
    """Rows of a dataset split (what row_ranges divides); opens the dataset's index, not its images."""
    from .data import load_dataset

    return len(load_dataset(data))


def choose_pipeline(pipeline: str, dataset: Any, inp: Any, on_cuda: bool) -> str:
    """The input pipeline an extraction runs: "tensor" (uint8 array batches resized on the device) or "pil" (PIL
    decoding and resizing in DataLoader workers). "auto" takes the tensor path on CUDA when the dataset is one uint8
    array and the resize has a tensor form, PIL otherwise (so CPU runs give the PIL numbers, as they always did)."""
    from .tensor_transforms import supports

    if pipeline not in PIPELINES:
        raise UserError(f"pipeline {pipeline!r} is unknown; allowed: {', '.join(PIPELINES)}")
    possible = dataset.in_memory() is not None and supports(inp)
    if pipeline == "tensor" and not possible:
        raise UserError(
            "pipeline 'tensor' needs a dataset held in one uint8 array (digits, cifar10, cifar100) and a bilinear "
            f"or bicubic resize (or none); got {type(dataset).__name__} with interpolation {inp.interpolation!r}"
        )
    if pipeline == "auto":
        return "tensor" if possible and on_cuda else "pil"
    return pipeline


def input_batches(
    dataset: Any,
    inp: Any,
    *,
    device: str,
    batch_size: int,
    start: int = 0,
    stop: int | None = None,
    num_workers: int = 0,
    pipeline: str = "pil",
) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(normalised float32 images [n, 3, S, S] on `device`, labels, row ids) of rows [start, stop), in row order.

    pipeline "pil": a DataLoader with `num_workers` workers decodes, resizes and crops to uint8 (pinned on CUDA);
    "tensor": slices of the dataset's uint8 array are resized on the device. Both normalise on the device. An
    image that cannot be decoded is a UserError naming it.
    """
    import torch

    from .data import TransformedDataset, Unreadable, collate
    from .tensor_transforms import BatchTransform, array_batches, host_transform, normalise

    stop = len(dataset) if stop is None else stop
    if not 0 <= start <= stop <= len(dataset):
        raise UserError(f"rows [{start}, {stop}) lie outside the dataset's {len(dataset)} rows; plan the ranges again")
    if pipeline == "tensor":
        images, labels = dataset.in_memory()
        on_device = BatchTransform(inp)
        for x, label, index in array_batches(images, labels, dataset.indices, start, stop, batch_size, device):
            yield on_device(x), label, index
        return
    on_cuda = torch.device(device).type == "cuda"
    rows = TransformedDataset(dataset, host_transform(inp), carry_errors=True)
    if (start, stop) != (0, len(dataset)):
        rows = torch.utils.data.Subset(rows, range(start, stop))
    loader = torch.utils.data.DataLoader(
        rows, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=on_cuda, collate_fn=collate
    )
    for batch in loader:
        if isinstance(batch, Unreadable):
            raise UserError(batch.message)
        x, label, index = batch
        yield normalise(x.to(device, non_blocking=on_cuda), inp), label.numpy(), index.numpy()


def extraction_batches(
    clf: Any,
    dataset: Any,
    inp: Any,
    *,
    device: str,
    batch_size: int,
    precision: str = "fp32",
    start: int = 0,
    stop: int | None = None,
    num_workers: int = 0,
    pipeline: str = "pil",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(row ids, labels, logits, features) of rows [start, stop) of `dataset`, batch by batch, in row order: the
    input_batches through `clf` (already on `device`, channels_last on CUDA) under inference mode."""
    import torch

    on_cuda = torch.device(device).type == "cuda"
    source = input_batches(dataset, inp, device=device, batch_size=batch_size, start=start, stop=stop,
                           num_workers=num_workers, pipeline=pipeline)  # fmt: skip
    with torch.inference_mode():
        for x, label, index in source:
            if on_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            feats, logits = extract_batch(clf, x, precision=precision)
            yield (
                np.asarray(index, dtype=np.int64),
                np.asarray(label, dtype=np.int64),
                logits.float().cpu().numpy(),
                feats.float().cpu().numpy(),
            )


@dataclass
class _Loaded:
    """What one extract call loads: the classifier on its device, the dataset, the input config and the settings."""

    clf: Any
    dataset: Any
    inp: Any
    device: str
    batch_size: int
    pipeline: str

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


def _load(model: ModelRef, data: DataRef, store: Store, device: str | None, batch_size: int | str, precision: str,
          pipeline: str) -> _Loaded:  # fmt: skip
    import torch

    from .data import load_dataset
    from .models import input_for, load_classifier

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    clf = load_classifier(model, store)
    clf.backbone.to(device)
    if on_cuda:
        clf.backbone.to(memory_format=torch.channels_last)
    dataset = load_dataset(data)
    inp = input_for(clf, data.options)
    if batch_size == "auto":
        batch_size = auto_batch_size(clf, inp.size, device, precision)
    return _Loaded(clf, dataset, inp, device, int(batch_size), choose_pipeline(pipeline, dataset, inp, on_cuda))


def _meta(loaded: _Loaded, model: ModelRef, data: DataRef, key: str, precision: str, workers: int) -> dict[str, Any]:
    import torch

    clf = loaded.clf
    return {
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
        "dataset_label_space": getattr(loaded.dataset, "label_space", None),
        "transform": loaded.inp.as_dict(),
        "model_info": {k: v for k, v in clf.info.items() if isinstance(v, str | int | float | bool | None)},
        "device": loaded.device,
        "precision": precision,
        "batch_size": loaded.batch_size,
        "channels_last": loaded.on_cuda,
        "pipeline": loaded.pipeline,
        "num_workers": workers if loaded.pipeline == "pil" else 0,
        "torch": torch.__version__,
    }


def _head(clf: Any) -> tuple[np.ndarray, np.ndarray]:
    return clf.head_weight.detach().float().cpu().numpy(), clf.head_bias.detach().float().cpu().numpy()


def _workers(num_workers: int | None, cpus: int, loaded: _Loaded) -> int:
    if num_workers is None:
        return loader_workers(cpus, loaded.on_cuda)
    _check_count(num_workers, "num_workers", 0)
    return num_workers


def _check_settings(precision: str, batch_size: Any, pipeline: str) -> None:
    check_precision(precision)
    _check_batch_size(batch_size)
    if pipeline not in PIPELINES:
        raise UserError(f"pipeline {pipeline!r} is unknown; allowed: {', '.join(PIPELINES)}")


def _compute(model: ModelRef, data: DataRef, store: Store, key: str, precision: str, batch_size: int | str,
             device: str | None, num_workers: int | None, cpus: int, pipeline: str, start: int = 0,
             stop: int | None = None) -> tuple[dict[str, Any], Iterator, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """What extract_split and extract_range write: (manifest metadata, the batches of rows [start, stop) as
    extraction_batches yields them, the head), with the model loaded once."""
    loaded = _load(model, data, store, device, batch_size, precision, pipeline)
    workers = _workers(num_workers, cpus, loaded)
    batches = extraction_batches(loaded.clf, loaded.dataset, loaded.inp, device=loaded.device, precision=precision,
                                 batch_size=loaded.batch_size, start=start, stop=stop, num_workers=workers,
                                 pipeline=loaded.pipeline)  # fmt: skip
    return _meta(loaded, model, data, key, precision, workers), batches, _head(loaded.clf)


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
    num_workers: int | None = None,
    cpus: int = 1,
    pipeline: str = "auto",
) -> dict[str, Any]:
    """Write (index, label, logits, features) of `model` on `data` to the store unless a valid set exists.

    Returns the manifest plus `reused` (True when nothing was computed). A corrupt set is an error naming
    its path unless `rebuild` is set.

    `precision` is one of PRECISIONS: "bf16" runs the backbone under torch.autocast(bfloat16); features and
    logits are stored as float32 either way, and the precision enters the cache key. `batch_size` is a
    positive integer or "auto" (see auto_batch_size). On CUDA the model and each input batch are channels_last.
    `num_workers` DataLoader workers decode images (None: loader_workers(cpus, on CUDA)); `pipeline` is one of
    PIPELINES (see choose_pipeline). Neither changes row ids or row order. The settings used are in the manifest.
    """
    _check_settings(precision, batch_size, pipeline)
    rel = store.split_dir(model.key, data)
    key = shard_key(model, data, precision)
    status = store.check_split(rel, key)
    if status.state == "complete" and not rebuild:
        return {**status.manifest, "reused": True}
    if status.state == "corrupt" and not rebuild:
        raise UserError(f"corrupt shard set at {store.full_path(rel)}: {status.reason}; rerun with --rebuild")
    t0 = time.perf_counter()
    meta, batches, head = _compute(model, data, store, key, precision, batch_size, device, num_workers, cpus,
                                   pipeline)  # fmt: skip
    manifest = store.write_split(rel, meta=meta, batches=batches, head=head, rows_per_shard=rows_per_shard)
    return {**manifest, "reused": False, "seconds": time.perf_counter() - t0}


def extract_range(
    model: ModelRef,
    data: DataRef,
    store: Store,
    start: int,
    stop: int,
    *,
    precision: str = "fp32",
    batch_size: int | str = 64,
    rows_per_shard: int = 65536,
    rebuild: bool = False,
    device: str | None = None,
    num_workers: int | None = None,
    cpus: int = 1,
    pipeline: str = "auto",
) -> dict[str, Any]:
    """One task of a split extracted in row ranges (see row_ranges): rows [start, stop) into their own checksummed
    shards and range manifest, unless that range is complete already (`reused`). A missing, stale or corrupt range
    is computed again. finish_split makes the split readable once every range is in. Settings as extract_split."""
    _check_settings(precision, batch_size, pipeline)
    rel = store.split_dir(model.key, data)
    key = shard_key(model, data, precision)
    status = store.check_range(rel, key, start, stop)
    if status.complete and not rebuild:
        return {**status.manifest, "reused": True}
    t0 = time.perf_counter()
    meta, batches, head = _compute(model, data, store, key, precision, batch_size, device, num_workers, cpus,
                                   pipeline, start, stop)  # fmt: skip
    manifest = store.write_range(rel, start, stop, meta=meta, batches=batches, head=head, rows_per_shard=rows_per_shard)
    return {**manifest, "reused": False, "seconds": time.perf_counter() - t0}


def finish_split(
    model: ModelRef, data: DataRef, store: Store, ranges: Sequence[tuple[int, int]], *, precision: str = "fp32"
) -> dict[str, Any]:
    """Write the split's manifest once every range of `ranges` (row_ranges' list) is complete, so readers
    (Store.iter_split/read_split, pairs.aligned) see one split; `reused` when that manifest exists already.
    A range that is missing or corrupt is a UserError: run its extract_range again first."""
    rel = store.split_dir(model.key, data)
    key = shard_key(model, data, precision)
    status = store.check_split(rel, key, verify_checksums=False)
    if status.complete and status.manifest.get("ranges") == [list(r) for r in ranges]:
        return {**status.manifest, "reused": True}
    return {**store.finish_ranges(rel, key, ranges), "reused": False}
