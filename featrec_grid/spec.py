"""Grid spec: YAML -> validated GridSpec, with one short message per mistake (file, field, value, what is allowed).

A spec names models (key -> source, architecture, weights, options), the train and test data, which
ordered pairs to fit, how to fit and what resources to ask for. Relative paths resolve against the
current directory, as for any command-line path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .refs import DATASETS, MODEL_SOURCES, TRANSFORMS, DataRef, ModelRef

METHODS = ("ridge", "sgd", "mlp")
MODES = ("default", "faithful")
PAIR_MODES = ("all", "self")
ZOO_ARCHITECTURES = ("mlp", "cnn", "resnet", "vit", "mixer", "convnext")
LITE_ARCHITECTURES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # always fullmatch: no trailing newline slips through
MAX_DEPTH = 32  # YAML nesting a spec may use
MAX_NODES = 100_000  # YAML nodes after expanding aliases (an alias bomb expands to billions)

TOP_FIELDS = ("name", "description", "store", "output", "models", "data", "pairs", "fit", "modes", "faithful",
              "seed_results", "resources", "inversion", "cka", "report")  # fmt: skip
SETTING_FIELDS = ("label", "train", "test")
FAITHFUL_FIELDS = ("crop", "method")
SEED_RESULT_FIELDS = ("setting", "source", "target", "metric", "value", "note")
SEED_METRICS = ("agreement", "mse_total_seed", "mse", "r2")
MODEL_FIELDS = ("source", "architecture", "weights", "options")
DATA_FIELDS = ("dataset", "split", "options")
FIT_FIELDS = ("method", "alpha", "self_alpha", "val_fraction", "sgd", "mlp")
MLP_FIELDS = ("trials", "pairs", "search", "max_epochs", "patience", "batch_size")
SGD_FIELDS = ("epochs", "lr", "momentum", "batch_size", "seed")
PRECISIONS = ("fp32", "bf16")

DEFAULT_ALPHAS = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
SGD_DEFAULTS = {"epochs": 100, "lr": 0.1, "momentum": 0.9, "batch_size": 256, "seed": 0}


@dataclass(frozen=True)
class FitSpec:
    """How maps are fitted: methods, alpha (one value, or a grid chosen on held-out train rows)."""

    methods: tuple[str, ...] = ("ridge",)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    val_fraction: float = 0.2
    sgd: dict[str, Any] = field(default_factory=lambda: dict(SGD_DEFAULTS))
    mlp: dict[str, Any] = field(default_factory=dict)
    self_alpha: float | None = None  # a fixed alpha for self pairs (0: least squares, agreement exactly 1.0)
    mlp_pairs: tuple[tuple[str, str], ...] | None = None  # None: every pair of the spec

    def pairs_for(self, method: str, pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """The pairs `method` runs on: all of them, except that fit.mlp.pairs may narrow the MLP map to a subset."""
        return self.mlp_pairs if method == "mlp" and self.mlp_pairs is not None else pairs


@dataclass(frozen=True)
class Setting:
    """One (fit data, test data) combination; `label` names it in results, file names and the report."""

    label: str
    train: DataRef
    test: DataRef


@dataclass(frozen=True)
class Cell:
    """One setting run in one mode: the data refs extraction reads (the seed's transform in faithful mode) and the
    fit settings its pairs use (the seed's SGD recipe in faithful mode)."""

    setting: str
    mode: str
    train: DataRef
    test: DataRef
    fit: FitSpec


def _doc(text: str, **limits: Any) -> Any:
    """Field metadata: the one-line doc the README and `featrec-grid schema` show, and limits the checker applies."""
    return {"doc": text, **limits}


@dataclass(frozen=True)
class Resources:
    """What tasks ask Ray for; GPU shares only when the cluster has GPUs (runtime.clamp)."""

    num_cpus: int | None = field(default=None, metadata=_doc(
        "CPUs of the single-node Ray a local run starts (default: all of this machine's; ignored with --address)",
        low=1, high=4096))
    batch_size: int | str = field(default=64, metadata=_doc(
        "extraction batch size, or 'auto': the largest power of two that fits the GPU (64 on CPU)", low=1, high=65536))
    precision: str = field(default="fp32", metadata=_doc(
        "fp32, or bf16: autocast of the backbone during extraction (shards stay float32, own cache key)",
        choices=PRECISIONS))
    gpus_per_extract: float = field(default=1.0, metadata=_doc(
        "GPUs (or a share) each extraction and zoo training task asks for, where the cluster has GPUs", low=0.0,
        high=8.0))
    gpus_per_fit: float = field(default=0.25, metadata=_doc(
        "GPU share of each SGD fit, MLP trial and layer-CKA task, where the cluster has GPUs", low=0.0, high=1.0))
    max_retries: int = field(default=2, metadata=_doc("Ray retries of a task whose worker died", low=0, high=100))
    rows_per_shard: int = field(default=65536, metadata=_doc("rows per Arrow shard file", low=16, high=2**31))
    cpus_per_extract: int | None = field(default=None, metadata=_doc(
        "CPUs (DataLoader workers) of each extraction task; default: a GPU node's CPUs per GPU (at most 4) when the "
        "task gets a GPU, else 1", low=1, high=256))
    rows_per_task: int = field(default=1_000_000, metadata=_doc(
        "split a (model, split) into row ranges of about this many rows, each its own task (and GPU); smaller "
        "splits stay one task", low=1))


@dataclass(frozen=True)
class CkaSpec:
    """The `cka:` block: layer-wise CKA of model pairs (`featrec-grid cka`)."""

    pairs: tuple[tuple[str, str], ...] | None = field(
        default=None, metadata=_doc("[model, model] pairs to compare; default: every pair of models the spec uses"))
    layers: dict[str, tuple[str, ...]] = field(
        default_factory=dict, metadata=_doc("model key -> module names to compare (default: every leaf module with parameters)"))
    max_images: int = field(default=512, metadata=_doc("test images compared (the first ones)", low=4))
    batch_size: int = field(default=64, metadata=_doc("images per minibatch (unbiased HSIC needs > 3)", low=4,
                                                      high=65536))
    max_features: int | None = field(default=None, metadata=_doc(
        "average-pool wider layer outputs to at most this many features per image; default: no pooling", low=1))


@dataclass(frozen=True)
class ReportSpec:
    """The `report:` block: how the report states uncertainty."""

    ci: float = field(default=0.95, metadata=_doc("confidence level of the bootstrap intervals", low=0.5, high=0.999))
    resamples: int = field(default=1000, metadata=_doc("bootstrap resamples over test images (the same for every pair)",
                                                       low=1, high=100_000))
    seed: int = field(default=0, metadata=_doc("seed of the bootstrap resampling", low=0))


ZOO_OPTIONS = ("seed", "img_size", "epochs", "lr", "batch_size", "data_seed", "train_limit")
# Model and data options: name -> (type, doc, limits). Unknown option names are refused for zoo models (zoo.OPTIONS);
# for the other sources they are passed on unchanged.
MODEL_OPTIONS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "img_size": (int, "input side in pixels (zoo default 16; others: the model's own)", {"low": 4, "high": 4096}),
    "mean": (tuple[float, float, float], "input normalisation mean (R, G, B)", {}),
    "std": (tuple[float, float, float], "input normalisation std (R, G, B)", {"low": 1e-6}),
    "interpolation": (str, "resize interpolation (bilinear, bicubic, nearest)", {"choices": ("bilinear", "bicubic",
                                                                                            "nearest")}),
    "crop_pct": (float, "center-crop fraction after resize", {"low": 0.05, "high": 1.0}),
    "label_space": (str, "name of the label space (models sharing it are scored on labels)", {}),
    "num_classes": (int, "classes of a freshly built head (timm, torchvision)", {"low": 1}),
    "seed": (int, "seed of random initialisation (and of zoo training)", {"low": 0}),
    "epochs": (int, "zoo: training epochs (default per architecture)", {"low": 1, "high": 10_000}),
    "lr": (float, "zoo: peak learning rate (AdamW, one-cycle)", {"low": 1e-8, "high": 10.0}),
    "batch_size": (int, "zoo: training batch size", {"low": 1, "high": 65536}),
    "data_seed": (int, "zoo: seed of the digits split it trains on (must match the data's seed)", {"low": 0}),
    "train_limit": (int | None, "zoo: train on the first N train images only", {"low": 1}),
}
DATA_OPTIONS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "root": (str, "directory holding the dataset files (cifar, places365, folder)", {}),
    "download": (bool, "download missing CIFAR/Places365 files through torchvision (also --download)", {}),
    "seed": (int, "digits: seed of the stratified split", {"low": 0}),
    "test_fraction": (float, "digits: test share of the split", {"low": 0.01, "high": 0.99}),
    "view": (str, "digits: an altered view of the images", {"choices": ("noisy", "inverted")}),
    "noise": (float, "digits view noisy: noise std as a fraction of the pixel range", {"low": 0.0, "high": 10.0}),
    "noise_seed": (int, "digits view noisy: seed of the noise", {"low": 0}),
    "limit": (int, "use the first N images of the split", {"low": 1}),
    "transform": (str, "model: each model's own preprocessing; seed: the FeatReconstruct seed's CenterCrop",
                  {"choices": TRANSFORMS}),
    "crop": (int, "transform seed: CenterCrop size (default: the model's input size)", {"low": 1, "high": 4096}),
    "label_space": (str, "folder: name of its label space", {}),
}


