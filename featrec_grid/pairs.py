"""The body of one pair task: read two models' shards, fit source logits -> target features, evaluate on test.

No Ray here: grid.py wraps these functions as tasks, and a unit test calls them directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .linmap import LinearMap, Moments, RidgeSolver, fit_sgd, select_alpha
from .metrics import PairMetrics
from .refs import DataRef
from .spec import FitSpec
from .store import Store

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
BLOCK_ROWS = 8192  # rows per statistics update: float64 temporaries stay bounded whatever the shard size


def validation_mask(index: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic held-out rows chosen by row id (a Weyl hash), the same for every model and shard layout."""
    with np.errstate(over="ignore"):
        u = (index.astype(np.uint64) * _GOLDEN) >> np.uint64(11)
    return (u.astype(np.float64) / float(2**53)) < fraction


def aligned(store: Store, left: str, left_cols: list[str], right: str, right_cols: list[str]) -> Iterator[dict]:
    """Stream two split dirs of the same rows side by side, whatever their shard boundaries; index must agree."""
    lit = store.iter_split(left, columns=["index", *left_cols])
    rit = store.iter_split(right, columns=["index", *right_cols])
    lbuf: dict | None = None
    rbuf: dict | None = None
    while True:
        if lbuf is None or len(lbuf["index"]) == 0:
            lbuf = next(lit, None)
        if rbuf is None or len(rbuf["index"]) == 0:
            rbuf = next(rit, None)
        if lbuf is None or rbuf is None:
            if lbuf is not None or rbuf is not None:
                raise ValueError(f"{left} and {right} hold different numbers of rows")
            return
        n = min(len(lbuf["index"]), len(rbuf["index"]), BLOCK_ROWS)
        if not np.array_equal(lbuf["index"][:n], rbuf["index"][:n]):
            raise ValueError(f"{left} and {right} hold rows in a different order; re-extract with --rebuild")
        yield {"index": lbuf["index"][:n], **{c: lbuf[c][:n] for c in left_cols}, **{c: rbuf[c][:n] for c in right_cols}}
        lbuf = {k: v[n:] for k, v in lbuf.items()}
        rbuf = {k: v[n:] for k, v in rbuf.items()}


@dataclass
class SourceStats:
    """What every target of one source shares: S_zz of all train rows (factorised) and of the fit/val parts."""

    model: str
    rows: int
    solver: RidgeSolver
    fit_solver: RidgeSolver | None
    val_zz: Moments | None
    seconds: float


def source_stats(store: Store, model: str, train: DataRef, fit: FitSpec) -> SourceStats:
    """Accumulate the source's logit moments over its train shards; split into fit/val when alpha is a grid."""
    t0 = time.perf_counter()
    fit_zz = val_zz = None
    shards = store.iter_split(store.split_dir(model, train), columns=["index", "logits"])
    blocks = ({k: v[i : i + BLOCK_ROWS] for k, v in c.items()} for c in shards for i in range(0, len(c["index"]), BLOCK_ROWS))
    for chunk in blocks:
        z, val = chunk["logits"], validation_mask(chunk["index"], fit.val_fraction)
        fit_zz = Moments.of(z[~val]) if fit_zz is None else fit_zz.update(z[~val])
        val_zz = Moments.of(z[val]) if val_zz is None else val_zz.update(z[val])
    if fit_zz is None:
        raise ValueError(f"no train rows for {model}")
    search = len(fit.alphas) > 1
    return SourceStats(
        model=model,
        rows=fit_zz.n + val_zz.n,
        solver=RidgeSolver(fit_zz.merge(val_zz)),
        fit_solver=RidgeSolver(fit_zz) if search else None,
        val_zz=val_zz if search else None,
        seconds=time.perf_counter() - t0,
    )


