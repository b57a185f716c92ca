"""Small classifiers of different architectures, trained on the digits train split on first use and cached in the Store."""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.numpy
import torch
from torch import nn

from featrec_grid.data import load_dataset
from featrec_grid.errors import UserError
from featrec_grid.models import (
    Classifier,
    InputConfig,
    linear_params,
    make_classifier,
    register_source,
    split_timm,
    state_digest,
)
from featrec_grid.refs import DataRef, ModelRef
from featrec_grid.store import payload_digest

if TYPE_CHECKING:
    from featrec_grid.store import Store

RECIPE_VERSION = 1
NUM_CLASSES = 10
MEAN_STD = (0.5, 0.5, 0.5)
OPTIONS = ("seed", "img_size", "epochs", "lr", "batch_size", "data_seed", "train_limit")
# Per architecture: default epochs and peak learning rate (AdamW, one-cycle), tuned for 16 px digits on 2 cores.
RECIPES: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 30, "lr": 2e-3},
    "cnn": {"epochs": 10, "lr": 3e-3},
    "resnet": {"epochs": 15, "lr": 3e-3},
    "vit": {"epochs": 20, "lr": 1e-3},
    "mixer": {"epochs": 20, "lr": 2e-3},
    "convnext": {"epochs": 15, "lr": 3e-3},
}
ZOO = tuple(RECIPES)


class SplitNet(nn.Module):
    """features (images -> [N, D]) followed by a linear head; the split is the module structure itself."""

    def __init__(self, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _mlp(size: int) -> nn.Module:
    features = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * size * size, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU()
    )
    return SplitNet(features, nn.Linear(128, NUM_CLASSES))


def _cnn(size: int) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    features = nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    return SplitNet(features, nn.Linear(128, NUM_CLASSES))


def _resnet(size: int) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    # resnet10t's layout (one block per stage, tiered deep stem, avg-pool downsampling) at half the width
    return ResNet(
        block=BasicBlock, layers=(1, 1, 1, 1), stem_width=16, stem_type="deep_tiered", avg_down=True,
        channels=(32, 64, 128, 256), num_classes=NUM_CLASSES,
    )  # fmt: skip


def _vit(size: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=size,
        patch_size=4,
        embed_dim=96,
        depth=4,
        num_heads=3,
        mlp_ratio=2.0,
        num_classes=NUM_CLASSES,
    )


def _mixer(size: int) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    # built directly: timm's registered mixer_s16_224 rejects a patch_size override
    return MlpMixer(img_size=size, patch_size=4, num_blocks=4, embed_dim=96, num_classes=NUM_CLASSES)


def _convnext(size: int) -> nn.Module:
    from timm.models.convnext import ConvNeXt

    # convnext_atto's blocks, one per stage, narrower; a 2 px stem and output stride 8 (the last two stages
    # dilate instead of striding) so that 16 px inputs keep a 2 x 2 map to the end
    return ConvNeXt(
        depths=(1, 1, 1, 1), dims=(32, 64, 96, 128), patch_size=2, output_stride=8, num_classes=NUM_CLASSES
    )


BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet": _resnet,
    "vit": _vit,
    "mixer": _mixer,
    "convnext": _convnext,
}


def settings(ref: ModelRef) -> dict[str, Any]:
    """The full training settings of a zoo ref: recipe defaults overlaid with its options (validated)."""
    if ref.architecture not in BUILDERS:
        close = difflib.get_close_matches(ref.architecture, ZOO, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"model {ref.key}: zoo architecture {ref.architecture!r} is unknown{hint}; allowed: {', '.join(ZOO)}"
        )
    unknown = sorted(set(ref.options) - set(OPTIONS))
    if unknown:
        raise UserError(f"model {ref.key}: zoo options {unknown} are unknown; allowed: {', '.join(OPTIONS)}")
    s = {"seed": 0, "img_size": 16, "batch_size": 64, "data_seed": 0, "train_limit": None}
    s.update(RECIPES[ref.architecture])
    s.update(ref.options)
    return s


def cache_dir(ref: ModelRef) -> str:
    """zoo/<arch>-<digest12>: the digest covers architecture, settings (incl. data split seed), recipe version."""
    payload = {"arch": ref.architecture, "settings": settings(ref), "recipe": RECIPE_VERSION}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"zoo/{ref.architecture}-{digest}"


def input_config(ref: ModelRef) -> InputConfig:
    """Zoo models see digits resized to img_size with mean = std = 0.5."""
    return InputConfig(size=int(settings(ref)["img_size"]), mean=MEAN_STD, std=MEAN_STD)


INFO_DIGEST = "info_sha256"  # info.json field: payload_digest of every other field


def ensure_trained(ref: ModelRef, store: Store, rebuild: bool = False) -> dict[str, Any]:
    """Train the zoo model on the digits train split unless the store holds it intact; returns its info.

    A cached entry is used only when info.json matches its checksum and weights.safetensors its recorded sha256;
    a damaged, edited or deleted file is retrained (same seed, same model) and rewritten, as is every entry with
    `rebuild`."""
    return _cached_or_trained(ref, store, rebuild)[0]


