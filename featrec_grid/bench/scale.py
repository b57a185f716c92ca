"""Benchmark: how the fit stage scales, on synthetic shards written through the real Store.

(a) One pair at full size: 1,000,000 rows, source logits [rows, 1000] -> target features [rows, 2048],
    written batch by batch, then fitted through the real path (pairs.source_stats + fit_pair "ridge",
    streaming the shards) in a fresh process whose peak resident memory is the figure: bound 2 GB.
(b) An N x N grid of synthetic models: the same task bodies called in-process one after another and as
    Ray tasks (plan.ridge_tasks run by the runtime), and how time grows with N: writing ~N, source statistics ~N, fits ~N^2.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..refs import DataRef
from ..store import Store
from .similarity import format_similarity_scale, run_similarity_scale

LATENT = 64  # the rows' hidden cause: every synthetic model sees the same latent through its own weights
SMALL = 16  # width of the columns (a) does not fit: source features, target logits
BATCH = 8192
TRAIN, TEST = DataRef("synthetic", "train"), DataRef("synthetic", "test")
RSS_BOUND = 2 << 30
_STATUS_FIELDS = ("VmHWM", "VmRSS", "RssFile")


# ------------------------------------------------------------------------------------- synthetic data
def _latent(seed: int, start: int, n: int) -> np.ndarray:
    """The latent rows of the batch starting at row id `start`: the same for every model."""
    return np.random.default_rng([seed, 1, start]).standard_normal((n, LATENT), dtype=np.float32)


def _weights(seed: int, model: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([seed, 2, model]).standard_normal(shape, dtype=np.float32) / np.sqrt(
        shape[0]
    )


def _classifier_batches(
    rows: int, offset: int, seed: int, model: int, classes: int, dim: int
) -> tuple[Iterator[tuple], tuple[np.ndarray, np.ndarray]]:
    """A synthetic classifier: features relu(u P) [n, dim], logits = its head on them [n, classes]."""
    proj = _weights(seed, model, (LATENT, dim))
    weight = _weights(seed, 1000 + model, (dim, classes)).T.copy()  # head [classes, dim]
    bias = _weights(seed, 2000 + model, (1, classes))[0]

    def batches():
        for start in range(0, rows, BATCH):
            n = min(BATCH, rows - start)
            features = np.maximum(_latent(seed, offset + start, n) @ proj, 0)
            logits = features @ weight.T + bias
            index = np.arange(offset + start, offset + start + n, dtype=np.int64)
            yield index, logits.argmax(1).astype(np.int64), logits, features

    return batches(), (weight, bias)


def _source_batches(rows: int, offset: int, seed: int, classes: int) -> tuple[Iterator[tuple], tuple]:
    """(a)'s source: wide logits u Q + noise (full rank, as real logits are); its features are a stub."""
    proj = _weights(seed, 0, (LATENT, classes))
    head = (_weights(seed, 3000, (SMALL, classes)).T.copy(), np.zeros(classes, np.float32))

    def batches():
        for start in range(0, rows, BATCH):
            n = min(BATCH, rows - start)
            u = _latent(seed, offset + start, n)
            noise = np.random.default_rng([seed, 3, offset + start]).standard_normal(
                (n, classes), dtype=np.float32
            )
            logits = u @ proj + 0.1 * noise
            index = np.arange(offset + start, offset + start + n, dtype=np.int64)
            yield index, index % SMALL, logits, np.ascontiguousarray(u[:, :SMALL])

    return batches(), head


def _write(store: Store, key: str, data: DataRef, made: tuple[Iterator[tuple], tuple]) -> dict[str, Any]:
    batches, head = made
    meta = {"key": f"synthetic-{key}", "model": key, "dataset": data.dataset, "split": data.split}
    manifest = store.write_split(store.split_dir(key, data), meta=meta, batches=batches, head=head)
    return {
        "rows": manifest["rows"],
        "bytes": sum(f["bytes"] for f in manifest["files"]),
        "shards": len(manifest["files"]),
    }


# ------------------------------------------------------------------------------------ memory watching
def _status() -> dict[str, int]:
    """Memory fields of /proc/self/status in bytes (empty where /proc does not exist)."""
    try:
        with open("/proc/self/status") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in _STATUS_FIELDS:
            out[name] = int(value.split()[0]) * 1024
    return out


