"""Grid spec: YAML -> validated GridSpec, with one short message per mistake (file, field, value, what is allowed).

A spec names models (key -> source, architecture, weights, options), the train and test data, which
ordered pairs to fit, how to fit and what resources to ask for. Relative paths resolve against the
current directory, as for any command-line path.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .refs import DATASETS, MODEL_SOURCES, DataRef, ModelRef

METHODS = ("ridge", "sgd")
PAIR_MODES = ("all", "self")
ZOO_ARCHITECTURES = ("mlp", "cnn", "resnet", "vit", "mixer", "convnext")
LITE_ARCHITECTURES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")

TOP_FIELDS = ("name", "description", "store", "output", "models", "data", "pairs", "fit", "resources", "inversion", "cka")
MODEL_FIELDS = ("source", "architecture", "weights", "options")
DATA_FIELDS = ("dataset", "split", "options")
FIT_FIELDS = ("method", "alpha", "val_fraction", "sgd")
SGD_FIELDS = ("epochs", "lr", "momentum", "batch_size", "seed")
RESOURCE_FIELDS = ("num_cpus", "batch_size", "gpus_per_extract", "gpus_per_fit", "max_retries", "rows_per_shard")

DEFAULT_ALPHAS = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
SGD_DEFAULTS = {"epochs": 100, "lr": 0.1, "momentum": 0.9, "batch_size": 256, "seed": 0}


@dataclass(frozen=True)
class FitSpec:
    """How maps are fitted: methods, alpha (one value, or a grid chosen on held-out train rows)."""

    methods: tuple[str, ...] = ("ridge",)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    val_fraction: float = 0.2
    sgd: dict[str, Any] = field(default_factory=lambda: dict(SGD_DEFAULTS))


@dataclass(frozen=True)
class Resources:
    """What tasks ask Ray for; GPUs only when the cluster has them (grid.py checks)."""

    num_cpus: int | None = None
    batch_size: int = 64
    gpus_per_extract: float = 1.0
    gpus_per_fit: float = 0.25
    max_retries: int = 2
    rows_per_shard: int = 65536


@dataclass(frozen=True)
class GridSpec:
    """A validated grid: model references by key, the data, ordered pairs, fitting and resources."""

    name: str
    path: str
    store: str
    output: str
    models: dict[str, ModelRef]
    train: DataRef
    test: DataRef
    pairs: tuple[tuple[str, str], ...]
    fit: FitSpec
    resources: Resources
    description: str = ""
    inversion: dict[str, Any] = field(default_factory=dict)
    cka: dict[str, Any] = field(default_factory=dict)

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
            "data": {
                part: {"dataset": d.dataset, "split": d.split, "options": dict(d.options)}
                for part, d in (("train", self.train), ("test", self.test))
            },
            "pairs": [list(p) for p in self.pairs],
            "fit": {
                "method": list(self.fit.methods),
                "alpha": list(self.fit.alphas),
                "val_fraction": self.fit.val_fraction,
                "sgd": dict(self.fit.sgd),
            },
            "resources": dict(self.resources.__dict__),
            **({"inversion": self.inversion} if self.inversion else {}),
            **({"cka": self.cka} if self.cka else {}),
        }


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of silently keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str | int | float | bool | type(None)):
            raise UserError(
                f"{loader.name}: line {key_node.start_mark.line + 1}: a mapping key must be a plain value, "
                f"got {type(key).__name__}"
            )
        if key in seen:
            raise UserError(
                f"{loader.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                f"(first at line {seen[key]}); each key may appear once"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Checker:
    """Carries the file name so every message starts with it."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, msg: str) -> UserError:
        return UserError(f"{self.path}: {where}: {msg}")

    def mapping(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {_show(value)}")
        return value

    def fields(self, value: dict, allowed: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> None:
        for k in value:
            if k not in allowed:
                hint = difflib.get_close_matches(str(k), allowed, n=1)
                did = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.fail(where, f"unknown field {k!r} (allowed: {', '.join(allowed)}){did}")
        for k in required:
            if k not in value or value[k] is None:
                raise self.fail(f"{where}.{k}" if where != "spec" else k, "missing required field")

    def choice(self, value: Any, allowed: tuple[str, ...], where: str) -> str:
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            raise self.fail(where, f"{_show(value)} is not one of {', '.join(allowed)}{did}")
        return value

    def number(self, value: Any, where: str, *, low: float, high: float = float("inf"), integer: bool = False):
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or not (low <= value <= high):
            kind = "an integer" if integer else "a number"
            rng = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
            raise self.fail(where, f"{_show(value)} is not {kind} {rng}")
        return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_spec(path: str | os.PathLike) -> GridSpec:
    """Read and validate a spec file; every problem raises UserError naming file, field, value, allowed."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: spec file not found" if not p.exists() else f"{path}: not a file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"{path}: the spec file is empty; it needs at least name, models and data")
    try:
        with open(p, encoding="utf-8") as fh:  # a file stream lets the loader name the file in messages
            raw = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{path}: {line}invalid YAML: {problem}") from None
    return parse_spec(raw, str(path))


def parse_spec(raw: Any, path: str = "<spec>") -> GridSpec:
    """Validate an already-parsed spec mapping (what load_spec does after reading YAML)."""
    ck = _Checker(path)
    if raw is None:
        raise UserError(f"{path}: the spec file is empty; it needs at least name, models and data")
    ck.mapping(raw, "spec")
    ck.fields(raw, TOP_FIELDS, "spec", required=("name", "models", "data"))
    name = raw["name"]
    if not isinstance(name, str) or not KEY_RE.match(name):
        raise ck.fail("name", f"{_show(name)} must be 1-64 characters of letters, digits, '_', '.', '+', '-'")

    models = _models(ck, raw["models"])
    train, test = _data(ck, raw["data"])
    _check_zoo_split(ck, models, (train, test))
    pairs = _pairs(ck, raw.get("pairs", "all"), list(models))
    fit = _fit(ck, raw.get("fit") or {})
    resources = _resources(ck, raw.get("resources") or {})
    store = raw.get("store", "store")
    output = raw.get("output", f"reports/{name}")
    for fname, value in (("store", store), ("output", output)):
        if not isinstance(value, str) or not value.strip():
            raise ck.fail(fname, f"{_show(value)} must be a path or URI string")
    return GridSpec(
        name=name,
        path=path,
        store=absolute_location(store),
        output=absolute_location(output),
        models=models,
        train=train,
        test=test,
        pairs=pairs,
        fit=fit,
        resources=resources,
        description=str(raw.get("description") or ""),
        inversion=dict(ck.mapping(raw.get("inversion") or {}, "inversion")),
        cka=dict(ck.mapping(raw.get("cka") or {}, "cka")),
    )


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
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise ck.fail(where, "a model key must be 1-64 characters of letters, digits, '_', '.', '+', '-'")
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
        options = ck.mapping(m.get("options") or {}, f"{where}.options")
        out[key] = ModelRef(key=key, source=source, architecture=arch, weights=weights, options=dict(options))
    return out


def _data(ck: _Checker, value: Any) -> tuple[DataRef, DataRef]:
    ck.mapping(value, "data")
    ck.fields(value, ("train", "test"), "data", required=("train", "test"))
    refs = []
    for part in ("train", "test"):
        where = f"data.{part}"
        d = ck.mapping(value[part], where)
        ck.fields(d, DATA_FIELDS, where, required=("dataset",))
        dataset = ck.choice(d["dataset"], DATASETS, f"{where}.dataset")
        split = d.get("split", part)
        if not isinstance(split, str) or not KEY_RE.match(split):
            raise ck.fail(f"{where}.split", f"{_show(split)} must be a split name such as 'train' or 'test'")
        options = ck.mapping(d.get("options") or {}, f"{where}.options")
        refs.append(DataRef(dataset=dataset, split=split, options=dict(options)))
    if refs[0] == refs[1]:
        raise ck.fail("data.test", "is the same split as data.train; test on held-out data")
    return refs[0], refs[1]


def _check_zoo_split(ck: _Checker, models: dict[str, ModelRef], data: tuple[DataRef, DataRef]) -> None:
    """Zoo models train on one digits split; evaluating them on another would test on training rows."""
    for d, part in zip(data, ("train", "test"), strict=True):
        if d.dataset != "digits":
            continue
        seed, fraction = d.options.get("seed", 0), d.options.get("test_fraction", 0.3)
        for key, m in models.items():
            if m.source == "zoo" and (m.options.get("data_seed", 0) != seed or fraction != 0.3):
                raise ck.fail(
                    f"data.{part}.options",
                    f"digits split (seed {seed}, test_fraction {fraction}) differs from the one zoo model {key!r} "
                    f"trains on (seed {m.options.get('data_seed', 0)}, test_fraction 0.3): its test rows would "
                    "overlap its training rows; set the model's options.data_seed to the same seed",
                )


def _pairs(ck: _Checker, value: Any, keys: list[str]) -> tuple[tuple[str, str], ...]:
    if value == "all":
        return tuple((a, b) for a in keys for b in keys)
    if value == "self":
        return tuple((a, a) for a in keys)
    if not isinstance(value, list) or not value:
        raise ck.fail("pairs", f"{_show(value)} must be 'all', 'self' or a list of [source, target] pairs")
    out = []
    for i, p in enumerate(value):
        where = f"pairs[{i}]"
        if not (isinstance(p, list) and len(p) == 2):
            raise ck.fail(where, f"{_show(p)} must be a [source, target] pair of model keys")
        for k in p:
            ck.choice(k, tuple(keys), where)
        if tuple(p) in out:
            raise ck.fail(where, f"duplicate pair {_show(p)}")
        out.append(tuple(p))
    return tuple(out)


def _fit(ck: _Checker, value: Any) -> FitSpec:
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
    sgd = ck.mapping(value.get("sgd") or {}, "fit.sgd")
    ck.fields(sgd, SGD_FIELDS, "fit.sgd")
    for k in ("epochs", "batch_size"):
        if k in sgd:
            ck.number(sgd[k], f"fit.sgd.{k}", low=1, integer=True)
    for k in ("lr", "momentum"):
        if k in sgd:
            ck.number(sgd[k], f"fit.sgd.{k}", low=0.0)
    return FitSpec(
        methods=tuple(dict.fromkeys(methods)),
        alphas=tuple(float(a) for a in dict.fromkeys(alphas)),
        val_fraction=float(val),
        sgd={**SGD_DEFAULTS, **sgd},
    )


def _resources(ck: _Checker, value: Any) -> Resources:
    ck.mapping(value, "resources")
    ck.fields(value, RESOURCE_FIELDS, "resources")
    r = Resources()
    num_cpus = value.get("num_cpus", r.num_cpus)
    if num_cpus is not None:
        ck.number(num_cpus, "resources.num_cpus", low=1, integer=True)
    return Resources(
        num_cpus=num_cpus,
        batch_size=ck.number(value.get("batch_size", r.batch_size), "resources.batch_size", low=1, integer=True),
        gpus_per_extract=float(
            ck.number(value.get("gpus_per_extract", r.gpus_per_extract), "resources.gpus_per_extract", low=0.0, high=8)
        ),
        gpus_per_fit=float(ck.number(value.get("gpus_per_fit", r.gpus_per_fit), "resources.gpus_per_fit", low=0.0, high=1)),
        max_retries=ck.number(value.get("max_retries", r.max_retries), "resources.max_retries", low=0, integer=True),
        rows_per_shard=ck.number(
            value.get("rows_per_shard", r.rows_per_shard), "resources.rows_per_shard", low=16, integer=True
        ),
    )