@dataclass(frozen=True)
class GridSpec:
    """A validated grid: model references by key, the data, ordered pairs, fitting and resources."""

    name: str
    path: str
    store: str
    output: str
    models: dict[str, ModelRef]
    settings: tuple[Setting, ...]
    pairs: tuple[tuple[str, str], ...]
    fit: FitSpec
    resources: Resources
    description: str = ""
    modes: tuple[str, ...] = ("default",)
    faithful: dict[str, Any] = field(default_factory=dict)
    seed_results: tuple[dict[str, Any], ...] = ()
    inversion: dict[str, Any] = field(default_factory=dict)
    cka: CkaSpec = field(default_factory=CkaSpec)
    report: ReportSpec = field(default_factory=ReportSpec)

    @property
    def train(self) -> DataRef:
        """The first setting's fit data (what `invert` and `cka` use)."""
        return self.settings[0].train

    @property
    def test(self) -> DataRef:
        """The first setting's test data (what `invert`, `cka` and the model-level CKA use)."""
        return self.settings[0].test

    def with_download(self) -> GridSpec:
        """The same spec with `download: true` on every dataset (the --download flag)."""
        def dl(d: DataRef) -> DataRef:
            return DataRef(d.dataset, d.split, {**d.options, "download": True})

        return replace(self, settings=tuple(Setting(st.label, dl(st.train), dl(st.test)) for st in self.settings))

    def cells(self) -> list[Cell]:
        """Every (setting, mode) in order. Faithful mode reproduces the FeatReconstruct seed: its data transform
        (CenterCrop without resize, ImageNet mean/std; `faithful.crop` pixels, default each model's input size)
        and its fitter (`faithful.method`, default the SGD recipe with the seed's hyperparameters)."""
        out = []
        for st in self.settings:
            for mode in self.modes:
                if mode == "default":
                    out.append(Cell(st.label, mode, st.train, st.test, self.fit))
                    continue
                seed_view = {"transform": "seed", **({"crop": self.faithful["crop"]} if "crop" in self.faithful else {})}
                train, test = (DataRef(d.dataset, d.split, {**d.options, **seed_view}) for d in (st.train, st.test))
                fit = replace(self.fit, methods=tuple(self.faithful.get("method", ("sgd",))), sgd=dict(SGD_DEFAULTS))
                out.append(Cell(st.label, mode, train, test, fit))
        return out

    def resolved(self) -> dict[str, Any]:
        """The spec with every default filled in and absolute locations: what spec.resolved.yaml holds."""
        return {
            "name": self.name,
            "description": self.description,
            "store": self.store,
            "output": self.output,
            "models": {
                k: {"source": m.source, "architecture": m.architecture, "weights": m.weights, "options": dict(m.options)}
                for k, m in self.models.items()
            },
            "data": [
                {"label": st.label, **{
                    part: {"dataset": d.dataset, "split": d.split, "options": dict(d.options)}
                    for part, d in (("train", st.train), ("test", st.test))
                }}
                for st in self.settings
            ],
            "pairs": [list(p) for p in self.pairs],
            "fit": {
                "method": list(self.fit.methods),
                "alpha": list(self.fit.alphas),
                "self_alpha": self.fit.self_alpha,
                "val_fraction": self.fit.val_fraction,
                "sgd": dict(self.fit.sgd),
                **({"mlp": {**self.fit.mlp, **({"pairs": [list(p) for p in self.fit.mlp_pairs]}
                                               if self.fit.mlp_pairs is not None else {})}}
                   if "mlp" in self.fit.methods else {}),  # fmt: skip
            },
            "modes": list(self.modes),
            **({"faithful": dict(self.faithful)} if "faithful" in self.modes else {}),
            **({"seed_results": [dict(r) for r in self.seed_results]} if self.seed_results else {}),
            "resources": dict(self.resources.__dict__),
            **({"inversion": self.inversion} if self.inversion else {}),
            "cka": _plain(dataclasses.asdict(self.cka)),
            "report": dataclasses.asdict(self.report),
        }


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (1e-3 is a number, not a string), string keys only, duplicate keys refused,
    merge keys (<<) honoured."""


_SpecLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: _SpecLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise UserError(f"{loader.name}: line {line}: a mapping key must be a plain value (a name), got a "
                            f"{'mapping' if isinstance(key_node, yaml.MappingNode) else 'list'}")  # fmt: skip
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):
            hint = " (YAML reads yes/no/on/off/true/false as booleans)" if isinstance(key, bool) else ""
            raise UserError(f"{loader.name}: line {line}: key {key_node.value!r} must be a name{hint}; "
                            f"quote it ('{key_node.value}') if you mean the text")  # fmt: skip
        if key in seen:
            raise UserError(f"{loader.name}: line {line}: duplicate key {key!r} (first at line {seen[key]}); "
                            "each key may appear once")  # fmt: skip
        seen[key] = line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check_size(path: str, root: yaml.Node | None) -> None:
    """Refuse YAML nested deeper than MAX_DEPTH or expanding (through aliases) to more than MAX_NODES nodes."""
    stack: list[tuple[yaml.Node, int]] = [(root, 1)] if root is not None else []
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise UserError(f"{path}: line {node.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels; "
                            "a spec needs a handful")  # fmt: skip
        if nodes > MAX_NODES:
            raise UserError(f"{path}: expands to more than {MAX_NODES:,} values (through aliases); a spec needs "
                            "far fewer: write the values out")  # fmt: skip
        if isinstance(node, yaml.MappingNode):
            stack.extend((n, depth + 1) for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((n, depth + 1) for n in node.value)


class _Checker:
    """Carries the file name so every message starts with it, and collects the problems of a whole spec: a
    block that fails stops at its first problem, the other blocks are still checked."""

    def __init__(self, path: str):
        self.path = path
        self.errors: list[str] = []
        self.limits: dict[str, dict[str, Any]] = {}  # limits by dotted field path, for dataclasses without metadata

    def fail(self, where: str, msg: str) -> UserError:
        return UserError(f"{self.path}: {where}: {msg}")

    @contextmanager
    def block(self) -> Iterator[None]:
        """Check one block: its first UserError is recorded and checking goes on with the next block."""
        try:
            yield
        except UserError as err:
            self.errors.append(str(err))

    def raise_errors(self) -> None:
        if len(self.errors) == 1:
            raise UserError(self.errors[0])
        if self.errors:
            raise UserError(f"{len(self.errors)} problems:\n" + "\n".join(self.errors))

    def mapping(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {_show(value)}")
        return value

    def fields(self, value: dict, allowed: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> None:
        missing = [r for r in required if r not in value]
        for k in value:
            if k not in allowed:  # a misspelt required field is the likelier meaning ('modles' -> models, not modes)
                hint = difflib.get_close_matches(str(k), missing, n=1) or difflib.get_close_matches(str(k), allowed, n=1)
                did = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.fail(where, f"unknown field {k!r} (allowed: {', '.join(allowed)}){did}")
        for k in required:
            if k not in value or value[k] is None:
                raise self.fail(f"{where}.{k}" if where != "spec" else k, "missing required field")

    def choice(self, value: Any, allowed: tuple[str, ...], where: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            raise self.fail(where, f"{_show(value)} is not one of {', '.join(allowed)}{did}")
        return value

    def number(self, value: Any, where: str, *, low: float, high: float = float("inf"), integer: bool = False):
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or not math.isfinite(value) or not (low <= value <= high):
            kind = "an integer" if integer else "a number"
            rng = f">= {_num(low)}" if high == float("inf") else f"in [{_num(low)}, {_num(high)}]"
            rng = "" if low == -float("inf") and high == float("inf") else " " + rng
            finite = " (infinity and NaN mean nothing here)" if ok and not isinstance(value, bool) else ""
            raise self.fail(where, f"{_show(value)} is not {kind}{rng}{finite}")
        return value

    def name(self, value: Any, where: str, what: str = "a name") -> str:
        if not isinstance(value, str) or not KEY_RE.fullmatch(value):
            raise self.fail(where, f"{_show(value)} must be {what}: 1-64 characters of letters, digits, '_', '.', "
                                   "'+', '-', starting with a letter or digit")  # fmt: skip
        return value

    def typed(self, value: Any, kind: Any, where: str, limits: dict[str, Any] | None = None) -> Any:
        """`value` checked against a type annotation (int, float, str, bool, X | None, tuple[X, ...], tuple[X, Y],
        dict[str, X], a dataclass) and `limits` (low, high, choices); returns it with lists made tuples."""
        limits = limits or {}
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.typed(value, inner[0], where, limits)
        if origin is tuple:
            if not isinstance(value, list | tuple):
                raise self.fail(where, f"{_show(value)} must be a list")
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.typed(v, args[0], f"{where}[{i}]", limits) for i, v in enumerate(value))
            if len(value) != len(args):
                raise self.fail(where, f"{_show(value)} must be a list of {len(args)} values")
            return tuple(self.typed(v, a, f"{where}[{i}]", limits) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        if origin is dict:
            return {k: self.typed(v, args[1], f"{where}.{k}", limits) for k, v in self.mapping(value, where).items()}
        if dataclasses.is_dataclass(kind):
            return typed_block(self, value, kind, where)
        if kind is bool:
            if not isinstance(value, bool):
                raise self.fail(where, f"{_show(value)} must be true or false")
            return value
        if kind is str:
            if not isinstance(value, str):
                raise self.fail(where, f"{_show(value)} must be a string")
            if "choices" in limits:
                self.choice(value, tuple(limits["choices"]), where)
            return value
        if kind in (int, float):
            return self.number(value, where, low=limits.get("low", -float("inf")), high=limits.get("high", float("inf")),
                               integer=kind is int)  # fmt: skip
        return value


def typed_block(ck: _Checker, value: Any, kind: type, where: str) -> Any:
    """A mapping checked field by field against dataclass `kind` (types from its annotations, limits from each field's
    metadata or from ck.limits by dotted path), unknown fields refused with a did-you-mean; returns kind(**values)."""
    value = ck.mapping(value, where)
    hints = typing.get_type_hints(kind)
    known = {f.name: f for f in dataclasses.fields(kind)}
    ck.fields(value, tuple(known), where)
    out = {}
    for name, v in value.items():
        limits = dict(known[name].metadata) or ck.limits.get(f"{where}.{name}", {})
        out[name] = ck.typed(v, hints[name], f"{where}.{name}", limits)
    return kind(**out)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what YAML writes back as the spec a user would write."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_spec(path: str | os.PathLike) -> GridSpec:
    """Read and validate a spec file; every problem raises UserError naming file, field, value, allowed."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: spec file not found" if not p.exists() else f"{path}: not a file")
    data = p.read_bytes()
    if b"\x00" in data:
        raise UserError(f"{path}: holds NUL bytes: not a YAML text file (UTF-16 or binary?); save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); save it as "
                        "UTF-8") from None  # fmt: skip
    if not text.strip():
        raise UserError(f"{path}: the spec file is empty; it needs at least name, models and data")
    try:
        loader = _SpecLoader(text)
        loader.name = str(path)
        try:
            root = loader.get_single_node()
            _check_size(str(path), root)
            raw = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{path}: {line}invalid YAML: {problem}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to read; a spec needs a handful of levels") from None
    return parse_spec(raw, str(path))


