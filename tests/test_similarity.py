"""featrec_grid.similarity against golden values (FACTS.md) and direct dense numpy computations written here."""

from __future__ import annotations

import numpy as np
import pytest

from featrec_grid.errors import UserError
from featrec_grid.similarity import (
    MEASURES,
    SimilarityWarning,
    choose_block_rows,
    cknna,
    model_similarity,
    mutual_knn,
    svcca,
)

# ---------------------------------------------------------------- direct references (dense, float64)


def centering(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def biased_hsic(K: np.ndarray, L: np.ndarray) -> float:
    H = centering(len(K))
    return float(np.trace(K @ H @ L @ H))


def song_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. 2012, as platonic-rep's hsic_unbiased writes it (sum(K~ * L~.T) for the trace)."""
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    n = len(K)
    value = (K * L.T).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2.0 * (K @ L).sum() / (n - 2)
    return float(value / (n * (n - 3)))


def cka_of(K, L, hsic) -> float:
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def rbf(X: np.ndarray, sigma: float) -> np.ndarray:
    d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2 * np.median(d2)))


def neighbours(X: np.ndarray, k: int) -> list[set[int]]:
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = U @ U.T
    np.fill_diagonal(S, -np.inf)
    return [set(np.argsort(-row)[:k].tolist()) for row in S]


def direct_mutual_knn(X, Y, k) -> float:
    a, b = neighbours(X, k), neighbours(Y, k)
    return float(np.mean([len(p & q) / k for p, q in zip(a, b, strict=True)]))


def direct_cknna(X, Y, k) -> float:
    """platonic-rep's cknna (unbiased) on L2-normalised rows, dense masks, without its +1e-6."""
    U, V = (Z / np.linalg.norm(Z, axis=1, keepdims=True) for Z in (X, Y))
    K, L = U @ U.T, V @ V.T
    n = len(K)

    def mask(G):
        M = np.zeros((n, n))
        for i, nb in enumerate(neighbours_of(G)):
            M[i, list(nb)] = 1.0
        return M

    def neighbours_of(G):
        G = G.copy()
        np.fill_diagonal(G, -np.inf)
        return [np.argsort(-row)[:k] for row in G]

    MK, ML = mask(K), mask(L)
    M = MK * ML
    return song_hsic(M * K, M * L) / np.sqrt(song_hsic(MK * K, MK * K) * song_hsic(ML * L, ML * L))


def direct_svcca(X, Y, dims) -> float:
    """SVD-reduce each centred representation to `dims` directions (at most its rank), then classical CCA on the
    reduced data: singular values of Sxx^-1/2 Sxy Syy^-1/2."""

    def reduce(Z):
        Z = Z - Z.mean(0)
        r = min(dims, np.linalg.matrix_rank(Z))
        U, s, _ = np.linalg.svd(Z, full_matrices=False)
        return U[:, :r] * s[:r]

    A, B = reduce(X), reduce(Y)

    def inv_sqrt(S):
        w, v = np.linalg.eigh(S)
        return v @ np.diag(w**-0.5) @ v.T

    T = inv_sqrt(A.T @ A) @ (A.T @ B) @ inv_sqrt(B.T @ B)
    return float(np.linalg.svd(T, compute_uv=False)[: min(A.shape[1], B.shape[1])].mean())


def matrix(records, measure, names):
    values = {(r["model_a"], r["model_b"]): r["value"] for r in records if r["measure"] == measure}
    return np.array([[values[a, b] for b in names] for a in names])


def reps(n=60, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 6))
    out = {
        "a": base @ rng.normal(size=(6, 9)) + 0.5 * rng.normal(size=(n, 9)) + 3.0,
        "b": np.tanh(base @ rng.normal(size=(6, 20))) + 0.3 * rng.normal(size=(n, 20)),
        "c": rng.normal(size=(n, 4)),
        "d": (base[:, :3] ** 2) @ rng.normal(size=(3, 12)) - 7.0,
    }
    return {k: v.astype(dtype) for k, v in out.items()}


# ---------------------------------------------------------------- golden values


def test_golden_values_from_kornblith_demo():
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = np.random.randn(100, 10) + X
    got = model_similarity({"X": X, "Y": Y}, ["linear_cka", "debiased_cka", "rbf_cka"], sigma=0.5)
    value = {r["measure"]: r["value"] for r in got if (r["model_a"], r["model_b"]) == ("X", "Y")}
    assert value["linear_cka"] == pytest.approx(0.55761, abs=1e-5)
    assert value["debiased_cka"] == pytest.approx(0.51346, abs=1e-5)
    assert value["rbf_cka"] == pytest.approx(0.65483, abs=1e-5)


# ---------------------------------------------------------------- every measure against its direct computation


