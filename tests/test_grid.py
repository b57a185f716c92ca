"""The grid end to end on one local Ray: results against an independent fit, reuse, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pyarrow.feather as feather
import pytest
from safetensors.numpy import load_file
from sklearn.linear_model import Ridge

from featrec_grid.grid import run_grid
from featrec_grid.spec import load_spec

pytestmark = pytest.mark.slow

MODELS = """
models:
  mlp: {source: zoo, architecture: mlp, options: {epochs: 3}}
  cnn: {source: zoo, architecture: cnn, options: {epochs: 2}}
  lite0: {source: lite, architecture: tf_efficientnet_lite0, options: {img_size: 32}}
data:
  train: {dataset: digits, split: train}
  test: {dataset: digits, split: test}
"""


def _spec(tmp, name, extra, output=None):
    path = tmp / f"{name}.yaml"
    out = output or tmp / name
    path.write_text(f"name: {name}\nstore: {tmp / 'store'}\noutput: {out}\n" + MODELS + textwrap.dedent(extra))
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("grid")
    spec = load_spec(_spec(tmp, "g", "fit: {method: [ridge, sgd], alpha: [0, 1, 100], sgd: {epochs: 3}}\n"))
    lines = []
    outcome = run_grid(spec, progress=False, echo=lines.append)
    return tmp, spec, outcome, lines


def _arrays(store_dir, model, split):
    """Read a shard set with pyarrow alone, as a user without this package would."""
    folder = store_dir / "shards" / "digits" / split / model
    manifest = json.loads((folder / "manifest.json").read_text())
    tables = [feather.read_table(folder / f["path"]) for f in manifest["files"]]
    cols = {c: np.concatenate([np.stack(t[c].to_numpy(zero_copy_only=False)) if c in ("logits", "features")
                               else t[c].to_numpy() for t in tables]) for c in ("index", "label", "logits", "features")}
    return cols


def test_outputs_and_counts(grid):
    tmp, spec, outcome, lines = grid
    assert outcome.exit_code == 0, outcome.failures
    assert lines[-1] == "pairs: computed=18 reused=0 failed=0"
    out = tmp / "g"
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 18 and set(results["method"]) == {"ridge", "sgd"}
    for col in ["source", "target", "train_dataset", "train_split", "test_dataset", "test_split", "alpha",
                "train_rows", "test_rows", "mse", "mse_total_seed", "r2", "agreement", "cosine", "seconds", "versions"]:
        assert col in results.columns
    assert (results["train_rows"] == 1257).all() and (results["test_rows"] == 540).all()
    agree = pd.read_csv(out / "agreement.csv", index_col=0)
    nested = json.loads((out / "agreement.json").read_text())
    assert agree.shape == (3, 3)
    for s in agree.index:
        for t in agree.columns:
            row = results[(results.source == s) & (results.target == t) & (results.method == "ridge")]
            assert nested[s][t] == pytest.approx(float(row["agreement"].iloc[0]))
            assert agree.loc[s, t] == pytest.approx(float(row["agreement"].iloc[0]))
    models = pd.read_parquet(out / "models.parquet")
    assert set(models["model"]) == {"mlp", "cnn", "lite0"}
    lite = models.set_index("model").loc["lite0"]
    assert lite["logits_dim"] == 1000 and lite["features_dim"] == 1280
    assert (out / "spec.resolved.yaml").read_text().count(str(tmp / "store")) == 1
    assert (out / "index.html").stat().st_size > 100_000


def test_ridge_results_match_independent_fit(grid):
    """Refit every ridge pair with scikit-learn on the shards read by pyarrow; metrics computed in numpy."""
    tmp, spec, outcome, _ = grid
    results = outcome.results.set_index(["source", "target", "method"])
    for s, t in spec.pairs:
        row = results.loc[(s, t, "ridge")]
        ztr, ftr = _arrays(tmp / "store", s, "train")["logits"], _arrays(tmp / "store", t, "train")["features"]
        te_s, te_t = _arrays(tmp / "store", s, "test"), _arrays(tmp / "store", t, "test")
        z64, f64 = ztr.astype(np.float64), ftr.astype(np.float64)
        alpha = float(row["alpha"])
        if alpha == 0:  # numpy's lstsq, cutoff at the float32 rounding of the stored logits (README, Maths)
            zc = z64 - z64.mean(0)
            s_max = np.linalg.norm(zc, 2)
            rcond = max(np.finfo(float).eps * max(zc.shape), 2.0**-24 * np.linalg.norm(z64) / s_max)
            coef = np.linalg.lstsq(zc, f64 - f64.mean(0), rcond=rcond)[0]
            f_hat = (te_s["logits"] - z64.mean(0)) @ coef + f64.mean(0)
        else:
            f_hat = Ridge(alpha=alpha, solver="svd").fit(z64, f64).predict(te_s["logits"].astype(np.float64))
        f = te_t["features"].astype(np.float64)
        mse = np.mean((f - f_hat) ** 2)
        r2 = 1 - ((f - f_hat) ** 2).sum() / ((f - f.mean(0)) ** 2).sum()
        h = load_file(tmp / "store" / "shards" / "digits" / "test" / t / "head.safetensors")
        agree = np.mean((f @ h["weight"].T + h["bias"]).argmax(1) == (f_hat @ h["weight"].T + h["bias"]).argmax(1))
        assert row["mse"] == pytest.approx(mse, rel=1e-3), (s, t)
        assert row["r2"] == pytest.approx(r2, rel=1e-3, abs=1e-4), (s, t)
        assert row["agreement"] == pytest.approx(agree, abs=2 / 540), (s, t)


def test_self_pairs_agree_exactly_with_least_squares(grid, tmp_path):
    """alpha = 0: B's head on the reconstruction reproduces B's logits, so agreement is 1.0 (DESIGN.md)."""
    tmp, *_ = grid
    spec = load_spec(_spec(tmp, "self", "pairs: self\nfit: {alpha: 0}\n"))
    lines = []
    outcome = run_grid(spec, progress=False, echo=lines.append)
    assert outcome.exit_code == 0 and lines[-1] == "pairs: computed=3 reused=0 failed=0"
    assert (outcome.results["agreement"] == 1.0).all(), outcome.results[["source", "agreement"]]
    assert (outcome.results["alpha"] == 0).all()


def test_rerun_reuses_everything(grid):
    tmp, spec, _, _ = grid
    lines = []
    outcome = run_grid(spec, progress=False, echo=lines.append)
    assert lines[-1] == "pairs: computed=0 reused=18 failed=0"
    assert len(outcome.results) == 18


def test_grid_report_renders_in_chromium(grid):
    """The real grid's report: three heatmaps drawn, every model labelled, no console or page errors."""
    from browser import inspect_html

    _, spec, outcome, _ = grid
    seen = inspect_html(
        outcome.report,
        [".js-plotly-plot", ".js-plotly-plot .heatmaplayer"],
        wait_for="document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3",
    )
    assert seen.counts[".js-plotly-plot"] >= 3 and seen.counts[".js-plotly-plot .heatmaplayer"] >= 3
    assert not seen.console_errors and not seen.page_errors and not seen.dialogs and not seen.external_requests
    for key in spec.models:
        assert key in seen.text