def parse_spec(raw: Any, path: str = "<spec>") -> GridSpec:
    """Validate an already-parsed spec mapping (what load_spec does after reading YAML). Every block is checked;
    the UserError lists the first problem of each block that has one, one line each."""
    ck = _Checker(path)
    if raw is None:
        raise UserError(f"{path}: the spec file is empty; it needs at least name, models and data")
    ck.mapping(raw, "spec")
    ck.fields(raw, TOP_FIELDS, "spec", required=("name", "models", "data"))
    got: dict[str, Any] = {}

    def check(name: str, fn, *args) -> None:
        with ck.block():
            got[name] = fn(*args)

    check("name", ck.name, raw["name"], "name", "a spec name")
    check("models", _models, ck, raw["models"])
    keys = list(got.get("models") or (raw["models"] if isinstance(raw["models"], dict) else []))
    check("settings", _settings, ck, raw["data"])
    if "models" in got and "settings" in got:
        for i, st in enumerate(got["settings"]):
            check(f"zoo_split{i}", _check_zoo_split, ck, got["models"], st,
                  f"data[{i}]" if isinstance(raw["data"], list) else "data")  # fmt: skip
    check("pairs", _pairs, ck, raw.get("pairs", "all"), keys)
    check("fit", _fit, ck, raw.get("fit") or {}, keys)
    check("modes", _modes, ck, raw.get("modes", ["default"]))
    check("faithful", _faithful, ck, raw.get("faithful") or {})
    if "settings" in got:
        check("seed_results", _seed_results, ck, raw.get("seed_results") or [], got["settings"], keys)
    check("resources", _resources, ck, raw.get("resources") or {})
    check("cka", _cka, ck, raw.get("cka") or {}, keys)
    check("report", typed_block, ck, raw.get("report") or {}, ReportSpec, "report")
    check("inversion", _inversion, ck, raw.get("inversion") or {})
    store = raw.get("store", "store")
    output = raw.get("output", f"reports/{raw['name']}")
    for fname, value in (("store", store), ("output", output)):
        if not isinstance(value, str) or not value.strip():
            ck.errors.append(str(ck.fail(fname, f"{_show(value)} must be a path or URI string")))
    ck.raise_errors()
    return GridSpec(
        name=got["name"],
        path=path,
        store=absolute_location(store),
        output=absolute_location(output),
        models=got["models"],
        settings=got["settings"],
        pairs=got["pairs"],
        fit=got["fit"],
        resources=got["resources"],
        description=str(raw.get("description") or ""),
        modes=got["modes"],
        faithful=got["faithful"],
        seed_results=got.get("seed_results", ()),
        inversion=got["inversion"],
        cka=got["cka"],
        report=got["report"],
    )


