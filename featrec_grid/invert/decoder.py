"""Feed-forward inversion (seed 004, scaled down): a generator from a classifier's logits plus noise z to images,
conditioned through conditional batch norm (BigGAN's class-conditional BN with the class embedding replaced by an
embedding of the logits), trained on (logits, image) pairs; optional hinge-loss projection discriminator."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from featrec_grid.errors import UserError
from featrec_grid.invert.pixels import resize

CONDITIONS = ("logits", "standardised", "log_softmax", "onehot")
LOSSES = ("l1", "hinge", "l1+hinge")


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder size and training. `loss`: "l1" (reconstruction only; OUR addition, not the paper's), "hinge"
    (projection-discriminator GAN only, as the paper's BigGAN), "l1+hinge". `max_seconds` stops training early
    (a guard; the epochs actually run are reported)."""

    size: int = 16
    z_dim: int = 16
    embed_dim: int = 64
    channels: int = 32
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    loss: str = "l1"
    adv_weight: float = 0.05
    seed: int = 0
    max_seconds: float | None = 90.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"decoder config: loss '{self.loss}' is not one of {', '.join(LOSSES)}")
        if self.size < 4 or self.size & (self.size - 1):
            raise UserError(f"decoder config: size {self.size} must be a power of two >= 4")


class Conditioning(nn.Module):
    """Logits [N, C] -> conditioning vector [N, C]: raw logits, logits standardised per class with train statistics,
    log-softmax, or the one-hot argmax (the control: class identity only)."""

    def __init__(self, mode: str, train_logits: torch.Tensor) -> None:
        super().__init__()
        if mode not in CONDITIONS:
            raise UserError(f"decoder: condition '{mode}' is not one of {', '.join(CONDITIONS)}")
        self.mode = mode
        self.register_buffer("mean", train_logits.mean(0))
        self.register_buffer("std", train_logits.std(0).clamp_min(1e-6))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mode == "standardised":
            return (z - self.mean) / self.std
        if self.mode == "log_softmax":
            return torch.log_softmax(z, dim=1)
        if self.mode == "onehot":
            return F.one_hot(z.argmax(1), z.shape[1]).to(z.dtype)
        return z


class ConditionalBN(nn.Module):
    """BatchNorm without its own affine; gain 1 + g(e) and bias b(e) from the conditioning embedding (BigGAN style)."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Linear(cond_dim, channels)
        self.bias = nn.Linear(cond_dim, channels)
        for lin in (self.gain, self.bias):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * (1 + self.gain(e))[:, :, None, None] + self.bias(e)[:, :, None, None]


class UpBlock(nn.Module):
    """Nearest x2 upsample, 3x3 conv, conditional BN, ReLU."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = ConditionalBN(c_out, cond_dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=2, mode="nearest")), e))


