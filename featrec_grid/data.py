"""Dataset reference -> torch Dataset of (PIL RGB image, int label) with stable row ids, for every model alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

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

    def in_memory(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(uint8 images [N, H, W] gray or [N, H, W, 3] RGB, int64 labels [N]) when every image of the dataset sits
        in one array, so a batch can go to the device as it is (the tensor transform path); None otherwise."""
        return None


class ArrayDataset(ImageDataset):
    """Images held in one uint8 array (digits, CIFAR): item i is images[i] as an RGB PIL image, as torchvision's
    CIFAR classes return it (a gray [H, W] image is converted to RGB, i.e. repeated over the three channels)."""

    def __init__(
        self, images: np.ndarray, labels: Any, indices: np.ndarray, classes: list[str], label_space: str
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}")
        self.images = np.ascontiguousarray(images)  # torchvision's CIFAR array is a transposed view
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = list(classes)
        self.label_space = label_space

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])

    def in_memory(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images, self.labels


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

    def in_memory(self) -> tuple[np.ndarray, np.ndarray] | None:
        arrays = self.base.in_memory()
        n = len(self.indices)
        return None if arrays is None else (arrays[0][:n], arrays[1][:n])


@dataclass(frozen=True)
class Unreadable:
    """An image that could not be read, carried to the main process as data: an exception raised in a DataLoader
    worker would reach it re-wrapped around the worker's traceback text instead of the one-line message."""

    message: str


class TransformedDataset(Dataset):
    """(transform(image), label, row id) triples for a DataLoader. With `carry_errors`, an unreadable image gives
    (Unreadable, -1, row id) instead of raising, so that its message survives worker processes (see `collate`)."""

    def __init__(
        self, base: ImageDataset, transform: Callable[[Image.Image], torch.Tensor], carry_errors: bool = False
    ) -> None:
        self.base = base
        self.transform = transform
        self.carry_errors = carry_errors

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | Unreadable, int, int]:
        try:
            image, label = self.base[i]
        except UserError as err:
            if not self.carry_errors:
                raise
            return Unreadable(str(err)), -1, int(self.base.indices[i])
        return self.transform(image), label, int(self.base.indices[i])


def collate(items: list[tuple[Any, int, int]]) -> Any:
    """DataLoader collate_fn for TransformedDataset: default_collate, except that a batch holding an unreadable
    image is that image's Unreadable (the caller raises it as a UserError)."""
    for item in items:
        if isinstance(item[0], Unreadable):
            return item[0]
    return default_collate(items)


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


def _digits(ref: DataRef) -> ArrayDataset:
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
    return ArrayDataset(pixels[rows], digits.target[rows], rows, [str(d) for d in range(10)], "digits")


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


def _cifar(ref: DataRef) -> ArrayDataset:
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
    # torchvision holds CIFAR as one uint8 array [N, 32, 32, 3] (item i is Image.fromarray(data[i]))
    return ArrayDataset(base.data, base.targets, np.arange(len(base.data)), base.classes, ref.dataset)


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
        base = ImageFolder(str(root), loader=open_image)  # classes and files sorted: row i is the i-th sorted path
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(
            f"folder dataset {root} holds no readable images in class sub-directories ({err})"
        ) from err
    label_space = str(ref.options.get("label_space", f"folder:{root.name}"))
    return WrappedDataset(base, base.classes, label_space)


def open_image(path: str) -> Image.Image:
    """A decoded RGB image; a file PIL cannot decode (not an image, truncated, too large) is a UserError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(
            f"image {path} cannot be decoded ({type(err).__name__}: {err}); replace or remove the file"
        ) from None
