"""The closed form against numpy.linalg.lstsq and scikit-learn Ridge; moments against direct computation."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from featrec_grid.linmap import LinearMap, Moments, RidgeSolver, accumulate, fit_sgd, select_alpha, sse


def _data(n=600, c=12, d=7, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * rng.uniform(0.5, 3, c) + rng.standard_normal(c) * 5
    a = rng.standard_normal((d, c))
    f = z @ a.T + rng.standard_normal(d) + noise * rng.standard_normal((n, d))
    return z.astype(np.float32), f.astype(np.float32)


def _batches(z, f, size):
    return [(z[i : i + size], f[i : i + size]) for i in range(0, len(z), size)]


def test_moments_streaming_equal_direct():
    z, f = _data()
    m = accumulate(_batches(z, f, 97))
    z64, f64 = z.astype(np.float64), f.astype(np.float64)
    zc, fc = z64 - z64.mean(0), f64 - f64.mean(0)
    assert m.n == len(z)
    np.testing.assert_allclose(m.mean_x, z64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.sxy, zc.T @ fc, rtol=1e-10, atol=1e-8)
    assert m.syy == pytest.approx((fc**2).sum(), rel=1e-12)
    zz = accumulate((b, None) for b, _ in _batches(z, f, 50))
    np.testing.assert_allclose(zz.sxy, zc.T @ zc, rtol=1e-10, atol=1e-8)


def test_least_squares_matches_lstsq():
    z, f = _data()
    solver = RidgeSolver(accumulate((b, None) for b, _ in _batches(z, f, 128)))
    m = solver.solve(accumulate(_batches(z, f, 128)), alpha=0.0)
    x = np.hstack([z, np.ones((len(z), 1))]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(x, f.astype(np.float64), rcond=None)
    np.testing.assert_allclose(m.weight, coef[:-1].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(m.bias, coef[-1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.1, 10.0, 1000.0])
def test_ridge_matches_sklearn_with_unpenalised_intercept(alpha):
    z, f = _data(seed=1)
    solver = RidgeSolver(Moments.of(z))
    m = solver.solve(Moments.of(z, f), alpha=alpha)
    ref = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(z.astype(np.float64), f.astype(np.float64))
    np.testing.assert_allclose(m.weight, ref.coef_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(m.bias, ref.intercept_, rtol=1e-7, atol=1e-8)


def test_rank_deficient_least_squares_is_minimum_norm():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((200, 4))
    z = np.hstack([base, base @ rng.standard_normal((4, 6))])  # 10 columns, rank 4
    f = base @ rng.standard_normal((4, 5)) + 1.0
    m = RidgeSolver(Moments.of(z)).solve(Moments.of(z, f), 0.0)
    zc = z - z.mean(0)
    ref = np.linalg.pinv(zc) @ (f - f.mean(0))
    np.testing.assert_allclose(m.weight, ref.T, atol=1e-8)
    np.testing.assert_allclose(m.predict(z), f, atol=1e-8)


def test_sse_from_moments_equals_direct_residuals():
    z, f = _data(seed=2)
    m = LinearMap(np.random.default_rng(0).standard_normal((f.shape[1], z.shape[1])), np.arange(f.shape[1]) * 0.1)
    direct = float(((f.astype(np.float64) - m.predict(z.astype(np.float64))) ** 2).sum())
    assert sse(m, Moments.of(z, f), Moments.of(z)) == pytest.approx(direct, rel=1e-9)


def test_select_alpha_picks_validation_minimum():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((120, 60))
    f = z[:, :3] @ rng.standard_normal((3, 4)) + 2.0 * rng.standard_normal((120, 4))  # few rows, many inputs
    zf, zv, ff, fv = z[:80], z[80:], f[:80], f[80:]
    alphas = [0.0, 1.0, 10.0, 100.0, 1000.0]
    best, scores = select_alpha(RidgeSolver(Moments.of(zf)), Moments.of(zf, ff), Moments.of(zv), Moments.of(zv, fv), alphas)
    direct = {a: np.mean((Ridge(alpha=a if a else 1e-12).fit(zf, ff).predict(zv) - fv) ** 2) for a in alphas}
    for a in alphas:
        assert scores[a] == pytest.approx(direct[a], rel=1e-5)
    assert best == min(direct, key=direct.get)
    assert best > 0  # overfitting at alpha 0 with 60 inputs and 80 rows


def test_sgd_recipe_is_worse_or_equal_to_closed_form():
    z, f = _data(n=512, seed=5)
    closed = RidgeSolver(Moments.of(z)).solve(Moments.of(z, f), 0.0)
    sgd = fit_sgd(z / 10, f, epochs=5, lr=0.01)  # scaled input keeps the seed's recipe stable here
    err_closed = np.mean((closed.predict(z) - f) ** 2)
    err_sgd = np.mean((sgd.predict(z / 10) - f) ** 2)
    assert err_closed <= err_sgd
    assert sgd.weight.shape == closed.weight.shape


# ------------------------------------------------------------------------------------------ dual form
def test_dual_matches_primal_when_rows_exceed_logits():
    """Both forms are valid for n > C: the same weights and bias at every alpha, least squares included."""
    from featrec_grid.linmap import DualSolver

    z, f = _data(n=150, c=12, d=5, seed=6)
    primal, dual = RidgeSolver(Moments.of(z)), DualSolver(z)
    assert dual.rank == primal.rank == 12
    for alpha in [0.0, 0.01, 1.0, 100.0]:
        p, d = primal.solve(Moments.of(z, f), alpha), dual.solve(f, alpha)
        np.testing.assert_allclose(d.weight, p.weight, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(d.bias, p.bias, rtol=1e-7, atol=1e-7)


def test_select_alpha_dual_equals_select_alpha():
    """Same held-out scores and choice from the dual form as from moments, on a subset sharing the logits."""
    from featrec_grid.linmap import DualSolver, select_alpha_dual

    rng = np.random.default_rng(7)
    z = rng.standard_normal((120, 60)) + 3.0
    f = z[:, :3] @ rng.standard_normal((3, 4)) + 2.0 * rng.standard_normal((120, 4))
    val = rng.random(120) < 0.3
    alphas = [0.0, 1.0, 10.0, 100.0, 1000.0]
    ref_best, ref = select_alpha(
        RidgeSolver(Moments.of(z[~val])), Moments.of(z[~val], f[~val]), Moments.of(z[val]), Moments.of(z[val], f[val]), alphas
    )
    fit_solver = DualSolver(z).subset(~val)
    best, scores = select_alpha_dual(fit_solver, f[~val], fit_solver.project(z[val]), f[val], alphas)
    assert best == ref_best
    for a in alphas:
        assert scores[a] == pytest.approx(ref[a], rel=1e-8)
