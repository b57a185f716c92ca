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


# ---------------------------------------------------------------------------------------------------------------
# Pipeline mode: what --throughput leaves out. Real JPEG decoding through DataLoader workers, the tensor (GPU-side)
# transform of in-memory uint8 arrays, and extraction with a backbone that costs almost nothing, so the input
# pipeline is what is measured; with --arch, the same real-decoding extraction through a real model next to its
# bare forward on random tensors.

BENCH_INPUT = {"size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 224 / 256}


def make_jpeg_folder(root: str, images: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> None:
    """`images` JPEGs of `size` (width, height), quality 90, in two class folders: smooth colour waves plus noise,
    so they decode like photographs rather than like flat colour or pure noise."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(images):
        folder = Path(root) / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(5, 40, size=(3, 2))
        waves = [np.sin(xx / f[c, 0] + yy / f[c, 1] + i) for c in range(3)]
        pixels = np.stack(waves, -1) * 90 + 128 + rng.normal(0, 12, size=(height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def near_free_classifier(inp: Any, num_classes: int = 10) -> Any:
    """A classifier whose backbone is a 4x4 average pool (48 features) and a linear head: almost no compute."""
    import torch
    from torch import nn

    from ..models import make_classifier

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())
    head = nn.Linear(48, num_classes)
    return make_classifier(ModelRef("near-free", "bench", "avgpool4"), nn.Sequential(backbone, head), backbone,
                           head.weight.detach(), head.bias.detach(), inp, "none", "bench", {})  # fmt: skip


def _rate(run, images: int, repeats: int) -> float:
    """images / best wall time of `repeats` calls of run()."""
    return images / min(_seconds(run) for _ in range(repeats))


def _seconds(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers are joined when a loader ends)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _loader_only(dataset, inp, batch_size: int, workers: int, device: str, pipeline: str = "pil") -> None:
    """Extraction's input batches (decoded, resized, normalised on `device`) with no model."""
    from ..extract import input_batches

    for _ in input_batches(dataset, inp, device=device, batch_size=batch_size, num_workers=workers, pipeline=pipeline):
        pass
    _sync(device)


def _host_copy(images, batch_size: int, device: str) -> None:
    """The host's share of the tensor path on a GPU: copy each uint8 batch into a fresh (pinned on CUDA) tensor."""
    import numpy as np
    import torch

    on_cuda = torch.device(device).type == "cuda"
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size]))
        x.pin_memory() if on_cuda else x.clone()


def _cpu_ms_per_image(run, images: int) -> float:
    t0 = time.process_time()
    run()
    return 1000 * (time.process_time() - t0) / images


def _extract_into_store(clf, dataset, inp, *, device, batch_size, precision, workers, pipeline) -> None:
    from ..extract import extraction_batches
    from ..store import Store

    clf.head_checked = False  # every run checks its first batch, as extract_split does
    batches = extraction_batches(clf, dataset, inp, device=device, batch_size=batch_size, precision=precision,
                                 num_workers=workers, pipeline=pipeline)  # fmt: skip
    head = (clf.head_weight.float().cpu().numpy(), clf.head_bias.float().cpu().numpy())
    with tempfile.TemporaryDirectory() as root:
        meta = {"key": "bench", "model": clf.key, "dataset": "bench", "split": "bench"}
        Store(root).write_split("bench", meta=meta, batches=batches, head=head)