class _Peaks:
    """Where a process's memory peaks: VmHWM (the kernel's exact peak resident set, what the bound is about),
    numpy's and pyarrow's own allocation peaks (exact), and file-backed resident pages (memory-mapped shard
    pages, sampled every 10 ms, so a lower bound).
    """

    def __init__(self) -> None:
        self.baseline = _status().get("VmRSS", 0)
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for k, v in _status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)

    def __enter__(self) -> _Peaks:
        tracemalloc.start()  # numpy reports its data buffers to tracemalloc
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.numpy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        final = _status()
        self.peak.update({k: max(self.peak.get(k, 0), v) for k, v in final.items()})

    def report(self) -> dict[str, int]:
        import pyarrow as pa

        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        return {
            "peak_rss_bytes": self.peak.get("VmHWM", maxrss),
            # Linux carries a parent's resident set into a child's ru_maxrss across exec: VmHWM is exact.
            "ru_maxrss_bytes": maxrss,
            "peak_numpy_bytes": self.numpy_peak,
            "peak_pyarrow_bytes": pa.default_memory_pool().max_memory(),
            "peak_file_backed_bytes": self.peak.get("RssFile", 0),
            "baseline_rss_bytes": self.baseline,
        }


def _blas_limit(threads: int):
    """Limit BLAS threads as a Ray task with num_cpus=1 runs (OMP_NUM_THREADS=1).

    On a loaded machine more BLAS threads than free cores is far slower, not faster: OpenBLAS's 2-thread
    eigh of a 1000 x 1000 Gram took 8.1 s against 0.28 s on one thread on 2 busy cores.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def _in_child(job: str, **kwargs: Any) -> dict[str, Any]:
    """Run job(**kwargs) of this module in a fresh interpreter, so that its peak memory is its own.

    A plain subprocess rather than multiprocessing: nothing re-imports the caller's main module.
    """
    code = f"import json, sys; from {__name__} import {job}; print(json.dumps({job}(**json.load(sys.stdin))))"
    done = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(kwargs), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{job} failed in its subprocess:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _write_pair_job(
    root: str, rows: int, test_rows: int, classes: int, dim: int, seed: int, threads: int
) -> dict[str, Any]:
    """Child process: write (a)'s source and target, train and test; time and memory of the writing."""
    store = Store(root)
    peaks = _Peaks()
    t0 = time.perf_counter()
    with peaks, _blas_limit(threads):
        written = {}
        for data, n, offset in ((TRAIN, rows, 0), (TEST, test_rows, rows)):
            written[f"source/{data.split}"] = _write(
                store, "source", data, _source_batches(n, offset, seed, classes)
            )
            written[f"target/{data.split}"] = _write(
                store, "target", data, _classifier_batches(n, offset, seed, 1, SMALL, dim)
            )
    seconds = time.perf_counter() - t0
    total = sum(w["bytes"] for w in written.values())
    return {"seconds": seconds, "bytes": total, "splits": written, **peaks.report()}


def _fit_pair_job(root: str, threads: int) -> dict[str, Any]:
    """Child process: source statistics and the ridge fit of (a)'s pair, exactly as a grid task runs them."""
    from ..pairs import fit_pair, source_stats
    from ..spec import FitSpec

    store, fit = Store(root), FitSpec()
    peaks = _Peaks()
    with peaks, _blas_limit(threads):
        t0 = time.perf_counter()
        stats = source_stats(store, "source", TRAIN, fit)
        t1 = time.perf_counter()
        row = fit_pair(store, "source", "target", TRAIN, TEST, fit, "ridge", stats)
        t2 = time.perf_counter()
    return {
        "source_stats_seconds": t1 - t0,
        "fit_pair_seconds": t2 - t1,
        "seconds": t2 - t0,
        "alpha": float(row["alpha"]),
        "test_r2": float(row["r2"]),
        "test_agreement": float(row["agreement"]),
        **peaks.report(),
    }


def big_pair(
    rows: int, classes: int, dim: int, test_rows: int = 10_000, seed: int = 0, threads: int = 1
) -> dict[str, Any]:
    """(a): write the pair into a temporary local store, fit it in a fresh process, clean up."""
    width = 4 * (classes + SMALL) + 4 * (dim + SMALL) + 16
    need = (rows + test_rows) * width
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free
    if free < need * 1.05 + (1 << 30):
        return {"error": f"needs {need / 1e9:.1f} GB free in {tmp} for the shards, {free / 1e9:.1f} GB free"}
    root = tempfile.mkdtemp(prefix="featrec-scale-", dir=tmp)
    try:
        sizes = {"rows": rows, "test_rows": test_rows, "classes": classes, "dim": dim}
        write = _in_child("_write_pair_job", root=root, **sizes, seed=seed, threads=threads)
        fit = _in_child("_fit_pair_job", root=root, threads=threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "rows": rows,
        "test_rows": test_rows,
        "classes": classes,
        "dim": dim,
        "blas_threads": threads,
        "write": {**write, "rows_per_second": (rows + test_rows) / write["seconds"]},
        "fit": {
            **fit,
            "rows_per_second": rows / fit["seconds"],
            "within_bound": fit["peak_rss_bytes"] < RSS_BOUND,
        },
        "rss_bound_bytes": RSS_BOUND,
    }


