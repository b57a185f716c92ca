"""zoo.py: every family builds and trains (mechanics), the store cache is reused, the split is exact; one full run."""

import hashlib
import json

import numpy as np
import pytest
import safetensors.numpy
import torch

from featrec_grid import zoo
from featrec_grid.data import TransformedDataset, load_dataset
from featrec_grid.errors import UserError
from featrec_grid.extract import extract_batch
from featrec_grid.models import load_classifier
from featrec_grid.refs import DataRef, ModelRef
from featrec_grid.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def counted_train(monkeypatch):
    """Count real trainings."""
    calls = []
    real = zoo.train

    def counting(ref):
        calls.append(ref.architecture)
        return real(ref)

    monkeypatch.setattr(zoo, "train", counting)
    return calls


@pytest.mark.parametrize("arch", zoo.ZOO)
def test_family_trains_caches_and_splits_exactly(tmp_path, counted_train, arch):
    store = Store(str(tmp_path))
    ref = ModelRef(f"z-{arch}", "zoo", arch, options={"epochs": 1, "train_limit": 64})
    info = zoo.ensure_trained(ref, store)
    assert info["arch"] == arch and info["epochs"] == 1 and info["img_size"] == 16 and info["params"] > 0
    assert 0.0 <= info["test_accuracy"] <= 1.0 and info["seconds"] > 0
    assert store.exists(f"{zoo.cache_dir(ref)}/weights.safetensors")
    assert zoo.ensure_trained(ref, store) == info  # cached: no second training
    clf = load_classifier(ref, store)
    assert counted_train == [arch]
    assert clf.family == arch and clf.num_classes == 10 and clf.info["label_space"] == "digits"
    assert clf.input.size == 16 and clf.input.mean == clf.input.std == (0.5, 0.5, 0.5)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        f = clf.backbone(x).double()
        expected = clf.model(x).double()
    np.testing.assert_allclose(
        (f @ clf.head_weight.double().T + clf.head_bias.double()).numpy(), expected.numpy(), atol=1e-5
    )
    assert f.shape == (4, clf.feature_dim)


def test_cache_key_and_options(tmp_path):
    a = ModelRef("a", "zoo", "mlp", options={"seed": 1})
    assert zoo.cache_dir(a) == zoo.cache_dir(ModelRef("other-key", "zoo", "mlp", options={"seed": 1}))
    assert zoo.cache_dir(a) != zoo.cache_dir(ModelRef("a", "zoo", "mlp", options={"seed": 2}))
    assert zoo.cache_dir(a) != zoo.cache_dir(ModelRef("a", "zoo", "mlp", options={"seed": 1, "data_seed": 1}))
    assert zoo.cache_dir(a).startswith("zoo/mlp-") and len(zoo.cache_dir(a)) == len("zoo/mlp-") + 12
    with pytest.raises(UserError, match="cnn"):
        zoo.settings(ModelRef("b", "zoo", "cnnn"))
    with pytest.raises(UserError, match="widht"):
        zoo.settings(ModelRef("b", "zoo", "cnn", options={"widht": 3}))
    with pytest.raises(UserError, match="store"):
        load_classifier(ModelRef("b", "zoo", "cnn"))


def test_training_is_seeded():
    ref = ModelRef("m", "zoo", "mlp", options={"epochs": 1, "train_limit": 128})
    first, _ = zoo.train(ref)
    second, _ = zoo.train(ref)
    other, _ = zoo.train(ModelRef("m", "zoo", "mlp", options={"epochs": 1, "train_limit": 128, "seed": 1}))
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters(), strict=True))
    assert not torch.equal(first.head.weight, other.head.weight)


@pytest.mark.slow
def test_cnn_full_training_is_accurate(tmp_path):
    store = Store(str(tmp_path))
    ref = ModelRef("cnn", "zoo", "cnn")
    info = zoo.ensure_trained(ref, store)
    assert info["test_accuracy"] >= 0.9
    # recompute the test accuracy from the cached weights through the extraction path
    clf = load_classifier(ref, store)
    test = load_dataset(DataRef("digits", "test"))
    x, labels, _ = next(
        iter(
            torch.utils.data.DataLoader(TransformedDataset(test, clf.input.transform()), batch_size=len(test))
        )
    )
    _, logits = extract_batch(clf, x, check=True)
    accuracy = float((logits.argmax(1) == labels).double().mean())
    assert accuracy == pytest.approx(info["test_accuracy"], abs=1e-4)
    assert accuracy >= 0.9


def test_damaged_or_deleted_cache_entries_are_retrained(tmp_path, counted_train):
    """A flipped byte in the weights, a deleted weights file, an edited info.json: each is found (sha256 recorded at
    training) and the model trained again to the same weights; rebuild retrains an intact entry too."""
    store = Store(str(tmp_path))
    ref = ModelRef("z", "zoo", "mlp", options={"epochs": 1, "train_limit": 64})
    zoo.ensure_trained(ref, store)
    weights = tmp_path / zoo.cache_dir(ref) / "weights.safetensors"
    info_path = tmp_path / zoo.cache_dir(ref) / "info.json"
    original = weights.read_bytes()
    info = json.loads(info_path.read_text())
    assert info["weights_sha256"] == hashlib.sha256(original).hexdigest()

    damaged = bytearray(original)
    damaged[-5] ^= 0x40  # inside the last tensor's data: safetensors still parses it
    weights.write_bytes(bytes(damaged))
    clf = load_classifier(ref, store)
    assert counted_train == ["mlp", "mlp"] and weights.read_bytes() == original
    expected = safetensors.numpy.load(original)
    for name, tensor in clf.model.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), expected[name])

    weights.unlink()
    zoo.ensure_trained(ref, store)
    assert counted_train == ["mlp"] * 3 and weights.read_bytes() == original

    info_path.write_text(json.dumps({**info, "test_accuracy": 1.0}))
    assert zoo.ensure_trained(ref, store)["test_accuracy"] == info["test_accuracy"]
    assert len(counted_train) == 4

    zoo.ensure_trained(ref, store)
    assert len(counted_train) == 4  # intact: reused
    zoo.ensure_trained(ref, store, rebuild=True)
    assert len(counted_train) == 5 and weights.read_bytes() == original
