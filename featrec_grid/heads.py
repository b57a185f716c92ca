"""Head analysis: why reconstructing features from a classifier's logits succeeds or fails.

The classifier's logits are z = W f + b, with W [C, D] the head weight, b [C] its bias and f [D] the
penultimate features. From the thin SVD W = U diag(s) V' (k = min(C, D) singular values):

- rank r = #{s > tol}; only the r directions of W's row space (the first r rows of V') reach the logits,
  the other D - r (W's null space) are invisible to them.
- pinv(W) = V_r diag(1/s_r) U_r', so f^ = pinv(W)(z - b) is the projection of f onto the row space;
  it is exact (f^ = f) when r = D, which needs C >= D.
- P = V_r V_r' projects onto the row space; the share of the test features' centered variance it keeps
  is ||P (F - mean)||^2 / ||F - mean||^2, which is what the pseudo-inverse can recover at best.

Only the thin SVD of W is taken, so nothing C x C is ever allocated (a 21,843 x 768 head takes seconds).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from featrec_grid import metrics
from featrec_grid.errors import UserError

ZERO_HEAD_TOL = 1e-12  # W counts as zero when max|W| <= ZERO_HEAD_TOL * max(1, max|b|)
LOGITS_RTOL = 1e-3  # logits are this head's when max|W f + b - z| <= LOGITS_RTOL * max(1, max|z|)
LARGE_C = 10_000  # above this many classes the reason notes the size of the C x C Gram


def _array(name: str, value: ArrayLike, shape: tuple[int | None, ...], allowed: str) -> np.ndarray:
    """`value` as a finite float64 array of the given shape (None = any size), or a UserError naming it."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name}: cannot be read as numbers ({exc}); allowed: {allowed}") from None
    if arr.ndim != len(shape) or any(w is not None and g != w for g, w in zip(arr.shape, shape, strict=True)):
        raise UserError(f"{name}: shape {arr.shape}; allowed: {allowed}")
    if 0 in arr.shape:
        raise UserError(f"{name}: shape {arr.shape} is empty; allowed: {allowed} with every size >= 1")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise UserError(f"{name}: {bad} non-finite value(s) (NaN or inf); allowed: finite values only")
    return arr


def _labels(value: ArrayLike, n: int) -> np.ndarray:
    """`value` as an integer array [n], or a UserError naming it."""
    arr = np.asarray(value)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"labels: shape {arr.shape}, dtype {arr.dtype}; allowed: integers of shape ({n},)")
    return arr


def _reason(c: int, d: int, rank: int, zero_head: bool, rowspace_variance: float) -> str:
    """One or two plain-language sentences on what the head lets a reconstruction recover."""
    if zero_head:
        reason = "the head is all zeros (shipped zeroed?): logits are the bias alone and say nothing about the features."
    elif rank == d:
        reason = (
            f"C = {c:,} >= D = {d:,} and W has full column rank D: pinv(W)(z - b) recovers f exactly, "
            "so self-reconstruction is exact up to float error."
        )
    else:
        share = (
            f"; {100 * rowspace_variance:.1f}% of the test feature variance lies in the head's row space"
            if np.isfinite(rowspace_variance)
            else ""
        )
        lead = (
            f"only {rank:,} of D = {d:,} feature directions reach the C = {c:,} logits"
            if c < d
            else f"C = {c:,} >= D = {d:,} but W has rank {rank:,} < D, so only {rank:,} of {d:,} feature directions reach the logits"
        )
        reason = f"{lead}: the {d - rank:,} null-space directions are lost{share}."
    if c > LARGE_C:
        reason += (
            f" C = {c:,} logits: the C x C Gram is {c * c * 8 / 1e9:.1f} GB in float64;"
            " the ridge fit uses the dual form when train rows < C."
        )
    return reason


