"""Phase-only Fourier images (MaCo, Fel et al. 2023): the magnitude of each channel's spectrum is fixed to a
natural-image template and only the phase is optimised, so the image keeps a natural power spectrum throughout.

MaCo's template is the mean magnitude spectrum of ImageNet images, which is a download; here the template is the
1/f^decay_power law that such averages follow (no data). Each image is standardised (its phase, then its
decorrelated spatial image, to zero mean and unit variance) before the colour matrix and the sigmoid, as MaCo does."""

from __future__ import annotations

import torch

from featrec_grid.invert.colour import to_rgb
from featrec_grid.invert.fourier import spectrum_scale


def standardise(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Each batch item of x [B, ...] to zero mean and unit standard deviation (eps guards a constant item)."""
    dims = tuple(range(1, x.dim()))
    x = x - x.mean(dim=dims, keepdim=True)
    return x / (x.std(dim=dims, keepdim=True) + eps)


class PhaseImage(torch.nn.Module):
    """A batch of B images [B, 3, h, w] in [0, 1] from trainable phases [B, 3, h, w // 2 + 1] and a fixed
    magnitude template [3, h, w // 2 + 1]: sigmoid(to_rgb(standardise(irfft2(m * exp(i * standardise(phase))))))."""

    def __init__(self, phase: torch.Tensor, magnitude: torch.Tensor):
        super().__init__()
        self.phase = torch.nn.Parameter(phase)
        self.register_buffer("magnitude", magnitude)
        self.h = phase.shape[-2]
        self.w = 2 * (phase.shape[-1] - 1) if phase.shape[-1] > 1 else 1

    @classmethod
    def random(cls, seeds: list[int], size: int, decay_power: float = 1.0) -> PhaseImage:
        """Phases N(0, 1) per coefficient, image i drawn from seeds[i] (on the CPU); the 1/f template."""
        shape = (3, size, size // 2 + 1)
        phases = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        template = spectrum_scale(size, size, decay_power).float().expand(3, -1, -1).clone()
        image = cls(torch.stack(phases), template)
        image.w = size
        return image

    def decorrelated(self) -> torch.Tensor:
        """The standardised spatial image in the decorrelated colour basis, before to_rgb and the sigmoid."""
        p = standardise(self.phase)
        spec = torch.polar(self.magnitude.expand_as(p), p)
        return standardise(torch.fft.irfft2(spec, s=(self.h, self.w)))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(to_rgb(self.decorrelated()))
