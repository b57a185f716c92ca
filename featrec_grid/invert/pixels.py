"""Pixel-space helpers shared by the inversion modules: images live in [0, 1]; models see them resized and normalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featrec_grid.models import Classifier


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a batch [N, C, H, W] to size x size (antialiased when shrinking); no-op if already there."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = size < max(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def model_input(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] pixels in [0, 1] -> the classifier's input: resized to its size, normalised by its mean/std."""
    x = resize(x, clf.input.size)
    mean = torch.tensor(clf.input.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(clf.input.std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def logits(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    """Differentiable logits of pixel images [N, 3, H, W] in [0, 1]."""
    return clf.forward_logits(model_input(clf, x))


@torch.no_grad()
def embed(clf: Classifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and penultimate features [N, D] of pixel images, in batches, without gradients."""
    clf.backbone.eval()
    zs, fs = [], []
    for start in range(0, len(images), batch_size):
        f = clf.backbone(model_input(clf, images[start : start + batch_size].float()))
        fs.append(f)
        zs.append(f @ clf.head_weight.T.to(f.dtype) + clf.head_bias.to(f.dtype))
    return torch.cat(zs), torch.cat(fs)
