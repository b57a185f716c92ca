"""Natural-image targets from the photos scikit-image ships inside its wheel (no download): name -> RGB image
[3, size, size] in [0, 1], centre-cropped to a square and resized."""

from __future__ import annotations

import numpy as np
import torch

from featrec_grid.errors import UserError
from featrec_grid.invert.pixels import resize

# skimage.data loaders of bundled colour photos; "motorcycle" is the left view of stereo_motorcycle.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle")


def _array(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def load_photo(name: str, size: int) -> torch.Tensor:
    """One bundled photo as [3, size, size] in [0, 1]: the central square crop, antialiased bilinear resize."""
    if name not in PHOTOS:
        raise UserError(f"inversion: photo {name!r} is not one of {', '.join(PHOTOS)} (scikit-image's bundled photos)")
    a = _array(name)
    h, w = a.shape[:2]
    m = min(h, w)
    a = a[(h - m) // 2 : (h - m) // 2 + m, (w - m) // 2 : (w - m) // 2 + m, :3]
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()[None] / 255.0
    return resize(x, size)[0].clamp(0, 1)
