"""Pixel-space helpers shared by the inversion modules: images live in [0, 1]; models see them resized and normalised."""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import torch.nn.functional as F

from featrec_grid.models import Classifier


def device_of(clf: Classifier) -> torch.device:
    """Where the classifier's backbone lives (its first parameter or buffer; CPU for a module without either)."""
    first = next(itertools.chain(clf.backbone.parameters(), clf.backbone.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def on_device(clf: Classifier, device: str | torch.device) -> Classifier:
    """The classifier with backbone (moved in place) and head on `device`; the same object when already there.
    Everything downstream (embed, logits, inversion) runs where the classifier is and returns CPU tensors."""
    device = torch.device(device)
    if device_of(clf) == device and clf.head_weight.device == device:
        return clf
    return replace(clf, backbone=clf.backbone.to(device), head_weight=clf.head_weight.to(device),
                   head_bias=clf.head_bias.to(device))  # fmt: skip


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a batch [N, C, H, W] to size x size (antialiased when shrinking); no-op if already there."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = size < max(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def model_input(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] pixels in [0, 1] -> the classifier's input: resized to its size, normalised by its mean/std."""
    x = resize(x, clf.input.size)
    mean = torch.tensor(clf.input.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(clf.input.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def logits(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    """Differentiable logits of pixel images [N, 3, H, W] in [0, 1], on the classifier's device."""
    return clf.forward_logits(model_input(clf, x.to(device_of(clf))))


@torch.no_grad()
def embed(clf: Classifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and penultimate features [N, D] of pixel images, in batches, without gradients; computed on
    the classifier's device (see on_device), returned on the CPU."""
    clf.backbone.eval()
    device = device_of(clf)
    zs, fs = [], []
    for start in range(0, len(images), batch_size):
        f = clf.backbone(model_input(clf, images[start : start + batch_size].to(device).float()))
        z = f @ clf.head_weight.T.to(f.device, f.dtype) + clf.head_bias.to(f.device, f.dtype)
        fs.append(f.cpu())
        zs.append(z.cpu())
    return torch.cat(zs), torch.cat(fs)
