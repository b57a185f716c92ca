"""Results tables -> one self-contained, offline HTML page: linked heatmaps with intervals, a per-pair drill-down,
difference views, tables with filters and CSV, embedded downloads, and the extra sections other stages add.

Every user-given string is escaped: in HTML with html.escape, in Plotly text (which Plotly renders as its own
pseudo-HTML) the same way, and JSON inside <script> has <, > and & as \\u escapes so it cannot close the tag.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .errors import UserError
from .figures import (
    PAIR_METRICS,
    Selection,
    difference_payload,
    fmt,
    interval_text,
    is_self_only,
    metric_format,
    pair_heatmap,
    plotly_text,
    selections,
    self_bars,
)
from .report_js import CSS, JS
from .store import write_atomic

__all__ = ["Download", "Section", "model_order", "plotly_text", "table_html", "write_report"]

_INTEGER = {"train_rows", "test_rows", "features_dim", "logits_dim", "input_size", "resamples", "classes",
            "feature_dim", "head_rank", "null_dims", "rows"}  # fmt: skip
_MODEL_COLUMNS = ("model", "family", "source", "architecture", "label_space", "test_accuracy",
                  "features_dim", "logits_dim", "input_size", "weights_digest")
_PAIR_FIRST = ("setting", "mode", "method", "source", "target")
_PAIR_HIDDEN = ("detail", "alpha_scores", "versions")  # drill-down data, shown in the panel and in provenance
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
MAX_DOWNLOAD_BYTES = 4_000_000  # a file bigger than this stays in the output folder only (the page says so)


@dataclass(frozen=True)
class Section:
    """An extra part of the page from another stage; `html` is trusted markup made by this package, `note` plain text.
    `controls` is trusted markup shown above the figures (a local menu)."""

    title: str
    figures: Sequence[go.Figure] = ()
    tables: Sequence[pd.DataFrame] = ()
    html: str = ""
    note: str = ""
    controls: str = ""
    columns: int = 1  # figures side by side


@dataclass(frozen=True)
class Download:
    """A file embedded in the page as a data: URI (`data` None: too big, listed as left in the output folder)."""

    name: str
    data: bytes | None
    size: int = 0
    mime: str = "application/octet-stream"


@dataclass
class _Ids:
    count: int = 0

    def __call__(self) -> str:
        self.count += 1
        return f"figure-{self.count - 1}"


@dataclass
class _Page:
    ids: _Ids = field(default_factory=_Ids)
    nav: list[tuple[str, str]] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)

    def section(self, anchor: str, title: str, body: str, *, collapsed: bool = False) -> None:
        self.nav.append((anchor, title))
        if collapsed:
            body = f"<details><summary>Show {escape(title.lower())}</summary>\n{body}\n</details>"
        self.parts.append(f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{body}\n</section>')


def write_report(
    output_dir: str | os.PathLike[str],
    *,
    results: pd.DataFrame,
    models: pd.DataFrame,
    spec: Mapping[str, Any],
    provenance: Mapping[str, Any],
    sections: Sequence[Section] = (),
    thumbnails: Mapping[str, str] | None = None,
    downloads: Sequence[Download] = (),
    headline: Sequence[str] = (),
) -> Path:
    """Write output_dir/index.html (atomically) and return its path; plotly.js is inlined once, nothing is fetched.
    `results` may carry a `detail` column (dicts from pairs.evaluate) for the drill-down and difference intervals;
    `thumbnails` maps '<test_dataset>:<row id>' to PNG data URIs of the images the drill-down shows."""
    _require(results, ("source", "target", *PAIR_METRICS), "results")
    _require(models, ("model", "family"), "models")
    known = set(models["model"].astype(str))
    unknown = sorted((set(results["source"].astype(str)) | set(results["target"].astype(str))) - known)
    if unknown:
        raise UserError(f"results: models {unknown} are not in the models table; allowed: {sorted(known)}")
    title = str(spec.get("name") or "featrec_grid report")
    page = _Page()
    data: dict[str, Any] = {"selections": [], "order": [], "details": [], "thumbs": {}, "diff": None}
    selector = ""
    if len(results):
        agreement = results.pivot_table(index="source", columns="target", values="agreement", aggfunc="mean")
        order = model_order(models, agreement)
        common, selected = selections(results)
        data["selections"] = [{"label": s.label, "fields": s.fields} for s in selected]
        data["order"] = order
        data["details"] = [_details(s, thumbnails or {}) for s in selected]
        data["thumbs"] = dict(thumbnails or {})
        selector = _selector(selected)
        _grid_sections(page, results, models, spec, order, common, selected, data)
    for i, extra in enumerate(sections):
        page.section(f"section-{i}", extra.title, _extra(extra, page.ids))
    if downloads:
        page.section("downloads", "Downloads", _downloads(downloads))
    page.section("spec", "Spec", f"<pre>{escape(_yaml(spec))}</pre>", collapsed=True)
    page.section("provenance", "Provenance", table_html(_flatten(provenance), "provenance", fold=False),
                 collapsed=True)  # fmt: skip
    header = _header(title, results, models, headline)
    html = _page(title, page.nav, selector, header + "\n".join(page.parts), data)
    return _write_atomic(Path(output_dir) / "index.html", html)


def _grid_sections(page: _Page, results: pd.DataFrame, models: pd.DataFrame, spec: Mapping[str, Any],
                   order: list[str], common: str, selected: list[Selection], data: dict[str, Any]) -> None:  # fmt: skip
    """Heatmaps (or bars for self pairs), the drill-down panel, differences, the models and pairs tables."""
    family = dict(zip(models["model"].astype(str), models["family"].fillna("unknown").astype(str), strict=True))
    families = [family[m] for m in order]
    if is_self_only(results):
        figures = [self_bars(selected, m, order, common) for m in PAIR_METRICS]
        body = "".join(_figure_div(f, page.ids(), "linked pair-bars") for f in figures)
        note = ("Every pair is a self pair (<code>pairs: self</code>): bars show each model's own logits -> own features, "
                "with the bootstrap interval as whiskers. Click a bar for its drill-down below.")
    else:
        figures = [pair_heatmap(selected, m, order, families, common) for m in PAIR_METRICS]
        body = "".join(_figure_div(f, page.ids(), "linked pair-heatmap") for f in figures)
        note = ("Rows: source A, whose logits are used; columns: target B, whose features are reconstructed. A small "
                "white dot marks a cell whose confidence interval overlaps the interval of its row's self pair or of "
                "its row's best cell: there the difference may be noise. MSE is divided by each column's lowest MSE "
                "(1 = the best source for that target; raw MSE on hover). Click a cell for its drill-down below.")
    panel = '<div id="drilldown"><p class="empty">Click a cell (or bar) to see that pair here.</p></div>'
    page.section("heatmaps", "Heatmaps", f'<p class="note">{note}</p><div class="grid">{body}</div>{panel}')
    if len(selected) > 1:
        data["diff"] = difference_payload(selected, order, _replicates)
        page.section("differences", "Differences between selections", _difference_controls(selected))
    spec_order = _spec_order(spec, models)
    page.section("models", "Models", table_html(_models_table(models, spec_order), "models", pinned=1))
    page.section("pairs", "Pairs", table_html(_pairs_table(results, spec_order), "pairs", pinned=5))


def _replicates(detail: Any, metric: str) -> np.ndarray | None:
    from .pairs import decode_replicates

    text = (detail or {}).get("replicates", {}).get(metric) if isinstance(detail, Mapping) else None
    return decode_replicates(text) if text else None


def _selector(selected: list[Selection]) -> str:
    if len(selected) < 2:
        return f'<span class="selector">{escape(selected[0].label)}</span>' if selected else ""
    options = "".join(f'<option value="{i}">{escape(s.label)}</option>' for i, s in enumerate(selected))
    return f'<label class="selector">Showing <select id="selection">{options}</select></label>'


def _difference_controls(selected: list[Selection]) -> str:
    def menu(ident: str, chosen: int) -> str:
        options = "".join(f'<option value="{i}"{" selected" if i == chosen else ""}>{escape(s.label)}</option>'
                          for i, s in enumerate(selected))  # fmt: skip
        return f'<select id="{ident}">{options}</select>'

    metrics = "".join(f'<option value="{m}">{escape(m)}</option>' for m in PAIR_METRICS)
    return (f'<p class="note">The difference of one metric between two selections, per pair. Its interval comes from '
            f"the same bootstrap resamples of the test rows for both (no refit), so a dot (interval excludes zero) "
            f"marks a difference that is unlikely to be noise.</p>"
            f'<div class="controls"><label>X {menu("diff-x", 0)}</label><label>minus Y {menu("diff-y", 1)}</label>'
            f'<label>metric <select id="diff-metric">{metrics}</select></label></div>'
            f'<p id="diff-summary" class="caption"></p><div id="diff-figure" class="figure"></div>')  # fmt: skip


def _details(sel: Selection, thumbnails: Mapping[str, str]) -> dict[str, Any]:
    """The drill-down data of every pair of one selection, keyed 'source|target' (numbers pre-formatted)."""
    out = {}
    for row in sel.frame.to_dict("records"):
        detail = row.get("detail") if isinstance(row.get("detail"), Mapping) else {}
        nums = []
        for metric in ("agreement", "r2", "mse", "cosine", "accuracy_real", "accuracy_recon"):
            if metric in row and not _missing(row[metric]):
                nums.append([metric, interval_text(metric, row[metric], row.get(f"{metric}_lo"),
                                                   row.get(f"{metric}_hi"), row.get("ci"))])  # fmt: skip
        for column in ("alpha", "train_rows", "test_rows", "ridge_form", "method"):
            if column in row and not _missing(row[column]):
                nums.append([column, _cell(column, row[column])[0]])
        scores = _alpha_scores(row.get("alpha_scores"))
        alpha = {"x": [fmt("alpha", a) for a in scores], "y": list(scores.values()),
                 "chosen": fmt("alpha", row.get("alpha"))}  # fmt: skip
        dataset = row.get("test_dataset", "")
        disagree = [{**d, "thumb": f"{dataset}:{d['row']}"} for d in detail.get("disagree", [])]
        missing = sum(1 for d in disagree if d["thumb"] not in thumbnails)
        note = f"{missing} image(s) not embedded (the dataset could not be read here)." if missing and disagree else ""
        out[f"{row['source']}|{row['target']}"] = {
            "nums": nums, "alpha": alpha, "classes": detail.get("classes"), "pca": detail.get("pca"),
            "dim_r2": detail.get("dim_r2"), "disagree": disagree, "thumb_note": note,
        }  # fmt: skip
    return out


def _alpha_scores(value: Any) -> dict[float, float]:
    if isinstance(value, str):
        value = json.loads(value or "{}")
    if not isinstance(value, Mapping):
        return {}
    pairs = sorted((float(k), float(v)) for k, v in value.items() if v is not None)
    return dict(pairs)


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, (str, Mapping, list)) and bool(pd.isna(value)))


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{what}: missing columns {missing}; present: {list(frame.columns)}")


def _spec_order(spec: Mapping[str, Any], models: pd.DataFrame) -> list[str]:
    """Model keys in the spec's order (tables keep it), then any others in the models table's order."""
    names = [str(m) for m in models["model"]]
    listed = spec.get("models")
    keys = [str(k) for k in listed] if isinstance(listed, Mapping) else []
    return [k for k in keys if k in names] + [n for n in names if n not in keys]


def _models_table(models: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    columns = [c for c in _MODEL_COLUMNS if c in models.columns]
    columns += [c for c in models.columns if c not in columns]
    return models.assign(model=models["model"].astype(str)).set_index("model").loc[order].reset_index()[columns]


def _pairs_table(results: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Pairs in spec order (selection keys, then source and target as the spec lists the models)."""
    rank = {m: i for i, m in enumerate(order)}
    keys = [c for c in ("setting", "mode", "method") if c in results.columns]
    frame = results.assign(_s=results["source"].astype(str).map(rank), _t=results["target"].astype(str).map(rank))
    frame = frame.sort_values([*keys, "_s", "_t"], kind="stable").drop(columns=["_s", "_t"])
    first = [c for c in _PAIR_FIRST if c in frame.columns]
    rest = [c for c in frame.columns if c not in first and c not in _PAIR_HIDDEN]
    return frame[first + rest]


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


