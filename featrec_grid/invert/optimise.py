"""Optimisation-based inversion (seed 003): gradient steps on the input pixels, with Gaussian-blur smoothing,
jitter and annealed step size and blur, for class / combined / difference / match objectives."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from featrec_grid.errors import UserError
from featrec_grid.invert.pixels import device_of, embed, logits
from featrec_grid.models import Classifier

Classes = int | Sequence[int] | torch.Tensor
OBJECTIVES = ("logit", "log_softmax", "zscore")


def normalise(z: torch.Tensor, objective: str) -> torch.Tensor:
    """A model's output vectors z [N, C] in the units an objective compares: "logit" as they are (the seed's; their
    scale differs from model to model), "log_softmax" (log-probabilities, nats for every model) or "zscore" (each
    row standardised over its classes: (z - mean) / std). The last two need no per-model constant."""
    if objective == "logit":
        return z
    if objective == "log_softmax":
        return torch.log_softmax(z, dim=1)
    if objective == "zscore":
        return (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True).clamp_min(1e-12)
    raise UserError(f"inversion: objective {objective!r} is not one of {', '.join(OBJECTIVES)}")


@dataclass(frozen=True)
class Term:
    """One model's part of an objective: maximise weight * v[target_class], or minimise weight * L1 distance
    between v and the target's vector, where v = normalise(logits, objective). Targets are per image ([B] classes,
    [B, C] logits) with B = 1 broadcast to the batch."""

    classifier: Classifier
    weight: float
    target_class: torch.Tensor | None = None
    target_logits: torch.Tensor | None = None
    objective: str = "logit"

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image loss [N] of pixel images x [N, 3, H, W] (lower is better), on the classifier's device."""
        v = normalise(logits(self.classifier, x), self.objective)
        if self.target_logits is None:
            idx = self.target_class.to(v.device).expand(len(v)).unsqueeze(1)
            return -self.weight * v.gather(1, idx).squeeze(1)
        target = normalise(self.target_logits.to(v.device, v.dtype), self.objective)
        return self.weight * (v - target).abs().sum(1)


@dataclass(frozen=True)
class Objective:
    """A sum of terms. `target_class` [B]: the class each image should show; `natural` [B, 3, H, W]: the images a
    match target came from (for SSIM/PSNR); B = 1 means one objective shared by every seed."""

    kind: str
    terms: tuple[Term, ...]
    target_class: torch.Tensor
    natural: torch.Tensor | None = None

    @property
    def objective(self) -> str:
        """How the terms compare outputs (see normalise): the same for every term."""
        return self.terms[0].objective

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return sum(t.loss(x) for t in self.terms)

    @property
    def classifiers(self) -> list[Classifier]:
        return [t.classifier for t in self.terms]

    @property
    def batch(self) -> int:
        return len(self.target_class)


def _classes(clfs: Sequence[Classifier], target_class: Classes) -> torch.Tensor:
    c = torch.as_tensor(target_class, dtype=torch.long).reshape(-1)
    for clf in clfs:
        if len(c) == 0 or c.min() < 0 or c.max() >= clf.num_classes:
            raise UserError(
                f"inversion: target class(es) {c.tolist()} out of range for model '{clf.key}' (0..{clf.num_classes - 1})"
            )
    return c


