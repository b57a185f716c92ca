"""The FeatReconstruct machinery end to end on one small spec: settings (fit on one dataset, test on another),
the seed's faithful mode beside ours, the MLP map searched with Ray Tune, head analysis and the seed table."""

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file

from featrec_grid.cli import main
from featrec_grid.grid import run_grid
from featrec_grid.models import IMAGENET_MEAN, IMAGENET_STD, InputConfig, input_for
from featrec_grid.plan import plan_grid
from featrec_grid.spec import load_spec, parse_spec

pytestmark = pytest.mark.slow

SPEC = """
name: fr
store: {tmp}/store
output: {tmp}/out
models:
  mlp: {{source: zoo, architecture: mlp, options: {{epochs: 3}}}}
  cnn: {{source: zoo, architecture: cnn, options: {{epochs: 2}}}}
data:
  - {{label: digits, train: {{dataset: digits, split: train}}, test: {{dataset: digits, split: test}}}}
  - label: to_noisy
    train: {{dataset: digits, split: train}}
    test: {{dataset: digits, split: test, options: {{view: noisy}}}}
modes: [default, faithful]
fit:
  method: [ridge, sgd, mlp]
  alpha: [1, 100]
  self_alpha: 0
  sgd: {{epochs: 3}}
  mlp: {{trials: 2, max_epochs: 3, pairs: [[mlp, cnn]], search: {{hidden: [16, 32], lr: [0.001]}}}}
cka: {{max_images: 64, batch_size: 32}}
seed_results:
  - {{setting: digits, source: cnn, target: cnn, metric: agreement, value: 0.99}}
  - {{setting: to_noisy, source: mlp, target: cnn, metric: mse_total_seed, value: 5.0, note: made up}}
"""


