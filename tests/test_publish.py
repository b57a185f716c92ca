"""An output folder -> index.html without Ray: similarity, transfer and task sections from synthetic tables,
thumbnails from the dataset, headline, provenance, the `report` command, inversion-only and self-only pages."""

from __future__ import annotations

import base64
import io
import json
import re
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from featrec_grid import reduce
from featrec_grid.cli import main
from featrec_grid.data import digits_split
from featrec_grid.publish import headline, labelled_gallery, provenance_fields, rebuild_report
from featrec_grid.spec import parse_spec

MODELS = ["mlp", "cnn", "resnet"]


def _spec(tmp_path, pairs="all"):
    raw = {"name": "toy", "store": str(tmp_path / "store"), "output": str(tmp_path / "out"), "pairs": pairs,
           "models": {m: {"source": "zoo", "architecture": m} for m in MODELS},
           "data": {"train": {"dataset": "digits", "split": "train"}, "test": {"dataset": "digits", "split": "test"}}}
    return parse_spec(raw, "toy.yaml")


def _rows(spec, rng):
    test_rows = digits_split()["test"]
    rows = []
    for s, t in spec.pairs:
        agreement = 1.0 if s == t else float(rng.uniform(0.8, 0.95))
        rows.append({"setting": "digits", "mode": "default", "source": s, "target": t, "train_dataset": "digits",
                     "train_split": "train", "test_dataset": "digits", "test_split": "test", "method": "ridge",
                     "alpha": 1.0, "alpha_scores": {"0.0": 2.0, "1.0": 1.0}, "train_rows": 1257, "test_rows": 540,
                     "mse": float(rng.uniform(0.1, 1)), "r2": float(rng.uniform(0.5, 0.9)), "agreement": agreement,
                     "agreement_lo": agreement - 0.02, "agreement_hi": min(1.0, agreement + 0.02), "ci": 0.95,
                     "detail": {"disagree": [{"row": int(test_rows[3]), "real": 1, "recon": 2, "label": 1}]}})
    return rows


@pytest.fixture()
def folder(tmp_path):
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    results = reduce.results_frame(_rows(spec, rng), {"featrec_grid": "test"})
    models = pd.DataFrame({"model": MODELS, "family": ["MLP", "CNN", "ResNet"]})
    reduce.write_outputs(out, results=results, models=models, resolved_spec=spec.resolved(),
                         cells=[("digits", "default", "ridge")], order=MODELS, provenance={"host": "here"})
    sim = pd.DataFrame([{"measure": m, "representation": "features", "setting": "digits", "model_a": a, "model_b": b,
                         "value": float(rng.uniform(0.2, 0.9))} for m in ("cknna", "mutual_knn")
                        for a in MODELS for b in MODELS])  # fmt: skip
    sim.to_parquet(out / "similarity.parquet")
    transfer = pd.DataFrame([{"generator": g, "judge": j, "method": "class", "parameterisation": p, "objective": "logit",
                              "class": c, "seed": s, "target_prob": float(rng.uniform()), "target_rank": 1,
                              "top1_is_target": bool(rng.uniform() > 0.5)}
                             for g in MODELS for j in MODELS for p in ("pixels", "fourier") for c in (0, 1)
                             for s in (0, 1)])  # fmt: skip
    transfer.to_parquet(out / "inversion_transfer.parquet")
    tasks = pd.DataFrame({"name": ["extract mlp", "extract cnn", "fit a", "fit b", "fit c"],
                          "kind": ["extract", "extract", "fit", "fit", "fit"],
                          "status": ["computed", "reused", "computed", "computed", "failed"],
                          "seconds": [2.0, 0.0, 0.25, 0.5, 0.1], "node": "n0", "error": [None] * 4 + ["boom"]})
    tasks.to_parquet(out / "tasks.parquet")
    return spec, out, results, sim, transfer, tasks


def _payloads(page):
    return [json.loads(m) for m in re.findall(r"var f=(\{.*?\});Plotly\.newPlot", page)]


def _heat(payload, view):
    return next(t for t in payload["data"] if t["type"] == "heatmap" and t.get("meta", {}).get("view") == view)


