"""featrec_grid.cka against golden values, direct O(n^3) float64 formulas written here, and torch-cka 0.21."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from featrec_grid.cka import (
    CKA,
    CKAWarning,
    HSICAccumulator,
    SongTerms,
    _hsic_from_terms,
    centered_gram,
    kernel_cka,
    linear_cka,
    unbiased_hsic_matrix,
)
from featrec_grid.errors import UserError

TORCH_CKA_EXPORT_KEYS = {
    "model1_name",
    "model2_name",
    "CKA",
    "model1_layers",
    "model2_layers",
    "dataset1_name",
    "dataset2_name",
}


# ---------------------------------------------------------------- independent references (float64, direct)


def direct_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """Biased HSIC tr(K H L H) / (n-1)^2."""
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def direct_linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    K, L = X @ X.T, Y @ Y.T
    return direct_hsic(K, L) / np.sqrt(direct_hsic(K, K) * direct_hsic(L, L))


def song_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012, torch-cka's _HSIC) written out literally, O(n^3)."""
    K, L = np.array(K, dtype=np.float64), np.array(L, dtype=np.float64)
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    n = K.shape[0]
    one = np.ones((n, 1))
    value = (
        np.trace(K @ L)
        + (one.T @ K @ one @ one.T @ L @ one).item() / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one.T @ K @ L @ one).item()
    )
    return value / (n * (n - 3))


def flat64(x: torch.Tensor) -> np.ndarray:
    return x.detach().reshape(x.shape[0], -1).double().numpy()


def capture(model: nn.Module, layers: list[str], x: torch.Tensor) -> dict[str, np.ndarray]:
    """Float64 copies of each layer's output, taken when the module returns (last call wins)."""
    out: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, flat64(o))) for n in layers
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


def direct_minibatch_cka(m1, m2, layers1, layers2, batches1, batches2, center: bool = False) -> np.ndarray:
    """Sum over batches of Song's HSIC on linear Grams (uncentered, or of features centered per batch in float64:
    the same number, which float64 keeps when a large offset cancels the uncentered terms), then the CKA ratio."""
    kl = np.zeros((len(layers1), len(layers2)))
    kk, ll = np.zeros(len(layers1)), np.zeros(len(layers2))
    for x1, x2 in zip(batches1, batches2, strict=True):
        f1, f2 = capture(m1, layers1, x1), capture(m2, layers2, x2)
        c1 = {n: f1[n] - f1[n].mean(0) if center else f1[n] for n in layers1}
        c2 = {n: f2[n] - f2[n].mean(0) if center else f2[n] for n in layers2}
        g1 = [c1[n] @ c1[n].T for n in layers1]
        g2 = [c2[n] @ c2[n].T for n in layers2]
        kk += [song_hsic(k, k) for k in g1]
        ll += [song_hsic(g, g) for g in g2]
        kl += [[song_hsic(k, g) for g in g2] for k in g1]
    return kl / np.sqrt(kk[:, None] * ll[None, :])


# ---------------------------------------------------------------- small models


