"""Cost of the model-level similarity measures at grid scale: N models x n test rows of synthetic features.

`run_similarity_scale` runs featrec_grid.similarity.model_similarity in a fresh Python process (so that its peak
resident memory is its own) on N synthetic representations that share a latent signal, and reports seconds per
model preparation (centring, RBF bandwidth, kNN graph, SVCCA basis), seconds per unordered pair, and memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

DEFAULTS = {"models": 8, "rows": 2000, "dims": 512}
"""The command's defaults, small enough for a loaded 2-core machine; models=32, rows=10000 is the grid scale."""


def synthetic_reps(models: int, rows: int, dims: int, seed: int = 0) -> dict[str, Any]:
    """N float32 representations [rows, dims]: a shared 32-d latent through a random map per model, a model's
    own ReLU features and noise, so that measures fall between 0 and 1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((rows, 32), dtype=np.float32)
    reps = {}
    for m in range(models):
        mix = rng.standard_normal((32, dims), dtype=np.float32) / np.float32(np.sqrt(32))
        own = np.maximum(latent @ mix, 0) + np.float32(0.5) * rng.standard_normal((rows, dims), dtype=np.float32)
        reps[f"model{m:02d}"] = own.astype(np.float32)
    return reps


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(config: dict[str, Any]) -> dict[str, Any]:
    """The measurement itself (run in the fresh process)."""
    import resource

    import torch

    from featrec_grid.similarity import MEASURES, model_similarity

    reps = synthetic_reps(config["models"], config["rows"], config["dims"], config["seed"])
    before = _rss_mb()
    timings: dict[str, float] = {}
    records = model_similarity(
        reps, config.get("measures") or MEASURES, k=config["k"], memory_mb=config["memory_mb"], timings=timings
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_models = config["models"]
    pairs = n_models * (n_models + 1) // 2
    values = {}
    for r in records:
        if r["model_a"] != r["model_b"]:
            values.setdefault(r["measure"], []).append(r["value"])
    return {
        **config,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "unordered_pairs": pairs,
        "seconds": timings,
        "seconds_per_model_preparation": timings["prepare"] / n_models,
        "seconds_per_pair": (timings["kernel_pass"] + timings["pairs"]) / pairs,
        "input_mb": sum(a.nbytes for a in reps.values()) / 2**20,
        "rss_after_inputs_mb": before,
        "peak_rss_mb": peak,
        "full_gram_stack_mb": n_models * config["rows"] ** 2 * 8 / 2**20,
        "value_range": {m: [min(v), max(v)] for m, v in values.items()},
    }


def run_similarity_scale(
    models: int = DEFAULTS["models"],
    rows: int = DEFAULTS["rows"],
    dims: int = DEFAULTS["dims"],
    k: int = 10,
    memory_mb: float = 512,
    measures: list[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """model_similarity on `models` synthetic float32 representations [rows, dims] in a fresh process: seconds
    per model preparation and per unordered pair, peak resident memory (against the N x n x n float64 Gram stack
    that a naive implementation would hold)."""
    from featrec_grid.errors import UserError

    if models < 2 or rows < 4 or dims < 1:
        raise UserError(f"bench scale similarity: need models >= 2, rows >= 4, dims >= 1; got {models}, {rows}, {dims}")
    config = {"models": models, "rows": rows, "dims": dims, "k": k, "memory_mb": memory_mb, "seed": seed}
    config["measures"] = measures
    done = subprocess.run(
        [sys.executable, "-m", "featrec_grid.bench.similarity", json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"similarity scale run failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_similarity_scale(result: dict[str, Any]) -> str:
    """Human-readable summary of run_similarity_scale's result."""
    s = result["seconds"]
    lines = [
        f"model-level similarity: {result['models']} models x {result['rows']} rows x {result['dims']} float32 "
        f"features, k = {result['k']}, memory_mb = {result['memory_mb']}, {result['threads']} threads, "
        f"load average {result['load_average']:.1f} on {result['cpus']} CPUs",
        f"  preparation {s['prepare']:.1f} s = {result['seconds_per_model_preparation']:.2f} s per model",
        f"  all {result['unordered_pairs']} unordered pairs {s['kernel_pass'] + s['pairs']:.1f} s "
        f"(kernel pass {s['kernel_pass']:.1f} s, kNN/SVCCA pairs {s['pairs']:.1f} s) = "
        f"{result['seconds_per_pair']:.3f} s per pair",
        f"  peak RSS {result['peak_rss_mb']:.0f} MB (inputs {result['input_mb']:.0f} MB; RSS after building them "
        f"{result['rss_after_inputs_mb']:.0f} MB); an N x n x n float64 Gram stack would be "
        f"{result['full_gram_stack_mb']:.0f} MB",
    ]
    for m, (lo, hi) in result["value_range"].items():
        lines.append(f"  {m:13s} off-diagonal values {lo:.3f} .. {hi:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
