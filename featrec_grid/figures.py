"""Plotly figures of the report: pair heatmaps and bars linked to the shared selector, similarity maps, scatters.

A trace's `meta` says when it is shown (report_js.py): `sel` (selection fields that must equal the shared
selector's) and `group`/`view` (a local menu's value). Numbers are formatted in Python by `fmt`, the one format per
metric used everywhere on the page (cells, hover, tables).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

SETTING_COLUMNS = ("setting", "mode", "method", "train_dataset", "train_split", "test_dataset", "test_split")
MAX_ANNOTATED = 12  # write the values into the cells up to this many models
SIMILARITY_SCALE = "Viridis"  # every similarity-like map (agreement, R2, CKA, other measures); errors reversed
DIFFERENCE_SCALE = "RdBu"  # differences: diverging, zero in the middle

# metric -> (name, Python format): the one number format per metric everywhere on the page.
METRICS: dict[str, tuple[str, str]] = {
    "agreement": ("Top-1 agreement", ".1%"),
    "accuracy_real": ("accuracy on real features", ".1%"),
    "accuracy_recon": ("accuracy on reconstruction", ".1%"),
    "test_accuracy": ("test accuracy", ".1%"),
    "pinv_agreement": ("pinv agreement", ".1%"),
    "r2": ("R²", ".3f"),
    "cosine": ("cosine", ".3f"),
    "cka": ("Linear CKA", ".3f"),
    "mse": ("MSE", ".3g"),
    "mse_ratio": ("MSE ÷ column best", ".2f"),
    "mse_total_seed": ("MSE (seed's total)", ".4g"),
    "alpha": ("alpha", ".3g"),
    "seconds": ("seconds", ".2f"),
    "fit_seconds": ("fit seconds", ".2f"),
}
HIGHER_IS_BETTER = {"agreement": True, "r2": True, "mse": False}
PAIR_METRICS = ("agreement", "r2", "mse")  # the N x N heatmaps of every grid report


def metric_format(column: str) -> str:
    """The Python format of a column: its metric's (interval bounds `<m>_lo`/`_hi` share it), else '.4g'."""
    base = column[:-3] if column.endswith(("_lo", "_hi")) else column
    if base in METRICS:
        return METRICS[base][1]
    if base.endswith(("prob", "cka", "knn", "cknna", "procrustes")) or base.startswith("retrieval"):
        return ".3f"
    return ".4g"


def d3_format(column: str) -> str:
    """The same format for Plotly's d3 templates (d3 keeps trailing zeros in 'g' unless told '~')."""
    spec = metric_format(column)
    return spec.replace("g", "~g")