def _cka(ck: _Checker, value: Any, keys: list[str]) -> CkaSpec:
    block = typed_block(ck, value, CkaSpec, "cka")
    for i, pair in enumerate(block.pairs or ()):
        for k in pair:
            ck.choice(k, tuple(keys), f"cka.pairs[{i}]")
    for k in block.layers:
        ck.choice(k, tuple(keys), "cka.layers")
    return block


def _inversion(ck: _Checker, value: Any) -> dict[str, Any]:
    """The `inversion:` block checked field by field against InversionConfig (types, limits, unknown fields), then
    built once so its own consistency checks run too; kept as the plain mapping the spec gave."""
    block = ck.mapping(value, "inversion")
    if not block:
        return {}
    from .invert.run import InversionConfig

    ck.limits = {f"inversion.{k}": v for k, v in INVERSION_LIMITS.items()}
    typed_block(ck, block, InversionConfig, "inversion")
    InversionConfig.from_dict(block)  # its own cross-field checks
    return dict(block)


# Limits of the `inversion:` fields (their types come from InversionConfig, OptimSettings and DecoderConfig).
INVERSION_LIMITS: dict[str, dict[str, Any]] = {
    "seeds": {"low": 0},
    "classes": {"low": 0},
    "max_classes": {"low": 1},
    "combine_weights": {"low": 0.0},
    "untrained_seed": {"low": 0},
    "gallery_items": {"low": 1, "high": 100},
    "manipulation_items": {"low": 1, "high": 100},
    "threads": {"low": 1, "high": 256},
    "gpus": {"low": 0.0, "high": 1.0},
    "control_seeds": {"low": 1},
    "mimic_classes": {"low": 0},
    "optim.fourier_lr": {"low": 0.0, "high": 100.0},
    "optim.phase_lr": {"low": 0.0, "high": 100.0},
    "optim.robustness": {"low": 0.0, "high": 10.0},
    "optim.decay_power": {"low": 0.0, "high": 10.0},
    "optim.steps": {"low": 1, "high": 100_000},
    "optim.lr": {"low": 0.0, "high": 100.0},
    "optim.blur_sigma": {"low": 0.0, "high": 100.0},
    "optim.blur_every": {"low": 1},
    "optim.jitter": {"low": 0, "high": 1024},
    "optim.noise_mean": {"low": 0.0, "high": 1.0},
    "optim.noise_scale": {"low": 0.0, "high": 10.0},
    "optim.size": {"low": 4, "high": 4096},
    "decoder.size": {"low": 4, "high": 1024},
    "decoder.z_dim": {"low": 1},
    "decoder.embed_dim": {"low": 1},
    "decoder.channels": {"low": 1},
    "decoder.epochs": {"low": 1, "high": 100_000},
    "decoder.batch_size": {"low": 2, "high": 65536},
    "decoder.lr": {"low": 0.0, "high": 10.0},
    "decoder.adv_weight": {"low": 0.0},
    "decoder.seed": {"low": 0},
    "decoder.max_seconds": {"low": 0.0},
}


