"""Optimisation of parameterised images (Fourier with decorrelated colour, phase-only): Adam on the parameters,
each step through random transformation robustness. The pixel parameterisation (the seed's normalised gradient
steps with Gaussian blur and jitter) stays in optimise.invert_many; `invert_parameterised` dispatches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from featrec_grid.errors import UserError
from featrec_grid.invert.fourier import FourierImage
from featrec_grid.invert.maco import PhaseImage
from featrec_grid.invert.optimise import InversionResult, Objective, prepare
from featrec_grid.invert.pixels import device_of
from featrec_grid.invert.robust import Robustness

PARAMETERISATIONS = ("pixels", "fourier", "phase")


def image_module(parameterisation: str, seeds: Sequence[int], size: int, decay_power: float = 1.0) -> torch.nn.Module:
    """The seeded starting images of a spectral parameterisation: a module whose forward() is [B, 3, size, size]."""
    if parameterisation == "fourier":
        return FourierImage.random(list(seeds), size, decay_power=decay_power)
    if parameterisation == "phase":
        return PhaseImage.random(list(seeds), size, decay_power=decay_power)
    raise UserError(f"inversion: parameterisation {parameterisation!r} is not one of {', '.join(PARAMETERISATIONS[1:])}"
                    " (pixels run through optimise.invert_many)")  # fmt: skip


def invert_spectral(
    objective: Objective,
    seeds: Sequence[int],
    parameterisation: str,
    *,
    steps: int = 200,
    lr: float = 0.05,
    robustness: float = 1.0,
    decay_power: float = 1.0,
    size: int | None = None,
) -> list[InversionResult]:
    """Invert from several seeded starts at once in a spectral parameterisation: Adam (step size `lr`) on its
    parameters; each step every image passes through its own random transform (robust.Robustness.lucid(size,
    robustness)) before the objective. Adam is per-coordinate, so an image does not depend on the rest of the
    batch. Runs on the first classifier's device; images come back on the CPU."""
    size = prepare(objective, seeds, steps, size)
    image = image_module(parameterisation, seeds, size, decay_power).to(device_of(objective.classifiers[0]))
    with torch.no_grad():
        starts = image().cpu()
    transform = Robustness.lucid(size, robustness)
    gens = [torch.Generator().manual_seed(20_000 + int(s)) for s in seeds]
    opt = torch.optim.Adam(image.parameters(), lr=lr)
    losses: list[torch.Tensor] = []
    for _ in range(steps):
        loss = objective.loss(transform(image(), gens))
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        losses.append(loss.detach())
    with torch.no_grad():
        final = image()
        losses.append(objective.loss(final))
    hist = torch.stack(losses).T.cpu()
    final = final.detach().cpu()
    return [
        InversionResult(image=final[i], start=starts[i], seed=int(s), history={"loss": hist[i].tolist()})
        for i, s in enumerate(seeds)
    ]