def fmt(column: str, value: Any) -> str:
    """One number as the page shows it; '–' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    try:
        return format(float(value), metric_format(column))
    except (TypeError, ValueError):
        return str(value)


def plotly_text(value: Any) -> str:
    """A user-given string made safe for Plotly text (titles, ticks, hover), which Plotly reads as pseudo-HTML."""
    return escape(str(value), quote=False)


def interval_text(metric: str, value: Any, lo: Any, hi: Any, level: Any) -> str:
    """'90.2% (95% CI 87.6%–92.6%)', or just the value without an interval."""
    text = fmt(metric, value)
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return text
    share = f"{float(level):.0%} " if level is not None and not pd.isna(level) else ""
    return f"{text} ({share}CI {fmt(metric, lo)}–{fmt(metric, hi)})"


@dataclass(frozen=True)
class Selection:
    """One (setting, mode, method, data, alpha) of the results: `label` tells it apart from the others, `fields`
    (strings) are what linked traces match, `frame` its rows."""

    label: str
    fields: dict[str, str]
    frame: pd.DataFrame


def selections(results: pd.DataFrame) -> tuple[str, list[Selection]]:
    """(what every selection shares, the selections in a stable order)."""
    from .errors import UserError

    keys = [c for c in SETTING_COLUMNS if c in results.columns]
    if "alpha" in results.columns and results.duplicated([*keys, "source", "target"]).any():
        keys.append("alpha")
    duplicated = results.duplicated([*keys, "source", "target"])
    if duplicated.any():
        row = results[duplicated].iloc[0]
        where = ", ".join(f"{k}={row[k]!r}" for k in keys)
        raise UserError(f"results: several rows for source={row['source']!r}, target={row['target']!r} ({where}); "
                        "allowed: one row per ordered pair and setting")
    if not keys:
        return "", [Selection("all", {}, results)]
    groups = [(dict(zip(keys, key, strict=True)), frame)
              for key, frame in results.groupby(keys, sort=True, dropna=False)]  # fmt: skip
    common, names = setting_names([k for k, _ in groups])
    return common, [Selection(name or common or "all", {k: str(v) for k, v in key.items()}, frame)
                    for name, (key, frame) in zip(names, groups, strict=True)]  # fmt: skip


def setting_names(keys: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """(what all settings share, what tells each apart), e.g. ("fit digits/train · test digits/test", ["ridge", "sgd"])."""
    if not keys:
        return "", []
    varying = {k for k in keys[0] if len({repr(key[k]) for key in keys}) > 1}
    for side in (("train_dataset", "train_split"), ("test_dataset", "test_split")):  # "fit digits/train" stays whole
        if varying & set(side):
            varying |= set(side) & set(keys[0])
    common = setting_label({k: v for k, v in keys[0].items() if k not in varying})
    return common, [setting_label({k: v for k, v in key.items() if k in varying}) for key in keys]


def setting_label(key: Mapping[str, Any]) -> str:
    parts = [str(key[k]) for k in ("setting", "mode", "method") if k in key]
    if "train_dataset" in key or "train_split" in key:
        parts.append(f"fit {key.get('train_dataset', '*')}/{key.get('train_split', '*')}")
    if "test_dataset" in key or "test_split" in key:
        parts.append(f"test {key.get('test_dataset', '*')}/{key.get('test_split', '*')}")
    if "alpha" in key:
        parts.append(f"alpha={fmt('alpha', key['alpha'])}")
    return " · ".join(parts)


def is_self_only(results: pd.DataFrame) -> bool:
    """True when every result is a self pair (`pairs: self`): bars say more than mostly empty matrices."""
    return bool(len(results)) and bool((results["source"].astype(str) == results["target"].astype(str)).all())


def pivot(frame: pd.DataFrame, column: str, order: Sequence[str]) -> np.ndarray:
    """N x N float array of one column (rows = source, columns = target, in `order`); NaN where absent."""
    if column not in frame.columns:
        return np.full((len(order), len(order)), np.nan)
    table = frame.assign(source=frame["source"].astype(str), target=frame["target"].astype(str))
    table = table.pivot(index="source", columns="target", values=column)
    return table.reindex(index=list(order), columns=list(order)).to_numpy(dtype=float, na_value=np.nan)


def overlap_marks(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, higher_better: bool) -> np.ndarray:
    """Boolean N x N: cells whose interval overlaps the interval of their row's self pair or of the row's best
    cell (the reference cells themselves are not marked): differences there may be noise."""
    n = len(values)
    marks = np.zeros(values.shape, bool)
    for i in range(n):
        row = values[i]
        if np.isnan(row).all():
            continue
        best = int(np.nanargmax(row) if higher_better else np.nanargmin(row))
        refs = [j for j in {i, best} if j < n and not np.isnan(lo[i, j]) and not np.isnan(hi[i, j])]
        for j in range(n):
            if j in refs or np.isnan(row[j]) or np.isnan(lo[i, j]) or np.isnan(hi[i, j]):
                continue
            marks[i, j] = any(lo[i, j] <= hi[i, r] and lo[i, r] <= hi[i, j] for r in refs)
    return marks


def heatmap_size(order: Sequence[str]) -> tuple[int, int]:
    """(side of the square plot area, figure height) in pixels, from the number and length of labels; the width
    follows the page (the figure is responsive)."""
    n = len(order)
    side = min(720, max(260, 34 * n))
    label = min(220, 7 * max((len(str(m)) for m in order), default=0) + 10)  # about 7 px a character at 11 px
    return side, side + int(0.65 * label) + 90  # x labels are turned by 40 degrees


def _axes(order: Sequence[str], axes: tuple[str, str]) -> dict[str, Any]:
    n = len(order)
    labels = [plotly_text(m) for m in order]
    common = {"showgrid": False, "zeroline": False, "automargin": True, "tickmode": "array",
              "tickvals": list(range(n)), "ticktext": labels, "tickfont": {"size": 11 if n <= 20 else 9},
              "range": [-0.5, n - 0.5], "constrain": "domain"}  # fmt: skip
    return {
        "xaxis": {**common, "title": {"text": plotly_text(axes[1])}, "tickangle": -40, "constraintoward": "left"},
        "yaxis": {**common, "title": {"text": plotly_text(axes[0])}, "range": [n - 0.5, -0.5],
                  "scaleanchor": "x", "constraintoward": "top"},
    }


def _block_lines(families: Sequence[str] | None, n: int) -> list[dict[str, Any]]:
    starts = [k for k in range(1, len(families or [])) if families[k] != families[k - 1]]
    style = {"type": "line", "xref": "x", "yref": "y", "line": {"color": "white", "width": 3}}
    return [line for k in starts for line in (
        {**style, "x0": k - 0.5, "x1": k - 0.5, "y0": -0.5, "y1": n - 0.5},
        {**style, "y0": k - 0.5, "y1": k - 0.5, "x0": -0.5, "x1": n - 0.5})]  # fmt: skip


def base_layout(title: str, subtitle: str = "", height: int = 420) -> dict[str, Any]:
    """White template, the title at the top left, the toolbar vertical on the right so it covers no title."""
    sub = f"<br><span style='font-size:12px;color:#5a6475'>{plotly_text(subtitle)}</span>" if subtitle else ""
    return {"template": "plotly_white", "height": height, "autosize": True,
            "margin": {"t": 74 if subtitle else 50, "l": 10, "r": 36, "b": 10},
            "title": {"text": f"<b>{plotly_text(title)}</b>{sub}", "x": 0.01, "xanchor": "left", "yref": "container",
                      "y": 1.0, "yanchor": "top", "pad": {"t": 12}},
            "modebar": {"orientation": "v"}}  # fmt: skip


@dataclass(frozen=True)
class Matrix:
    """One N x N panel of a linked heatmap: values, the text shown in and over each cell, and marks."""

    values: np.ndarray
    hover: list[list[str]]
    meta: dict[str, Any]
    name: str = ""
    marks: np.ndarray | None = None


def matrix_figure(panels: Sequence[Matrix], order: Sequence[str], *, title: str, colorbar: str,
                  colorscale: str = SIMILARITY_SCALE, zrange: tuple[float | None, float | None] = (None, None),
                  cell_text: Sequence[list[list[str]]] | None = None, subtitle: str = "",
                  families: Sequence[str] | None = None,
                  axes: tuple[str, str] = ("source A: logits used", "target B: features reconstructed"),
                  hover: tuple[str, str] = ("source A (logits)", "target B (features)")) -> go.Figure:  # fmt: skip
    """Square heatmaps over `order` (rows, columns), one trace per panel (plus a marker trace where it has marks);
    the first panel visible. Hover: row, column and the panel's hover text of that cell."""
    n = len(order)
    side, height = heatmap_size(order)
    fig = go.Figure()
    for k, panel in enumerate(panels):
        text = cell_text[k] if cell_text is not None else None
        custom = [[[plotly_text(order[i]), plotly_text(order[j]), panel.hover[i][j]] for j in range(n)]
                  for i in range(n)]  # fmt: skip
        fig.add_trace(go.Heatmap(
            z=[[None if math.isnan(v) else float(v) for v in row] for row in panel.values],
            x=list(range(n)), y=list(range(n)), customdata=custom, text=text, name=plotly_text(panel.name),
            texttemplate="%{text}" if text is not None and n <= MAX_ANNOTATED else None,
            textfont={"size": 11 if n <= 6 else 9}, visible=k == 0, colorscale=colorscale, zmin=zrange[0],
            zmax=zrange[1], hoverongaps=False, meta=panel.meta,
            hovertemplate=(f"{plotly_text(hover[0])}: %{{customdata[0]}}<br>{plotly_text(hover[1])}: %{{customdata[1]}}"
                           "<br>%{customdata[2]}<extra></extra>"),
            colorbar={"title": {"text": plotly_text(colorbar), "side": "right"}, "thickness": 14, "lenmode": "pixels",
                      "len": side * 0.9, "y": 1, "yanchor": "top"},
        ))  # fmt: skip
        if panel.marks is not None and panel.marks.any():
            ii, jj = np.nonzero(panel.marks)
            fig.add_trace(go.Scatter(
                x=(jj + 0.33).tolist(), y=(ii - 0.33).tolist(), mode="markers", visible=k == 0, hoverinfo="skip",
                marker={"symbol": "circle", "size": 6 if n <= 20 else 4, "color": "white",
                        "line": {"color": "#1d2330", "width": 1}},
                name="interval overlaps the row's self pair or best", showlegend=False, meta=panel.meta,
            ))  # fmt: skip
    fig.update_layout(**base_layout(title, subtitle, height), **_axes(order, axes),
                      shapes=_block_lines(families, n))  # fmt: skip
    return fig


