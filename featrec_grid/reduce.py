"""Task results -> pandas tables -> results.parquet, agreement.csv/.json, models.parquet, spec.resolved.yaml.

Each finished pair is saved at once as pairs/<setting>__<mode>__<source>__<target>__<method>.json (atomic), so an interrupted
run keeps its work and a rerun reuses it when the pair's key (inputs and fit settings) is unchanged.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

RESULT_COLUMNS = [
    "setting", "mode", "source", "target", "train_dataset", "train_split", "test_dataset", "test_split", "method", "alpha",
    "train_rows", "test_rows", "mse", "mse_total_seed", "r2", "agreement", "cosine", "accuracy_real",
    "accuracy_recon", "fit_seconds", "seconds",
]  # fmt: skip


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pair_path(output: Path, setting: str, mode: str, source: str, target: str, method: str) -> Path:
    return Path(output) / "pairs" / f"{setting}__{mode}__{source}__{target}__{method}.json"


def save_keyed(path: Path, value: dict[str, Any], key: str) -> None:
    """Persist one finished result (a flat JSON object, readable without this package) with the key of the inputs
    it was computed from, atomically."""
    write_atomic(path, json.dumps({"key": key, **value}, default=_json_default, indent=1).encode())


def load_keyed(path: Path, key: str) -> dict[str, Any] | None:
    """A stored result if it exists, parses and was computed under `key`; otherwise None (recompute)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.pop("key", None) != key:
        return None
    return saved


def save_pair(output: Path, row: dict[str, Any], key: str) -> None:
    """Persist one finished pair with the key it was computed under."""
    save_keyed(pair_path(output, row["setting"], row["mode"], row["source"], row["target"], row["method"]), row, key)


def load_pair(
    output: Path, setting: str, mode: str, source: str, target: str, method: str, key: str
) -> dict[str, Any] | None:
    """A stored pair row if it was computed under `key`; otherwise None (recompute)."""
    return load_keyed(pair_path(output, setting, mode, source, target, method), key)


def head_path(output: Path, model: str) -> Path:
    return Path(output) / "heads" / f"{model}.json"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def results_frame(rows: Iterable[dict[str, Any]], versions: dict[str, str]) -> pd.DataFrame:
    """One row per (pair, method) with the contract's columns first; versions as one JSON column."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=[*RESULT_COLUMNS, "versions"])
    if "alpha_scores" in df:
        df["alpha_scores"] = df["alpha_scores"].map(lambda s: json.dumps(s or {}))
    df["versions"] = json.dumps(versions, sort_keys=True)
    extra = [c for c in df.columns if c not in RESULT_COLUMNS]
    return df[[c for c in RESULT_COLUMNS if c in df.columns] + extra]


def matrix(
    results: pd.DataFrame, metric: str, method: str, order: Sequence[str], setting: str | None = None,
    mode: str | None = None,
) -> pd.DataFrame:  # fmt: skip
    """N x N table of one metric for one method (and setting and mode, when given): rows are sources (logits),
    columns targets (features)."""
    keep = results["method"] == method
    for column, value in (("setting", setting), ("mode", mode)):
        if value is not None:
            keep &= results[column] == value
    sub = results[keep]
    table = sub.pivot(index="source", columns="target", values=metric)
    return table.reindex(index=list(order), columns=list(order))


def write_outputs(
    output: Path,
    *,
    results: pd.DataFrame,
    models: pd.DataFrame,
    resolved_spec: dict[str, Any],
    cells: Sequence[tuple[str, str, str]],
    order: Sequence[str],
    provenance: dict[str, Any],
) -> dict[str, Path]:
    """Write every table of a grid run under `output`; returns their paths by name. `cells` lists (setting, mode,
    method): the first one's agreement matrix is agreement.csv/.json, each other one agreement_<method>.csv (same
    setting and mode) or agreement_<setting>_<mode>_<method>.csv."""
    output = Path(output)
    paths = {
        "results": output / "results.parquet",
        "models": output / "models.parquet",
        "spec": output / "spec.resolved.yaml",
        "provenance": output / "provenance.json",
    }
    write_atomic(paths["results"], results.to_parquet(index=False))
    write_atomic(paths["models"], models.to_parquet(index=False))
    write_atomic(paths["spec"], yaml.safe_dump(resolved_spec, sort_keys=False).encode())
    write_atomic(paths["provenance"], json.dumps(provenance, indent=1, default=str).encode())
    for i, (setting, mode, method) in enumerate(cells):
        agree = matrix(results, "agreement", method, order, setting, mode)
        same = (setting, mode) == tuple(cells[0][:2])
        stem = "agreement" if i == 0 else f"agreement_{method}" if same else f"agreement_{setting}_{mode}_{method}"
        paths[stem] = output / f"{stem}.csv"
        write_atomic(paths[stem], agree.to_csv().encode())
        if i == 0:
            nested = {
                s: {t: (None if pd.isna(v) else float(v)) for t, v in agree.loc[s].items()} for s in agree.index
            }
            paths["agreement_json"] = output / "agreement.json"
            write_atomic(paths["agreement_json"], json.dumps(nested, indent=1).encode())
    return paths


def save_cka(output: Path, column: str, result: dict[str, Any], key: str) -> None:
    """Persist one model-level CKA matrix (models x models) with the key of the shards it came from."""
    save_keyed(Path(output) / f"cka_{column}.json", result, key)


def load_cka(output: Path, column: str, key: str) -> dict[str, Any] | None:
    """The stored CKA matrix of `column` if it was computed from the current shards, else None."""
    return load_keyed(Path(output) / f"cka_{column}.json", key)


def read_frame(output: Path, name: str) -> pd.DataFrame | None:
    """A Parquet table a stage wrote under `output`, or None when that stage has not run."""
    path = Path(output) / f"{name}.parquet"
    return pd.read_parquet(path) if path.exists() else None


def read_json(output: Path, name: str) -> Any:
    path = Path(output) / name
    return json.loads(path.read_text()) if path.exists() else None


def save_inversion(output: Path, result: Any) -> None:
    """inversion.parquet (one row per model, method, control, seed and item), inversion_cross.parquet (one row per
    decoder model, judge model and condition), inversion_transfer.parquet (one row per generated image and judge)
    and the gallery's image list. `result`: run_invert_spec's outcome
    (table, cross, images), or run_inversion's frame (attrs["images"], attrs["cross"] as row dicts)."""
    if isinstance(result, pd.DataFrame):
        table, images, cross = result, result.attrs.get("images", []), pd.DataFrame(result.attrs.get("cross", []))
        transfer = pd.DataFrame(result.attrs.get("transfer", []))
    else:
        table, images, cross = result.table, result.images, result.cross
        transfer = getattr(result, "transfer", None)
    frame, cross = table.copy(), cross.copy()
    frame.attrs, cross.attrs = {}, {}
    write_atomic(Path(output) / "inversion.parquet", frame.to_parquet(index=False))
    write_atomic(Path(output) / "inversion_cross.parquet", cross.to_parquet(index=False))
    if transfer is not None:  # every generated image judged by every model (invert/transfer.py)
        write_atomic(Path(output) / "inversion_transfer.parquet", transfer.copy().to_parquet(index=False))
    write_atomic(Path(output) / "inversion_images.json", json.dumps([list(i) for i in images], indent=1).encode())


def save_layer_cka(output: Path, exports: list[dict[str, Any]]) -> None:
    """layer_cka.json: every pair's CKA export (names, layers, matrix, notes), as the `cka` command computed it."""
    write_atomic(Path(output) / "layer_cka.json", json.dumps(exports, indent=1, default=str).encode())
