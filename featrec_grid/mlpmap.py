"""A small nonlinear map from one model's logits to another's features, beside the linear one in linmap.py.

It answers whether a reconstruction failure is a limit of linearity or of the logits: if an MLP does no
better than the closed form, the information is not in the logits. The model is

    f^ = skip(z) + mlp(z)   (on inputs and outputs standardised with train statistics)

with `skip` a Linear(C, D) and `mlp` Linear(C, hidden), GELU, ..., Linear(hidden, D) whose last layer starts
at zero. The skip starts at the ridge fit of the train rows (strength chosen on the held-out rows), so epoch 0
is the regularised linear answer and
capacity only adds to it: the held-out MSE of that start is kept (info['init_val_mse']) and is the bar every
epoch must beat to be restored. AdamW on shuffled minibatches from a seeded generator; early stopping on
held-out rows (best epoch's weights restored), but not before `min_steps` optimizer steps: from a zero last
layer the hidden features only start to move after some ~1/lr Adam steps, and held-out error often rises a
little before it falls, so a patience counted in epochs alone stops small data sets at the linear answer.
Pure torch/numpy: no
Ray, no files; a search (Ray Tune, wired elsewhere) builds configs with `config_from` over `SEARCH_SPACE`
and passes `report` to receive each epoch's held-out MSE.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class MLPConfig:
    """Hyperparameters of `fit_mlp`; the defaults suit roughly 1k-50k rows."""

    hidden: int = 512
    depth: int = 1  # hidden layers; 0 leaves the linear skip alone
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10  # epochs without val improvement before stopping
    min_steps: int = 1000  # optimizer steps before early stopping may end the fit (Adam moves ~lr a step)
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject values no fit can use, naming the field and what is allowed."""
        lower = {"hidden": 1, "depth": 0, "batch_size": 1, "max_epochs": 1, "patience": 1, "min_steps": 0}
        for name, low in lower.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"MLP config {name}={value!r}: must be an integer >= {low}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"MLP config seed={self.seed!r}: must be an integer")
        if not (isinstance(self.lr, numbers.Real) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"MLP config lr={self.lr!r}: must be a finite number > 0")
        wd = self.weight_decay
        if not (isinstance(wd, numbers.Real) and math.isfinite(wd) and wd >= 0):
            raise UserError(f"MLP config weight_decay={wd!r}: must be a finite number >= 0")


SEARCH_SPACE: dict[str, list] = {
    "hidden": [256, 1024],
    "depth": [1, 2],
    "lr": [3e-4, 1e-3, 3e-3],
    "weight_decay": [0.0, 1e-4],
}
"""Candidate values per MLPConfig field for a hyperparameter search (a grid or tune.choice per key)."""

_INT_FIELDS = {"hidden", "depth", "batch_size", "max_epochs", "patience", "min_steps", "seed"}


def config_from(d: Mapping[str, Any]) -> MLPConfig:
    """Build an MLPConfig from a mapping (a Tune trial config, a spec block); unknown keys are a UserError."""
    allowed = [f.name for f in dataclasses.fields(MLPConfig)]
    if not isinstance(d, Mapping):
        raise UserError(f"MLP config must be a mapping of {allowed}, got {type(d).__name__}")
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise UserError(f"unknown MLP config key(s) {unknown}; allowed: {allowed}")
    values: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserError(f"MLP config {key}={value!r}: must be a number")
        if key in _INT_FIELDS:  # Tune and YAML may hand over 512.0 or numpy integers
            if not math.isfinite(float(value)) or float(value) != int(value):
                raise UserError(f"MLP config {key}={value!r}: must be an integer")
            values[key] = int(value)
        else:
            values[key] = float(value)
    return MLPConfig(**values)


class _Net(nn.Module):
    """f^ = skip(z) + mlp(z) in standardised units; the mlp's last layer starts at zero (None when depth is 0)."""

    def __init__(self, c: int, d: int, config: MLPConfig) -> None:
        super().__init__()
        self.skip = nn.Linear(c, d)
        layers: list[nn.Module] = []
        width = c
        for _ in range(config.depth):
            layers += [nn.Linear(width, config.hidden), nn.GELU()]
            width = config.hidden
        self.mlp: nn.Module | None = None
        if config.depth > 0:
            last = nn.Linear(width, d)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.mlp = nn.Sequential(*layers, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.skip(x)
        return out if self.mlp is None else out + self.mlp(x)


class MLPMap:
    """A fitted nonlinear map; `predict` has linmap.LinearMap's interface (float64 [N, D] in original units)."""

    def __init__(self, model, z_mean, z_std, f_mean, f_std, info: dict, batch_size: int = 4096):
        self.model = model
        self.z_mean, self.z_std = z_mean, z_std
        self.f_mean, self.f_std = f_mean, f_std
        self.info = info
        self.batch_size = batch_size

    def predict(self, z: np.ndarray) -> np.ndarray:
        """Map logits z [N, C] to features [N, D] in float64, batch by batch without gradients."""
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != len(self.z_mean):
            raise UserError(f"MLP map expects logits of shape [N, {len(self.z_mean)}], got {z.shape}")
        device = next(self.model.parameters()).device
        out = np.empty((len(z), len(self.f_mean)), dtype=np.float64)
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(z), self.batch_size):
                x = (z[i : i + self.batch_size].astype(np.float64) - self.z_mean) / self.z_std
                y = self.model(torch.as_tensor(x, dtype=torch.float32, device=device))
                out[i : i + len(x)] = y.cpu().double().numpy()
        out *= self.f_std
        out += self.f_mean
        return out


