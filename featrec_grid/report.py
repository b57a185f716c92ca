"""Results tables -> one self-contained, offline HTML page: N x N heatmaps, model and pair tables, extra sections.

Every user-given string is escaped: in HTML with html.escape, in Plotly text (which Plotly renders as its own
pseudo-HTML) the same way, and JSON inside <script> has <, > and & as \\u escapes so it cannot close the tag.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from featrec_grid.errors import UserError
from featrec_grid.store import write_atomic

# metric column -> (heatmap title, colorscale, in-cell number format); higher is better except for MSE.
METRICS: dict[str, tuple[str, str, str]] = {
    "agreement": ("Top-1 agreement", "Viridis", ".3f"),
    "r2": ("R²", "Viridis", ".3f"),
    "mse": ("MSE", "Viridis_r", ".3g"),
    "cka": ("Linear CKA", "Viridis", ".3f"),
}
PAIR_METRICS = ("agreement", "r2", "mse")  # the N x N heatmaps of every grid report
SETTING_COLUMNS = ("setting", "mode", "method", "train_dataset", "train_split", "test_dataset", "test_split")
MAX_ANNOTATED = 12  # write the values into the cells up to this many models
_PERCENT = {"agreement", "accuracy_real", "accuracy_recon", "test_accuracy"}
_INTEGER = {"train_rows", "test_rows", "features_dim", "logits_dim", "input_size"}
_FORMATS = {"r2": ".4f", "cosine": ".4f", "mse": ".4g", "mse_total_seed": ".4g", "alpha": ".3g", "seconds": ".2f"}
_MODEL_COLUMNS = ("model", "family", "source", "architecture", "label_space", "test_accuracy",
                  "features_dim", "logits_dim", "input_size", "weights_digest")
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass(frozen=True)
class Section:
    """An extra part of the page from another stage; `html` is trusted markup made by this package, `note` plain text."""

    title: str
    figures: Sequence[go.Figure] = ()
    tables: Sequence[pd.DataFrame] = ()
    html: str = ""
    note: str = ""


def write_report(
    output_dir: str | os.PathLike[str],
    *,
    results: pd.DataFrame,
    models: pd.DataFrame,
    spec: Mapping[str, Any],
    provenance: Mapping[str, Any],
    sections: Sequence[Section] = (),
) -> Path:
    """Write output_dir/index.html (atomically) and return its path; plotly.js is inlined once, nothing is fetched."""
    _require(results, ("source", "target", *PAIR_METRICS), "results")
    _require(models, ("model", "family"), "models")
    known = set(models["model"].astype(str))
    unknown = sorted((set(results["source"].astype(str)) | set(results["target"].astype(str))) - known)
    if unknown:
        raise UserError(f"results: models {unknown} are not in the models table; allowed: {sorted(known)}")
    agreement = results.pivot_table(index="source", columns="target", values="agreement", aggfunc="mean")
    order = model_order(models, agreement if len(results) else None)
    title = str(spec.get("name") or "featrec_grid report")

    family = dict(zip(models["model"].astype(str), models["family"].fillna("unknown").astype(str), strict=True))
    ids = (f"figure-{i}" for i in itertools.count())
    heatmaps = "".join(_figure_div(heatmap_figure(results, metric, order, [family[m] for m in order]), next(ids))
                       for metric in PAIR_METRICS) if len(results) else "<p>No pair results.</p>"
    parts = [
        _header(title, results, order),
        _section("heatmaps", "Heatmaps", f'<div class="heatmaps">{heatmaps}</div>'),
        _section("models", "Models", _table(_models_table(models, order))),
        _section("pairs", "Pairs", _table(_pairs_table(results, order))),
    ]
    for i, extra in enumerate(sections):
        body = (f"<p>{escape(extra.note)}</p>" if extra.note else "") + extra.html
        body += "".join(_figure_div(f, next(ids)) for f in extra.figures)
        body += "".join(_table(t) for t in extra.tables)
        parts.append(_section(f"section-{i}", extra.title, body))
    parts.append(_section("spec", "Spec", f"<pre>{escape(_yaml(spec))}</pre>"))
    parts.append(_section("provenance", "Provenance", _table(_flatten(provenance))))
    page = _page(title, [("heatmaps", "Heatmaps"), ("models", "Models"), ("pairs", "Pairs"),
                         *((f"section-{i}", s.title) for i, s in enumerate(sections)),
                         ("spec", "Spec"), ("provenance", "Provenance")], "\n".join(parts))
    return _write_atomic(Path(output_dir) / "index.html", page)


def model_order(models: pd.DataFrame, agreement: pd.DataFrame | None = None) -> list[str]:
    """Model keys grouped by family; families, and models inside a family, ordered by average-linkage clustering
    on 1 - symmetrised agreement (agreement: square frame, index = source, columns = target; alphabetical when
    None). Deterministic and independent of the row order of both frames."""
    names = models["model"].astype(str)
    if names.duplicated().any():
        raise UserError(f"models: duplicate model keys {sorted(set(names[names.duplicated()]))}; allowed: one row each")
    families: dict[str, list[str]] = {}
    for name, family in sorted(zip(names, models["family"].fillna("unknown").astype(str), strict=True)):
        families.setdefault(family, []).append(name)
    groups = sorted(families)
    if agreement is None:
        return [name for group in groups for name in families[group]]
    dist = _distance(sorted(names), agreement)
    between = np.array([[np.mean(dist.loc[families[a], families[b]].to_numpy()) for b in groups] for a in groups])
    order: list[str] = []
    for g in _cluster_order(between):
        members = families[groups[g]]
        order += [members[i] for i in _cluster_order(dist.loc[members, members].to_numpy())]
    return order


def heatmap_figure(results: pd.DataFrame, metric: str, order: Sequence[str],
                   families: Sequence[str] | None = None) -> go.Figure:
    """N x N heatmap of one metric (rows = source A, columns = target B, in `order`), one trace per setting
    (method, fit and test data) with a menu to switch; exact values on hover, rounded ones in small grids;
    white lines between blocks of equal `families` (parallel to `order`)."""
    settings = _settings(results)
    common, names = _setting_names([key for key, _ in settings])
    matrices = {
        name: frame.assign(source=frame["source"].astype(str), target=frame["target"].astype(str))
        .pivot(index="source", columns="target", values=metric)
        for name, (_, frame) in zip(names, settings, strict=True)
    }
    return matrix_figure(matrices, order, metric=metric, subtitle=common, families=families)


def matrix_figure(matrices: Mapping[str, pd.DataFrame], order: Sequence[str], *, metric: str, subtitle: str = "",
                  families: Sequence[str] | None = None,
                  axes: tuple[str, str] = ("source A: logits used", "target B: features reconstructed"),
                  hover: tuple[str, str] = ("source A (logits)", "target B (features)")) -> go.Figure:
    """Square heatmaps of labelled matrices (index = rows, columns = columns, reindexed to `order`), one trace per
    entry of `matrices` with a menu to switch between them when there are several; `metric` keys METRICS."""
    title, colorscale, cell_format = METRICS[metric]
    labels = [plotly_text(m) for m in order]
    n = len(order)
    side, width, height = heatmap_size(order)
    axis = {"automargin": True, "constrain": "domain", "showgrid": False, "tickfont": {"size": 11 if n <= 20 else 9}}
    row_name, col_name = (plotly_text(a) for a in axes)
    row_hover, col_hover = (plotly_text(a) for a in hover)
    fig = go.Figure()
    for i, (name, table) in enumerate(matrices.items()):
        values = table.reindex(index=list(order), columns=list(order)).to_numpy(dtype=float, na_value=np.nan)
        lo, hi = _color_range(metric, values)
        fig.add_trace(go.Heatmap(
            z=[[None if math.isnan(v) else float(v) for v in row] for row in values],
            x=labels, y=labels, customdata=[["n/a" if math.isnan(v) else repr(float(v)) for v in row] for row in values],
            name=plotly_text(name), visible=i == 0, colorscale=colorscale, zmin=lo, zmax=hi, hoverongaps=False,
            hovertemplate=f"{row_hover}: %{{y}}<br>{col_hover}: %{{x}}<br>{title}: %{{customdata}}<extra></extra>",
            texttemplate=f"%{{z:{cell_format}}}" if n <= MAX_ANNOTATED else None,
            textfont={"size": 11 if n <= 6 else 9},
            colorbar={"thickness": 14, "lenmode": "pixels", "len": side, "y": 1, "yanchor": "top"},
        ))
    fig.update_layout(
        template="plotly_white", width=width, height=height, margin={"t": 100, "l": 10, "r": 10, "b": 10},
        title={"text": f"<b>{title}</b><br><span style='font-size:12px'>{plotly_text(subtitle)}</span>",
               "x": 0.02, "xanchor": "left", "y": 1.0, "yanchor": "top", "pad": {"t": 14}},
        xaxis={"type": "category", "title": {"text": col_name}, "tickangle": -40, "constraintoward": "left", **axis},
        yaxis={"type": "category", "title": {"text": row_name}, "autorange": "reversed",
               "scaleanchor": "x", "constraintoward": "top", **axis},
        shapes=[line for k in _block_starts(families or []) for line in _block_lines(k - 0.5, n)],
    )
    if len(matrices) > 1:
        buttons = [{"label": plotly_text(name), "method": "restyle",
                    "args": [{"visible": [j == i for j in range(len(matrices))]}]} for i, name in enumerate(matrices)]
        fig.update_layout(updatemenus=[{"buttons": buttons, "direction": "down", "showactive": True,
                                        "x": 0.0, "xanchor": "left", "y": 1.0, "yanchor": "bottom",
                                        "pad": {"b": 6}, "font": {"size": 11}}])
    return fig


def heatmap_size(order: Sequence[str]) -> tuple[int, int, int]:
    """(side of the square plot area, figure width, figure height) in pixels, from the number and length of labels."""
    n = len(order)
    side = min(760, max(200, 36 * n))
    label = min(260, 7 * max((len(str(m)) for m in order), default=0) + 10)  # about 7 px a character at 11 px
    return side, side + label + 100, side + int(0.65 * label) + 170  # x labels are turned by 40 degrees


def plotly_text(value: Any) -> str:
    """A user-given string made safe for Plotly text (titles, ticks, hover), which Plotly reads as pseudo-HTML."""
    return escape(str(value), quote=False)


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{what}: missing columns {missing}; present: {list(frame.columns)}")


def _distance(names: list[str], agreement: pd.DataFrame) -> pd.DataFrame:
    """1 - symmetrised agreement on `names` x `names`; a pair missing both ways counts as the maximum distance 1."""
    a = agreement.copy()
    a.index, a.columns = a.index.astype(str), a.columns.astype(str)
    m = a.reindex(index=names, columns=names).to_numpy(dtype=float, na_value=np.nan)
    both = np.stack([m, m.T])
    count = np.sum(~np.isnan(both), axis=0)
    sym = np.divide(np.nansum(both, axis=0), count, out=np.zeros_like(m), where=count > 0)
    d = np.clip(1.0 - sym, 0.0, None)
    np.fill_diagonal(d, 0.0)
    return pd.DataFrame(d, index=names, columns=names)


def _cluster_order(dist: np.ndarray) -> list[int]:
    """Leaf order of average-linkage clustering (optimal leaf ordering) of a symmetric distance matrix."""
    if len(dist) <= 2:
        return list(range(len(dist)))
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    condensed = squareform((dist + dist.T) / 2, checks=False)
    return [int(i) for i in leaves_list(linkage(condensed, method="average", optimal_ordering=True))]


def _settings(results: pd.DataFrame) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Split results into settings (setting label, mode, method, fit data, test data; alpha too if it separates
    duplicate pairs)."""
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
        return [({}, results)]
    return [(dict(zip(keys, key, strict=True)), frame) for key, frame in results.groupby(keys, sort=True, dropna=False)]