def run_pipeline_bench(
    images: int = 256,
    array_images: int | None = None,
    workers: tuple[int, ...] = (0, 1, 2),
    batch_size: int = 32,
    device: str | None = None,
    arch: str | None = None,
    precision: str = "fp32",
    repeats: int = 2,
) -> dict[str, Any]:
    """The input pipeline of extraction, measured (best of `repeats` each):

    - loader_images_per_s: (these and extract_images_per_s timed in interleaved rounds) a folder of `images` generated 500x375 JPEGs decoded, resized to 256, center-cropped to
      224 (PIL, DataLoader with 0, 1, 2, ... workers) and normalised on `device`, per worker count;
    - gpu_transform_images_per_s: `array_images` (default 4 x images) CIFAR-shaped uint8 images [32, 32, 3] resized the same way as tensor
      ops on `device` (model transform and the seed's crop-only transform), next to the PIL path on the same array;
      their CPU milliseconds per image (process time: on a CPU device this includes the resize itself) and the host
      copy alone, which is all the CPU does per image when `device` is a GPU;
    - loader_cpu_ms_per_image: CPU time of the process and its workers per image, per worker count: on a machine
      busy with other work, throughput cannot show how workers scale, but equal CPU per image says they add no work;
    - extract_images_per_s: extraction of the JPEG folder into a store with a near-free backbone, at the largest
      worker count, so that it can be set against loader-only throughput;
    - with `arch` (a torchvision name, random weights, e.g. resnet50 on CUDA with bf16): extraction with real decoding
      (JPEG folder, every CPU a worker; CIFAR-shaped arrays through the tensor path) vs its bare forward on a random
      batch kept on the device.

    torch runs one intra-op thread throughout (restored afterwards): worker counts are then compared on equal terms
    (0 workers = one core, as the issue's 3.75 ms/JPEG baseline), and a loaded machine's idle-spinning OpenMP threads
    do not slow the in-process case.
    """
    import torch

    array_images = 4 * images if array_images is None else array_images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pipeline_bench(images, array_images, workers, batch_size, device, arch, precision, repeats)
    finally:
        torch.set_num_threads(threads)


