"""data.py: digits splits and views; CIFAR-10/100, Places365 and image folders read from tiny files in their real
on-disk formats through torchvision's own classes; clear errors when files are missing."""

import hashlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.datasets import CIFAR10, CIFAR100, Places365

from featrec_grid.data import TransformedDataset, Unreadable, collate, load_dataset
from featrec_grid.errors import UserError
from featrec_grid.refs import DataRef


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --- digits -----------------------------------------------------------------------------------------------------


def test_digits_splits_are_stratified_disjoint_and_seed_stable():
    digits = load_digits()
    train, test = load_dataset(DataRef("digits", "train")), load_dataset(DataRef("digits", "test"))
    assert len(train) + len(test) == 1797 == len(load_dataset(DataRef("digits", "all")))
    assert len(test) == 540  # ceil(0.3 * 1797)
    assert not set(train.indices) & set(test.indices)
    assert sorted([*train.indices, *test.indices]) == list(range(1797))
    overall = np.bincount(digits.target, minlength=10) / 1797
    for split in (train, test):
        share = np.bincount(digits.target[split.indices], minlength=10) / len(split)
        assert np.abs(share - overall).max() < 0.01
    again = load_dataset(DataRef("digits", "train", {"seed": 0}))
    other = load_dataset(DataRef("digits", "train", {"seed": 1}))
    assert np.array_equal(train.indices, again.indices)
    assert not np.array_equal(train.indices, other.indices)
    assert len(load_dataset(DataRef("digits", "test", {"test_fraction": 0.5}))) == 899
    assert train.indices.dtype == np.int64 and train.label_space == "digits" and train.classes[3] == "3"


def test_digits_items_are_the_sklearn_images():
    digits = load_digits()
    test = load_dataset(DataRef("digits", "test"))
    for i in (0, 17, len(test) - 1):
        image, label = test[i]
        row = test.indices[i]
        assert image.mode == "RGB" and image.size == (8, 8)
        pixels = np.asarray(image)
        expected = np.round(digits.images[row] * 255 / 16).astype(np.uint8)
        assert all(np.array_equal(pixels[..., c], expected) for c in range(3))
        assert label == digits.target[row]


def test_digits_views():
    plain = load_dataset(DataRef("digits", "test"))
    inverted = load_dataset(DataRef("digits", "test", {"view": "inverted"}))
    noisy = load_dataset(DataRef("digits", "test", {"view": "noisy"}))
    noisy_all = load_dataset(DataRef("digits", "all", {"view": "noisy"}))
    a, b = np.asarray(plain[5][0]).astype(int), np.asarray(inverted[5][0]).astype(int)
    assert np.array_equal(a + b, np.full_like(a, 255))
    n = np.asarray(noisy[5][0]).astype(int)
    assert n.shape == a.shape and 20 < np.abs(n - a).mean() < 80  # sigma 0.25 * 255, clipped to 0..255
    row = int(noisy.indices[5])
    assert np.array_equal(np.asarray(noisy_all[row][0]), np.asarray(noisy[5][0]))  # same noise per row
    assert noisy[5][1] == plain[5][1]
    with pytest.raises(UserError, match="inverted"):
        load_dataset(DataRef("digits", "test", {"view": "blurred"}))
    with pytest.raises(UserError, match="train, test, all"):
        load_dataset(DataRef("digits", "val"))


def test_digits_in_memory_array_is_the_sklearn_pixels():
    digits = load_digits()
    test = load_dataset(DataRef("digits", "test", {"view": "inverted"}))
    images, labels = test.in_memory()
    expected = 255 - np.round(digits.images[test.indices] * 255 / 16).astype(np.uint8)
    assert images.dtype == np.uint8 and np.array_equal(images, expected)
    assert np.array_equal(labels, digits.target[test.indices])
    limited = load_dataset(DataRef("digits", "test", {"view": "inverted", "limit": 7}))
    assert np.array_equal(limited.in_memory()[0], expected[:7]) and len(limited.in_memory()[1]) == 7


