"""The closed form against numpy.linalg.lstsq and scikit-learn Ridge; moments against direct computation."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from featrec_grid.linmap import (
    DualSolver,
    LinearMap,
    Moments,
    RidgeSolver,
    accumulate,
    fit_sgd,
    select_alpha,
    sse,
)


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


def test_sgd_recipe_equals_a_numpy_momentum_sgd_loop():
    """The seed's recipe (Linear init under the seed, MSE, SGD with momentum, batches in data order) against the
    same updates written out in numpy float64: v = momentum v + grad, w -= lr v, grad of the mean squared error."""
    import torch

    z, f = _data(n=300, c=6, d=3, seed=5)
    z, f = z / 10, f / 10  # keeps lr 0.05 stable
    epochs, lr, momentum, batch = 3, 0.05, 0.9, 64
    got = fit_sgd(z, f, epochs=epochs, lr=lr, momentum=momentum, batch_size=batch, seed=7)
    torch.manual_seed(7)
    init = torch.nn.Linear(6, 3)
    w, b = init.weight.detach().double().numpy().copy(), init.bias.detach().double().numpy().copy()
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    z64, f64 = z.astype(np.float64), f.astype(np.float64)
    for _ in range(epochs):
        for start in range(0, len(z64), batch):
            zb, fb = z64[start : start + batch], f64[start : start + batch]
            r = (zb @ w.T + b - fb) * (2.0 / fb.size)
            vw, vb = momentum * vw + r.T @ zb, momentum * vb + r.sum(0)
            w, b = w - lr * vw, b - lr * vb
    np.testing.assert_allclose(got.weight, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.bias, b, rtol=1e-4, atol=1e-5)


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


def _ill_conditioned(n, c, d, seed, smallest):
    """Logits with centered singular values from 1 down to `smallest` (cond(S_zz) = smallest**-2), an offset,
    and features linear in them plus noise: the centered design is exactly U diag(s) V'."""
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((n, min(n - 1, c)))
    raw -= raw.mean(0)  # columns orthogonal to the ones vector: centering leaves them as they are
    u = np.linalg.qr(raw)[0]
    v = np.linalg.qr(rng.standard_normal((c, c)))[0][:, : u.shape[1]]
    s = np.logspace(0, np.log10(smallest), u.shape[1]) * 30.0
    z = (u * s) @ v.T + rng.standard_normal(c) * 4.0
    f = z @ rng.standard_normal((c, d)) + 0.1 * rng.standard_normal((n, d)) + 1.0
    return z, f


def _lstsq(z, f):
    """numpy's own minimum-norm least squares with an intercept column, its default rcond."""
    x = np.hstack([z, np.ones((len(z), 1))])
    coef = np.linalg.lstsq(x, f, rcond=None)[0]
    return coef[:-1].T, coef[-1]


@pytest.mark.parametrize("smallest", [10**-5.5, 1e-9])
def test_alpha_zero_is_numpy_lstsq_on_ill_conditioned_logits(smallest):
    """cond(Zc) = 3e5 and 1e9 (Lite0 at 32 px: 1.5e9): every direction is real, so alpha = 0 must be
    numpy.linalg.lstsq's solution (weights, predictions on train and new rows); the former cutoff (eigenvalues
    of S_zz below 1e-10 of the largest) dropped the smallest directions, and so would any eigendecomposition of
    the squared Gram at cond 1e9."""
    z, f = _ill_conditioned(400, 30, 6, seed=12, smallest=smallest)
    z_new = _ill_conditioned(50, 30, 6, seed=13, smallest=1.0)[0]
    weight, bias = _lstsq(z, f)
    m = RidgeSolver(Moments.of(z)).solve(Moments.of(z, f), 0.0)
    assert RidgeSolver(Moments.of(z)).rank == 30
    # weights along the tiniest direction are ~1/s_min, and S_zf = Zc'Fc carries about n * eps * s_max of
    # rounding into it: a relative accuracy of cond(Zc) * n * eps (1e-4 at cond 1e9), not lstsq's cond * eps
    tol = max(1e-5, 10 * 400 * np.finfo(float).eps / smallest)
    np.testing.assert_allclose(m.weight, weight, rtol=0, atol=tol * np.abs(weight).max())
    np.testing.assert_allclose(m.predict(z), z @ weight.T + bias, rtol=0, atol=1e-7 * np.abs(f).max())
    new = z_new @ weight.T + bias  # new rows have every direction at scale 1: the tiny ones' weights are huge
    np.testing.assert_allclose(m.predict(z_new), new, rtol=0, atol=tol * np.abs(new).max())
    old = RidgeSolver(Moments.of(z), rcond=1e-5).solve(Moments.of(z, f), 0.0)  # the former cutoff, as sv ratio
    assert np.abs(old.predict(z) - (z @ weight.T + bias)).max() > 1e-3  # what the issue found: 0.998 vs 1.0
    gram = Moments.of(z)
    gram.r = None  # S_zz alone: its eigenvalues cannot resolve singular values below sqrt(eps) of the largest
    assert (RidgeSolver(gram).rank < 30) == (smallest < 1e-7)


