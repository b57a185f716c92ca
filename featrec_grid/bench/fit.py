"""Benchmark: closed-form ridge from sufficient statistics vs the seed's SGD recipe, same arrays, one process.

Cases: one synthetic CIFAR-100-sized pair (50,000 x 1,000 logits -> 512 features, 10,000 test rows: a
ResNet18-like self pair, logits = W f + b), one real pair from the demo shards, and the whole demo grid.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..linmap import fit_ridge, fit_sgd
from ..metrics import mse


def _synthetic(rows: int, test_rows: int, classes: int = 1000, dim: int = 512, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = np.maximum(rng.standard_normal((rows + test_rows, dim), dtype=np.float32), 0)
    w = rng.standard_normal((classes, dim), dtype=np.float32) / np.sqrt(dim)
    z = f @ w.T + rng.standard_normal(classes, dtype=np.float32)
    return z[:rows], f[:rows], z[rows:], f[rows:]


def _pair_case(name: str, z, f, zt, ft, epochs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    closed = fit_ridge(z, f, alpha=0.0)
    closed_mse = mse(ft, closed.predict(zt.astype(np.float64)))
    t1 = time.perf_counter()
    sgd = fit_sgd(z, f, epochs=epochs)
    sgd_mse = mse(ft, sgd.predict(zt.astype(np.float64)))
    t2 = time.perf_counter()
    return {
        "case": name,
        "train_rows": len(z),
        "test_rows": len(zt),
        "logits_dim": z.shape[1],
        "features_dim": f.shape[1],
        "closed_seconds": t1 - t0,
        "sgd_seconds": t2 - t1,
        "sgd_epochs": epochs,
        "speedup": (t2 - t1) / (t1 - t0),
        "closed_test_mse": closed_mse,
        "sgd_test_mse": sgd_mse,
    }


def _grid_case(store_uri: str, epochs: int) -> dict[str, Any] | str:
    """The demo grid through the store, in-process: every ordered pair fitted both ways and evaluated."""
    from dataclasses import replace

    from ..pairs import fit_pair, source_stats
    from ..spec import load_spec
    from ..store import Store

    spec = load_spec(_demo_spec())
    store = Store(store_uri)
    missing = [m for m in spec.models if not store.exists(f"{store.split_dir(m, spec.test)}/manifest.json")]
    if missing:
        return f"demo shards not found in {store.uri} for {', '.join(missing)}: run `featrec-grid run grid_specs/demo.yaml` first"
    fit = replace(spec.fit, sgd={**spec.fit.sgd, "epochs": epochs})
    t0 = time.perf_counter()
    stats = {s: source_stats(store, s, spec.train, fit) for s in spec.models}
    closed = [fit_pair(store, s, t, spec.train, spec.test, fit, "ridge", stats[s]) for s, t in spec.pairs]
    t1 = time.perf_counter()
    sgd = [fit_pair(store, s, t, spec.train, spec.test, fit, "sgd") for s, t in spec.pairs]
    t2 = time.perf_counter()
    diverged = sum(not np.isfinite(g["mse"]) for g in sgd)
    better = sum(c["mse"] <= g["mse"] for c, g in zip(closed, sgd, strict=True) if np.isfinite(g["mse"]))
    lite = next(((s, t) for s, t in spec.pairs if s == t and spec.models[s].source == "lite"), spec.pairs[0])
    pair = next(i for i, p in enumerate(spec.pairs) if p == lite)
    return {
        "models": len(spec.models),
        "pairs": len(spec.pairs),
        "closed_seconds": t1 - t0,
        "sgd_seconds": t2 - t1,
        "sgd_epochs": epochs,
        "speedup": (t2 - t1) / (t1 - t0),
        "pairs_where_closed_mse_le_sgd": better,
        "pairs_where_sgd_diverged": diverged,
        "closed_mean_agreement": float(np.mean([c["agreement"] for c in closed])),
        "sgd_mean_agreement": float(np.mean([g["agreement"] for g in sgd])),
        "closed_worst_r2": float(min(c["r2"] for c in closed)),
        "example_pair": f"{lite[0]} -> {lite[1]}",
        "example_closed": {k: closed[pair][k] for k in ("mse", "agreement", "seconds")},
        "example_sgd": {k: sgd[pair][k] for k in ("mse", "agreement", "seconds")},
    }


def _demo_spec() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2] / "grid_specs" / "demo.yaml")


def run_fit_bench(store: str = "store", rows: int = 50_000, epochs: int = 100) -> dict[str, Any]:
    """Both benchmarks; the grid case needs the demo's shards in `store` and says so when they are missing."""
    import torch

    z, f, zt, ft = _synthetic(rows, 10_000)
    return {
        "torch_threads": torch.get_num_threads(),
        "synthetic": _pair_case("synthetic CIFAR-100-sized self pair", z, f, zt, ft, epochs),
        "grid": _grid_case(store, epochs),
        "targets": {"pair_speedup": 30, "grid_speedup": 100},
    }


def format_fit_bench(r: dict[str, Any]) -> str:
    s = r["synthetic"]
    lines = [
        f"fit benchmark (torch threads: {r['torch_threads']})",
        f"synthetic pair {s['train_rows']} x {s['logits_dim']} -> {s['features_dim']} ({s['test_rows']} test rows):",
        f"  closed form {s['closed_seconds']:.2f} s, test MSE {s['closed_test_mse']:.3g}",
        f"  SGD ({s['sgd_epochs']} epochs) {s['sgd_seconds']:.2f} s, test MSE {s['sgd_test_mse']:.3g}",
        f"  speedup {s['speedup']:.1f}x (target >= {r['targets']['pair_speedup']}x)",
    ]
    g = r["grid"]
    if isinstance(g, str):
        lines.append(f"grid: not measured: {g}")
    else:
        lines += [
            f"demo grid, {g['models']} models, {g['pairs']} pairs (fit + test evaluation, through the store):",
            f"  closed form {g['closed_seconds']:.2f} s, SGD ({g['sgd_epochs']} epochs) {g['sgd_seconds']:.2f} s",
            f"  speedup {g['speedup']:.1f}x (target >= {r['targets']['grid_speedup']}x)",
            f"  closed-form test MSE <= SGD's on {g['pairs_where_closed_mse_le_sgd']} of the "
            f"{g['pairs'] - g['pairs_where_sgd_diverged']} pairs where SGD stayed finite; SGD diverged (NaN) on "
            f"{g['pairs_where_sgd_diverged']}",
            f"  mean agreement: closed {g['closed_mean_agreement']:.4f}, SGD {g['sgd_mean_agreement']:.4f}",
            f"  {g['example_pair']}: closed {g['example_closed']}, SGD {g['example_sgd']}",
        ]
    return "\n".join(lines)
