"""Centered kernel alignment (CKA): pure linear/RBF CKA, minibatch unbiased HSIC, and a drop-in for torch-cka's CKA.

The unbiased HSIC of Song et al. (2012), as used by torch-cka and by Nguyen, Raghu & Kornblith (ICLR 2021), is
computed here as the inner product of U-centered Gram matrices (Szekely & Rizzo 2014; Kornblith's
`center_gram(unbiased=True)`), which is algebraically the same number as torch-cka's `_HSIC` formula,

    hsic_u(K, L) = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),  K~ = K with zero diagonal,

but costs O(n^2) per layer instead of O(n^3) per layer pair, gives every layer pair from one matrix product, and is
non-negative for K = L by construction (it is a squared norm), so CKA never takes the square root of a negative.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from featrec_grid.errors import UserError
from featrec_grid.gram import lower_gram

ArrayLike = np.ndarray | torch.Tensor

MIN_BATCH = 4
"""The unbiased estimator divides by n(n-3): a batch needs at least 4 examples."""

BATCH_KEYS = ("input", "inputs", "x", "image", "images", "input_ids", "pixel_values")
"""Keys looked up, in this order, for the model input of a dict batch (pytorch-cka's list)."""

CONSTANT_RTOL = 1e-10
"""A batch's features count as constant when sum|x - c|^2 <= CONSTANT_RTOL * (sum|x - c|^2 + n|c|^2), c being the
shift they were centered by (relative spread below 1e-5, which float32 cannot resolve); their Gram is then exactly
zero instead of rounding noise."""

FIRST_ROW_SPREAD_MAX = 8.0
"""compare() shifts each layer's rows by the batch's first row before its float32 Gram (the spread around it is
twice that around the mean, on average). Where it is more than FIRST_ROW_SPREAD_MAX times that (an outlying first
example), the layer is taken again in a second forward pass of the batch, centered by the batch mean."""

ESTIMATOR = (
    "unbiased HSIC (Song et al. 2012) per minibatch, summed over minibatches (Nguyen, Raghu & Kornblith 2021); "
    "CKA = sum HSIC(K,L) / sqrt(sum HSIC(K,K) * sum HSIC(L,L)), accumulated in float64"
)


class CKAWarning(UserWarning):
    """A CKA result needs the user's attention (e.g. a layer with no variance across the inputs)."""


# ----------------------------------------------------------------------------------------------------------
# Pure functions: arrays in, numbers out.


def _matrix(x: ArrayLike, name: str) -> torch.Tensor:
    """Return `x` as a float64 torch matrix [n, -1] (numpy or torch input)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach()).to(torch.float64)
    if t.ndim < 2:
        raise UserError(f"{name}: expected an array [n, features...], got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1).cpu()


def _check_pair(x: torch.Tensor, y: torch.Tensor, minimum: int) -> None:
    if x.shape[0] != y.shape[0]:
        raise UserError(
            f"X has {x.shape[0]} rows and Y has {y.shape[0]}: CKA needs the same examples in both"
        )
    if x.shape[0] < minimum:
        raise UserError(f"CKA needs at least {minimum} examples here, got {x.shape[0]}")


def center_gram(gram: torch.Tensor) -> torch.Tensor:
    """H K H for Gram matrices [..., n, n] (the biased HSIC's double centering)."""
    gram = gram - gram.mean(-1, keepdim=True)
    return gram - gram.mean(-2, keepdim=True)


def u_center(gram: torch.Tensor) -> torch.Tensor:
    """U-centering of Gram matrices [..., n, n] (zero diagonal, float64) so that <U(K), U(L)> / (n(n-3)) is the
    unbiased HSIC; n >= 4."""
    n = gram.shape[-1]
    g = gram.to(torch.float64, copy=True)
    g.diagonal(dim1=-2, dim2=-1).zero_()
    rows = g.sum(-1) / (n - 2)
    rows = rows - rows.sum(-1, keepdim=True) / (2 * (n - 1))
    g -= rows.unsqueeze(-1)
    g -= rows.unsqueeze(-2)
    g.diagonal(dim1=-2, dim2=-1).zero_()
    return g


def _cka_from_grams(k: torch.Tensor, l_: torch.Tensor, debiased: bool) -> float:
    """CKA of two Gram matrices: biased (HKH) or debiased (U-centered) HSIC ratio."""
    kc, lc = (u_center(k), u_center(l_)) if debiased else (center_gram(k), center_gram(l_))
    return float((kc * lc).sum() / (kc.norm() * lc.norm()))


def _debiased_dot(xty: torch.Tensor, rows_x: torch.Tensor, rows_y: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased <K, L> (times n(n-3)) from feature-space quantities (Kornblith's debiased helper)."""
    return xty - n / (n - 2) * rows_x.dot(rows_y) + rows_x.sum() * rows_y.sum() / ((n - 1) * (n - 2))


def linear_cka(X: ArrayLike, Y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA of two representations [n, dx] and [n, dy] of the same n examples (Kornblith et al. 2019).

    `debiased=True` uses the unbiased HSIC estimator (needs n >= 4). Computed in float64, in feature space
    (O(n d^2)) when n exceeds the feature count, else from Gram matrices (O(n^2 d))."""
    x, y = _matrix(X, "X"), _matrix(Y, "Y")
    _check_pair(x, y, MIN_BATCH if debiased else 2)
    n = x.shape[0]
    x, y = x - x.mean(0), y - y.mean(0)
    if n <= x.shape[1] + y.shape[1]:
        return _cka_from_grams(x @ x.T, y @ y.T, debiased)
    xy = (x.T @ y).square().sum()
    xx = (x.T @ x).square().sum()
    yy = (y.T @ y).square().sum()
    if debiased:
        rx, ry = x.square().sum(1), y.square().sum(1)
        xy, xx, yy = _debiased_dot(xy, rx, ry, n), _debiased_dot(xx, rx, rx, n), _debiased_dot(yy, ry, ry, n)
    return float(xy / (xx * yy).sqrt())


def rbf_gram(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """RBF Gram exp(-d^2 / (2 (sigma * median d)^2)), median over all pairwise distances (Kornblith's demo)."""
    sq = x.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_min(0)
    median = float(np.median(d2.numpy()))  # numpy's median (mean of the middle two), as in the notebook
    if median <= 0:
        raise UserError(
            "RBF CKA: the median pairwise distance is 0 (most examples identical); sigma is undefined"
        )
    return torch.exp(-d2 / (2 * sigma**2 * median))


def kernel_cka(X: ArrayLike, Y: ArrayLike, sigma: float = 0.5, debiased: bool = False) -> float:
    """RBF-kernel CKA; the bandwidth is `sigma` times the median pairwise distance of each representation
    (Kornblith et al. 2019's notebook: threshold 0.5 gives its 0.65483 example). Computed in float64."""
    if not sigma > 0:
        raise UserError(f"kernel_cka: sigma must be > 0 (a fraction of the median distance), got {sigma}")
    x, y = _matrix(X, "X"), _matrix(Y, "Y")
    _check_pair(x, y, MIN_BATCH if debiased else 2)
    return _cka_from_grams(rbf_gram(x, sigma), rbf_gram(y, sigma), debiased)


@functools.lru_cache(maxsize=16)
def _mean_weights(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A vector of n entries 1/n: the mean of rows as one matrix-vector product (a normal tensor even when first
    made under inference mode, so that it can be cached and reused anywhere)."""
    with torch.inference_mode(False):
        return torch.full((n,), 1.0 / n, dtype=dtype, device=device)


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    """One batch of features [n, ...] as [n, d]; float64 stays float64, any other dtype becomes float32."""
    x = x.reshape(x.shape[0], -1)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _center(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of features [n, ...] -> (_as_matrix(features) minus their mean c, n |c|^2)."""
    x = _as_matrix(x)
    mean = _mean_weights(x.shape[0], x.dtype, x.device) @ x  # a gemv: 2-3x faster than x.mean(0) on CPU
    return x - mean, mean.dot(mean) * x.shape[0]


def _is_constant(spread: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Features count as constant when sum |x - c|^2 (the shifted Gram's trace, `spread`) <= CONSTANT_RTOL *
    (spread + n |c|^2), `offset` being n |c|^2 for the shift c (the mean, or compare()'s first row)."""
    return spread <= CONSTANT_RTOL * (spread + offset.to(spread.dtype))


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """Linear Gram [n, n] of one batch of features [n, ...] centered per batch (float64 input stays float64, any
    other dtype becomes float32). Centering leaves the unbiased HSIC unchanged and makes the float32 product
    accurate; features that are constant within float32 resolution (see CONSTANT_RTOL) give an exact zero Gram."""
    xc, offset = _center(x)
    gram = xc @ xc.T
    return gram.zero_() if bool(_is_constant(gram.diagonal().sum(), offset)) else gram


class SongTerms(NamedTuple):
    """Everything the unbiased HSIC of every layer pair needs from one side's Grams [L, n, n]."""

    flat: torch.Tensor  # K~ (diagonal zeroed) flattened [L, n*n], or only its lower triangle when `half`
    rows: torch.Tensor  # row sums of K~ [L, n]
    total: torch.Tensor  # 1'K~1 [L]
    half: bool  # flat holds each off-diagonal entry once (zero above the diagonal): tr(K~L~) = 2 flat_K . flat_L

    def pick(self, index: torch.Tensor) -> SongTerms:
        """The terms of the layers in `index`, in that order."""
        return SongTerms(self.flat[index], self.rows[index], self.total[index], self.half)


def _song_terms(grams: torch.Tensor) -> SongTerms:
    """Zero, in place, the diagonals of full float64 Grams [L, n, n] and return their SongTerms."""
    grams.diagonal(dim1=-2, dim2=-1).zero_()
    rows = grams.sum(-1)
    return SongTerms(grams.reshape(grams.shape[0], -1), rows, rows.sum(-1), False)


def _song_self(terms: SongTerms, n: int) -> torch.Tensor:
    """Unbiased HSIC(K, K) [L] from SongTerms."""
    value = torch.linalg.vector_norm(terms.flat, dim=1).square() * (2.0 if terms.half else 1.0)
    value += terms.total.square() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * terms.rows.square().sum(-1)
    return value / (n * (n - 3))


def _song_cross(terms1: SongTerms, terms2: SongTerms, n: int) -> torch.Tensor:
    """Unbiased HSIC(K_i, L_j) [L1, L2] from SongTerms of both sides (both full or both half): one float64
    matrix product for tr(K~L~)."""
    value = terms1.flat @ terms2.flat.T
    if terms1.half:
        value *= 2.0
    value += torch.outer(terms1.total, terms2.total) / ((n - 1) * (n - 2))
    value -= 2.0 / (n - 2) * (terms1.rows @ terms2.rows.T)
    return value / (n * (n - 3))


def _hsic_from_terms(
    terms1: SongTerms, terms2: SongTerms, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(HSIC(K_i, L_j), HSIC(K_i, K_i), HSIC(L_j, L_j)) from SongTerms; `terms2 is terms1` takes HSIC(K, K) from
    the cross matrix's diagonal."""
    if terms2 is terms1:
        xy = _song_cross(terms1, terms1, n)
        return xy, xy.diagonal().clone(), xy.diagonal().clone()
    return _song_cross(terms1, terms2, n), _song_self(terms1, n), _song_self(terms2, n)


def _hsic_in_place(grams1: torch.Tensor, grams2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """unbiased_hsic_matrix on full float64 Grams that the caller gives up (their diagonals are zeroed);
    `grams2 is grams1` computes the shared terms once."""
    n = grams1.shape[-1]
    if n < MIN_BATCH or grams2.shape[-1] != n:
        raise UserError(
            f"unbiased HSIC needs equal batch sizes >= {MIN_BATCH}, got {n} and {grams2.shape[-1]}"
        )
    terms1 = _song_terms(grams1)
    return _hsic_from_terms(terms1, terms1 if grams2 is grams1 else _song_terms(grams2), n)


def unbiased_hsic_matrix(
    grams1: torch.Tensor, grams2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unbiased HSIC for all layer pairs of one batch: Grams [L1, n, n] and [L2, n, n] ->
    (HSIC(K_i, L_j) [L1, L2], HSIC(K_i, K_i) [L1], HSIC(L_j, L_j) [L2]) in float64.

    Song et al.'s formula term by term, [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) (K~1).(L~1)] / (n(n-3)),
    with tr(K~L~) for every pair from one product of flattened Grams (O(L1 L2 n^2), not O(n^3) per pair). The
    inputs are not modified."""
    same = grams2 is grams1
    g1 = grams1.to(torch.float64, copy=True)
    return _hsic_in_place(g1, g1 if same else grams2.to(torch.float64, copy=True))


def cka_from_hsic(
    hsic_xy: torch.Tensor, hsic_xx: torch.Tensor, hsic_yy: torch.Tensor
) -> tuple[torch.Tensor, list[int], list[int]]:
    """CKA [L1, L2] = hsic_xy / sqrt(hsic_xx hsic_yy), plus the indices of invalid layers on each side.

    A layer is invalid when its accumulated HSIC(K, K) is not positive: its representation has no (estimated)
    variance across the inputs, so CKA is undefined (0/0). Its row or column is set to 0, the value HSIC(K, L)
    itself takes for a constant representation ("shares no variance"), never NaN; callers must report the layers."""
    bad1 = ~(hsic_xx > 0)
    bad2 = ~(hsic_yy > 0)
    denom = torch.sqrt(hsic_xx.clamp_min(0)[:, None] * hsic_yy.clamp_min(0)[None, :])
    valid = ~(bad1[:, None] | bad2[None, :])
    cka = torch.where(
        valid, hsic_xy / torch.where(valid, denom, torch.ones_like(denom)), torch.zeros_like(denom)
    )
    return cka, bad1.nonzero().flatten().tolist(), bad2.nonzero().flatten().tolist()


class HSICAccumulator:
    """Sums of unbiased HSIC over minibatches for all layer pairs (float64), as in Nguyen et al. 2021."""

    def __init__(self) -> None:
        self.hsic_xy: torch.Tensor | None = None
        self.hsic_xx: torch.Tensor | None = None
        self.hsic_yy: torch.Tensor | None = None
        self.batches = 0
        self.examples = 0

    def add(self, xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, n: int) -> None:
        """Add one batch's HSIC matrices (as unbiased_hsic_matrix returns them) computed on n examples."""
        if self.hsic_xy is None:
            self.hsic_xy, self.hsic_xx, self.hsic_yy = xy, xx, yy
        else:
            self.hsic_xy += xy
            self.hsic_xx += xx
            self.hsic_yy += yy
        self.batches += 1
        self.examples += n

    def update(self, grams1: torch.Tensor, grams2: torch.Tensor) -> None:
        """Add one batch: Grams [L1, n, n] of side 1 and [L2, n, n] of side 2 over the same n examples."""
        self.add(*unbiased_hsic_matrix(grams1, grams2), grams1.shape[-1])

    def update_features(self, feats1: Sequence[ArrayLike], feats2: Sequence[ArrayLike]) -> None:
        """Add one batch given per-layer features ([n, ...] arrays, numpy or torch) of each side."""
        grams = [
            torch.stack([centered_gram(torch.as_tensor(f)).double() for f in feats])
            for feats in (feats1, feats2)
        ]
        self.add(*_hsic_in_place(*grams), grams[0].shape[-1])

    def result(self) -> tuple[torch.Tensor, list[int], list[int]]:
        """(CKA [L1, L2] float64, invalid layer indices of side 1, of side 2); see cka_from_hsic."""
        if self.hsic_xy is None:
            raise UserError("CKA: no batches were accumulated (empty data loader?)")
        return cka_from_hsic(self.hsic_xy, self.hsic_xx, self.hsic_yy)


def _layer_list(layers: Any, which: str) -> list[torch.Tensor]:
    """One side of cka_from_features as a list of [n, ...] tensors: a sequence of arrays, a 3-D array [L, n, d]
    (pytorch-cka's convention), or any other single array [n, ...] as one layer."""
    if isinstance(layers, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(layers)
        items = list(t.unbind(0)) if t.ndim == 3 else [t]
    else:
        items = [torch.as_tensor(np.asarray(f)) if not isinstance(f, torch.Tensor) else f for f in layers]
    if not items:
        raise UserError(f"cka_from_features: {which} has no layers")
    for i, f in enumerate(items):
        if f.ndim < 2:
            raise UserError(f"cka_from_features: {which}[{i}] has shape {tuple(f.shape)}, expected [n, features...]")
    return [f.detach() for f in items]


def cka_from_features(X_layers: Any, Y_layers: Any, debiased: bool = True) -> torch.Tensor:
    """Linear CKA [L1, L2] (float64) between pre-extracted features of several layers of two models, on the same
    n examples. Each side: a sequence of arrays [n, ...] (numpy or torch, any widths), a 3-D array [L, n, d], or
    one array [n, ...] for a single layer. `debiased=True`: the unbiased HSIC that compare() and pytorch-cka
    use (n >= 4); False: Kornblith's biased estimator. One centered Gram per layer, every pair from one product;
    a layer without variance gets 0 and a CKAWarning."""
    sides = [_layer_list(X_layers, "X_layers"), _layer_list(Y_layers, "Y_layers")]
    n = sides[0][0].shape[0]
    for which, side in zip(("X_layers", "Y_layers"), sides, strict=True):
        for i, f in enumerate(side):
            if f.shape[0] != n:
                raise UserError(f"cka_from_features: {which}[{i}] has {f.shape[0]} rows, X_layers[0] has {n}")
    if n < (MIN_BATCH if debiased else 2):
        raise UserError(f"cka_from_features needs at least {MIN_BATCH if debiased else 2} examples, got {n}")
    grams = [torch.stack([centered_gram(f).double() for f in side]) for side in sides]
    if debiased:
        xy, xx, yy = _hsic_in_place(*grams)
    else:
        flat1, flat2 = (g.reshape(g.shape[0], -1) for g in grams)
        xy = flat1 @ flat2.T
        xx, yy = (torch.linalg.vector_norm(f, dim=1).square() for f in (flat1, flat2))
    cka, bad1, bad2 = cka_from_hsic(xy, xx, yy)
    if bad1 or bad2:
        warnings.warn(
            f"CKA: layers without variance set to 0: X_layers {bad1}, Y_layers {bad2}", CKAWarning, stacklevel=2
        )
    return cka


def minibatch_cka(batches: Iterable[tuple[Sequence[ArrayLike], Sequence[ArrayLike]]]) -> torch.Tensor:
    """Minibatch linear CKA [L1, L2] from batches of (side-1 layer features, side-2 layer features)."""
    acc = HSICAccumulator()
    for feats1, feats2 in batches:
        acc.update_features(feats1, feats2)
    cka, bad1, bad2 = acc.result()
    if bad1 or bad2:
        warnings.warn(
            f"CKA: layers without variance set to 0: side 1 {bad1}, side 2 {bad2}", CKAWarning, stacklevel=2
        )
    return cka


# ----------------------------------------------------------------------------------------------------------
# Layer-wise comparison of two models, API-compatible with torch-cka 0.21.


def default_layers(model: nn.Module) -> list[str]:
    """Leaf modules that own parameters (conv, linear, norm layers), in named_modules order."""
    return [
        name
        for name, m in model.named_modules()
        if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))
    ]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside nn.DataParallel / DistributedDataParallel wrappers (layer names then lose "module.")."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def resolve_layers(
    model: nn.Module, requested: Sequence[str | int] | str | int | None, which: str
) -> list[str]:
    """Requested layers in named_modules order, as torch-cka exports them. A layer is a qualified name (as
    named_modules gives it; a leading "module." from a DataParallel wrapper is accepted) or an int index into the
    named modules without the root (pytorch-cka's convention; negative counts from the end). An unknown name is
    a UserError listing the closest names; an index out of range says the range."""
    if requested is None:
        layers = default_layers(model)
        if not layers:
            raise UserError(f"{which}: no leaf module with parameters; pass {which}_layers explicitly")
        return layers
    wanted = [requested] if isinstance(requested, (str, int)) else list(requested)
    names = [name for name, _ in model.named_modules()]
    indexable = names[1:]
    known = set(names)
    chosen: set[str] = set()
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, (str, int)):
            raise UserError(f"{which}_layers: {layer!r} is neither a module name nor an int index")
        if isinstance(layer, int):
            if not -len(indexable) <= layer < len(indexable):
                raise UserError(
                    f"{which}_layers: index {layer} is out of range for {type(model).__name__}, which has "
                    f"{len(indexable)} named modules (allowed: {-len(indexable)} to {len(indexable) - 1})"
                )
            chosen.add(indexable[layer])
            continue
        name = layer if layer in known or not layer.startswith("module.") else layer[len("module.") :]
        if name not in known:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
            hint = (
                f"closest: {', '.join(repr(c) for c in close)}" if close else f"e.g. {', '.join(names[1:6])}"
            )
            raise UserError(f"{which}_layers: no module named {name!r} in {type(model).__name__}; {hint}")
        chosen.add(name)
    if not wanted:
        raise UserError(f"{which}_layers is empty: name at least one module, or pass None for the defaults")
    return [name for name in names if name in chosen]


def _pool_to_cap(x: torch.Tensor, cap: int) -> torch.Tensor:
    """Average-pool spatial [n, C, H, W] or token [n, T, D] outputs so that the features per example <= cap."""
    if x.ndim == 4:
        c, h, w = x.shape[1:]
        scale = math.sqrt(cap / (c * h * w))
        size = (max(1, int(h * scale)), max(1, int(w * scale)))
        return nn.functional.adaptive_avg_pool2d(x, size)
    if x.ndim == 3:
        t, d = x.shape[1:]
        return nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), max(1, cap // d)).transpose(1, 2)
    return x


def _output_tensor(name: str, output: Any) -> torch.Tensor:
    """The tensor of a module output: the output itself, `last_hidden_state` of a Hugging Face-style output, the
    first tensor of a tuple/list, or the first tensor value of a dict."""
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(output, Mapping):
        output = next((o for o in output.values() if isinstance(o, torch.Tensor)), None)
    elif isinstance(output, (tuple, list)):
        output = next((o for o in output if isinstance(o, torch.Tensor)), None)
    if not isinstance(output, torch.Tensor) or output.ndim == 0:
        raise UserError(f"layer {name!r}: its output is {type(output).__name__}, CKA needs a tensor [n, ...]")
    return output


class _LayerCapture:
    """Forward hooks on one model's layers. Each hooked output is shifted by its first row into a reused buffer
    when its module returns (so later in-place ops, ReLU(inplace=True) or `out += identity`, cannot change it, and
    activations are not kept) and the lower triangle of its Gram (a symmetric rank-k update, gram.lower_gram) is
    written into this batch's stack [L, n, n]; finish() reads the stacks into float64 SongTerms.

    A module run several times in one forward pass contributes its last call (as torch-cka does): the first batch
    takes a Gram at every call (the last one stays) and counts the calls; later batches skip the calls before the
    last one."""

    def __init__(
        self, model: nn.Module, layers: list[str], max_features: int | None, store: torch.device
    ) -> None:
        self.model, self.layers, self.max_features, self.store = model, layers, max_features, store
        self.index = {name: i for i, name in enumerate(layers)}
        self.active = False
        self.n = 0
        self.grams = torch.empty(0)  # this batch's Grams in float64, lower triangles [L, n, n], and their row sums
        self.rows = torch.empty(0)
        self.spread = torch.empty(0)  # trace of each centered or shifted Gram [L]
        self.offsets = torch.empty(0)  # n |c|^2 of its shift c [L]
        self.stacks: dict[torch.dtype, torch.Tensor] = {}  # zero-filled [L, n, n] per output dtype: lower_gram's
        self.dtypes: list[torch.dtype | None] = []  # the stack that holds each layer's Gram in this batch
        self.centered: dict[int, torch.Tensor | None] = {}  # layers centered by the mean in a second pass: n|mean|^2
        self.calls: dict[str, int] = {}
        self.wrong: dict[str, tuple[int, ...]] = {}
        self.expected: dict[str, int] | None = None  # calls per forward pass of each module, from batch 1
        self.reduced: dict[str, list[list[int]]] = {}
        self._buffers: dict[Any, torch.Tensor] = {}
        self._handles: list[Any] = []

    def attach(self) -> None:
        modules = dict(self.model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _buffer(self, x: torch.Tensor) -> torch.Tensor:
        """A reused [n, d] buffer for the shifted copy of x, one per shape and dtype, shared by the layers of that
        shape (each Gram is taken at once; a fresh copy per layer and batch would page-fault its memory in)."""
        key = (x.shape, x.dtype, x.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty_like(x)
        return buf

    def _slot(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's [n, n] place in the zero-filled Gram stack of x's dtype (made on first use per batch size)."""
        stack = self.stacks.get(x.dtype)
        if stack is None or stack.device != x.device:
            shape = (len(self.layers), self.n, self.n)
            stack = self.stacks[x.dtype] = torch.zeros(shape, dtype=x.dtype, device=x.device)
        self.dtypes[i] = x.dtype
        return stack[i]

    def _rows_not_first(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 1]: 0 for the first row, 1 for the others (cached per batch size, dtype and device)."""
        key = ("rows", self.n, x.dtype, x.device)
        weights = self._buffers.get(key)
        if weights is None:
            weights = self._buffers[key] = torch.ones(self.n, 1, dtype=x.dtype, device=x.device)
            weights[0] = 0.0
        return weights

    def _hook(self, name: str):
        i = self.index[name]

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self.active:
                return
            self.calls[name] = call = self.calls.get(name, 0) + 1
            if self.expected is not None and call < self.expected[name]:
                return  # a later call of this module is the one that counts
            x = self._features(name, output)
            if x.shape[0] != self.n:
                self.wrong[name] = tuple(x.shape)
                return
            x = _as_matrix(x)
            if self.centered:  # a second pass of this batch (see run): only the layers to center by the mean
                if i in self.centered:
                    xc, self.centered[i] = _center(x)
                    lower_gram(xc, self._slot(i, xc))
                return
            # Rows 1.. are shifted by row 0 (x_i - x_0), which removes the common offset that would make a float32
            # Gram inexact (the unbiased HSIC is invariant to any shift); row 0 itself stays, so that the Gram's
            # corner is |x_0|^2 for finish()'s constant test, and finish() zeroes its row and column (the shifted
            # row 0 is 0). Two ops per hook, one elementwise pass and one syrk: each op costs ~20-50 us here.
            shifted = torch.addcmul(x, self._rows_not_first(x), x[0], value=-1.0, out=self._buffer(x))
            lower_gram(shifted, self._slot(i, x))

        return hook

    def _features(self, name: str, output: Any) -> torch.Tensor:
        output = _output_tensor(name, output)
        if self.max_features is not None and output[0].numel() > self.max_features:
            pooled = _pool_to_cap(output, self.max_features)
            if pooled is not output:
                self.reduced.setdefault(name, [list(output.shape[1:]), list(pooled.shape[1:])])
            return pooled
        return output

    def run(self, x: torch.Tensor, which: str) -> tuple[SongTerms, torch.Tensor]:
        """One batch through the model: its SongTerms and keep mask (see finish), with the layers whose first row
        lay far from the others (FIRST_ROW_SPREAD_MAX) taken again, centered by the mean, in a second forward pass."""
        self.start(x.shape[0])
        self.model(x)
        terms, keep, outlying = self.finish(which)
        if outlying:
            self.start(x.shape[0], centered=outlying)
            self.model(x)
            terms, keep, _ = self.finish(which)
        return terms, keep

    def start(self, n: int, centered: Sequence[int] = ()) -> None:
        """Prepare for one batch of n examples (the buffers are reused while n stays the same), or for its second
        pass that centers the `centered` layers by the mean and keeps the others' terms."""
        count = len(self.layers)
        if self.grams.shape != (count, n, n):
            f64 = {"dtype": torch.float64, "device": self.store}
            self.grams, self.rows = torch.empty(count, n, n, **f64), torch.empty(count, n, **f64)
            self.spread, self.offsets = torch.empty(count, **f64), torch.empty(count, **f64)
            self.stacks = {}
        if not centered:
            self.dtypes = [None] * len(self.layers)
        self.centered = dict.fromkeys(centered)
        self.n, self.calls, self.wrong = n, {}, {}
        self.active = True

    def finish(self, which: str) -> tuple[SongTerms, torch.Tensor, list[int]]:
        """This batch's SongTerms (float64, in layer order, from lower triangles: see gram.lower_gram), a keep mask [L]
        that is False for layers constant within float32 resolution (their HSIC terms are set to exactly 0) and the
        layers to center by the mean in a second pass (see run); learn which modules run more than once."""
        self.active = False
        missing = [name for name in self.layers if name not in self.calls]
        if missing:
            raise UserError(
                f"{which}: layers {missing} produced no output in the forward pass (unused modules?)"
            )
        if self.wrong:
            wrong = [f"{k} {shape}" for k, shape in self.wrong.items()]
            raise UserError(
                f"{which}: outputs of {wrong} do not have the batch ({self.n}) as their first dimension"
            )
        if self.expected is None:
            self.expected = dict(self.calls)
            repeated = sorted(k for k, c in self.calls.items() if c > 1)
            if repeated:
                warnings.warn(
                    f"{which}: modules {repeated} run several times per forward pass; "
                    "CKA uses each one's last call (as torch-cka does)",
                    CKAWarning,
                    stacklevel=3,
                )
        fewer = {k: c for k, c in self.calls.items() if c < self.expected[k]}
        if fewer:
            raise UserError(
                f"{which}: modules ran fewer times in this batch than in the first ({fewer} vs "
                f"{ {k: self.expected[k] for k in fewer} }): their last call cannot be told in advance"
            )
        first = not self.centered
        for dtype, stack in self.stacks.items():
            index = [i for i in (range(len(self.layers)) if first else self.centered) if self.dtypes[i] == dtype]
            if index:
                self._take(stack, index, first)
        keep = ~_is_constant(self.spread, self.offsets)
        total = self.rows.sum(-1)  # 1'K~1, K~ the Gram with its diagonal zeroed
        terms = SongTerms(self.grams.reshape(len(self.layers), -1), self.rows, total, True)
        if not first:
            return terms, keep, []
        outlying = keep & (self.spread > FIRST_ROW_SPREAD_MAX * (self.spread - (total + self.spread) / self.n))
        return terms, keep, outlying.nonzero().flatten().tolist()

    def _take(self, stack: torch.Tensor, index: list[int], shifted: bool) -> None:
        """Read the Grams of layers `index` from one dtype's stack into this batch's float64 Grams, with their
        trace and offset, then (diagonal zeroed, and the first row's column for the `shifted` first pass) their
        row sums."""
        if len(index) == len(self.layers):
            grams = self.grams.copy_(stack)
        else:
            grams = stack[torch.tensor(index, device=stack.device)].to(self.store, torch.float64)
        diagonal = grams.diagonal(dim1=-2, dim2=-1)
        spread = diagonal.sum(-1)
        if shifted:  # the corner is |x_0|^2 (see the hook); the shifted first row is 0
            offsets, spread = grams[:, 0, 0] * self.n, spread - grams[:, 0, 0]
            grams[:, :, 0] = 0.0
        else:
            offsets = torch.stack([self.centered[i] for i in index]).to(self.store, torch.float64)
        diagonal.zero_()
        rows = grams.sum(-1) + grams.sum(-2)
        if grams is self.grams:
            self.spread, self.offsets, self.rows = spread, offsets, rows
            return
        at = torch.tensor(index, device=self.store)
        self.grams[at], self.spread[at], self.offsets[at], self.rows[at] = grams, spread, offsets, rows


def _batch_input(batch: Any, which: str) -> torch.Tensor:
    """The model input of one loader batch: the batch itself when it is a tensor, the first element of a
    tuple/list batch (as torch-cka), or a dict batch's first present key of BATCH_KEYS (as pytorch-cka)."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, Mapping):
        key = next((k for k in BATCH_KEYS if k in x), None)
        if key is None:
            raise UserError(f"{which}: a dict batch needs one of the keys {list(BATCH_KEYS)}, got {list(x)}")
        x = x[key]
    if not isinstance(x, torch.Tensor):
        raise UserError(
            f"{which}: a batch must be a tensor, a (tensor, ...) tuple or a dict, got {type(x).__name__}"
        )
    return x


def _dataset_name(loader: Any) -> str:
    """torch-cka's dataset label: the first line of the loader's dataset repr."""
    return repr(getattr(loader, "dataset", loader)).split("\n")[0]


def _masked_hsic(
    terms1: SongTerms, keep1: torch.Tensor, terms2: SongTerms, keep2: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's HSIC matrices from SongTerms (as _LayerCapture.finish returns them), with constant layers'
    terms exactly 0."""
    xy, xx, yy = _hsic_from_terms(terms1, terms2, n)
    k1, k2 = keep1.to(xy.dtype), keep2.to(xy.dtype)
    return xy * k1[:, None] * k2[None, :], xx * k1, yy * k2


class CKA:
    """Layer-by-layer linear CKA between two models; same constructor, compare(), export() and plot_results() as
    torch-cka 0.21 (`from featrec_grid.cka import CKA` replaces `from torch_cka import CKA`).

    Differences, all deliberate: forward passes run under torch.inference_mode; HSIC is accumulated in float64
    (torch-cka's float32 HSIC cancels large terms and drifts); the default layers are leaf modules with
    parameters (torch-cka: every module, including the whole model); each output is read when its module
    returns (torch-cka keeps references that later in-place ops change); unknown layer names, batches under
    4 examples and a layer without variance are reported, never turned into NaN; hooks are removed after
    compare(). `max_features` (optional) average-pools wider spatial/token outputs down to that many features
    per example to bound the cost; export() says which layers were pooled.

    Also accepted (as pytorch-cka 1.1.3): DataParallel / DistributedDataParallel models (unwrapped), layers given
    by int index into named_modules() without the root, Hugging Face-style outputs (`last_hidden_state`, tuples,
    dicts) and dict batches. When model1 and model2 are the same object and compare() gets one loader, each
    batch runs one forward pass and each distinct layer's Gram is computed once."""

    def __init__(
        self,
        model1: nn.Module,
        model2: nn.Module,
        model1_name: str | None = None,
        model2_name: str | None = None,
        model1_layers: Sequence[str | int] | None = None,
        model2_layers: Sequence[str | int] | None = None,
        device: str | torch.device = "cpu",
        max_features: int | None = None,
    ) -> None:
        if max_features is not None and max_features < 1:
            raise UserError(f"max_features must be a positive integer or None, got {max_features}")
        self.device = torch.device(device)
        model1, model2 = unwrap_model(model1), unwrap_model(model2)
        self.model1 = model1.to(self.device).eval()
        self.model2 = model2.to(self.device).eval()
        self.model1_name = model1_name if model1_name is not None else repr(model1).split("(")[0]
        self.model2_name = model2_name if model2_name is not None else repr(model2).split("(")[0]
        self.model1_layers = resolve_layers(model1, model1_layers, "model1")
        self.model2_layers = resolve_layers(model2, model2_layers, "model2")
        self.max_features = max_features
        self._results: dict[str, Any] | None = None
        self.hsic_matrix: torch.Tensor | None = None  # torch-cka's attribute name for the CKA matrix

    def compare(self, dataloader1: Iterable[Any], dataloader2: Iterable[Any] | None = None) -> None:
        """Accumulate unbiased HSIC over paired batches (the first element of each batch is the input); model 2
        runs on `dataloader2`, or on the very same batches as model 1 when it is None."""
        same_data = dataloader2 is None or dataloader2 is dataloader1
        one_pass = same_data and self.model1 is self.model2
        store = torch.device("cpu") if self.device.type == "mps" else self.device  # mps has no float64
        if one_pass:  # one capture over the union of both sides' layers, one forward per batch
            chosen = set(self.model1_layers) | set(self.model2_layers)
            union = [name for name, _ in self.model1.named_modules() if name in chosen]
            shared = _LayerCapture(self.model1, union, self.max_features, store)
            captures = [shared]
            pick1 = torch.tensor([shared.index[name] for name in self.model1_layers], device=store)
            pick2 = torch.tensor([shared.index[name] for name in self.model2_layers], device=store)
            identical = self.model1_layers == self.model2_layers == union
        else:
            cap1 = _LayerCapture(self.model1, self.model1_layers, self.max_features, store)
            cap2 = _LayerCapture(self.model2, self.model2_layers, self.max_features, store)
            captures = [cap1, cap2]
        acc = HSICAccumulator()
        sized = hasattr(dataloader1, "__len__") and hasattr(dataloader2, "__len__")
        if not same_data and sized and len(dataloader1) != len(dataloader2):
            warnings.warn(
                f"dataloader1 has {len(dataloader1)} batches and dataloader2 {len(dataloader2)}: "
                "only the first min() pairs are compared (as torch-cka does)",
                CKAWarning,
                stacklevel=2,
            )
        batches = ((b, b) for b in dataloader1) if same_data else zip(dataloader1, dataloader2, strict=False)
        for cap in captures:
            cap.attach()
        try:
            with torch.inference_mode():
                for index, (b1, b2) in enumerate(batches):
                    x1, x2 = _batch_input(b1, "dataloader1"), _batch_input(b2, "dataloader2")
                    n = x1.shape[0]
                    if n < MIN_BATCH or x2.shape[0] != n:
                        raise UserError(
                            f"batch {index}: {n} and {x2.shape[0]} examples; CKA needs equal batch sizes of at "
                            f"least {MIN_BATCH} because the unbiased HSIC divides by n(n-3) "
                            "(use a larger batch_size, drop_last=True, or a dataset size that the batch divides)"
                        )
                    x1 = x1.to(self.device)
                    if one_pass:
                        terms, keep = shared.run(x1, "model1")
                        if identical:
                            acc.add(*_masked_hsic(terms, keep, terms, keep, n), n)
                        else:
                            picked = terms.pick(pick1), keep[pick1], terms.pick(pick2), keep[pick2]
                            acc.add(*_masked_hsic(*picked, n), n)
                        continue
                    terms1, keep1 = cap1.run(x1, "model1")
                    terms2, keep2 = cap2.run(x1 if same_data else x2.to(self.device), "model2")
                    acc.add(*_masked_hsic(terms1, keep1, terms2, keep2, n), n)
        finally:
            for cap in captures:
                cap.detach()
        cka, bad1, bad2 = acc.result()
        invalid = {
            "model1": [self.model1_layers[i] for i in bad1],
            "model2": [self.model2_layers[j] for j in bad2],
        }
        if bad1 or bad2:
            warnings.warn(
                f"CKA undefined for layers without variance across the inputs (HSIC(K,K) = 0): {invalid}; "
                "their rows/columns are set to 0 and listed in export()['invalid_layers']",
                CKAWarning,
                stacklevel=2,
            )
        self.hsic_matrix = cka.cpu()
        if one_pass:
            reduced = {
                side: {k: v for k, v in shared.reduced.items() if k in layers}
                for side, layers in (("model1", self.model1_layers), ("model2", self.model2_layers))
            }
        else:
            reduced = {"model1": cap1.reduced, "model2": cap2.reduced}
        self._results = {
            "dataset1_name": _dataset_name(dataloader1),
            "dataset2_name": _dataset_name(dataloader1 if dataloader2 is None else dataloader2),
            "invalid_layers": invalid,
            "num_batches": acc.batches,
            "num_examples": acc.examples,
            "max_features": self.max_features,
            "reduced_layers": reduced,
            "forward_passes_per_batch": 1 if one_pass else 2,
        }

    def export(self) -> dict[str, Any]:
        """torch-cka's export keys ("model1_name", "model2_name", "CKA" [L1, L2] float64 tensor,
        "model1_layers", "model2_layers", "dataset1_name", "dataset2_name") plus "invalid_layers" (layers
        whose CKA is undefined, set to 0), "num_batches", "num_examples", "max_features", "reduced_layers"
        (layer -> [original shape, pooled shape]) and "estimator"."""
        if self._results is None or self.hsic_matrix is None:
            raise UserError("CKA.export(): call compare(dataloader) first")
        return {
            "model1_name": self.model1_name,
            "model2_name": self.model2_name,
            "CKA": self.hsic_matrix.clone(),
            "model1_layers": list(self.model1_layers),
            "model2_layers": list(self.model2_layers),
            **self._results,
            "estimator": ESTIMATOR,
        }

    def plot_results(self, save_path: str | Path | None = None, title: str | None = None) -> Any:
        """Plotly heatmap of the CKA matrix (model 1 layers up the y axis, model 2 along x); returns the figure.

        `save_path` ending in .html is written as interactive HTML; another suffix (.png, .svg, .pdf) is
        written as an image when kaleido is installed, else as HTML beside it with a warning."""
        fig = layer_cka_figure(self.export(), title)
        if save_path is not None:
            path = Path(save_path)
            if path.suffix.lower() in ("", ".html", ".htm"):
                fig.write_html(path if path.suffix else path.with_suffix(".html"), include_plotlyjs=True)
            elif importlib.util.find_spec("kaleido") is not None:
                fig.write_image(path)
            else:
                html = path.with_suffix(".html")
                warnings.warn(
                    f"kaleido is not installed: wrote {html} instead of {path}", CKAWarning, stacklevel=2
                )
                fig.write_html(html, include_plotlyjs=True)
        return fig


def cka_matrix(reps: Sequence[ArrayLike], debiased: bool = False) -> np.ndarray:
    """Linear CKA between every two representations of the same n examples, [N, N].

    One centered (or U-centered) float64 Gram matrix per representation, then every pairwise Frobenius
    product from a single matrix product: O(N n^2 d + N^2 n^2) instead of N^2 separate CKA calls.
    """
    grams = []
    for i, rep in enumerate(reps):
        x = _matrix(rep, f"representation {i}")
        if grams and x.shape[0] != int(grams[0].numel() ** 0.5):
            raise UserError(
                f"representation {i} has {x.shape[0]} rows, the first has {int(grams[0].numel() ** 0.5)}"
            )
        x = x - x.mean(0)
        gram = x @ x.T
        grams.append((u_center(gram) if debiased else gram).reshape(-1))
    if not grams:
        raise UserError("cka_matrix needs at least one representation")
    _check_pair(x, x, MIN_BATCH if debiased else 2)
    flat = torch.stack(grams)
    dots = flat @ flat.T
    norms = dots.diagonal().clamp_min(0).sqrt()
    return (dots / torch.outer(norms, norms)).numpy()


def layer_cka_figure(res: dict[str, Any], title: str | None = None) -> Any:
    """Plotly heatmap of an export(): model 1's layers up the y axis, model 2's along x, names escaped."""
    import html

    import plotly.graph_objects as go

    cka = res["CKA"]
    values = cka.numpy() if isinstance(cka, torch.Tensor) else np.asarray(cka, dtype=float)
    name1, name2 = html.escape(str(res["model1_name"])), html.escape(str(res["model2_name"]))
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=[html.escape(str(n)) for n in res["model2_layers"]],
            y=[html.escape(str(n)) for n in res["model1_layers"]],
            colorscale="Magma",
            zmin=min(0.0, float(values.min())),
            zmax=1.0,
            colorbar={"title": "CKA"},
            hovertemplate="%{y} vs %{x}: %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=html.escape(title) if title is not None else f"{name1} vs {name2}",
        xaxis_title=f"Layers {name2}",
        yaxis_title=f"Layers {name1}",
    )
    return fig
