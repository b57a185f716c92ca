"""heads.head_analysis against references computed here with numpy.linalg and plain arithmetic."""

import math

import numpy as np
import pytest

from featrec_grid.errors import UserError
from featrec_grid.heads import head_analysis


def _head(c, d, n=200, seed=0):
    """A random head W [c, d], b [c], features F [n, d] and their exact logits Z = F W' + b."""
    rng = np.random.default_rng(seed)
    w, b, f = rng.normal(size=(c, d)), rng.normal(size=c), rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d)
    return w, b, f, f @ w.T + b


def _pinv_reference(w, b, f, z):
    """f^ = pinv(W)(z - b) and the projector P onto W's row space, from numpy.linalg.pinv."""
    pinv = np.linalg.pinv(w)
    return (z - b) @ pinv.T, pinv @ w


def test_full_column_rank_head_inverts_exactly():
    w, b, f, z = _head(20, 8)
    out = head_analysis(w, b, f, z)
    s = np.linalg.svd(w, compute_uv=False)
    assert out["head_rank"] == np.linalg.matrix_rank(w) == 8
    assert (out["feature_dim"], out["classes"], out["null_dims"]) == (8, 20, 0)
    assert out["exact_inverse"] is True and out["degenerate"] is False and out["zero_head"] is False
    assert out["sv_max"] == pytest.approx(s.max()) and out["sv_min"] == pytest.approx(s.min())
    assert out["sv_median"] == pytest.approx(np.median(s))
    assert out["condition"] == pytest.approx(s.max() / s.min())
    assert out["head_norm"] == pytest.approx(math.sqrt((w**2).sum()))
    assert out["pinv_mse"] < 1e-20
    assert out["pinv_r2"] == pytest.approx(1.0, abs=1e-12)
    assert out["pinv_agreement"] == 1.0
    assert out["rowspace_variance"] == pytest.approx(1.0, abs=1e-12)
    assert out["logit_variance"] == pytest.approx(np.mean([z[:, j].var() for j in range(20)]))
    assert out["logits_consistent"] is True
    assert "exact" in out["reason"]


def test_fewer_classes_than_dims_loses_the_null_space():
    w, b, f, z = _head(10, 32)
    out = head_analysis(w, b, f, z)
    f_hat, proj = _pinv_reference(w, b, f, z)
    centered = f - f.mean(axis=0)
    share = ((centered @ proj) ** 2).sum() / (centered**2).sum()
    assert out["head_rank"] == np.linalg.matrix_rank(w) == 10
    assert out["null_dims"] == 22 and out["exact_inverse"] is False and out["degenerate"] is False
    assert 0.1 < share < 0.9
    assert out["rowspace_variance"] == pytest.approx(share, rel=1e-10)
    assert out["pinv_mse"] == pytest.approx(np.mean((f_hat - f) ** 2), rel=1e-10)
    assert out["pinv_r2"] == pytest.approx(1 - ((f - f_hat) ** 2).sum() / (centered**2).sum(), rel=1e-10)
    agree = np.mean(np.argmax(f_hat @ w.T + b, axis=1) == np.argmax(z, axis=1))
    assert out["pinv_agreement"] == agree
    assert f"{100 * share:.1f}%" in out["reason"] and "22" in out["reason"]


def test_rank_deficient_head_with_more_classes_than_dims():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(20, 5)) @ rng.normal(size=(5, 8))
    b = rng.normal(size=20)
    f = rng.normal(size=(100, 8))
    out = head_analysis(w, b, f, f @ w.T + b)
    assert out["head_rank"] == np.linalg.matrix_rank(w) == 5
    assert out["degenerate"] is True and out["exact_inverse"] is False and out["null_dims"] == 3
    assert "rank 5" in out["reason"]


def test_rtol_sets_the_rank_cutoff():
    rng = np.random.default_rng(2)
    q1, _ = np.linalg.qr(rng.normal(size=(12, 6)))
    q2, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    s = 10 * np.array([1.0, 0.5, 0.1, 1e-3, 1e-5, 1e-7])
    w = (q1 * s) @ q2.T
    assert head_analysis(w, np.zeros(12))["head_rank"] == np.linalg.matrix_rank(w) == 6
    cut = 2e-3 * s.max()  # relative to sv_max: keeps 10, 5, 1 and drops 0.01
    assert head_analysis(w, np.zeros(12), rtol=2e-3)["head_rank"] == np.linalg.matrix_rank(w, tol=cut) == 3


