"""The body of one pair task: read two models' shards, fit source logits -> target features, evaluate on test.

No Ray here: grid.py wraps these functions as tasks, and a unit test calls them directly.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .linmap import DualSolver, LinearMap, Moments, RidgeSolver, fit_sgd, select_alpha, select_alpha_dual
from .metrics import BOOTSTRAP_SEED, CI_LEVEL, RESAMPLES, PairMetrics, resample_counts
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


DIFF_METRICS = ("agreement", "r2", "mse")  # whose replicates a pair keeps, for intervals of differences in the report


@dataclass
class PairDetail:
    """What the report's drill-down panel shows for one pair, accumulated batch by batch and kept small (capped):
    agreement per class of B's real prediction, per-dimension R2, real and reconstructed features of the first
    `points` test rows (for their first principal components), and the first test rows where B's head disagrees."""

    classes: int
    points: int = 150
    max_disagree: int = 12
    max_classes: int = 20
    n: int = 0
    per_class: np.ndarray = field(init=False)
    agree_class: np.ndarray = field(init=False)
    sq_dim: np.ndarray | None = None
    sum_dim: np.ndarray | None = None
    sumsq_dim: np.ndarray | None = None
    shift: np.ndarray | None = None
    kept: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    disagree: list[dict[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.per_class = np.zeros(self.classes, np.int64)
        self.agree_class = np.zeros(self.classes, np.int64)

    def update(self, f: np.ndarray, f_hat: np.ndarray, real: np.ndarray, recon: np.ndarray, index: np.ndarray,
               labels: np.ndarray) -> None:  # fmt: skip
        f, f_hat = np.asarray(f, np.float64), np.asarray(f_hat, np.float64)
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.sq_dim, self.sum_dim, self.sumsq_dim = (np.zeros(f.shape[1]) for _ in range(3))
        fc = f - self.shift
        self.sq_dim += ((f - f_hat) ** 2).sum(axis=0)
        self.sum_dim += fc.sum(axis=0)
        self.sumsq_dim += (fc**2).sum(axis=0)
        self.n += len(f)
        self.per_class += np.bincount(real, minlength=self.classes)
        self.agree_class += np.bincount(real[real == recon], minlength=self.classes)
        room = self.points - sum(len(a) for a, _ in self.kept)
        if room > 0:
            self.kept.append((f[:room], f_hat[:room]))
        for i in np.flatnonzero(real != recon)[: max(0, self.max_disagree - len(self.disagree))]:
            self.disagree.append({"row": int(index[i]), "real": int(real[i]), "recon": int(recon[i]),
                                  "label": int(labels[i])})  # fmt: skip

    def result(self) -> dict[str, Any]:
        """JSON-ready: classes (the most frequent first), sorted per-dimension R2, first-two-PC coordinates."""
        top = np.argsort(-self.per_class, kind="stable")[: self.max_classes]
        top = top[self.per_class[top] > 0]
        ss_dim = self.sumsq_dim - self.sum_dim**2 / self.n
        with np.errstate(divide="ignore", invalid="ignore"):
            dim_r2 = np.where(ss_dim > 1e-12 * max(float(ss_dim.max()), 1e-300), 1.0 - self.sq_dim / ss_dim, np.nan)
        dim_r2 = np.sort(dim_r2[~np.isnan(dim_r2)])[::-1]
        return {
            "classes": {"class": top.tolist(), "rows": self.per_class[top].tolist(),
                        "agreement": _rounded(self.agree_class[top] / self.per_class[top])},
            "dim_r2": {"dims": int(len(dim_r2)), "rank_fraction": _rounded(_quantile_positions(len(dim_r2))),
                       "r2": _rounded(dim_r2[_quantile_index(len(dim_r2))])},
            "pca": self._pca(),
            "disagree": self.disagree,
        }

    def _pca(self) -> dict[str, Any]:
        """The kept rows' real and reconstructed features on the first two principal components of the real ones."""
        if not self.kept:
            return {}
        f = np.concatenate([a for a, _ in self.kept])
        g = np.concatenate([b for _, b in self.kept])
        mean = f.mean(axis=0)
        _, sv, vt = np.linalg.svd(f - mean, full_matrices=False)
        k = min(2, len(sv))
        share = (sv[:k] ** 2 / max(float((sv**2).sum()), 1e-300)).tolist()
        return {"rows": len(f), "variance_share": _rounded(share),
                "real": [_rounded(c) for c in ((f - mean) @ vt[:k].T).T],
                "recon": [_rounded(c) for c in ((g - mean) @ vt[:k].T).T]}  # fmt: skip


def _quantile_index(n: int, points: int = 64) -> np.ndarray:
    return np.unique(np.round(np.linspace(0, n - 1, min(n, points))).astype(int)) if n else np.zeros(0, int)


def _quantile_positions(n: int, points: int = 64) -> np.ndarray:
    return (_quantile_index(n, points) + 0.5) / max(n, 1)


def _rounded(values: Any, digits: int = 4) -> list[float | None]:
    """Floats to `digits` significant digits (the drill-down shows at most three); NaN -> None."""
    out = []
    for v in np.asarray(values, np.float64).ravel():
        out.append(None if not np.isfinite(v) else float(f"{v:.{digits}g}"))
    return out


def encode_replicates(values: np.ndarray) -> str:
    """Bootstrap replicates as base64 of little-endian float32: about 5 kB per 1000 resamples."""
    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode("ascii")


def decode_replicates(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4").astype(np.float64)


def evaluate(
    store: Store, source: str, target: str, test: DataRef, linmap: LinearMap, *, ci: float = CI_LEVEL,
    resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:  # fmt: skip
    """Every metric of `linmap` on the test split, streamed; labels used where the target's head shares them.
    Adds `<metric>_lo`/`_hi` (percentile bootstrap over test rows at level `ci`, `resamples` seeded resamples shared
    by every pair of this test split) and `detail`: the drill-down data and the replicates of DIFF_METRICS."""
    target_dir = store.split_dir(target, test)
    manifest = store.read_manifest(target_dir)
    w, b = store.read_head(target_dir)
    with_labels = manifest.get("label_space") is not None and manifest.get("label_space") == manifest.get(
        "dataset_label_space"
    )
    acc = PairMetrics(w, b, with_labels=with_labels, counts=resample_counts(int(manifest["rows"]), resamples, seed))
    detail = PairDetail(classes=len(b))
    for chunk in aligned(store, store.split_dir(source, test), ["logits"], target_dir, ["features", "label"]):
        f_hat = linmap.predict(chunk["logits"].astype(np.float64))
        real, recon = acc.update(chunk["features"], f_hat, chunk["label"])
        detail.update(chunk["features"], f_hat, real, recon, chunk["index"], chunk["label"])
    replicates = acc.replicates()
    return {
        **acc.result(),
        "test_rows": acc.n,
        **acc.intervals(ci),
        "ci": ci,
        "resamples": resamples,
        "detail": {**detail.result(), "replicates": {m: encode_replicates(replicates[m]) for m in DIFF_METRICS}},
    }


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
    *,
    ci: float = CI_LEVEL,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Fit one ordered pair with `method` and return its results row (no versions: the reducer adds those).
    For "mlp", `mlp_config` holds the searched hyperparameters and `report(epoch, val_mse)` sees every epoch.
    `ci`, `resamples` and `seed` set the bootstrap intervals (the spec's `report` block)."""
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
        extra = {"train_logit_rank": stats.solver.rank}  # directions alpha 0 keeps (a self pair's exactness)
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
        **evaluate(store, source, target, test, linmap, ci=ci, resamples=resamples, seed=seed),
        "fit_seconds": fit_seconds,
        **extra,
    }
    row["seconds"] = time.perf_counter() - t0
    return row


def _same_rows(store: Store, models: list[str], test: DataRef, column: str, max_rows: int) -> list[np.ndarray]:
    """Every model's `column` on the first `max_rows` test rows, after checking that the models hold the same rows
    in the same order (model-level measures pair rows by position)."""
    splits = [store.read_split(store.split_dir(m, test), columns=["index", column]) for m in models]
    for m, split in zip(models[1:], splits[1:], strict=True):
        n = min(len(splits[0]["index"]), len(split["index"]), max_rows)
        if not np.array_equal(splits[0]["index"][:n], split["index"][:n]):
            raise ValueError(
                f"models {models[0]} and {m} hold different {test.key}/{test.split} rows (row ids differ in the first "
                f"{n}); model-level measures pair rows by position: re-extract with --rebuild"
            )
    return [split[column][:max_rows] for split in splits]


def model_cka(store: Store, models: list[str], test: DataRef, column: str, max_rows: int = 4096) -> dict[str, Any]:
    """Linear CKA between every two models' `column` (features or logits) on the first `max_rows` test rows."""
    from .cka import cka_matrix

    reps = _same_rows(store, models, test, column, max_rows)
    return {
        "models": list(models),
        "column": column,
        "rows": int(min(len(r) for r in reps)),
        "estimator": f"linear CKA (Kornblith et al. 2019) on the first {max_rows} test rows at most, float64",
        "cka": cka_matrix(reps).tolist(),
    }


SIMILARITY_MAX_ROWS = 10_000


def model_similarity_rows(store: Store, models: list[str], test: DataRef, column: str, setting: str,
                          max_rows: int = SIMILARITY_MAX_ROWS) -> list[dict[str, Any]]:  # fmt: skip
    """similarity.model_similarity (every measure, every ordered pair) of the models' `column` on the first
    `max_rows` test rows of one setting: records {measure, representation, setting, model_a, model_b, value}."""
    from .similarity import model_similarity

    reps = dict(zip(models, _same_rows(store, models, test, column, max_rows), strict=True))
    return [{"measure": r["measure"], "representation": column, "setting": setting, "model_a": r["model_a"],
             "model_b": r["model_b"], "value": float(r["value"])} for r in model_similarity(reps)]  # fmt: skip