class _Clf:
    input = InputConfig(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_seed_transform_pads_without_resizing():
    """CenterCrop(16) of an 8x8 image with no resize: the digit sits in the middle, the frame is black (0 before
    normalising), and ImageNet mean/std are applied, as the seed's CIFAR loaders did at 224."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    x = input_for(_Clf(), {"transform": "seed"}).transform()(Image.fromarray(pixels)).numpy()
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    expected = np.zeros((3, 16, 16))
    expected[:, 4:12, 4:12] = pixels.transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(x, (expected - mean) / std, atol=1e-6)
    assert input_for(_Clf(), {}) is _Clf.input
    assert input_for(_Clf(), {"transform": "seed", "crop": 24}).size == 24


def test_spec_cells_and_plan(tmp_path):
    spec = load_spec(_write(tmp_path))
    cells = [(c.setting, c.mode, c.fit.methods) for c in spec.cells()]
    assert cells == [("digits", "default", ("ridge", "sgd", "mlp")), ("digits", "faithful", ("sgd",)),
                     ("to_noisy", "default", ("ridge", "sgd", "mlp")), ("to_noisy", "faithful", ("sgd",))]
    faithful = spec.cells()[1]
    assert faithful.train.options["transform"] == "seed" and faithful.train.key == "digits-seed"
    assert faithful.fit.sgd == {"epochs": 100, "lr": 0.1, "momentum": 0.9, "batch_size": 256, "seed": 0}
    assert spec.cells()[2].test.key == "digits-noisy"
    again = parse_spec(yaml.safe_load(yaml.safe_dump(spec.resolved())), "resolved")  # spec.resolved.yaml reruns
    assert again.cells() == spec.cells() and again.seed_results == spec.seed_results
    fits = plan_grid(spec, tmp_path / "out").of_kind("fit")
    assert len(fits) == 2 * (4 + 4 + 1) + 2 * 4  # ridge, sgd on 4 pairs and mlp on 1 (default); sgd on 4 (faithful)


@pytest.mark.parametrize(("change", "message"), [
    ("modes: [default, faithfull]", "modes[1]: 'faithfull' is not one of default, faithful"),
    ("seed_results:\n  - {setting: nowhere, source: mlp, target: cnn, metric: agreement, value: 1}",
     "seed_results[0].setting: 'nowhere' is not one of digits, to_noisy"),
    ("seed_results:\n  - {source: mlp, target: cnn, metric: accuracy, value: 1}",
     "seed_results[0].metric: 'accuracy' is not one of"),
    ("faithful: {crop: 0}", "faithful.crop: 0 is not an integer >= 1"),
])
def test_bad_featreconstruct_fields_exit_2(tmp_path, change, message):
    text = SPEC.format(tmp=tmp_path).split("seed_results:")[0].replace("modes: [default, faithful]\n", "")
    path = tmp_path / "bad.yaml"
    path.write_text(text + change + "\n")
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 2 and message in result.output, result.output


def _write(tmp_path):
    path = tmp_path / "fr.yaml"
    path.write_text(textwrap.dedent(SPEC.format(tmp=tmp_path)))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("fr")
    spec = load_spec(_write(tmp))
    lines = []
    planned = CliRunner().invoke(main, ["plan", str(tmp / "fr.yaml"), "--json"])
    assert planned.exit_code == 0, planned.output
    outcome = run_grid(spec, progress=False, echo=lines.append)
    return tmp, spec, outcome, lines, json.loads(planned.output)


def test_cells_methods_and_cross_dataset_rows(run):
    tmp, spec, outcome, lines, _ = run
    assert outcome.exit_code == 0, outcome.failures
    assert lines[-1] == "pairs: computed=26 reused=0 failed=0"
    r = pd.read_parquet(tmp / "out" / "results.parquet")
    counts = r.groupby(["setting", "mode", "method"]).size().to_dict()
    assert counts == {("digits", "default", "mlp"): 1, ("digits", "default", "ridge"): 4,
                      ("digits", "default", "sgd"): 4, ("digits", "faithful", "sgd"): 4,
                      ("to_noisy", "default", "mlp"): 1, ("to_noisy", "default", "ridge"): 4,
                      ("to_noisy", "default", "sgd"): 4, ("to_noisy", "faithful", "sgd"): 4}
    assert set(r[r.setting == "to_noisy"]["test_dataset"]) == {"digits-noisy", "digits-noisy-seed"}
    assert set(r[r["mode"] == "faithful"]["train_dataset"]) == {"digits-seed"}
    ridge = r[r.method == "ridge"].set_index(["setting", "source", "target"])
    sgd = r[(r.method == "sgd") & (r["mode"] == "default")].set_index(["setting", "source", "target"])
    in_dist = ridge.loc["digits"]
    assert (in_dist["mse"] <= sgd.loc["digits"].loc[in_dist.index, "mse"] * (1 + 1e-9)).all()
    selfs = r[(r.method == "ridge") & (r.source == r.target)]
    assert (selfs["alpha"] == 0).all() and (selfs["agreement"] == 1.0).all()  # least squares on self pairs
    assert set(r[(r.method == "ridge") & (r.source != r.target)]["alpha"]) <= {1.0, 100.0}
    # the seed's transform really reached the shards: the manifests say so, and features differ from the default
    man = json.loads((tmp / "store" / "shards" / "digits-seed" / "test" / "cnn" / "manifest.json").read_text())
    assert man["transform"]["resize"] is False and tuple(man["transform"]["mean"]) == IMAGENET_MEAN


def test_plan_is_what_run_executes(run):
    """`plan --json` before the run lists exactly the tasks the run computed (tasks.parquet), by name and kind,
    with their dependencies planned before them; a rerun's plan has nothing left to do."""
    tmp, spec, _, _, planned = run
    tasks = pd.read_parquet(tmp / "out" / "tasks.parquet")
    done = tasks[(tasks.command == "run") & (tasks.status == "computed")]
    todo = [t for t in planned if t["status"] == "todo"]
    assert sorted(t["name"] for t in todo) == sorted(done["name"]) and len(todo) == len(done)
    assert {t["name"]: t["kind"] for t in todo} == dict(zip(done["name"], done["kind"], strict=True))
    assert {t["kind"] for t in todo} == {"train_zoo", "extract", "source_stats", "fit", "head", "similarity", "cka"}
    order = [t["name"] for t in planned]
    assert all(order.index(d) < order.index(t["name"]) for t in planned for d in t["deps"])
    assert (done["seconds"] > 0).all() and set(done["node"]) <= {"127.0.0.1", "tune"}
    again = CliRunner().invoke(main, ["plan", str(tmp / "fr.yaml"), "--json"])
    assert [t["status"] for t in json.loads(again.output)] == ["cached"] * len(json.loads(again.output))


def test_mlp_map_searched_with_tune(run):
    tmp, *_ = run
    r = pd.read_parquet(tmp / "out" / "results.parquet")
    mlp = r[r.method == "mlp"]
    assert set(zip(mlp.source, mlp.target, strict=True)) == {("mlp", "cnn")}
    assert (mlp["mlp_trials"] == 2).all() and np.isfinite(mlp["val_mse"]).all()
    assert all(c["hidden"] in (16, 32) for c in mlp["mlp_config"])
    assert (tmp / "out" / "tune").is_dir()


def test_head_analysis_in_models_table(run):
    """head_rank and the pinv baseline against numpy on the head and test shards read without this package."""
    tmp, *_ = run
    models = pd.read_parquet(tmp / "out" / "models.parquet").set_index("model")
    for m in ("mlp", "cnn"):
        head = load_file(tmp / "store" / "shards" / "digits" / "test" / m / "head.safetensors")
        w = head["weight"].astype(np.float64)
        assert models.loc[m, "head_rank"] == np.linalg.matrix_rank(w)
        assert models.loc[m, "classes"] == 10 and models.loc[m, "feature_dim"] == w.shape[1]
        assert "feature directions reach" in models.loc[m, "reason"]


def test_seed_table_in_report(run):
    from featrec_grid.publish import seed_table

    tmp, spec, outcome, *_ = run
    table = seed_table(spec, outcome.results)
    r = outcome.results.set_index(["setting", "mode", "method", "source", "target"])
    assert table.loc[0, "seed"] == 0.99
    assert table.loc[0, "default ridge"] == r.loc[("digits", "default", "ridge", "cnn", "cnn"), "agreement"]
    assert table.loc[0, "faithful sgd"] == r.loc[("digits", "faithful", "sgd", "cnn", "cnn"), "agreement"]
    assert table.loc[1, "default sgd"] == r.loc[("to_noisy", "default", "sgd", "mlp", "cnn"), "mse_total_seed"]
    from browser import inspect_html

    seen = inspect_html(outcome.report, ["section table"],
                        wait_for="document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3")
    assert "Against the seed's published numbers" in seen.text and "why self-reconstruction succeeds" in seen.text
    assert "faithful sgd" in seen.text and "feature directions reach the C = 10 logits" in seen.text
    assert not seen.console_errors and not seen.page_errors and not seen.external_requests


def test_download_flag_sets_every_dataset_and_keeps_cache_keys(tmp_path):
    """--download changes how files are fetched, not what the shards hold: shard keys must not change."""
    from featrec_grid.extract import shard_key

    spec = load_spec(_write(tmp_path))
    online = spec.with_download()
    for before, after in zip(spec.cells(), online.cells(), strict=True):
        assert after.train.options["download"] is True and after.test.options["download"] is True
        for model in spec.models.values():
            assert shard_key(model, before.test) == shard_key(model, after.test)
