"""Measured, not eyeballed: every generated image judged by every model of the label space (the transfer table),
and the distances between two output vectors that match objectives try to close."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from featrec_grid.invert.pixels import embed
from featrec_grid.models import Classifier

TRANSFER_COLUMNS = (
    "generator", "judge", "method", "parameterisation", "objective", "class", "seed", "target_prob", "target_rank",
    "top1_is_target", "control", "heldout", "item",
)  # fmt: skip


def judge_images(
    images: torch.Tensor, classes: Sequence[int], seeds: Sequence[int], judges: Sequence[Classifier], *,
    generator: str, used: Sequence[str], method: str, parameterisation: str, objective: str, control: str = "none",
    items: Sequence[str] | None = None,
) -> list[dict]:  # fmt: skip
    """Rows of the transfer table for images [N, 3, H, W] meant to show classes[i] (made from seeds[i]): for every
    judge, its softmax probability of the class, the class's rank among its logits (1 = its top-1) and whether
    its top-1 is the class. `generator` names what made the images ("lite0", "lite0+lite1", "lite0~untrained",
    "noise"); `used` lists the models whose gradients made them: a judge outside `used` is held out (the honest
    score: a model always likes its own images)."""
    c = torch.as_tensor(np.asarray(classes), dtype=torch.long)
    rows = []
    for judge in judges:
        z, _ = embed(judge, images)
        z = z.double()
        prob = torch.softmax(z, 1).gather(1, c[:, None])[:, 0]
        rank = (z > z.gather(1, c[:, None])).sum(1) + 1
        for i in range(len(images)):
            rows.append(dict(
                generator=generator, judge=judge.key, method=method, parameterisation=parameterisation,
                objective=objective, **{"class": int(c[i])}, seed=int(seeds[i]), target_prob=float(prob[i]),
                target_rank=int(rank[i]), top1_is_target=bool(rank[i] == 1), control=control,
                heldout=judge.key not in used, item=None if items is None else str(items[i]),
            ))  # fmt: skip
    return rows


def vector_distances(z: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Relative L1 distance |z - t|_1 / |t|_1 and cosine distance 1 - cos(z, t) between output vectors z [N, C]
    and targets [N, C] (or [C])."""
    z, t = z.double(), torch.broadcast_to(target.double(), z.shape)
    l1 = (z - t).abs().sum(1) / t.abs().sum(1).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(z, t, dim=1)
    return l1.numpy(), (1 - cos).numpy()
