"""Dataset reference -> torch Dataset of (PIL RGB image, int label) with stable row ids, for every model alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from featrec_grid.errors import UserError
from featrec_grid.refs import DataRef

DEFAULT_ROOT = "~/.cache/featrec_grid/data"
DIGITS_SPLITS = ("train", "test", "all")
DIGITS_VIEWS = ("noisy", "inverted")
PLACES_SPLITS = ("val", "train-standard")
DOWNLOAD_HINT = "set `download: true` in the spec's data options or pass the --download flag"


class ImageDataset(Dataset):
    """Images with labels: `classes`, `label_space` and `indices` (int64 row ids, stable across models and runs)."""

    classes: list[str]
    label_space: str
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


class DigitsDataset(ImageDataset):
    """scikit-learn's 8x8 handwritten digits (values 0..16) as uint8 RGB PIL images; `indices` are load_digits rows."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        self.pixels = pixels
        self.labels = labels
        self.indices = indices.astype(np.int64)
        self.classes = [str(d) for d in range(10)]
        self.label_space = "digits"

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.pixels[i]).convert("RGB"), int(self.labels[i])


class WrappedDataset(ImageDataset):
    """A torchvision dataset with the attributes featrec_grid needs; rows are numbered 0..n-1 in its own order."""

    def __init__(self, base: Any, classes: list[str], label_space: str) -> None:
        self.base = base
        self.classes = list(classes)
        self.label_space = label_space
        self.indices = np.arange(len(base), dtype=np.int64)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.base[int(self.indices[i])]
        return image.convert("RGB"), int(label)


class LimitedDataset(ImageDataset):
    """The first `limit` rows of another dataset, keeping its row ids (options.limit: quick runs on big sets)."""

    def __init__(self, base: ImageDataset, limit: int) -> None:
        self.base = base
        self.classes = base.classes
        self.label_space = base.label_space
        self.indices = base.indices[:limit]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if i >= len(self.indices):
            raise IndexError(i)
        return self.base[i]


