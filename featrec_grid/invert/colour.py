"""Colour decorrelation (Olah et al. 2017, Lucid): optimise images in a decorrelated colour basis and map them to
RGB with the square root of ImageNet's colour correlation matrix, so one step moves luminance and colour apart."""

from __future__ import annotations

import torch

# Lucid's square root of ImageNet's RGB correlation matrix (columns: a luminance axis and two opponent axes),
# scaled so its largest column has unit norm; the values are Lucid's published constants.
_SQRT_CORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64)
COLOUR_MATRIX = _SQRT_CORRELATION / _SQRT_CORRELATION.norm(dim=0).max()


def _apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """matrix [3, 3] times every pixel's channel vector of x [N, 3, H, W]."""
    return torch.einsum("ij,njhw->nihw", matrix.to(x.device, x.dtype), x)


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Decorrelated channels [N, 3, H, W] -> (unbounded) RGB: rgb = COLOUR_MATRIX @ x per pixel."""
    return _apply(COLOUR_MATRIX, x)


def from_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """The inverse of to_rgb: (unbounded) RGB [N, 3, H, W] -> decorrelated channels."""
    return _apply(torch.linalg.inv(COLOUR_MATRIX), rgb)
