"""`featrec-grid bench cka`: featrec_grid.cka.CKA vs torch-cka 0.21 vs a float64 reference, ResNet18 vs ResNet34.

Both tools run in this process on the same models and the same batches. The reference is an independent float64
evaluation of torch-cka's `_HSIC` formula (uncentered features, zeroed diagonals, its 1'K1 and 1'KL1 terms; tr(KL)
as sum(K * L)) for every layer pair, accumulated over batches as torch-cka does, on activations copied when each
module returns; it shares no code with featrec_grid.cka (which U-centers centered-feature Grams).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import io
import os
import time
import warnings
from typing import Any

import torch
from torch import nn

CASES: dict[str, dict[str, Any]] = {
    "light": {
        "images": 640,
        "batch_size": 64,
        "layers": "conv_linear",
        "what": "all Conv2d and Linear layers",
    },
    "heavy": {"images": 1024, "batch_size": 256, "layers": "leaves", "what": "every leaf module"},
}
TARGETS = {"light": ("ours_over_forward", "<=", 1.3), "heavy": ("torch_cka_over_ours", ">=", 15.0)}


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


def _forward_seconds(m1: nn.Module, m2: nn.Module, loader: Any) -> float:
    """Both models' bare forward passes over the loader under inference mode."""
    start = time.perf_counter()
    with torch.inference_mode():
        for (x,) in loader:
            m1(x)
            m2(x)
    return time.perf_counter() - start


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
    kl = torch.zeros(len(layers1), len(layers2), dtype=torch.float64)
    kk = torch.zeros(len(layers1), dtype=torch.float64)
    ll = torch.zeros(len(layers2), dtype=torch.float64)
    changed1: set[str] = set()
    changed2: set[str] = set()
    for (x,) in loader:
        g1, c1 = _reference_grams(m1, layers1, x)
        g2, c2 = _reference_grams(m2, layers2, x)
        changed1 |= c1
        changed2 |= c2
        for i, a in enumerate(layers1):
            kk[i] += torch_cka_hsic64(g1[a][None], g1[a][None])[0, 0]
        for j, b in enumerate(layers2):
            ll[j] += torch_cka_hsic64(g2[b][None], g2[b][None])[0, 0]
        kl += torch_cka_hsic64(torch.stack([g1[a] for a in layers1]), torch.stack([g2[b] for b in layers2]))
    return kl / torch.sqrt(kk[:, None] * ll[None, :]), (changed1, changed2)


def _torch_cka_version() -> str | None:
    try:
        import torch_cka  # noqa: F401
    except ImportError:
        return None
    return importlib.metadata.version("torch-cka")


def _run_torch_cka(m1, m2, layers1, layers2, loader) -> tuple[float, torch.Tensor | None, str | None]:
    """Time torch-cka's compare on copies of the models (its hooks are never removed); quiet its progress bar."""
    from torch_cka import CKA as TorchCKA

    c1, c2 = copy.deepcopy(m1), copy.deepcopy(m2)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        cka = TorchCKA(c1, c2, "resnet18", "resnet34", model1_layers=layers1, model2_layers=layers2)
        start = time.perf_counter()
        try:
            cka.compare(loader)
        except AssertionError as exc:  # its NaN check
            return time.perf_counter() - start, None, f"torch-cka failed: {exc}"
        seconds = time.perf_counter() - start
    return seconds, cka.export()["CKA"].double(), None


