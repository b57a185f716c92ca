"""Extraction's input pipeline: DataLoader workers, the tensor (GPU-side) transform of uint8 arrays against PIL, image
folders, and one split extracted as several row ranges. References: InputConfig.transform() on PIL images with the
backbone called directly, and the single-task extraction's arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from featrec_grid.cli import main
from featrec_grid.data import load_dataset
from featrec_grid.errors import UserError
from featrec_grid.extract import (
    choose_pipeline,
    cpus_per_extract,
    extract_range,
    extract_split,
    finish_split,
    loader_workers,
    row_ranges,
    shard_key,
    split_rows,
)
from featrec_grid.models import IMAGENET_MEAN, IMAGENET_STD, InputConfig, load_classifier
from featrec_grid.pairs import aligned
from featrec_grid.refs import DataRef, ModelRef
from featrec_grid.store import Store
from featrec_grid.tensor_transforms import BatchTransform, host_transform, normalise

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelRef("tv18", "torchvision", "resnet18", options={"num_classes": 10, "seed": 0, "img_size": 32})
DIGITS = DataRef("digits", "test", {"limit": 40})
COLUMNS = ("index", "label", "logits", "features")


def _reference(model: ModelRef, data: DataRef, batch_size: int) -> dict[str, np.ndarray]:
    """Independent extraction: each image through InputConfig.transform() (PIL), the backbone called directly per
    batch, the head as W f + b."""
    clf = load_classifier(model)
    dataset = load_dataset(data)
    transform = clf.input.transform()
    x = torch.stack([transform(dataset[i][0]) for i in range(len(dataset))])
    with torch.no_grad():
        parts = [clf.backbone(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
    features = torch.cat(parts)
    logits = torch.cat([f @ clf.head_weight.T + clf.head_bias for f in parts])  # per batch, as matmul rounds per shape
    labels = [dataset[i][1] for i in range(len(dataset))]
    return {"index": dataset.indices, "label": np.array(labels), "logits": logits.numpy(), "features": features.numpy()}


def _arrays(store: Store, model: ModelRef, data: DataRef) -> dict[str, np.ndarray]:
    return store.read_split(store.split_dir(model.key, data))


def _assert_identical(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for column in COLUMNS:
        assert np.array_equal(got[column], expected[column]), column


# --- the uint8 boundary and the tensor transform --------------------------------------------------------------------

CONFIGS = {
    "imagenet-bilinear-224": InputConfig(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 224 / 256),
    "lite-bicubic-96": InputConfig(96, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875),
    "bicubic-224": InputConfig(224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.9),
    "zoo-bilinear-16": InputConfig(16, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0),
    "seed-crop-224": InputConfig(224, IMAGENET_MEAN, IMAGENET_STD, resize=False),
    "seed-crop-20": InputConfig(20, IMAGENET_MEAN, IMAGENET_STD, resize=False),
}


def _images() -> dict[str, np.ndarray]:
    """CIFAR-shaped noise, real digits (grey, 8x8) and a smooth 375x500 photo-like image."""
    rng = np.random.default_rng(0)
    digits = np.asarray(load_dataset(DataRef("digits", "test", {"limit": 6})).in_memory()[0])
    yy, xx = np.mgrid[0:375, 0:500]
    waves = np.stack([np.sin(xx / 23 + yy / 31 + c) * 90 + 128 for c in range(3)], -1)
    photo = np.clip(waves + rng.normal(0, 12, waves.shape), 0, 255).astype(np.uint8)
    return {
        "cifar": rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8),
        "digits": digits,
        "photo": photo[None],
    }


def _pil(images: np.ndarray, config: InputConfig) -> torch.Tensor:
    transform = config.transform()
    return torch.stack([transform(Image.fromarray(a).convert("RGB")) for a in images])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_host_half_plus_normalise_is_the_pil_transform_bit_for_bit(name):
    config = CONFIGS[name]
    for images in _images().values():
        pil = [Image.fromarray(a).convert("RGB") for a in images]
        host = torch.stack([host_transform(config)(p) for p in pil])
        assert host.dtype == torch.uint8
        assert torch.equal(normalise(host, config), _pil(images, config))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tensor_transform_matches_pil_within_two_grey_levels_on_rare_pixels(name):
    config = CONFIGS[name]
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    for kind, images in _images().items():
        expected = _pil(images, config)
        got = BatchTransform(config)(torch.from_numpy(images))
        assert got.shape == expected.shape == (len(images), 3, config.size, config.size)
        levels = ((got - expected).abs() * std * 255).round()  # differences in uint8 grey levels
        if not config.resize:  # the seed's crop without resize: the very same numbers
            assert torch.equal(got, expected), kind
        assert levels.max() <= (2 if config.interpolation == "bicubic" else 1), (kind, float(levels.max()))
        assert (levels > 0).float().mean() < 2e-3, (kind, float((levels > 0).float().mean()))


def test_one_pass_float_resize_would_miss_bicubic_pil_by_many_levels():
    """Why BatchTransform rounds between two passes: a single float pass (torchvision's CUDA uint8 resize) does not
    clip the bicubic overshoot that PIL clips after its horizontal pass."""
    config = CONFIGS["lite-bicubic-96"]
    images = _images()["cifar"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    one_pass = F.interpolate(x, size=(110, 110), mode="bicubic", align_corners=False, antialias=True)
    one_pass = one_pass.clamp(0, 255).round()[..., 7:103, 7:103]  # resize 96 / 0.875 = 110, center crop 96
    expected = _pil(images, config)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    assert ((normalise(one_pass, config) - expected).abs() * std * 255).round().max() > 5


def test_choose_pipeline():
    digits = load_dataset(DIGITS)
    bilinear, lanczos = CONFIGS["imagenet-bilinear-224"], InputConfig(224, IMAGENET_MEAN, IMAGENET_STD, "lanczos")
    nearest = InputConfig(224, IMAGENET_MEAN, IMAGENET_STD, "nearest")
    assert choose_pipeline("auto", digits, nearest, on_cuda=True) == "pil"
    assert choose_pipeline("auto", digits, bilinear, on_cuda=False) == "pil"  # CPU runs keep the PIL numbers
    assert choose_pipeline("auto", digits, bilinear, on_cuda=True) == "tensor"
    assert choose_pipeline("auto", digits, lanczos, on_cuda=True) == "pil"
    assert choose_pipeline("tensor", digits, bilinear, on_cuda=False) == "tensor"
    assert choose_pipeline("pil", digits, bilinear, on_cuda=True) == "pil"
    with pytest.raises(UserError, match="pipeline 'tensor' needs a dataset held in one uint8 array"):
        choose_pipeline("tensor", digits, lanczos, on_cuda=True)
    with pytest.raises(UserError, match="pipeline 'fast' is unknown; allowed: auto, pil, tensor"):
        choose_pipeline("fast", digits, bilinear, on_cuda=False)


# --- resource rules -------------------------------------------------------------------------------------------------


def test_cpus_per_extract_and_loader_workers():
    assert cpus_per_extract(cluster_cpus=16, cluster_gpus=4) == 4
    assert cpus_per_extract(cluster_cpus=64, cluster_gpus=2) == 4  # capped
    assert cpus_per_extract(cluster_cpus=16, cluster_gpus=8) == 2
    assert cpus_per_extract(cluster_cpus=3, cluster_gpus=4) == 1
    assert cpus_per_extract(cluster_cpus=2, cluster_gpus=0) == 1  # no GPUs: one CPU, as before
    assert cpus_per_extract(cluster_cpus=2, cluster_gpus=0, requested=6) == 6
    with pytest.raises(UserError, match="resources.cpus_per_extract=0"):
        cpus_per_extract(8, 1, requested=0)
    assert loader_workers(4, on_cuda=True) == 4
    assert loader_workers(3, on_cuda=False) == 2
    assert loader_workers(1, on_cuda=False) == 0  # one CPU without a GPU decodes in-process, as before


@pytest.mark.parametrize(
    ("rows", "per_task", "batch", "expected"),
    [
        (100, 40, 16, [(0, 32), (32, 64), (64, 96), (96, 100)]),
        (100, 100, 16, [(0, 100)]),
        (100, 1000, 16, [(0, 100)]),
        (100, 5, 16, [(0, 16), (16, 32), (32, 48), (48, 64), (64, 80), (80, 96), (96, 100)]),
        (5000, 2500, "auto", [(0, 2048), (2048, 4096), (4096, 5000)]),
        (0, 10, 4, [(0, 0)]),
    ],
)
def test_row_ranges(rows, per_task, batch, expected):
    ranges = row_ranges(rows, per_task, batch)
    assert ranges == expected
    assert [r for a, b in ranges for r in range(a, b)] == list(range(rows))  # every row once, in order
    step = 1024 if batch == "auto" else batch
    assert all(a % step == 0 for a, _ in ranges)


def test_row_ranges_refuses_bad_values():
    with pytest.raises(UserError, match="resources.rows_per_task=0"):
        row_ranges(10, 0, 4)
    with pytest.raises(UserError, match="batch size"):
        row_ranges(10, 5, 0)


# --- parallel decode and the pipelines end to end -------------------------------------------------------------------


def test_workers_give_the_rows_order_and_values_of_the_reference(tmp_path):
    expected = _reference(TINY, DIGITS, batch_size=16)
    for workers in (0, 2):
        store = Store(tmp_path / f"w{workers}")
        manifest = extract_split(TINY, DIGITS, store, batch_size=16, num_workers=workers, device="cpu")
        assert manifest["num_workers"] == workers and manifest["pipeline"] == "pil"
        _assert_identical(_arrays(store, TINY, DIGITS), expected)


def test_default_cpu_extraction_is_unchanged_pil(tmp_path):
    """cpus=1 without a GPU: no worker processes, the PIL path; what the demo's shards were made with."""
    store = Store(tmp_path / "s")
    manifest = extract_split(TINY, DIGITS, store, batch_size=16, device="cpu")
    assert manifest["num_workers"] == 0 and manifest["pipeline"] == "pil"
    _assert_identical(_arrays(store, TINY, DIGITS), _reference(TINY, DIGITS, batch_size=16))


@pytest.mark.parametrize("options", [{}, {"transform": "seed", "crop": 32}])
def test_tensor_pipeline_features_against_pil(tmp_path, options):
    data = DataRef("digits", "test", {"limit": 40, **options})
    pil, tensor = Store(tmp_path / "pil"), Store(tmp_path / "tensor")
    extract_split(TINY, data, pil, batch_size=16, device="cpu", pipeline="pil")
    assert extract_split(TINY, data, tensor, batch_size=16, device="cpu", pipeline="tensor")["pipeline"] == "tensor"
    a, b = _arrays(pil, TINY, data), _arrays(tensor, TINY, data)
    assert np.array_equal(a["index"], b["index"]) and np.array_equal(a["label"], b["label"])
    if options:  # the seed's crop without resize: identical inputs, identical features
        _assert_identical(b, a)
    else:  # one grey level on rare pixels (digits 8 -> 37 px bilinear): a small change of the features
        scale = np.abs(a["features"]).max()
        diff = np.abs(a["features"] - b["features"]).max()
        assert 0 < diff < 1e-2 * scale, (diff, scale)
        assert (a["logits"].argmax(1) == b["logits"].argmax(1)).all()


# --- image folders --------------------------------------------------------------------------------------------------


def _jpeg_folder(root, names: dict[str, list[str]], size=(40, 30)) -> dict[str, np.ndarray]:
    """Write JPEGs in the given (unsorted) order; return what PIL decodes from each, by relative path."""
    rng = np.random.default_rng(3)
    decoded = {}
    for cls, files in names.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in files:
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / name, quality=90)
            decoded[f"{cls}/{name}"] = np.asarray(Image.open(root / cls / name).convert("RGB"))
    return decoded


