"""Reconstruction metrics on arrays, plus a streaming accumulator that gives the same numbers batch by batch.

f: real features [n, D]; f_hat: reconstruction [n, D]; W [C, D], b [C]: the target's head.
- mse: mean over all n*D elements.
- mse_total_seed: the seed's "total" MSE, the sum over consecutive 256-row batches of each batch's mean.
- r2: 1 - sum||f - f^||^2 / sum||f - mean f||^2, pooled over all dimensions.
- agreement: fraction of rows where argmax(W f^ + b) == argmax(W f + b).
- accuracy_real / accuracy_recon: the head's top-1 accuracy against the labels on f and on f^.
- cosine: mean over rows of cos(f, f^).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SEED_BATCH = 256


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


@dataclass
class PairMetrics:
    """Accumulates every metric above over batches in data order; `result()` equals the array functions."""

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
    dims: int = field(init=False, default=0)

    def update(self, f: np.ndarray, f_hat: np.ndarray, labels: np.ndarray | None = None) -> None:
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
        self.cos_sum += float(np.divide(num, den, out=np.zeros_like(num), where=den > 0).sum())

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