def pair_heatmap(selected: Sequence[Selection], metric: str, order: Sequence[str],
                 families: Sequence[str] | None = None, subtitle: str = "") -> go.Figure:  # fmt: skip
    """The N x N heatmap of one pair metric, one panel per selection (linked to the shared selector). MSE is shown
    divided by its column's lowest MSE (the best source for that target), the raw MSE and interval on hover."""
    name, _ = METRICS[metric]
    panels, texts = [], []
    for sel in selected:
        values = pivot(sel.frame, metric, order)
        lo, hi = pivot(sel.frame, f"{metric}_lo", order), pivot(sel.frame, f"{metric}_hi", order)
        level = pivot(sel.frame, "ci", order)
        hover = [[f"{name}: {interval_text(metric, values[i, j], lo[i, j], hi[i, j], level[i, j])}"
                  if not np.isnan(values[i, j]) else "not run" for j in range(len(order))]
                 for i in range(len(order))]  # fmt: skip
        shown, key = values, metric
        if metric == "mse":
            with np.errstate(invalid="ignore", divide="ignore"):
                best = np.nanmin(np.where(np.isnan(values), np.inf, values), axis=0)
                shown = values / np.where(np.isfinite(best) & (best > 0), best, np.nan)
            key = "mse_ratio"
            hover = [[h if np.isnan(shown[i, j]) else f"{h}<br>{METRICS['mse_ratio'][0]}: {fmt('mse_ratio', shown[i, j])}"
                      for j, h in enumerate(row)] for i, row in enumerate(hover)]  # fmt: skip
        texts.append([[fmt(key, v) if not np.isnan(v) else "" for v in row] for row in shown])
        marks = overlap_marks(values, lo, hi, HIGHER_IS_BETTER[metric])
        panels.append(Matrix(shown, hover, {"sel": sel.fields}, sel.label, marks))
    if metric == "mse":  # ratios span orders of magnitude: colour by log10, ticks in plain ratios
        finite = np.concatenate([p.values[np.isfinite(p.values)] for p in panels] or [np.zeros(0)])
        top = float(np.log10(max(float(finite.max()) if len(finite) else 2.0, 1.01)))
        panels = [Matrix(np.log10(p.values), p.hover, p.meta, p.name, p.marks) for p in panels]
        fig = matrix_figure(panels, order, title="MSE, relative to each column's best source", cell_text=texts,
                            colorbar="× best MSE", colorscale=SIMILARITY_SCALE + "_r", zrange=(0.0, top),
                            subtitle=subtitle, families=families)  # fmt: skip
        ticks = [t for t in (1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 1e4) if np.log10(t) <= top + 1e-9]
        fig.update_traces(selector={"type": "heatmap"}, colorbar={"tickvals": np.log10(ticks).tolist(),
                                                                  "ticktext": [f"{t:g}" for t in ticks]})  # fmt: skip
        return fig
    all_values = np.concatenate([p.values[np.isfinite(p.values)] for p in panels] or [np.zeros(0)])
    low = 0.0 if metric == "agreement" else max(-1.0, min(0.0, float(all_values.min()) if len(all_values) else 0.0))
    return matrix_figure(panels, order, title=name, colorbar=name, zrange=(low, 1.0), cell_text=texts,
                         subtitle=subtitle, families=families)  # fmt: skip