# ---------------------------------------------------------------------------------------- (b) N x N
def _sequential(store: Store, keys: list[str], threads: int) -> dict[str, float]:
    """The task bodies in this process, one after another: source statistics per source, then every pair."""
    from ..pairs import fit_pair, source_stats
    from ..spec import FitSpec

    fit = FitSpec()
    with _blas_limit(threads):
        t0 = time.perf_counter()
        stats = {s: source_stats(store, s, TRAIN, fit) for s in keys}
        t1 = time.perf_counter()
        for s in keys:
            for t in keys:
                fit_pair(store, s, t, TRAIN, TEST, fit, "ridge", stats[s])
        t2 = time.perf_counter()
    return {"stats_seconds": t1 - t0, "fits_seconds": t2 - t1, "seconds": t2 - t0}


def _through_ray(store: Store, keys: list[str]) -> dict[str, float]:
    """The same bodies as the grid's plan.ridge_tasks graph, executed by the runtime; fits after their source's
    statistics."""
    from .. import runtime
    from ..plan import Graph, ridge_tasks
    from ..spec import FitSpec

    fit = FitSpec()
    graph = Graph()
    for s in keys:
        for t in keys:
            ridge_tasks(graph, store, s, t, TRAIN, TEST, fit, name=f"fit {s} -> {t}", deps=[])
    t0 = time.perf_counter()
    run = runtime.execute(graph, progress=False)
    seconds = time.perf_counter() - t0
    if run.failures:
        raise RuntimeError(f"bench scale: {len(run.failures)} tasks failed, e.g. {next(iter(run.failures.items()))}")
    body = sum(r.seconds for r in run.records.values())
    return {"seconds": seconds, "task_body_seconds": body, "tasks": len(graph.tasks)}


