"""Everything a run left under its output folder -> index.html: pair results, similarity, inversion, run time.

`run`, `invert` and `cka` each write their own tables; each then calls `publish`, so the page always shows
all of them, whichever command ran last. `rebuild_report` does the same from the folder alone (no Ray).
"""

from __future__ import annotations

import base64
import io
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import reduce
from .errors import UserError
from .figures import (
    PAIR_METRICS,
    Matrix,
    fmt,
    interval_text,
    matrix_figure,
    pair_heatmap,
    plotly_text,
    selections,
    similarity_figure,
    similarity_scatter,
)
from .plan import CKA_COLUMNS, cka_key, used_models
from .report import Download, Section, model_order, write_report
from .spec import GridSpec

INVERSION_SUMMARY = ["target_prob", "heldout_prob", "retrieval_top1", "chance", "ssim", "psnr"]
SIMILARITY_COLUMNS = reduce.SIMILARITY_COLUMNS
MAX_THUMBNAILS = 400  # images embedded for the drill-down panels, all pairs together
THUMB_PX = 64
_DOWNLOAD_FIRST = ("results.parquet", "agreement.csv", "agreement.json", "models.parquet", "spec.resolved.yaml")
_NOT_EMBEDDED = ("pair_details.parquet",)  # replicates and drill-down data: the page already holds what it shows


def publish(output: Path, spec: GridSpec) -> Path:
    """Write output/index.html from the tables found there; returns its path."""
    output = Path(output)
    results = reduce.read_results(output)
    if results is None:
        results = pd.DataFrame(columns=["source", "target", "method", *PAIR_METRICS])
    models = reduce.read_frame(output, "models")
    if models is None:
        models = pd.DataFrame({"model": list(spec.models), "family": [m.source for m in spec.models.values()]})
    agree = results.pivot_table(index="source", columns="target", values="agreement", aggfunc="mean")
    order = model_order(models, agree if len(results) else None)
    sections = [_seed_section(spec, results), _head_section(models, results) if len(results) else None,
                _similarity_section(spec, output, order, results), _layer_cka_section(output),
                _inversion_section(output), _transfer_section(output), _tasks_section(output)]  # fmt: skip
    return write_report(
        output,
        results=results,
        models=models,
        spec=spec.resolved(),
        provenance=reduce.read_json(output, "provenance.json") or {},
        sections=[s for s in sections if s is not None],
        thumbnails=thumbnails(spec, results),
        downloads=downloads(output),
        headline=headline(results) if len(results) else (),
    )


def rebuild_report(output: str | Path, spec_path: str | Path | None = None) -> Path:
    """Rebuild output/index.html from what the folder holds (spec.resolved.yaml unless `spec_path`); no Ray."""
    from .spec import load_spec

    output = Path(output)
    if not output.is_dir():
        raise UserError(f"{output}: no such output folder; give the folder a run wrote (it holds results.parquet)")
    path = Path(spec_path) if spec_path is not None else output / "spec.resolved.yaml"
    if not path.is_file():
        raise UserError(f"{path}: not found; pass --spec SPEC (the spec the output folder was made with)")
    return publish(output, load_spec(path))


def headline(results: pd.DataFrame, report: str | Path | None = None) -> list[str]:
    """A few lines for the end of `run`: self-agreement range, best and worst cross pair with their intervals (of
    the first selection, the one the page opens with) and the report as a file:// link."""
    lines: list[str] = []
    if len(results):
        common, selected = selections(results)
        first = selected[0]
        where = first.label if len(selected) > 1 else (common or first.label)
        frame = first.frame.dropna(subset=["agreement"])
        same = frame["source"].astype(str) == frame["target"].astype(str)
        if same.any():
            own = frame[same]["agreement"]
            lines.append(f"self agreement {fmt('agreement', own.min())} to {fmt('agreement', own.max())} over "
                         f"{int(same.sum())} models ({where})")  # fmt: skip
        cross = frame[~same]
        for label, row in (("best", cross.loc[cross["agreement"].idxmax()] if len(cross) else None),
                           ("worst", cross.loc[cross["agreement"].idxmin()] if len(cross) else None)):  # fmt: skip
            if row is not None:
                value = interval_text("agreement", row["agreement"], row.get("agreement_lo"), row.get("agreement_hi"),
                                      row.get("ci"))  # fmt: skip
                lines.append(f"{label} cross pair: {row['source']} -> {row['target']} agreement {value}")
    if report is not None:
        lines.append(f"report: {Path(report).resolve().as_uri()}")
    return lines