def head_analysis(
    weight: ArrayLike,
    bias: ArrayLike,
    features: ArrayLike | None = None,
    logits: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    *,
    rtol: float | None = None,
) -> dict:
    """Why logits z = W f + b do or do not determine the features f: a flat dict of plain scalars (a table row).

    weight [C, D], bias [C]; optional test-split features [N, D], logits [N, C] and integer labels [N]
    (None when the model's label space is not the dataset's). `rtol`: singular values <= rtol * sv_max
    count as zero; by default numpy.linalg.matrix_rank's tolerance sv_max * max(C, D) * eps. A head that
    is all zeros (up to ZERO_HEAD_TOL) has rank 0. Fields needing data that was not given are NaN;
    `logits_consistent` (needs features and logits) and `test_accuracy` (needs logits and labels) are None.
    """
    w = _array("weight", weight, (None, None), "a 2-D array [C, D] (classes x feature dims)")
    c, d = w.shape
    b = _array("bias", bias, (c,), f"a 1-D array of length C = {c} (weight is {w.shape})")
    f = None if features is None else _array("features", features, (None, d), f"a 2-D array [N, D = {d}]")
    n = None if f is None else len(f)
    rows = "N" if n is None else f"N = {n} (the features' rows)"
    z = None if logits is None else _array("logits", logits, (n, c), f"a 2-D array [{rows}, C = {c}]")
    if labels is not None:
        if z is None:
            raise UserError("labels: given without logits; allowed: labels only together with logits [N, C]")
        y = _labels(labels, len(z))

    u, s, vt = np.linalg.svd(w, full_matrices=False)
    zero_head = bool(np.abs(w).max() <= ZERO_HEAD_TOL * max(1.0, float(np.abs(b).max())))
    tol = s[0] * max(c, d) * np.finfo(np.float64).eps if rtol is None else rtol * s[0]
    rank = 0 if zero_head else int((s > tol).sum())
    out = {
        "feature_dim": d,
        "classes": c,
        "head_rank": rank,
        "sv_max": float(s[0]),
        "sv_min": float(s[-1]),
        "sv_median": float(np.median(s)),
        "condition": float(s[0] / s[-1]) if s[-1] > 0 else float("inf"),
        "head_norm": float(np.linalg.norm(w)),
        "zero_head": zero_head,
        "degenerate": zero_head or rank < min(c, d),
        "null_dims": d - rank,
        "exact_inverse": rank == d,
    }

    nan = float("nan")
    data = {k: nan for k in ("logit_variance", "rowspace_variance", "pinv_mse", "pinv_r2", "pinv_agreement")}
    data.update(logits_consistent=None, test_accuracy=None)
    v_r = vt[:rank].T  # [D, r]: orthonormal basis of W's row space
    if f is not None:
        centered = f - f.mean(axis=0)
        total = float((centered**2).sum())
        data["rowspace_variance"] = float(((centered @ v_r) ** 2).sum()) / total if total > 0 else nan
    if z is not None:
        f_hat = ((z - b) @ u[:, :rank] / s[:rank]) @ v_r.T  # pinv(W)(z - b), row by row
        data["logit_variance"] = float(z.var(axis=0).mean())
        data["pinv_agreement"] = metrics.agreement(f_hat @ w.T + b, z)
        if labels is not None:
            data["test_accuracy"] = metrics.accuracy(z, y)
        if f is not None:
            data["pinv_mse"] = metrics.mse(f, f_hat)
            data["pinv_r2"] = metrics.r2(f, f_hat) if total > 0 else nan
            error = float(np.abs(f @ w.T + b - z).max())
            data["logits_consistent"] = error <= LOGITS_RTOL * max(1.0, float(np.abs(z).max()))
    out.update(data)
    out["reason"] = _reason(c, d, rank, zero_head, data["rowspace_variance"])
    return out


def self_pair_exactness(train_logits: ArrayLike, weight: ArrayLike, *, rtol: float | None = None) -> dict:
    """When "a self pair reaches agreement 1.0 at alpha 0" is guaranteed, for the report's self-pair notes.

    Least squares from z to f on the train rows gives W f^ + b = the projection of a test row's centered logits
    onto the span of the centered train logits, so the head reproduces every test logit exactly when that span
    is the whole space logits can move in, the range of W: rank(centered train logits) = rank(W). That
    needs train rows > rank(W) (centering costs one); with fewer, exact agreement is not guaranteed (it may still
    happen). Ranks use numpy.linalg.matrix_rank's tolerance unless `rtol` is given. Returns train_rows,
    train_logit_rank, head_rank, exact (bool) and a one-sentence note.
    """
    z = _array("train_logits", train_logits, (None, None), "a 2-D array [N, C] (train rows x classes)")
    w = _array("weight", weight, (z.shape[1], None), f"a 2-D array [C = {z.shape[1]}, D]")
    n = len(z)
    centered = z - z.mean(axis=0)
    s_z = np.linalg.svd(centered, compute_uv=False)
    s_w = np.linalg.svd(w, compute_uv=False)

    def rank(s: np.ndarray, shape: tuple[int, int]) -> int:
        tol = s[0] * (max(shape) * np.finfo(np.float64).eps if rtol is None else rtol) if len(s) else 0.0
        return int((s > tol).sum()) if len(s) and s[0] > 0 else 0

    return exactness(n, rank(s_z, centered.shape), rank(s_w, w.shape))


def exactness(train_rows: int, train_logit_rank: int, head_rank: int) -> dict:
    """self_pair_exactness from the ranks alone (a fit's solver knows how many logit directions it kept): exact
    when the train logits span every direction the head can produce. Returns the ranks, exact and a note."""
    exact = train_logit_rank >= head_rank
    if exact:
        note = (f"exact at alpha 0: the {train_rows:,} train rows' logits span all {head_rank:,} directions the head "
                "can produce, so the head on the reconstruction reproduces every test logit")  # fmt: skip
    else:
        note = (f"not guaranteed at alpha 0: the {train_rows:,} train rows' logits span {train_logit_rank:,} of the "
                f"head's {head_rank:,} directions (needs more than {head_rank:,} train rows); test logits outside that "
                "span are projected, so agreement can fall below 1.0")  # fmt: skip
    return {"train_rows": int(train_rows), "train_logit_rank": int(train_logit_rank), "head_rank": int(head_rank),
            "exact": bool(exact), "note": note}  # fmt: skip
