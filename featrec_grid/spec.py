"""Grid spec: YAML -> validated GridSpec, with one short message per mistake (file, field, value, what is allowed).

A spec names models (key -> source, architecture, weights, options), the train and test data, which
ordered pairs to fit, how to fit and what resources to ask for. Relative paths resolve against the
current directory, as for any command-line path.
"""

from __future__ import annotations

import difflib
import os
import re
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
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")

TOP_FIELDS = ("name", "description", "store", "output", "models", "data", "pairs", "fit", "modes", "faithful",
              "seed_results", "resources", "inversion", "cka")  # fmt: skip
SETTING_FIELDS = ("label", "train", "test")
FAITHFUL_FIELDS = ("crop", "method")
SEED_RESULT_FIELDS = ("setting", "source", "target", "metric", "value", "note")
SEED_METRICS = ("agreement", "mse_total_seed", "mse", "r2")
MODEL_FIELDS = ("source", "architecture", "weights", "options")
DATA_FIELDS = ("dataset", "split", "options")
FIT_FIELDS = ("method", "alpha", "self_alpha", "val_fraction", "sgd", "mlp")
MLP_FIELDS = ("trials", "pairs", "search", "max_epochs", "patience", "batch_size")
SGD_FIELDS = ("epochs", "lr", "momentum", "batch_size", "seed")
RESOURCE_FIELDS = ("num_cpus", "batch_size", "precision", "gpus_per_extract", "gpus_per_fit", "max_retries",
                   "rows_per_shard")  # fmt: skip
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


@dataclass(frozen=True)
class Resources:
    """What tasks ask Ray for; GPUs only when the cluster has them (grid.py checks)."""

    num_cpus: int | None = None
    batch_size: int | str = 64  # or "auto": the largest power of two that fits the GPU (64 on CPU)
    precision: str = "fp32"  # bf16: autocast of the backbone on extraction; shards stay float32
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
    settings: tuple[Setting, ...]
    pairs: tuple[tuple[str, str], ...]
    fit: FitSpec
    resources: Resources
    description: str = ""
    modes: tuple[str, ...] = ("default",)
    faithful: dict[str, Any] = field(default_factory=dict)
    seed_results: tuple[dict[str, Any], ...] = ()
    inversion: dict[str, Any] = field(default_factory=dict)
    cka: dict[str, Any] = field(default_factory=dict)

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
                fit = FitSpec(methods=tuple(self.faithful.get("method", ("sgd",))), alphas=self.fit.alphas,
                              val_fraction=self.fit.val_fraction, sgd=dict(SGD_DEFAULTS), mlp=self.fit.mlp,
                              self_alpha=self.fit.self_alpha, mlp_pairs=self.fit.mlp_pairs)  # fmt: skip
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
    settings = _settings(ck, raw["data"])
    for i, st in enumerate(settings):
        _check_zoo_split(ck, models, st, f"data[{i}]" if isinstance(raw["data"], list) else "data")
    pairs = _pairs(ck, raw.get("pairs", "all"), list(models))
    fit = _fit(ck, raw.get("fit") or {}, list(models))
    modes = _modes(ck, raw.get("modes", ["default"]))
    faithful = _faithful(ck, raw.get("faithful") or {})
    seed_results = _seed_results(ck, raw.get("seed_results") or [], settings, list(models))
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
        settings=settings,
        pairs=pairs,
        fit=fit,
        resources=resources,
        description=str(raw.get("description") or ""),
        modes=modes,
        faithful=faithful,
        seed_results=seed_results,
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
            label = item["label"]
            if not isinstance(label, str) or not KEY_RE.match(label):
                raise ck.fail(f"{where}.label", f"{_show(label)} must be 1-64 characters of letters, digits, '_', '.', '+', '-'")
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
        split = d.get("split", part)
        if not isinstance(split, str) or not KEY_RE.match(split):
            raise ck.fail(f"{where}.split", f"{_show(split)} must be a split name such as 'train' or 'test'")
        options = ck.mapping(d.get("options") or {}, f"{where}.options")
        if "transform" in options:
            ck.choice(options["transform"], TRANSFORMS, f"{where}.options.transform")
        refs.append(DataRef(dataset=dataset, split=split, options=dict(options)))
    if refs[0] == refs[1]:
        raise ck.fail(f"{where_data}.test", f"is the same split as {where_data}.train; test on held-out data")
    return refs[0], refs[1]


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
    for k, v in search.items():
        if not isinstance(v, list) or not v:
            raise ck.fail(f"fit.mlp.search.{k}", f"{_show(v)} must be a non-empty list of candidate values")
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
    ck.mapping(value, "resources")
    ck.fields(value, RESOURCE_FIELDS, "resources")
    r = Resources()
    num_cpus = value.get("num_cpus", r.num_cpus)
    if num_cpus is not None:
        ck.number(num_cpus, "resources.num_cpus", low=1, integer=True)
    batch_size = value.get("batch_size", r.batch_size)
    if batch_size != "auto":
        ck.number(batch_size, "resources.batch_size", low=1, integer=True)
    return Resources(
        num_cpus=num_cpus,
        batch_size=batch_size,
        precision=ck.choice(value.get("precision", r.precision), PRECISIONS, "resources.precision"),
        gpus_per_extract=float(
            ck.number(value.get("gpus_per_extract", r.gpus_per_extract), "resources.gpus_per_extract", low=0.0, high=8)
        ),
        gpus_per_fit=float(ck.number(value.get("gpus_per_fit", r.gpus_per_fit), "resources.gpus_per_fit", low=0.0, high=1)),
        max_retries=ck.number(value.get("max_retries", r.max_retries), "resources.max_retries", low=0, integer=True),
        rows_per_shard=ck.number(
            value.get("rows_per_shard", r.rows_per_shard), "resources.rows_per_shard", low=16, integer=True
        ),
    )