def absolute_location(location: str) -> str:
    """A local path made absolute; a URI (s3://, gs://, file://) kept as it is."""
    if "://" in location:
        return location
    return str(Path(location).expanduser().absolute())


def _models(ck: _Checker, value: Any) -> dict[str, ModelRef]:
    if value is None or (isinstance(value, dict | list) and not value):
        raise ck.fail("models", "the model list is empty; name at least one model")
    ck.mapping(value, "models")
    out: dict[str, ModelRef] = {}
    for key, m in value.items():
        where = f"models.{key}"
        ck.name(key, where, "a model key")
        ck.mapping(m, where)
        ck.fields(m, MODEL_FIELDS, where, required=("source", "architecture"))
        source = ck.choice(m["source"], MODEL_SOURCES, f"{where}.source")
        arch = m["architecture"]
        if not isinstance(arch, str):
            raise ck.fail(f"{where}.architecture", f"{_show(arch)} must be a string")
        if source == "zoo":
            ck.choice(arch, ZOO_ARCHITECTURES, f"{where}.architecture")
        elif source == "lite":
            ck.choice(arch, LITE_ARCHITECTURES, f"{where}.architecture")
        elif source == "checkpoint":
            if not re.match(r"^(timm|torchvision):\S+$", arch):
                raise ck.fail(f"{where}.architecture", f"{_show(arch)} must be 'timm:<name>' or 'torchvision:<name>'")
            if not m.get("weights"):
                raise ck.fail(f"{where}.weights", "a checkpoint model needs weights: the path of its weight file")
        weights = m.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise ck.fail(f"{where}.weights", f"{_show(weights)} must be a string (a name or a file path)")
        table = {k: MODEL_OPTIONS[k] for k in ZOO_OPTIONS} if source == "zoo" else MODEL_OPTIONS
        options = _options(ck, m.get("options") or {}, table, f"{where}.options", strict=source == "zoo")
        out[key] = ModelRef(key=key, source=source, architecture=arch, weights=weights, options=dict(options))
    return out


