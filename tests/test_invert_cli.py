"""`featrec-grid invert` end to end on a tiny config through Ray: table columns, the cross-model table, PNGs,
galleries and cross heatmaps rendered in Chromium; task failures keep the other tasks' results."""

import pandas as pd
import pytest
from browser import open_page
from click.testing import CliRunner

from featrec_grid import runtime
from featrec_grid.cli import main
from featrec_grid.errors import UserError, first_line
from featrec_grid.invert.spec_run import run_stage_job

pytestmark = pytest.mark.slow

SPEC = """
name: inv
store: {store}
output: {out}
models:
  mlp: {{source: zoo, architecture: mlp, options: {{epochs: 3}}}}
  cnn: {{source: zoo, architecture: cnn, options: {{epochs: 2}}}}
data:
  train: {{dataset: digits, split: train}}
  test: {{dataset: digits, split: test}}
inversion:
  seeds: [0, 1]
  classes: [0, 1]
  optim: {{steps: 20}}
  decoder: {{epochs: 2}}
  gallery_items: 4
  manipulation_items: 2
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: the zoo models train once (the first invert trains them in the driver)."""
    return tmp_path_factory.mktemp("store")


def test_invert_command_writes_table_images_and_report(tmp_path, store, ray_session, monkeypatch):
    spec = tmp_path / "inv.yaml"
    out = tmp_path / "out"
    spec.write_text(SPEC.format(store=store, out=out))
    connected = []
    real_connect = runtime.connect
    monkeypatch.setattr(runtime, "connect", lambda *a: connected.append(real_connect(*a)) or connected[-1])
    result = CliRunner().invoke(main, ["invert", str(spec), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert connected == [False] and ray_session.is_initialized()  # the runtime joined the session's Ray, left it up
    assert f"report: {out / 'index.html'}" in result.output
    table = pd.read_parquet(out / "inversion.parquet")
    for col in ["model", "method", "seed", "target_prob", "heldout_prob", "retrieval_top1", "chance", "ssim", "psnr"]:
        assert col in table.columns
    assert {"class", "combined", "difference", "match", "decoder", "decoder_onehot"} <= set(table["method"])
    assert set(table["model"]) == {"mlp", "cnn"}
    dec = table[(table["method"] == "decoder") & (table["control"] == "none")]
    assert len(dec) == 2 and list(dec["chance"]) == pytest.approx([1 / 540] * 2)
    assert set(table["device"]) == {"cpu"}
    assert dec["onehot_ceiling"].tolist() == pytest.approx([10 / 540] * 2)  # ten predicted classes among 540
    transfer = pd.read_parquet(out / "inversion_transfer.parquet")
    assert list(transfer.columns[:10]) == ["generator", "judge", "method", "parameterisation", "objective", "class",
                                           "seed", "target_prob", "target_rank", "top1_is_target"]  # fmt: skip
    assert {"class", "combined", "difference", "match", "match_cross"} <= set(transfer["method"])
    own = transfer[(transfer.method == "class") & (transfer.control == "none")]
    assert len(own) == 2 * 2 * 2 * 2 and (own.heldout == (own.judge != own.generator)).all()  # 2 models x 2 classes x 2 seeds x 2 judges
    cross = pd.read_parquet(out / "inversion_cross.parquet")
    assert set(zip(cross.decoder_model, cross.judge_model, cross.condition, strict=True)) == {
        (a, b, c) for a in ("mlp", "cnn") for b in ("mlp", "cnn") for c in ("logits", "onehot")}
    assert cross.chance.eq(1 / 540).all() and cross.rows.eq(540).all()
    assert cross[["agreement", "judge_prob", "retrieval_top1_features"]].apply(lambda c: c.between(0, 1)).all().all()
    assert "failed:" not in result.output and "0 of 7 tasks failed" in result.output
    assert len(list(out.glob("inv_*.png"))) >= 6
    ready = "document.readyState === 'complete' && document.querySelectorAll('.js-plotly-plot').length >= 2"
    with open_page(out / "index.html", wait_for=ready) as seen:
        widths = seen.page.evaluate("[...document.querySelectorAll('figure img')].map(i => i.naturalWidth)")
        heatmaps = seen.page.evaluate("[...document.querySelectorAll('.js-plotly-plot')].map(d => d.data.map(t => "
                                      "({type: t.type, name: t.name, labels: d.layout.xaxis.ticktext, z: t.z})))")
        text = seen.text()
        assert "Inverting logits back to images" in text and "judge_model" in text and "row A, column B scores those reconstructions" in text
        assert not seen.console_errors and not seen.page_errors and not seen.external_requests
    assert len(widths) >= 6 and all(w > 0 for w in widths)  # every gallery image decoded as a real PNG
    metrics = {"retrieval top-1 in B's features": "retrieval_top1_features", "B's top-1 agreement": "agreement",
               "B's probability of its class": "judge_prob"}  # fmt: skip
    heatmaps = [h for h in heatmaps if h and h[0]["name"] in metrics]  # the page also plots transfer and run time
    assert len(heatmaps) == 2  # logit decoder, one-hot control; a trace per metric
    for traces, condition in zip(heatmaps, ("logits", "onehot"), strict=True):
        assert [t["name"] for t in traces] == list(metrics) and {t["type"] for t in traces} == {"heatmap"}
        sub = cross[cross.condition == condition].set_index(["decoder_model", "judge_model"])
        for shown in traces:
            for i, a in enumerate(shown["labels"]):  # rows: decoder trained on A's logits; columns: judge B
                for j, b in enumerate(shown["labels"]):
                    assert shown["z"][i][j] == pytest.approx(sub.loc[(a, b), metrics[shown["name"]]])
    row = cross.iloc[0]
    assert f"{row.agreement:.1%}" in text  # the table's cells, as the report formats agreement


def test_invert_failed_tasks_keep_the_others(tmp_path, store, monkeypatch):
    """A task that fails does not lose the others: they are written and published, each failure is printed,
    exit 1 (2 when a failure is a UserError). Tasks run in-process here (runtime.execute replaced) to inject faults."""
    spec = tmp_path / "inv.yaml"
    out = tmp_path / "out"
    spec.write_text(SPEC.format(store=store, out=out))
    errors = {"match mlp pixels": RuntimeError("worker died")}

    def fake_execute(graph, **kwargs):
        stages = graph.of_kind("invert")
        assert [t.name for t in stages][:2] == ["decoder mlp", "decoder cnn"]  # long tasks first
        assert {t.fn for t in stages} == {"featrec_grid.invert.spec_run:run_stage_job"}
        run = runtime.Execution()
        for t in graph.tasks.values():
            if t.kind != "invert":
                run.records[t.name] = runtime.TaskRecord(t.name, t.kind, "reused")
            elif t.name.startswith("class") and t.name not in errors:
                run.values[t.name] = run_stage_job(*t.args)
                run.records[t.name] = runtime.TaskRecord(t.name, t.kind, "computed")
            else:
                err = errors.get(t.name, RuntimeError(f"skipped {t.name}"))
                run.failures[t.name] = first_line(err)
                run.records[t.name] = runtime.TaskRecord(t.name, t.kind, "failed", error=first_line(err))
                if isinstance(err, UserError) and run.user_error is None:
                    run.user_error, run.user_error_task = str(err), t.name
        return run

    monkeypatch.setattr(runtime, "execute", fake_execute)
    result = CliRunner().invoke(main, ["invert", str(spec), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "failed: match mlp pixels: RuntimeError: worker died" in result.output
    assert "failed: decoder cnn: RuntimeError: skipped decoder cnn" in result.output
    table = pd.read_parquet(out / "inversion.parquet")
    assert set(table["method"]) == {"class"} and set(table["model"]) == {"mlp", "cnn"}
    assert len(pd.read_parquet(out / "inversion_cross.parquet")) == 0
    assert (out / "index.html").is_file() and list(out.glob("inv_class_*.png"))
    transfer = pd.read_parquet(out / "inversion_transfer.parquet")  # the class tasks' images, judged by both models
    assert set(transfer["method"]) == {"class"} and set(transfer["judge"]) == {"mlp", "cnn"}
    errors["pair mlp cnn pixels"] = UserError("model cnn: weights missing")
    result = CliRunner().invoke(main, ["invert", str(spec), "--no-progress"])
    assert result.exit_code == 2 and "error: pair mlp cnn pixels: model cnn: weights missing" in result.output