class Generator(nn.Module):
    """(conditioning vector [N, C], z [N, z_dim]) -> images [N, 3, size, size] in [0, 1]. `embed` is the
    conditioning input layer (BigGAN's shared class embedding); everything after it sees [embed, z]."""

    def __init__(self, cond_dim: int, cfg: DecoderConfig) -> None:
        super().__init__()
        e, ch = cfg.embed_dim, cfg.channels
        self.embed = nn.Sequential(nn.Linear(cond_dim, e), nn.ReLU(), nn.Linear(e, e))
        self.stem = nn.Linear(cfg.z_dim + e, ch * 16)
        self.stem_norm = ConditionalBN(ch, cfg.z_dim + e)
        chans = [ch // 2**i for i in range(int(math.log2(cfg.size // 4)) + 1)]
        self.blocks = nn.ModuleList(UpBlock(a, b, cfg.z_dim + e) for a, b in zip(chans, chans[1:], strict=False))
        self.out = nn.Conv2d(chans[-1], 3, 3, padding=1)
        self.channels = ch

    def forward(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        e = torch.cat([self.embed(c), z], dim=1)
        h = F.relu(self.stem_norm(self.stem(e).view(len(c), self.channels, 4, 4), e))
        for block in self.blocks:
            h = block(h, e)
        return torch.sigmoid(self.out(h))


class ProjectionDiscriminator(nn.Module):
    """Spectral-normalised conv net with a projection head (Miyato & Koyama 2018): D(x, c) = psi(phi(x)) + <E c, phi(x)>."""

    def __init__(self, cond_dim: int, cfg: DecoderConfig) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = []
        c_in, size = 3, cfg.size
        for c_out in (ch // 2, ch):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c_in, size = c_out, size // 2
        self.phi = nn.Sequential(*layers)
        self.psi = spectral_norm(nn.Linear(ch, 1))
        self.proj = spectral_norm(nn.Linear(cond_dim, ch, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.phi(x * 2 - 1).sum(dim=(2, 3))
        return self.psi(h).squeeze(1) + (self.proj(c) * h).sum(1)


class LogitDecoder(nn.Module):
    """A trained decoder: conditioning transform + generator. `decode(logits)` uses z = 0 unless a seed is given."""

    def __init__(self, conditioning: Conditioning, generator: Generator, cfg: DecoderConfig, info: dict) -> None:
        super().__init__()
        self.conditioning, self.generator, self.cfg, self.info = conditioning, generator, cfg, info

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @torch.no_grad()
    def decode(self, logits: torch.Tensor, seed: int | None = None, batch_size: int = 512) -> torch.Tensor:
        """Images [N, 3, size, size] in [0, 1] from raw logits [N, C]; z = 0 (the noise mean) or seeded N(0, 1)
        (drawn on the CPU). Runs on the decoder's device, returns CPU tensors."""
        self.eval()
        n, device = len(logits), self.device
        if seed is None:
            z = torch.zeros(n, self.cfg.z_dim)
        else:
            z = torch.randn(n, self.cfg.z_dim, generator=torch.Generator().manual_seed(int(seed)))
        out = [
            self.generator(
                self.conditioning(logits[i : i + batch_size].to(device).float()), z[i : i + batch_size].to(device)
            ).cpu()
            for i in range(0, n, batch_size)
        ]
        return torch.cat(out)


def build_decoder(train_logits: torch.Tensor, condition: str, cfg: DecoderConfig) -> LogitDecoder:
    """An untrained decoder (seeded by cfg.seed): the starting point of training and the untrained-decoder baseline."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        gen = Generator(train_logits.shape[1], cfg)
    return LogitDecoder(Conditioning(condition, train_logits.float()), gen, cfg, {"condition": condition})


def fit_decoder(
    train_logits: torch.Tensor, train_images: torch.Tensor, condition: str, cfg: DecoderConfig | None = None,
    device: str | torch.device = "cpu",
) -> LogitDecoder:  # fmt: skip
    """Train a decoder on (logits [N, C], images [N, 3, h, w] in [0, 1]); images are resized to cfg.size.
    Conditioning "onehot" gives the control decoder: the same architecture seeing only the argmax class.
    Trains on `device` ("cuda" or "cpu"); weights are initialised and batches and noise drawn on the CPU from
    cfg.seed, so only floating-point rounding differs between devices. The decoder stays on `device`."""
    cfg = cfg or DecoderConfig()
    if len(train_logits) != len(train_images) or len(train_logits) < 2:
        raise UserError(
            f"decoder: need matching logits and images, at least 2 (got {len(train_logits)} and {len(train_images)})"
        )
    if not torch.isfinite(train_logits).all():
        raise UserError("decoder: training logits contain NaN or inf")
    device = torch.device(device)
    dec = build_decoder(train_logits, condition, cfg).to(device)
    gen = dec.generator
    targets = resize(train_images.float(), cfg.size).to(device)
    cond = dec.conditioning(train_logits.to(device).float())
    adversarial = cfg.loss != "l1"
    rng = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        disc = ProjectionDiscriminator(cond.shape[1], cfg).to(device) if adversarial else None
    betas = (0.5, 0.999) if adversarial else (0.9, 0.999)
    opt_g = torch.optim.Adam(gen.parameters(), cfg.lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), cfg.lr, betas=betas) if disc else None
    t0, epochs_run, l1_last = time.perf_counter(), 0, float("nan")
    gen.train()
    for _ in range(cfg.epochs):
        if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
            break
        perm = torch.randperm(len(targets), generator=rng)
        total, count = 0.0, 0
        for i in range(0, len(perm) - 1, cfg.batch_size):
            b = perm[i : i + cfg.batch_size]
            if len(b) < 2:
                continue
            x, c = targets[b.to(device)], cond[b.to(device)]
            fake = gen(c, torch.randn(len(b), cfg.z_dim, generator=rng).to(device))
            if disc is not None:
                loss_d = F.relu(1 - disc(x, c)).mean() + F.relu(1 + disc(fake.detach(), c)).mean()
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
            l1 = (fake - x).abs().mean()
            loss_g = l1 if cfg.loss != "hinge" else torch.zeros((), device=device)
            if disc is not None:
                loss_g = loss_g + (1.0 if cfg.loss == "hinge" else cfg.adv_weight) * -disc(fake, c).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            total, count = total + l1.item() * len(b), count + len(b)
        epochs_run, l1_last = epochs_run + 1, total / max(count, 1)
    gen.eval()
    dec.info.update(
        {"epochs": epochs_run, "seconds": time.perf_counter() - t0, "train_l1": l1_last, "device": str(device),
         **asdict(cfg)}
    )
    return dec