def _settings(ck: _Checker, value: Any) -> tuple[Setting, ...]:
    """`data` is one {train, test} mapping, or a list of them each with a `label` (fit on one, test on another)."""
    if isinstance(value, list):
        if not value:
            raise ck.fail("data", "the list of settings is empty; give at least one {label, train, test}")
        out = []
        for i, item in enumerate(value):
            where = f"data[{i}]"
            ck.mapping(item, where)
            ck.fields(item, SETTING_FIELDS, where, required=SETTING_FIELDS)
            label = ck.name(item["label"], f"{where}.label", "a setting label")
            if label in [st.label for st in out]:
                raise ck.fail(f"{where}.label", f"duplicate label {label!r}; each setting needs its own")
            out.append(Setting(label, *_data(ck, item, where)))
        return tuple(out)
    train, test = _data(ck, value, "data")
    label = train.key if train.key == test.key else f"{train.key}_to_{test.key}"
    return (Setting(label, train, test),)


def _data(ck: _Checker, value: Any, where_data: str) -> tuple[DataRef, DataRef]:
    ck.mapping(value, where_data)
    if where_data == "data":
        ck.fields(value, ("train", "test"), "data", required=("train", "test"))
    refs = []
    for part in ("train", "test"):
        where = f"{where_data}.{part}"
        d = ck.mapping(value[part], where)
        ck.fields(d, DATA_FIELDS, where, required=("dataset",))
        dataset = ck.choice(d["dataset"], DATASETS, f"{where}.dataset")
        split = ck.name(d.get("split", part), f"{where}.split", "a split name such as 'train' or 'test'")
        options = _options(ck, d.get("options") or {}, DATA_OPTIONS, f"{where}.options", strict=True)
        refs.append(DataRef(dataset=dataset, split=split, options=dict(options)))
    if refs[0] == refs[1]:
        raise ck.fail(f"{where_data}.test", f"is the same split as {where_data}.train; test on held-out data")
    return refs[0], refs[1]