def _run_case(name: str, seed: int, repeats: int, torch_cka: str | None) -> dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset

    from featrec_grid.cka import CKA

    spec = CASES[name]
    m1, m2 = _models(seed)
    layers1, layers2 = _layers(m1, spec["layers"]), _layers(m2, spec["layers"])
    images = torch.randn(spec["images"], 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(TensorDataset(images), batch_size=spec["batch_size"], shuffle=False)
    with torch.inference_mode():  # warm-up: allocator and oneDNN kernels
        m1(images[: spec["batch_size"]])
        m2(images[: spec["batch_size"]])
    forward_runs, ours_runs = [], []
    for _ in range(repeats):  # interleaved, so that load from other processes hits both alike; best of each
        forward_runs.append(_forward_seconds(m1, m2, loader))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the heavy case's ReLUs run twice per block: expected here
            cka = CKA(m1, m2, "resnet18", "resnet34", model1_layers=layers1, model2_layers=layers2)
            cka.compare(loader)
        ours_runs.append(time.perf_counter() - start)
    ours_matrix = cka.export()["CKA"]
    forward, ours = min(forward_runs), min(ours_runs)
    start = time.perf_counter()
    ref, (changed1, changed2) = reference_cka(m1, m2, layers1, layers2, loader)
    out: dict[str, Any] = {
        "images": spec["images"],
        "batch_size": spec["batch_size"],
        "layers": [len(layers1), len(layers2)],
        "what": spec["what"],
        "seconds": {"forward": forward, "ours": ours, "reference": time.perf_counter() - start},
        "runs": {"forward": forward_runs, "ours": ours_runs},
        "max_error": {"ours": float((ours_matrix - ref).abs().max())},
        "inplace_changed_layers": [len(changed1), len(changed2)],
        "ratios": {"ours_over_forward": ours / forward},
    }
    if torch_cka is not None:
        seconds, theirs, failure = _run_torch_cka(m1, m2, layers1, layers2, loader)
        out["seconds"]["torch_cka"] = seconds
        out["ratios"]["torch_cka_over_ours"] = seconds / ours
        out["ratios"]["torch_cka_over_forward"] = seconds / forward
        if failure:
            out["torch_cka_failure"] = failure
        else:
            keep1 = torch.tensor([n not in changed1 for n in layers1])
            keep2 = torch.tensor([n not in changed2 for n in layers2])
            diff = (theirs - ref).abs()
            out["max_error"]["torch_cka"] = float(diff.nan_to_num(float("inf")).max())
            out["max_error"]["torch_cka_unchanged_layers"] = float(
                diff[keep1][:, keep2].nan_to_num(float("inf")).max()
            )
    metric, op, bound = TARGETS[name]
    if metric in out["ratios"]:
        value = out["ratios"][metric]
        out["target"] = {
            "metric": metric,
            "bound": f"{op} {bound}",
            "met": value <= bound if op == "<=" else value >= bound,
        }
    return out


def run_cka_bench(
    cases: tuple[str, ...] | list[str] = ("light", "heavy"), seed: int = 0, repeats: int = 3
) -> dict[str, Any]:
    """Run the named cases (see CASES); returns times, max errors against the float64 reference and ratios.

    The bare forward passes and ours run `repeats` times, interleaved, and the best time of each counts;
    torch-cka (slow) runs once. The load average before and after is recorded: other processes on the
    machine inflate every time, so read the ratios with it."""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        from featrec_grid.errors import UserError

        raise UserError(f"bench cka: unknown case(s) {unknown}; allowed: {sorted(CASES)}")
    version = _torch_cka_version()
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
        "torch_cka": version,
        "reference": "direct float64 evaluation of torch-cka's _HSIC formula per layer pair, on activations "
        "copied when each module returns",
        "cases": {},
    }
    if version is None:
        result["torch_cka_note"] = (
            "torch-cka is not installed: only ours and the float64 reference ran. "
            "Install the bench extra: pip install 'featrec_grid[bench]' (torch-cka==0.21 and matplotlib)"
        )
    for case in cases:
        result["cases"][case] = _run_case(case, seed, repeats, version)
    result["load_average_after"] = os.getloadavg()[0]
    return result


def format_cka_bench(result: dict[str, Any]) -> str:
    """Human-readable summary of run_cka_bench's result."""
    lines = [
        f"CKA bench: ResNet18 vs ResNet34 (random init, 10 classes), random 32x32 images, torch {result['torch']}, "
        f"{result['threads']} threads, torch-cka {result['torch_cka'] or 'not installed'}",
        f"reference: {result['reference']}",
        f"load average (1 min) before {result['load_average_before']:.1f}, after {result['load_average_after']:.1f} "
        f"on {result['cpus']} CPUs; best of interleaved runs for forward and ours, torch-cka once",
    ]
    if "torch_cka_note" in result:
        lines.append(result["torch_cka_note"])
    for name, case in result["cases"].items():
        s, e, r = case["seconds"], case["max_error"], case["ratios"]
        lines.append(
            f"\n[{name}] {case['images']} images, batch {case['batch_size']}, {case['what']} "
            f"({case['layers'][0]} x {case['layers'][1]})"
        )
        lines.append(f"  bare forward passes (both models) {s['forward']:8.2f} s")
        lines.append(
            f"  featrec_grid CKA                  {s['ours']:8.2f} s   = {r['ours_over_forward']:.2f}x forward"
        )
        if "torch_cka" in s:
            lines.append(
                f"  torch-cka compare                 {s['torch_cka']:8.2f} s   = {r['torch_cka_over_forward']:.2f}x "
                f"forward, {r['torch_cka_over_ours']:.1f}x ours"
            )
        lines.append(f"  float64 reference                 {s['reference']:8.2f} s")
        lines.append(f"  max |CKA - reference|: ours {e['ours']:.2e}")
        if "torch_cka" in e:
            lines.append(
                f"                         torch-cka {e['torch_cka']:.2e} (all layers), "
                f"{e['torch_cka_unchanged_layers']:.2e} (layers whose output no later in-place op changes)"
            )
        if case.get("torch_cka_failure"):
            lines.append(f"  {case['torch_cka_failure']}")
        changed = case["inplace_changed_layers"]
        if any(changed):
            lines.append(
                f"  {changed[0]} + {changed[1]} layers' outputs are changed in place later in the forward pass "
                "(ReLU(inplace=True), out += identity); torch-cka reads the changed values"
            )
        if "target" in case:
            t = case["target"]
            value = case["ratios"][t["metric"]]
            lines.append(
                f"  target {t['metric']} {t['bound']}: {value:.2f}, {'met' if t['met'] else 'NOT met'}"
            )
    return "\n".join(lines)