def self_bars(selected: Sequence[Selection], metric: str, order: Sequence[str], subtitle: str = "") -> go.Figure:
    """`pairs: self`: one bar per model with its interval, one trace per selection (linked)."""
    name, _ = METRICS[metric]
    fig = go.Figure()
    for k, sel in enumerate(selected):
        frame = sel.frame.assign(source=sel.frame["source"].astype(str)).set_index("source").reindex(list(order))
        values = frame[metric].to_numpy(dtype=float, na_value=np.nan)
        lo = frame.get(f"{metric}_lo", pd.Series(np.nan, index=frame.index)).to_numpy(dtype=float, na_value=np.nan)
        hi = frame.get(f"{metric}_hi", pd.Series(np.nan, index=frame.index)).to_numpy(dtype=float, na_value=np.nan)
        level = frame.get("ci", pd.Series(np.nan, index=frame.index)).to_numpy(dtype=float, na_value=np.nan)
        hover = [f"{name}: {interval_text(metric, v, a, b, c)}" for v, a, b, c in zip(values, lo, hi, level, strict=True)]
        fig.add_trace(go.Bar(
            x=[plotly_text(m) for m in order], y=values.tolist(), visible=k == 0, name=plotly_text(sel.label),
            text=[fmt(metric, v) for v in values], textposition="outside", customdata=hover, meta={"sel": sel.fields},
            error_y={"type": "data", "symmetric": False, "array": np.nan_to_num(hi - values).tolist(),
                     "arrayminus": np.nan_to_num(values - lo).tolist(), "color": "#1d2330", "thickness": 1},
            marker={"color": "#3b528b"}, hovertemplate="%{x}<br>%{customdata}<extra></extra>",
        ))  # fmt: skip
    fig.update_layout(**base_layout(f"{name}, self pairs", subtitle, 380),
                      yaxis={"title": {"text": name}, "tickformat": d3_format(metric)},
                      xaxis={"title": {"text": "model (its logits -> its own features)"}})  # fmt: skip
    return fig


