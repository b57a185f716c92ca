"""A pair's bootstrap intervals and drill-down data from the streamed evaluation, against direct numpy/sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.metrics import r2_score

from featrec_grid.linmap import LinearMap
from featrec_grid.pairs import decode_replicates, evaluate
from featrec_grid.refs import DataRef
from featrec_grid.store import Store

N, C_SRC, D, C = 230, 7, 12, 6
TEST = DataRef("toy", "test")


def _write(store, model, index, logits, features, head, labels):
    meta = {"key": f"{model}-toy", "model": model, "dataset": "toy", "split": "test"}
    batches = [(index[:90], labels[:90], logits[:90], features[:90]), (index[90:], labels[90:], logits[90:], features[90:])]
    store.write_split(store.split_dir(model, TEST), meta=meta, batches=batches, head=head, rows_per_shard=37)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    rng = np.random.default_rng(3)
    store = Store(tmp_path_factory.mktemp("store"))
    index = np.sort(rng.permutation(5000)[:N]).astype(np.int64)
    labels = rng.integers(0, C, N).astype(np.int64)
    z = rng.standard_normal((N, C_SRC)).astype(np.float32)
    f = (z @ rng.standard_normal((C_SRC, D)) + 0.8 * rng.standard_normal((N, D)) + 2).astype(np.float32)
    head = (rng.standard_normal((C, D)).astype(np.float32), rng.standard_normal(C).astype(np.float32))
    _write(store, "src", index, z, rng.standard_normal((N, 4)).astype(np.float32), (np.eye(C_SRC, 4, dtype=np.float32),
           np.zeros(C_SRC, np.float32)), labels)  # fmt: skip
    _write(store, "tgt", index, rng.standard_normal((N, C)).astype(np.float32), f, head, labels)
    linmap = LinearMap(rng.standard_normal((D, C_SRC)) * 0.5, rng.standard_normal(D))
    f_hat = z.astype(np.float64) @ linmap.weight.T + linmap.bias
    return store, linmap, index, labels, f.astype(np.float64), f_hat, head


def test_intervals_and_replicates_equal_direct_resampling(case):
    store, linmap, _, labels, f, f_hat, (w, b) = case
    row = evaluate(store, "src", "tgt", TEST, linmap, ci=0.8, resamples=40, seed=5)
    draws = np.random.default_rng(5).integers(0, N, size=(40, N))
    real, recon = (f @ w.T + b).argmax(1), (f_hat @ w.T + b).argmax(1)
    agree = np.array([np.mean(real[d] == recon[d]) for d in draws])
    r2 = np.array([r2_score(f[d], f_hat[d], multioutput="variance_weighted") for d in draws])
    np.testing.assert_allclose(decode_replicates(row["detail"]["replicates"]["agreement"]), agree, atol=1e-6)
    np.testing.assert_allclose(decode_replicates(row["detail"]["replicates"]["r2"]), r2, rtol=1e-5)
    assert row["agreement_lo"] == pytest.approx(np.percentile(agree, 10))
    assert row["agreement_hi"] == pytest.approx(np.percentile(agree, 90))
    assert row["r2_lo"] == pytest.approx(np.percentile(r2, 10), rel=1e-9)
    assert row["ci"] == 0.8 and row["resamples"] == 40
    for metric in ("agreement", "r2", "mse", "cosine"):
        assert row[f"{metric}_lo"] <= row[metric] <= row[f"{metric}_hi"]
    assert row["accuracy_real_lo"] is None or row["accuracy_real_lo"] <= row["accuracy_real"]


def test_drill_down_data_against_direct_computation(case):
    store, linmap, index, labels, f, f_hat, (w, b) = case
    detail = evaluate(store, "src", "tgt", TEST, linmap, resamples=10)["detail"]
    real, recon = (f @ w.T + b).argmax(1), (f_hat @ w.T + b).argmax(1)

    counts = np.bincount(real, minlength=C)
    order = [k for k in np.argsort(-counts, kind="stable") if counts[k]]
    assert detail["classes"]["class"] == [int(k) for k in order]
    np.testing.assert_allclose(detail["classes"]["agreement"], [np.mean(recon[real == k] == k) for k in order],
                               rtol=1e-3)  # fmt: skip

    per_dim = np.sort(r2_score(f, f_hat, multioutput="raw_values"))[::-1]
    assert detail["dim_r2"]["dims"] == D
    np.testing.assert_allclose(detail["dim_r2"]["r2"], per_dim, rtol=1e-3, atol=1e-6)

    pca = PCA(2).fit(f[:150])
    got_real, got_recon = np.array(detail["pca"]["real"]).T, np.array(detail["pca"]["recon"]).T
    signs = np.sign(np.sum(got_real * pca.transform(f[:150]), axis=0))  # principal axes are defined up to sign
    np.testing.assert_allclose(got_real * signs, pca.transform(f[:150]), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got_recon * signs, pca.transform(f_hat[:150]), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(detail["pca"]["variance_share"], pca.explained_variance_ratio_, rtol=1e-3)

    wrong = np.flatnonzero(real != recon)[:12]
    assert detail["disagree"] == [{"row": int(index[i]), "real": int(real[i]), "recon": int(recon[i]),
                                   "label": int(labels[i])} for i in wrong]  # fmt: skip
