"""Metrics against direct formulas and scikit-learn; the streaming accumulator against the array functions."""

import numpy as np
import pytest
from sklearn.metrics import r2_score

from featrec_grid import metrics as M


def _case(n=700, d=9, c=5, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, d)) + 3
    f_hat = f + 0.5 * rng.standard_normal((n, d))
    w, b = rng.standard_normal((c, d)), rng.standard_normal(c)
    labels = rng.integers(0, c, n)
    return f, f_hat, w, b, labels


def test_array_metrics_against_references():
    f, f_hat, w, b, labels = _case()
    assert M.mse(f, f_hat) == pytest.approx(((f - f_hat) ** 2).mean())
    # pooled R2 = sklearn's variance_weighted R2
    assert M.r2(f, f_hat) == pytest.approx(r2_score(f, f_hat, multioutput="variance_weighted"))
    # seed total: 700 rows = batches of 256, 256, 188
    parts = [((f[i:j] - f_hat[i:j]) ** 2).mean() for i, j in [(0, 256), (256, 512), (512, 700)]]
    assert M.mse_total_seed(f, f_hat) == pytest.approx(sum(parts))
    cos = [fi @ gi / np.linalg.norm(fi) / np.linalg.norm(gi) for fi, gi in zip(f, f_hat, strict=True)]
    assert M.cosine(f, f_hat) == pytest.approx(np.mean(cos))
    la, lb = f @ w.T + b, f_hat @ w.T + b
    assert M.agreement(la, lb) == pytest.approx(np.mean(la.argmax(1) == lb.argmax(1)))
    assert M.accuracy(la, labels) == pytest.approx(np.mean(la.argmax(1) == labels))


@pytest.mark.parametrize("chunks", [[700], [100, 300, 300], [255, 2, 443], [1] * 20 + [680]])
def test_streaming_equals_arrays(chunks):
    f, f_hat, w, b, labels = _case()
    acc = M.PairMetrics(w, b)
    start = 0
    for size in chunks:
        acc.update(f[start : start + size], f_hat[start : start + size], labels[start : start + size])
        start += size
    got = acc.result()
    la, lb = f @ w.T + b, f_hat @ w.T + b
    assert got["mse"] == pytest.approx(M.mse(f, f_hat), rel=1e-12)
    assert got["mse_total_seed"] == pytest.approx(M.mse_total_seed(f, f_hat), rel=1e-12)
    assert got["r2"] == pytest.approx(M.r2(f, f_hat), rel=1e-9)
    assert got["agreement"] == pytest.approx(M.agreement(la, lb))
    assert got["cosine"] == pytest.approx(M.cosine(f, f_hat), rel=1e-12)
    assert got["accuracy_real"] == pytest.approx(M.accuracy(la, labels))
    assert got["accuracy_recon"] == pytest.approx(M.accuracy(lb, labels))


def test_without_labels_accuracy_is_none():
    f, f_hat, w, b, _ = _case()
    acc = M.PairMetrics(w, b, with_labels=False)
    acc.update(f, f_hat)
    assert acc.result()["accuracy_real"] is None