def similarity_figure(frame: pd.DataFrame, order: Sequence[str], group: str) -> go.Figure:
    """Model x model heatmaps of similarity.parquet-shaped rows (measure, representation, setting, model_a,
    model_b, value): one panel per (setting, measure, representation), shown for the selected setting and the
    section's menu (`group`) value 'measure · representation'. One colour scale family; 0-1 where bounded."""
    panels = []
    bounded = True
    for (setting, measure, rep), sub in frame.groupby(["setting", "measure", "representation"], sort=False):
        m = sub.pivot_table(index="model_a", columns="model_b", values="value", aggfunc="mean")
        m = m.combine_first(m.T).reindex(index=list(order), columns=list(order))
        values = m.to_numpy(dtype=float, na_value=np.nan)
        bounded &= bool(np.nanmin(values) >= -0.05 and np.nanmax(values) <= 1.0 + 1e-6) if np.isfinite(values).any() else True
        hover = [[f"{plotly_text(measure)} ({plotly_text(rep)}): {fmt('cka', v)}" for v in row] for row in values]
        panels.append(Matrix(values, hover, {"sel": {"setting": str(setting)}, "group": group,
                                             "view": f"{measure} · {rep}"}, f"{measure} · {rep}"))  # fmt: skip
    texts = [[[fmt("cka", v) if not np.isnan(v) else "" for v in row] for row in p.values] for p in panels]
    return matrix_figure(panels, order, title="Representation similarity", colorbar="similarity", cell_text=texts,
                         zrange=(0.0, 1.0) if bounded else (None, None), axes=("model A", "model B"),
                         hover=("model A", "model B"))  # fmt: skip