class TransformedDataset(Dataset):
    """(transform(image), label, row id) triples for a DataLoader."""

    def __init__(self, base: ImageDataset, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.base[i]
        return self.transform(image), label, int(self.base.indices[i])


def load_dataset(ref: DataRef) -> ImageDataset:
    """Open the dataset split a DataRef names; a user-fixable problem (missing files, bad option) is a UserError."""
    loaders = {
        "digits": _digits,
        "cifar10": _cifar,
        "cifar100": _cifar,
        "places365": _places365,
        "folder": _folder,
    }
    if ref.dataset not in loaders:
        raise UserError(f"dataset {ref.dataset!r} is unknown; allowed: {', '.join(loaders)}")
    dataset = loaders[ref.dataset](ref)
    limit = ref.options.get("limit")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise UserError(f"data option limit={limit!r} for {ref.dataset} must be a positive integer")
        dataset = LimitedDataset(dataset, limit)
    return dataset


def data_fingerprint(ref: DataRef) -> str | None:
    """sha256 over a folder dataset's files (relative path, size, modification time, sorted): it enters the shard
    cache key, so adding, removing or rewriting an image makes a rerun extract again. None for the other datasets
    (their content is fixed by name and split). A missing root is left to load_dataset's message."""
    if ref.dataset != "folder" or "root" not in ref.options:
        return None
    import hashlib
    import os

    root = _root(ref)
    digest = hashlib.sha256()
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            st = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def digits_split(seed: int = 0, test_fraction: float = 0.3) -> dict[str, np.ndarray]:
    """Row numbers of load_digits in each split: a stratified train/test split, fixed by seed and test fraction."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    rows = np.arange(len(target), dtype=np.int64)
    train, test = train_test_split(rows, test_size=test_fraction, random_state=seed, stratify=target)
    return {"train": np.sort(train), "test": np.sort(test), "all": rows}


def _digits(ref: DataRef) -> DigitsDataset:
    from sklearn.datasets import load_digits

    if ref.split not in DIGITS_SPLITS:
        raise UserError(f"digits split {ref.split!r} is unknown; allowed: {', '.join(DIGITS_SPLITS)}")
    seed = int(ref.options.get("seed", 0))
    test_fraction = float(ref.options.get("test_fraction", 0.3))
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"digits option test_fraction={test_fraction} must lie strictly between 0 and 1")
    digits = load_digits()
    pixels = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    pixels = _digits_view(pixels, ref.options)
    rows = digits_split(seed, test_fraction)[ref.split]
    return DigitsDataset(pixels[rows], digits.target[rows], rows)


def _digits_view(pixels: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    """A corrupted view of all 1797 images (the same per row whatever the split): 'noisy' or 'inverted'."""
    view = options.get("view")
    if view is None:
        return pixels
    if view == "inverted":
        return 255 - pixels
    if view == "noisy":
        sigma = float(options.get("noise", 0.25)) * 255.0
        rng = np.random.default_rng(int(options.get("noise_seed", 0)))
        noisy = pixels.astype(np.float64) + rng.normal(0.0, sigma, size=pixels.shape)
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    raise UserError(f"digits option view={view!r} is unknown; allowed: {', '.join(DIGITS_VIEWS)}")


def _root(ref: DataRef) -> Path:
    return Path(str(ref.options.get("root", DEFAULT_ROOT))).expanduser()


def _cifar(ref: DataRef) -> WrappedDataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    if ref.split not in ("train", "test"):
        raise UserError(f"{ref.dataset} split {ref.split!r} is unknown; allowed: train, test")
    cls = CIFAR10 if ref.dataset == "cifar10" else CIFAR100
    root = _root(ref)
    download = bool(ref.options.get("download", False))
    folder = root / cls.base_folder
    needed = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing and not download:
        raise UserError(
            f"{ref.dataset} files not found in {folder} (missing: {', '.join(missing)}); "
            f"to download them into {root}, {DOWNLOAD_HINT}, or set the data option root to where they are"
        )
    try:
        base = cls(root=str(root), train=ref.split == "train", download=download)
    except RuntimeError as err:
        raise UserError(f"{ref.dataset} in {folder} could not be read ({err}); {DOWNLOAD_HINT}") from err
    return WrappedDataset(base, base.classes, ref.dataset)


def _places365(ref: DataRef) -> WrappedDataset:
    from torchvision.datasets import Places365

    if ref.split not in PLACES_SPLITS:
        raise UserError(f"places365 split {ref.split!r} is unknown; allowed: {', '.join(PLACES_SPLITS)}")
    root = _root(ref)
    download = bool(ref.options.get("download", False))
    categories = Places365._CATEGORIES_META[0]
    file_list = Places365._FILE_LIST_META[ref.split][0]
    images = "val_256" if ref.split == "val" else "data_256_standard"
    missing = [name for name in (categories, file_list, images) if not (root / name).exists()]
    if missing and not download:
        raise UserError(
            f"places365 files not found in {root} (missing: {', '.join(missing)}); "
            f"to download them into {root}, {DOWNLOAD_HINT}, or set the data option root to where they are"
        )
    try:
        base = Places365(root=str(root), split=ref.split, small=True, download=download)
    except RuntimeError as err:
        raise UserError(f"places365 in {root} could not be read ({err}); {DOWNLOAD_HINT}") from err
    return WrappedDataset(base, base.classes, "places365")


def _folder(ref: DataRef) -> WrappedDataset:
    from torchvision.datasets import ImageFolder

    if "root" not in ref.options:
        raise UserError(
            "dataset folder needs the data option root: a directory with one sub-directory per class"
        )
    root = _root(ref)
    if not root.is_dir():
        raise UserError(f"folder dataset root {root} does not exist or is not a directory")
    try:
        base = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(
            f"folder dataset {root} holds no readable images in class sub-directories ({err})"
        ) from err
    label_space = str(ref.options.get("label_space", f"folder:{root.name}"))
    return WrappedDataset(base, base.classes, label_space)
