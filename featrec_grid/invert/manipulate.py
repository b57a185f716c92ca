"""Logit manipulations as in Teterwak et al.: shift and scale the logits, add Gaussian noise, resample the decoder's
noise z; each returns the decoded images so a grid shows how reconstructions change."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from featrec_grid.errors import UserError
from featrec_grid.invert.decoder import LogitDecoder

DEFAULT_VALUES: dict[str, tuple[float, ...]] = {
    "shift": (-4.0, -2.0, 0.0, 2.0, 4.0),
    "scale": (0.25, 0.5, 1.0, 2.0, 4.0),
    "noise": (0.0, 0.25, 0.5, 1.0, 2.0),
    "resample": (0, 1, 2, 3, 4),
}


def manipulated_logits(z: torch.Tensor, kind: str, values: Sequence[float], seed: int = 0) -> torch.Tensor:
    """One logit vector [C] -> [V, C]: shift adds v to every logit (softmax-invariant), scale multiplies by v
    (a temperature change), noise adds v * std(z) * N(0, 1) (seeded), resample leaves the logits unchanged."""
    z = z.reshape(1, -1).float()
    v = torch.tensor([float(x) for x in values]).view(-1, 1)
    if kind == "shift":
        return z + v
    if kind == "scale":
        return z * v
    if kind == "noise":
        eps = torch.randn(len(v), z.shape[1], generator=torch.Generator().manual_seed(int(seed)))
        return z + v * z.std() * eps
    if kind == "resample":
        return z.repeat(len(v), 1)
    raise UserError(f"manipulation '{kind}' is not one of {', '.join(DEFAULT_VALUES)}")


def manipulate(
    decoder: LogitDecoder, z: torch.Tensor, kind: str, values: Sequence[float] | None = None, seed: int = 0
) -> torch.Tensor:
    """Decode manipulated versions of one logit vector [C]: images [V, 3, s, s]. z = 0 except for "resample",
    where value v is the seed of the decoder's noise."""
    values = DEFAULT_VALUES[kind] if values is None and kind in DEFAULT_VALUES else values
    zs = manipulated_logits(z, kind, values, seed)
    if kind == "resample":
        return torch.cat([decoder.decode(zs[i : i + 1], seed=int(v)) for i, v in enumerate(values)])
    return decoder.decode(zs)


def manipulation_grid(
    decoder: LogitDecoder, logits: torch.Tensor, kind: str, values: Sequence[float] | None = None, seed: int = 0
) -> torch.Tensor:
    """Rows of manipulations for several logit vectors [K, C] -> [K, V, 3, s, s] (one row per item)."""
    return torch.stack([manipulate(decoder, z, kind, values, seed + i) for i, z in enumerate(logits)])