def _options(ck: _Checker, value: Any, table: dict[str, tuple[Any, str, dict]], where: str, *, strict: bool) -> dict:
    """Options checked against `table` (type, doc, limits); names outside it are refused when `strict`."""
    options = ck.mapping(value, where)
    if strict:
        ck.fields(options, tuple(table), where)
    for name, v in options.items():
        if name in table:
            kind, _, limits = table[name]
            ck.typed(v, kind, f"{where}.{name}", limits)
    return dict(options)


def _check_zoo_split(ck: _Checker, models: dict[str, ModelRef], setting: Setting, where: str) -> None:
    """Zoo models train on one digits split; evaluating them on another would test on training rows."""
    for d, part in ((setting.train, "train"), (setting.test, "test")):
        if d.dataset != "digits":
            continue
        seed, fraction = d.options.get("seed", 0), d.options.get("test_fraction", 0.3)
        for key, m in models.items():
            if m.source == "zoo" and (m.options.get("data_seed", 0) != seed or fraction != 0.3):
                raise ck.fail(
                    f"{where}.{part}.options",
                    f"digits split (seed {seed}, test_fraction {fraction}) differs from the one zoo model {key!r} "
                    f"trains on (seed {m.options.get('data_seed', 0)}, test_fraction 0.3): its test rows would "
                    "overlap its training rows; set the model's options.data_seed to the same seed",
                )


def _pairs(ck: _Checker, value: Any, keys: list[str], field_name: str = "pairs") -> tuple[tuple[str, str], ...]:
    if value == "all":
        return tuple((a, b) for a in keys for b in keys)
    if value == "self":
        return tuple((a, a) for a in keys)
    if not isinstance(value, list) or not value:
        raise ck.fail(field_name, f"{_show(value)} must be 'all', 'self' or a list of [source, target] pairs")
    out = []
    for i, p in enumerate(value):
        where = f"{field_name}[{i}]"
        if not (isinstance(p, list) and len(p) == 2):
            raise ck.fail(where, f"{_show(p)} must be a [source, target] pair of model keys")
        for k in p:
            ck.choice(k, tuple(keys), where)
        if tuple(p) in out:
            raise ck.fail(where, f"duplicate pair {_show(p)}")
        out.append(tuple(p))
    return tuple(out)


def _modes(ck: _Checker, value: Any) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value:
        raise ck.fail("modes", f"{_show(value)} must be a list of {', '.join(MODES)}")
    for i, m in enumerate(value):
        ck.choice(m, MODES, f"modes[{i}]")
    return tuple(dict.fromkeys(value))


def _faithful(ck: _Checker, value: Any) -> dict[str, Any]:
    ck.mapping(value, "faithful")
    ck.fields(value, FAITHFUL_FIELDS, "faithful")
    out = dict(value)
    if "crop" in out:
        ck.number(out["crop"], "faithful.crop", low=1, integer=True)
    if "method" in out:
        methods = [out["method"]] if isinstance(out["method"], str) else out["method"]
        if not isinstance(methods, list) or not methods:
            raise ck.fail("faithful.method", f"{_show(out['method'])} must be one of {', '.join(METHODS)} or a list")
        for i, m in enumerate(methods):
            ck.choice(m, METHODS, f"faithful.method[{i}]")
        out["method"] = list(dict.fromkeys(methods))
    return out


