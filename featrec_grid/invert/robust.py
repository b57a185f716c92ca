"""Transformation robustness (Olah et al. 2017; Lucid's standard_transforms): before each step the image is padded
with grey and randomly shifted, scaled and rotated, so the optimum must survive small changes of view and does
not sit on pixel-exact adversarial patterns. Every image of a batch draws its own transform from its own
generator, so an image does not depend on the rest of the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featrec_grid.errors import UserError

# Lucid's standard_transforms at 224 px: pad 12 (grey), jitter 8 then 4 (non-negative shifts 0..7 and 0..3),
# scale 0.9-1.1, rotation -10..10 degrees. We draw one symmetric shift of up to +-8 px instead of the two jitters.
REFERENCE_SIZE = 224
REFERENCE = {"pad": 12, "jitter": 8, "scale": 0.1, "angle": 10.0}


@dataclass(frozen=True)
class Robustness:
    """Transform ranges: grey padding `pad` pixels per side, integer shifts up to +-`jitter` pixels, scale factors
    in [1 - scale, 1 + scale], rotations in [-angle, angle] degrees. All zero: the identity."""

    pad: int = 0
    jitter: int = 0
    scale: float = 0.0
    angle: float = 0.0

    @classmethod
    def lucid(cls, size: int, strength: float = 1.0) -> Robustness:
        """Lucid's standard set scaled to an image of `size` pixels (pad and jitter in proportion to size) and
        multiplied by `strength` (0: identity, 1: Lucid's ranges)."""
        if not 0 <= strength <= 4:
            raise UserError(f"inversion: robustness {strength!r} must be a number from 0 (off) to 4 (1 = Lucid's)")
        px = size / REFERENCE_SIZE * strength
        return cls(pad=round(REFERENCE["pad"] * px), jitter=round(REFERENCE["jitter"] * px),
                   scale=REFERENCE["scale"] * strength, angle=REFERENCE["angle"] * strength)  # fmt: skip

    @property
    def identity(self) -> bool:
        return self.pad == 0 and self.jitter == 0 and self.scale == 0 and self.angle == 0

    def draw(self, generator: torch.Generator) -> tuple[float, float, float, float]:
        """One random transform: (shift x, shift y in pixels, scale, angle in degrees)."""
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        dx, dy = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=generator).tolist()
        return float(dx), float(dy), 1 + self.scale * (2 * u[0] - 1), self.angle * (2 * u[1] - 1)

    def __call__(self, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Apply one random transform per image of x [B, 3, H, W]: [B, 3, H + 2 pad, W + 2 pad]; x itself when
        the ranges are all zero."""
        if self.identity:
            return x
        x = F.pad(x, [self.pad] * 4, value=0.5) if self.pad else x
        params = [self.draw(g) for g in generators]
        return warp(x, torch.tensor(params, dtype=x.dtype, device=x.device))


def warp(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Shift, scale and rotate each image of x [B, C, H, W] about its centre: params [B, 4] = (shift x, shift y in
    pixels, scale, angle in degrees counter-clockwise as displayed); bilinear sampling, grey (0.5) outside."""
    b, _, h, w = x.shape
    dx, dy, s, deg = params.unbind(1)
    a = -deg * math.pi / 180  # sampling rotates backwards
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # output pixel p samples the input at c + R(-angle) (p - c - t) / s; written in affine_grid's normalised
    # coordinates (x to the right, y downwards, each axis -1..1, hence the aspect-ratio factors)
    tx, ty = -2 * dx / w, -2 * dy / h
    theta = torch.stack([
        torch.stack([cos, sin * h / w, cos * tx + sin * ty * h / w], 1),
        torch.stack([-sin * w / h, cos, -sin * tx * w / h + cos * ty], 1),
    ], 1)  # fmt: skip
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