def grid_scaling(
    models: int,
    rows: int,
    test_rows: int,
    classes: int,
    dim: int,
    num_cpus: int,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """(b): write `models` synthetic classifiers, then fit N x N grids for N = 4, 8, ... up to `models`."""
    from .. import runtime

    sizes = sorted({n for n in (4, 8, 16, 32, 64) if n < models} | {models})
    root = tempfile.mkdtemp(prefix="featrec-scale-grid-")
    store = Store(root)
    keys = [f"m{i:02d}" for i in range(models)]
    try:
        write_seconds = []
        for i, key in enumerate(keys):
            t0 = time.perf_counter()
            for data, n, offset in ((TRAIN, rows, 0), (TEST, test_rows, rows)):
                _write(store, key, data, _classifier_batches(n, offset, seed, 10 + i, classes, dim))
            write_seconds.append(time.perf_counter() - t0)
        sequential = {n: _sequential(store, keys[:n], threads) for n in sizes}
        t0 = time.perf_counter()
        with runtime.session(None, num_cpus):
            ray_start = time.perf_counter() - t0
            cpus = int(runtime.cluster_limits()[0])
            cold = _through_ray(store, keys[: sizes[0]])  # fresh workers import the package: timed apart
            on_ray = {n: _through_ray(store, keys[:n]) for n in sizes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = []
    for n in sizes:
        seq, ray_n = sequential[n], on_ray[n]
        table.append(
            {
                "models": n,
                "pairs": n * n,
                "write_seconds": float(sum(write_seconds[:n])),
                "stats_seconds": seq["stats_seconds"],
                "stats_ms_per_source": 1000 * seq["stats_seconds"] / n,
                "fits_seconds": seq["fits_seconds"],
                "fit_ms_per_pair": 1000 * seq["fits_seconds"] / (n * n),
                "sequential_seconds": seq["seconds"],
                "ray_seconds": ray_n["seconds"],
                "ray_over_sequential": ray_n["seconds"] / seq["seconds"],
                "ray_task_body_seconds": ray_n["task_body_seconds"],
                "ray_overhead_ms_per_task": 1000
                * max(ray_n["seconds"] * cpus - ray_n["task_body_seconds"], 0.0)
                / ray_n["tasks"],
            }
        )
    return {
        "rows": rows,
        "test_rows": test_rows,
        "classes": classes,
        "dim": dim,
        "ray_cpus": cpus,
        "ray_start_seconds": ray_start,
        "ray_cold_first_grid": {"models": sizes[0], **cold},
        "blas_threads_in_process": threads,
        "by_n": table,
    }


def run_scale_bench(
    rows: int = 1_000_000,
    classes: int = 1000,
    dim: int = 2048,
    models: int = 16,
    *,
    test_rows: int = 10_000,
    grid_rows: int = 2000,
    grid_test_rows: int = 500,
    grid_classes: int = 100,
    grid_dim: int = 256,
    num_cpus: int = 2,
    blas_threads: int = 1,
    similarity_models: int = 8,
    similarity_rows: int = 2000,
) -> dict[str, Any]:
    """(a) the big pair's write and fit (peak RSS of the fit), (b) the N x N grid scaling, (c) the model-level
    similarity measures for `similarity_models` models on `similarity_rows` rows (bench.similarity).

    Task bodies run with `blas_threads` BLAS threads, as in a Ray task with num_cpus=1.
    """
    return {
        "cpu_count": os.cpu_count(),
        "pair": big_pair(rows, classes, dim, test_rows=test_rows, threads=blas_threads),
        "grid": grid_scaling(
            models, grid_rows, grid_test_rows, grid_classes, grid_dim, num_cpus, threads=blas_threads
        ),
        "similarity": run_similarity_scale(models=similarity_models, rows=similarity_rows),
    }


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_scale_bench(r: dict[str, Any]) -> str:
    """Human-readable summary of run_scale_bench's result."""
    p, g = r["pair"], r["grid"]
    lines = [f"scale benchmark ({r['cpu_count']} CPU cores)"]
    if "error" in p:
        lines.append(f"(a) big pair: not measured: {p['error']}")
    else:
        w, f = p["write"], p["fit"]
        lines += [
            f"(a) one pair: {p['rows']:,} train + {p['test_rows']:,} test rows, logits {p['classes']} -> "
            f"features {p['dim']}, streamed from a local store ({p['blas_threads']} BLAS thread(s))",
            f"  write {w['seconds']:.1f} s: {w['bytes'] / 1e9:.2f} GB of shards, "
            f"{w['rows_per_second']:,.0f} rows/s, peak RSS {_gb(w['peak_rss_bytes'])}",
            f"  fit {f['seconds']:.1f} s: {f['rows_per_second']:,.0f} train rows/s (source statistics "
            f"{f['source_stats_seconds']:.1f} s, pair fit with alpha search + test metrics "
            f"{f['fit_pair_seconds']:.1f} s)",
            f"  fit peak RSS {_gb(f['peak_rss_bytes'])}, bound {_gb(p['rss_bound_bytes'])}: "
            f"{'met' if f['within_bound'] else 'EXCEEDED'}",
            f"    peaks of its parts: numpy arrays {_gb(f['peak_numpy_bytes'])}, pyarrow buffers "
            f"{_gb(f['peak_pyarrow_bytes'])}, memory-mapped shard pages >= "
            f"{_gb(f['peak_file_backed_bytes'])}, interpreter {_gb(f['baseline_rss_bytes'])}",
            f"  fit quality: alpha {f['alpha']:g}, test R2 {f['test_r2']:.4f}, "
            f"agreement {f['test_agreement']:.4f}",
        ]
    cold = g["ray_cold_first_grid"]
    lines += [
        f"(b) N x N grids of synthetic classifiers: {g['rows']:,} train / {g['test_rows']:,} test rows, "
        f"C={g['classes']}, D={g['dim']}; in-process: {g['blas_threads_in_process']} BLAS thread(s), "
        f"one task after another; Ray: {g['ray_cpus']} CPUs, the grid's plan run by the runtime",
        f"  Ray start {g['ray_start_seconds']:.1f} s and a cold first {cold['models']} x {cold['models']} "
        f"grid {cold['seconds']:.2f} s (workers importing the package) are not counted below",
        "   N  pairs  write s  stats s  ms/source  fits s  ms/pair  in-process s   Ray s  Ray/in-process  "
        "Ray overhead ms/task",
    ]
    for t in g["by_n"]:
        lines.append(
            f"  {t['models']:>2} {t['pairs']:>6} {t['write_seconds']:8.2f} {t['stats_seconds']:8.2f} "
            f"{t['stats_ms_per_source']:10.1f} {t['fits_seconds']:7.2f} {t['fit_ms_per_pair']:8.1f} "
            f"{t['sequential_seconds']:13.2f} {t['ray_seconds']:7.2f} {t['ray_over_sequential']:15.2f} "
            f"{t['ray_overhead_ms_per_task']:21.1f}"
        )
    lines += [
        "  write: synthetic batches + Store.write_split per model, the write side of extraction "
        "(no forward passes)",
        f"  Ray overhead per task: (Ray wall time x {g['ray_cpus']} CPUs - time in task bodies) / tasks",
    ]
    if "similarity" in r:
        lines += ["(c) model-level similarity measures", format_similarity_scale(r["similarity"])]
    return "\n".join(lines)
