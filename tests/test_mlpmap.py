"""The MLP map against numpy least squares and direct computation: where it must beat, match and stop."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from featrec_grid.errors import UserError
from featrec_grid.mlpmap import SEARCH_SPACE, MLPConfig, MLPMap, config_from, fit_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _lstsq(z_fit, f_fit):
    """Least squares with an intercept, by numpy: returns a predict function."""
    x = np.hstack([z_fit, np.ones((len(z_fit), 1))])
    coef, *_ = np.linalg.lstsq(x, f_fit, rcond=None)
    return lambda z: np.hstack([z, np.ones((len(z), 1))]) @ coef


def _mse(a, b):
    return float(np.mean((np.asarray(a, dtype=np.float64) - b) ** 2))


def _split(n, n_test, val_fraction, seed):
    """Test rows at the end; a random val mask over the remaining train rows."""
    rng = np.random.default_rng(seed)
    return n - n_test, rng.random(n - n_test) < val_fraction


def _nonlinear(n=2000, c=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * rng.uniform(0.5, 3, c) + rng.standard_normal(c)
    a = rng.standard_normal((c, d)) * 1.5 / np.sqrt(c) / z.std(0)[:, None]
    f = np.tanh((z - z.mean(0)) @ a) * 3 + 0.05 * rng.standard_normal((n, d))
    return z.astype(np.float32), f.astype(np.float32)


def _linear(n=2000, c=16, d=8, seed=1, noise=0.3):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * rng.uniform(0.5, 3, c) + rng.standard_normal(c) * 5
    f = z @ rng.standard_normal((c, d)) + rng.standard_normal(d) * 4 + noise * rng.standard_normal((n, d))
    return z.astype(np.float32), f.astype(np.float32)


def test_nonlinear_data_beats_least_squares():
    z, f = _nonlinear()
    n_train, val = _split(len(z), 400, 0.2, seed=0)
    cfg = MLPConfig(hidden=128, lr=3e-3, batch_size=64, max_epochs=80, seed=0)  # default min_steps: 1000
    reported = []
    m = fit_mlp(z[:n_train], f[:n_train], val, cfg, report=lambda e, v: reported.append((e, v)))
    ref = _lstsq(z[:n_train][~val].astype(np.float64), f[:n_train][~val].astype(np.float64))
    z_test, f_test = z[n_train:], f[n_train:].astype(np.float64)
    mlp_mse, lin_mse = _mse(m.predict(z_test.astype(np.float64)), f_test), _mse(ref(z_test), f_test)
    assert mlp_mse < 0.3 * lin_mse, (mlp_mse, lin_mse, m.info)
    assert m.info["best_val_mse"] < 0.3 * m.info["init_val_mse"]
    assert [e for e, _ in reported] == list(range(1, m.info["epochs"] + 1))
    assert min(v for _, v in reported) == m.info["best_val_mse"]


def test_linear_data_matches_least_squares():
    z, f = _linear()
    n_train, val = _split(len(z), 500, 0.2, seed=1)
    cfg = MLPConfig(hidden=256, max_epochs=40, patience=5, min_steps=100, seed=0)
    reported = []
    m = fit_mlp(z[:n_train], f[:n_train], val, cfg, report=lambda e, v: reported.append(v))
    z_fit, f_fit = z[:n_train][~val].astype(np.float64), f[:n_train][~val].astype(np.float64)
    ref = _lstsq(z_fit, f_fit)
    # the start is the least-squares fit of the train rows (standardisation undone): same val error as numpy's
    z_val, f_val = z[:n_train][val].astype(np.float64), f[:n_train][val].astype(np.float64)
    lin_val = _mse(ref(z_val), f_val)
    assert 0.98 * lin_val <= m.info["init_val_mse"] <= lin_val * (1 + 1e-4)  # ridge chosen on val: never worse
    assert len(reported) == m.info["epochs"] >= 20  # min_steps=100 at 5 steps an epoch
    assert max(reported) < 1.25 * lin_val  # training never drifts far from the linear answer, even unrestored
    assert m.info["best_val_mse"] <= m.info["init_val_mse"]  # the linear start is a candidate: never worse
    z_test, f_test = z[n_train:].astype(np.float64), f[n_train:].astype(np.float64)
    mlp_mse, lin_mse = _mse(m.predict(z_test), f_test), _mse(ref(z_test), f_test)
    assert lin_mse == pytest.approx(0.3**2, rel=0.15)  # the data are as noisy as intended
    assert mlp_mse < 1.25 * lin_mse, (mlp_mse, lin_mse, m.info)
    assert m.info["train_rows"] == int((~val).sum()) and m.info["val_rows"] == int(val.sum())
    assert m.info["config"] == dataclasses.asdict(cfg)


def test_singular_and_constant_columns():
    z, f = _linear(n=400, c=6, d=3)
    z = np.hstack([z, z[:, :2], np.full((len(z), 1), 7.0, dtype=np.float32)])  # duplicates and a constant
    val = np.arange(len(z)) % 5 == 0
    m = fit_mlp(z, f, val, MLPConfig(hidden=16, max_epochs=1, min_steps=0))
    ref = _lstsq(z[~val].astype(np.float64), f[~val].astype(np.float64))  # minimum-norm: same predictions
    lin_val = _mse(ref(z[val].astype(np.float64)), f[val])
    assert 0.98 * lin_val <= m.info["init_val_mse"] <= lin_val * (1 + 1e-4)  # held-out-chosen ridge start
    assert np.isfinite(m.predict(z)).all()


def test_early_stopping_restores_best_weights():
    z, f = _nonlinear(n=180, c=4, d=8, seed=3)
    f = f + 0.5 * np.random.default_rng(3).standard_normal(f.shape).astype(np.float32)  # noise to overfit
    val = np.arange(len(z)) >= 100  # 100 train rows, 80 val rows
    cfg = MLPConfig(hidden=512, depth=2, batch_size=8, max_epochs=300, patience=5, min_steps=0)
    reported = []
    m = fit_mlp(z, f, val, cfg, report=lambda e, v: reported.append(v))
    info = m.info
    assert info["epochs"] < cfg.max_epochs
    assert info["epochs"] == info["best_epoch"] + cfg.patience
    assert info["best_epoch"] >= 1 and info["best_val_mse"] < info["init_val_mse"]  # a trained epoch won
    assert len(reported) == info["epochs"]
    assert reported[-1] > info["best_val_mse"]  # the last epoch was worse: restoring mattered
    recomputed = _mse(m.predict(z[val].astype(np.float64)), f[val].astype(np.float64))
    assert recomputed == pytest.approx(info["best_val_mse"], rel=1e-9)
    assert info["best_val_mse"] == min([info["init_val_mse"], *reported])


def test_min_steps_delays_early_stopping():
    z, f = _nonlinear(n=60, c=4, d=2, seed=4)
    val = np.arange(len(z)) >= 40
    cfg = MLPConfig(hidden=32, lr=3e-2, batch_size=20, max_epochs=100, patience=1, min_steps=60)
    m = fit_mlp(z, f, val, cfg)
    assert m.info["steps"] == 2 * m.info["epochs"] and m.info["steps"] >= 60


def test_deterministic_per_seed_and_leaves_global_rng():
    z, f = _nonlinear(n=300, c=8, d=4, seed=5)
    val = np.arange(len(z)) % 4 == 0
    cfg = MLPConfig(hidden=32, max_epochs=3, min_steps=0, seed=7)
    state = torch.random.get_rng_state()
    a = fit_mlp(z, f, val, cfg).predict(z)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = fit_mlp(z, f, val, cfg).predict(z)
    c = fit_mlp(z, f, val, dataclasses.replace(cfg, seed=8)).predict(z)
    assert a.dtype == np.float64 and a.shape == (len(z), 4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_pickles_and_depth_zero_is_the_linear_fit():
    """Ray ships fitted maps by pickle; depth 0 leaves the skip alone, i.e. least squares plus a few AdamW steps."""
    z, f = _linear(n=300, c=5, d=3)
    val = np.arange(300) % 3 == 0
    m = fit_mlp(z, f, val, MLPConfig(depth=0, max_epochs=2, min_steps=0))
    assert m.model.mlp is None
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(m)).predict(z), m.predict(z))
    ref = _lstsq(z[~val].astype(np.float64), f[~val].astype(np.float64))
    lin_val = _mse(ref(z[val].astype(np.float64)), f[val])
    assert 0.98 * lin_val <= m.info["init_val_mse"] <= lin_val * (1 + 1e-4)  # held-out-chosen ridge start


def test_predict_checks_columns():
    z, f = _linear(n=50, c=5, d=2)
    m = fit_mlp(z, f, np.arange(50) < 10, MLPConfig(hidden=8, max_epochs=1, min_steps=0))
    assert isinstance(m, MLPMap)
    with pytest.raises(UserError, match=r"\[N, 5\].*\(3, 4\)"):
        m.predict(np.zeros((3, 4)))


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("rows", r"same rows.*z \(10, 3\), f \(9, 2\)"),
        ("nan_z", r"z has 1 non-finite"),
        ("inf_f", r"f has 2 non-finite"),
        ("no_val", r"at least 2 train rows and 1 val row, got 10 train and 0 val"),
        ("one_train", r"got 1 train and 9 val"),
        ("mask_dtype", r"boolean mask"),
        ("one_d", r"2-D"),
    ],
)
def test_bad_input_is_user_error(case, pattern):
    z, f = np.zeros((10, 3)), np.zeros((10, 2))
    val = np.arange(10) < 3
    if case == "rows":
        f = f[:9]
    elif case == "nan_z":
        z[4, 1] = np.nan
    elif case == "inf_f":
        f[2] = np.inf
    elif case == "no_val":
        val = np.zeros(10, dtype=bool)
    elif case == "one_train":
        val = np.arange(10) > 0
    elif case == "mask_dtype":
        val = val.astype(int)
    elif case == "one_d":
        z = z[:, 0]
    with pytest.raises(UserError, match=pattern):
        fit_mlp(z, f, val, MLPConfig(max_epochs=1))


def test_config_from():
    cfg = config_from({"hidden": 256.0, "lr": np.float64(3e-3), "depth": np.int64(2)})
    assert cfg == MLPConfig(hidden=256, lr=3e-3, depth=2)
    assert type(cfg.hidden) is int and type(cfg.depth) is int and type(cfg.lr) is float
    with pytest.raises(UserError, match=r"'hiden'.*allowed.*'hidden'.*'weight_decay'"):
        config_from({"hiden": 256})
    with pytest.raises(UserError, match=r"hidden=0.*>= 1"):
        config_from({"hidden": 0})
    with pytest.raises(UserError, match=r"hidden=2.5.*integer"):
        config_from({"hidden": 2.5})
    with pytest.raises(UserError, match=r"lr='fast'"):
        config_from({"lr": "fast"})
    with pytest.raises(UserError, match=r"weight_decay=-1"):
        MLPConfig(weight_decay=-1.0)


def test_search_space_builds_configs():
    fields = {f.name for f in dataclasses.fields(MLPConfig)}
    assert set(SEARCH_SPACE) <= fields
    for key, values in SEARCH_SPACE.items():
        assert len(values) >= 2
        for v in values:
            assert getattr(config_from({key: v}), key) == v


def test_linear_start_is_regularised_when_rows_are_few():
    """With train rows ~ logit dims (1,000 Lite logits on ~1,000 digits), least squares overfits; the start is the
    ridge fit whose strength wins on the held-out rows, so the MLP never begins from an overfit linear map."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(150, 100)).astype(np.float32)
    f = (z[:, :5] @ rng.normal(size=(5, 4)) + 0.5 * rng.normal(size=(150, 4))).astype(np.float32)
    val = np.arange(150) % 4 == 0
    m = fit_mlp(z, f, val, MLPConfig(hidden=8, max_epochs=1, min_steps=0))
    lin_val = _mse(_lstsq(z[~val].astype(np.float64), f[~val].astype(np.float64))(z[val].astype(np.float64)), f[val])
    assert m.info["init_val_mse"] < 0.5 * lin_val
