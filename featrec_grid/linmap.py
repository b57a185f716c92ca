"""Linear maps from one model's logits to another's features.

The closed form works from sufficient statistics accumulated batch by batch in float64, so memory is
O(C^2 + C*D) whatever the number of rows:

    f^ = A z + c,   A = S_zf' (S_zz + alpha I)^-1,   c = mean_f - A mean_z

with S the centered scatter matrices. Centering leaves the bias unpenalised, exactly as ridge with an
intercept. S_zz depends on the source only: one eigendecomposition serves every target and every alpha
(and alpha = 0 becomes the minimum-norm least-squares solution when S_zz is singular). The seed's SGD
recipe is `fit_sgd`, kept as the reference the closed form is measured against.

At alpha = 0 a direction of the centered logits Zc counts as zero when its singular value is at or below the
larger of (1) numpy.linalg.lstsq's rule, eps * max(n, C) * s_max (eps = float64 machine epsilon, n rows,
C logits), and (2) the rounding of the stored logits, u * ||Z||_F (u = 2^-24 for the float32 shards, 2^-53 for
float64 input; Z uncentered as stored): a direction that small is not in the data, only in its rounding, and
fitting it amplifies that rounding (Lite0 at 32 px on digits has cond(Zc) = 1.5e9; fitting all 1000 directions
gave self agreement 0.989 and a worse test MSE, the 271 above the float32 floor give 1.0). For float64 input
the rule is lstsq's own, and the tests compare with numpy.linalg.lstsq directly. The primal form gets the
singular values from an R factor of the rows streamed beside S_zz (Moments.r), not from S_zz's eigenvalues,
whose float64 rounding would hide every direction below sqrt(eps) * s_max. The dual form eigendecomposes the
n x n kernel: (1) becomes eps * max(n, C) * l_max on its eigenvalues, the kernel's own rounding, so it resolves
singular values down to sqrt(eps * max(n, C)) * s_max. (An earlier fixed cutoff, eigenvalues below 1e-10 of
the largest, dropped real directions of ill-conditioned logits, e.g. cond(S_zz) ~ 1e10 on Lite1.)

When a source has fewer rows n than logits C (an ImageNet-21k head has C = 21,843: S_zz is 3.8 GB in
float64) the same maps come from the dual (kernel) form, `DualSolver`: with centered Zc [n, C] and
Fc [n, D], K = Zc Zc' [n, n] = U diag(l) U' once per source and, for any target and alpha,

    A' = Zc' U diag(1 / (l + alpha)) U' Fc,   c = mean_f - A mean_z

(alpha = 0 drops the eigenvalues at or below the cutoff: the minimum-norm least-squares solution,
pinv(Zc) Fc). The nonzero eigenvalues of K are those of S_zz, so both forms drop the same directions and
give the same predictions; the dual needs O(n^2 + n*C + n*D) memory and never forms a C x C array.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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

    With `y` omitted it accumulates the scatter of x with itself, and also `r`, an R factor of the centered rows
    (sxy = r' r) merged the same way (QR of the stacked factors plus the mean-shift row): its singular values are
    those of the centered x itself, so small directions are not lost in the rounding of the squared Gram.
    `syy` is trace((y - my)'(y - my)).
    """

    n: int
    mean_x: np.ndarray
    mean_y: np.ndarray
    sxy: np.ndarray
    syy: float = 0.0
    r: np.ndarray | None = None
    unit: float = 0.0  # unit roundoff of the stored x (2^-24 for float32 shards), the largest over merged batches

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
        r = np.linalg.qr(xc, mode="r") if same else None
        syy = float(np.einsum("ij,ij->", yc, yc))
        return cls(len(xc), mx, my, xc.T @ yc, syy, r, unit_roundoff(np.asarray(x).dtype))

    def merge(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        dx = other.mean_x - self.mean_x
        dy = other.mean_y - self.mean_y
        w = self.n * other.n / n
        r = None
        if self.r is not None and other.r is not None:
            r = np.linalg.qr(np.vstack([self.r, other.r, np.sqrt(w) * dx[None, :]]), mode="r")
        return Moments(
            n,
            self.mean_x + dx * (other.n / n),
            self.mean_y + dy * (other.n / n),
            self.sxy + other.sxy + w * np.outer(dx, dy),
            self.syy + other.syy + w * float(dy @ dy),
            r,
            max(self.unit, other.unit),
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

    def __init__(self, zz: Moments, rcond: float | None = None):
        if zz.n < 2:
            raise ValueError(f"need at least 2 rows to fit a map, got {zz.n}")
        self.n = zz.n
        self.mean_z = zz.mean_x
        dim = len(zz.mean_x)
        floor = stored_floor(zz.unit, float(np.trace(zz.sxy)) + zz.n * float(zz.mean_x @ zz.mean_x))
        if zz.r is not None:  # singular values of the centered rows themselves: numpy lstsq's accuracy and rule
            _, sv, vt = np.linalg.svd(zz.r, full_matrices=True)
            self.evecs, self.evals = vt.T, np.zeros(dim)
            self.evals[: len(sv)] = sv**2
            self.cutoff = eigen_cutoff(sv, self.n, dim, rcond, floor) ** 2
        else:
            evals, self.evecs = np.linalg.eigh(zz.sxy)
            self.evals = np.clip(evals, 0.0, None)
            self.cutoff = eigen_cutoff(self.evals, self.n, dim, rcond, floor**2, gram=True)
        self.rank = int((self.evals > self.cutoff).sum())

    def solve(self, zf: Moments, alpha: float) -> LinearMap:
        """Map for the target whose cross-moments with this source are `zf` (same rows as the source stats)."""
        if zf.n != self.n:
            raise ValueError(f"source statistics cover {self.n} rows but the cross statistics {zf.n}")
        inv = spectral_inverse(self.evals, alpha, self.cutoff)
        coef = self.evecs @ (inv[:, None] * (self.evecs.T @ zf.sxy))  # [C, D]
        weight = coef.T
        return LinearMap(weight, zf.mean_y - weight @ self.mean_z)


def unit_roundoff(dtype: np.dtype) -> float:
    """Half a unit in the last place of a floating dtype (2^-24 for float32); 0 for integers."""
    return float(np.finfo(dtype).eps) / 2 if np.issubdtype(dtype, np.floating) else 0.0


def stored_floor(unit: float, sum_squares: float) -> float:
    """Singular values of the centered logits at or below unit * ||Z||_F (Z as stored, uncentered) are within the
    rounding of the stored values themselves: a bound on the Frobenius norm of that rounding."""
    return unit * float(np.sqrt(max(sum_squares, 0.0)))


def eigen_cutoff(
    values: np.ndarray, rows: int, dim: int, rcond: float | None = None, floor: float = 0.0, gram: bool = False
) -> float:
    """Values at or below this count as zero at alpha = 0. With rcond None: the larger of numpy lstsq's
    eps * max(rows, dim) * the largest value and `floor` (the stored data's rounding, stored_floor; squared by
    the caller for eigenvalues). Applied to singular values of the rows (primal form, from their R factor) or,
    with `gram`, to eigenvalues of a float64 Gram (dual form), where eps * max(rows, dim) * the largest
    eigenvalue is the Gram's own rounding. An explicit rcond means rcond * the largest, nothing else."""
    top = max(float(np.max(values, initial=0.0)), np.finfo(float).tiny)
    if rcond is not None:
        return rcond * top
    return max(np.finfo(np.float64).eps * max(rows, dim) * top, floor)


def spectral_inverse(evals: np.ndarray, alpha: float, cutoff: float) -> np.ndarray:
    """1 / (eigenvalue + alpha), shared by the primal and dual solvers; at alpha = 0 eigenvalues at or below
    `cutoff` are dropped (the minimum-norm least-squares solution)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    denom = evals + alpha
    keep = denom > (cutoff if alpha == 0 else 0.0)
    inv = np.zeros_like(denom)
    inv[keep] = 1.0 / denom[keep]
    return inv


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


_COLUMN_BLOCK = 2048  # logit columns per block when a subset's rows are read in place


class DualSolver:
    """Ridge/least squares for one source in the dual form: eigendecompose the n x n kernel once, then solve any
    target's features (rows in the same order as the logits) and any alpha. For n < C; memory O(n^2 + n*C).

    `subset(rows)` gives the solver of some of these rows (the fit part of an alpha search) without copying
    the logits again, and `project` the held-out rows' basis that `select_alpha_dual` scores them with.
    """

    def __init__(self, z: np.ndarray, rcond: float | None = None):
        data = np.array(z, dtype=np.float64)  # one float64 copy [n, C], centered in place, shared by subsets
        if data.ndim != 2:
            raise ValueError(f"logits must be 2-D, got shape {data.shape}")
        mean = data.mean(axis=0) if len(data) else np.zeros(data.shape[1])
        data -= mean
        self.unit = unit_roundoff(np.asarray(z).dtype)
        self._setup(data, mean, None, data @ data.T, rcond)

    def _setup(
        self, data: np.ndarray, center: np.ndarray, rows: np.ndarray | None, kernel: np.ndarray, rcond: float | None
    ):
        """`data`: all rows read, centered on `center`; this solver's rows are data[rows] (all when None) and
        `kernel` is their Gram after centering them on their own mean."""
        self.n = len(data) if rows is None else len(rows)
        if self.n < 2:
            raise ValueError(f"need at least 2 rows to fit a map, got {self.n}")
        self._data, self._center, self._rows, self.rcond = data, center, rows, rcond
        if rows is None:
            self.mean_z = center
        else:
            weights = np.zeros(len(data))
            np.add.at(weights, rows, 1.0 / self.n)
            self.mean_z = center + weights @ data  # the subset's mean without gathering its [n, C] rows
        evals, self.evecs = np.linalg.eigh(kernel)
        self.evals = np.clip(evals, 0.0, None)
        floor = stored_floor(self.unit, float(np.trace(kernel)) + self.n * float(self.mean_z @ self.mean_z))
        self.cutoff = eigen_cutoff(self.evals, self.n, data.shape[1], rcond, floor**2, gram=True)
        self.rank = int((self.evals > self.cutoff).sum())

    @property
    def dim(self) -> int:
        """C, the number of logits."""
        return self._data.shape[1]

    def _cross(self, a: np.ndarray) -> np.ndarray:
        """a @ data[rows]' [m, n], by blocks of columns so that no [n, C] copy of the rows is made."""
        if self._rows is None:
            return a @ self._data.T
        out = np.zeros((len(a), self.n))
        for j in range(0, self.dim, _COLUMN_BLOCK):
            out += a[:, j : j + _COLUMN_BLOCK] @ self._data[self._rows, j : j + _COLUMN_BLOCK].T
        return out

    def subset(self, rows: np.ndarray) -> DualSolver:
        """The solver of some of these rows (a boolean mask or indices into them), sharing the logits: no copy."""
        rows = np.asarray(rows)
        picked = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        if rows.dtype == bool and len(rows) != self.n:
            raise ValueError(f"row mask has {len(rows)} entries for {self.n} rows")
        if self._rows is not None:
            picked = self._rows[picked]
        kernel = np.zeros((len(picked), len(picked)))
        for j in range(0, self.dim, _COLUMN_BLOCK):
            block = self._data[picked, j : j + _COLUMN_BLOCK]
            kernel += block @ block.T
        kernel -= kernel.mean(axis=0, keepdims=True)  # H K H: the Gram of the rows centered on their own mean
        kernel -= kernel.mean(axis=1, keepdims=True)
        out = DualSolver.__new__(DualSolver)
        out.unit = self.unit
        out._setup(self._data, self._center, picked, kernel, self.rcond)
        return out

    def _inverse(self, alpha: float) -> np.ndarray:
        return spectral_inverse(self.evals, alpha, self.cutoff)

    def _targets(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean_f, U' Fc) of a target's features, rows in this solver's order."""
        f = np.asarray(f)
        if f.ndim != 2 or len(f) != self.n:
            raise ValueError(f"features must be [{self.n}, D] in the source's row order, got shape {f.shape}")
        fc = np.array(f, dtype=np.float64)
        mean_f = fc.mean(axis=0)
        fc -= mean_f
        return mean_f, self.evecs.T @ fc

    def solve(self, f: np.ndarray, alpha: float) -> LinearMap:
        """Map for the target whose features on this solver's rows (same order) are `f` [n, D]."""
        mean_f, proj = self._targets(f)
        dual = self.evecs @ (self._inverse(alpha)[:, None] * proj)  # [n, D]
        dual -= dual.mean(axis=0)  # H M (already so but for rounding): then M' data[rows] = M' H data[rows] = M' Zc
        if self._rows is None:
            weight = dual.T @ self._data
        else:
            full = np.zeros((len(self._data), dual.shape[1]))
            full[self._rows] = dual  # no gather of the [n, C] rows: scatter the n x D coefficients instead
            weight = full.T @ self._data
        return LinearMap(weight, mean_f - weight @ self.mean_z)

    def project(self, z: np.ndarray) -> np.ndarray:
        """Basis of new rows z [m, C]: (z - mean_z) Zc' U [m, n], so predictions are basis diag(1/(l+alpha)) U' Fc + mean_f."""
        zc = np.array(z, dtype=np.float64)
        if zc.ndim != 2 or zc.shape[1] != self.dim:
            raise ValueError(f"logits must be [m, {self.dim}], got shape {zc.shape}")
        zc -= self.mean_z
        cross = self._cross(zc)  # (z - mean_z) data[rows]'  [m, n]
        cross -= cross.mean(axis=1, keepdims=True)  # right-multiplied by H: Zc = H data[rows]
        return cross @ self.evecs

    def predict_basis(
        self, basis: np.ndarray, f: np.ndarray, alphas: Sequence[float]
    ) -> Iterator[np.ndarray]:
        """Predictions for the rows of `basis` (from `project`) of the map fitted to `f`, for each alpha in turn."""
        mean_f, proj = self._targets(f)
        for a in alphas:
            yield basis @ (self._inverse(float(a))[:, None] * proj) + mean_f


def select_alpha_dual(
    solver: DualSolver, fit_f: np.ndarray, val_basis: np.ndarray, val_f: np.ndarray, alphas: Sequence[float]
) -> tuple[float, dict[float, float]]:
    """`select_alpha` for the dual form: `solver` holds the fit rows, `fit_f` their features (same order),
    `val_basis` = solver.project(held-out logits) and `val_f` the held-out features.

    Returns (best alpha, {alpha: held-out mse}); ties go to the larger alpha.
    """
    val_f = np.asarray(val_f, dtype=np.float64)
    if val_f.ndim != 2 or len(val_f) == 0 or len(val_f) != len(val_basis):
        raise ValueError(
            f"need held-out features [m > 0, D] matching the basis' {len(val_basis)} rows, got {val_f.shape}"
        )
    alphas = [float(a) for a in alphas]
    preds = solver.predict_basis(val_basis, fit_f, alphas)
    scores = {a: float(((val_f - p) ** 2).sum()) / val_f.size for a, p in zip(alphas, preds, strict=True)}
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


def fit_ridge_dual(z: np.ndarray, f: np.ndarray, alpha: float = 0.0) -> LinearMap:
    """`fit_ridge` in the dual form: the same map, cheaper when rows < logits."""
    return DualSolver(z).solve(f, alpha)