def is_cached(ref: ModelRef, store: Store) -> bool:
    """Whether the store holds this zoo model intact (checksums match): ensure_trained would train nothing."""
    return _read_cached(store, cache_dir(ref))[0] is not None


def _cached_or_trained(ref: ModelRef, store: Store, rebuild: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(info, state dict as numpy arrays) of the verified cache entry, training and storing it first if needed."""
    rel = cache_dir(ref)
    cached, reason = (None, "rebuild requested") if rebuild else _read_cached(store, rel)
    if cached is not None:
        return cached
    if store.exists(f"{rel}/info.json") or store.exists(f"{rel}/weights.safetensors"):
        print(f"zoo model {ref.key}: {store.full_path(rel)} {reason}; training it again", file=sys.stderr)
    model, info = train(ref)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata={"arch": ref.architecture})
    info = {**info, "weights_sha256": hashlib.sha256(data).hexdigest()}
    store.write_bytes(f"{rel}/weights.safetensors", data)
    store.write_json(f"{rel}/info.json", {**info, INFO_DIGEST: payload_digest(info)})  # last: marks a complete entry
    return info, state


def _read_cached(store: Store, rel: str) -> tuple[tuple[dict[str, Any], dict[str, np.ndarray]] | None, str]:
    """((info, state), "") for an intact cache entry, else (None, why it cannot be used)."""
    try:
        info = store.read_json(f"{rel}/info.json")
        data = store.read_bytes(f"{rel}/weights.safetensors")
    except UserError as err:
        return None, f"is incomplete ({err})"
    if not isinstance(info, dict) or info.get(INFO_DIGEST) != payload_digest(
        {k: v for k, v in info.items() if k != INFO_DIGEST}
    ):
        return None, "has an info.json that does not match its checksum"
    if info.get("weights_sha256") != hashlib.sha256(data).hexdigest():
        return None, "has a weights.safetensors that does not match its recorded sha256"
    info.pop(INFO_DIGEST)
    return (info, safetensors.numpy.load(data)), ""


@register_source("zoo", check=settings)
def load_zoo_classifier(ref: ModelRef, store: Store | None) -> Classifier:
    """The trained zoo model (training it first if needed) split into backbone + head."""
    if store is None:
        raise UserError(f"model {ref.key}: zoo models are trained and cached in a store; pass one")
    info, state = _cached_or_trained(ref, store, rebuild=False)
    s = settings(ref)
    model = BUILDERS[ref.architecture](int(s["img_size"]))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    model.eval()
    if isinstance(model, SplitNet):
        backbone, (W, b) = model.features, linear_params(model.head)
    else:
        backbone, W, b = split_timm(model, f"zoo model {ref.key}")
    extra = {
        "label_space": "digits",
        **{k: info[k] for k in ("test_accuracy", "train_accuracy", "epochs", "params")},
    }
    return make_classifier(
        ref, model, backbone, W, b, input_config(ref), state_digest(model), info["family"], extra
    )


def train(ref: ModelRef) -> tuple[nn.Module, dict[str, Any]]:
    """Train one zoo model from its seed (deterministic order), return it in eval mode with its info.

    Runs on one intra-op thread: these models are tiny, and on a busy 2-core machine two OpenMP threads made
    the cnn's training 10x slower (129 s against 11 s), with identical results.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(ref)
    finally:
        torch.set_num_threads(before)


def _train(ref: ModelRef) -> tuple[nn.Module, dict[str, Any]]:
    from tqdm import tqdm

    s = settings(ref)
    transform = input_config(ref).transform()
    split = {"seed": int(s["data_seed"])}
    x_train, y_train = _tensors(load_dataset(DataRef("digits", "train", split)), transform, s["train_limit"])
    x_test, y_test = _tensors(load_dataset(DataRef("digits", "test", split)), transform, None)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(s["seed"]))
        model = BUILDERS[ref.architecture](int(s["img_size"]))
        epochs, batch = int(s["epochs"]), int(s["batch_size"])
        steps = epochs * -(-len(x_train) // batch)
        opt = torch.optim.AdamW(model.parameters(), lr=float(s["lr"]), weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=float(s["lr"]), total_steps=steps, pct_start=0.2
        )
        order = torch.Generator().manual_seed(int(s["seed"]))
        model.train()
        for _ in tqdm(
            range(epochs), desc=f"zoo {ref.key} ({ref.architecture})", file=sys.stderr, leave=False
        ):
            for idx in torch.randperm(len(x_train), generator=order).split(batch):
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    info = {
        "arch": ref.architecture,
        "family": ref.architecture,
        "test_accuracy": _accuracy(model, x_test, y_test),
        "train_accuracy": _accuracy(model, x_train, y_train),
        "epochs": epochs,
        "img_size": int(s["img_size"]),
        "seed": int(s["seed"]),
        "seconds": round(time.perf_counter() - start, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "settings": s,
        "recipe_version": RECIPE_VERSION,
    }
    return model, info


def _tensors(dataset: Any, transform: Callable, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    images, labels = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack([transform(im) for im in images]), torch.tensor(labels, dtype=torch.int64)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(512)])
    return round(float((pred == y).float().mean()), 4)