def provenance_fields(argv: Sequence[str] | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Who made this output, when and with what: UTC time, project version, git commit (when the package runs from
    a git checkout), the command line and the host. The runtime merges these into provenance.json."""
    import importlib.metadata as md

    try:
        version = md.version("featrec_grid")
    except md.PackageNotFoundError:
        version = "unknown"
    return {
        "time (UTC)": (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "featrec_grid version": version,
        "git commit": git_commit(Path(__file__).resolve().parent) or "unknown (not a git checkout)",
        "command line": shlex.join(list(argv) if argv is not None else sys.argv),
        "host": platform.node() or "unknown",
    }


def git_commit(where: Path) -> str | None:
    """HEAD of the git checkout holding `where` (with '+dirty' when tracked files changed), or None."""
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def thumbnails(spec: GridSpec, results: pd.DataFrame, limit: int = MAX_THUMBNAILS) -> dict[str, str]:
    """PNG data URIs of the test images the drill-down panels show (rows where B's head disagrees), keyed
    '<test_dataset>:<row id>', read from the dataset on the driver (pair tasks only see shards); at most `limit`.
    A dataset that cannot be opened here gives no thumbnails (the panel says so)."""
    from .data import load_dataset

    if "detail" not in results.columns or not len(results):
        return {}
    tests = {(c.setting, c.mode): c.test for c in spec.cells()}
    wanted: dict[str, tuple[Any, list[int]]] = {}
    for row in results.to_dict("records"):
        ref = tests.get((row.get("setting"), row.get("mode")))
        rows = [d["row"] for d in (row.get("detail") or {}).get("disagree", [])]
        if ref is not None and rows:
            wanted.setdefault(str(row.get("test_dataset")), (ref, []))[1].extend(rows)
    out: dict[str, str] = {}
    for dataset, (ref, rows) in wanted.items():
        rows = list(dict.fromkeys(rows))[: max(0, limit - len(out))]
        if not rows:
            break
        try:
            images = load_dataset(ref)
        except (UserError, OSError, RuntimeError):
            continue
        position = {int(r): i for i, r in enumerate(images.indices)}
        for r in rows:
            if r in position:
                out[f"{dataset}:{r}"] = _png_uri(images[position[r]][0])
    return out


def _png_uri(image: Any) -> str:
    from PIL import Image

    image = image.convert("RGB")
    if max(image.size) < THUMB_PX:
        image = image.resize((THUMB_PX, THUMB_PX), Image.NEAREST)
    else:
        image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def downloads(output: Path, max_bytes: int | None = None) -> list[Download]:
    """The output folder's tables (Parquet, CSV, JSON, YAML at its top level) to embed in the page, the main ones
    first; files over `max_bytes` (and the pair details) are listed without data."""
    from .report import MAX_DOWNLOAD_BYTES

    limit = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    files = [f for f in sorted(Path(output).iterdir()) if f.is_file() and not f.name.startswith(".")
             and f.suffix in (".parquet", ".csv", ".json", ".yaml")]  # fmt: skip
    files.sort(key=lambda f: (_DOWNLOAD_FIRST.index(f.name) if f.name in _DOWNLOAD_FIRST else len(_DOWNLOAD_FIRST)))
    mime = {".csv": "text/csv", ".json": "application/json", ".yaml": "text/yaml"}
    out = []
    for f in files:
        size = f.stat().st_size
        keep = size <= limit and f.name not in _NOT_EMBEDDED
        out.append(Download(f.name, f.read_bytes() if keep else None, size, mime.get(f.suffix, "application/octet-stream")))
    return out


def seed_table(spec: GridSpec, results: pd.DataFrame) -> pd.DataFrame:
    """The seed's published numbers beside ours: one row per spec `seed_results` entry, one column per mode and
    method that ran on at least one of these pairs (faithful first, e.g. `faithful sgd`, `default ridge`), NaN
    where that pair did not run."""
    columns = ["setting", "source", "target", "metric", "seed"]
    runs = list(results[["mode", "method"]].drop_duplicates().itertuples(index=False, name=None)) if len(results) else []
    runs.sort(key=lambda run: (run[0] != "faithful", run[1]))  # seed | faithful | default, as the seed reads
    records = []
    for item in spec.seed_results:
        row = {k: item[k] for k in columns[:4]} | {"seed": item["value"]}
        for mode, method in runs:
            hit = results[(results["setting"] == item["setting"]) & (results["mode"] == mode)
                          & (results["method"] == method) & (results["source"] == item["source"])
                          & (results["target"] == item["target"])]  # fmt: skip
            row[f"{mode} {method}"] = float(hit[item["metric"]].iloc[0]) if len(hit) else float("nan")
        records.append(row | {"note": item["note"]})
    table = pd.DataFrame.from_records(records)
    return table.dropna(axis=1, how="all")  # a mode/method that ran on none of these pairs


def _seed_section(spec: GridSpec, results: pd.DataFrame) -> Section | None:
    """The experiment's table: the seed's published number | ours, faithful | ours, default."""
    if not spec.seed_results:
        return None
    note = (
        "The FeatReconstruct seed's published numbers beside ours. 'faithful' reruns the seed's recipe: its data "
        "transform (CenterCrop without resize, so small images sit zero-padded in the frame; ImageNet mean/std) and "
        "its fitter (torch.nn.Linear, SGD lr 0.1, momentum 0.9, batch 256, 100 epochs, no shuffling). 'default' "
        "uses each model's own preprocessing and the closed-form ridge map. mse_total_seed is the seed's 'total MSE': "
        "the sum over test batches of 256 of each batch's mean squared error, not a mean. Agreement is a fraction."
    )
    return Section("Against the seed's published numbers", tables=[seed_table(spec, results)], note=note)


HEAD_COLUMNS = ["model", "classes", "feature_dim", "head_rank", "null_dims", "zero_head", "exact_inverse",
                "rowspace_variance", "pinv_r2", "pinv_agreement", "logit_variance", "reason"]  # fmt: skip


SELF_COLUMNS = ["setting", "mode", "model", "alpha", "train_rows", "train_logit_rank", "head_rank", "agreement",
                "exact at alpha 0", "note"]  # fmt: skip


def self_pair_table(results: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """One row per ridge self pair: whether "agreement 1.0 at alpha 0" is guaranteed for it (heads.exactness: the
    logit directions its solver kept against the head's rank), and what was measured. Pairs fitted with alpha > 0
    are regularised, so no exactness is claimed for them."""
    from .heads import exactness

    need = {"train_logit_rank", "alpha", "source", "target", "method"}
    if not need <= set(results.columns) or "head_rank" not in models.columns:
        return pd.DataFrame(columns=SELF_COLUMNS)
    rank = dict(zip(models["model"].astype(str), models["head_rank"], strict=True))
    own = results[(results["source"].astype(str) == results["target"].astype(str)) & (results["method"] == "ridge")]
    rows = []
    for _, r in own.dropna(subset=["train_logit_rank"]).iterrows():
        model = str(r["source"])
        if pd.isna(rank.get(model)):
            continue
        out = exactness(int(r["train_rows"]), int(r["train_logit_rank"]), int(rank[model]))
        if r["alpha"] != 0:
            out.update(exact=None, note=f"alpha {r['alpha']:g} > 0: a regularised fit, exactness not claimed")
        rows.append({"setting": r.get("setting"), "mode": r.get("mode"), "model": model, "alpha": r["alpha"],
                     **{k: out[k] for k in ("train_rows", "train_logit_rank", "head_rank")}, "agreement": r["agreement"],
                     "exact at alpha 0": out["exact"], "note": out["note"]})  # fmt: skip
    return pd.DataFrame(rows, columns=SELF_COLUMNS)


def _head_section(models: pd.DataFrame, results: pd.DataFrame) -> Section | None:
    """Why self-reconstruction works or fails, per model: the head's shape and rank, the analytic baseline, and per
    self pair whether agreement 1.0 at alpha 0 is guaranteed."""
    if "head_rank" not in models.columns:
        return None
    note = (
        "Logits are z = W f + b. The analytic baseline reconstructs f^ = pinv(W)(z - b) with no fitting at all: it "
        "is exact when C >= D and W has full column rank, and otherwise recovers only the part of f in W's row space "
        "(rowspace_variance: that part's share of the test features' variance). pinv_agreement is the head's top-1 "
        "on f^ against its top-1 on f; a fitted map can do better than pinv only by exploiting correlations between "
        "the visible and the invisible directions of f. The second table takes each ridge self pair: least squares "
        "(alpha 0) reproduces every test logit exactly when the centered train logits span all rank(W) directions "
        "the head can produce (train_logit_rank, the directions the solver kept, >= head_rank), which needs more "
        "train rows than rank(W); where it does not hold, agreement below 1.0 is expected, not a bug."
    )
    tables = [models[[c for c in HEAD_COLUMNS if c in models.columns]]]
    own = self_pair_table(results, models)
    if len(own):
        tables.append(own)
    return Section("Heads: why self-reconstruction succeeds or fails", tables=tables, note=note)


def similarity_frame(spec: GridSpec, output: Path) -> pd.DataFrame:
    """similarity.parquet (when present) plus the run's model-level linear CKA (cka_<features|logits>.json, on the
    first setting's test split) in the same long shape; a measure the parquet already has for that representation
    and setting is not duplicated."""
    frames = []
    found = reduce.read_frame(output, "similarity")
    if found is not None and len(found):
        missing = [c for c in SIMILARITY_COLUMNS if c not in found.columns]
        if missing:
            raise UserError(f"{output / 'similarity.parquet'}: missing columns {missing}; needs {SIMILARITY_COLUMNS}")
        frames.append(found[SIMILARITY_COLUMNS].astype({"setting": str, "model_a": str, "model_b": str}))
    used = used_models(spec)
    have = set() if not frames else set(zip(frames[0]["measure"], frames[0]["representation"], frames[0]["setting"],
                                            strict=True))
    for column in CKA_COLUMNS:
        r = reduce.load_cka(output, column, cka_key(spec, used))
        setting = spec.settings[0].label
        if r is None or ("linear_cka", column, setting) in have:
            continue
        names = [str(m) for m in r["models"]]
        m = np.asarray(r["cka"], dtype=float)
        frames.append(pd.DataFrame([{"measure": "linear_cka", "representation": column, "setting": setting,
                                     "model_a": a, "model_b": b, "value": m[i, j]}
                                    for i, a in enumerate(names) for j, b in enumerate(names)]))  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SIMILARITY_COLUMNS)


def _view_menu(group: str, views: Sequence[str], label: str) -> str:
    from html import escape

    options = "".join(f'<option value="{escape(v)}">{escape(v)}</option>' for v in views)
    return (f'<div class="controls"><label>{escape(label)} <select class="view-select" data-group="{group}">'
            f"{options}</select></label></div>")


def _similarity_section(spec: GridSpec, output: Path, order: list[str], results: pd.DataFrame) -> Section | None:
    """Similarity measures (CKA and the similarity stage's) beside agreement, and each measure against agreement."""
    frame = similarity_frame(spec, output)
    if not len(frame):
        return None
    order = [m for m in order if m in set(frame["model_a"]) | set(frame["model_b"])] or sorted(set(frame["model_a"]))
    views = list(dict.fromkeys(f"{m} · {r}" for m, r in zip(frame["measure"], frame["representation"], strict=True)))
    figures = [similarity_figure(frame, order, "similarity")]
    if len(results):
        common, selected = selections(results)
        figures += [pair_heatmap(selected, "agreement", order, subtitle=common),
                    similarity_scatter(frame, selected, "similarity")]  # fmt: skip
    note = (
        "Representation similarity between every two models on the same test images (linear CKA: Kornblith et al. "
        "2019; other measures as the similarity stage computed them), beside the agreement of the selected setting, "
        "and every cross pair's similarity against its agreement. The menu picks the measure and representation; the "
        "top bar's selector picks the setting. High similarity with low agreement (or the reverse) shows that similar "
        "representations and linearly recoverable features are different questions."
    )
    return Section("Representation similarity", figures=figures, note=note, columns=2,
                   controls=_view_menu("similarity", views, "measure · representation"))  # fmt: skip


def _layer_cka_section(output: Path) -> Section | None:
    """Layer-by-layer CKA heatmaps of the pairs the `cka` command compared."""
    from .cka import layer_cka_figure

    exports = reduce.read_json(output, "layer_cka.json")
    if not exports:
        return None
    note = (
        "Linear CKA between every layer of one model and every layer of another on the same test images "
        "(minibatch unbiased HSIC accumulated in float64; Nguyen, Raghu and Kornblith 2021). Layers listed in "
        "forward order; each model sees the images through its own input transform."
    )
    return Section("Layer-wise CKA", figures=[layer_cka_figure(e) for e in exports], note=note)


INVERSION_CROSS = {"logits": "logit decoder", "onehot": "one-hot control"}
INVERSION_CROSS_METRICS = {
    "retrieval_top1_features": "retrieval top-1 in B's features",
    "agreement": "B's top-1 agreement",
    "judge_prob": "B's probability of its class",
}


def inversion_cross_figures(cross: pd.DataFrame) -> list:
    """One heatmap per condition of the cross-model decoder table (rows = the model whose logits the decoder was
    trained on, A; columns = the judge, B), a menu per figure switching between the metrics; one 0-1 scale."""
    order = list(dict.fromkeys([*cross["decoder_model"].astype(str), *cross["judge_model"].astype(str)]))
    frame = cross.assign(decoder_model=cross["decoder_model"].astype(str), judge_model=cross["judge_model"].astype(str))
    figures = []
    for condition, label in INVERSION_CROSS.items():
        sub = frame[frame["condition"] == condition]
        if not len(sub):
            continue
        panels = []
        for metric, name in INVERSION_CROSS_METRICS.items():
            m = sub.pivot_table(index="decoder_model", columns="judge_model", values=metric, aggfunc="mean")
            values = m.reindex(index=order, columns=order).to_numpy(dtype=float, na_value=np.nan)
            hover = [[f"{plotly_text(name)}: {fmt('target_prob', v)}" for v in row] for row in values]
            panels.append(Matrix(values, hover, {"group": f"cross-{condition}", "view": name}, name))
        texts = [[[fmt("target_prob", v) if not np.isnan(v) else "" for v in row] for row in p.values] for p in panels]
        chance = float(sub["chance"].max())
        figures.append(matrix_figure(
            panels, order, title=f"Cross-model: {label}", colorbar="score", zrange=(0.0, 1.0), cell_text=texts,
            subtitle=f"{int(sub['rows'].max())} test images; retrieval chance {chance:.4f}",
            axes=("decoder trained on A's logits", "judge B"), hover=("decoder of A", "judge B"),
        ))  # fmt: skip
    return figures


_GRID_CAPTION = re.compile(r"rows = classes \[([^\]]*)\], columns = seeds")
_FIGURE = re.compile(r'<figure><img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"><figcaption>')


def labelled_gallery(html: str, scale: int = 4, pad: int = 1) -> str:
    """Gallery markup (invert.gallery_html) laid out as a grid, with class and seed labels beside every image whose
    caption says 'rows = classes [...], columns = seeds' (rows and columns counted from the PNG's size: cells of
    `pad` grey pixels, nearest-upscaled by `scale`, as invert.gallery.grid_image draws them)."""
    from html import escape

    from PIL import Image

    def label(match: re.Match) -> str:
        data, caption = match.group(1), match.group(2)
        found = _GRID_CAPTION.search(caption.replace("&#x27;", "'"))
        if not found:
            return match.group(0)
        classes = [c.strip().strip("'\"") for c in found.group(1).split(",") if c.strip()]
        width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
        cell = (height / scale - pad) / max(len(classes), 1) - pad
        cols = (width / scale - pad) / (cell + pad) if cell > 0 else 0
        if cell <= 0 or abs(cols - round(cols)) > 1e-6:
            return match.group(0)
        top = "".join(f"<span>seed {k}</span>" for k in range(round(cols)))
        side = "".join(f"<span>class {escape(c)}</span>" for c in classes)
        return (f'<figure><div class="labelled"><div class="cols">{top}</div><div class="rows">{side}</div>'
                f'<img src="data:image/png;base64,{data}" alt="{caption}"></div><figcaption>')

    return _FIGURE.sub(label, html)


def _inversion_section(output: Path) -> Section | None:
    """Inversion results: a summary per model and method, the image galleries side by side, and the cross-model
    decoder table (heatmaps per condition and the full table)."""
    from .invert import gallery_html

    table = reduce.read_frame(output, "inversion")
    images = reduce.read_json(output, "inversion_images.json")
    cross = reduce.read_frame(output, "inversion_cross")
    if table is None:
        return None
    summary = (
        table.groupby(["model", "method", "control"], dropna=False)[INVERSION_SUMMARY].mean().reset_index()
    )
    note = (
        "Class visualisation, combined and difference objectives, logit matching and a feed-forward decoder "
        "conditioned on logits, each with controls (an untrained network, the starting noise, and for the decoder "
        "the same decoder conditioned on one-hot labels). Logits carry instance information only where the logit "
        "decoder's retrieval top-1 beats the one-hot control's; chance is 1 / test gallery size. Means over seeds, "
        "classes and items."
    )
    figures, tables, controls = [], [summary], ""
    if cross is not None and len(cross):
        note += (
            " Cross-model heatmaps: a decoder is trained on model A's logits and decodes A's logits of every test "
            "image; row A, column B scores those reconstructions with model B. retrieval_top1_features: how often B's "
            "features of a reconstruction are nearest those of its own original among all test images (against "
            "chance); agreement: how often B gives the reconstruction the class it gives the original; judge_prob: "
            "B's mean probability of that class. Where the logit decoder's cells beat the one-hot control's, A's "
            "logits carried more than the class."
        )
        figures = inversion_cross_figures(cross)
        views = list(INVERSION_CROSS_METRICS.values())
        controls = "".join(_view_menu(f"cross-{c}", views, f"{label}: score")
                           for c, label in INVERSION_CROSS.items() if (cross["condition"] == c).any())  # fmt: skip
        cols = ["decoder_model", "judge_model", "condition", "agreement", "judge_prob", "retrieval_top1_features",
                "chance", "rows"]  # fmt: skip
        tables.append(cross[cols].sort_values(["condition", "decoder_model", "judge_model"], kind="stable"))
    html = labelled_gallery(gallery_html(output, [tuple(i) for i in images or []])) if images else ""
    return Section("Inverting logits back to images", figures=figures, tables=tables, html=html, note=note,
                   controls=controls, columns=2)  # fmt: skip


TRANSFER_COLUMNS = ["generator", "judge", "method", "parameterisation", "objective", "class", "seed", "target_prob",
                    "target_rank", "top1_is_target"]  # fmt: skip


def _transfer_section(output: Path) -> Section | None:
    """inversion_transfer.parquet: do images optimised on one model (generator) carry their class to another
    (judge)? A generator x judge heatmap of the mean target probability, one view per method and parameterisation."""
    frame = reduce.read_frame(output, "inversion_transfer")
    if frame is None or not len(frame):
        return None
    missing = [c for c in ("generator", "judge", "method", "parameterisation", "target_prob") if c not in frame.columns]
    if missing:
        raise UserError(f"{output / 'inversion_transfer.parquet'}: missing columns {missing}; needs {TRANSFER_COLUMNS}")
    frame = frame.assign(generator=frame["generator"].astype(str), judge=frame["judge"].astype(str))
    order = list(dict.fromkeys([*frame["generator"], *frame["judge"]]))
    panels, texts = [], []
    for (method, param), sub in frame.groupby(["method", "parameterisation"], sort=True):
        view = f"{method} · {param}"
        mean = sub.pivot_table(index="generator", columns="judge", values="target_prob", aggfunc="mean")
        top1 = (sub.pivot_table(index="generator", columns="judge", values="top1_is_target", aggfunc="mean")
                if "top1_is_target" in sub else mean * np.nan)  # fmt: skip
        values = mean.reindex(index=order, columns=order).to_numpy(dtype=float, na_value=np.nan)
        hits = top1.reindex(index=order, columns=order).to_numpy(dtype=float, na_value=np.nan)
        hover = [[f"mean target probability: {fmt('target_prob', v)}<br>judge's top-1 is the target: "
                  f"{fmt('agreement', h)}" for v, h in zip(vr, hr, strict=True)]
                 for vr, hr in zip(values, hits, strict=True)]  # fmt: skip
        panels.append(Matrix(values, hover, {"group": "transfer", "view": view}, view))
        texts.append([[fmt("target_prob", v) if not np.isnan(v) else "" for v in row] for row in values])
    fig = matrix_figure(panels, order, title="Transfer of optimised images", colorbar="target prob",
                        zrange=(0.0, 1.0), cell_text=texts, axes=("generator (optimised on)", "judge"),
                        hover=("generator", "judge"))  # fmt: skip
    note = ("Images optimised to maximise one class on the generator model, scored by every judge model: the mean "
            "probability the judge gives the target class (diagonal: the generator judging its own images). The menu "
            "picks the method and parameterisation.")
    views = [p.meta["view"] for p in panels]
    return Section("Transfer of optimised images", figures=[fig], note=note,
                   controls=_view_menu("transfer", views, "method · parameterisation"))  # fmt: skip


def _tasks_section(output: Path) -> Section | None:
    """tasks.parquet (the runtime's log: name, kind, status, seconds, node, error): where the time went."""
    import plotly.graph_objects as go

    from .figures import base_layout

    tasks = reduce.read_frame(output, "tasks")
    if tasks is None or not len(tasks):
        return None
    tasks = tasks.assign(kind=tasks["kind"].astype(str), status=tasks["status"].astype(str))
    kinds = list(dict.fromkeys(tasks["kind"]))
    colours = {"computed": "#3b528b", "reused": "#5ec962", "failed": "#d62728"}
    fig = go.Figure()
    for status in [s for s in ("computed", "reused", "failed") if (tasks["status"] == s).any()]:
        sub = tasks[tasks["status"] == status].groupby("kind")["seconds"].agg(["sum", "count"]).reindex(kinds)
        fig.add_trace(go.Bar(x=[plotly_text(k) for k in kinds], y=sub["sum"].fillna(0).tolist(), name=status,
                             customdata=sub["count"].fillna(0).astype(int).tolist(), marker={"color": colours[status]},
                             hovertemplate="%{x}: %{y:.2f} s in %{customdata} " + status + " tasks<extra></extra>"))
    total = float(tasks["seconds"].sum())
    fig.update_layout(**base_layout("Task seconds per kind", f"{len(tasks)} tasks, {total:.1f} task-seconds", 360),
                      barmode="stack", yaxis={"title": {"text": "seconds (sum over tasks)"}},
                      xaxis={"title": {"text": "task kind"}})  # fmt: skip
    counts = tasks.pivot_table(index="kind", columns="status", values="name", aggfunc="count", fill_value=0)
    counts = counts.reindex(kinds).reset_index()
    counts["seconds"] = tasks.groupby("kind")["seconds"].sum().reindex(kinds).to_numpy()
    tables = [counts]
    failed = tasks[tasks["status"] == "failed"]
    if len(failed):
        tables.append(failed[[c for c in ("name", "kind", "node", "error") if c in failed.columns]])
    note = "Where the time went: task-seconds per kind (summed over tasks that may have run in parallel), and counts."
    return Section("Run time", figures=[fig], tables=tables, note=note)
