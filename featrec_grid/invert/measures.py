"""Metrics for inverted images: class probability, logit distance, SSIM/PSNR, retrieval top-1, agreement."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

from featrec_grid.invert.pixels import embed
from featrec_grid.models import Classifier


def class_prob(clf: Classifier, images: torch.Tensor, classes: torch.Tensor | np.ndarray | list[int]) -> np.ndarray:
    """Softmax probability that `clf` gives image i to class classes[i]."""
    z, _ = embed(clf, images)
    idx = torch.as_tensor(np.asarray(classes), dtype=torch.long)
    return torch.softmax(z.double(), dim=1)[torch.arange(len(z)), idx].numpy()


def logit_distance(z: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Relative L1 and L2 distances between logit rows z [N, C] and target [C] or [N, C]: |z - t| / |t|."""
    z, t = z.double(), torch.broadcast_to(target.double(), z.shape)
    l1 = (z - t).abs().sum(1) / t.abs().sum(1).clamp_min(1e-12)
    l2 = (z - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)
    return l1.numpy(), l2.numpy()


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(range^2 / MSE); +inf for identical images (as skimage)."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM of two [3, H, W] images (skimage: 7x7 uniform window, or the largest odd window that fits)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    win = min(7, *(s - (s + 1) % 2 for s in a.shape[-2:]))
    return float(structural_similarity(a, b, data_range=data_range, channel_axis=0, win_size=win))


def paired(metric, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Apply an image metric (psnr, ssim) to each pair (a[i], b[i]) of two batches [N, 3, H, W]."""
    return np.array([metric(x.numpy(), y.numpy()) for x, y in zip(a, b, strict=True)])


def retrieval_top1(queries: torch.Tensor, gallery: torch.Tensor) -> float:
    """Fraction of queries i whose nearest gallery item (L2 on flattened rows) is item i; chance is 1/len(gallery)."""
    q = queries.reshape(len(queries), -1).double()
    g = gallery.reshape(len(gallery), -1).double()
    nearest = torch.cdist(q, g).argmin(dim=1)
    return float((nearest == torch.arange(len(q))).double().mean())


def onehot_ceiling(groups: torch.Tensor | np.ndarray) -> float:
    """The best retrieval top-1 a decoder seeing only a class can reach: queries of one class get one and the same
    reconstruction, hence one nearest gallery item, so at most one of them is right. The mean over queries of
    1 / (queries sharing its class) = (number of distinct classes) / N; `groups` [N] gives each query's class."""
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    return float(np.mean(1.0 / counts[inverse]))


def agreement(z_a: torch.Tensor, z_b: torch.Tensor) -> float:
    """Top-1 agreement: fraction of rows where the two logit matrices have the same argmax."""
    return float((z_a.argmax(1) == z_b.argmax(1)).double().mean())
