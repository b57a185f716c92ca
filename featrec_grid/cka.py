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
import importlib.util
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featrec_grid.errors import UserError

ArrayLike = np.ndarray | torch.Tensor

MIN_BATCH = 4
"""The unbiased estimator divides by n(n-3): a batch needs at least 4 examples."""

CONSTANT_RTOL = 1e-10
"""A batch's features count as constant when sum|x - mean|^2 <= CONSTANT_RTOL * sum|x|^2 (relative spread below
1e-5, which float32 cannot resolve); their Gram is then exactly zero instead of rounding noise."""

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


def _symmetric_product(x: torch.Tensor) -> torch.Tensor:
    """x @ x.T; on CPU, for wide batches of >= 128 rows, from the three distinct half-blocks (3/4 of the work)."""
    n, d = x.shape
    if x.device.type != "cpu" or n < 128 or d < 2 * n:
        return x @ x.T
    h = n // 2
    top, bottom = x[:h], x[h:]
    gram = torch.empty(n, n, dtype=x.dtype)
    gram[:h, :h] = top @ top.T
    gram[h:, h:] = bottom @ bottom.T
    off = top @ bottom.T
    gram[:h, h:] = off
    gram[h:, :h] = off.T
    return gram


def _center(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of features [n, ...] -> (features [n, d] minus their batch mean, n |mean|^2); float64 stays
    float64, any other dtype becomes float32."""
    x = x.reshape(x.shape[0], -1)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    mean = x.mean(0)
    return x - mean, mean.dot(mean) * x.shape[0]


def _zero_constant(grams: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the centered Grams [L, n, n] whose features are constant within float32 resolution:
    trace <= CONSTANT_RTOL * (trace + n |mean|^2), i.e. sum |x - mean|^2 <= CONSTANT_RTOL * sum |x|^2."""
    spread = grams.diagonal(dim1=-2, dim2=-1).sum(-1)
    constant = spread <= CONSTANT_RTOL * (spread + offsets.to(spread.dtype))
    return grams.masked_fill_(constant[:, None, None], 0.0)


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """Linear Gram [n, n] of one batch of features [n, ...] centered per batch (float64 input stays float64, any
    other dtype becomes float32). Centering leaves the unbiased HSIC unchanged and makes the float32 product
    accurate; features that are constant within float32 resolution (see CONSTANT_RTOL) give an exact zero Gram."""
    xc, offset = _center(x)
    return _zero_constant(_symmetric_product(xc)[None], offset[None])[0]


def unbiased_hsic_matrix(
    grams1: torch.Tensor, grams2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unbiased HSIC for all layer pairs of one batch: Grams [L1, n, n] and [L2, n, n] ->
    (HSIC(K_i, L_j) [L1, L2], HSIC(K_i, K_i) [L1], HSIC(L_j, L_j) [L2]) in float64, from one matrix product."""
    n = grams1.shape[-1]
    if n < MIN_BATCH or grams2.shape[-1] != n:
        raise UserError(
            f"unbiased HSIC needs equal batch sizes >= {MIN_BATCH}, got {n} and {grams2.shape[-1]}"
        )
    u1 = u_center(grams1).reshape(grams1.shape[0], -1)
    u2 = u_center(grams2).reshape(grams2.shape[0], -1)
    scale = 1.0 / (n * (n - 3))
    self1 = torch.linalg.vector_norm(u1, dim=1).square()
    self2 = torch.linalg.vector_norm(u2, dim=1).square()
    return (u1 @ u2.T) * scale, self1 * scale, self2 * scale


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

    def update(self, grams1: torch.Tensor, grams2: torch.Tensor) -> None:
        """Add one batch: Grams [L1, n, n] of side 1 and [L2, n, n] of side 2 over the same n examples."""
        xy, xx, yy = unbiased_hsic_matrix(grams1, grams2)
        if self.hsic_xy is None:
            self.hsic_xy, self.hsic_xx, self.hsic_yy = xy, xx, yy
        else:
            self.hsic_xy += xy
            self.hsic_xx += xx
            self.hsic_yy += yy
        self.batches += 1
        self.examples += grams1.shape[-1]

    def update_features(self, feats1: Sequence[ArrayLike], feats2: Sequence[ArrayLike]) -> None:
        """Add one batch given per-layer features ([n, ...] arrays, numpy or torch) of each side."""
        grams = [
            torch.stack([centered_gram(torch.as_tensor(f)).double() for f in feats])
            for feats in (feats1, feats2)
        ]
        self.update(*grams)

    def result(self) -> tuple[torch.Tensor, list[int], list[int]]:
        """(CKA [L1, L2] float64, invalid layer indices of side 1, of side 2); see cka_from_hsic."""
        if self.hsic_xy is None:
            raise UserError("CKA: no batches were accumulated (empty data loader?)")
        return cka_from_hsic(self.hsic_xy, self.hsic_xx, self.hsic_yy)


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


def resolve_layers(model: nn.Module, requested: Sequence[str] | str | None, which: str) -> list[str]:
    """Requested layer names (qualified, as named_modules gives them) in named_modules order, as torch-cka
    exports them; an unknown name is a UserError listing the closest names."""
    if requested is None:
        layers = default_layers(model)
        if not layers:
            raise UserError(f"{which}: no leaf module with parameters; pass {which}_layers explicitly")
        return layers
    wanted = [requested] if isinstance(requested, str) else list(requested)
    names = [name for name, _ in model.named_modules()]
    known = set(names)
    for name in wanted:
        if name not in known:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
            hint = (
                f"closest: {', '.join(repr(c) for c in close)}" if close else f"e.g. {', '.join(names[1:6])}"
            )
            raise UserError(f"{which}_layers: no module named {name!r} in {type(model).__name__}; {hint}")
    if not wanted:
        raise UserError(f"{which}_layers is empty: name at least one module, or pass None for the defaults")
    chosen = set(wanted)
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


class _LayerCapture:
    """Forward hooks on one side's layers: each hooked output becomes a centered float32 Gram at hook time, so
    later in-place ops (ReLU(inplace=True), `out += identity`) cannot change it and activations are not kept.

    A module run several times in one forward pass contributes its last call (as torch-cka does)."""

    def __init__(self, model: nn.Module, layers: list[str], max_features: int | None) -> None:
        self.model, self.layers, self.max_features = model, layers, max_features
        self.active = False
        self.grams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls: dict[str, int] = {}
        self.repeated: set[str] | None = None
        self.reduced: dict[str, list[list[int]]] = {}
        self._handles: list[Any] = []

    def attach(self) -> None:
        modules = dict(self.model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.active:
                self.calls[name] = self.calls.get(name, 0) + 1
                xc, offset = _center(
                    self._features(name, output)
                )  # a copy: later in-place ops cannot reach it
                if self.repeated is not None and name in self.repeated:
                    self.pending[name] = (xc, offset)  # only the last call counts: its Gram after the forward
                else:
                    self.grams[name] = (_symmetric_product(xc), offset)

        return hook

    def _features(self, name: str, output: Any) -> torch.Tensor:
        if isinstance(output, (tuple, list)):
            output = next((o for o in output if isinstance(o, torch.Tensor)), None)
        if not isinstance(output, torch.Tensor) or output.ndim == 0:
            raise UserError(
                f"layer {name!r}: its output is {type(output).__name__}, CKA needs a tensor [n, ...]"
            )
        if self.max_features is not None and output[0].numel() > self.max_features:
            pooled = _pool_to_cap(output, self.max_features)
            if pooled is not output:
                self.reduced.setdefault(name, [list(output.shape[1:]), list(pooled.shape[1:])])
            return pooled
        return output

    def start(self) -> None:
        self.grams, self.pending, self.calls = {}, {}, {}
        self.active = True

    def finish(self, n: int, which: str) -> torch.Tensor:
        """Stack this batch's Grams [L, n, n] in layer order; learn which modules run more than once."""
        self.active = False
        for name, (xc, offset) in self.pending.items():
            self.grams[name] = (_symmetric_product(xc), offset)
        missing = [name for name in self.layers if name not in self.grams]
        if missing:
            raise UserError(
                f"{which}: layers {missing} produced no output in the forward pass (unused modules?)"
            )
        wrong = [f"{k} {tuple(g.shape)}" for k, (g, _) in self.grams.items() if g.shape[0] != n]
        if wrong:
            raise UserError(
                f"{which}: outputs of {wrong} do not have the batch ({n}) as their first dimension"
            )
        if self.repeated is None:
            self.repeated = {k for k, c in self.calls.items() if c > 1}
            if self.repeated:
                warnings.warn(
                    f"{which}: modules {sorted(self.repeated)} run several times per forward pass; "
                    "CKA uses each one's last call (as torch-cka does)",
                    CKAWarning,
                    stacklevel=3,
                )
        parts = [self.grams[name][0] for name in self.layers]
        if len({g.dtype for g in parts}) > 1:  # float64 layers beside float32 ones
            parts = [g.double() for g in parts]
        grams = torch.stack(parts)
        return _zero_constant(grams, torch.stack([self.grams[name][1] for name in self.layers]))


def _batch_input(batch: Any, which: str) -> torch.Tensor:
    """The model input of one loader batch: the first element of a tuple/list batch (as torch-cka), or the
    batch itself when it is a tensor."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{which}: a batch must be a tensor or a (tensor, ...) tuple, got {type(x).__name__}")
    return x


def _dataset_name(loader: Any) -> str:
    """torch-cka's dataset label: the first line of the loader's dataset repr."""
    return repr(getattr(loader, "dataset", loader)).split("\n")[0]


class CKA:
    """Layer-by-layer linear CKA between two models; same constructor, compare(), export() and plot_results() as
    torch-cka 0.21 (`from featrec_grid.cka import CKA` replaces `from torch_cka import CKA`).

    Differences, all deliberate: forward passes run under torch.inference_mode; HSIC is accumulated in float64
    (torch-cka's float32 HSIC cancels large terms and drifts); the default layers are leaf modules with
    parameters (torch-cka: every module, including the whole model); each output is read when its module
    returns (torch-cka keeps references that later in-place ops change); unknown layer names, batches under
    4 examples and a layer without variance are reported, never turned into NaN; hooks are removed after
    compare(). `max_features` (optional) average-pools wider spatial/token outputs down to that many features
    per example to bound the cost; export() says which layers were pooled."""

    def __init__(
        self,
        model1: nn.Module,
        model2: nn.Module,
        model1_name: str | None = None,
        model2_name: str | None = None,
        model1_layers: Sequence[str] | None = None,
        model2_layers: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        max_features: int | None = None,
    ) -> None:
        if max_features is not None and max_features < 1:
            raise UserError(f"max_features must be a positive integer or None, got {max_features}")
        self.device = torch.device(device)
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
        cap1 = _LayerCapture(self.model1, self.model1_layers, self.max_features)
        cap2 = _LayerCapture(self.model2, self.model2_layers, self.max_features)
        acc = HSICAccumulator()
        acc_device = torch.device("cpu") if self.device.type == "mps" else self.device  # mps has no float64
        sized = hasattr(dataloader1, "__len__") and hasattr(dataloader2, "__len__")
        if not same_data and sized and len(dataloader1) != len(dataloader2):
            warnings.warn(
                f"dataloader1 has {len(dataloader1)} batches and dataloader2 {len(dataloader2)}: "
                "only the first min() pairs are compared (as torch-cka does)",
                CKAWarning,
                stacklevel=2,
            )
        batches = ((b, b) for b in dataloader1) if same_data else zip(dataloader1, dataloader2, strict=False)
        cap1.attach()
        cap2.attach()
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
                    if self.model1 is self.model2 and same_data:  # one forward serves both sides' hooks
                        cap1.start()
                        cap2.start()
                        self.model1(x1)
                    else:
                        cap1.start()
                        self.model1(x1)
                        cap1.active = False
                        cap2.start()
                        self.model2(x1 if same_data else x2.to(self.device))
                    g1, g2 = cap1.finish(n, "model1"), cap2.finish(n, "model2")
                    acc.update(g1.to(acc_device), g2.to(acc_device))
        finally:
            cap1.detach()
            cap2.detach()
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
        self._results = {
            "dataset1_name": _dataset_name(dataloader1),
            "dataset2_name": _dataset_name(dataloader1 if dataloader2 is None else dataloader2),
            "invalid_layers": invalid,
            "num_batches": acc.batches,
            "num_examples": acc.examples,
            "max_features": self.max_features,
            "reduced_layers": {"model1": cap1.reduced, "model2": cap2.reduced},
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