def test_folder_rows_follow_sorted_paths_and_extract_with_workers(tmp_path):
    root = tmp_path / "images"
    decoded = _jpeg_folder(root, {"zebra": ["b.jpg", "a.jpg"], "ant": ["c.jpg", "10.jpg", "2.jpg"]})
    data = DataRef("folder", "all", {"root": str(root)})
    ds = load_dataset(data)
    order = sorted(decoded, key=lambda p: (p.split("/")[0], p.split("/")[1]))  # classes, then file names, sorted
    assert ds.classes == ["ant", "zebra"] and ds.indices.tolist() == list(range(5)) and split_rows(data) == 5
    for i, path in enumerate(order):
        image, label = ds[i]
        assert np.array_equal(np.asarray(image), decoded[path]) and label == ds.classes.index(path.split("/")[0])
    assert ds.in_memory() is None
    zero, two = Store(tmp_path / "w0"), Store(tmp_path / "w2")
    extract_split(TINY, data, zero, batch_size=2, num_workers=0, device="cpu")
    extract_split(TINY, data, two, batch_size=2, num_workers=2, device="cpu")
    _assert_identical(_arrays(two, TINY, data), _reference(TINY, data, batch_size=2))
    _assert_identical(_arrays(zero, TINY, data), _arrays(two, TINY, data))


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_is_a_one_line_user_error_naming_the_file(tmp_path, workers):
    root = tmp_path / "images"
    _jpeg_folder(root, {"cat": ["a.jpg", "b.jpg", "c.jpg"]})
    broken = root / "cat" / "b.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated JPEG
    (root / "cat" / "d.png").write_bytes(b"not a png at all")
    data = DataRef("folder", "all", {"root": str(root)})
    with pytest.raises(UserError) as err:
        extract_split(TINY, data, Store(tmp_path / "s"), batch_size=2, num_workers=workers, device="cpu")
    message = str(err.value)
    assert f"image {broken} cannot be decoded" in message, message
    assert "\n" not in message and "Traceback" not in message


