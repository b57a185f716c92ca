"""The dual (kernel) ridge form against scikit-learn, numpy lstsq and the primal form; the pair path picks it
when a source has fewer train rows than logits; a 21,843-class head is fitted without a C x C array."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from featrec_grid.linmap import DualSolver, Moments, RidgeSolver, fit_ridge_dual, select_alpha_dual
from featrec_grid.pairs import fit_pair, ridge_form, source_stats, validation_mask
from featrec_grid.refs import DataRef
from featrec_grid.spec import FitSpec
from featrec_grid.store import Store


def _wide(n=60, c=200, d=7, seed=0):
    """Fewer rows than logits: z with an offset and uneven scales, f linear in a few logits plus noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * rng.uniform(0.5, 3, c) + rng.standard_normal(c) * 5
    f = z[:, :10] @ rng.standard_normal((10, d)) + rng.standard_normal(d) + 0.5 * rng.standard_normal((n, d))
    return z.astype(np.float32), f.astype(np.float32)


@pytest.mark.parametrize("alpha", [1e-3, 0.1, 10.0, 1000.0])
def test_dual_matches_sklearn_ridge(alpha):
    z, f = _wide()
    z_test = _wide(n=25, seed=1)[0]
    m = DualSolver(z).solve(f, alpha)
    ref = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(z.astype(np.float64), f.astype(np.float64))
    zt = z_test.astype(np.float64)
    np.testing.assert_allclose(m.predict(zt), ref.predict(zt), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(m.predict(z.astype(np.float64)), ref.predict(z.astype(np.float64)), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(m.weight, ref.coef_, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(m.bias, ref.intercept_, rtol=1e-6, atol=1e-8)


def test_dual_least_squares_is_minimum_norm_lstsq():
    z, f = _wide(seed=2)
    z64, f64 = z.astype(np.float64), f.astype(np.float64)
    solver = DualSolver(z)
    assert solver.rank == len(z) - 1  # centering removes one direction of the 60 rows
    m = solver.solve(f, 0.0)
    zc = z64 - z64.mean(0)
    coef = np.linalg.lstsq(zc, f64 - f64.mean(0), rcond=None)[0]  # minimum-norm among exact fits
    np.testing.assert_allclose(m.weight, coef.T, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(m.bias, f64.mean(0) - z64.mean(0) @ coef, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.predict(z64), f64, atol=1e-5)  # n < C: the training rows are interpolated


def test_dual_rank_deficient_least_squares_drops_tiny_eigenvalues():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 5))
    z = base @ rng.standard_normal((5, 300))  # 300 logits of rank 5
    f = base @ rng.standard_normal((5, 4)) + 1.0 + 0.1 * rng.standard_normal((40, 4))
    solver = DualSolver(z)
    assert solver.rank == 5
    ref = np.linalg.pinv(z - z.mean(0)) @ (f - f.mean(0))
    np.testing.assert_allclose(solver.solve(f, 0.0).weight, ref.T, rtol=1e-6, atol=1e-10)


def test_dual_alpha_zero_is_numpy_lstsq_on_ill_conditioned_logits():
    """n = 80 < C = 200 with centered singular values from 30 down to 10^-3.7 (cond(K) = 2e10): every direction is
    real, so alpha = 0 is numpy.linalg.lstsq's minimum-norm solution; the former 1e-10 cutoff dropped some."""
    rng = np.random.default_rng(15)
    raw = rng.standard_normal((80, 79))
    u = np.linalg.qr(raw - raw.mean(0))[0]
    v = np.linalg.qr(rng.standard_normal((200, 79)))[0]
    z = (u * np.logspace(np.log10(30), -3.7, 79)) @ v.T + 2.0
    f = rng.standard_normal((80, 5)) + 1.0
    zc, fc = z - z.mean(0), f - f.mean(0)
    weight = np.linalg.lstsq(zc, fc, rcond=None)[0].T
    solver = DualSolver(z)
    assert solver.rank == 79
    m = solver.solve(f, 0.0)  # accurate to about cond(K) * eps = 5e-6 of the largest weight
    np.testing.assert_allclose(m.weight, weight, rtol=0, atol=5e-5 * np.abs(weight).max())
    np.testing.assert_allclose(m.predict(z), f, atol=1e-4)  # interpolates the rows, as lstsq does
    old = DualSolver(z, rcond=1e-10)
    assert old.rank < 79 and np.abs(old.solve(f, 0.0).predict(z) - f).max() > 1e-2


def test_subset_solver_equals_solver_built_on_those_rows():
    z, f = _wide(n=80, seed=4)
    rows = np.random.default_rng(0).random(80) < 0.7
    sub, direct = DualSolver(z).subset(rows), DualSolver(z[rows])
    np.testing.assert_allclose(sub.mean_z, direct.mean_z, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sub.evals, direct.evals, rtol=1e-8, atol=1e-6 * direct.evals.max() * 1e-6)
    for alpha in [0.0, 1.0]:
        a, b = sub.solve(f[rows], alpha), direct.solve(f[rows], alpha)
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-6, atol=1e-8)
    zt = z[~rows].astype(np.float64)
    np.testing.assert_allclose(sub.project(zt), direct.project(zt), rtol=1e-7, atol=1e-6)  # same eigvec signs: same kernel


def test_dual_agrees_with_primal_where_both_are_valid():
    """n > C, fit in both forms through their own entry points; identical maps at every alpha."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((300, 20)) + 4.0
    f = z @ rng.standard_normal((20, 6)) + rng.standard_normal((300, 6))
    for alpha in [0.0, 0.5, 50.0]:
        p = RidgeSolver(Moments.of(z)).solve(Moments.of(z, f), alpha)
        d = fit_ridge_dual(z, f, alpha)
        np.testing.assert_allclose(d.weight, p.weight, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(d.predict(z), p.predict(z), rtol=1e-8, atol=1e-8)


def test_dual_alpha_selection_matches_explicit_sklearn_loop():
    rng = np.random.default_rng(6)
    z = rng.standard_normal((90, 150)) + 3
    f = z[:, :5] @ rng.standard_normal((5, 5)) + 3 * rng.standard_normal((90, 5))  # noisy: ridge must help
    val = np.random.default_rng(1).random(90) < 0.25
    alphas = [0.0, 0.01, 1.0, 100.0, 1e4, 1e6]
    fit_solver = DualSolver(z).subset(~val)
    best, scores = select_alpha_dual(fit_solver, f[~val], fit_solver.project(z[val]), f[val], alphas)
    zf, ff, zv, fv = (a.astype(np.float64) for a in (z[~val], f[~val], z[val], f[val]))
    direct = {}
    for a in alphas:
        if a == 0:
            coef = np.linalg.lstsq(zf - zf.mean(0), ff - ff.mean(0), rcond=None)[0]
            pred = (zv - zf.mean(0)) @ coef + ff.mean(0)
        else:
            pred = Ridge(alpha=a, solver="svd").fit(zf, ff).predict(zv)
        direct[a] = np.mean((pred - fv) ** 2)
    for a in alphas:
        assert scores[a] == pytest.approx(direct[a], rel=1e-6)
    assert best == min(direct, key=direct.get)
    assert 0 < best < 1e6  # an interior choice, so the test tells a wrong ordering apart


def test_dual_alpha_ties_go_to_the_larger_alpha():
    z, _ = _wide(n=40, c=80, seed=7)
    f = np.ones((40, 3))  # constant target: every alpha predicts it exactly
    val = np.arange(40) % 4 == 0
    s = DualSolver(z).subset(~val)
    best, scores = select_alpha_dual(s, f[~val], s.project(z[val]), f[val], [10.0, 0.0, 1000.0, 1.0])
    assert best == 1000.0 and max(scores.values()) < 1e-20


def test_ridge_form_threshold():
    assert ridge_form(21_842, 21_843) == "dual"
    assert ridge_form(21_843, 21_843) == "primal" and ridge_form(50_000, 1000) == "primal"


# ------------------------------------------------------------------------------------------ pair path
def _write(store: Store, model: str, ref: DataRef, index, logits, features, head_classes, seed):
    rng = np.random.default_rng(seed)
    head = (rng.standard_normal((head_classes, features.shape[1])).astype(np.float32),
            rng.standard_normal(head_classes).astype(np.float32))
    label = rng.integers(0, head_classes, len(index)).astype(np.int64)
    meta = {"key": f"{model}-{ref.key}", "model": model, "dataset": ref.key, "split": ref.split}
    sizes = [len(index) // 3, len(index) - len(index) // 3]  # two batches, several shards
    batches, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        batches.append((index[sl], label[sl], logits[sl], features[sl]))
        start += size
    store.write_split(store.split_dir(model, ref), meta=meta, batches=batches, head=head, rows_per_shard=23)
    return head


def _weyl_mask(index, fraction):
    """The documented validation rule in Python integers: (id * 0x9E3779B97F4A7C15 mod 2^64) >> 11, over 2^53."""
    return np.array([((int(i) * 0x9E3779B97F4A7C15) % 2**64 >> 11) / 2**53 < fraction for i in index])


def _expected(z_tr, f_tr, val, z_te, f_te, head, alphas):
    """(alpha, {alpha: held-out mse}, test mse, test agreement) from scikit-learn / numpy lstsq alone."""
    z64, f64 = z_tr.astype(np.float64), f_tr.astype(np.float64)
    scores = {}
    for a in alphas:
        if a == 0:
            zf = z64[~val]
            coef = np.linalg.lstsq(zf - zf.mean(0), f64[~val] - f64[~val].mean(0), rcond=None)[0]
            pred = (z64[val] - zf.mean(0)) @ coef + f64[~val].mean(0)
        else:
            pred = Ridge(alpha=a, solver="svd").fit(z64[~val], f64[~val]).predict(z64[val])
        scores[a] = np.mean((pred - f64[val]) ** 2)
    best = min(scores, key=lambda a: (scores[a], -a))
    if best == 0:
        coef = np.linalg.lstsq(z64 - z64.mean(0), f64 - f64.mean(0), rcond=None)[0]
        f_hat = (z_te.astype(np.float64) - z64.mean(0)) @ coef + f64.mean(0)
    else:
        f_hat = Ridge(alpha=best, solver="svd").fit(z64, f64).predict(z_te.astype(np.float64))
    f = f_te.astype(np.float64)
    w, b = head
    agree = np.mean((f @ w.T + b).argmax(1) == (f_hat @ w.T + b).argmax(1))
    return best, scores, np.mean((f - f_hat) ** 2), agree


def test_fit_pair_uses_dual_form_and_matches_sklearn(tmp_path):
    store = Store(tmp_path / "store")
    train, test = DataRef("toy", "train"), DataRef("toy", "test")
    n, m, c, d_src, d_tgt, k_tgt = 70, 30, 150, 9, 6, 11
    rng = np.random.default_rng(8)
    z_all = (rng.standard_normal((n + m, c)) * rng.uniform(0.5, 2, c) + 2.0).astype(np.float32)
    f_all = (z_all[:, :8] @ rng.standard_normal((8, d_tgt)) + 0.3 * rng.standard_normal((n + m, d_tgt))).astype(np.float32)
    index = rng.permutation(1000)[: n + m].astype(np.int64)
    tr, te = slice(0, n), slice(n, n + m)
    src_feat = rng.standard_normal((n + m, d_src)).astype(np.float32)
    tgt_logits = rng.standard_normal((n + m, k_tgt)).astype(np.float32)
    _write(store, "src", train, index[tr], z_all[tr], src_feat[tr], c, 0)
    _write(store, "src", test, index[te], z_all[te], src_feat[te], c, 0)
    _write(store, "tgt", train, index[tr], tgt_logits[tr], f_all[tr], k_tgt, 1)
    w, b = _write(store, "tgt", test, index[te], tgt_logits[te], f_all[te], k_tgt, 1)
    assert ridge_form(n, c) == "dual"

    alphas = (0.0, 0.1, 10.0, 1000.0)
    fit = FitSpec(alphas=alphas, val_fraction=0.3)
    stats = source_stats(store, "src", train, fit)
    assert stats.form == "dual" and stats.rows == n
    row = fit_pair(store, "src", "tgt", train, test, fit, "ridge", stats)
    assert row["ridge_form"] == "dual" and row["train_rows"] == n and row["test_rows"] == m

    # Independent: held-out scores with sklearn on the validation rows, then a refit on all train rows.
    z64, f64 = z_all[tr].astype(np.float64), f_all[tr].astype(np.float64)
    val = validation_mask(index[tr], 0.3)
    assert np.array_equal(val, _weyl_mask(index[tr], 0.3)) and 0 < val.sum() < n
    direct = {}
    for a in alphas:
        if a == 0:
            zf = z64[~val]
            coef = np.linalg.lstsq(zf - zf.mean(0), f64[~val] - f64[~val].mean(0), rcond=None)[0]
            pred = (z64[val] - zf.mean(0)) @ coef + f64[~val].mean(0)
        else:
            pred = Ridge(alpha=a, solver="svd").fit(z64[~val], f64[~val]).predict(z64[val])
        direct[a] = np.mean((pred - f64[val]) ** 2)
    best = min(direct, key=lambda a: (direct[a], -a))
    assert row["alpha"] == best
    for a in alphas:
        assert row["alpha_scores"][str(a)] == pytest.approx(direct[a], rel=1e-6)
    assert best > 0
    f_hat = Ridge(alpha=best, solver="svd").fit(z64, f64).predict(z_all[te].astype(np.float64))
    f = f_all[te].astype(np.float64)
    assert row["mse"] == pytest.approx(np.mean((f - f_hat) ** 2), rel=1e-6)
    assert row["r2"] == pytest.approx(1 - ((f - f_hat) ** 2).sum() / ((f - f.mean(0)) ** 2).sum(), rel=1e-6)
    agree = np.mean((f @ w.T + b).argmax(1) == (f_hat @ w.T + b).argmax(1))
    assert row["agreement"] == pytest.approx(agree)

    # The same pair forced through the primal form: same alpha, scores and metrics.
    primal = source_stats(store, "src", train, fit, form="primal")
    prow = fit_pair(store, "src", "tgt", train, test, fit, "ridge", primal)
    assert prow["ridge_form"] == "primal" and prow["alpha"] == row["alpha"]
    for a in alphas:
        assert prow["alpha_scores"][str(a)] == pytest.approx(row["alpha_scores"][str(a)], rel=1e-6)
    assert prow["mse"] == pytest.approx(row["mse"], rel=1e-6)

    # Single alpha, no search; and the reverse pair (few logits) stays primal.
    one = FitSpec(alphas=(10.0,))
    r1 = fit_pair(store, "src", "tgt", train, test, one, "ridge")
    f_hat = Ridge(alpha=10.0, solver="svd").fit(z64, f64).predict(z_all[te].astype(np.float64))
    assert r1["ridge_form"] == "dual" and r1["alpha_scores"] == {}
    assert r1["mse"] == pytest.approx(np.mean((f - f_hat) ** 2), rel=1e-6)
    assert fit_pair(store, "tgt", "src", train, test, one, "ridge")["ridge_form"] == "primal"


def test_dual_and_primal_pair_rows_agree_when_forced(tmp_path):
    """n > C: the chosen form is primal; forcing dual gives the same results row."""
    store = Store(tmp_path / "store")
    train, test = DataRef("toy", "train"), DataRef("toy", "test")
    rng = np.random.default_rng(9)
    n, m, c, d = 120, 40, 8, 5
    z = rng.standard_normal((n + m, c)).astype(np.float32)
    f = (z @ rng.standard_normal((c, d)) + rng.standard_normal((n + m, d))).astype(np.float32)
    index = np.arange(n + m, dtype=np.int64)
    for model, logits, feats in (("a", z, f[:, :3]), ("b", f[:, :2], f)):
        _write(store, model, train, index[:n], logits[:n], feats[:n], logits.shape[1], 2)
        _write(store, model, test, index[n:], logits[n:], feats[n:], logits.shape[1], 2)
    fit = FitSpec(alphas=(0.0, 1.0, 100.0), val_fraction=0.25)
    auto, dual = source_stats(store, "a", train, fit), source_stats(store, "a", train, fit, form="dual")
    assert auto.form == "primal" and dual.form == "dual"
    p = fit_pair(store, "a", "b", train, test, fit, "ridge", auto)
    q = fit_pair(store, "a", "b", train, test, fit, "ridge", dual)
    assert (p["ridge_form"], q["ridge_form"]) == ("primal", "dual")
    # each form against scikit-learn / numpy on the validation rows the documented rule picks
    head = store.read_head(store.split_dir("b", test))
    best, scores, mse, agree = _expected(z[:n], f[:n], _weyl_mask(index[:n], 0.25), z[n:], f[n:], head, fit.alphas)
    for row in (p, q):
        assert row["alpha"] == best
        for a in fit.alphas:
            assert row["alpha_scores"][str(a)] == pytest.approx(scores[a], rel=1e-6)
        assert row["mse"] == pytest.approx(mse, rel=1e-6)
        assert row["agreement"] == pytest.approx(agree)


def test_dual_pair_rejects_targets_in_another_row_order(tmp_path):
    store = Store(tmp_path / "store")
    train, test = DataRef("toy", "train"), DataRef("toy", "test")
    rng = np.random.default_rng(11)
    z, f = rng.standard_normal((30, 50)).astype(np.float32), rng.standard_normal((30, 4)).astype(np.float32)
    index = np.arange(30, dtype=np.int64)
    _write(store, "s", train, index, z, f, 50, 0)
    _write(store, "t", train, index[::-1].copy(), z[::-1].copy()[:, :5], f[::-1].copy(), 5, 0)
    stats = source_stats(store, "s", train, FitSpec(alphas=(1.0,)))
    assert stats.form == "dual"
    with pytest.raises(ValueError, match="different order"):
        fit_pair(store, "s", "t", train, test, FitSpec(alphas=(1.0,)), "ridge", stats)


def test_source_stats_rejects_unknown_form(tmp_path):
    with pytest.raises(ValueError, match="ridge form"):
        source_stats(Store(tmp_path / "s"), "x", DataRef("toy", "train"), FitSpec(), form="kernel")


# ------------------------------------------------------------------------------------------ huge head
def test_huge_head_without_a_class_by_class_array():
    """C = 21,843 (an ImageNet-21k head), n = 300, D = 32: the C x C Gram alone would be 3.8 GB."""
    n, c, d = 300, 21_843, 32
    rng = np.random.default_rng(10)
    z = rng.standard_normal((n, c), dtype=np.float32)
    f = (z[:, :50] @ rng.standard_normal((50, d)) + rng.standard_normal((n, d))).astype(np.float32)
    val = rng.random(n) < 0.2
    alphas = [0.0, 1.0, 100.0, 1e4]
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        solver = DualSolver(z)
        fit_solver = solver.subset(~val)
        best, scores = select_alpha_dual(fit_solver, f[~val], fit_solver.project(z[val]), f[val], alphas)
        m = solver.solve(f, best)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"huge head: {seconds:.2f} s, peak traced {peak / 2**20:.0f} MiB")
    assert peak < 400 * 2**20, peak  # the float64 logits are 52 MB, the map 5.6 MB; C x C would be 3.8 GB
    assert seconds < 60
    assert m.weight.shape == (d, c) and set(scores) == set(alphas)
    # The refit interpolates nothing it should not: check it against the primal normal equations' residual,
    # Zc'(Zc A' - Fc) + alpha A' = 0, evaluated without any C x C product.
    z64, f64 = z.astype(np.float64), f.astype(np.float64)
    zc, fc = z64 - z64.mean(0), f64 - f64.mean(0)
    grad = zc.T @ (zc @ m.weight.T - fc) + best * m.weight.T
    assert np.abs(grad).max() < 1e-6 * np.abs(zc.T @ fc).max()
    # the intercept's own normal equation on the uncentered rows: the residuals sum to zero
    residual = z64 @ m.weight.T + m.bias - f64
    assert np.abs(residual.sum(0)).max() < 1e-8 * np.abs(f64).sum(0).max()


# ------------------------------------------------------------------------------------------ model-level CKA
def test_model_cka_checks_row_ids_before_pairing_rows(tmp_path):
    """Linear CKA of two models' test features against the direct formula; rows in another order are refused
    naming both models, not paired by position."""
    from featrec_grid.pairs import model_cka

    store = Store(tmp_path / "store")
    test = DataRef("toy", "test")
    rng = np.random.default_rng(16)
    index = np.arange(50, dtype=np.int64)
    x, y = rng.standard_normal((50, 6)).astype(np.float32), rng.standard_normal((50, 4)).astype(np.float32)
    y[:, :2] += x[:, :2]
    _write(store, "a", test, index, x[:, :3], x, 3, 0)
    _write(store, "b", test, index, y[:, :3], y, 3, 1)
    _write(store, "c", test, index[::-1].copy(), y[::-1, :3].copy(), y[::-1].copy(), 3, 2)
    out = model_cka(store, ["a", "b"], test, "features")
    xc, yc = (v.astype(np.float64) - v.astype(np.float64).mean(0) for v in (x, y))
    direct = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert out["cka"][0][1] == pytest.approx(direct, rel=1e-9) and out["rows"] == 50
    with pytest.raises(ValueError, match="models a and c hold different toy/test rows"):
        model_cka(store, ["a", "c"], test, "features")