def test_model_level_cka_matches_direct_computation(grid):
    """cka_features.json / cka_logits.json against Kornblith's linear CKA computed in numpy on the shards."""
    tmp, spec, *_ = grid
    for column in ("features", "logits"):
        saved = json.loads((tmp / "g" / f"cka_{column}.json").read_text())
        assert saved["models"] == ["mlp", "cnn", "lite0"] and saved["rows"] == 540
        reps = {m: _arrays(tmp / "store", m, "test")[column].astype(np.float64) for m in saved["models"]}
        for i, a in enumerate(saved["models"]):
            for j, b in enumerate(saved["models"]):
                x, y = reps[a] - reps[a].mean(0), reps[b] - reps[b].mean(0)
                direct = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
                assert saved["cka"][i][j] == pytest.approx(direct, rel=1e-6), (column, a, b)
    assert "Representation similarity" in (tmp / "g" / "index.html").read_text()


def test_similarity_table_from_the_shards(grid):
    """similarity.parquet: every measure for every ordered pair, features and logits; linear CKA and mutual kNN
    (k = 10) recomputed here from the shards read with pyarrow alone."""
    tmp, *_ = grid
    sim = pd.read_parquet(tmp / "g" / "similarity.parquet")
    models = ["mlp", "cnn", "lite0"]
    assert set(sim["representation"]) == {"features", "logits"} and set(sim["setting"]) == {"digits"}
    assert len(sim) == sim["measure"].nunique() * 2 * len(models) ** 2
    for column in ("features", "logits"):
        reps = {m: _arrays(tmp / "store", m, "test")[column].astype(np.float64) for m in models}
        for a in models:
            for b in models:
                got = sim.set_index(["measure", "representation", "model_a", "model_b"])["value"]
                x, y = reps[a] - reps[a].mean(0), reps[b] - reps[b].mean(0)
                cka = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
                assert got[("linear_cka", column, a, b)] == pytest.approx(cka, rel=1e-5)
                na = reps[a] / np.linalg.norm(reps[a], axis=1, keepdims=True)
                nb = reps[b] / np.linalg.norm(reps[b], axis=1, keepdims=True)
                ka, kb = na @ na.T, nb @ nb.T
                np.fill_diagonal(ka, -np.inf)
                np.fill_diagonal(kb, -np.inf)
                ia, ib = np.argsort(-ka, axis=1)[:, :10], np.argsort(-kb, axis=1)[:, :10]
                mutual = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(ia, ib, strict=True)])
                assert got[("mutual_knn", column, a, b)] == pytest.approx(mutual, abs=1e-9)


