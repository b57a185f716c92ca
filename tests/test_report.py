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
from featrec_grid.report import Section, heatmap_figure, model_order, write_report

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

@pytest.mark.parametrize("metric", ["agreement", "r2", "mse"])
def test_heatmap_values_equal_the_results_table(metric):
    keys = [*KEYS, XSS_MODEL]
    results, _ = make_frames(keys, [*FAMILIES, "mlp"])
    dropped = results[(results.source == "deit_s") & (results.target == "vit_s16") & (results.method == "sgd")].index
    results = results.drop(index=dropped)
    order = list(reversed(keys))
    fig = heatmap_figure(results, metric, order)

    assert [t.name for t in fig.data] == ["ridge", "sgd"]
    assert [t.visible for t in fig.data] == [True, False]
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["ridge", "sgd"]
    for trace, method in zip(fig.data, ["ridge", "sgd"], strict=True):
        assert list(trace.x) == list(trace.y) == [k.replace("<", "&lt;").replace(">", "&gt;") for k in order]
        assert "%{customdata}" in trace.hovertemplate and "%{x}" in trace.hovertemplate
        assert trace.texttemplate  # values written into the cells for N <= 12
        for i, a in enumerate(order):
            for j, b in enumerate(order):
                row = results[(results.source == a) & (results.target == b) & (results.method == method)]
                if row.empty:
                    assert trace.z[i][j] is None and trace.customdata[i][j] == "n/a"
                else:
                    value = float(row[metric].iloc[0])
                    assert trace.z[i][j] == value
                    assert float(trace.customdata[i][j]) == value  # full precision on hover


def test_heatmap_large_grid_has_no_cell_text_and_settings_split_by_dataset():
    keys = [f"m{i:02d}" for i in range(13)]
    ridge, _ = make_frames(keys, ["f"] * 13, methods=("ridge",))
    other, _ = make_frames(keys, ["f"] * 13, methods=("ridge",), test_dataset=XSS_DATASET)
    fig = heatmap_figure(pd.concat([ridge, other]), "agreement", keys)
    assert len(fig.data) == 2 and all(t.texttemplate is None for t in fig.data)
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
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
            assert got["z"] == [list(r) for r in want.z] and got["x"] == list(want.x)


def test_sections_come_in_order_with_their_content_escaped(tmp_path):
    results, models = make_frames()
    sections = [
        Section("CKA", figures=[go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))], note="note <i>1</i>",
                tables=[pd.DataFrame({"<i>col</i>": [0.123456, np.nan], "s": ["<u>x</u>", None]})]),
        Section("Inversion", html='<div class="gallery"><img alt="inverted" src="data:image/png;base64,AA=="></div>'),
    ]
    page = write(tmp_path, results, models, sections=sections).read_text(encoding="utf-8")
    positions = [page.index(f"<h2>{t}</h2>") for t in ("Heatmaps", "Models", "Pairs", "CKA", "Inversion", "Spec",
                                                        "Provenance")]
    assert positions == sorted(positions)
    assert "note &lt;i&gt;1&lt;/i&gt;" in page and "&lt;i&gt;col&lt;/i&gt;" in page and "&lt;u&gt;x&lt;/u&gt;" in page
    assert '<div class="gallery"><img alt="inverted"' in page  # trusted html from this package, kept as is
    assert len(figure_payloads(page)) == 4


def test_tables_format_numbers(tmp_path):
    results, models = make_frames()
    page = write(tmp_path, results, models).read_text(encoding="utf-8")
    agreement = float(results.agreement.iloc[1])
    assert f'title="{agreement!r}">{agreement:.2%}</td>' in page
    assert '>1,257</td>' in page and '>0.001</td>' in page
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
    assert "No pair results." in empty


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
        assert seen.count(".js-plotly-plot") >= 3
        assert seen.count(".js-plotly-plot .heatmaplayer image") >= 3
        assert seen.count("#figure-0 .heatmaplayer text") == 25  # values written in the 5 x 5 cells
        text = seen.text()
        assert XSS_MODEL in text and XSS_DATASET in text and XSS_SPEC in text and "<svg onload=alert(5)>" in text
        ticks = page.eval_on_selector_all("#figure-0 .ytick text", "els => els.map(e => e.textContent)")
        assert XSS_MODEL in ticks

        # hover one cell (first row, second column): source, target and the value at full precision
        box = page.locator("#figure-0 .nsewdrag").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 1.5 / 5, box["y"] + box["height"] * 0.5 / 5)
        page.wait_for_selector("#figure-0 .hoverlayer .hovertext")
        lines = page.eval_on_selector_all("#figure-0 .hoverlayer .hovertext tspan.line", "els => els.map(e => e.textContent)")
        source, target = lines[0].split(": ", 1)[1], lines[1].split(": ", 1)[1]
        order = model_order(models, results.pivot_table(index="source", columns="target", values="agreement"))
        assert (source, target) == (order[0], order[1])
        row = results[(results.source == source) & (results.target == target) & (results.method == "ridge")]
        assert lines[2] == f"Top-1 agreement: {float(row.agreement.iloc[0])!r}"

        # the method menu switches the visible trace
        page.click("#figure-0 .updatemenu-header-group")
        page.locator("#figure-0 .updatemenu-dropdown-button").nth(1).click()
        page.wait_for_function("document.getElementById('figure-0').data[1].visible === true")

        # the pairs table sorts by a clicked column
        headers = page.eval_on_selector_all("#pairs th", "els => els.map(e => e.textContent)")
        column = headers.index("agreement") + 1
        page.click(f"#pairs th:nth-child({column})")
        first = page.get_attribute(f"#pairs tbody tr:first-child td:nth-child({column})", "data-v")
        assert float(first) == results.agreement.min()

        assert seen.console_errors == [] and seen.page_errors == []
        assert seen.dialogs == [] and seen.external_requests == []


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