def similarity_scatter(frame: pd.DataFrame, selected: Sequence[Selection], group: str) -> go.Figure:
    """Each cross pair's similarity (x; the section menu's measure) against its agreement (y), per selection."""
    fig = go.Figure()
    for (setting, measure, rep), sub in frame.groupby(["setting", "measure", "representation"], sort=False):
        sim = {(str(a), str(b)): float(v) for a, b, v in zip(sub["model_a"], sub["model_b"], sub["value"], strict=True)}
        for sel in selected:
            if sel.fields.get("setting", str(setting)) != str(setting):
                continue
            rows = sel.frame[sel.frame["source"].astype(str) != sel.frame["target"].astype(str)]
            xs, ys, labels = [], [], []
            for s, t, agree in zip(rows["source"].astype(str), rows["target"].astype(str), rows["agreement"], strict=True):
                value = sim.get((s, t), sim.get((t, s)))
                if value is not None and not pd.isna(agree):
                    xs.append(value)
                    ys.append(float(agree))
                    labels.append(f"{plotly_text(s)} → {plotly_text(t)}<br>{plotly_text(measure)}: {fmt('cka', value)}"
                                  f"<br>agreement: {fmt('agreement', agree)}")
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="markers", customdata=labels, hovertemplate="%{customdata}<extra></extra>",
                marker={"size": 8, "color": "#21918c", "line": {"color": "white", "width": 0.5}}, showlegend=False,
                visible=False, meta={"sel": sel.fields, "group": group, "view": f"{measure} · {rep}"},
            ))  # fmt: skip
    if fig.data:
        fig.data[0].visible = True
    fig.update_layout(**base_layout("Similarity vs agreement, cross pairs", "each point one ordered pair A → B", 420),
                      xaxis={"title": {"text": "similarity of A and B (the menu's measure)"}},
                      yaxis={"title": {"text": "top-1 agreement, A's logits → B's features"}, "tickformat": ".0%"})
    return fig


def difference_payload(selected: Sequence[Selection], order: Sequence[str], decode) -> dict[str, Any]:
    """Embedded data for the difference view: per ordered pair of selections (i < j) and pair metric, N x N of
    x - y with bootstrap intervals of the difference from the shared resamples (replicates of both rows, via
    `decode(row_detail, metric)`); NaN -> None, 4 significant digits."""
    def rounded(a: np.ndarray) -> list[list[float | None]]:
        return [[None if not np.isfinite(v) else float(f"{v:.4g}") for v in row] for row in a]

    def replicates(sel: Selection, metric: str) -> dict[tuple[str, str], np.ndarray]:
        out = {}
        if "detail" not in sel.frame.columns:
            return out
        for s, t, detail in zip(sel.frame["source"].astype(str), sel.frame["target"].astype(str), sel.frame["detail"],
                                strict=True):  # fmt: skip
            values = decode(detail, metric)
            if values is not None:
                out[(s, t)] = values
        return out

    from .metrics import percentile_interval

    n = len(order)
    levels = [float(sel.frame["ci"].dropna().iloc[0]) if "ci" in sel.frame and sel.frame["ci"].notna().any() else 0.95
              for sel in selected]  # fmt: skip
    reps = {(k, m): replicates(sel, m) for k, sel in enumerate(selected) for m in PAIR_METRICS}
    pairs: dict[str, Any] = {}
    for a in range(len(selected)):
        for b in range(a + 1, len(selected)):
            entry = {}
            for metric in PAIR_METRICS:
                d = pivot(selected[a].frame, metric, order) - pivot(selected[b].frame, metric, order)
                lo, hi = np.full((n, n), np.nan), np.full((n, n), np.nan)
                for i, s in enumerate(order):
                    for j, t in enumerate(order):
                        x, y = reps[(a, metric)].get((s, t)), reps[(b, metric)].get((s, t))
                        if x is not None and y is not None and not np.isnan(d[i, j]):
                            k = min(len(x), len(y))
                            lo[i, j], hi[i, j] = percentile_interval(x[:k] - y[:k], min(levels[a], levels[b]))
                entry[metric] = {"d": rounded(d), "lo": rounded(lo), "hi": rounded(hi)}
            pairs[f"{a}|{b}"] = entry
    return {"order": [str(m) for m in order], "labels": [s.label for s in selected], "pairs": pairs,
            "metrics": {m: {"name": METRICS[m][0], "format": d3_format(m)} for m in PAIR_METRICS},
            "level": min(levels) if levels else 0.95}  # fmt: skip