def _check(z: np.ndarray, f: np.ndarray, val: np.ndarray) -> None:
    """Raise a UserError naming the first problem with the arrays handed to fit_mlp."""
    if z.ndim != 2 or f.ndim != 2:
        raise UserError(f"fit_mlp needs 2-D z [N, C] and f [N, D], got z {z.shape} and f {f.shape}")
    if len(z) != len(f) or val.shape != (len(z),):
        raise UserError(
            f"fit_mlp needs z, f and the val mask with the same rows, got z {z.shape}, f {f.shape}, val {val.shape}"
        )
    if val.dtype != np.bool_:
        raise UserError(f"fit_mlp val must be a boolean mask of rows, got dtype {val.dtype}")
    if z.shape[1] < 1 or f.shape[1] < 1:
        raise UserError(f"fit_mlp needs at least 1 column in z and f, got z {z.shape} and f {f.shape}")
    n_val = int(val.sum())
    if len(z) - n_val < 2 or n_val < 1:
        raise UserError(
            f"fit_mlp needs at least 2 train rows and 1 val row, got {len(z) - n_val} train and {n_val} val rows"
        )
    for name, a in (("z", z), ("f", f)):
        if not np.issubdtype(a.dtype, np.number):
            raise UserError(f"fit_mlp {name} must be numeric, got dtype {a.dtype}")
        bad = ~np.isfinite(a)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise UserError(f"fit_mlp {name} has {int(bad.sum())} non-finite values (first in row {row})")


def _stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std in float64; constant columns get std 1 so they standardise to zero."""
    mean = a.mean(axis=0)
    std = a.std(axis=0)
    std[~(std > 1e-12 * np.maximum(1.0, np.abs(mean)))] = 1.0
    return mean, std


RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge strengths of the linear start, times the rows


def _ridge_start(
    x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, y_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weight [D, C] and bias [D] of the ridge fit y ~ x (standardised train rows, float64) whose strength from
    RIDGE_GRID has the lowest held-out MSE in original units (y_scale: the outputs' std): the regularised linear answer the MLP starts from (an unregularised
    start overfits when rows ~ C, e.g. 1,000 logits on 1,000 rows). One eigendecomposition serves every strength."""
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc = x - x_mean
    lam, vec = np.linalg.eigh(xc.T @ xc)
    proj = vec.T @ (xc.T @ (y - y_mean))  # [C, D] in the eigenbasis
    xv = (x_val - x_mean) @ vec
    best_err, best = float("inf"), proj / (lam.clip(min=0) + RIDGE_GRID[0] * len(x))[:, None]
    for r in RIDGE_GRID:
        coef = proj / (lam.clip(min=0) + r * len(x))[:, None]
        err = float(np.mean(((xv @ coef + y_mean - y_val) * y_scale) ** 2))
        if err < best_err:
            best_err, best = err, coef
    weight = (vec @ best).T
    return weight.astype(np.float32), (y_mean - weight @ x_mean).astype(np.float32)


def fit_mlp(
    z: np.ndarray,
    f: np.ndarray,
    val: np.ndarray,
    config: MLPConfig | None = None,
    report: Callable[[int, float], None] | None = None,
    *,
    device: str = "cpu",
) -> MLPMap:
    """Fit logits z [N, C] -> features f [N, D] on rows ~val, early-stopping on rows val (best weights kept).

    `report(epoch, val_mse)` (epochs from 1, MSE in original units averaged over rows and columns) is called
    after every epoch, e.g. by a Ray Tune trial. Deterministic for a given config.seed on CPU.
    """
    t0 = time.perf_counter()
    config = MLPConfig() if config is None else config
    z, f, val = np.asarray(z), np.asarray(f), np.asarray(val)
    _check(z, f, val)
    z_tr, f_tr = z[~val].astype(np.float64), f[~val].astype(np.float64)
    z_mean, z_std = _stats(z_tr)
    f_mean, f_std = _stats(f_tr)
    xs, ys = (z_tr - z_mean) / z_std, (f_tr - f_mean) / f_std
    x = torch.as_tensor(xs, dtype=torch.float32, device=device)
    y = torch.as_tensor(ys, dtype=torch.float32, device=device)
    f_val = f[val].astype(np.float64)
    z_val = z[val]

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(config.seed)
        model = _Net(z.shape[1], f.shape[1], config)
    # the skip starts at the held-out-chosen ridge fit, so training starts from the linear answer
    with torch.no_grad():
        weight, bias = _ridge_start(xs, ys, (z_val - z_mean) / z_std, (f_val - f_mean) / f_std, f_std)
        model.skip.weight.copy_(torch.as_tensor(weight))
        model.skip.bias.copy_(torch.as_tensor(bias))
    del z_tr, f_tr, xs, ys
    model.to(device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    fitted = MLPMap(model, z_mean, z_std, f_mean, f_std, {})

    n = len(x)
    init_mse = float(np.mean((fitted.predict(z_val) - f_val) ** 2))  # the linear start: epoch 0
    best_mse, best_epoch, best_state = init_mse, 0, copy.deepcopy(model.state_dict())
    epoch = steps = 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, config.batch_size):
            idx = order[i : i + config.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            steps += 1
        mse = float(np.mean((fitted.predict(z_val) - f_val) ** 2))
        if report is not None:
            report(epoch, mse)
        if mse < best_mse:
            best_mse, best_epoch = mse, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif not math.isfinite(mse) or (epoch - best_epoch >= config.patience and steps >= config.min_steps):
            break
    model.load_state_dict(best_state)
    model.eval()
    fitted.info = {
        "epochs": epoch,
        "steps": steps,
        "best_epoch": best_epoch,
        "best_val_mse": best_mse,
        "init_val_mse": init_mse,
        "val_rows": int(val.sum()),
        "train_rows": int(n),
        "seconds": time.perf_counter() - t0,
        "config": dataclasses.asdict(config),
    }
    return fitted