def test_zero_head():
    rng = np.random.default_rng(3)
    b = rng.normal(size=6)
    f = rng.normal(size=(40, 4))
    z = np.tile(b, (40, 1))
    for w in (np.zeros((6, 4)), rng.normal(size=(6, 4)) * 1e-14):
        out = head_analysis(w, b, f, z)
        assert out["zero_head"] is True and out["degenerate"] is True and out["head_rank"] == 0
        assert out["null_dims"] == 4 and out["exact_inverse"] is False
        assert "zeros" in out["reason"]
        assert out["rowspace_variance"] == 0.0
        assert out["pinv_mse"] == pytest.approx(np.mean(f**2))  # pinv of a zero head is zero: f^ = 0
        assert out["pinv_r2"] == pytest.approx(1 - (f**2).sum() / ((f - f.mean(axis=0)) ** 2).sum())
        assert out["logits_consistent"] is True
    assert head_analysis(np.zeros((6, 4)), b)["condition"] == math.inf


def test_huge_head_uses_thin_svd_and_notes_the_gram_size():
    c, d, n = 21843, 64, 50
    w, b, f, z = _head(c, d, n=n, seed=4)
    out = head_analysis(w, b, f, z)
    assert out["head_rank"] == d and out["exact_inverse"] is True
    assert out["pinv_mse"] < 1e-20
    assert f"{c * c * 8 / 1e9:.1f} GB" in out["reason"] and "dual form" in out["reason"]
    assert "dual form" not in head_analysis(*_head(10_000, 8, n=2)[:2])["reason"]


def test_labels_give_test_accuracy_and_none_without_them():
    w, b, f, z = _head(5, 3, n=300)
    rng = np.random.default_rng(5)
    labels = np.where(rng.uniform(size=300) < 0.7, np.argmax(z, axis=1), rng.integers(0, 5, 300))
    out = head_analysis(w, b, f, z, labels)
    assert out["test_accuracy"] == np.mean(np.argmax(z, axis=1) == labels)
    assert 0.6 < out["test_accuracy"] < 1.0
    assert head_analysis(w, b, f, z)["test_accuracy"] is None  # None, like metrics' accuracy without labels


def test_head_only_leaves_data_fields_empty():
    w, b, _, _ = _head(10, 32)
    out = head_analysis(w, b)
    for key in ("logit_variance", "rowspace_variance", "pinv_mse", "pinv_r2", "pinv_agreement"):
        assert math.isnan(out[key])
    assert out["logits_consistent"] is None and out["test_accuracy"] is None
    assert "%" not in out["reason"] and "22" in out["reason"]
    assert all(isinstance(v, (int, float, bool, str, type(None))) for v in out.values())


def test_logits_consistency():
    w, b, f, z = _head(20, 8)
    rng = np.random.default_rng(6)
    assert head_analysis(w, b, f, z.astype(np.float32))["logits_consistent"] is True
    assert head_analysis(w, b, f, rng.normal(size=z.shape) * z.std())["logits_consistent"] is False
    assert head_analysis(w, b, f, z + 0.01 * np.abs(z).max())["logits_consistent"] is False


@pytest.mark.parametrize(
    "change, name",
    [
        ({"weight": np.ones(8)}, "weight"),
        ({"weight": [["a", "b"]]}, "weight"),
        ({"bias": np.ones(7)}, "bias"),
        ({"features": np.ones((30, 9))}, "features"),
        ({"features": np.ones((0, 8))}, "features"),
        ({"logits": np.ones((29, 20))}, "logits"),
        ({"logits": np.ones((30, 19))}, "logits"),
        ({"labels": np.zeros(29, dtype=int)}, "labels"),
        ({"labels": np.zeros(30)}, "labels"),
        ({"labels": np.zeros(30, dtype=int), "logits": None}, "labels"),
        ({"weight": np.full((20, 8), np.nan)}, "weight"),
        ({"bias": np.full(20, np.inf)}, "bias"),
        ({"features": np.full((30, 8), np.nan)}, "features"),
        ({"logits": np.full((30, 20), np.nan)}, "logits"),
    ],
)
def test_bad_inputs_name_the_array(change, name):
    w, b, f, z = _head(20, 8, n=30)
    args = {"weight": w, "bias": b, "features": f, "logits": z, "labels": None, **change}
    with pytest.raises(UserError, match=rf"^{name}: "):
        head_analysis(**args)


