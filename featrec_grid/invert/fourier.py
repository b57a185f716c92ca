"""A Fourier-space image (Mordvintsev et al. 2018, Lucid's fft_image): the parameters are the real and imaginary
parts of each channel's 2-D spectrum in a decorrelated colour basis, scaled by 1/f^decay_power, so plain gradient
steps favour low frequencies (natural images' spectra fall off as ~1/f); a sigmoid maps the result into [0, 1]."""

from __future__ import annotations

import torch

from featrec_grid.invert.colour import from_rgb, to_rgb

# Lucid divides the spatial image by 4 ("reduces saturation"): with spectra initialised at sd 0.01 the start is
# a near-grey image; kept so our learning rates carry over from Lucid's.
SPATIAL_DIVISOR = 4.0


def frequencies(h: int, w: int) -> torch.Tensor:
    """Spatial frequency magnitude sqrt(fy^2 + fx^2) (cycles per pixel) of each rfft2 coefficient: [h, w // 2 + 1]."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fx**2 + fy**2)


def spectrum_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """Per-coefficient scale 1 / max(f, 1 / max(h, w))^decay_power [h, w // 2 + 1] (the DC term is capped at the
    lowest non-zero frequency)."""
    return 1.0 / frequencies(h, w).clamp_min(1.0 / max(h, w)) ** decay_power


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The inverse of the sigmoid, with p clamped into [eps, 1 - eps]."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class FourierImage(torch.nn.Module):
    """A batch of B images [B, 3, h, w] in [0, 1]: image = sigmoid(to_rgb(irfft2(scale * spectrum) / 4)), with
    `spectrum` [B, 3, h, w // 2 + 1, 2] (real, imaginary) the trainable parameter. `decorrelate=False` skips the
    colour basis (plain RGB spectra)."""

    def __init__(self, spectrum: torch.Tensor, h: int, w: int, decay_power: float = 1.0, decorrelate: bool = True):
        super().__init__()
        self.h, self.w, self.decorrelate = h, w, decorrelate
        self.spectrum = torch.nn.Parameter(spectrum)
        self.register_buffer("scale", spectrum_scale(h, w, decay_power).to(spectrum.dtype)[None, None, :, :, None])

    @classmethod
    def random(
        cls, seeds: list[int], size: int, sd: float = 0.01, decay_power: float = 1.0, decorrelate: bool = True
    ) -> FourierImage:
        """Spectra N(0, sd^2) per coefficient, image i drawn from seeds[i] (on the CPU, so a seed gives the same
        start everywhere)."""
        shape = (3, size, size // 2 + 1, 2)
        spectra = [sd * torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return cls(torch.stack(spectra), size, size, decay_power, decorrelate)

    @classmethod
    def from_image(cls, images: torch.Tensor, decay_power: float = 1.0, decorrelate: bool = True) -> FourierImage:
        """The parameterisation whose image is `images` [B, 3, h, w] in (0, 1) (exactly, up to float rounding)."""
        h, w = images.shape[-2:]
        u = logit(images.double())
        t = (from_rgb(u) if decorrelate else u) * SPATIAL_DIVISOR
        spec = torch.fft.rfft2(t, norm="ortho") / spectrum_scale(h, w, decay_power)
        return cls(torch.view_as_real(spec).to(images.dtype), h, w, decay_power, decorrelate)

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex((self.scale * self.spectrum).contiguous())
        t = torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho") / SPATIAL_DIVISOR
        return torch.sigmoid(to_rgb(t) if self.decorrelate else t)
