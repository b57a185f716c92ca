"""Model-level representation similarity beside linear CKA, for every pair of N models on the same n examples.

Measures (names as they appear in records and in similarity.parquet):

- ``linear_cka``: linear CKA, HSIC with the biased estimator (Kornblith et al. 2019, "Similarity of neural
  network representations revisited").
- ``debiased_cka``: linear CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen, Raghu & Kornblith 2021).
- ``rbf_cka``: CKA of RBF kernels exp(-|x_i - x_j|^2 / (2 s^2)), s = `sigma` x sqrt(median of the squared pairwise
  distances over all n x n entries, diagonal included), per representation (Kornblith et al.'s notebook: sigma 0.5).
- ``mutual_knn``: mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation
  Hypothesis"): rows L2-normalised, neighbours by cosine similarity excluding the example itself,
  mean over examples of |N_A(i) & N_B(i)| / k.
- ``cknna``: CKNNA of Huh et al. 2024, as platonic-rep's metrics.py computes it: K = A A', L = B B' on L2-normalised
  rows, M_ij = 1 when j is among the k nearest (by K, self excluded) of i in both, CKNNA =
  HSIC_u(M*K, M*L) / sqrt(HSIC_u(M_K*K, M_K*K) HSIC_u(M_L*L, M_L*L)) with Song's unbiased HSIC. platonic-rep adds
  1e-6 to the denominator; here it is not added (a non-positive denominator gives NaN with a SimilarityWarning).
  M is not symmetric, so neither is this estimator: (A, B) and (B, A) differ slightly (in the 1'AB1 term).
- ``svcca``: SVCCA (Raghu et al. 2017): centre, keep the top `svcca_dims` singular directions of each
  representation, mean of the canonical correlations between the two subspaces (the singular values of U_A' U_B).

`model_similarity` prepares each model once (its centred features, kNN graph, RBF bandwidth, SVCCA basis) and gets
all pairs from those: kernel measures in one pass over blocks of rows that holds [N, b, n] float64 kernel rows at
once (b chosen from `memory_mb`), never an N x n x n tensor; kNN measures from sorted n x k neighbour lists; SVCCA
from n x r bases. Pure: arrays in, records out; no files, no Ray.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featrec_grid.errors import UserError

ArrayLike = np.ndarray | torch.Tensor

MEASURES = ("linear_cka", "debiased_cka", "rbf_cka", "mutual_knn", "cknna", "svcca")
KERNEL_MEASURES = ("linear_cka", "debiased_cka", "rbf_cka")
KNN_MEASURES = ("mutual_knn", "cknna")
MIN_ROWS = 4
"""The unbiased HSIC (debiased CKA, CKNNA) divides by n(n-3)."""


class SimilarityWarning(UserWarning):
    """A similarity value is undefined (a representation without variance, an empty kNN self-alignment)."""


def describe_measures(
    measures: Sequence[str] = MEASURES, k: int = 10, sigma: float = 0.5, svcca_dims: int = 10
) -> dict[str, str]:
    """One line per measure with its parameters and reference, for report captions and README tables."""
    lines = {
        "linear_cka": "linear CKA, biased HSIC (Kornblith et al. 2019)",
        "debiased_cka": "linear CKA, unbiased HSIC (Song et al. 2012; Nguyen, Raghu & Kornblith 2021)",
        "rbf_cka": f"RBF-kernel CKA, bandwidth {sigma} x median pairwise distance (Kornblith et al. 2019)",
        "mutual_knn": f"mutual {k}-nearest-neighbour alignment, cosine neighbours (Huh et al. 2024)",
        "cknna": f"CKNNA, {k} mutual nearest neighbours, unbiased HSIC (Huh et al. 2024)",
        "svcca": f"SVCCA, top {svcca_dims} singular directions, mean canonical correlation (Raghu et al. 2017)",
    }
    return {m: lines[m] for m in _check_measures(measures)}


def _check_measures(measures: Sequence[str]) -> list[str]:
    chosen = [measures] if isinstance(measures, str) else list(measures)
    unknown = [m for m in chosen if m not in MEASURES]
    if unknown or not chosen:
        raise UserError(f"similarity measures: unknown {unknown or chosen!r}; allowed: {', '.join(MEASURES)}")
    return list(dict.fromkeys(chosen))


def _matrix(x: ArrayLike, name: str) -> torch.Tensor:
    """[n, ...] numpy or torch -> torch [n, d] float32 (float64 stays float64), finite, on the CPU."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim < 2:
        raise UserError(f"representation {name!r}: expected an array [n, features...], got shape {tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1)
    t = t if t.dtype in (torch.float32, torch.float64) else t.float()
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"representation {name!r}: contains NaN or infinite values")
    return t