# --- one split over many tasks --------------------------------------------------------------------------------------

RANGED = ModelRef("tv18r", "torchvision", "resnet18", options=TINY.options)  # the same network under another key
DATA50 = DataRef("digits", "test", {"limit": 50})


def _count_loads(monkeypatch) -> list[str]:
    import featrec_grid.models as models

    loads, real = [], models.load_classifier

    def counting(ref, store=None):
        loads.append(ref.key)
        return real(ref, store)

    monkeypatch.setattr(models, "load_classifier", counting)
    return loads


def _run_ranges(store, ranges, model=RANGED, **kwargs):
    return [extract_range(model, DATA50, store, a, b, batch_size=8, device="cpu", **kwargs)["reused"]
            for a, b in ranges]  # fmt: skip


def test_ranges_make_the_single_task_split(tmp_path):
    store = Store(tmp_path / "s")
    extract_split(TINY, DATA50, store, batch_size=8, device="cpu")
    ranges = row_ranges(split_rows(DATA50), 16, 8)
    assert ranges == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert _run_ranges(store, ranges) == [False] * 4
    manifest = finish_split(RANGED, DATA50, store, ranges)
    assert not manifest["reused"] and manifest["rows"] == 50 and manifest["ranges"] == [list(r) for r in ranges]
    rel = store.split_dir(RANGED.key, DATA50)
    assert store.check_split(rel, shard_key(RANGED, DATA50)).complete
    single = _arrays(store, TINY, DATA50)
    _assert_identical(_arrays(store, RANGED, DATA50), single)
    assert [len(p["index"]) for p in store.iter_split(rel)] == [16, 16, 16, 2]
    left, right = store.split_dir(TINY.key, DATA50), rel
    blocks = list(aligned(store, left, ["logits"], right, ["features"]))
    assert np.array_equal(np.concatenate([b["index"] for b in blocks]), single["index"])
    assert np.array_equal(np.concatenate([b["features"] for b in blocks]), single["features"])
    assert finish_split(RANGED, DATA50, store, ranges)["reused"]


