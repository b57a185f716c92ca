"""Model-level CKA matrix against pairwise CKA computed directly (Kornblith's formula, numpy)."""

import numpy as np
import pytest

from featrec_grid.cka import cka_matrix


def _direct(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_cka_matrix_equals_pairwise_direct():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((60, 5))
    reps = [base @ rng.standard_normal((5, d)) + 0.3 * rng.standard_normal((60, d)) for d in (4, 9, 30)]
    reps.append(rng.standard_normal((60, 7)))
    got = cka_matrix(reps)
    assert got.shape == (4, 4)
    for i, a in enumerate(reps):
        for j, b in enumerate(reps):
            assert got[i, j] == pytest.approx(_direct(a, b), rel=1e-10)
    assert np.allclose(np.diag(got), 1.0)


def test_debiased_matrix_equals_feature_space_debiased_cka():
    """Against linear_cka(debiased=True), which takes Kornblith's feature-space route when n > d."""
    from featrec_grid.cka import linear_cka

    rng = np.random.default_rng(1)
    reps = [rng.standard_normal((80, d)) + rng.standard_normal((80, 1)) for d in (3, 6)]
    reps[1][:, :3] += reps[0]
    got = cka_matrix(reps, debiased=True)
    assert got[0, 1] == pytest.approx(linear_cka(reps[0], reps[1], debiased=True), rel=1e-9)
