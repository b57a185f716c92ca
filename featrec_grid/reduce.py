"""Task results -> pandas tables -> results.parquet, agreement.csv/.json, models.parquet, spec.resolved.yaml.

Each finished pair is saved at once as pairs/<setting>__<mode>__<source>__<target>__<method>.json (atomic), so an interrupted
run keeps its work and a rerun reuses it when the pair's key (inputs and fit settings) is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .metrics import INTERVAL_METRICS
from .store import payload_digest, write_atomic

RESULT_COLUMNS = [
    "setting", "mode", "source", "target", "train_dataset", "train_split", "test_dataset", "test_split", "method", "alpha",
    "train_rows", "test_rows", "mse", "mse_total_seed", "r2", "agreement", "cosine", "accuracy_real",
    "accuracy_recon", *(f"{m}_{end}" for m in INTERVAL_METRICS for end in ("lo", "hi")), "ci", "resamples",
    "fit_seconds", "seconds",
]  # fmt: skip
PAIR_KEYS = ["setting", "mode", "source", "target", "method"]  # one results row per these
DETAILS = "pair_details"  # <output>/pair_details.parquet: PAIR_KEYS + `detail` (JSON): drill-down data, replicates


def pair_path(output: Path, setting: str, mode: str, source: str, target: str, method: str) -> Path:
    return Path(output) / "pairs" / f"{setting}__{mode}__{source}__{target}__{method}.json"


DIGEST = "sha256"  # field of a keyed JSON: payload_digest of its value, so an edited or mistyped file is recomputed


def save_keyed(path: Path, value: dict[str, Any], key: str) -> None:
    """Persist one finished result (a flat JSON object, readable without this package) with the key of the inputs
    it was computed from and a checksum of its value, atomically."""
    if "key" in value or DIGEST in value:
        raise ValueError(f"a keyed result cannot hold the fields 'key' or {DIGEST!r}")
    body = {"key": key, DIGEST: payload_digest(value), **value}
    write_atomic(path, json.dumps(body, default=_json_default, indent=1).encode())


def load_keyed(path: Path, key: str) -> dict[str, Any] | None:
    """A stored result if it exists, parses, was computed under `key` and its value matches its checksum;
    otherwise None (recompute): a stale, edited, mistyped, truncated or pre-checksum file is never trusted."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.pop("key", None) != key:
        return None
    digest = saved.pop(DIGEST, None)
    if not isinstance(digest, str) or digest != payload_digest(saved):
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
    for column in ("alpha_scores", "detail"):
        if column in df:
            df[column] = df[column].map(lambda s: json.dumps(s or {}, default=_json_default))
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
    details = results.get("detail")
    write_atomic(paths["results"], results.drop(columns=["detail"], errors="ignore").to_parquet(index=False))
    if details is not None:
        paths[DETAILS] = output / f"{DETAILS}.parquet"
        keys = [k for k in PAIR_KEYS if k in results.columns]
        write_atomic(paths[DETAILS], results[[*keys, "detail"]].to_parquet(index=False))
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


def read_results(output: Path) -> pd.DataFrame | None:
    """results.parquet with each row's `detail` (a dict; {} where pair_details.parquet has none) joined on PAIR_KEYS."""
    results = read_frame(output, "results")
    details = read_frame(output, DETAILS)
    if results is None:
        return None
    if "detail" in results.columns:  # written by a version that kept the details inside results.parquet
        return results.assign(detail=[json.loads(d) if isinstance(d, str) else {} for d in results["detail"]])
    if details is None or not len(results):
        return results.assign(detail=[{} for _ in range(len(results))])
    keys = [k for k in PAIR_KEYS if k in results.columns and k in details.columns]
    merged = results.merge(details[[*keys, "detail"]], on=keys, how="left", validate="one_to_one")
    merged["detail"] = [json.loads(d) if isinstance(d, str) else {} for d in merged["detail"]]
    return merged


def read_json(output: Path, name: str) -> Any:
    path = Path(output) / name
    return json.loads(path.read_text()) if path.exists() else None


def save_inversion(output: Path, result: Any) -> None:
    """inversion.parquet (one row per model, method, control, seed and item), inversion_cross.parquet (one row per
    decoder model, judge model and condition), inversion_transfer.parquet (one row per generated image and judge)
    and the gallery's image list. `result`: grid.run_invert's outcome
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


TASK_COLUMNS = ["command", "name", "kind", "status", "seconds", "node", "node_id", "gpu_ids", "error"]


def save_tasks(output: Path, command: str, records: list[dict[str, Any]]) -> None:
    """tasks.parquet: one row per task the last `command` (run, cka, invert) executed or reused (name, kind, status
    computed/reused/failed, seconds in the task body, node address and id, the GPU ids Ray gave it, error); rows of
    the other commands are kept."""
    path = Path(output) / "tasks.parquet"
    frame = pd.DataFrame.from_records([{"command": command, **r} for r in records], columns=TASK_COLUMNS)
    if path.exists():
        old = pd.read_parquet(path)
        frame = pd.concat([old[old["command"] != command], frame], ignore_index=True) if len(old) else frame
    write_atomic(path, frame.to_parquet(index=False))


def similarity_path(output: Path, setting: str, column: str) -> Path:
    return Path(output) / "similarity" / f"{setting}__{column}.json"


def save_similarity(output: Path, setting: str, column: str, rows: list[dict[str, Any]], key: str) -> None:
    """One (setting, representation)'s similarity records, saved the moment its task ends, with its key."""
    save_keyed(similarity_path(output, setting, column), {"rows": rows}, key)


SIMILARITY_COLUMNS = ["measure", "representation", "setting", "model_a", "model_b", "value"]


def write_similarity(output: Path, rows: list[dict[str, Any]]) -> None:
    """similarity.parquet: one row per measure, representation (features, logits), setting and ordered model pair."""
    frame = pd.DataFrame.from_records(rows, columns=SIMILARITY_COLUMNS)
    write_atomic(Path(output) / "similarity.parquet", frame.to_parquet(index=False))