def _seed_results(
    ck: _Checker, value: Any, settings: tuple[Setting, ...], keys: list[str]
) -> tuple[dict[str, Any], ...]:
    """The seed's published numbers, shown beside ours in the report: setting, source, target, metric, value."""
    if not isinstance(value, list):
        raise ck.fail("seed_results", f"{_show(value)} must be a list of {{setting, source, target, metric, value}}")
    labels = tuple(st.label for st in settings)
    out = []
    for i, item in enumerate(value):
        where = f"seed_results[{i}]"
        ck.mapping(item, where)
        ck.fields(item, SEED_RESULT_FIELDS, where, required=("source", "target", "metric", "value"))
        setting = ck.choice(item.get("setting", labels[0]), labels, f"{where}.setting")
        for k in ("source", "target"):
            ck.choice(item[k], tuple(keys), f"{where}.{k}")
        ck.choice(item["metric"], SEED_METRICS, f"{where}.metric")
        ck.number(item["value"], f"{where}.value", low=-float("inf"))
        out.append({"setting": setting, **{k: item[k] for k in ("source", "target", "metric", "value")},
                    "note": str(item.get("note") or "")})  # fmt: skip
    return tuple(out)


def _fit(ck: _Checker, value: Any, keys: list[str]) -> FitSpec:
    ck.mapping(value, "fit")
    ck.fields(value, FIT_FIELDS, "fit")
    methods = value.get("method", "ridge")
    methods = [methods] if isinstance(methods, str) else methods
    if not isinstance(methods, list) or not methods:
        raise ck.fail("fit.method", f"{_show(methods)} must be one of {', '.join(METHODS)} or a list of them")
    for i, m in enumerate(methods):
        ck.choice(m, METHODS, f"fit.method[{i}]" if len(methods) > 1 else "fit.method")
    alphas = value.get("alpha", list(DEFAULT_ALPHAS))
    alphas = [alphas] if not isinstance(alphas, list) else alphas
    if not alphas:
        raise ck.fail("fit.alpha", "the alpha grid is empty; give a number >= 0 or a list of them")
    for i, a in enumerate(alphas):
        ck.number(a, f"fit.alpha[{i}]" if len(alphas) > 1 else "fit.alpha", low=0.0)
    val = ck.number(value.get("val_fraction", 0.2), "fit.val_fraction", low=0.01, high=0.9)
    self_alpha = value.get("self_alpha")
    if self_alpha is not None:
        self_alpha = float(ck.number(self_alpha, "fit.self_alpha", low=0.0))
    sgd = ck.mapping(value.get("sgd") or {}, "fit.sgd")
    ck.fields(sgd, SGD_FIELDS, "fit.sgd")
    for k in ("epochs", "batch_size"):
        if k in sgd:
            ck.number(sgd[k], f"fit.sgd.{k}", low=1, integer=True)
    for k in ("lr", "momentum"):
        if k in sgd:
            ck.number(sgd[k], f"fit.sgd.{k}", low=0.0)
    mlp = ck.mapping(value.get("mlp") or {}, "fit.mlp")
    ck.fields(mlp, MLP_FIELDS, "fit.mlp")
    for k in ("trials", "max_epochs", "patience", "batch_size"):
        if k in mlp:
            ck.number(mlp[k], f"fit.mlp.{k}", low=1, integer=True)
    search = ck.mapping(mlp.get("search") or {}, "fit.mlp.search")
    if search:
        from .mlpmap import MLPConfig  # the searched names are its fields

        hints = typing.get_type_hints(MLPConfig)
        ck.fields(search, tuple(hints), "fit.mlp.search")
        for k, v in search.items():
            if not isinstance(v, list) or not v:
                raise ck.fail(f"fit.mlp.search.{k}", f"{_show(v)} must be a non-empty list of candidate values")
            for i, candidate in enumerate(v):
                ck.typed(candidate, hints[k], f"fit.mlp.search.{k}[{i}]", {"low": 0})
    mlp_pairs = _pairs(ck, mlp["pairs"], keys, "fit.mlp.pairs") if "pairs" in mlp else None
    return FitSpec(
        methods=tuple(dict.fromkeys(methods)),
        alphas=tuple(float(a) for a in dict.fromkeys(alphas)),
        val_fraction=float(val),
        sgd={**SGD_DEFAULTS, **sgd},
        mlp={k: v for k, v in mlp.items() if k != "pairs"},
        self_alpha=self_alpha,
        mlp_pairs=mlp_pairs,
    )


def _resources(ck: _Checker, value: Any) -> Resources:
    value = dict(ck.mapping(value, "resources"))
    auto = value.get("batch_size") == "auto"
    if auto:
        value.pop("batch_size")
    r = typed_block(ck, value, Resources, "resources")
    return replace(r, batch_size="auto") if auto else r