class SmallCNN(nn.Module):
    """Conv -> ReLU(inplace) chains: a conv's output is overwritten by the ReLU after its hook ran."""

    def __init__(self, width: int, seed: int, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        cin = 3
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(width * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def loader(n: int, batch: int, seed: int, size: int = 8) -> DataLoader:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    y = torch.zeros(n, dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def inputs(dl: DataLoader) -> list[torch.Tensor]:
    return [x for x, _ in dl]


# ---------------------------------------------------------------- pure functions


def golden_xy() -> tuple[np.ndarray, np.ndarray]:
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = np.random.randn(100, 10) + X
    return X, Y


def test_golden_values_from_kornblith_demo():
    X, Y = golden_xy()
    assert linear_cka(X, Y) == pytest.approx(0.55761, abs=1e-5)
    assert linear_cka(X, Y, debiased=True) == pytest.approx(0.51346, abs=1e-5)
    assert kernel_cka(X, Y, sigma=0.5) == pytest.approx(0.65483, abs=1e-5)
    assert linear_cka(torch.from_numpy(X).float(), torch.from_numpy(Y)) == pytest.approx(0.55761, abs=1e-5)


@pytest.mark.parametrize("n,dx,dy", [(40, 5, 7), (12, 30, 50)])  # feature-space path and Gram path
def test_linear_cka_matches_direct_formula_and_invariances(n, dx, dy):
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, dx)) + 3.0
    Y = X @ rng.normal(size=(dx, dy)) + rng.normal(size=(n, dy))
    expected = direct_linear_cka(X - X.mean(0), Y - Y.mean(0))
    assert linear_cka(X, Y) == pytest.approx(expected, abs=1e-10)
    Kx, Ky = X @ X.T, Y @ Y.T
    hx, hy = X - X.mean(0), Y - Y.mean(0)
    unbiased = song_hsic(hx @ hx.T, hy @ hy.T) / np.sqrt(
        song_hsic(hx @ hx.T, hx @ hx.T) * song_hsic(hy @ hy.T, hy @ hy.T)
    )
    assert linear_cka(X, Y, debiased=True) == pytest.approx(unbiased, abs=1e-10)
    assert song_hsic(Kx, Ky) == pytest.approx(
        song_hsic(hx @ hx.T, hy @ hy.T), rel=1e-9
    )  # centering invariance
    Q, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
    assert linear_cka(X @ Q * 7.5, Y) == pytest.approx(linear_cka(X, Y), abs=1e-10)
    assert linear_cka(X, Y * 0.01, debiased=True) == pytest.approx(linear_cka(X, Y, debiased=True), abs=1e-10)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X, debiased=True) == pytest.approx(1.0, abs=1e-12)