def _pipeline_bench(images, array_images, workers, batch_size, device, arch, precision, repeats) -> dict[str, Any]:
    import os

    import numpy as np
    import torch

    from ..data import ArrayDataset, load_dataset
    from ..errors import UserError
    from ..extract import check_precision, loader_workers
    from ..models import IMAGENET_MEAN, IMAGENET_STD, InputConfig, load_classifier
    from ..refs import DataRef

    check_precision(precision)
    if min(images, array_images, batch_size, repeats) < 1 or not workers or min(workers) < 0:
        raise UserError("images, array images, batch size and repeats must be >= 1 and worker counts >= 0")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise UserError(f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    inp = InputConfig(**BENCH_INPUT)
    seed_inp = InputConfig(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=False)
    rng = np.random.default_rng(0)
    cifar = rng.integers(0, 256, size=(array_images, 32, 32, 3), dtype=np.uint8)
    array_ds = ArrayDataset(cifar, np.zeros(array_images), np.arange(array_images), ["0"], "bench")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if on_cuda else "cpu", "cpus": cpus,
                              "torch_threads": torch.get_num_threads(), "images": images,
                              "array_images": array_images, "batch_size": batch_size, "repeats": repeats}  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        make_jpeg_folder(root, images)
        folder = load_dataset(DataRef("folder", "bench", {"root": root}))
        free = near_free_classifier(inp)
        free.backbone.to(device)
        w_max = max(workers)
        runs = {w: lambda w=w: _loader_only(folder, inp, batch_size, w, device) for w in workers}
        runs["extract"] = lambda: _extract_into_store(free, folder, inp, device=device, batch_size=batch_size,
                                                      precision="fp32", workers=w_max, pipeline="pil")  # fmt: skip
        seconds: dict[Any, list[float]] = {name: [] for name in runs}
        cpu: dict[Any, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):  # interleaved, so that a change of machine load hits every case alike
            for name, run in runs.items():
                c0 = _cpu_seconds()
                seconds[name].append(_seconds(run))
                cpu[name].append(_cpu_seconds() - c0)
        result["loader_images_per_s"] = {w: images / min(seconds[w]) for w in workers}
        result["loader_cpu_ms_per_image"] = {w: 1000 * min(cpu[w]) / images for w in workers}
        result["extract_workers"] = w_max
        result["extract_images_per_s"] = images / min(seconds["extract"])
        result["extract_vs_loader"] = result["extract_images_per_s"] / result["loader_images_per_s"][w_max]
        result["pil_array_images_per_s"] = _rate(
            lambda: _loader_only(array_ds, inp, batch_size, 0, device), array_images, repeats
        )
        result["gpu_transform_images_per_s"] = _rate(
            lambda: _loader_only(array_ds, inp, batch_size, 0, device, "tensor"), array_images, repeats
        )
        result["gpu_transform_seed_images_per_s"] = _rate(
            lambda: _loader_only(array_ds, seed_inp, batch_size, 0, device, "tensor"), array_images, repeats
        )
        result["gpu_transform_cpu_ms_per_image"] = min(
            _cpu_ms_per_image(lambda: _loader_only(array_ds, inp, batch_size, 0, device, "tensor"), array_images)
            for _ in range(repeats)
        )
        result["host_copy_cpu_ms_per_image"] = min(
            _cpu_ms_per_image(lambda: _host_copy(cifar, batch_size, device), array_images) for _ in range(repeats)
        )
        if arch:
            clf = load_classifier(ModelRef("bench", "torchvision", arch))
            for module in (clf.backbone, clf.model):
                module.to(device)
                if on_cuda:
                    module.to(memory_format=torch.channels_last)
            model_inp = clf.input
            n_workers = loader_workers(cpus, on_cuda)
            x = torch.randn(batch_size, 3, model_inp.size, model_inp.size).to(device)
            if on_cuda:
                x = x.contiguous(memory_format=torch.channels_last)

            def bare(xb):
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16" \
                        else nullcontext():  # fmt: skip
                    return clf.model(xb).float().cpu()

            _timed(bare, x, 1, device)  # warm-up
            batches = max(1, images // batch_size)
            bare_ips = batches * batch_size / min(_timed(bare, x, batches, device) for _ in range(repeats))
            folder_ips = _rate(
                lambda: _extract_into_store(clf, folder, model_inp, device=device, batch_size=batch_size,
                                            precision=precision, workers=n_workers, pipeline="pil"), images, repeats)
            array_ips = _rate(
                lambda: _extract_into_store(clf, array_ds, model_inp, device=device, batch_size=batch_size,
                                            precision=precision, workers=0, pipeline="tensor"), array_images, repeats)
            result["model"] = {  # fmt: skip
                "arch": f"torchvision:{arch} (random weights) @ {model_inp.size} px", "precision": precision,
                "workers": n_workers, "bare_images_per_s": bare_ips, "extract_jpeg_images_per_s": folder_ips,
                "extract_array_images_per_s": array_ips, "jpeg_vs_bare": folder_ips / bare_ips,
                "array_vs_bare": array_ips / bare_ips,
            }
    return result


def format_pipeline_bench(r: dict[str, Any]) -> str:
    loaders = ", ".join(f"{w} workers {ips:.0f} ({r['loader_cpu_ms_per_image'][w]:.2f} CPU ms/image)"
                        for w, ips in r["loader_images_per_s"].items())
    w0, wmax = min(r["loader_images_per_s"]), r["extract_workers"]
    lines = [
        f"extract pipeline: {r['device']}, {r['cpus']} CPUs, {r['images']} JPEGs 500x375 -> 224 px, "
        f"batch {r['batch_size']}, best of {r['repeats']}",
        f"  loader only (images/s): {loaders}; "
        f"{wmax} vs {w0} workers {r['loader_images_per_s'][wmax] / r['loader_images_per_s'][w0]:.2f}x",
        f"  extraction, near-free backbone, {wmax} workers: {r['extract_images_per_s']:.0f} images/s = "
        f"{100 * r['extract_vs_loader']:.0f}% of loader only",
        f"  {r['array_images']} CIFAR-shaped uint8 images -> 224 px: PIL {r['pil_array_images_per_s']:.0f} images/s, "
        f"tensor path {r['gpu_transform_images_per_s']:.0f} images/s (seed crop-only "
        f"{r['gpu_transform_seed_images_per_s']:.0f}), CPU {r['gpu_transform_cpu_ms_per_image']:.3f} ms/image "
        f"(host copy alone {r['host_copy_cpu_ms_per_image']:.4f} ms/image)",
    ]
    if "model" in r:
        m = r["model"]
        lines.append(
            f"  {m['arch']}, {m['precision']}: bare forward {m['bare_images_per_s']:.0f} images/s; extraction with "
            f"JPEG decoding ({m['workers']} workers) {m['extract_jpeg_images_per_s']:.0f} ({100 * m['jpeg_vs_bare']:.0f}%), "
            f"from uint8 arrays {m['extract_array_images_per_s']:.0f} ({100 * m['array_vs_bare']:.0f}%)"
        )
    return "\n".join(lines)
