"""Reconstruction metrics on arrays, plus a streaming accumulator that gives the same numbers batch by batch.

f: real features [n, D]; f_hat: reconstruction [n, D]; W [C, D], b [C]: the target's head.
- mse: mean over all n*D elements.
- mse_total_seed: the seed's "total" MSE, the sum over consecutive 256-row batches of each batch's mean.
- r2: 1 - sum||f - f^||^2 / sum||f - mean f||^2, pooled over all dimensions.
- agreement: fraction of rows where argmax(W f^ + b) == argmax(W f + b).
- accuracy_real / accuracy_recon: the head's top-1 accuracy against the labels on f and on f^.
- cosine: mean over rows of cos(f, f^).

Bootstrap intervals resample test rows: resample r draws the rows `default_rng(seed).integers(0, n, (R, n))[r]`,
so every pair evaluated on the same n rows gets the same resamples and differences between pairs get intervals too.
Replicates come from per-row errors and hits (no refit); R2 re-estimates the feature mean in every resample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SEED_BATCH = 256
CI_LEVEL = 0.95
RESAMPLES = 1000
BOOTSTRAP_SEED = 0
INTERVAL_METRICS = ("agreement", "r2", "mse", "cosine", "accuracy_real", "accuracy_recon")


def mse(f: np.ndarray, f_hat: np.ndarray) -> float:
    return float(np.mean((np.asarray(f, np.float64) - f_hat) ** 2))


def mse_total_seed(f: np.ndarray, f_hat: np.ndarray, batch_size: int = SEED_BATCH) -> float:
    err = (np.asarray(f, np.float64) - f_hat) ** 2
    return float(sum(err[i : i + batch_size].mean() for i in range(0, len(err), batch_size)))


def r2(f: np.ndarray, f_hat: np.ndarray) -> float:
    f = np.asarray(f, np.float64)
    return float(1.0 - ((f - f_hat) ** 2).sum() / ((f - f.mean(axis=0)) ** 2).sum())


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits_a, axis=1) == np.argmax(logits_b, axis=1)))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def cosine(f: np.ndarray, f_hat: np.ndarray) -> float:
    f = np.asarray(f, np.float64)
    f_hat = np.asarray(f_hat, np.float64)
    num = np.einsum("ij,ij->i", f, f_hat)
    den = np.linalg.norm(f, axis=1) * np.linalg.norm(f_hat, axis=1)
    return float(np.mean(np.divide(num, den, out=np.zeros_like(num), where=den > 0)))


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[resamples, n] int32: how often row i is drawn in resample r (see the module docstring for the draws)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs rows and resamples, got n={n}, resamples={resamples}")
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    flat = (draws + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.int32)


def percentile_interval(replicates: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval (lo, hi) of `level` from replicate values (NaNs ignored)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must lie strictly between 0 and 1, got {level}")
    values = np.asarray(replicates, np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


@dataclass
class PairMetrics:
    """Accumulates every metric above over batches in data order; `result()` equals the array functions.

    With `counts` (resample_counts of the total rows) it also accumulates every resample's sums, so `replicates()`
    gives each metric per resample in one pass over the data."""

    head_weight: np.ndarray
    head_bias: np.ndarray
    with_labels: bool = True
    n: int = 0
    sq_err: float = 0.0
    seed_total: float = 0.0
    carry: float = 0.0
    carry_rows: int = 0
    sum_f: np.ndarray | None = None
    sum_ff: float = 0.0
    agree: int = 0
    correct_real: int = 0
    correct_recon: int = 0
    cos_sum: float = 0.0
    counts: np.ndarray | None = None
    dims: int = field(init=False, default=0)
    boot: dict[str, np.ndarray] = field(init=False, default_factory=dict)
    shift: np.ndarray | None = field(init=False, default=None)

    def update(self, f: np.ndarray, f_hat: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Add a batch of rows; returns the head's top-1 on the real and on the reconstructed features."""
        f = np.asarray(f, np.float64)
        f_hat = np.asarray(f_hat, np.float64)
        err = ((f - f_hat) ** 2).sum(axis=1)
        self.dims = f.shape[1]
        self.n += len(f)
        self.sq_err += float(err.sum())
        self._seed_batches(err)
        self.sum_f = f.sum(axis=0) if self.sum_f is None else self.sum_f + f.sum(axis=0)
        self.sum_ff += float(np.einsum("ij,ij->", f, f))
        w, b = self.head_weight.astype(np.float64), self.head_bias.astype(np.float64)
        pred_real = np.argmax(f @ w.T + b, axis=1)
        pred_recon = np.argmax(f_hat @ w.T + b, axis=1)
        self.agree += int((pred_real == pred_recon).sum())
        if self.with_labels and labels is not None:
            self.correct_real += int((pred_real == labels).sum())
            self.correct_recon += int((pred_recon == labels).sum())
        num = np.einsum("ij,ij->i", f, f_hat)
        den = np.linalg.norm(f, axis=1) * np.linalg.norm(f_hat, axis=1)
        cos = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        self.cos_sum += float(cos.sum())
        if self.counts is not None:
            per_row = {"sq_err": err, "agree": pred_real == pred_recon, "cos": cos}
            if self.with_labels and labels is not None:
                per_row |= {"real": pred_real == labels, "recon": pred_recon == labels}
            self._resample_sums(f, per_row)
        return pred_real, pred_recon

    def _resample_sums(self, f: np.ndarray, per_row: dict[str, np.ndarray]) -> None:
        """Add this batch's rows, weighted by how often each resample drew them, to every resample's sums."""
        start = self.n - len(f)
        if start + len(f) > self.counts.shape[1]:
            raise ValueError(f"more rows than the {self.counts.shape[1]} the resample counts were drawn for")
        w = self.counts[:, start : start + len(f)].astype(np.float64)
        if self.shift is None:
            self.shift = f.mean(axis=0)  # R2's sums of squares about a shift: exact for any shift, stable near the mean
        fc = f - self.shift
        sums = {k: w @ v.astype(np.float64) for k, v in per_row.items()}
        sums |= {"f": w @ fc, "ff": w @ np.einsum("ij,ij->i", fc, fc)}
        for k, v in sums.items():
            self.boot[k] = v if k not in self.boot else self.boot[k] + v

    def replicates(self) -> dict[str, np.ndarray]:
        """Every INTERVAL_METRICS entry per resample (accuracies only with labels); needs `counts`."""
        if self.counts is None or not self.boot:
            raise ValueError("no resample counts were given, or no rows were evaluated")
        if self.n != self.counts.shape[1]:
            raise ValueError(f"{self.n} rows were evaluated, the resample counts were drawn for {self.counts.shape[1]}")
        b, n = self.boot, self.n
        ss_tot = b["ff"] - np.einsum("ij,ij->i", b["f"], b["f"]) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            r2_values = np.where(ss_tot > 0, 1.0 - b["sq_err"] / ss_tot, np.nan)
        out = {"agreement": b["agree"] / n, "r2": r2_values, "mse": b["sq_err"] / (n * self.dims), "cosine": b["cos"] / n}
        if "real" in b:
            out |= {"accuracy_real": b["real"] / n, "accuracy_recon": b["recon"] / n}
        return out

    def intervals(self, level: float = CI_LEVEL) -> dict[str, float | None]:
        """`<metric>_lo` and `<metric>_hi` of the percentile bootstrap interval of every INTERVAL_METRICS entry
        (None for the accuracies without labels, as in `result()`)."""
        replicates = self.replicates()
        out: dict[str, float | None] = {}
        for metric in INTERVAL_METRICS:
            lo_hi = percentile_interval(replicates[metric], level) if metric in replicates else (None, None)
            out[f"{metric}_lo"], out[f"{metric}_hi"] = lo_hi
        return out

    def _seed_batches(self, row_err: np.ndarray) -> None:
        """Re-chunk row errors into the seed's 256-row batches, carrying a partial batch across updates."""
        i = 0
        while i < len(row_err):
            take = min(SEED_BATCH - self.carry_rows, len(row_err) - i)
            self.carry += float(row_err[i : i + take].sum())
            self.carry_rows += take
            i += take
            if self.carry_rows == SEED_BATCH:
                self.seed_total += self.carry / (SEED_BATCH * self.dims)
                self.carry, self.carry_rows = 0.0, 0

    def result(self) -> dict[str, float | None]:
        if self.n == 0:
            raise ValueError("no rows were evaluated")
        seed_total = self.seed_total
        if self.carry_rows:
            seed_total += self.carry / (self.carry_rows * self.dims)
        mean_f = self.sum_f / self.n
        ss_tot = self.sum_ff - self.n * float(mean_f @ mean_f)
        return {
            "mse": self.sq_err / (self.n * self.dims),
            "mse_total_seed": seed_total,
            "r2": 1.0 - self.sq_err / ss_tot if ss_tot > 0 else float("nan"),
            "agreement": self.agree / self.n,
            "cosine": self.cos_sum / self.n,
            "accuracy_real": self.correct_real / self.n if self.with_labels else None,
            "accuracy_recon": self.correct_recon / self.n if self.with_labels else None,
        }


def pair_metrics(
    f: np.ndarray,
    f_hat: np.ndarray,
    head_weight: np.ndarray,
    head_bias: np.ndarray,
    labels: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Every metric of one reconstruction, from arrays in memory."""
    acc = PairMetrics(head_weight, head_bias, with_labels=labels is not None)
    acc.update(f, f_hat, labels)
    return acc.result()