# ----------------------------------------------------------------------------------------------------------
# Per-model state


@dataclass
class KnnGraph:
    """Each example's k nearest neighbours by cosine similarity (self excluded): flat sorted keys i*n + j, the
    cosine values K_ij at those keys (float64), and n."""

    keys: np.ndarray
    values: np.ndarray
    n: int
    k: int


def knn_graph(x: ArrayLike, k: int, block_rows: int = 1024) -> KnnGraph:
    """The kNN graph of Huh et al.: rows L2-normalised, top-k of K = X X' per row with the diagonal excluded.
    Blockwise (block_rows x n similarities at a time); the selected values are recomputed in float64."""
    t = _matrix(x, "x")
    n = t.shape[0]
    if not 1 <= k <= n - 1:
        raise UserError(f"kNN measures: k must be between 1 and n - 1 = {n - 1}, got {k}")
    unit = t / torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(1e-12)  # F.normalize's convention
    idx = torch.empty(n, k, dtype=torch.int64)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        sims = unit[start:stop] @ unit.T
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = -torch.inf
        idx[start:stop] = torch.topk(sims, k, dim=1).indices
    idx = torch.sort(idx, dim=1).values
    unit64 = unit.double()
    step = max(1, block_rows // k)  # [step, k, d] float64 neighbour rows at a time
    values = torch.cat(
        [torch.einsum("id,ikd->ik", unit64[s : s + step], unit64[idx[s : s + step]]) for s in range(0, n, step)]
    )
    keys = (torch.arange(n)[:, None] * n + idx).reshape(-1).numpy()
    return KnnGraph(keys=keys, values=values.reshape(-1).numpy(), n=n, k=k)


def _sparse_unbiased_hsic(keys: np.ndarray, a: np.ndarray, b: np.ndarray, n: int) -> float:
    """Song's unbiased HSIC of two n x n matrices that are zero outside the sorted flat keys i*n + j (and on the
    diagonal), with values a and b there: [sum_ij A_ij B_ji + 1'A1 1'B1 / ((n-1)(n-2)) - 2/(n-2) 1'AB1] / (n(n-3)),
    exactly platonic-rep's hsic_unbiased (which uses sum(K * L.T) for the trace)."""
    i, j = keys // n, keys % n
    transposed = j * n + i
    pos = np.searchsorted(keys, transposed).clip(max=max(len(keys) - 1, 0))
    both = keys[pos] == transposed if len(keys) else np.zeros(0, dtype=bool)
    trace = float(np.dot(a[both], b[pos[both]]))
    total = float(a.sum()) * float(b.sum()) / ((n - 1) * (n - 2))
    cross = float(np.dot(np.bincount(j, weights=a, minlength=n), np.bincount(i, weights=b, minlength=n)))
    return (trace + total - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _knn_pair(ga: KnnGraph, gb: KnnGraph) -> tuple[float, float, float]:
    """(mutual kNN fraction, HSIC_u(M*K, M*L), HSIC_u(M*L, M*K)) on the mutual neighbours M of two graphs (M is
    not symmetric, so neither is the unbiased HSIC of the masked kernels: 1'AB1 != 1'BA1)."""
    pos = np.searchsorted(gb.keys, ga.keys).clip(max=len(gb.keys) - 1)
    hit = gb.keys[pos] == ga.keys
    mutual = float(hit.sum()) / (ga.n * ga.k)
    keys, a, b = ga.keys[hit], ga.values[hit], gb.values[pos[hit]]
    return mutual, _sparse_unbiased_hsic(keys, a, b, ga.n), _sparse_unbiased_hsic(keys, b, a, ga.n)


def svcca_basis(x: ArrayLike, dims: int) -> torch.Tensor:
    """Orthonormal basis [n, r] of the top r = min(dims, rank) singular directions of the centred features
    (float64, through the eigendecomposition of the smaller of X'X and XX')."""
    if dims < 1:
        raise UserError(f"svcca: svcca_dims must be >= 1, got {dims}")
    t = _matrix(x, "x").double()
    t = t - t.mean(0)
    n, d = t.shape
    evals, evecs = torch.linalg.eigh(t.T @ t if d <= n else t @ t.T)
    evals, evecs = evals.flip(0), evecs.flip(1)
    keep = int((evals > evals[0].clamp_min(0) * max(n, d) * torch.finfo(torch.float64).eps).sum())
    r = min(dims, keep)
    if r == 0:
        return torch.zeros(n, 0, dtype=torch.float64)
    if d <= n:
        return (t @ evecs[:, :r]) / evals[:r].sqrt()
    return evecs[:, :r]


def _svcca_pair(ua: torch.Tensor, ub: torch.Tensor) -> float:
    """Mean canonical correlation between two orthonormal bases: mean singular value of Ua' Ub."""
    r = min(ua.shape[1], ub.shape[1])
    if r == 0:
        return float("nan")
    return float(torch.linalg.svdvals(ua.T @ ub)[:r].clamp(0.0, 1.0).mean())


def median_sq_distance(xc: torch.Tensor, sq: torch.Tensor, block_rows: int = 1024) -> float:
    """numpy.median of the full n x n matrix of squared distances (diagonal zeros included, as Kornblith's
    notebook takes it), from the n(n-1)/2 upper-triangle values held as float32 (2 bytes per entry of the full
    matrix); sq = squared row norms of xc (float64)."""
    n = xc.shape[0]
    upper = np.empty(n * (n - 1) // 2, dtype=np.float32)
    at = 0
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        d2 = _sq_distances(xc[start:stop] @ xc.T, sq, start)
        for r in range(stop - start):
            row = d2[r, start + r + 1 :]
            upper[at : at + row.shape[0]] = row.numpy()
            at += row.shape[0]
    total = n * n

    def full(m: int) -> int:  # index into the sorted upper values of the full matrix's m-th smallest (m >= n)
        return (m - n) // 2

    wanted = [total // 2] if total % 2 else [total // 2 - 1, total // 2]
    picks = sorted({full(m) for m in wanted if m >= n})
    part = np.partition(upper, picks) if picks else upper
    values = [0.0 if m < n else float(part[full(m)]) for m in wanted]
    return float(np.mean(values))


def _sq_distances(gram: torch.Tensor, sq: torch.Tensor, start: int, out: torch.Tensor | None = None):
    """Squared distances [b, n] of rows start:start+b (float64, >= 0, exact zeros on the diagonal) from their
    Gram block [b, n] and the squared row norms sq [n] (float64); written into `out` when given."""
    b = gram.shape[0]
    d2 = torch.mul(gram.double(), -2.0, out=out)
    d2 += sq[start : start + b, None]
    d2 += sq[None, :]
    d2.clamp_min_(0.0)
    rows = torch.arange(b)
    d2[rows, rows + start] = 0.0
    return d2


@dataclass
class _Prepared:
    xc: torch.Tensor | None = None  # centred features (kernel measures)
    sq: torch.Tensor | None = None  # squared row norms of xc, float64
    width: float | None = None  # 2 s^2 of the RBF kernel
    graph: KnnGraph | None = None
    knn_self: float | None = None  # HSIC_u(M_K*K, M_K*K)
    basis: torch.Tensor | None = None  # SVCCA basis


def _prepare(x: torch.Tensor, chosen: list[str], k: int, sigma: float, svcca_dims: int, block_rows: int):
    state = _Prepared()
    if any(m in KERNEL_MEASURES for m in chosen):
        state.xc = x - x.mean(0)
        state.sq = state.xc.double().square().sum(1)
        if "rbf_cka" in chosen:
            median = median_sq_distance(state.xc, state.sq, block_rows)
            if not median > 0:
                raise UserError(
                    "rbf_cka: the median pairwise distance is 0 (most examples identical); sigma is undefined"
                )
            state.width = 2.0 * sigma**2 * median
    if any(m in KNN_MEASURES for m in chosen):
        state.graph = knn_graph(x, k, block_rows)
        if "cknna" in chosen:
            g = state.graph
            state.knn_self = _sparse_unbiased_hsic(g.keys, g.values, g.values, g.n)
    if "svcca" in chosen:
        state.basis = svcca_basis(x, svcca_dims)
    return state


# ----------------------------------------------------------------------------------------------------------
# All pairs


def _kernel_similarities(states: list[_Prepared], measures: list[str], n: int, block_rows: int):
    """{measure: [N, N] CKA} from one pass over row blocks: per block each model's Gram rows [b, n] once, turned
    into every kernel measure's rows (centred linear; zero diagonal for the unbiased estimator; RBF) in
    preallocated [N, b, n] float64 stacks, whose products accumulate all N x N inner products."""
    count = len(states)
    dots = {m: torch.zeros(count, count, dtype=torch.float64) for m in measures}
    rowsums = {m: torch.zeros(count, n, dtype=torch.float64) for m in measures}
    stacks = {m: torch.empty(count, block_rows, n, dtype=torch.float64) for m in measures}
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        diag = (torch.arange(stop - start), torch.arange(start, stop))
        for a, state in enumerate(states):
            gram = state.xc[start:stop] @ state.xc.T
            for m in measures:
                out = stacks[m][a, : stop - start]
                if m == "rbf_cka":
                    _sq_distances(gram, state.sq, start, out=out).div_(-state.width).exp_()
                else:
                    out.copy_(gram)
                    if m == "debiased_cka":
                        out[diag] = 0.0
        for m in measures:
            rows = stacks[m][:, : stop - start]
            rowsums[m][:, start:stop] = rows.sum(-1)
            flat = rows.reshape(count, -1)
            dots[m] += flat @ flat.T
    out = {}
    for m in measures:
        r, dot = rowsums[m], dots[m]
        total = r.sum(1)
        if m == "debiased_cka":  # Song et al.'s unbiased HSIC, times n(n-3)
            hsic = dot + torch.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (r @ r.T)
        else:  # <HKH, HLH> = <K, L> - 2/n (K1).(L1) + (1'K1)(1'L1)/n^2
            hsic = dot - 2.0 / n * (r @ r.T) + torch.outer(total, total) / n**2
        out[m] = _normalise(hsic.numpy(), m)
    return out


def _normalise(hsic: np.ndarray, measure: str) -> np.ndarray:
    """hsic_ab / sqrt(hsic_aa hsic_bb); NaN (with a warning) where a self term is not positive."""
    diag = np.diag(hsic).copy()
    bad = ~(diag > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = hsic / np.sqrt(np.outer(np.where(bad, np.nan, diag), np.where(bad, np.nan, diag)))
    if bad.any():
        warnings.warn(
            f"{measure}: representations {np.flatnonzero(bad).tolist()} have no variance in this measure "
            "(self term <= 0); their values are NaN",
            SimilarityWarning,
            stacklevel=3,
        )
    return value


def choose_block_rows(models: int, n: int, kernel_measures: int, memory_mb: float) -> int:
    """Rows per block so that the [N, b, n] float64 kernel stacks of one block fit in memory_mb (at least 1)."""
    per_row = models * n * 8 * max(1, kernel_measures)
    return int(max(1, min(n, memory_mb * 2**20 // per_row)))


def model_similarity(
    reps: Mapping[str, ArrayLike],
    measures: Sequence[str] = MEASURES,
    k: int = 10,
    sigma: float = 0.5,
    svcca_dims: int = 10,
    memory_mb: float = 512,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Every measure for every ordered pair of the named representations (all [n, ...] over the same n
    examples, in the same order): records {measure, model_a, model_b, value}, model pairs in `reps` order,
    a == b included. Each unordered pair is computed once; all measures are symmetric except CKNNA, whose
    estimator (platonic-rep's, on a mask that is not symmetric) differs slightly between (a, b) and (b, a): both
    orders are computed from the same mutual-neighbour set.

    Parameters: k (neighbours, mutual_knn and cknna), sigma (RBF bandwidth as a fraction of the median distance),
    svcca_dims (SVCCA directions), memory_mb (bound on the kernel pass's block stacks). Float32 inputs give
    float32 Gram products of centred features (relative error ~1e-7), accumulated in float64; float64 inputs
    stay float64 throughout. `timings` (optional dict) receives seconds of the stages: "prepare" (all models),
    "kernel_pass" (all pairs of the kernel measures) and "pairs" (all pairs of the others)."""
    chosen = _check_measures(measures)
    if not reps:
        raise UserError("model_similarity: no representations given")
    if not sigma > 0:
        raise UserError(f"rbf_cka: sigma must be > 0 (a fraction of the median distance), got {sigma}")
    if any(m in KNN_MEASURES for m in chosen) and k < 2:
        raise UserError(f"mutual_knn/cknna: k must be >= 2 (as platonic-rep requires for CKNNA), got {k}")
    names = list(reps)
    mats = [_matrix(reps[name], name) for name in names]
    n = mats[0].shape[0]
    for name, t in zip(names, mats, strict=True):
        if t.shape[0] != n:
            raise UserError(
                f"representation {name!r} has {t.shape[0]} rows, {names[0]!r} has {n}: "
                "similarity needs the same examples in every representation"
            )
    if n < MIN_ROWS:
        raise UserError(f"model_similarity needs at least {MIN_ROWS} examples, got {n}")
    kernel = [m for m in chosen if m in KERNEL_MEASURES]
    block = choose_block_rows(len(names), n, len(kernel), memory_mb)
    per_model = int(max(1, min(n, memory_mb * 2**20 // (n * 8 * 4))))  # one model's [b, n] blocks and temps
    clock = time.perf_counter()
    states = [_prepare(t, chosen, k, sigma, svcca_dims, per_model) for t in mats]
    del mats
    stages = {"prepare": time.perf_counter() - clock}
    clock = time.perf_counter()
    matrices = _kernel_similarities(states, kernel, n, block) if kernel else {}
    stages["kernel_pass"] = time.perf_counter() - clock
    clock = time.perf_counter()
    for m in chosen:
        if m in matrices:
            continue
        values = np.empty((len(names), len(names)))
        for a, sa in enumerate(states):
            for b in range(a, len(names)):
                sb = states[b]
                if m == "svcca":
                    value = _svcca_pair(sa.basis, sb.basis)
                    values[a, b] = values[b, a] = value
                    continue
                mutual, ab, ba = _knn_pair(sa.graph, sb.graph)
                if m == "mutual_knn":
                    values[a, b] = values[b, a] = mutual
                else:
                    values[a, b] = _cknna_ratio(ab, sa.knn_self, sb.knn_self)
                    values[b, a] = _cknna_ratio(ba, sb.knn_self, sa.knn_self)
        if m == "cknna" and np.isnan(values).any():
            warnings.warn(
                "cknna: a kNN self-alignment HSIC_u(M_K*K, M_K*K) is not positive; those values are NaN",
                SimilarityWarning,
                stacklevel=2,
            )
        matrices[m] = values
    stages["pairs"] = time.perf_counter() - clock
    if timings is not None:
        timings.update(stages)
    return [
        {"measure": m, "model_a": a, "model_b": b, "value": float(matrices[m][i, j])}
        for m in chosen
        for i, a in enumerate(names)
        for j, b in enumerate(names)
    ]


def _cknna_ratio(cross: float, self_a: float, self_b: float) -> float:
    if not (self_a > 0 and self_b > 0):
        return float("nan")
    return cross / float(np.sqrt(self_a * self_b))


def similarity(X: ArrayLike, Y: ArrayLike, measure: str, **params: Any) -> float:
    """One measure between two representations [n, ...] of the same examples (model_similarity on the pair)."""
    records = model_similarity({"X": X, "Y": Y}, [measure], **params)
    return next(r["value"] for r in records if r["model_a"] == "X" and r["model_b"] == "Y")


def mutual_knn(X: ArrayLike, Y: ArrayLike, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment of Huh et al. 2024 (see the module docstring)."""
    return similarity(X, Y, "mutual_knn", k=k)


def cknna(X: ArrayLike, Y: ArrayLike, k: int = 10) -> float:
    """CKNNA of Huh et al. 2024 (see the module docstring)."""
    return similarity(X, Y, "cknna", k=k)


def svcca(X: ArrayLike, Y: ArrayLike, dims: int = 10) -> float:
    """SVCCA of Raghu et al. 2017 with the top `dims` singular directions (see the module docstring)."""
    return similarity(X, Y, "svcca", svcca_dims=dims)