def test_interrupted_ranges_rerun_only_what_is_missing_or_corrupt(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    ranges = row_ranges(50, 16, 8)
    _run_ranges(store, [ranges[0], ranges[2]])  # the run was killed after two of four ranges
    with pytest.raises(UserError, match=r"rows \[16, 32\) are missing"):
        finish_split(RANGED, DATA50, store, ranges)
    rel, key = store.split_dir(RANGED.key, DATA50), shard_key(RANGED, DATA50)
    assert store.check_split(rel, key).state == "missing"  # readers see no half split
    loads = _count_loads(monkeypatch)
    assert _run_ranges(store, ranges) == [True, False, True, False]
    assert len(loads) == 2  # only the two missing ranges loaded the model
    finish_split(RANGED, DATA50, store, ranges)
    expected = _reference(RANGED, DATA50, batch_size=8)
    _assert_identical(_arrays(store, RANGED, DATA50), expected)

    # one shard changes on disk (same size): the split and that range are corrupt, the rerun redoes that range only
    part = tmp_path / "s" / rel / "part-00032.arrow"
    raw = bytearray(part.read_bytes())
    raw[-100] ^= 0xFF
    part.write_bytes(bytes(raw))
    assert store.check_split(rel, key).state == "corrupt"
    assert store.check_range(rel, key, 32, 48).state == "corrupt"
    loads.clear()
    assert _run_ranges(store, ranges) == [True, True, False, True] and len(loads) == 1
    finish_split(RANGED, DATA50, store, ranges)
    assert store.check_split(rel, key).complete
    _assert_identical(_arrays(store, RANGED, DATA50), expected)


def test_other_ranges_replace_the_old_ones_and_strays_go(tmp_path):
    store = Store(tmp_path / "s")
    rel = store.split_dir(RANGED.key, DATA50)
    extract_split(RANGED, DATA50, store, batch_size=8, device="cpu", rebuild=True)  # an earlier single-task set
    old = row_ranges(50, 16, 8)
    _run_ranges(store, old)
    finish_split(RANGED, DATA50, store, old)
    new = row_ranges(50, 24, 8)
    assert new == [(0, 24), (24, 48), (48, 50)]
    assert _run_ranges(store, new) == [False, False, True]  # (48, 50) is the same range as before
    manifest = finish_split(RANGED, DATA50, store, new)
    files = sorted(p.name for p in (tmp_path / "s" / rel).iterdir())
    assert files == sorted(["head.safetensors", "manifest.json", *(f["path"] for f in manifest["files"]),
                            *(Store.range_manifest_name(a, b) for a, b in new)])  # fmt: skip
    _assert_identical(_arrays(store, RANGED, DATA50), _reference(RANGED, DATA50, batch_size=8))


def test_store_range_checks(tmp_path):
    store = Store(tmp_path / "s")
    rng = np.random.default_rng(0)
    head = (rng.normal(size=(3, 4)).astype(np.float32), np.zeros(3, np.float32))
    meta = {"key": "k1", "model": "m", "dataset": "d", "split": "s"}

    def batches(n, offset=0):
        yield (np.arange(offset, offset + n), np.zeros(n, np.int64), rng.normal(size=(n, 3)), rng.normal(size=(n, 4)))

    with pytest.raises(ValueError, match="held 5 rows, the range has 6"):
        store.write_range("split", 0, 6, meta=meta, batches=batches(5), head=head)
    assert store.check_range("split", "k1", 0, 6).state == "missing"
    assert not list((tmp_path / "s" / "split").glob("part-*"))  # the failed attempt left no shards
    store.write_range("split", 0, 6, meta=meta, batches=batches(6), head=head, rows_per_shard=4)
    assert store.check_range("split", "k1", 0, 6).complete
    assert store.check_range("split", "k2", 0, 6).state == "stale"
    with pytest.raises(ValueError, match="consecutive from row 0"):
        store.finish_ranges("split", "k1", [(6, 10)])
    other = (head[0] + 1, head[1])
    store.write_range("split", 6, 9, meta=meta, batches=batches(3, 6), head=other)  # another head: a wrong set
    assert store.check_range("split", "k1", 0, 6).state == "corrupt"  # its head file changed under it
    with pytest.raises(UserError, match=r"rows \[6, 9\) have another head or dims than rows \(0, 6\)"):
        store.finish_ranges("split", "k1", [(0, 6), (6, 9)])  # sizes only: the heads' digests disagree
    with pytest.raises(UserError, match=r"rows \[0, 6\) are corrupt .*head.safetensors has sha256"):
        store.finish_ranges("split", "k1", [(0, 6), (6, 9)], verify_checksums=True)
    assert store.check_split("split", "k1").state == "missing"  # no manifest was written


# --- the pipeline benchmark -----------------------------------------------------------------------------------------


def test_pipeline_bench_json():
    args = ["bench", "extract", "--pipeline", "--images", "8", "--batch-size", "4", "--repeats", "1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert set(r["loader_images_per_s"]) == {"0", "1", "2"} and min(r["loader_images_per_s"].values()) > 0
    assert r["gpu_transform_images_per_s"] > 0 and r["extract_images_per_s"] > 0 and r["cpus"] >= 1
    assert r["extract_vs_loader"] == pytest.approx(r["extract_images_per_s"] / r["loader_images_per_s"]["2"])
    assert r["images"] == 8 and r["array_images"] == 32 and "model" not in r
    assert torch.get_num_threads() == 1  # the bench restores the thread count it found (one_thread's)
    refused = CliRunner().invoke(main, ["bench", "extract", "--pipeline", "--throughput"])
    assert refused.exit_code == 2 and "choose one" in refused.output


def test_pipeline_bench_with_a_real_model_runs_on_cpu():
    """The code path of scripts/gpu_bench_extract.sh (--arch), on CPU with tiny settings."""
    from featrec_grid.bench.extract import format_pipeline_bench, run_pipeline_bench

    r = run_pipeline_bench(images=4, workers=(0,), batch_size=4, device="cpu", arch="resnet18", repeats=1)
    m = r["model"]
    assert m["bare_images_per_s"] > 0 and m["extract_jpeg_images_per_s"] > 0 and m["extract_array_images_per_s"] > 0
    assert m["workers"] == r["cpus"] - 1 and m["jpeg_vs_bare"] == pytest.approx(
        m["extract_jpeg_images_per_s"] / m["bare_images_per_s"])
    assert "extraction with JPEG decoding" in format_pipeline_bench(r)
