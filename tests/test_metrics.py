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


@pytest.mark.parametrize("chunks", [[700], [100, 300, 300], [1] * 5 + [695]])
def test_bootstrap_replicates_equal_metrics_on_resampled_rows(chunks):
    """Each replicate equals the metric computed directly on that resample's rows (numpy indexing, sklearn's R2),
    and the interval is numpy's percentile of those values."""
    f, f_hat, w, b, labels = _case()
    resamples, seed = 50, 7
    acc = M.PairMetrics(w, b, counts=M.resample_counts(len(f), resamples, seed))
    start = 0
    for size in chunks:
        acc.update(f[start : start + size], f_hat[start : start + size], labels[start : start + size])
        start += size
    got = acc.replicates()
    draws = np.random.default_rng(seed).integers(0, len(f), size=(resamples, len(f)))
    for r, rows in enumerate(draws):
        fr, gr, lr = f[rows], f_hat[rows], labels[rows]
        real, recon = (fr @ w.T + b).argmax(1), (gr @ w.T + b).argmax(1)
        cos = np.sum(fr * gr, 1) / np.linalg.norm(fr, axis=1) / np.linalg.norm(gr, axis=1)
        assert got["agreement"][r] == pytest.approx(np.mean(real == recon), abs=1e-12)
        assert got["mse"][r] == pytest.approx(np.mean((fr - gr) ** 2), rel=1e-10)
        assert got["r2"][r] == pytest.approx(r2_score(fr, gr, multioutput="variance_weighted"), rel=1e-9)
        assert got["cosine"][r] == pytest.approx(np.mean(cos), rel=1e-10)
        assert got["accuracy_real"][r] == pytest.approx(np.mean(real == lr), abs=1e-12)
        assert got["accuracy_recon"][r] == pytest.approx(np.mean(recon == lr), abs=1e-12)
    intervals = acc.intervals(0.9)
    assert intervals["agreement_lo"] == pytest.approx(np.percentile(got["agreement"], 5))
    assert intervals["agreement_hi"] == pytest.approx(np.percentile(got["agreement"], 95))
    assert intervals["r2_lo"] < acc.result()["r2"] < intervals["r2_hi"]


def test_bootstrap_resamples_are_shared_and_seeded():
    a, b = M.resample_counts(30, 20, 3), M.resample_counts(30, 20, 3)
    assert np.array_equal(a, b) and (a.sum(axis=1) == 30).all()
    assert not np.array_equal(a, M.resample_counts(30, 20, 4))
    f, f_hat, w, bias, _ = _case(n=30)
    acc = M.PairMetrics(w, bias, with_labels=False, counts=M.resample_counts(20, 5))
    with pytest.raises(ValueError, match="more rows than the 20"):
        acc.update(f, f_hat)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        M.percentile_interval(np.ones(3), 1.0)
