"""`featrec-grid cka` on two zoo models: the layer CKA matrix against a direct float64 computation."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featrec_grid.cli import main
from featrec_grid.data import TransformedDataset, load_dataset
from featrec_grid.models import load_classifier
from featrec_grid.spec import load_spec
from featrec_grid.store import Store

pytestmark = pytest.mark.slow

SPEC = """
name: lc
store: {store}
output: {out}
models:
  mlp: {{source: zoo, architecture: mlp, options: {{epochs: 2}}}}
  cnn: {{source: zoo, architecture: cnn, options: {{epochs: 1}}}}
data:
  train: {{dataset: digits, split: train}}
  test: {{dataset: digits, split: test}}
cka: {{pairs: [[mlp, cnn]], max_images: 96, batch_size: 32}}
"""


def _unbiased_hsic(k, l_):
    n = k.shape[0]
    k, l_ = k.copy(), l_.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l_, 0)
    one = np.ones(n)
    return (np.trace(k @ l_) + one @ k @ one * (one @ l_ @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ k @ l_ @ one) / (n * (n - 3))


def test_cka_command_against_direct_minibatch_hsic(tmp_path):
    path = tmp_path / "lc.yaml"
    path.write_text(SPEC.format(store=tmp_path / "store", out=tmp_path / "out"))
    result = CliRunner().invoke(main, ["cka", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    (export,) = json.loads((tmp_path / "out" / "layer_cka.json").read_text())
    got = np.array(export["CKA"])
    assert got.shape == (len(export["model1_layers"]), len(export["model2_layers"]))
    assert np.isfinite(got).all()
    # Independent: capture every named layer with our own hooks, unbiased HSIC per batch in float64, the whole matrix.
    spec = load_spec(path)
    store = Store(spec.store)
    acts = {}
    for key, layers in (("mlp", export["model1_layers"]), ("cnn", export["model2_layers"])):
        clf = load_classifier(spec.models[key], store)
        modules = dict(clf.model.named_modules())
        data = TransformedDataset(load_dataset(spec.test), clf.input.transform())
        outs = {layer: [] for layer in layers}
        handles = [modules[layer].register_forward_hook(lambda m, i, o, out=outs[layer]: out.append(o.detach().flatten(1).double()))
                   for layer in layers]  # fmt: skip
        with torch.no_grad():
            for start in (0, 32, 64):
                clf.model(torch.stack([data[i][0] for i in range(start, start + 32)]))
        for handle in handles:
            handle.remove()
        acts[key] = [[o.numpy() for o in outs[layer]] for layer in layers]
    grams = {key: [[x @ x.T for x in batches] for batches in per_layer] for key, per_layer in acts.items()}
    expected = np.zeros_like(got)
    for i, ks in enumerate(grams["mlp"]):
        for j, ls in enumerate(grams["cnn"]):
            kl = sum(_unbiased_hsic(k, l_) for k, l_ in zip(ks, ls, strict=True))
            kk = sum(_unbiased_hsic(k, k) for k in ks)
            ll = sum(_unbiased_hsic(l_, l_) for l_ in ls)
            expected[i, j] = kl / np.sqrt(kk * ll)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert "Layer-wise CKA" in (tmp_path / "out" / "index.html").read_text()