@pytest.mark.parametrize("memory_mb", [512, 0.01])  # one block; one row per block
def test_kernel_measures_match_direct_dense_formulas(memory_mb):
    data = reps()
    names = list(data)
    n = len(data["a"])
    if memory_mb < 1:
        assert choose_block_rows(len(names), n, 3, memory_mb) == 1
    got = model_similarity(data, ["linear_cka", "debiased_cka", "rbf_cka"], sigma=0.8, memory_mb=memory_mb)
    assert len(got) == 3 * len(names) ** 2
    for measure, kernel, hsic in (
        ("linear_cka", lambda X: X @ X.T, biased_hsic),
        ("debiased_cka", lambda X: (X - X.mean(0)) @ (X - X.mean(0)).T, song_hsic),
        ("rbf_cka", lambda X: rbf(X, 0.8), biased_hsic),
    ):
        expected = np.array([[cka_of(kernel(data[a]), kernel(data[b]), hsic) for b in names] for a in names])
        np.testing.assert_allclose(matrix(got, measure, names), expected, atol=1e-10, err_msg=measure)


def test_float32_inputs_stay_within_1e6_of_float64():
    data64 = reps(n=80, seed=3)
    data32 = {k: v.astype(np.float32) for k, v in data64.items()}
    names = list(data64)
    measures = ["linear_cka", "debiased_cka", "rbf_cka", "svcca"]
    a = model_similarity(data64, measures)
    b = model_similarity(data32, measures)
    for m in measures:
        np.testing.assert_allclose(matrix(b, m, names), matrix(a, m, names), atol=1e-6, err_msg=m)


@pytest.mark.parametrize("k", [2, 5, 12])
def test_knn_measures_match_direct_dense_computation(k):
    data = reps(n=50, seed=k)
    names = list(data)
    got = model_similarity(data, ["mutual_knn", "cknna"], k=k)
    knn = np.array([[direct_mutual_knn(data[a], data[b], k) for b in names] for a in names])
    ck = np.array([[direct_cknna(data[a], data[b], k) for b in names] for a in names])
    np.testing.assert_allclose(matrix(got, "mutual_knn", names), knn, atol=1e-12)
    np.testing.assert_allclose(matrix(got, "cknna", names), ck, atol=1e-10)
    assert mutual_knn(data["a"], data["b"], k=k) == pytest.approx(knn[0, 1], abs=1e-12)
    assert cknna(data["a"], data["b"], k=k) == pytest.approx(ck[0, 1], abs=1e-10)
    assert np.allclose(np.diag(knn), 1.0) and np.allclose(np.diag(ck), 1.0)


@pytest.mark.parametrize("dims", [1, 3, 4])
def test_svcca_matches_classical_cca_on_svd_reduced_data(dims):
    data = reps(n=70, seed=dims)
    names = list(data)
    got = model_similarity(data, ["svcca"], svcca_dims=dims)
    expected = np.array([[direct_svcca(data[a], data[b], dims) for b in names] for a in names])
    np.testing.assert_allclose(matrix(got, "svcca", names), expected, atol=1e-9)
    assert svcca(data["a"], data["d"], dims=dims) == pytest.approx(expected[0, 3], abs=1e-9)
    assert np.linalg.matrix_rank(data["d"] - data["d"].mean(0)) == 3  # dims=4 exceeds d's rank: 3 directions


def test_measures_tell_related_from_unrelated():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(200, 8))
    related = X @ rng.normal(size=(8, 8)) + 0.1 * rng.normal(size=(200, 8))
    unrelated = rng.normal(size=(200, 8))
    got = model_similarity({"x": X, "r": related, "u": unrelated}, MEASURES)
    for m in MEASURES:
        values = {(r["model_a"], r["model_b"]): r["value"] for r in got if r["measure"] == m}
        assert values["x", "r"] > values["x", "u"] + 0.1, m
        if m != "cknna":  # the one asymmetric estimator (see test_knn_measures_match_direct_dense_computation)
            assert values["x", "r"] == values["r", "x"], m


# ---------------------------------------------------------------- errors, warnings, frame


def test_user_errors_say_what_is_allowed():
    data = reps(n=20)
    with pytest.raises(UserError, match="unknown.*'cca'.*allowed: linear_cka"):
        model_similarity(data, ["cca"])
    with pytest.raises(UserError, match="'b' has 19 rows, 'a' has 20"):
        model_similarity({"a": data["a"], "b": data["b"][:19]}, ["linear_cka"])
    with pytest.raises(UserError, match="k must be between 1 and n - 1 = 19"):
        model_similarity(data, ["mutual_knn"], k=25)
    with pytest.raises(UserError, match="k must be >= 2"):
        model_similarity(data, ["cknna"], k=1)
    with pytest.raises(UserError, match="NaN or infinite"):
        model_similarity({"a": np.full((8, 2), np.nan)}, ["linear_cka"])


def test_constant_representation_is_nan_with_a_warning():
    data = reps(n=30)
    data["flat"] = np.ones((30, 5))
    with pytest.warns(SimilarityWarning, match="no variance"):
        got = model_similarity(data, ["linear_cka"])
    values = {(r["model_a"], r["model_b"]): r["value"] for r in got}
    assert np.isnan(values["flat", "a"]) and np.isfinite(values["a", "b"])