def _setting_names(keys: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """(what all settings share, what tells each apart), e.g. ("fit digits/train · test digits/test", ["ridge", "sgd"])."""
    if not keys:
        return "", []
    varying = {k for k in keys[0] if len({repr(key[k]) for key in keys}) > 1}
    for side in (("train_dataset", "train_split"), ("test_dataset", "test_split")):  # "fit digits/train" stays whole
        if varying & set(side):
            varying |= set(side) & set(keys[0])
    common = _setting_label({k: v for k, v in keys[0].items() if k not in varying})
    return common, [_setting_label({k: v for k, v in key.items() if k in varying}) for key in keys]


def _setting_label(key: Mapping[str, Any]) -> str:
    parts = [str(key[k]) for k in ("setting", "mode", "method") if k in key]
    if "train_dataset" in key or "train_split" in key:
        parts.append(f"fit {key.get('train_dataset', '*')}/{key.get('train_split', '*')}")
    if "test_dataset" in key or "test_split" in key:
        parts.append(f"test {key.get('test_dataset', '*')}/{key.get('test_split', '*')}")
    if "alpha" in key:
        parts.append(f"alpha={_cell('alpha', key['alpha'])[0]}")
    return " · ".join(parts)


def _block_starts(families: Sequence[str]) -> list[int]:
    return [k for k in range(1, len(families)) if families[k] != families[k - 1]]


def _block_lines(at: float, n: int) -> list[dict[str, Any]]:
    style = {"type": "line", "xref": "x", "yref": "y", "line": {"color": "white", "width": 3}}
    return [{**style, "x0": at, "x1": at, "y0": -0.5, "y1": n - 0.5}, {**style, "y0": at, "y1": at, "x0": -0.5, "x1": n - 0.5}]


def _color_range(metric: str, values: np.ndarray) -> tuple[float | None, float | None]:
    if metric in ("agreement", "cka"):
        return 0.0, 1.0
    if metric == "r2" and not np.isnan(values).all():
        return max(-1.0, min(0.0, float(np.nanmin(values)))), 1.0
    return None, None


def _models_table(models: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    columns = [c for c in _MODEL_COLUMNS if c in models.columns]
    columns += [c for c in models.columns if c not in columns]
    return models.assign(model=models["model"].astype(str)).set_index("model").loc[order].reset_index()[columns]


def _pairs_table(results: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(order)}
    keys = [c for c in SETTING_COLUMNS if c in results.columns]
    frame = results.assign(_s=results["source"].astype(str).map(rank), _t=results["target"].astype(str).map(rank))
    return frame.sort_values([*keys, "_s", "_t"], kind="stable").drop(columns=["_s", "_t"])


def _cell(column: str, value: Any) -> tuple[str, str, str]:
    """(display text, sort key, exact value for the tooltip) of one table cell."""
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
        return text, text, ""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–", "", ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), str(int(value)), ""
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}", str(int(value)), ""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if column in _INTEGER and v.is_integer():
            text = f"{int(v):,}"
        elif column in _PERCENT:
            text = f"{v:.2%}"
        else:
            text = format(v, _FORMATS.get(column, ".4g"))
        return text, repr(v), repr(v)
    text = str(value)
    if column == "weights_digest" and len(text) > 12:
        return text[:12] + "…", text, text
    return text, text, ""


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in frame.columns)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    rows = []
    for record in frame.itertuples(index=False, name=None):
        cells = []
        for column, value, right in zip(frame.columns, record, numeric, strict=True):
            text, key, exact = _cell(str(column), value)
            align = ' class="num"' if right else ""
            tip = f' title="{escape(exact)}"' if exact else ""
            cells.append(f'<td{align} data-v="{escape(key)}"{tip}>{escape(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="table-wrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _flatten(mapping: Mapping[str, Any]) -> pd.DataFrame:
    """Nested provenance dict -> two-column frame of dotted keys and values."""
    rows: list[tuple[str, Any]] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            rows.append((key, ", ".join(str(v) for v in value)))
        else:
            rows.append((key, None if value is None else str(value)))

    walk(mapping, "")
    return pd.DataFrame(rows, columns=["key", "value"])


def _yaml(spec: Mapping[str, Any]) -> str:
    import yaml

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set)):
            return [plain(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)

    return yaml.safe_dump(plain(spec), sort_keys=False, allow_unicode=True, default_flow_style=False)


def _script(code: str) -> str:
    """An inline <script>; refuses code that could end the element early or confuse the HTML parser."""
    if re.search(r"</script|<!--", code, flags=re.IGNORECASE):
        raise ValueError("inline script contains '</script' or '<!--'")
    return f"<script>{code}</script>"


def _json_for_script(text: str) -> str:
    """JSON text with <, >, &, U+2028/9 as \\u escapes: same value, and it cannot close or comment out a <script>."""
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _figure_div(fig: go.Figure, div_id: str) -> str:
    payload = _json_for_script(fig.to_json())
    config = json.dumps(_PLOTLY_CONFIG)
    return (f'<div id="{div_id}" class="figure"></div>\n'
            + _script(f'(function(){{var f={payload};Plotly.newPlot("{div_id}",f.data,f.layout,{config});}})();'))


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def _header(title: str, results: pd.DataFrame, order: list[str]) -> str:
    settings = len(_settings(results)) if len(results) else 0
    return f"""<header><h1>{escape(title)}</h1>
<p class="summary">{len(order)} models · {len(results)} ordered pairs · {settings} setting(s)</p></header>
<section id="about"><h2>What the numbers mean</h2>
<p>For every ordered pair (A, B) a linear map is fitted from model A's logits to model B's penultimate features
on the fit data. On the test data, B's own classification head is applied to the reconstructed features.</p>
<ul>
<li><b>Agreement</b>: the fraction of test images on which B's head picks the same class from the reconstructed
features as from B's real features. 100% means A's logits carry everything B's head needs.</li>
<li><b>R²</b>: the fraction of the variance of B's features that the reconstruction explains (1 is perfect,
0 is no better than B's mean feature vector, negative is worse).</li>
<li><b>MSE</b>: the mean squared error between reconstructed and real features, per element, in B's feature
units; compare it within a column (one target), not across columns.</li>
</ul>
<p>Rows are the source A (whose logits are used), columns the target B (whose features are reconstructed).
The diagonal is self-reconstruction, where agreement should be 100% up to regularisation and float effects.
Models are grouped by family and ordered by hierarchical clustering of agreement. Hover a cell for the exact
value; with several methods or data settings, the menu above each heatmap switches between them.</p>
</section>"""


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
nav{position:sticky;top:0;z-index:10;background:#1d2330;padding:.5rem 1.5rem}
nav a{color:#dfe6f0;margin-right:1.2rem;text-decoration:none;font-size:.95rem}
main{max-width:1320px;margin:0 auto;padding:0 1.5rem 3rem}
h1{margin:1.2rem 0 .2rem}.summary{color:#5a6475;margin-top:0}
section{margin-top:2rem}h2{border-bottom:1px solid #d8dde6;padding-bottom:.3rem}
.figure{background:#fff;border:1px solid #e3e7ee;border-radius:6px;margin:1rem 0;min-width:0}
.heatmaps{display:flex;flex-wrap:wrap;gap:0 .75rem}.heatmaps .figure{max-width:100%;overflow-x:auto}
.table-wrap{max-height:34rem;overflow:auto;border:1px solid #e3e7ee;border-radius:6px;background:#fff;margin:1rem 0}
table{border-collapse:collapse;font-size:.85rem;width:100%}
th{position:sticky;top:0;background:#eef1f6;text-align:left;padding:.35rem .6rem;cursor:pointer;white-space:nowrap}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td{padding:.3rem .6rem;border-top:1px solid #eef0f4;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#f7f9fb}
pre{background:#fff;border:1px solid #e3e7ee;border-radius:6px;padding:1rem;overflow:auto;font-size:.85rem}
"""

_SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var asc = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var nx = Number(x), ny = Number(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _page(title: str, nav: list[tuple[str, str]], body: str) -> str:
    from plotly.offline import get_plotlyjs

    links = "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in nav)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{_CSS}</style>
{_script("window.PlotlyConfig = {MathJaxConfig: 'local'};")}
{_script(get_plotlyjs())}
</head><body><nav>{links}</nav><main>
{body}
</main>{_script(_SORT_JS)}</body></html>
"""


def _write_atomic(path: Path, text: str) -> Path:
    write_atomic(path, text.encode("utf-8"))  # the package's one writer (store.py): umask-respecting permissions
    return path