def test_transformed_dataset_and_limit():
    base = load_dataset(DataRef("digits", "test", {"limit": 5}))
    assert len(base) == 5
    ds = TransformedDataset(base, lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)))
    x, label, index = ds[4]
    assert x.shape == (8, 8, 3) and index == base.indices[4] and label == base[4][1]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch[2].tolist() == base.indices.tolist()
    with pytest.raises(UserError, match="limit"):
        load_dataset(DataRef("digits", "test", {"limit": 0}))


# --- CIFAR ------------------------------------------------------------------------------------------------------


def _write_pickle(path, obj) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _cifar_files(root, cls, rng):
    """Tiny CIFAR python-pickle files (the real key names); return {file name: (images HWC, labels)}."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if cls is CIFAR10 else "fine_labels"
    n_classes = 10 if cls is CIFAR10 else 100
    written = {}
    for name, _ in cls.train_list + cls.test_list:
        images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, n_classes, size=3).tolist()
        flat = images.transpose(0, 3, 1, 2).reshape(3, 3072)  # rows of R plane, G plane, B plane
        _write_pickle(folder / name, {"data": flat, label_key: labels, "batch_label": name})
        written[name] = (images, labels)
    names = [f"class{i}" for i in range(n_classes)]
    meta = (
        {"label_names": names}
        if cls is CIFAR10
        else {"fine_label_names": names, "coarse_label_names": names[:20]}
    )
    _write_pickle(folder / cls.meta["filename"], meta)
    return written


def _accept_tiny_files(monkeypatch, root, cls):
    """torchvision verifies each file's md5 even with download=False; the real checksums belong to the real
    50,000-image files, so the test declares the md5 of the tiny files it wrote (the check itself still runs)."""
    folder = root / cls.base_folder
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


@pytest.mark.parametrize(("name", "cls"), [("cifar10", CIFAR10), ("cifar100", CIFAR100)])
def test_cifar_reads_real_format(tmp_path, monkeypatch, name, cls):
    written = _cifar_files(tmp_path, cls, np.random.default_rng(0))
    # the real checksums reject the tiny files: torchvision's verification is live
    with pytest.raises(UserError, match="could not be read"):
        load_dataset(DataRef(name, "train", {"root": str(tmp_path)}))
    _accept_tiny_files(monkeypatch, tmp_path, cls)
    train = load_dataset(DataRef(name, "train", {"root": str(tmp_path)}))
    test = load_dataset(DataRef(name, "test", {"root": str(tmp_path)}))
    train_files = [n for n, _ in cls.train_list]
    assert len(train) == 3 * len(train_files) and len(test) == 3
    assert train.label_space == name and train.classes[1] == "class1"
    images, labels = written[train_files[-1]]
    image, label = train[len(train) - 1]
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), images[-1]) and label == labels[-1]
    test_images, test_labels = written[cls.test_list[0][0]]
    assert np.array_equal(np.asarray(test[0][0]), test_images[0]) and test[0][1] == test_labels[0]
    assert test.indices.tolist() == [0, 1, 2]
    images, labels = train.in_memory()  # one uint8 array in row order: what the tensor pipeline slices
    assert images.shape == (len(train), 32, 32, 3) and images.flags.c_contiguous
    assert np.array_equal(images[-3:], written[train_files[-1]][0]) and labels[-3:].tolist() == labels_last(written, train_files)


def labels_last(written, files) -> list[int]:
    return list(written[files[-1]][1])


def test_cifar_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset(DataRef("cifar10", "test", {"root": str(tmp_path / "nowhere")}))
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "download: true" in message and "--download" in message
    with pytest.raises(UserError, match="train, test"):
        load_dataset(DataRef("cifar100", "val", {"root": str(tmp_path)}))


# --- Places365 --------------------------------------------------------------------------------------------------


def _places_val(root, rng):
    """categories_places365.txt ('/a/airfield 0'), places365_val.txt ('Places365_val_00000001.jpg 0'), val_256/."""
    (root / "categories_places365.txt").write_text("/a/airfield 0\n/b/bakery/shop 1\n/c/canyon 2\n")
    (root / "val_256").mkdir()
    lines, images = [], []
    for i, label in enumerate([2, 0, 1, 2], start=1):
        name = f"Places365_val_{i:08d}.png"
        pixels = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val_256" / name)
        lines.append(f"{name} {label}")
        images.append((pixels, label))
    (root / "places365_val.txt").write_text("\n".join(lines) + "\n")
    return images


def test_places365_val_reads_real_layout(tmp_path, monkeypatch):
    images = _places_val(tmp_path, np.random.default_rng(1))
    with pytest.raises(UserError, match="could not be read"):  # real md5 of the real file lists
        load_dataset(DataRef("places365", "val", {"root": str(tmp_path)}))
    # as for CIFAR: the tiny lists cannot have the real md5; declare theirs, the check itself still runs
    monkeypatch.setattr(
        Places365,
        "_CATEGORIES_META",
        ("categories_places365.txt", _md5(tmp_path / "categories_places365.txt")),
    )
    monkeypatch.setattr(
        Places365,
        "_FILE_LIST_META",
        {**Places365._FILE_LIST_META, "val": ("places365_val.txt", _md5(tmp_path / "places365_val.txt"))},
    )
    ds = load_dataset(DataRef("places365", "val", {"root": str(tmp_path)}))
    assert len(ds) == 4 and ds.label_space == "places365"
    assert ds.classes == ["/a/airfield", "/b/bakery/shop", "/c/canyon"]
    for i, (pixels, label) in enumerate(images):
        image, got = ds[i]
        assert got == label and np.array_equal(np.asarray(image), pixels)


def test_places365_missing_files(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset(DataRef("places365", "val", {"root": str(tmp_path)}))
    assert str(tmp_path) in str(err.value) and "categories_places365.txt" in str(err.value)
    assert "download: true" in str(err.value)
    with pytest.raises(UserError, match="train-standard"):
        load_dataset(DataRef("places365", "test", {"root": str(tmp_path)}))


# --- folders ----------------------------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    for cls, value in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((5, 5), value, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(DataRef("folder", "all", {"root": str(tmp_path), "label_space": "pets"}))
    assert ds.classes == ["cat", "dog"] and len(ds) == 4 and ds.label_space == "pets"
    image, label = ds[3]
    assert label == 1 and image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [200, 200, 200]
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(DataRef("folder", "all", {"root": str(tmp_path / "missing")}))
    with pytest.raises(UserError, match="root"):
        load_dataset(DataRef("folder", "all"))


def test_image_folder_of_jpegs_rows_sorted_and_bad_files_named(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for path in ("b/z.jpg", "b/a.jpg", "a/sub/y.jpg", "a/x.jpeg", "a/notes.txt"):  # created out of order
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".txt"):
            (tmp_path / path).write_text("not an image, and not an image extension: skipped")
            continue
        Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).save(tmp_path / path, quality=85)
        written[path] = np.asarray(Image.open(tmp_path / path).convert("RGB"))
    ds = load_dataset(DataRef("folder", "all", {"root": str(tmp_path)}))
    assert ds.classes == ["a", "b"] and ds.in_memory() is None
    order = ["a/x.jpeg", "a/sub/y.jpg", "b/a.jpg", "b/z.jpg"]  # sorted walk: a folder's files before its sub-folders
    assert [p for p, _ in ds.base.samples] == [str(tmp_path / p) for p in order]
    assert ds.indices.tolist() == [0, 1, 2, 3]
    for i, path in enumerate(order):
        image, label = ds[i]
        assert image.size == (40, 30) and np.array_equal(np.asarray(image), written[path]) and label == (i >= 2)
    (tmp_path / "b" / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(UserError, match=f"image {tmp_path / 'b' / 'a.jpg'} cannot be decoded"):
        ds[2]
    with pytest.raises(UserError, match="b/a.jpg cannot be decoded"):
        TransformedDataset(ds, lambda im: im)[2]
    x, label, index = TransformedDataset(ds, lambda im: im, carry_errors=True)[2]  # as data through workers
    assert isinstance(x, Unreadable) and "b/a.jpg cannot be decoded" in x.message and (label, index) == (-1, 2)
    assert isinstance(collate([(torch.zeros(1), 0, 0), (x, label, index)]), Unreadable)
    assert collate([(torch.zeros(1), 0, 5), (torch.ones(1), 1, 6)])[2].tolist() == [5, 6]
