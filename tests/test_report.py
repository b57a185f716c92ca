"""The HTML report: model order, heatmap data, self-contained and escaped page, and a real headless Chromium."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from browser import inspect_html, open_page, require_chromium

from featrec_grid.errors import UserError
from featrec_grid.figures import fmt, overlap_marks, pair_heatmap, selections
from featrec_grid.pairs import encode_replicates
from featrec_grid.report import Section, model_order, write_report

XSS_MODEL = "<script>alert(1)</script>"
XSS_DATASET = "<img src=x onerror=alert(2)>"
XSS_SPEC = "</script><script>alert(3)</script>"
KEYS = ["resnet18", "convnext_t", "vit_s16", "deit_s", "mlp_mixer"]
FAMILIES = ["cnn", "cnn", "vit", "vit", "mlp"]


def make_frames(keys=KEYS, families=FAMILIES, methods=("ridge", "sgd"), test_dataset="digits", seed=0):
    """Synthetic results (one row per ordered pair and method) and models tables shaped like the real ones."""
    rng = np.random.default_rng(seed)
    rows = []
    for method in methods:
        for a, fa in zip(keys, families, strict=True):
            for b, fb in zip(keys, families, strict=True):
                base = 1.0 if a == b else 0.85 if fa == fb else 0.5
                agreement = float(np.clip(base - (0.01 if method == "sgd" else 0) + rng.normal(0, 0.03) * (a != b), 0, 1))
                rows.append({
                    "source": a, "target": b, "train_dataset": "digits", "train_split": "train",
                    "test_dataset": test_dataset, "test_split": "test", "method": method,
                    "alpha": 1e-3 if method == "ridge" else np.nan, "train_rows": 1257, "test_rows": 540,
                    "mse": float(abs(rng.normal(0.4, 0.2))), "mse_total_seed": float(abs(rng.normal(50, 10))),
                    "r2": agreement - 0.1 + float(rng.normal(0, 0.02)), "agreement": agreement,
                    "cosine": agreement * 0.98, "accuracy_real": 0.97, "accuracy_recon": agreement * 0.97,
                    "seconds": float(rng.uniform(0.01, 0.5)),
                })
    results = pd.DataFrame(rows)
    spread = np.where(results["source"] == results["target"], 0.0, 0.02)
    for metric in ("agreement", "r2", "mse"):
        results[f"{metric}_lo"] = results[metric] - spread
        results[f"{metric}_hi"] = results[metric] + spread
    results["ci"] = 0.95
    details = []
    for k, row in results.iterrows():  # replicates around the value, from one shared draw (as pairs.evaluate does)
        noise = np.random.default_rng(k).normal(0, 0.01, 200)
        details.append({"replicates": {m: encode_replicates(row[m] + noise) for m in ("agreement", "r2", "mse")},
                        "classes": {"class": [0, 1], "rows": [5, 4], "agreement": [1.0, 0.5]},
                        "dim_r2": {"dims": 3, "rank_fraction": [0.2, 0.5, 0.8], "r2": [0.9, 0.5, 0.1]},
                        "pca": {"rows": 2, "variance_share": [0.6, 0.3], "real": [[0, 1], [1, 0]],
                                "recon": [[0.1, 0.9], [0.9, 0.1]]},
                        "disagree": [{"row": 7, "real": 1, "recon": 2, "label": 1}]})
    results["detail"] = details
    results["alpha_scores"] = [{"0.001": 0.5, "1.0": 0.7}] * len(results)
    for column in ("accuracy_real", "accuracy_recon"):
        results[column] = results[column].astype("Float64")
    results.loc[results.index[-1], "accuracy_recon"] = pd.NA
    n = len(keys)
    models = pd.DataFrame({
        "model": keys, "source": "zoo", "architecture": [k.split("_")[0] for k in keys], "family": families,
        "features_dim": rng.integers(32, 768, n), "logits_dim": 10, "label_space": "digits",
        "test_accuracy": pd.array([0.97, None, *[0.95] * (n - 2)], dtype="Float64"),
        "weights_digest": [f"{i:064x}" for i in range(n)], "input_size": 32,
    })
    return results, models


def write(tmp_path, results, models, **kwargs):
    spec = kwargs.pop("spec", {"name": "digits-zoo", "models": [{"key": k} for k in models["model"]]})
    provenance = kwargs.pop("provenance", {"versions": {"plotly": "7.1"}, "timings": {"pairs_s": 1.5}})
    return write_report(tmp_path, results=results, models=models, spec=spec, provenance=provenance, **kwargs)


def agreement_frame(names, values):
    return pd.DataFrame(values, index=names, columns=names)


# ---------------------------------------------------------------- model order

def test_model_order_groups_families_and_clusters_inside_and_between():
    # family A: {a1, a3} and {a2, a4} are two tight pairs; families A and C agree, B agrees with nobody.
    names = ["a1", "a2", "a3", "a4", "b1", "b2", "c1"]
    family = {"a1": "A", "a2": "A", "a3": "A", "a4": "A", "b1": "B", "b2": "B", "c1": "C"}
    tight = {frozenset(p) for p in [("a1", "a3"), ("a2", "a4"), ("b1", "b2")]}
    m = np.zeros((7, 7))
    for i, x in enumerate(names):
        for j, y in enumerate(names):
            pair = {family[x], family[y]}
            m[i, j] = (1.0 if x == y else 0.95 if frozenset((x, y)) in tight else 0.6 if pair == {"A"}
                       else 0.7 if pair == {"A", "C"} else 0.1)
    m[0, 2], m[2, 0] = 0.9, 1.0  # asymmetric: the symmetrised value 0.95 still makes a1, a3 the tightest pair
    models = pd.DataFrame({"model": names, "family": [family[n] for n in names]})
    order = model_order(models, agreement_frame(names, m))

    assert sorted(order) == names
    blocks = [family[n] for n in order]
    assert [f for k, f in enumerate(blocks) if k == 0 or blocks[k - 1] != f] in (["A", "C", "B"], ["B", "A", "C"],
                                                                                    ["C", "A", "B"], ["B", "C", "A"])
    pos = {n: i for i, n in enumerate(order)}
    assert abs(pos["a1"] - pos["a3"]) == 1 and abs(pos["a2"] - pos["a4"]) == 1


def test_model_order_is_deterministic_and_ignores_row_order():
    results, models = make_frames()
    agreement = results[results.method == "ridge"].pivot(index="source", columns="target", values="agreement")
    expected = model_order(models, agreement)
    rng = np.random.default_rng(1)
    for _ in range(5):
        shuffled = models.iloc[rng.permutation(len(models))]
        perm = rng.permutation(len(agreement))
        assert model_order(shuffled, agreement.iloc[perm, perm[::-1]]) == expected
    assert [m for m in expected if m.startswith(("vit", "deit"))] in (["vit_s16", "deit_s"], ["deit_s", "vit_s16"])
    pos = {n: i for i, n in enumerate(expected)}
    assert abs(pos["vit_s16"] - pos["deit_s"]) == 1 and abs(pos["resnet18"] - pos["convnext_t"]) == 1


def test_model_order_without_agreement_is_alphabetical_by_family_then_key():
    models = pd.DataFrame({"model": ["z", "b", "a", "c"], "family": ["f2", "f1", "f2", None]})
    assert model_order(models) == ["b", "a", "z", "c"]  # f1, f2, then the missing family ("unknown")


def test_model_order_rejects_duplicate_keys():
    with pytest.raises(UserError, match="duplicate model keys"):
        model_order(pd.DataFrame({"model": ["a", "a"], "family": ["f", "f"]}))


# ---------------------------------------------------------------- heatmap data

def heatmap_figure(results, metric, order, families=None):
    common, selected = selections(results)
    return pair_heatmap(selected, metric, order, families, common)


def heat_traces(fig):
    return [t for t in fig.data if t.type == "heatmap"]


@pytest.mark.parametrize("metric", ["agreement", "r2", "mse"])
def test_heatmap_values_equal_the_results_table(metric):
    keys = [*KEYS, XSS_MODEL]
    results, _ = make_frames(keys, [*FAMILIES, "mlp"])
    dropped = results[(results.source == "deit_s") & (results.target == "vit_s16") & (results.method == "sgd")].index
    results = results.drop(index=dropped)
    order = list(reversed(keys))
    fig = heatmap_figure(results, metric, order)

    traces = heat_traces(fig)
    assert [t.name for t in traces] == ["ridge", "sgd"]
    assert [t.visible for t in traces] == [True, False]
    assert [t.meta["sel"]["method"] for t in traces] == ["ridge", "sgd"]  # the shared selector's fields
    assert list(fig.layout.xaxis.ticktext) == [k.replace("<", "&lt;").replace(">", "&gt;") for k in order]
    for trace, method in zip(traces, ["ridge", "sgd"], strict=True):
        sub = results[results.method == method]
        for i, a in enumerate(order):
            for j, b in enumerate(order):
                row = sub[(sub.source == a) & (sub.target == b)]
                if row.empty:
                    assert trace.z[i][j] is None and trace.customdata[i][j][2] == "not run"
                    continue
                value = float(row[metric].iloc[0])
                lo, hi = float(row[f"{metric}_lo"].iloc[0]), float(row[f"{metric}_hi"].iloc[0])
                if metric == "mse":  # colour: log10 of the MSE over the column's lowest MSE
                    best = sub[sub.target == b]["mse"].min()
                    assert trace.z[i][j] == pytest.approx(np.log10(value / best))
                    assert trace.text[i][j] == format(value / best, ".2f")
                else:
                    assert trace.z[i][j] == value and trace.text[i][j] == fmt(metric, value)
                hover = trace.customdata[i][j][2]
                assert f"{fmt(metric, value)} (95% CI {fmt(metric, lo)}–{fmt(metric, hi)})" in hover
                assert trace.customdata[i][j][:2] == [a.replace("<", "&lt;").replace(">", "&gt;"),
                                                      b.replace("<", "&lt;").replace(">", "&gt;")]  # fmt: skip


def test_overlap_marks_against_a_direct_rule():
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, (6, 6))
    lo, hi = values - rng.uniform(0, 0.2, (6, 6)), values + rng.uniform(0, 0.2, (6, 6))
    marks = overlap_marks(values, lo, hi, higher_better=True)
    for i in range(6):
        best = int(np.argmax(values[i]))
        for j in range(6):
            overlaps = [lo[i, j] <= hi[i, r] and lo[i, r] <= hi[i, j] for r in (i, best)]
            assert marks[i, j] == (j not in (i, best) and any(overlaps))


def test_heatmap_large_grid_has_no_cell_text_and_settings_split_by_dataset():
    keys = [f"m{i:02d}" for i in range(13)]
    ridge, _ = make_frames(keys, ["f"] * 13, methods=("ridge",))
    other, _ = make_frames(keys, ["f"] * 13, methods=("ridge",), test_dataset=XSS_DATASET)
    fig = heatmap_figure(pd.concat([ridge, other]), "agreement", keys)
    assert len(heat_traces(fig)) == 2 and all(t.texttemplate is None for t in heat_traces(fig))
    labels = [t.name for t in heat_traces(fig)]
    assert labels == ["test &lt;img src=x onerror=alert(2)&gt;/test", "test digits/test"]
    assert "<img" not in fig.layout.title.text and "fit digits/train" in fig.layout.title.text


# ---------------------------------------------------------------- the page

def figure_payloads(page: str) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"var f=(\{.*?\});Plotly\.newPlot", page)]


def test_page_is_self_contained_escaped_and_embeds_the_same_data(tmp_path):
    results, models = make_frames([*KEYS[:4], XSS_MODEL], FAMILIES)
    results["test_dataset"] = XSS_DATASET
    path = write(tmp_path, results, models, spec={"name": "xss <b>spec</b>", "note": XSS_SPEC},
                 provenance={"host": "<svg onload=alert(5)>"})
    page = path.read_text(encoding="utf-8")

    assert path == tmp_path / "index.html"
    assert page.count("* plotly.js v") == 1  # the bundle's licence header: inlined exactly once
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.I) and "https://cdn" not in page.split("</head>")[1]
    assert len(re.findall(r"<script\b", page, flags=re.I)) == len(re.findall(r"</script", page, flags=re.I))
    for raw in (XSS_MODEL, XSS_DATASET, XSS_SPEC, "<svg onload", "<b>spec</b>"):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;/script&gt;&lt;script&gt;alert(3)" in page

    payloads = figure_payloads(page)
    assert len(payloads) == 3
    order = model_order(models, results.pivot_table(index="source", columns="target", values="agreement"))
    for payload, metric in zip(payloads, ["agreement", "r2", "mse"], strict=True):
        family = dict(zip(models.model, models.family, strict=True))
        expected = heatmap_figure(results, metric, order, [family[m] for m in order])
        for got, want in zip(payload["data"], expected.data, strict=True):
            if want.type == "heatmap":
                assert got["z"] == [list(r) for r in want.z] and got["customdata"] == [
                    [list(c) for c in r] for r in want.customdata]
    data = json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page).group(1))
    assert data["order"] == order and [s["label"] for s in data["selections"]] == ["ridge", "sgd"]


def test_sections_come_in_order_with_their_content_escaped(tmp_path):
    results, models = make_frames()
    sections = [
        Section("CKA", figures=[go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))], note="note <i>1</i>",
                tables=[pd.DataFrame({"<i>col</i>": [0.123456, np.nan], "s": ["<u>x</u>", None]})]),
        Section("Inversion", html='<div class="gallery"><img alt="inverted" src="data:image/png;base64,AA=="></div>'),
    ]
    page = write(tmp_path, results, models, sections=sections).read_text(encoding="utf-8")
    positions = [page.index(f"<h2>{t}</h2>") for t in ("Heatmaps", "Differences between selections", "Models", "Pairs",
                                                        "CKA", "Inversion", "Spec", "Provenance")]
    assert positions == sorted(positions)
    assert "note &lt;i&gt;1&lt;/i&gt;" in page and "&lt;i&gt;col&lt;/i&gt;" in page and "&lt;u&gt;x&lt;/u&gt;" in page
    assert '<div class="gallery"><img alt="inverted"' in page  # trusted html from this package, kept as is
    assert len(figure_payloads(page)) == 4


def test_tables_format_numbers(tmp_path):
    results, models = make_frames()
    page = write(tmp_path, results, models).read_text(encoding="utf-8")
    agreement = float(results.agreement.iloc[1])
    assert f'title="{agreement!r}">{agreement:.1%}</td>' in page
    assert "Same in every row: " in page and "train_rows = 1,257" in page  # constant columns folded into a caption
    assert '>0.001</td>' in page and '<th data-name="train_rows">' not in page.split('id="pairs"')[1]
    assert '>000000000000…</td>' in page  # weights digest shortened, full value in the tooltip


def test_write_is_atomic_and_overwrites(tmp_path, monkeypatch):
    results, models = make_frames()
    path = write(tmp_path, results, models)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    before = path.read_bytes()
    assert write(tmp_path, results, models).read_bytes() == before  # deterministic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]

    import featrec_grid.store as store_module

    def full_disk(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_fsync", full_disk)  # the package's one writer, before its rename
    with pytest.raises(UserError, match="index.html: No space left on device"):
        write(tmp_path, results.assign(agreement=0.5), models)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]


def test_bad_inputs_name_the_problem(tmp_path):
    results, models = make_frames()
    with pytest.raises(UserError, match=r"\['resnet18'\] are not in the models table"):
        write(tmp_path, results, models[models.model != "resnet18"])
    with pytest.raises(UserError, match="several rows for source='resnet18'"):
        write(tmp_path, pd.concat([results, results.iloc[:1].assign(alpha=1e-3)]), models)
    with pytest.raises(UserError, match=r"missing columns \['r2'\]"):
        write(tmp_path, results.drop(columns="r2"), models)
    empty = write(tmp_path, results.iloc[:0], models).read_text(encoding="utf-8")
    for title in ("Heatmaps", "Models", "Pairs", "What the numbers mean"):  # nothing to show: no empty sections
        assert f"<h2>{title}</h2>" not in empty
    assert "<h2>Spec</h2>" in empty


# ---------------------------------------------------------------- headless Chromium

PLOTS_READY = ("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 6 && "
               "document.querySelectorAll('.js-plotly-plot .heatmaplayer image').length >= 3")


def test_report_renders_in_chromium_without_errors_and_shows_hostile_keys_as_text(tmp_path):
    results, models = make_frames([*KEYS[:4], XSS_MODEL], FAMILIES)
    results["test_dataset"] = XSS_DATASET
    path = write(tmp_path, results, models, spec={"name": "xss", "note": XSS_SPEC},
                 provenance={"host": "<svg onload=alert(5)>"},
                 sections=[Section("CKA <b>", note="<img src=x onerror=alert(4)>",
                                   tables=[pd.DataFrame({"m": [XSS_MODEL]})])])
    with open_page(path, wait_for=PLOTS_READY) as seen:
        page = seen.page
        assert seen.count(".js-plotly-plot .heatmaplayer image") >= 3
        assert seen.count("#figure-0 .heatmaplayer text") == 25  # values written in the 5 x 5 cells
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        text = seen.text()
        assert XSS_MODEL in text and XSS_DATASET in text and XSS_SPEC in text and "<svg onload=alert(5)>" in text
        ticks = page.eval_on_selector_all("#figure-0 .ytick text", "els => els.map(e => e.textContent)")
        assert XSS_MODEL in ticks

        # hover one cell (first row, second column): source, target and the value in the page's one format
        box = page.locator("#figure-0 .nsewdrag").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 1.5 / 5, box["y"] + box["height"] * 0.5 / 5)
        page.wait_for_selector("#figure-0 .hoverlayer .hovertext")
        lines = page.eval_on_selector_all("#figure-0 .hoverlayer .hovertext tspan.line", "els => els.map(e => e.textContent)")
        source, target = lines[0].split(": ", 1)[1], lines[1].split(": ", 1)[1]
        order = model_order(models, results.pivot_table(index="source", columns="target", values="agreement"))
        assert (source, target) == (order[0], order[1])
        row = results[(results.source == source) & (results.target == target) & (results.method == "ridge")].iloc[0]
        expected = (f"Top-1 agreement: {fmt('agreement', row.agreement)} (95% CI {fmt('agreement', row.agreement_lo)}"
                    f"–{fmt('agreement', row.agreement_hi)})")
        assert lines[2] == expected

        # one shared selector switches every heatmap to the sgd traces
        visible = ("Array.from(document.querySelectorAll('.pair-heatmap')).map(gd => gd.data.filter("
                   "t => t.type === 'heatmap' && t.visible !== false).map(t => t.meta.sel.method).join())")
        assert page.evaluate(visible) == ["ridge"] * 3
        page.select_option("#selection", "1")
        page.wait_for_function(visible + ".every(m => m === 'sgd')")

        # click the same cell: the drill-down fills in place with that pair's sgd numbers
        page.mouse.click(box["x"] + box["width"] * 1.5 / 5, box["y"] + box["height"] * 0.5 / 5)
        page.wait_for_selector("#drilldown table.numbers")
        assert page.get_attribute("#drilldown", "data-pair") == f"{order[0]}|{order[1]}"
        sgd = results[(results.source == order[0]) & (results.target == order[1]) & (results.method == "sgd")].iloc[0]
        shown = page.inner_text("#drilldown td[data-metric=agreement]")
        assert shown == (f"{fmt('agreement', sgd.agreement)} (95% CI {fmt('agreement', sgd.agreement_lo)}"
                         f"–{fmt('agreement', sgd.agreement_hi)})")
        assert seen.count("#drilldown .js-plotly-plot") == 4 and seen.count("#drilldown .thumbs figure") == 1

        # the difference view counts the differences whose interval (same resamples) excludes zero
        page.wait_for_function("document.getElementById('diff-summary').textContent.length > 0")
        summary = page.inner_text("#diff-summary")
        ridge = results[results.method == "ridge"].set_index(["source", "target"])
        other = results[results.method == "sgd"].set_index(["source", "target"])
        excluded = 0
        for key in ridge.index:
            x = ridge.loc[key, "agreement"] + np.random.default_rng(int(ridge.index.get_loc(key))).normal(0, 0.01, 200)
            k = len(ridge) + other.index.get_loc(key)
            y = other.loc[key, "agreement"] + np.random.default_rng(k).normal(0, 0.01, 200)
            d = x.astype(np.float32).astype(float) - y.astype(np.float32).astype(float)
            lo, hi = np.quantile(d, [0.025, 0.975])
            excluded += bool(lo > 0 or hi < 0)
        assert summary.startswith(f"{excluded} of {len(ridge)} differences exclude zero")

        # the pairs table sorts by a clicked column, filters, and gives its shown rows as CSV
        headers = page.eval_on_selector_all("#pairs th", "els => els.map(e => e.textContent)")
        column = headers.index("agreement") + 1
        page.click(f"#pairs th:nth-child({column})")
        first = page.get_attribute(f"#pairs tbody tr:first-child td:nth-child({column})", "data-v")
        assert float(first) == results.agreement.min()
        page.fill("#pairs input.filter", "deit_s")
        csv = page.evaluate("featrecReport.tableCSV(document.querySelector('#pairs table'))")
        import io
        back = pd.read_csv(io.StringIO(csv))
        assert len(back) == int(((results.source == "deit_s") | (results.target == "deit_s")).sum())
        assert np.allclose(sorted(back.agreement), sorted(results[(results.source == "deit_s")
                                                                   | (results.target == "deit_s")].agreement))

        assert seen.console_errors == [] and seen.page_errors == []
        assert seen.dialogs == [] and seen.external_requests == []


def test_download_links_give_back_the_embedded_csv(tmp_path):
    from featrec_grid.report import Download

    results, models = make_frames()
    table = results[results.method == "ridge"].pivot(index="source", columns="target", values="agreement")
    data = table.to_csv().encode()
    path = write(tmp_path, results, models, downloads=[Download("agreement.csv", data, len(data), "text/csv"),
                                                        Download("huge.parquet", None, 9_000_000)])  # fmt: skip
    with open_page(path, wait_for=PLOTS_READY) as seen:
        with seen.page.expect_download() as info:
            seen.page.click("a[download='agreement.csv']")
        got = pd.read_csv(info.value.path(), index_col=0)
        pd.testing.assert_frame_equal(got, table, check_names=False, check_exact=False)
        assert "huge.parquet (9.0 MB)" in seen.text()
        assert seen.external_requests == [] and seen.console_errors == []


def test_missing_chromium_fails_with_the_install_command(monkeypatch, tmp_path):
    import browser

    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(RuntimeError, match="apt-get install -y chromium"):
        require_chromium()


def test_inspect_html_reports_errors_dialogs_and_blocked_requests(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<p>hello</p><img src="https://example.invalid/x.png"><script>alert("hi");'
                    'console.error("oops");undefinedFunction();</script>', encoding="utf-8")
    seen = inspect_html(page, ["p", "img"])
    assert "hello" in seen.text and seen.counts == {"p": 1, "img": 1}
    assert seen.dialogs == ["alert: hi"] and "oops" in seen.console_errors
    assert any("undefinedFunction" in e for e in seen.page_errors)
    assert seen.external_requests == ["https://example.invalid/x.png"]