def _fit_ridge(store: Store, source: str, target: str, train: DataRef, fit: FitSpec, stats: SourceStats):
    fit_zf = val_zf = None
    for chunk in aligned(
        store, store.split_dir(source, train), ["logits"], store.split_dir(target, train), ["features"]
    ):
        val = validation_mask(chunk["index"], fit.val_fraction)
        z, f = chunk["logits"], chunk["features"]
        fit_zf = Moments.of(z[~val], f[~val]) if fit_zf is None else fit_zf.update(z[~val], f[~val])
        val_zf = Moments.of(z[val], f[val]) if val_zf is None else val_zf.update(z[val], f[val])
    scores: dict[float, float] = {}
    alpha = fit.alphas[0]
    if stats.fit_solver is not None:
        alpha, scores = select_alpha(stats.fit_solver, fit_zf, stats.val_zz, val_zf, fit.alphas)
    return stats.solver.solve(fit_zf.merge(val_zf), alpha), alpha, scores


def _fit_sgd(store: Store, source: str, target: str, train: DataRef, fit: FitSpec) -> LinearMap:
    z = store.read_split(store.split_dir(source, train), columns=["logits"])["logits"]
    f = store.read_split(store.split_dir(target, train), columns=["features"])["features"]
    params = dict(fit.sgd)
    return fit_sgd(z, f, **params)


def evaluate(store: Store, source: str, target: str, test: DataRef, linmap: LinearMap) -> dict[str, Any]:
    """Every metric of `linmap` on the test split, streamed; labels used where the target's head shares them."""
    target_dir = store.split_dir(target, test)
    manifest = store.read_manifest(target_dir)
    w, b = store.read_head(target_dir)
    with_labels = manifest.get("label_space") is not None and manifest.get("label_space") == manifest.get(
        "dataset_label_space"
    )
    acc = PairMetrics(w, b, with_labels=with_labels)
    for chunk in aligned(store, store.split_dir(source, test), ["logits"], target_dir, ["features", "label"]):
        acc.update(chunk["features"], linmap.predict(chunk["logits"].astype(np.float64)), chunk["label"])
    return {**acc.result(), "test_rows": acc.n}


def fit_pair(
    store: Store,
    source: str,
    target: str,
    train: DataRef,
    test: DataRef,
    fit: FitSpec,
    method: str,
    stats: SourceStats | None = None,
) -> dict[str, Any]:
    """Fit one ordered pair with `method` and return its results row (no versions: the reducer adds those)."""
    t0 = time.perf_counter()
    scores: dict[float, float] = {}
    if method == "ridge":
        if stats is None:
            stats = source_stats(store, source, train, fit)
        linmap, alpha, scores = _fit_ridge(store, source, target, train, fit, stats)
        train_rows = stats.rows
    elif method == "sgd":
        linmap, alpha = _fit_sgd(store, source, target, train, fit), None
        train_rows = store.read_manifest(store.split_dir(source, train))["rows"]
    else:
        raise ValueError(f"unknown method {method!r}")
    fit_seconds = time.perf_counter() - t0
    row = {
        "source": source,
        "target": target,
        "train_dataset": train.key,
        "train_split": train.split,
        "test_dataset": test.key,
        "test_split": test.split,
        "method": method,
        "alpha": alpha,
        "alpha_scores": {str(k): v for k, v in scores.items()},
        "train_rows": int(train_rows),
        **evaluate(store, source, target, test, linmap),
        "fit_seconds": fit_seconds,
    }
    row["seconds"] = time.perf_counter() - t0
    return row


def model_cka(store: Store, models: list[str], test: DataRef, column: str, max_rows: int = 4096) -> dict[str, Any]:
    """Linear CKA between every two models' `column` (features or logits) on the first `max_rows` test rows."""
    from .cka import cka_matrix

    reps = [store.read_split(store.split_dir(m, test), columns=[column])[column][:max_rows] for m in models]
    return {
        "models": list(models),
        "column": column,
        "rows": int(min(len(r) for r in reps)),
        "estimator": f"linear CKA (Kornblith et al. 2019) on the first {max_rows} test rows at most, float64",
        "cka": cka_matrix(reps).tolist(),
    }
