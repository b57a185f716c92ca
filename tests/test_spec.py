"""Spec validation: every malformed spec exits 2 with one short message naming file, field and value."""

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from featrec_grid.cli import main
from featrec_grid.spec import load_spec

GOOD = """
name: t
store: {store}
models:
  a: {{source: zoo, architecture: mlp}}
  b: {{source: zoo, architecture: cnn}}
data:
  train: {{dataset: digits, split: train}}
  test: {{dataset: digits, split: test}}
"""


def _write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_spec_defaults_and_pairs(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD.format(store=tmp_path / "s")))
    assert spec.pairs == (("a", "a"), ("a", "b"), ("b", "a"), ("b", "b"))
    assert spec.fit.methods == ("ridge",) and 0.0 in spec.fit.alphas
    assert spec.store == str(tmp_path / "s")
    resolved = spec.resolved()
    assert resolved["store"] == str(tmp_path / "s") and resolved["fit"]["sgd"]["epochs"] == 100


BAD = [
    ("", "spec.yaml: the spec file is empty"),
    ("name: [unclosed", "invalid YAML"),
    ("name: t\nmodels: {{a: 1}}\n", "line 2: a mapping key must be a plain value"),
    (GOOD.replace("models:", "modles:"), "unknown field 'modles'"),
    (GOOD.replace("models:", "modles:"), "did you mean 'models'"),
    ("name: t\nmodels: {}\ndata: {train: {dataset: digits}, test: {dataset: digits}}\n", "models: the model list is empty"),
    (GOOD.replace("source: zoo, architecture: cnn", "source: hub, architecture: cnn"),
     "models.b.source: 'hub' is not one of timm, torchvision, checkpoint, zoo, lite"),
    (GOOD.replace("architecture: cnn", "architecture: cnnn"), "models.b.architecture: 'cnnn' is not one of"),
    (GOOD.replace("dataset: digits, split: test", "dataset: mnist, split: test"),
     "data.test.dataset: 'mnist' is not one of digits, cifar10"),
    (GOOD.replace("  b: {{source: zoo", "  a: {{source: zoo"),
     "duplicate key 'a'"),
    (GOOD + "pairs: [[a, c]]\n", "pairs[0]: 'c' is not one of a, b"),
    (GOOD + "fit: {{alpha: -1}}\n", "fit.alpha: -1 is not a number >= 0"),
    (GOOD + "fit: {{method: lbfgs}}\n", "fit.method: 'lbfgs' is not one of ridge, sgd"),
    (GOOD + "resources: {{num_cpus: 0}}\n", "resources.num_cpus: 0 is not an integer in [1, 4096]"),
    (GOOD.replace("split: test", "split: train"), "data.test: is the same split as data.train"),
    (GOOD.replace("split: test}}", "split: test, options: {{seed: 3}}}}"),
     "data.test.options: digits split (seed 3, test_fraction 0.3) differs from the one zoo model 'a' trains on"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_spec_exits_2_with_message(tmp_path, text, message):
    spec = _write(tmp_path, text.format(store=tmp_path / "s") if "{store}" in text else text)
    result = CliRunner().invoke(main, ["plan", str(spec)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert str(spec) in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_file_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml: spec file not found" in result.output


def test_real_process_prints_no_traceback(tmp_path):
    spec = _write(tmp_path, GOOD.format(store=tmp_path).replace("models:", "modles:"))
    proc = subprocess.run([sys.executable, "-m", "featrec_grid.cli", "run", str(spec)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown field 'modles'" in proc.stderr


def test_plan_prints_every_task(tmp_path):
    spec = _write(tmp_path, GOOD.format(store=tmp_path / "s") + "fit: {method: [ridge, sgd]}\n")
    result = CliRunner().invoke(main, ["plan", str(spec)])
    assert result.exit_code == 0, result.output
    # 2 zoo trainings + 4 extractions + 2 source stats + 4 pairs x 2 methods + 2 head analyses + 2 model-level CKA
    # + 2 similarity tasks (features, logits)
    assert "22 tasks, 22 to do" in result.output
    assert "fit a -> b [sgd]" in result.output and "train_zoo a" in result.output
