"""The body of one pair task: read two models' shards, fit source logits -> target features, evaluate on test.

No Ray here: grid.py wraps these functions as tasks, and a unit test calls them directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .linmap import DualSolver, LinearMap, Moments, RidgeSolver, fit_sgd, select_alpha, select_alpha_dual
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


RIDGE_FORMS = ("primal", "dual")


def ridge_form(rows: int, logits_dim: int) -> str:
    """"dual" (the n x n kernel) when the source has fewer train rows than logits, else "primal" (the C x C Gram)."""
    return "dual" if rows < logits_dim else "primal"


@dataclass
class SourceStats:
    """What every target of one source shares.

    primal: S_zz of all train rows (factorised) and of the fit/val parts, as moments.
    dual: the train logits' kernel (factorised) for all rows and for the fit part, the held-out rows' basis
    (`val_basis`) and the train row order (`index`) that targets' features must follow.
    """

    model: str
    rows: int
    solver: RidgeSolver | DualSolver
    fit_solver: RidgeSolver | DualSolver | None
    val_zz: Moments | None
    seconds: float
    form: str = "primal"
    index: np.ndarray | None = None
    val_basis: np.ndarray | None = None


def source_stats(store: Store, model: str, train: DataRef, fit: FitSpec, form: str | None = None) -> SourceStats:
    """Factorise the source's train logits once; split into fit/val when alpha is a grid.

    `form` None picks `ridge_form(rows, logits_dim)` from the split's manifest; "primal" accumulates moments
    over the shards (memory O(C^2)), "dual" reads the n x C logits into memory (O(n^2 + n*C)).
    """
    t0 = time.perf_counter()
    split = store.split_dir(model, train)
    if form is None:
        manifest = store.read_manifest(split)
        form = ridge_form(int(manifest["rows"]), int(manifest["logits_dim"]))
    if form not in RIDGE_FORMS:
        raise ValueError(f"ridge form must be one of {RIDGE_FORMS}, got {form!r}")
    search = len(fit.alphas) > 1
    if form == "dual":
        data = store.read_split(split, columns=["index", "logits"])
        index, z = np.array(data["index"]), data["logits"]
        if len(index) == 0:
            raise ValueError(f"no train rows for {model}")
        solver = DualSolver(z)
        fit_solver = val_basis = None
        if search:
            val = validation_mask(index, fit.val_fraction)
            fit_solver = solver.subset(~val)
            val_basis = fit_solver.project(z[val])
        return SourceStats(
            model=model,
            rows=len(index),
            solver=solver,
            fit_solver=fit_solver,
            val_zz=None,
            seconds=time.perf_counter() - t0,
            form="dual",
            index=index,
            val_basis=val_basis,
        )
    fit_zz = val_zz = None
    shards = store.iter_split(split, columns=["index", "logits"])
    blocks = ({k: v[i : i + BLOCK_ROWS] for k, v in c.items()} for c in shards for i in range(0, len(c["index"]), BLOCK_ROWS))
    for chunk in blocks:
        z, val = chunk["logits"], validation_mask(chunk["index"], fit.val_fraction)
        fit_zz = Moments.of(z[~val]) if fit_zz is None else fit_zz.update(z[~val])
        val_zz = Moments.of(z[val]) if val_zz is None else val_zz.update(z[val])
    if fit_zz is None:
        raise ValueError(f"no train rows for {model}")
    return SourceStats(
        model=model,
        rows=fit_zz.n + val_zz.n,
        solver=RidgeSolver(fit_zz.merge(val_zz)),
        fit_solver=RidgeSolver(fit_zz) if search else None,
        val_zz=val_zz if search else None,
        seconds=time.perf_counter() - t0,
    )


def _fixed_alpha(source: str, target: str, fit: FitSpec) -> float | None:
    """The alpha a pair uses without a search: fit.self_alpha for a self pair, the only alpha of a one-value grid."""
    if source == target and fit.self_alpha is not None:
        return fit.self_alpha
    return fit.alphas[0] if len(fit.alphas) == 1 else None


def _fit_ridge(store: Store, source: str, target: str, train: DataRef, fit: FitSpec, stats: SourceStats):
    if stats.form == "dual":
        return _fit_ridge_dual(store, source, target, train, fit, stats)
    fit_zf = val_zf = None
    for chunk in aligned(
        store, store.split_dir(source, train), ["logits"], store.split_dir(target, train), ["features"]
    ):
        val = validation_mask(chunk["index"], fit.val_fraction)
        z, f = chunk["logits"], chunk["features"]
        fit_zf = Moments.of(z[~val], f[~val]) if fit_zf is None else fit_zf.update(z[~val], f[~val])
        val_zf = Moments.of(z[val], f[val]) if val_zf is None else val_zf.update(z[val], f[val])
    scores: dict[float, float] = {}
    alpha = _fixed_alpha(source, target, fit)
    if alpha is None and stats.fit_solver is not None:
        alpha, scores = select_alpha(stats.fit_solver, fit_zf, stats.val_zz, val_zf, fit.alphas)
    return stats.solver.solve(fit_zf.merge(val_zf), alpha), alpha, scores


def _fit_ridge_dual(store: Store, source: str, target: str, train: DataRef, fit: FitSpec, stats: SourceStats):
    data = store.read_split(store.split_dir(target, train), columns=["index", "features"])
    index, f = data["index"], data["features"]
    if len(index) != len(stats.index):
        raise ValueError(f"{source} and {target} hold different numbers of train rows")
    if not np.array_equal(index, stats.index):
        raise ValueError(f"{source} and {target} hold rows in a different order; re-extract with --rebuild")
    scores: dict[float, float] = {}
    alpha = _fixed_alpha(source, target, fit)
    if alpha is None and stats.fit_solver is not None:
        val = validation_mask(index, fit.val_fraction)
        alpha, scores = select_alpha_dual(stats.fit_solver, f[~val], stats.val_basis, f[val], fit.alphas)
    return stats.solver.solve(f, alpha), alpha, scores


def _fit_sgd(store: Store, source: str, target: str, train: DataRef, fit: FitSpec) -> LinearMap:
    z = store.read_split(store.split_dir(source, train), columns=["logits"])["logits"]
    f = store.read_split(store.split_dir(target, train), columns=["features"])["features"]
    params = dict(fit.sgd)
    return fit_sgd(z, f, **params)


def _fit_mlp(
    store: Store, source: str, target: str, train: DataRef, fit: FitSpec, config: dict[str, Any],
    report: Callable[[int, float], None] | None,
):  # fmt: skip
    """An MLP map (mlpmap.fit_mlp) early-stopped on the same held-out train rows the ridge alpha is chosen on."""
    import torch

    from .mlpmap import config_from, fit_mlp

    src = store.read_split(store.split_dir(source, train), columns=["index", "logits"])
    f = store.read_split(store.split_dir(target, train), columns=["index", "features"])
    if not np.array_equal(src["index"], f["index"]):
        raise ValueError(f"{source} and {target} hold {train.key}/{train.split} rows in a different order")
    fixed = {k: fit.mlp[k] for k in ("max_epochs", "patience", "batch_size") if k in fit.mlp}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    val = validation_mask(src["index"], fit.val_fraction)
    return fit_mlp(src["logits"], f["features"], val, config_from({**fixed, **config}), report, device=device)


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
    mlp_config: dict[str, Any] | None = None,
    report: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Fit one ordered pair with `method` and return its results row (no versions: the reducer adds those).
    For "mlp", `mlp_config` holds the searched hyperparameters and `report(epoch, val_mse)` sees every epoch."""
    t0 = time.perf_counter()
    scores: dict[float, float] = {}
    form = None  # "primal" or "dual" for ridge rows
    extra: dict[str, Any] = {}
    if method == "ridge":
        if stats is None:
            stats = source_stats(store, source, train, fit)
        linmap, alpha, scores = _fit_ridge(store, source, target, train, fit, stats)
        train_rows = stats.rows
        form = stats.form
    elif method == "sgd":
        linmap, alpha = _fit_sgd(store, source, target, train, fit), None
        train_rows = store.read_manifest(store.split_dir(source, train))["rows"]
    elif method == "mlp":
        linmap, alpha = _fit_mlp(store, source, target, train, fit, mlp_config or {}, report), None
        train_rows = linmap.info["train_rows"] + linmap.info["val_rows"]
        info = linmap.info
        extra = {"mlp_config": {k: info["config"][k] for k in sorted(mlp_config or {})}, "mlp_epochs": info["epochs"],
                 "val_mse": info["best_val_mse"], "val_mse_linear": info.get("init_val_mse")}  # fmt: skip
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
        "ridge_form": form,
        "train_rows": int(train_rows),
        **evaluate(store, source, target, test, linmap),
        "fit_seconds": fit_seconds,
        **extra,
    }
    row["seconds"] = time.perf_counter() - t0
    return row


def model_cka(store: Store, models: list[str], test: DataRef, column: str, max_rows: int = 4096) -> dict[str, Any]:
    """Linear CKA between every two models' `column` (features or logits) on the first `max_rows` test rows."""
    from .cka import cka_matrix

    splits = [store.read_split(store.split_dir(m, test), columns=["index", column]) for m in models]
    for m, split in zip(models[1:], splits[1:], strict=True):
        n = min(len(splits[0]["index"]), len(split["index"]), max_rows)
        if not np.array_equal(splits[0]["index"][:n], split["index"][:n]):
            raise ValueError(
                f"models {models[0]} and {m} hold different {test.key}/{test.split} rows (row ids differ in the first "
                f"{n}); CKA pairs rows by position: re-extract with --rebuild"
            )
    reps = [split[column][:max_rows] for split in splits]
    return {
        "models": list(models),
        "column": column,
        "rows": int(min(len(r) for r in reps)),
        "estimator": f"linear CKA (Kornblith et al. 2019) on the first {max_rows} test rows at most, float64",
        "cka": cka_matrix(reps).tolist(),
    }