def _self_agreement_by_lstsq(f_train, f_test, w, b):
    """A self pair fitted with numpy's lstsq (alpha 0) on the train rows: agreement of the head on the test rows."""
    z_train, z_test = f_train @ w.T + b, f_test @ w.T + b
    zc = z_train - z_train.mean(0)
    coef = np.linalg.lstsq(zc, f_train - f_train.mean(0), rcond=None)[0]
    f_hat = (z_test - z_train.mean(0)) @ coef + f_train.mean(0)
    return np.mean((f_hat @ w.T + b).argmax(1) == z_test.argmax(1))


@pytest.mark.parametrize(("rows", "exact"), [(40, True), (11, True), (10, False), (6, False)])
def test_self_pair_exactness_says_when_alpha_zero_gives_agreement_one(rows, exact):
    """C = 10 classes, D = 20 features: W has rank 10, so exactness needs more than 10 train rows."""
    from featrec_grid.heads import self_pair_exactness

    rng = np.random.default_rng(rows)
    w, b = rng.standard_normal((10, 20)), rng.standard_normal(10)
    f_train, f_test = rng.standard_normal((rows, 20)), rng.standard_normal((500, 20))
    out = self_pair_exactness(f_train @ w.T + b, w)
    assert (out["train_rows"], out["head_rank"], out["exact"]) == (rows, 10, exact)
    assert out["train_logit_rank"] == min(rows - 1, 10)
    agreement = _self_agreement_by_lstsq(f_train, f_test, w, b)
    if exact:
        assert agreement == 1.0 and out["note"].startswith("exact")
    else:
        assert agreement < 1.0 and "not guaranteed" in out["note"]


def test_self_pair_exactness_with_a_low_rank_head():
    """A head of rank 3 (C = 10): 5 train rows suffice."""
    from featrec_grid.heads import self_pair_exactness

    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 3)) @ rng.standard_normal((3, 20))
    f_train = rng.standard_normal((5, 20))
    out = self_pair_exactness(f_train @ w.T, w)
    assert (out["head_rank"], out["train_logit_rank"], out["exact"]) == (3, 3, True)
    assert _self_agreement_by_lstsq(f_train, rng.standard_normal((300, 20)), w, np.zeros(10)) == 1.0


@pytest.mark.parametrize(("train_rows", "exact"), [(60, True), (8, False)])
def test_self_pair_row_and_report_table_say_when_alpha_zero_is_exact(tmp_path, train_rows, exact):
    """A self pair fitted at alpha 0 from shards: its row's train_logit_rank is the rank of the centered train logits
    (numpy.linalg.matrix_rank), and the report's self-pair table calls it exact exactly when that reaches rank(W);
    the measured agreement is 1.0 when exact and below 1.0 here when not (C = 10, D = 20)."""
    import pandas as pd

    from featrec_grid.pairs import fit_pair
    from featrec_grid.publish import self_pair_table
    from featrec_grid.refs import DataRef
    from featrec_grid.spec import FitSpec
    from featrec_grid.store import Store

    rng = np.random.default_rng(train_rows)
    w, b = rng.standard_normal((10, 20)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    store = Store(str(tmp_path))
    train, test = DataRef("digits", "train"), DataRef("digits", "test")
    logits = {}
    for data, rows in ((train, train_rows), (test, 400)):
        f = rng.standard_normal((rows, 20)).astype(np.float32)
        index = np.arange(rows, dtype=np.int64)
        logits[data.split] = f @ w.T + b
        store.write_split(store.split_dir("m", data), meta={"key": "k", "model": "m", "dataset": "digits",
                          "split": data.split}, head=(w, b), batches=[(index, index % 10, logits[data.split], f)])  # fmt: skip
    row = fit_pair(store, "m", "m", train, test, FitSpec(alphas=(0.0,)), "ridge", resamples=10)
    z = logits["train"].astype(np.float64)
    assert row["train_logit_rank"] == np.linalg.matrix_rank(z - z.mean(0)) == min(train_rows - 1, 10)
    results = pd.DataFrame([{**row, "setting": "s", "mode": "default"}])
    table = self_pair_table(results, pd.DataFrame({"model": ["m"], "head_rank": [np.linalg.matrix_rank(w)]}))
    assert table["exact at alpha 0"].tolist() == [exact]
    if exact:
        assert row["agreement"] == 1.0
    else:
        assert row["agreement"] < 1.0 and "not guaranteed" in table["note"].iloc[0]