def test_alpha_zero_drops_only_exactly_degenerate_directions():
    """Logits of rank 5 in 12 columns (exact linear copies): the 7 degenerate directions are dropped (numpy's own
    matrix_rank agrees) and the map is pinv's minimum-norm solution."""
    rng = np.random.default_rng(14)
    base = rng.standard_normal((300, 5)) * [1.0, 1e-2, 1e-3, 1e-4, 1e-5]
    z = np.hstack([base, base @ rng.standard_normal((5, 7))]) + 3.0
    f = base @ rng.standard_normal((5, 4)) + 0.01 * rng.standard_normal((300, 4))
    solver = RidgeSolver(Moments.of(z))
    assert solver.rank == np.linalg.matrix_rank(z - z.mean(0)) == 5
    # minimum norm among the weights (the intercept is not penalised): numpy's lstsq on the centered arrays
    zc, fc = z - z.mean(0), f - f.mean(0)
    weight = np.linalg.lstsq(zc, fc, rcond=None)[0].T
    m = solver.solve(Moments.of(z, f), 0.0)
    np.testing.assert_allclose(m.predict(z), zc @ weight.T + f.mean(0), atol=1e-8)
    np.testing.assert_allclose(m.weight, weight, rtol=0, atol=1e-5 * np.abs(weight).max())
    null = np.linalg.svd(zc)[2][5:]  # no weight on the 7 null directions
    assert np.abs(m.weight @ null.T).max() <= 1e-5 * np.abs(m.weight).max()


def test_float32_logits_drop_only_directions_below_their_own_rounding():
    """float32 logits with centered singular values down to 1e-10 of the largest: directions at or below
    2^-24 * ||Z||_F (the rounding of the stored values, computed here with numpy's SVD) are dropped, every other
    kept; the map equals numpy's truncated SVD solution with that rule, and a self pair's head reproduces the
    test logits (agreement 1.0), which fitting the rounding noise as well does not guarantee."""
    rng = np.random.default_rng(17)
    n, c, d = 500, 40, 60
    w, b = rng.standard_normal((c, d)), rng.standard_normal(c)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scales = np.logspace(0, -10, d)

    def feats(rows):
        return (rng.standard_normal((rows, d)) * scales) @ basis.T + 1.0

    f, f_test = feats(n), feats(400)
    z, z_test = (f @ w.T + b).astype(np.float32), (f_test @ w.T + b).astype(np.float32)
    z64 = z.astype(np.float64)
    zc, fc = z64 - z64.mean(0), f - f.mean(0)
    u, sv, vt = np.linalg.svd(zc, full_matrices=False)
    floor = max(2.0**-24 * np.linalg.norm(z64), np.finfo(float).eps * max(n, c) * sv[0])
    keep = sv > floor
    assert 0 < keep.sum() < c  # some directions lie below the float32 floor
    solver = RidgeSolver(Moments.of(z))
    assert solver.rank == keep.sum() == DualSolver(z).rank
    weight = (vt[keep].T @ ((u[:, keep].T @ fc) / sv[keep, None])).T
    m = solver.solve(Moments.of(z, f), 0.0)
    assert sv[0] / sv[keep][-1] > 1e5  # the smallest kept direction is ill-conditioned: weights to ~1e-5
    np.testing.assert_allclose(m.weight, weight, rtol=0, atol=1e-4 * np.abs(weight).max())
    f_hat = m.predict(z_test.astype(np.float64))
    assert np.mean((f_hat @ w.T + b).argmax(1) == (f_test @ w.T + b).argmax(1)) == 1.0