def _objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise UserError(f"inversion: objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    return objective


def class_objective(clf: Classifier, target_class: Classes, objective: str = "logit") -> Objective:
    """Maximise one model's logit (or log-probability, z-score: see normalise) for `target_class` (an int, or one
    class per image)."""
    c = _classes([clf], target_class)
    return Objective("class", (Term(clf, 1.0, c, objective=_objective(objective)),), c)


def combined_objective(
    a: Classifier, b: Classifier, target_class: Classes, weights=(0.5, 0.5), objective: str = "logit"
) -> Objective:
    """Maximise a weighted sum of two models' logits for a class (the seed's 0.5 * (A + B)); with a normalised
    objective both terms are in the same units, so equal weights need no tuning."""
    c, o = _classes([a, b], target_class), _objective(objective)
    return Objective("combined", (Term(a, float(weights[0]), c, objective=o), Term(b, float(weights[1]), c, objective=o)), c)


def difference_objective(
    a: Classifier, b: Classifier, target_class: Classes, weights=(1.0, 1.0), objective: str = "logit"
) -> Objective:
    """Maximise model A's logit minus model B's for a class: what A sees in the class that B does not."""
    c, o = _classes([a, b], target_class), _objective(objective)
    return Objective("difference", (Term(a, float(weights[0]), c, objective=o), Term(b, -float(weights[1]), c, objective=o)), c)


def match_objective(
    clf: Classifier, target_logits: torch.Tensor, natural: torch.Tensor | None = None, weight: float = 1.0,
    objective: str = "logit",
) -> Objective:  # fmt: skip
    """Make `clf`'s logit vector match `target_logits` ([C], or [B, C] one per image) under an L1 loss (seed 003),
    both normalised first (see normalise); `natural` ([3, H, W] or [B, 3, H, W]) is kept for SSIM/PSNR."""
    t = torch.as_tensor(target_logits, dtype=torch.float32)
    t = t.reshape(1, -1) if t.dim() == 1 else t
    if t.dim() != 2 or t.shape[1] != clf.num_classes:
        raise UserError(
            f"inversion: match target of shape {tuple(t.shape)} does not give {clf.num_classes} logits per image "
            f"(model '{clf.key}')"
        )
    if not torch.isfinite(t).all():
        raise UserError(f"inversion: match target for model '{clf.key}' contains NaN or inf")
    if natural is not None:
        natural = natural.reshape(-1, *natural.shape[-3:])
    return Objective("match", (Term(clf, float(weight), target_logits=t, objective=_objective(objective)),), t.argmax(1),
                     natural)  # fmt: skip


def target_logits(clf: Classifier, images: torch.Tensor) -> torch.Tensor:
    """Logits of pixel images in [0, 1] ([3, H, W] -> [C], [B, 3, H, W] -> [B, C]): targets of match objectives."""
    return embed(clf, images)[0] if images.dim() == 4 else embed(clf, images.unsqueeze(0))[0][0]


@dataclass
class InversionResult:
    """One inverted image [3, H, W] in [0, 1], the starting noise it came from, and per-step history."""

    image: torch.Tensor
    start: torch.Tensor
    seed: int
    history: dict[str, list[float]] = field(default_factory=dict)


def start_noise(seed: int, size: int, mean: float = 0.5, scale: float = 0.1) -> torch.Tensor:
    """Seeded starting image [3, size, size]: mean + scale * N(0, 1), clamped to [0, 1]."""
    g = torch.Generator().manual_seed(int(seed))
    return (mean + scale * torch.randn(3, size, size, generator=g)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] (radius ceil(2 sigma), reflect padding); identity for sigma <= 0."""
    radius = min(math.ceil(2 * sigma), min(x.shape[-2:]) - 1)
    if sigma <= 0 or radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _anneal(pair: float | Sequence[float], t: float) -> float:
    a, b = (pair, pair) if isinstance(pair, int | float) else pair
    return float(a + (b - a) * t)


def prepare(objective: Objective, seeds: Sequence[int], steps: int, size: int | None) -> int:
    """What every inversion loop checks and sets first: steps >= 1, one or more seeds, per-image targets matching
    the seeds; the classifiers in eval mode. Returns the image size (`size`, else the largest classifier input)."""
    if steps < 1 or not seeds:
        raise UserError(f"inversion: need steps >= 1 and at least one seed (got steps={steps}, seeds={list(seeds)})")
    if objective.batch not in (1, len(seeds)):
        raise UserError(f"inversion: objective has {objective.batch} per-image targets but {len(seeds)} seeds")
    for clf in objective.classifiers:
        clf.backbone.eval()
    return int(size or max(c.input.size for c in objective.classifiers))


def invert_many(
    objective: Objective,
    seeds: Sequence[int],
    *,
    steps: int = 200,
    lr: float | Sequence[float] = (0.05, 0.005),
    blur_sigma: float | Sequence[float] = (1.0, 0.3),
    blur_every: int = 4,
    jitter: int = 1,
    size: int | None = None,
    noise_mean: float = 0.5,
    noise_scale: float = 0.1,
) -> list[InversionResult]:
    """Invert from several seeded starts at once: image i starts from seeds[i]'s noise and follows per-image
    target i of the objective (or the shared one). Each seed owns its noise and jitter, so an image does not depend
    on the rest of the batch. Each step: random roll by up to `jitter` pixels,
    gradient of the loss w.r.t. the pixels normalised by its mean absolute value, step of size lr (linearly annealed
    start -> end), Gaussian blur every `blur_every` steps (sigma annealed start -> end), clamp to [0, 1].
    Runs on the first classifier's device (see pixels.on_device; noise and jitter are drawn on the CPU, so a seed
    gives the same start everywhere); images come back on the CPU."""
    size = prepare(objective, seeds, steps, size)
    starts = torch.stack([start_noise(s, size, noise_mean, noise_scale) for s in seeds])
    gens = [torch.Generator().manual_seed(10_000 + int(s)) for s in seeds]
    x = starts.to(device_of(objective.classifiers[0]), copy=True)
    losses: list[torch.Tensor] = []
    for step in range(steps):
        t = step / max(steps - 1, 1)
        x.requires_grad_(True)
        if jitter > 0:
            shifts = [torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist() for g in gens]
            xin = torch.stack([torch.roll(xi, sh, dims=(1, 2)) for xi, sh in zip(x, shifts, strict=True)])
        else:
            xin = x
        loss = objective.loss(xin)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        losses.append(loss.detach())
        with torch.no_grad():
            grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            x = x.detach() - _anneal(lr, t) * grad
            if blur_every > 0 and step % blur_every == 0:
                x = gaussian_blur(x, _anneal(blur_sigma, t))
            x = x.clamp(0, 1)
    with torch.no_grad():
        final = objective.loss(x)
    hist = torch.stack([*losses, final]).T.cpu()
    x = x.detach().cpu()
    return [
        InversionResult(image=x[i], start=starts[i], seed=int(s), history={"loss": hist[i].tolist()})
        for i, s in enumerate(seeds)
    ]


def invert(objective: Objective, *, seed: int = 0, **kwargs) -> InversionResult:
    """Invert one objective from one seeded start; keyword arguments as `invert_many`."""
    return invert_many(objective, [seed], **kwargs)[0]


def untrained_copy(clf: Classifier, seed: int = 0) -> Classifier:
    """The same architecture with freshly initialised weights (every module's reset_parameters, N(0, 0.02) for
    parameters no module resets, BatchNorm running statistics reset) and a fresh linear head: the untrained control.
    Initialised on the CPU (the same weights whatever the device), then placed where `clf` is."""
    device = device_of(clf)
    backbone = copy.deepcopy(clf.backbone).cpu()
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        for m in backbone.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            elif any(True for _ in m.parameters(recurse=False)):
                for p in m.parameters(recurse=False):
                    torch.nn.init.normal_(p, std=0.02)
        head = torch.nn.Linear(clf.feature_dim, clf.num_classes)
    backbone.to(device).eval()
    return Classifier(
        key=f"{clf.key}~untrained",
        backbone=backbone,
        head_weight=head.weight.detach().clone().to(device),
        head_bias=head.bias.detach().clone().to(device),
        input=clf.input,
        weights_digest=f"untrained-seed{seed}",
        family=clf.family,
        info={**clf.info, "untrained_control_of": clf.key, "test_accuracy": None},
    )