def test_kernel_cka_matches_direct_rbf():
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(31, 4)), rng.normal(size=(31, 6))

    def rbf(A, frac):
        d2 = ((A[:, None, :] - A[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * (frac * np.sqrt(np.median(d2))) ** 2))

    K, L = rbf(X, 0.8), rbf(Y, 0.8)
    assert kernel_cka(X, Y, sigma=0.8) == pytest.approx(
        direct_hsic(K, L) / np.sqrt(direct_hsic(K, K) * direct_hsic(L, L)), abs=1e-10
    )
    assert kernel_cka(X, X, sigma=0.8) == pytest.approx(1.0, abs=1e-12)


def test_all_pairs_unbiased_hsic_equals_per_pair_direct():
    rng = np.random.default_rng(5)
    f1 = [rng.normal(size=(9, d)) + 2 for d in (3, 20)]
    f2 = [rng.normal(size=(9, d)) for d in (1, 4, 50)]
    g1 = torch.tensor(np.stack([f @ f.T for f in f1]))
    g2 = torch.tensor(np.stack([f @ f.T for f in f2]))
    expected = (
        [[song_hsic(a, b) for b in g2.numpy()] for a in g1.numpy()],
        [song_hsic(a, a) for a in g1.numpy()],
        [song_hsic(b, b) for b in g2.numpy()],
    )
    # from full Grams, and from terms on their strict lower triangles (`half`), as compare() holds them
    def half(g: torch.Tensor) -> SongTerms:
        off = g - torch.diag_embed(g.diagonal(dim1=-2, dim2=-1))
        return SongTerms(off.tril().reshape(len(g), -1), off.sum(-1), off.sum((-2, -1)), True)

    for got in (unbiased_hsic_matrix(g1, g2), _hsic_from_terms(half(g1), half(g2), 9)):
        for value, want in zip(got, expected, strict=True):
            np.testing.assert_allclose(value.numpy(), want, rtol=1e-10)


def test_minibatch_accumulation_matches_direct_per_batch_hsic():
    rng = np.random.default_rng(7)
    # side 1 float32 (numpy), side 2 float64 (torch); the reference sees the same float32-rounded values
    batches = [
        (
            [
                (rng.normal(size=(n, 6)) * 5 + 10).astype(np.float32),
                rng.normal(size=(n, 2, 3)).astype(np.float32),
            ],
            [rng.normal(size=(n, 4)) - 3],
        )
        for n in (8, 8, 5)
    ]
    acc = HSICAccumulator()
    for a, b in batches:
        acc.update_features(a, [torch.tensor(x) for x in b])
    direct_xy = np.zeros((2, 1))
    direct_xx, direct_yy = np.zeros(2), np.zeros(1)
    for a, b in batches:
        ga = [
            x.reshape(len(x), -1).astype(np.float64) @ x.reshape(len(x), -1).astype(np.float64).T for x in a
        ]
        gb = [x @ x.T for x in b]
        direct_xy += [[song_hsic(p, q) for q in gb] for p in ga]
        direct_xx += [song_hsic(p, p) for p in ga]
        direct_yy += [song_hsic(q, q) for q in gb]
    # side 1's Grams are float32 products of centered features: accurate to ~1e-6 relative
    np.testing.assert_allclose(acc.hsic_xy.numpy(), direct_xy, rtol=1e-5)
    np.testing.assert_allclose(acc.hsic_xx.numpy(), direct_xx, rtol=1e-5)
    np.testing.assert_allclose(acc.hsic_yy.numpy(), direct_yy, rtol=1e-12)
    cka, bad1, bad2 = acc.result()
    np.testing.assert_allclose(
        cka.numpy(), direct_xy / np.sqrt(direct_xx[:, None] * direct_yy[None, :]), atol=1e-6
    )
    assert (bad1, bad2) == ([], [])


def test_centered_gram_matches_float64_for_wide_batches():
    x = torch.randn(160, 400, generator=torch.Generator().manual_seed(0)) * 3 + 50  # blocked product path
    xc = x.double().numpy() - x.double().numpy().mean(0)
    np.testing.assert_allclose(
        centered_gram(x).double().numpy(), xc @ xc.T, atol=1e-5 * np.abs(xc @ xc.T).max()
    )


def test_bench_reference_is_torch_cka_formula():
    from featrec_grid.bench.cka import torch_cka_hsic64

    rng = np.random.default_rng(11)
    grams = [f @ f.T for f in (rng.normal(size=(10, d)) + 1 for d in (3, 8, 40))]
    for g in grams:
        np.fill_diagonal(g, 0.0)
    got = torch_cka_hsic64(torch.tensor(np.stack(grams[:2])), torch.tensor(np.stack(grams)))
    np.testing.assert_allclose(got.numpy(), [[song_hsic(a, b) for b in grams] for a in grams[:2]], rtol=1e-10)


def test_centered_gram_of_constant_features_is_exactly_zero():
    x = torch.full((16, 5), 0.1) + torch.arange(5) * 1e3
    assert centered_gram(x).abs().max() == 0
    assert centered_gram(x + torch.randn(16, 5)).abs().max() > 0


# ---------------------------------------------------------------- the CKA class


def test_cka_two_different_models_matches_direct_float64():
    m1, m2 = SmallCNN(6, seed=0), SmallCNN(5, seed=1, depth=3)
    layers1 = ["features.0", "features.1", "fc"]
    layers2 = ["features.2", "features.4", "pool", "fc"]
    dl = loader(47, 12, seed=0)  # an odd last batch of 11
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning expected here
        cka = CKA(m1, m2, model1_layers=layers1, model2_layers=layers2)
        cka.compare(dl)
    got = cka.export()["CKA"].numpy()
    expected = direct_minibatch_cka(m1, m2, layers1, layers2, inputs(dl), inputs(dl))
    assert got.shape == (3, 4)
    assert np.abs(got - expected).max() <= 1e-6
    # comparing model 1 with itself (the anatome bug) gives other numbers
    assert (
        np.abs(
            direct_minibatch_cka(m1, m1, layers1, layers1, inputs(dl), inputs(dl))[:, :3] - got[:, :3]
        ).max()
        > 1e-2
    )


class Offset(nn.Module):
    """Adds a constant far larger than the spread: the features' mean dominates their float32 Gram."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value


def error_and_passes(m1, m2, layers1, layers2, x, batch, counted) -> tuple[float, int, DataLoader]:
    """compare() on x in batches: (max error against direct_minibatch_cka, forward passes of `counted`, loader)."""
    dl = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch, shuffle=False)
    passes = []
    handle = counted.register_forward_pre_hook(lambda *_: passes.append(1))
    cka = CKA(m1, m2, model1_layers=layers1, model2_layers=layers2)
    cka.compare(dl)
    handle.remove()
    expected = direct_minibatch_cka(m1, m2, layers1, layers2, inputs(dl), inputs(dl), center=True)
    return float(np.abs(cka.export()["CKA"].numpy() - expected).max()), len(passes), dl


@pytest.mark.parametrize("first_outlier", [False, True])
def test_a_large_common_offset_keeps_compare_exact(first_outlier):
    """compare() shifts each layer's rows by the batch's first row; with outputs at 100 +- 0.3 an unshifted
    float32 Gram loses the HSIC, and an outlying first row (FIRST_ROW_SPREAD_MAX) is centered by the mean."""
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Conv2d(3, 4, 3), Offset(100.0), nn.Flatten(), nn.Linear(4 * 36, 6))
    m2 = nn.Sequential(nn.Conv2d(3, 5, 3), Offset(-200.0), nn.Flatten(), nn.Linear(5 * 36, 7))
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    if first_outlier:
        x[[0, 32]] += 5.0  # the first row of each batch
    layers1, layers2 = ["1", "3"], ["1", "3"]
    error, passes, dl = error_and_passes(m1, m2, layers1, layers2, x, batch=32, counted=m2)
    # an outlying first row makes compare() take model 2's layers again, centered by the mean (one more pass)
    assert passes == (4 if first_outlier else 2)
    assert error <= 1e-6
    # the same estimator on unshifted float32 Grams is visibly wrong here: the shift is what keeps it exact
    first = inputs(dl)[:1]
    exact = direct_minibatch_cka(m1, m2, ["1"], ["1"], first, first, center=True)[0, 0]
    g1, g2 = (torch.as_tensor(capture(m, ["1"], first[0])["1"]).float() for m in (m1, m2))
    k32, l32 = ((g @ g.T).double().numpy() for g in (g1, g2))
    rough = song_hsic(k32, l32) / np.sqrt(abs(song_hsic(k32, k32) * song_hsic(l32, l32)))
    assert abs(rough - exact) > 1e-5  # ten times the tolerance compare() meets above


class FirstRowToMean(nn.Module):
    """Replaces the first row by the mean of the others, in float64: a layer whose first row does not stand out,
    of another dtype than the layers before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.double()
        out[0] = out[1:].mean(0)
        return out


def test_a_second_pass_for_some_layers_of_mixed_dtypes():
    """One float32 layer with an outlying first row, one float64 layer without: the second pass re-centers the
    first only, and finish() reads each layer from its dtype's stack."""
    torch.manual_seed(1)
    m1 = nn.Sequential(nn.Flatten(), nn.Linear(48, 9), FirstRowToMean())
    m2 = nn.Sequential(nn.Flatten(), nn.Linear(48, 7), nn.Tanh())
    x = torch.randn(48, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    x[[0, 24]] += 40.0  # the first row of each batch
    error, passes, _ = error_and_passes(m1, m2, ["1", "2"], ["1", "2"], x, batch=24, counted=m1)
    assert passes == 4  # two batches, each taken again for layer "1"
    assert error <= 1e-6


def test_same_model_object_twice_and_second_loader():
    m = SmallCNN(6, seed=2)
    layers1, layers2 = ["features.0", "fc"], ["features.1", "features.2", "fc"]
    dl1, dl2 = loader(24, 8, seed=1), loader(24, 8, seed=2)
    cka = CKA(m, m, model1_name="a", model2_name="b", model1_layers=layers1, model2_layers=layers2)
    cka.compare(dl1, dl2)
    expected = direct_minibatch_cka(m, m, layers1, layers2, inputs(dl1), inputs(dl2))
    assert np.abs(cka.export()["CKA"].numpy() - expected).max() <= 1e-6
    cka = CKA(m, m, model1_layers=layers2, model2_layers=layers2)
    cka.compare(dl1)
    res = cka.export()
    np.testing.assert_allclose(torch.diagonal(res["CKA"]).numpy(), 1.0, atol=1e-9)
    assert res["dataset1_name"] == res["dataset2_name"]
    assert not any(m._forward_hooks for m in m.modules())  # hooks removed


def test_default_layers_are_parameterised_leaves():
    cka = CKA(SmallCNN(4, seed=0), SmallCNN(4, seed=1))
    assert cka.model1_layers == ["features.0", "features.2", "fc"]


def test_small_batches_are_an_error_that_says_why():
    m1, m2 = SmallCNN(4, seed=0), SmallCNN(4, seed=1)
    cka = CKA(m1, m2, model1_name="a", model2_name="b")
    with pytest.raises(UserError, match=r"batch 1: 2 and 2 examples.*at least 4.*n\(n-3\)"):
        cka.compare(loader(10, 8, seed=0))


def test_unknown_layer_names_closest_matches():
    with pytest.raises(UserError, match=r"'feature.0'.*closest: 'features.0'"):
        CKA(SmallCNN(4, seed=0), SmallCNN(4, seed=1), model1_layers=["fc", "feature.0"])


class WithDeadLayer(nn.Module):
    """A layer whose output is the same for every input (a dead ReLU): CKA with it is undefined."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.dead = nn.Linear(4, 3)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.dead.weight.zero_()
            self.dead.bias.fill_(-0.3)

    def forward(self, x):
        d = self.dead(self.conv(x).mean((2, 3)))
        return self.relu(d.clone()) + d


def test_constant_layer_is_reported_not_nan():
    m1, m2 = WithDeadLayer(), SmallCNN(4, seed=1)
    cka = CKA(
        m1,
        m2,
        model1_name="a",
        model2_name="b",
        model1_layers=["conv", "dead", "relu"],
        model2_layers=["features.0", "fc"],
    )
    with pytest.warns(CKAWarning, match="without variance"):
        cka.compare(loader(32, 8, seed=0))
    res = cka.export()
    assert res["invalid_layers"] == {"model1": ["dead", "relu"], "model2": []}
    assert not torch.isnan(res["CKA"]).any()
    assert (res["CKA"][1:] == 0).all() and (res["CKA"][0].abs() > 0).all()


def test_max_features_pools_wide_layers_and_says_so():
    m1, m2 = SmallCNN(8, seed=0), SmallCNN(4, seed=1)
    cka = CKA(
        m1,
        m2,
        model1_name="a",
        model2_name="b",
        model1_layers=["features.0", "fc"],
        model2_layers=["features.0"],
        max_features=100,
    )
    cka.compare(loader(16, 8, seed=0))
    res = cka.export()
    assert res["max_features"] == 100
    assert res["reduced_layers"]["model1"] == {"features.0": [[8, 8, 8], [8, 3, 3]]}
    assert list(res["reduced_layers"]["model2"]) == ["features.0"]
    assert not torch.isnan(res["CKA"]).any()


def test_plot_results_writes_html(tmp_path):
    cka = CKA(SmallCNN(4, seed=0), SmallCNN(4, seed=1), model1_name="a", model2_name="b")
    cka.compare(loader(16, 8, seed=0))
    fig = cka.plot_results(save_path=tmp_path / "cka.html", title="t")
    assert fig.layout.title.text == "t"
    assert (tmp_path / "cka.html").read_text().count("features.0") >= 1


def test_plot_results_image_needs_kaleido(tmp_path):
    import importlib.util

    cka = CKA(SmallCNN(4, seed=0), SmallCNN(4, seed=1), model1_name="a", model2_name="b")
    cka.compare(loader(16, 8, seed=0))
    if importlib.util.find_spec("kaleido") is not None:
        pytest.skip("kaleido is installed: the PNG path is plotly's")
    with pytest.warns(CKAWarning, match="kaleido is not installed"):
        cka.plot_results(save_path=tmp_path / "cka.png")
    assert (tmp_path / "cka.html").exists() and not (tmp_path / "cka.png").exists()


def test_export_before_compare_is_a_user_error():
    with pytest.raises(UserError, match="compare"):
        CKA(SmallCNN(4, seed=0), SmallCNN(4, seed=1), model1_name="a", model2_name="b").export()


# ---------------------------------------------------------------- parity with torch-cka 0.21


def torch_cka_module():
    try:
        import torch_cka
    except ImportError as exc:
        pytest.fail(
            "the parity test needs torch-cka 0.21 and matplotlib (which it imports without declaring it): "
            f"pip install -e '.[test]' or pip install torch-cka==0.21 matplotlib ({exc})"
        )
    return torch_cka


def test_parity_with_torch_cka_float64_and_its_float32_drift():
    torch_cka = torch_cka_module()
    from torchvision.models import resnet18, resnet34

    class TorchCKA64(torch_cka.CKA):
        """torch-cka with its estimator in float64: features copied to float64, same _HSIC formula."""

        def _log_layer(self, model, name, layer, inp, out):
            super()._log_layer(model, name, layer, inp, out.detach().double())

        def _HSIC(self, K, L):
            N = K.shape[0]
            ones = torch.ones(N, 1, dtype=torch.float64)
            result = torch.trace(K @ L)
            result += ((ones.t() @ K @ ones @ ones.t() @ L @ ones) / ((N - 1) * (N - 2))).item()
            result -= ((ones.t() @ K @ L @ ones) * 2 / (N - 2)).item()
            return (1 / (N * (N - 3)) * result).item()

    torch.manual_seed(0)
    m1 = resnet18(num_classes=10).eval()
    torch.manual_seed(1)
    m2 = resnet34(num_classes=10).eval()
    layers1 = ["conv1", "layer1.0.conv1", "layer2.1", "fc"]
    layers2 = ["conv1", "layer1.2.conv2", "layer3.0.downsample.0", "layer4"]
    dl = DataLoader(
        TensorDataset(torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))), batch_size=32
    )
    ours = CKA(m1, m2, "resnet18", "resnet34", layers1, layers2)
    ours.compare(dl)
    got = ours.export()
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in (("f64", TorchCKA64), ("f32", torch_cka.CKA)):
            theirs = cls(copy.deepcopy(m1), copy.deepcopy(m2), "resnet18", "resnet34", layers1, layers2)
            theirs.compare(dl)
            results[name] = theirs.export()
    ref = results["f64"]["CKA"].double()
    ours_error = (got["CKA"] - ref).abs().max().item()
    drift = (results["f32"]["CKA"].double() - ref).abs().max().item()
    assert ours_error <= 1e-4
    assert drift > 10 * ours_error and drift > 1e-5  # torch-cka's float32 HSIC drifts; ours does not
    # the export is torch-cka's, key for key
    assert set(got) >= TORCH_CKA_EXPORT_KEYS
    for key in TORCH_CKA_EXPORT_KEYS - {"CKA"}:
        assert got[key] == results["f32"][key], key
    assert got["CKA"].shape == results["f32"]["CKA"].shape == (4, 4)
    assert isinstance(got["CKA"], torch.Tensor)


# ---------------------------------------------------------------- what pytorch-cka 1.1.3 offers


def test_cka_from_features_matches_direct_formulas_for_every_input_form():
    from featrec_grid.cka import cka_from_features

    rng = np.random.default_rng(21)
    base = rng.normal(size=(30, 4))
    xs = [base @ rng.normal(size=(4, d)) + rng.normal(size=(30, d)) + 5 for d in (3, 12)]
    ys = [np.tanh(base @ rng.normal(size=(4, 7))), rng.normal(size=(30, 2, 3))]

    def unbiased(a, b):
        a, b = flat64(torch.tensor(a)), flat64(torch.tensor(b))
        ka, kb = a @ a.T, b @ b.T
        return song_hsic(ka, kb) / np.sqrt(song_hsic(ka, ka) * song_hsic(kb, kb))

    expected = np.array([[unbiased(a, b) for b in ys] for a in xs])
    got = cka_from_features(xs, [torch.tensor(y) for y in ys])
    assert got.dtype == torch.float64 and got.shape == (2, 2)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    biased = cka_from_features(xs, ys, debiased=False).numpy()
    flat_ys = [flat64(torch.tensor(b)) for b in ys]
    np.testing.assert_allclose(
        biased, [[direct_linear_cka(a - a.mean(0), b - b.mean(0)) for b in flat_ys] for a in xs], atol=1e-10
    )
    stacked = torch.tensor(np.stack([xs[1], xs[1] * 2]))  # 3-D [L, n, d]
    np.testing.assert_allclose(
        cka_from_features(stacked, xs[0]).numpy(),
        [[unbiased(xs[1], xs[0])], [unbiased(xs[1] * 2, xs[0])]],
        atol=1e-10,
    )
    with pytest.raises(UserError, match=r"Y_layers\[0\] has 29 rows"):
        cka_from_features(xs, [ys[0][:29]])


def test_cka_from_features_agrees_with_pytorch_cka_in_float64():
    cka_pkg = pytest.importorskip("cka", reason="pytorch-cka is in the test extra: pip install -e '.[test]'")
    from featrec_grid.cka import cka_from_features

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, 16, generator=g, dtype=torch.float64)
    y = x[[2, 0]] @ torch.randn(16, 16, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        2, 40, 16, generator=g, dtype=torch.float64
    )
    theirs = cka_pkg.cka_from_features(x, y)  # their unbiased HSIC, uncentered float64 Grams, clamped to [0, 1]
    ours = cka_from_features(x, y).numpy()
    inside = (theirs.numpy() > 0) & (theirs.numpy() < 1)
    assert inside.sum() >= 4
    np.testing.assert_allclose(ours[inside], theirs.numpy()[inside], atol=1e-10)
    assert (ours[~inside] < 0).all()  # an unbiased estimate below 0, which pytorch-cka reports as 0


class HFStyle(nn.Module):
    """Submodules returning a Hugging Face-style output object, a dict and a tuple."""

    class Output(dict):
        def __getattr__(self, key):
            return self[key]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(6, 8)
        self.block = nn.Linear(8, 8)
        self.pair = nn.GRU(8, 5, batch_first=True)  # returns (output, h_n)

    def forward(self, x):
        h = self.embed(x)
        out = self.Output(last_hidden_state=torch.relu(self.block(h)), pooler_output=h.mean(1))
        y, _ = self.pair(out.last_hidden_state)
        return {"logits": y.mean(1)}


def test_hugging_face_style_outputs_tuples_and_dicts():
    m1, m2 = HFStyle(), SmallCNN(4, seed=1)
    outs: dict[str, torch.Tensor] = {}

    class Wrap(nn.Module):  # makes `block` return the HF-style object
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return HFStyle.Output(last_hidden_state=self.inner(h), other=torch.zeros(1))

    m1.block = Wrap(m1.block)
    m1.forward = lambda x: {  # noqa: E731 - the model returns a dict as HF models do
        "logits": m1.pair(torch.relu(m1.block(m1.embed(x)).last_hidden_state))[0].mean(1)
    }
    hooks = [
        m1.block.register_forward_hook(lambda _m, _i, o: outs.__setitem__("block", o.last_hidden_state.clone())),
        m1.pair.register_forward_hook(lambda _m, _i, o: outs.__setitem__("pair", o[0].clone())),
    ]
    x = torch.randn(24, 5, 6, generator=torch.Generator().manual_seed(0))
    images = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m1(x)
    for h in hooks:
        h.remove()
    f2 = capture(m2, ["fc"], images)
    cka = CKA(m1, m2, "hf", "cnn", model1_layers=["block", "pair"], model2_layers=["fc"])
    cka.compare(
        DataLoader(TensorDataset(x), batch_size=24),
        [{"pixel_values": images}],  # a dict batch, as an HF image processor gives
    )
    for i, name in enumerate(["block", "pair"]):
        a = flat64(outs[name])
        k, ell = a @ a.T, f2["fc"] @ f2["fc"].T
        expected = song_hsic(k, ell) / np.sqrt(song_hsic(k, k) * song_hsic(ell, ell))
        assert cka.export()["CKA"][i, 0].item() == pytest.approx(expected, abs=1e-6)


def test_data_parallel_is_unwrapped_and_layers_by_index():
    m1, m2 = SmallCNN(6, seed=0), SmallCNN(5, seed=1, depth=3)
    dl = loader(32, 8, seed=3)
    plain = CKA(m1, m2, model1_layers=["features.0", "fc"], model2_layers=["fc"])
    plain.compare(dl)
    names = [n for n, _ in m1.named_modules()][1:]
    wrapped = CKA(
        nn.DataParallel(m1), m2, model1_layers=[names.index("features.0"), "module.fc"], model2_layers=[-1]
    )
    assert wrapped.model1 is m1
    assert wrapped.model1_layers == ["features.0", "fc"] and wrapped.model2_layers == ["fc"]
    wrapped.compare(dl)
    assert torch.equal(wrapped.export()["CKA"], plain.export()["CKA"])
    with pytest.raises(UserError, match=r"index 99 is out of range.*allowed: -\d+ to \d+"):
        CKA(m1, m2, model1_layers=[99])


@pytest.mark.parametrize("same_layers", [True, False])
def test_same_model_runs_one_forward_per_batch(same_layers):
    m = SmallCNN(6, seed=5, depth=3)
    layers1 = ["features.0", "features.2", "fc"]
    layers2 = layers1 if same_layers else ["features.2", "features.4", "pool"]
    calls = []
    handle = m.register_forward_pre_hook(lambda *_: calls.append(1))
    dl = loader(40, 10, seed=4)
    cka = CKA(m, m, "m", "m", model1_layers=layers1, model2_layers=layers2)
    cka.compare(dl)
    handle.remove()
    assert len(calls) == 4 and cka.export()["forward_passes_per_batch"] == 1
    expected = direct_minibatch_cka(m, m, layers1, layers2, inputs(dl), inputs(dl))
    assert np.abs(cka.export()["CKA"].numpy() - expected).max() <= 1e-6


class Twice(nn.Module):
    """One Linear module called twice per forward pass: CKA must use its last call in every batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.inp = nn.Linear(12, 6)
        self.shared = nn.Linear(6, 6)

    def forward(self, x):
        h = self.shared(torch.relu(self.inp(x.flatten(1)[:, :12])))
        return self.shared(h * h)


def test_module_called_twice_uses_its_last_call_in_every_batch():
    m1, m2 = Twice(), SmallCNN(4, seed=1)
    dl = loader(48, 12, seed=6)
    with pytest.warns(CKAWarning, match="run several times"):
        cka = CKA(m1, m2, "t", "c", model1_layers=["inp", "shared"], model2_layers=["features.0", "fc"])
        cka.compare(dl)
    expected = direct_minibatch_cka(m1, m2, ["inp", "shared"], ["features.0", "fc"], inputs(dl), inputs(dl))
    assert np.abs(cka.export()["CKA"].numpy() - expected).max() <= 1e-6
