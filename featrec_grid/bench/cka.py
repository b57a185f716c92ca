"""`featrec-grid bench cka`: featrec_grid.cka.CKA vs pytorch-cka 1.1.3, torch-cka 0.21 and ckatorch 1.0.3 vs a float64
reference, ResNet18 vs ResNet34.

Every tool runs in this process on the same models and the same batches. The reference is an independent float64
evaluation of torch-cka's `_HSIC` formula (uncentered features, zeroed diagonals, its 1'K1 and 1'KL1 terms; tr(KL)
as sum(K * L)) for every layer pair, accumulated over batches as torch-cka does, on activations copied when each
module returns; it shares no code with featrec_grid.cka. A peer that raises is recorded with its error, not hidden.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import io
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from featrec_grid.gram import lower_gram

CASES: dict[str, dict[str, Any]] = {
    "light": {
        "images": 640,
        "batch_size": 64,
        "layers": "conv_linear",
        "what": "all Conv2d and Linear layers",
    },
    "heavy": {"images": 1024, "batch_size": 256, "layers": "leaves", "what": "every leaf module"},
}
TARGETS = {
    "light": [("ours_over_forward", "<=", 1.15), ("pytorch_cka_over_ours", ">", 1.0)],
    "heavy": [("ours_over_forward", "<=", 1.7), ("pytorch_cka_over_ours", ">", 1.0)],
}
PEERS = {"pytorch_cka": "pytorch-cka", "torch_cka": "torch-cka", "ckatorch": "ckatorch"}
"""Result key -> distribution name on the package index (all in the `bench` extra)."""


def _layers(model: nn.Module, kind: str) -> list[str]:
    """Conv2d/Linear modules, or every leaf module, in named_modules order."""
    if kind == "conv_linear":
        return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]


def _models(seed: int) -> tuple[nn.Module, nn.Module]:
    """ResNet18 and ResNet34, random init (seeded), 10 classes, eval mode."""
    from torchvision.models import resnet18, resnet34

    torch.manual_seed(seed)
    m1 = resnet18(num_classes=10).eval()
    torch.manual_seed(seed + 1)
    m2 = resnet34(num_classes=10).eval()
    return m1, m2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_seconds(
    m1: nn.Module, m2: nn.Module, loader: Any, device: torch.device, layers1: Sequence[str] = (),
    layers2: Sequence[str] = (), gram: str = "sgemm",
) -> float:
    """Both models' forward passes over the loader under inference mode (inputs moved to `device`): bare without
    layers; with layers, a floor: plus one float32 Gram per named layer and batch and nothing else. `gram="sgemm"`:
    X X^T of the output kept by reference, after the forward pass (pytorch-cka's work); "syrk": its lower triangle
    (gram.lower_gram) when the module returns, into a reused buffer (the least a Gram-based CKA does here: ours'
    Grams without the shift and the float64 HSIC that keep it exact)."""
    kept: dict[str, torch.Tensor] = {}
    buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def syrk(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        flat = out.reshape(out.shape[0], -1)
        key = (flat.shape[0], flat.dtype)
        if key not in buffers:
            buffers[key] = flat.new_zeros(flat.shape[0], flat.shape[0])
        lower_gram(flat, buffers[key])

    def keep(name: str) -> Callable[..., None]:
        return lambda _m, _i, out: kept.__setitem__(name, out)

    handles = [
        dict(m.named_modules())[name].register_forward_hook(keep(name) if gram == "sgemm" else syrk)
        for m, layers in ((m1, layers1), (m2, layers2))
        for name in layers
    ]
    try:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            for (x,) in loader:
                x = x.to(device)
                for model in (m1, m2):
                    model(x)
                    for out in kept.values():
                        flat = out.reshape(out.shape[0], -1)
                        flat @ flat.T
                    kept.clear()
        _sync(device)
        return time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()


def torch_cka_hsic64(Ks: torch.Tensor, Ls: torch.Tensor) -> torch.Tensor:
    """torch-cka 0.21's `_HSIC(K, L)` in float64 for every pair of Ks [m1, n, n] and Ls [m2, n, n] (symmetric,
    diagonals zeroed): [tr(KL) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3)) with tr(KL) = sum(K * L)
    and 1'KL1 = (K1).(L1)."""
    n = Ks.shape[-1]
    trace = Ks.reshape(len(Ks), -1) @ Ls.reshape(len(Ls), -1).T
    totals = Ks.sum((1, 2))[:, None] * Ls.sum((1, 2))[None, :]
    cross = Ks.sum(2) @ Ls.sum(2).T
    return (trace + totals / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _reference_grams(model: nn.Module, layers: list[str], x: torch.Tensor) -> tuple[dict, set[str]]:
    """One forward: float64 Gram (diagonal zeroed, features not centered, as torch-cka) of each layer's output
    copied when the module returns (last call wins), and the layers whose output tensor a later in-place op
    changed (torch-cka reads those changed values)."""
    grams: dict[str, torch.Tensor] = {}
    live: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def fn(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            feats = out.detach().flatten(1).double()
            k = feats @ feats.T
            k.fill_diagonal_(0.0)
            grams[name] = k
            live[name] = (out, out.detach().clone())

        return fn

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    changed = {n for n, (out, copy_) in live.items() if not torch.equal(out, copy_)}
    return grams, changed


def reference_cka(m1: nn.Module, m2: nn.Module, layers1: list[str], layers2: list[str], loader: Any):
    """torch-cka's estimator in float64: per batch HSIC for every pair (O(L1 L2 n^2)), summed over batches, then
    sum HSIC(K,L) / sqrt(sum HSIC(K,K) sum HSIC(L,L)). Returns (CKA [L1, L2] float64, in-place-changed layers)."""
    device = next(m1.parameters()).device
    kl = torch.zeros(len(layers1), len(layers2), dtype=torch.float64, device=device)
    kk = torch.zeros(len(layers1), dtype=torch.float64, device=device)
    ll = torch.zeros(len(layers2), dtype=torch.float64, device=device)
    changed1: set[str] = set()
    changed2: set[str] = set()
    for (x,) in loader:
        x = x.to(device)
        g1, c1 = _reference_grams(m1, layers1, x)
        g2, c2 = _reference_grams(m2, layers2, x)
        changed1 |= c1
        changed2 |= c2
        for i, a in enumerate(layers1):
            kk[i] += torch_cka_hsic64(g1[a][None], g1[a][None])[0, 0]
        for j, b in enumerate(layers2):
            ll[j] += torch_cka_hsic64(g2[b][None], g2[b][None])[0, 0]
        kl += torch_cka_hsic64(torch.stack([g1[a] for a in layers1]), torch.stack([g2[b] for b in layers2]))
    return (kl / torch.sqrt(kk[:, None] * ll[None, :])).cpu(), (changed1, changed2)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


Run = tuple[float, torch.Tensor | None, str | None]
"""(seconds, CKA matrix [L1, L2] float64 on the CPU or None, failure message or None)."""


@contextlib.contextmanager
def _quiet():
    """Silence a peer's progress bars and warnings while it runs."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _timed(device: torch.device, fn: Callable[[], torch.Tensor]) -> Run:
    """Run fn, timing it; a raised exception is the peer's recorded failure."""
    _sync(device)
    start = time.perf_counter()
    try:
        matrix = fn()
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result to report
        return time.perf_counter() - start, None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    _sync(device)
    return time.perf_counter() - start, matrix.detach().double().cpu(), None


def _run_ours(m1, m2, layers1, layers2, loader, device) -> Run:
    from featrec_grid.cka import CKA

    def run() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the heavy case's ReLUs run twice per block: expected here
            cka = CKA(m1, m2, "resnet18", "resnet34", model1_layers=layers1, model2_layers=layers2, device=device)
            cka.compare(loader)
        return cka.export()["CKA"]

    return _timed(device, run)


def _run_pytorch_cka(m1, m2, layers1, layers2, loader, device) -> Run:
    """pytorch-cka's compute_cka (its hooks are removed by its context manager; it runs on copies anyway)."""
    from cka import compute_cka  # the distribution pytorch-cka installs the module `cka`

    c1, c2 = copy.deepcopy(m1), copy.deepcopy(m2)
    with _quiet():
        return _timed(
            device,
            lambda: compute_cka(
                c1, c2, loader, layers=layers1, model2_layers=layers2, device=device, progress=False
            )[0],
        )


def _run_torch_cka(m1, m2, layers1, layers2, loader, device) -> Run:
    """torch-cka's compare on copies of the models (its hooks are never removed)."""
    from torch_cka import CKA as TorchCKA

    c1, c2 = copy.deepcopy(m1), copy.deepcopy(m2)
    with _quiet():
        cka = TorchCKA(
            c1, c2, "resnet18", "resnet34", model1_layers=layers1, model2_layers=layers2, device=str(device)
        )

        def run() -> torch.Tensor:
            cka.compare(loader)
            return cka.export()["CKA"]

        return _timed(device, run)


def _run_ckatorch(m1, m2, layers1, layers2, loader, device) -> Run:
    """ckatorch's CKA called for one pass (epochs=1; its default is 10), on copies (its hooks stay)."""
    from ckatorch import CKA as CKATorch

    c1, c2 = copy.deepcopy(m1), copy.deepcopy(m2)
    with _quiet():
        cka = CKATorch(c1, c2, layers=layers1, second_layers=layers2, device=device)
        return _timed(device, lambda: cka(loader, epochs=1))


RUNNERS = {"pytorch_cka": _run_pytorch_cka, "torch_cka": _run_torch_cka, "ckatorch": _run_ckatorch}


def _run_case(
    name: str, seed: int, repeats: int, peers: dict[str, str | None], device: torch.device
) -> dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset

    spec = CASES[name]
    m1, m2 = _models(seed)
    m1, m2 = m1.to(device), m2.to(device)
    layers1, layers2 = _layers(m1, spec["layers"]), _layers(m2, spec["layers"])
    images = torch.randn(spec["images"], 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(TensorDataset(images), batch_size=spec["batch_size"], shuffle=False)
    with torch.inference_mode():  # warm-up: allocator and oneDNN / cuDNN kernels
        m1(images[: spec["batch_size"]].to(device))
        m2(images[: spec["batch_size"]].to(device))
    repeated = {"forward": [], "floor": [], "syrk_floor": [], "ours": []}
    repeated |= {p: [] for p in ("pytorch_cka",) if peers.get(p)}
    matrices: dict[str, torch.Tensor] = {}
    failures: dict[str, str] = {}
    for _ in range(repeats):  # interleaved, so that load from other processes hits all alike; best of each
        repeated["forward"].append(_forward_seconds(m1, m2, loader, device))
        repeated["floor"].append(_forward_seconds(m1, m2, loader, device, layers1, layers2))
        repeated["syrk_floor"].append(_forward_seconds(m1, m2, loader, device, layers1, layers2, gram="syrk"))
        for key, runner in (("ours", _run_ours), ("pytorch_cka", _run_pytorch_cka)):
            if key in repeated:
                seconds, matrix, failure = runner(m1, m2, layers1, layers2, loader, device)
                repeated[key].append(seconds)
                if matrix is not None:
                    matrices[key] = matrix
                if failure:
                    failures[key] = failure
    seconds = {key: min(runs) for key, runs in repeated.items()}
    for key in ("torch_cka", "ckatorch"):  # slow or failing: once
        if peers.get(key):
            seconds[key], matrix, failure = RUNNERS[key](m1, m2, layers1, layers2, loader, device)
            if matrix is not None:
                matrices[key] = matrix
            if failure:
                failures[key] = failure
    start = time.perf_counter()
    ref, (changed1, changed2) = reference_cka(m1, m2, layers1, layers2, loader)
    seconds["reference"] = time.perf_counter() - start
    keep1 = torch.tensor([n not in changed1 for n in layers1])
    keep2 = torch.tensor([n not in changed2 for n in layers2])
    errors, unchanged = {}, {}
    for key, matrix in matrices.items():
        diff = (matrix - ref).abs().nan_to_num(float("inf"))
        errors[key] = float(diff.max())
        unchanged[key] = float(diff[keep1][:, keep2].max())
    forward = seconds["forward"]
    ratios = {f"{k}_over_forward": v / forward for k, v in seconds.items() if k not in ("forward", "reference")}
    for key in RUNNERS:
        if key in seconds:
            ratios[f"{key}_over_ours"] = seconds[key] / seconds["ours"]
    # the same ratios within each interleaved round, median over rounds: robust to the machine slowing down or
    # speeding up between rounds, which the best-of ratios above are not
    paired = {
        f"{k}_over_forward": statistics.median(t / f for t, f in zip(runs, repeated["forward"], strict=True))
        for k, runs in repeated.items()
        if k != "forward"
    }
    if "pytorch_cka" in repeated:
        paired["pytorch_cka_over_ours"] = statistics.median(
            p / o for p, o in zip(repeated["pytorch_cka"], repeated["ours"], strict=True)
        )
    out: dict[str, Any] = {
        "images": spec["images"],
        "batch_size": spec["batch_size"],
        "layers": [len(layers1), len(layers2)],
        "what": spec["what"],
        "seconds": seconds,
        "runs": repeated,
        "max_error": errors,
        "max_error_unchanged_layers": unchanged,
        "failures": failures,
        "nan": {key: bool(torch.isnan(m).any()) for key, m in matrices.items()},
        "inplace_changed_layers": [len(changed1), len(changed2)],
        "ratios": ratios,
        "paired_median_ratios": paired,
        "targets": [],
    }
    for metric, op, bound in TARGETS[name]:
        if metric in ratios:
            value = ratios[metric]
            met = value <= bound if op == "<=" else value > bound
            out["targets"].append({"metric": metric, "bound": f"{op} {bound}", "value": value, "met": met})
    return out


def run_cka_bench(
    cases: tuple[str, ...] | list[str] = ("light", "heavy"),
    seed: int = 0,
    repeats: int = 5,
    device: str = "cpu",
    peers: tuple[str, ...] | list[str] = tuple(PEERS),
) -> dict[str, Any]:
    """Run the named cases (see CASES) on `device` ("cpu", "cuda", "cuda:1", ...); returns times, max errors
    against the float64 reference and ratios to the bare forward passes, for ours and each installed peer.

    The bare forward passes, the sgemm and syrk floors (_forward_seconds with layers), ours and pytorch-cka run
    `repeats` times, interleaved, and the best time of each counts (targets are judged on these); the median over rounds of each
    round's own ratios is reported beside them; torch-cka (slow) and ckatorch run once. The load average before
    and after is recorded: other processes on the machine inflate every time, so read the ratios with it."""
    from featrec_grid.errors import UserError

    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise UserError(f"bench cka: unknown case(s) {unknown}; allowed: {sorted(CASES)}")
    wrong = [p for p in peers if p not in PEERS]
    if wrong:
        raise UserError(f"bench cka: unknown peer(s) {wrong}; allowed: {sorted(PEERS)}")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"bench cka: --device {device!r}, but torch sees no CUDA device here; allowed: cpu")
    versions = {key: _version(PEERS[key]) for key in peers}
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(target) if target.type != "cuda" else f"{target} ({torch.cuda.get_device_name(target)})",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
        "peers": versions,
        "reference": "direct float64 evaluation of torch-cka's _HSIC formula per layer pair, on activations "
        "copied when each module returns",
        "cases": {},
    }
    missing = [PEERS[k] for k, v in versions.items() if v is None]
    if missing:
        result["peers_note"] = (
            f"not installed, not run: {', '.join(missing)}. Install the bench extra: pip install 'featrec_grid[bench]'"
        )
    for case in cases:
        result["cases"][case] = _run_case(case, seed, repeats, versions, target)
    result["load_average_after"] = os.getloadavg()[0]
    return result


LABELS = {
    "floor": "sgemm floor: forward + one float32 X X^T per layer",
    "syrk_floor": "syrk floor: forward + one syrk Gram per layer",
    "ours": "featrec_grid CKA",
    "pytorch_cka": "pytorch-cka compute_cka",
    "torch_cka": "torch-cka compare",
    "ckatorch": "ckatorch CKA (1 epoch)",
}


def format_cka_bench(result: dict[str, Any]) -> str:
    """Human-readable summary of run_cka_bench's result."""
    versions = ", ".join(f"{PEERS[k]} {v or 'not installed'}" for k, v in result["peers"].items())
    lines = [
        f"CKA bench: ResNet18 vs ResNet34 (random init, 10 classes), random 32x32 images, torch {result['torch']}, "
        f"device {result['device']}, {result['threads']} threads; {versions}",
        f"reference: {result['reference']}",
        f"load average (1 min) before {result['load_average_before']:.1f}, after {result['load_average_after']:.1f} "
        f"on {result['cpus']} CPUs; best of interleaved runs for forward, floors, ours and pytorch-cka (in brackets: "
        "median over rounds of each round's ratio); the others once",
    ]
    if "peers_note" in result:
        lines.append(result["peers_note"])
    width = max(len(label) for label in LABELS.values())
    for name, case in result["cases"].items():
        s, e, r = case["seconds"], case["max_error"], case["ratios"]
        lines.append(
            f"\n[{name}] {case['images']} images, batch {case['batch_size']}, {case['what']} "
            f"({case['layers'][0]} x {case['layers'][1]})"
        )
        lines.append(f"  {'bare forward passes (both models)':{width}s} {s['forward']:8.2f} s")
        for key, label in LABELS.items():
            if key not in s:
                continue
            line = f"  {label:{width}s} {s[key]:8.2f} s  {r[f'{key}_over_forward']:6.2f}x forward"
            paired = case["paired_median_ratios"].get(f"{key}_over_forward")
            line += f" [{paired:.2f}x]" if paired is not None else " " * 8
            if key in e:
                line += f"  max error {e[key]:.1e} ({case['max_error_unchanged_layers'][key]:.1e} unchanged layers)"
            if key in case["failures"]:
                line += f"  FAILED: {case['failures'][key]}"
            lines.append(line)
        lines.append(f"  {'float64 reference':{width}s} {s['reference']:8.2f} s")
        changed = case["inplace_changed_layers"]
        if any(changed):
            lines.append(
                f"  {changed[0]} + {changed[1]} layers' outputs are changed in place later in the forward pass "
                "(ReLU(inplace=True), out += identity); tools that keep references read the changed values"
            )
        if "pytorch_cka_over_ours" in case["paired_median_ratios"]:
            lines.append(
                f"  pytorch-cka / ours: {r['pytorch_cka_over_ours']:.3f} best of each, "
                f"{case['paired_median_ratios']['pytorch_cka_over_ours']:.3f} median within rounds"
            )
        for t in case["targets"]:
            lines.append(f"  target {t['metric']} {t['bound']}: {t['value']:.2f}, {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)
