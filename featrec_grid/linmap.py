"""Linear maps from one model's logits to another's features.

The closed form works from sufficient statistics accumulated batch by batch in float64, so memory is
O(C^2 + C*D) whatever the number of rows:

    f^ = A z + c,   A = S_zf' (S_zz + alpha I)^-1,   c = mean_f - A mean_z

with S the centered scatter matrices. Centering leaves the bias unpenalised, exactly as ridge with an
intercept. S_zz depends on the source only: one eigendecomposition serves every target and every alpha
(and alpha = 0 becomes the minimum-norm least-squares solution when S_zz is singular). The seed's SGD
recipe is `fit_sgd`, kept as the reference the closed form is measured against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class LinearMap:
    """f^ = z @ weight.T + bias, with weight [D, C] and bias [D] (torch.nn.Linear's layout)."""

    weight: np.ndarray
    bias: np.ndarray

    def predict(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z)
        out = z @ self.weight.T.astype(z.dtype, copy=False)
        out += self.bias.astype(z.dtype, copy=False)
        return out


@dataclass
class Moments:
    """Streaming count, means and centered cross-scatter sum (x - mx)'(y - my) in float64 (Chan's merge).

    With `y` omitted it accumulates the scatter of x with itself. `syy` is trace((y - my)'(y - my)).
    """

    n: int
    mean_x: np.ndarray
    mean_y: np.ndarray
    sxy: np.ndarray
    syy: float = 0.0

    @classmethod
    def empty(cls, dim_x: int, dim_y: int | None = None) -> Moments:
        dim_y = dim_x if dim_y is None else dim_y
        return cls(0, np.zeros(dim_x), np.zeros(dim_y), np.zeros((dim_x, dim_y)), 0.0)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray | None = None) -> Moments:
        """Moments of one batch."""
        same = y is None
        xc = np.array(x, dtype=np.float64)  # one float64 copy, centered in place
        yc = xc if same else np.array(y, dtype=np.float64)
        if xc.ndim != 2 or yc.ndim != 2 or len(xc) != len(yc):
            raise ValueError(f"x and y must be 2-D with equal rows, got {xc.shape} and {yc.shape}")
        mx = xc.mean(axis=0) if len(xc) else np.zeros(xc.shape[1])
        my = mx if same else (yc.mean(axis=0) if len(yc) else np.zeros(yc.shape[1]))
        xc -= mx
        if not same:
            yc -= my
        return cls(len(xc), mx, my, xc.T @ yc, float(np.einsum("ij,ij->", yc, yc)))

    def merge(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        dx = other.mean_x - self.mean_x
        dy = other.mean_y - self.mean_y
        w = self.n * other.n / n
        return Moments(
            n,
            self.mean_x + dx * (other.n / n),
            self.mean_y + dy * (other.n / n),
            self.sxy + other.sxy + w * np.outer(dx, dy),
            self.syy + other.syy + w * float(dy @ dy),
        )

    def update(self, x: np.ndarray, y: np.ndarray | None = None) -> Moments:
        """Return the moments with one more batch folded in."""
        return self.merge(Moments.of(x, y))


def accumulate(batches: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> Moments:
    """Fold (x, y) batches (y may be None for x with itself) into one Moments."""
    total: Moments | None = None
    for x, y in batches:
        m = Moments.of(x, y)
        total = m if total is None else total.merge(m)
    if total is None:
        raise ValueError("no rows to accumulate")
    return total


class RidgeSolver:
    """Ridge/least squares for one source: eigendecompose S_zz once, then solve any target and alpha cheaply."""

    def __init__(self, zz: Moments, rcond: float = 1e-10):
        if zz.n < 2:
            raise ValueError(f"need at least 2 rows to fit a map, got {zz.n}")
        self.n = zz.n
        self.mean_z = zz.mean_x
        evals, self.evecs = np.linalg.eigh(zz.sxy)
        self.evals = np.clip(evals, 0.0, None)
        self.cutoff = rcond * max(float(self.evals.max()), np.finfo(float).tiny)
        self.rank = int((self.evals > self.cutoff).sum())

    def solve(self, zf: Moments, alpha: float) -> LinearMap:
        """Map for the target whose cross-moments with this source are `zf` (same rows as the source stats)."""
        if zf.n != self.n:
            raise ValueError(f"source statistics cover {self.n} rows but the cross statistics {zf.n}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        denom = self.evals + alpha
        keep = denom > (self.cutoff if alpha == 0 else 0.0)
        inv = np.zeros_like(denom)
        inv[keep] = 1.0 / denom[keep]
        coef = self.evecs @ (inv[:, None] * (self.evecs.T @ zf.sxy))  # [C, D]
        weight = coef.T
        return LinearMap(weight, zf.mean_y - weight @ self.mean_z)


def sse(m: LinearMap, zf: Moments, zz: Moments) -> float:
    """Sum of squared residuals of `m` over the rows whose moments are `zf` (z with f) and `zz` (z with z)."""
    a = m.weight
    offset = zf.mean_y - a @ zf.mean_x - m.bias
    cross = float(np.einsum("dc,cd->", a, zf.sxy))
    quad = float(np.einsum("dc,dc->", a @ zz.sxy, a))
    return zf.syy - 2.0 * cross + quad + zf.n * float(offset @ offset)


def select_alpha(
    solver: RidgeSolver, fit_zf: Moments, val_zz: Moments, val_zf: Moments, alphas: Sequence[float]
) -> tuple[float, dict[float, float]]:
    """Choose alpha by mean squared error on held-out rows, all from moments; `solver` holds the fit rows' S_zz.

    Returns (best alpha, {alpha: held-out mse}); ties go to the larger alpha.
    """
    dim = len(val_zf.mean_y)
    scores = {float(a): sse(solver.solve(fit_zf, a), val_zf, val_zz) / (val_zf.n * dim) for a in alphas}
    best = min(scores, key=lambda a: (scores[a], -a))
    return best, scores


def fit_sgd(
    z: np.ndarray,
    f: np.ndarray,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    momentum: float = 0.9,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "cpu",
) -> LinearMap:
    """The seed's recipe: torch.nn.Linear(C, D), MSE loss, SGD lr 0.1 momentum 0.9, batch 256, data order."""
    import torch

    torch.manual_seed(seed)
    zt = torch.tensor(np.asarray(z, dtype=np.float32), device=device)  # a copy: shards are read-only memory maps
    ft = torch.tensor(np.asarray(f, dtype=np.float32), device=device)
    layer = torch.nn.Linear(zt.shape[1], ft.shape[1]).to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.MSELoss()
    for _ in range(epochs):
        for start in range(0, len(zt), batch_size):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(layer(zt[start : start + batch_size]), ft[start : start + batch_size])
            loss.backward()
            opt.step()
    with torch.no_grad():
        return LinearMap(
            layer.weight.detach().cpu().double().numpy(), layer.bias.detach().cpu().double().numpy()
        )


def fit_ridge(z: np.ndarray, f: np.ndarray, alpha: float = 0.0) -> LinearMap:
    """Closed-form map from arrays in memory (the grid streams the same statistics from shards)."""
    return RidgeSolver(Moments.of(z)).solve(Moments.of(z, f), alpha)
