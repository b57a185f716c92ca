"""An InputConfig's transform split at the uint8 boundary, so the device does the float work.

Extraction ships uint8 images to the device and normalises them there (`normalise`): 4x fewer bytes through
DataLoader workers, pinned memory and the host-to-device copy than float32. The geometry (resize, center crop) runs
either in PIL on the host (`host_transform`, for image files) or, for datasets held in one uint8 array, as tensor
ops on the device (`BatchTransform`; the host then only slices and copies bytes).

`host_transform` plus `normalise` is InputConfig.transform() bit for bit: the same PIL steps, and ToTensor +
Normalize are uint8 -> float32, / 255, - mean, / std, the very ops `normalise` runs. `BatchTransform` follows PIL's
geometry: PIL resizes in two separable passes, width then height, each rounded half up and clipped to 0..255;
torch's antialiased interpolation uses PIL's filters, so resizing in float32 the same way, rounding after each pass,
reproduces PIL up to one grey level on rare pixels (PIL's fixed-point weights; two where bicubic's second pass
spreads a first-pass difference). A single-pass float resize, as
torchvision's uint8 tensor resize does on CUDA, misses bicubic PIL by up to 22 levels: PIL clips the overshoot
between its passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from featrec_grid.models import InputConfig

# InputConfig.interpolation values with a tensor form. Not "nearest": PIL breaks the ties at exact half-pixel
# positions the other way than torch's nearest-exact, so whole pixels would differ (measured: 5% of them).
TENSOR_MODES = ("bilinear", "bicubic")


def supports(config: InputConfig) -> bool:
    """True when the tensor path reproduces `config`'s PIL transform (no resize, or a bilinear or bicubic one)."""
    return not config.resize or config.interpolation in TENSOR_MODES


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int) rule: the shorter side becomes `short`, the longer int(short * long / short_side)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def host_transform(config: InputConfig) -> Callable[[Any], torch.Tensor]:
    """The PIL half of config.transform(): its own steps up to ToTensor, then PILToTensor (PIL image -> resized,
    center-cropped uint8 tensor [3, size, size])."""
    from torchvision import transforms as T

    steps = config.transform().transforms
    if not (isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize)):
        raise RuntimeError(f"InputConfig.transform() must end in ToTensor, Normalize; it is {steps}")
    return T.Compose([*steps[:-2], T.PILToTensor()])


def normalise(x: torch.Tensor, config: InputConfig) -> torch.Tensor:
    """Images [N, 3, H, W] with values 0..255 (uint8 or integer-valued float) -> float32 (x / 255 - mean) / std,
    with the operations of ToTensor and Normalize, so the result is theirs bit for bit."""
    x = x.float() if x.dtype != torch.float32 else x
    mean = torch.tensor(config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, 3, 1, 1)
    return x.div(255).sub_(mean).div_(std)


class BatchTransform:
    """uint8 images [N, H, W] (grey) or [N, H, W, 3] on any device -> float32 [N, 3, size, size]: the PIL geometry
    of `config.transform()` as tensor ops, then `normalise`."""

    def __init__(self, config: InputConfig) -> None:
        if not supports(config):
            raise ValueError(f"interpolation {config.interpolation!r} has no tensor path; use {list(TENSOR_MODES)}")
        self.config = config
        self.short = int(round(config.size / config.crop_pct))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"need uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        x = images.float()
        x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # grey -> RGB as PIL's convert
        cfg = self.config
        if cfg.resize:
            height, width = resized_size(x.shape[-2], x.shape[-1], self.short)
            x = _pass(x, x.shape[-2], width, cfg.interpolation)
            x = _pass(x, height, width, cfg.interpolation)
        return normalise(_center_crop(x, cfg.size), cfg)


def _pass(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """One of PIL's resize passes: skipped when the size is unchanged, else resampled and rounded to uint8 levels."""
    if (height, width) == tuple(x.shape[-2:]):
        return x
    y = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True)
    return y.add_(0.5).floor_().clamp_(0, 255)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop: zero-pad a side smaller than `size` (as its PIL path pads), then take the centre."""
    from torchvision.transforms.v2.functional import center_crop

    return center_crop(x, [size, size])


def array_batches(
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    start: int,
    stop: int,
    batch_size: int,
    device: str | torch.device,
) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
    """(uint8 images on `device`, labels, row ids) for rows [start, stop) in batches of `batch_size`: the host work is
    one slice copy per batch (into pinned memory on CUDA, copied without blocking)."""
    on_cuda = torch.device(device).type == "cuda"
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        x = torch.from_numpy(np.ascontiguousarray(images[s:e]))
        if on_cuda:
            x = x.pin_memory().to(device, non_blocking=True)
        yield x, labels[s:e], indices[s:e]