def test_rebuild_renders_every_table_the_folder_holds(folder):
    spec, out, results, sim, transfer, tasks = folder
    page = rebuild_report(out).read_text(encoding="utf-8")
    payloads = _payloads(page)
    titles = [p["layout"]["title"]["text"] for p in payloads]

    similarity = payloads[next(i for i, t in enumerate(titles) if "Representation similarity" in t)]
    order = similarity["layout"]["xaxis"]["ticktext"]
    trace = _heat(similarity, "cknna · features")
    want = sim[sim.measure == "cknna"].set_index(["model_a", "model_b"])["value"]
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            assert trace["z"][i][j] == pytest.approx(want[(a, b)])

    fig = payloads[next(i for i, t in enumerate(titles) if "Transfer" in t)]
    order = fig["layout"]["xaxis"]["ticktext"]
    means = transfer[transfer.parameterisation == "fourier"].groupby(["generator", "judge"])["target_prob"].mean()
    trace = _heat(fig, "class · fourier")
    assert trace["z"][0][1] == pytest.approx(means[(order[0], order[1])])
    assert 'data-group="transfer"' in page

    bars = payloads[next(i for i, t in enumerate(titles) if "Task seconds" in t)]
    by = {t["name"]: dict(zip(t["x"], t["y"], strict=True)) for t in bars["data"]}
    assert by["computed"] == {"extract": 2.0, "fit": 0.75} and by["failed"]["fit"] == pytest.approx(0.1)
    assert "boom" in page

    scatter = payloads[next(i for i, t in enumerate(titles) if "Similarity vs agreement" in t)]
    points = next(t for t in scatter["data"] if t["meta"]["view"] == "mutual_knn · features")
    cross = results[results.source != results.target]
    assert sorted(points["y"]) == pytest.approx(sorted(cross.agreement))

    # the drill-down thumbnail is the digit itself (load_digits pixels, nearest-upscaled to 64 px)
    data = json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page).group(1))
    from sklearn.datasets import load_digits

    row = int(digits_split()["test"][3])
    png = Image.open(io.BytesIO(base64.b64decode(data["thumbs"][f"digits:{row}"].split(",", 1)[1])))
    pixels = np.round(load_digits().images[row] * 255 / 16).astype(np.uint8)
    assert png.size == (64, 64) and np.array_equal(np.asarray(png.convert("L"))[::8, ::8], pixels)

    for name in ("results.parquet", "agreement.csv", "similarity.parquet", "tasks.parquet"):
        assert f'download="{name}"' in page
    agreement_csv = re.search(r'download="agreement.csv" href="data:text/csv;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(agreement_csv) == (out / "agreement.csv").read_bytes()
    assert "pair_details.parquet (" in page  # listed, not embedded


def test_report_command_rebuilds_without_ray_and_names_bad_folders(folder, tmp_path):
    _, out, *_ = folder
    (out / "index.html").unlink(missing_ok=True)
    got = CliRunner().invoke(main, ["report", str(out)])
    assert got.exit_code == 0 and (out / "index.html").exists() and "report:" in got.output
    got = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert got.exit_code == 2 and "no such output folder" in got.output
    (out / "spec.resolved.yaml").unlink()
    got = CliRunner().invoke(main, ["report", str(out)])
    assert got.exit_code == 2 and "pass --spec" in got.output


def test_headline_against_the_table(folder):
    _, out, results, *_ = folder
    lines = headline(results, out / "index.html")
    cross = results[results.source != results.target]
    best, worst = cross.loc[cross.agreement.idxmax()], cross.loc[cross.agreement.idxmin()]
    assert lines[0].startswith("self agreement 100.0% to 100.0% over 3 models")
    assert lines[1] == (f"best cross pair: {best.source} -> {best.target} agreement {best.agreement:.1%} "
                        f"(95% CI {best.agreement_lo:.1%}–{best.agreement_hi:.1%})")  # fmt: skip
    assert lines[2].startswith(f"worst cross pair: {worst.source} -> {worst.target} agreement {worst.agreement:.1%}")
    assert lines[3] == f"report: {(out / 'index.html').resolve().as_uri()}"


def test_provenance_fields():
    fields = provenance_fields(["featrec-grid", "run", "my spec.yaml"], datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert fields["time (UTC)"] == "2025-01-02 03:04:05 UTC"
    assert fields["command line"] == "featrec-grid run 'my spec.yaml'"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown.*", fields["git commit"])
    assert fields["host"] and fields["featrec_grid version"]


def test_inversion_only_output_shows_no_grid_sections(tmp_path):
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "spec.resolved.yaml").write_text(yaml.safe_dump(spec.resolved()))
    pd.DataFrame({"model": ["mlp"], "method": ["class"], "control": ["none"], "target_prob": [0.9],
                  "heldout_prob": [0.5], "retrieval_top1": [np.nan], "chance": [0.1], "ssim": [np.nan],
                  "psnr": [np.nan]}).to_parquet(out / "inversion.parquet")
    page = rebuild_report(out).read_text(encoding="utf-8")
    assert "<h2>Inverting logits back to images</h2>" in page
    for title in ("Heatmaps", "Models", "Pairs", "Representation similarity", "Run time"):
        assert f"<h2>{title}</h2>" not in page


def test_self_pairs_get_bars_not_matrices(tmp_path):
    spec = _spec(tmp_path, pairs="self")
    out = tmp_path / "out"
    results = reduce.results_frame(_rows(spec, np.random.default_rng(1)), {})
    reduce.write_outputs(out, results=results, models=pd.DataFrame({"model": MODELS, "family": ["a", "b", "c"]}),
                         resolved_spec=spec.resolved(), cells=[("digits", "default", "ridge")], order=MODELS,
                         provenance={})  # fmt: skip
    page = rebuild_report(out).read_text(encoding="utf-8")
    assert 'class="figure linked pair-bars"' in page and 'class="figure linked pair-heatmap"' not in page
    bars = [p for p in _payloads(page) if "self pairs" in p["layout"]["title"]["text"]]
    assert len(bars) == 3 and bars[0]["data"][0]["type"] == "bar"
    assert bars[0]["data"][0]["y"] == [1.0, 1.0, 1.0]


def test_gallery_gets_class_and_seed_labels():
    import torch

    from featrec_grid.invert.gallery import grid_image

    buf = io.BytesIO()
    grid_image(torch.rand(2, 3, 3, 8, 8)).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    html = (f'<div class="inversion-gallery"><figure><img src="data:image/png;base64,{data}" alt="class '
            'visualisation, mlp: rows = classes [4, 7], columns = seeds"><figcaption>x</figcaption></figure></div>')
    out = labelled_gallery(html)
    assert re.findall(r"<span>(seed \d)</span>", out) == ["seed 0", "seed 1", "seed 2"]
    assert re.findall(r"<span>(class \d)</span>", out) == ["class 4", "class 7"]