def _cell(column: str, value: Any) -> tuple[str, str, str]:
    """(display text, exact value for sorting and CSV, tooltip) of one table cell."""
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
        return text, text, ""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–", "", ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), str(bool(value)).lower(), ""
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}", str(int(value)), ""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if column in _INTEGER and v.is_integer():
            return f"{int(v):,}", str(int(v)), ""
        return format(v, metric_format(column)), repr(v), repr(v)
    text = str(value)
    if column == "weights_digest" and len(text) > 12:
        return text[:12] + "…", text, text
    return text, text, ""


def table_html(frame: pd.DataFrame, name: str, *, pinned: int = 0, fold: bool = True) -> str:
    """A sortable table with a filter box, Copy CSV and CSV download (of the rows shown), the first `pinned`
    columns kept in view when scrolling sideways, and columns constant over 2+ rows folded into a caption."""
    caption = ""
    if fold and len(frame) > 1:
        constant = [c for c in frame.columns if len({_cell(str(c), v)[1] for v in frame[c]}) == 1]
        keep = [c for c in frame.columns if c not in constant]
        if constant and keep:
            same = "; ".join(f"{c} = {_cell(str(c), frame[c].iloc[0])[0]}" for c in constant)
            caption = f'<p class="caption">Same in every row: {escape(same)}</p>'
            pinned = max(0, pinned - sum(1 for c in frame.columns[:pinned] if c in constant))
            frame = frame[keep]
    head = "".join(f'<th data-name="{escape(str(c))}">{escape(str(c))}</th>' for c in frame.columns)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]  # fmt: skip
    rows = []
    for record in frame.itertuples(index=False, name=None):
        cells = []
        for column, value, right in zip(frame.columns, record, numeric, strict=True):
            text, key, exact = _cell(str(column), value)
            align = ' class="num"' if right else ""
            tip = f' title="{escape(exact)}"' if exact else ""
            cells.append(f'<td{align} data-v="{escape(key)}"{tip}>{escape(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    tools = (f'<div class="table-tools"><input class="filter" type="search" placeholder="Filter rows" '
             f'aria-label="Filter {escape(name)} rows"><button class="copy" type="button">Copy CSV</button>'
             f'<a class="save" href="#" download="{escape(name)}.csv">Download CSV</a>'
             f'<span class="caption">{len(frame):,} rows</span></div>')  # fmt: skip
    return (f'<div class="table-block" data-table="{escape(name)}">{tools}{caption}<div class="table-wrap">'
            f'<table class="sortable" data-pinned="{pinned}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div></div>")


def _extra(extra: Section, ids: _Ids) -> str:
    body = (f'<p class="note">{escape(extra.note)}</p>' if extra.note else "") + extra.controls
    figures = [_figure_div(f, ids(), _linked(f)) for f in extra.figures]
    if extra.columns > 1 and figures:
        body += f'<div class="grid2">{"".join(figures)}</div>'
    else:
        body += "".join(figures)
    body += extra.html
    body += "".join(table_html(t, f"{_slug(extra.title)}-{k}") for k, t in enumerate(extra.tables))
    return body


def _linked(fig: go.Figure) -> str:
    return "linked" if any(getattr(t, "meta", None) for t in fig.data) else ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "table"


def _downloads(downloads: Sequence[Download]) -> str:
    links, left = [], []
    for d in downloads:
        if d.data is None:
            left.append(f"{d.name} ({_size(d.size)})")
            continue
        uri = f"data:{d.mime};base64,{base64.b64encode(d.data).decode('ascii')}"
        links.append(f'<a download="{escape(d.name)}" href="{uri}">{escape(d.name)}</a> ({_size(len(d.data))})')
    note = ('<p class="note">The output folder\'s tables, embedded in this page (it stays one offline file). '
            "Every table above also has Copy CSV and Download CSV of the rows it shows.</p>")
    rest = f'<p class="caption">Too big to embed, in the output folder: {escape(", ".join(left))}</p>' if left else ""
    return note + f'<p class="downloads">{" ".join(links)}</p>' + rest


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{max(1, round(n / 1e3))} kB"


def _header(title: str, results: pd.DataFrame, models: pd.DataFrame, headline: Sequence[str]) -> str:
    selected = len(selections(results)[1]) if len(results) else 0
    lines = "".join(f"<li>{escape(line)}</li>" for line in headline)
    box = f'<ul class="headline">{lines}</ul>' if lines else ""
    about = "" if not len(results) else """
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
<li><b>Intervals</b>: every metric carries a percentile bootstrap confidence interval over the test images (the
same resampled images for every pair; no refit). Two cells whose intervals overlap may differ by chance alone;
the difference view gives the interval of a difference itself, which is narrower because both pairs see the same
images.</li>
</ul>
<p>The diagonal is self-reconstruction, where agreement should be 100% up to regularisation and float effects.
Models are grouped by family and ordered by hierarchical clustering of agreement (tables keep the spec's order).
The selector in the top bar switches every heatmap and scatter between settings, modes and methods.</p>
</section>"""
    count = f"{len(models)} models · {len(results)} ordered pairs · {selected} selection(s)" if len(results) else ""
    return f"""<header><h1>{escape(title)}</h1>
<p class="summary">{escape(count)}</p>{box}</header>{about}"""


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


def _figure_div(fig: go.Figure, div_id: str, classes: str = "") -> str:
    payload = _json_for_script(fig.to_json())
    config = json.dumps(_PLOTLY_CONFIG)
    return (f'<div id="{div_id}" class="{" ".join(["figure", *classes.split()])}"></div>\n'
            + _script(f'(function(){{var f={payload};Plotly.newPlot("{div_id}",f.data,f.layout,{config});}})();'))


def _page(title: str, nav: list[tuple[str, str]], selector: str, body: str, data: Mapping[str, Any]) -> str:
    from plotly.offline import get_plotlyjs

    links = "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in nav)
    payload = _json_for_script(json.dumps(_finite(data), default=_json_default, allow_nan=False))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style>
{_script("window.PlotlyConfig = {MathJaxConfig: 'local'};")}
{_script(get_plotlyjs())}
</head><body><nav>{links}{selector}</nav><main>
{body}
</main>
<script id="report-data" type="application/json">{payload}</script>
{_script(JS)}</body></html>
"""


def _finite(value: Any) -> Any:
    """JSON-ready copy with NaN and infinities as None (JSON.parse rejects them)."""
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")



def _write_atomic(path: Path, text: str) -> Path:
    write_atomic(path, text.encode("utf-8"))  # the package's one writer (store.py): umask-respecting permissions
    return path