def test_unwritable_store_exits_2_before_any_work(tmp_path):
    """A store under a regular file cannot be created (even as root): exit 2, one line, nothing written."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    spec = _spec(tmp_path, "bad", "pairs: self\n").read_text().replace(str(tmp_path / "store"), str(blocker / "store"))
    (tmp_path / "bad.yaml").write_text(spec)
    proc = subprocess.run([sys.executable, "-m", "featrec_grid.cli", "run", str(tmp_path / "bad.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"store: '{blocker / 'store'}' is (inside) a file, not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


SLOW_SGD = "fit: {method: sgd, sgd: {epochs: 40}}\n"  # seeded, slow enough to land a signal mid-grid
RESULT_KEYS = ["source", "target", "method"]
NUMBERS = ["train_rows", "test_rows", "mse", "mse_total_seed", "r2", "agreement", "cosine", "accuracy_real",
           "accuracy_recon", "agreement_lo", "agreement_hi"]  # fmt: skip


def _cli_run(spec):
    return [sys.executable, "-m", "featrec_grid.cli", "run", str(spec), "--no-progress"]


def _wait_for_pairs(out, proc, deadline_s=240):
    deadline = time.time() + deadline_s
    while time.time() < deadline and not list((out / "pairs").glob("*.json")):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.2)


def _numbers(output):
    frame = pd.read_parquet(output / "results.parquet").sort_values(RESULT_KEYS).reset_index(drop=True)
    return frame[RESULT_KEYS + NUMBERS]


@pytest.fixture(scope="module")
def clean_sgd(grid):
    """The slow SGD grid run start to finish, while a second run of the same spec into the same output and store
    is tried in the middle of it: (output, the second run's outcome)."""
    tmp = grid[0]
    out = tmp / "clean_sgd"
    spec = _spec(tmp, "clean_sgd", SLOW_SGD, output=out)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    first = subprocess.Popen(_cli_run(spec), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_pairs(out, first)
    second = subprocess.run(_cli_run(spec), env=env, capture_output=True, text=True, timeout=120)
    assert first.wait(timeout=300) == 0, first.stdout.read().decode()
    return out, second


def test_a_second_run_of_one_spec_at_once_is_refused_and_the_first_finishes_intact(clean_sgd):
    out, second = clean_sgd
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"{out} is in use by another featrec-grid run (pid " in second.stderr
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    results = _numbers(out)
    assert len(results) == 9 and not results.duplicated(RESULT_KEYS).any() and results["mse"].notna().all()
    for path in (out / "pairs").glob("*.json"):  # every saved pair whole
        json.loads(path.read_text())


@pytest.mark.parametrize("how", ["sigkill", "sigint"])
def test_interrupt_midway_then_resume(grid, clean_sgd, how):
    """SIGKILL of the driver's process group, or Ctrl-C on the driver, while pairs are being fitted: finished
    pairs stay saved, the rerun computes only what was not saved, and every number equals the clean run's."""
    tmp, *_ = grid
    out = tmp / how
    spec = _spec(tmp, how, SLOW_SGD, output=out)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = _cli_run(spec)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=how == "sigkill")
    _wait_for_pairs(out, proc)
    if how == "sigkill":
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130  # Ctrl-C: the documented exit code
    saved = len(list((out / "pairs").glob("*.json")))
    assert 1 <= saved < 9, "the interrupt should land mid-grid"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"pairs: computed={9 - saved} reused={saved} failed=0" in rerun.stdout
    got, want = _numbers(out), _numbers(clean_sgd[0])
    assert got[RESULT_KEYS].equals(want[RESULT_KEYS])
    np.testing.assert_allclose(got[NUMBERS].to_numpy(float), want[NUMBERS].to_numpy(float), rtol=1e-7, atol=0)


def test_local_ray_binds_loopback(tmp_path):
    code = ("import ray; from featrec_grid.runtime import connect; connect(None, 1); "
            "print(sorted({n['NodeManagerAddress'] for n in ray.nodes()})); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['127.0.0.1']"
