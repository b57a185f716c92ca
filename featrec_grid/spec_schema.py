"""The spec's reference: its JSON Schema (`featrec-grid schema`, for editors) and the README's field tables.

Typed blocks (resources, cka, report, inversion, model and data options) are read from the declarations spec.py
validates with, so their types, defaults, limits and docs cannot drift; the hand-checked blocks are documented in
HAND_CHECKED below, and a test holds it to the field lists spec.py accepts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from . import spec as S
from .refs import DATASETS, MODEL_SOURCES

_STR, _NUM, _INT, _BOOL = {"type": "string"}, {"type": "number"}, {"type": "integer"}, {"type": "boolean"}


def _list(item: dict) -> dict:
    return {"type": "array", "items": item}


def _one_or_list(item: dict) -> dict:
    return {"anyOf": [item, _list(item)]}


_PAIR = {"type": "array", "items": _STR, "minItems": 2, "maxItems": 2}
_NAME = {"type": "string", "pattern": "^" + S.KEY_RE.pattern + "$"}

# path -> (JSON Schema, default shown, doc) for the fields spec.py checks by hand.
HAND_CHECKED: dict[str, tuple[dict, Any, str]] = {
    "name": (_NAME, None, "the spec's name (required): letters, digits, _ . + -"),
    "description": (_STR, "", "free text shown in the report"),
    "store": (_STR, "store", "where shards live: a local path, s3://bucket/prefix or gs://bucket/prefix"),
    "output": (_STR, "reports/<name>", "the output folder: tables, pair results, report"),
    "models": ({"type": "object"}, None, "model key -> model (required); the key names folders, columns, labels"),
    "models.*.source": ({"enum": list(MODEL_SOURCES)}, None, "where the model comes from (required)"),
    "models.*.architecture": (_STR, None, "zoo/lite name, timm or torchvision name, or timm:/torchvision:<name> for "
                                          "a checkpoint (required)"),
    "models.*.weights": (_STR, None, "timm: pretrained or a file; torchvision: a weights enum (IMAGENET1K_V1) or a "
                                     "file; checkpoint: the weight file (required)"),
    "models.*.options": ({"type": "object"}, {}, "model options, below"),
    "data": ({"type": ["object", "array"]}, None, "{train, test}, or a list of settings {label, train, test} "
                                                  "(required)"),
    "data.label": (_NAME, "<train>_to_<test>", "a setting's name in results and report menus"),
    "data.train": ({"type": "object"}, None, "the split maps are fitted on"),
    "data.test": ({"type": "object"}, None, "the split maps are scored on (held out)"),
    "data.*.dataset": ({"enum": list(DATASETS)}, None, "the dataset (required)"),
    "data.*.split": (_NAME, "train / test", "the split's name"),
    "data.*.options": ({"type": "object"}, {}, "data options, below"),
    "pairs": ({"anyOf": [{"enum": list(S.PAIR_MODES)}, _list(_PAIR)]}, "all",
              "all ordered pairs, self pairs only, or a list of [source, target]"),
    "fit": ({"type": "object"}, {}, "how maps are fitted"),
    "fit.method": (_one_or_list({"enum": list(S.METHODS)}), "ridge", "ridge (closed form), sgd (the seed's recipe), "
                                                                     "mlp (searched with Ray Tune), or a list"),
    "fit.alpha": (_one_or_list(_NUM), list(S.DEFAULT_ALPHAS), "ridge penalty: one value, or a grid chosen on held-out "
                                                              "train rows (0 = least squares)"),
    "fit.self_alpha": (_NUM, None, "a fixed alpha for self pairs (0: least squares, agreement 1.0 when train rows "
                                   "exceed the logits' rank)"),
    "fit.val_fraction": (_NUM, 0.2, "share of train rows held out to choose alpha and stop the MLP"),
    "fit.sgd": ({"type": "object"}, S.SGD_DEFAULTS, "the seed's SGD recipe: epochs, lr, momentum, batch_size, seed"),
    "fit.sgd.epochs": (_INT, 100, "SGD epochs"),
    "fit.sgd.lr": (_NUM, 0.1, "SGD learning rate"),
    "fit.sgd.momentum": (_NUM, 0.9, "SGD momentum"),
    "fit.sgd.batch_size": (_INT, 256, "SGD batch size (data order, no shuffling, as the seed)"),
    "fit.sgd.seed": (_INT, 0, "seed of the map's initialisation"),
    "fit.mlp": ({"type": "object"}, {}, "the MLP map's Ray Tune search"),
    "fit.mlp.trials": (_INT, 4, "configurations sampled per pair"),
    "fit.mlp.pairs": (_list(_PAIR), None, "narrow the MLP map to these pairs (default: every pair)"),
    "fit.mlp.search": ({"type": "object"}, "mlpmap.SEARCH_SPACE", "hyperparameter -> candidate values"),
    "fit.mlp.max_epochs": (_INT, None, "epoch cap of one trial"),
    "fit.mlp.patience": (_INT, None, "epochs without held-out improvement before stopping"),
    "fit.mlp.batch_size": (_INT, None, "MLP batch size"),
    "modes": (_one_or_list({"enum": list(S.MODES)}), ["default"], "default (each model's preprocessing, ridge) and/or "
                                                                  "faithful (the seed's transform and SGD recipe)"),
    "faithful": ({"type": "object"}, {}, "settings of faithful mode"),
    "faithful.crop": (_INT, "the model's input size", "the seed's CenterCrop size (no resize)"),
    "faithful.method": (_one_or_list({"enum": list(S.METHODS)}), ["sgd"], "fitters of faithful mode"),
    "seed_results": (_list({"type": "object"}), [], "published numbers shown beside ours"),
    "seed_results.setting": (_NAME, "the first setting", "which setting the number belongs to"),
    "seed_results.source": (_STR, None, "source model key (required)"),
    "seed_results.target": (_STR, None, "target model key (required)"),
    "seed_results.metric": ({"enum": list(S.SEED_METRICS)}, None, "which metric (required)"),
    "seed_results.value": (_NUM, None, "the published value (required)"),
    "seed_results.note": (_STR, "", "where it comes from"),
    "resources": ({"type": "object"}, {}, "what tasks ask Ray for"),
    "cka": ({"type": "object"}, {}, "layer-wise CKA (`featrec-grid cka`)"),
    "report": ({"type": "object"}, {}, "uncertainty in the report"),
    "inversion": ({"type": "object"}, {}, "logit inversion (`featrec-grid invert`)"),
    "inversion.optim": ({"type": "object"}, {}, "optimisation-based inversion"),
    "inversion.decoder": ({"type": "object"}, {}, "the logit-conditioned decoder"),
}

INVERSION_DOCS: dict[str, str] = {
    "optim": "settings of optimisation-based inversion",
    "seeds": "one optimised image per seed",
    "classes": "classes visualised (default: up to max_classes evenly spaced)",
    "max_classes": "how many classes by default",
    "pair": "the two models of the combined/difference objectives (default: the first two of one label space)",
    "combine_weights": "weights of the two models in the combined objective",
    "match_cross": "also match each model to another model's logits",
    "controls": "controls: untrained (same architecture, random weights), noise (the starting image)",
    "untrained_seed": "seed of the untrained control network",
    "decoder": "the logit-conditioned decoder",
    "decoder_condition": "what the decoder is conditioned on: logits, standardised or log_softmax",
    "decoder_untrained_control": "also train a decoder on an untrained network's logits",
    "gallery_items": "test images shown per reconstruction gallery",
    "manipulation_items": "test images in the logit-manipulation grids",
    "threads": "torch threads per inversion task",
    "gpus": "GPU share of each inversion task, where the cluster has GPUs",
    "stages": "which stages run: class, match, pair, mimic, natural, decoder",
    "parameterisations": "image parameterisations of the optimisation stages: pixels (the seed's, with blur and "
                         "jitter), fourier (decorrelated colour, 1/f spectrum, transformation robustness), phase",
    "objective": "logit (the seed's raw target logit), zscore (standardised by each model's logit statistics) or "
                 "log_softmax: comparable across models without hand-tuned constants",
    "control_seeds": "how many of the seeds the untrained-network control runs (default: all)",
    "mimic": "[mimicking model, source model] pairs: one model reproduces the other's output vector on that "
             "model's own class image (the seed's mimic experiment)",
    "mimic_classes": "classes of the mimic stage (default: classes)",
    "photos": "scikit-image photos used as natural-image targets",
    "per_stage": "stage -> overrides of classes, seeds, parameterisations, controls",
    "optim.fourier_lr": "Adam learning rate of the Fourier parameterisation",
    "optim.phase_lr": "Adam learning rate of the phase-only parameterisation",
    "optim.robustness": "strength of the random pad, jitter, scale and rotation (0 off, 1 Lucid's ranges)",
    "optim.decay_power": "power of the 1/f spectrum scaling of the Fourier parameterisations",
    "optim.steps": "optimisation steps",
    "optim.lr": "learning rate, first and last step (log-linear)",
    "optim.blur_sigma": "Gaussian blur sigma, first and last step",
    "optim.blur_every": "blur every n steps",
    "optim.jitter": "random shift in pixels each step",
    "optim.noise_mean": "mean of the starting noise image",
    "optim.noise_scale": "std of the starting noise image",
    "optim.size": "image side (default: the model's input size)",
    "decoder.size": "output side, a power of two",
    "decoder.z_dim": "noise dimensions",
    "decoder.embed_dim": "conditioning embedding width",
    "decoder.channels": "base channel count",
    "decoder.epochs": "training epochs",
    "decoder.batch_size": "training batch size",
    "decoder.lr": "Adam learning rate",
    "decoder.loss": "l1, hinge (GAN) or l1+hinge",
    "decoder.adv_weight": "weight of the adversarial loss",
    "decoder.seed": "training seed",
    "decoder.max_seconds": "stop training after this long (the epochs run are reported)",
}


def _type_schema(kind: Any, limits: dict[str, Any]) -> dict:
    """JSON Schema of a Python annotation (as spec._Checker.typed reads it) with its limits."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [_type_schema(a, limits) for a in args if a is not type(None)]
        return inner[0] if len(inner) == 1 else {"anyOf": inner}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _list(_type_schema(args[0], limits))
        return {"type": "array", "items": _type_schema(args[0], limits), "minItems": len(args), "maxItems": len(args)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1], limits)}
    if kind is bool:
        return dict(_BOOL)
    if kind is str:
        return {"enum": list(limits["choices"])} if "choices" in limits else dict(_STR)
    if kind in (int, float):
        out = dict(_INT if kind is int else _NUM)
        if limits.get("low") is not None:
            out["minimum"] = limits["low"]
        if limits.get("high") is not None:
            out["maximum"] = limits["high"]
        return out
    return {}


def _dataclass_rows(kind: type, prefix: str, docs: dict[str, str], limits: dict[str, dict]) -> list[tuple]:
    """(path, schema, default, doc) of every field of a dataclass block, nested dataclasses flattened."""
    rows = []
    hints = typing.get_type_hints(kind)
    for f in dataclasses.fields(kind):
        path = f"{prefix}.{f.name}"
        rel = path.split(".", 1)[1]
        lim = dict(f.metadata) or limits.get(rel, {})
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _dataclass_rows(hints[f.name], path, docs, limits)
            continue
        doc = lim.get("doc") or docs.get(rel, "")
        rows.append((path, _type_schema(hints[f.name], lim), S._plain(default), doc))
    return rows


def _option_rows(table: dict, prefix: str) -> list[tuple]:
    return [(f"{prefix}.{k}", _type_schema(kind, limits), None, doc) for k, (kind, doc, limits) in table.items()]


def rows() -> list[tuple[str, dict, Any, str]]:
    """Every documented field: (dotted path, JSON Schema, default, doc), blocks in spec order."""
    from .invert.run import InversionConfig

    out = [(p, *v) for p, v in HAND_CHECKED.items()]
    out += _option_rows(S.MODEL_OPTIONS, "models.*.options")
    out += _option_rows(S.DATA_OPTIONS, "data.*.options")
    out += _dataclass_rows(S.Resources, "resources", {}, {})
    out += _dataclass_rows(S.CkaSpec, "cka", {}, {})
    out += _dataclass_rows(S.ReportSpec, "report", {}, {})
    out += _dataclass_rows(InversionConfig, "inversion", INVERSION_DOCS, S.INVERSION_LIMITS)
    return out


def json_schema() -> dict:
    """A JSON Schema (draft 2020-12) of spec files: every field typed and described; unknown fields refused."""
    root: dict = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "featrec_grid spec",
                  "type": "object", "required": ["name", "models", "data"]}  # fmt: skip
    split: dict = {"type": "object", "required": ["dataset"], "additionalProperties": False}
    for path, schema, default, doc in rows():
        node = {**schema, "description": doc, **({"default": default} if default is not None else {})}
        parts = path.split(".")
        if parts[0] == "data" and len(parts) > 1:
            if parts[1] == "*":
                _insert(split, parts[2:], node)
            continue
        _insert(root, parts, node)
    data = root["properties"]["data"]
    docs = {k: HAND_CHECKED[f"data.{k}"][2] for k in ("label", "train", "test")}
    one = {"type": "object", "additionalProperties": False, "required": ["train", "test"],
           "properties": {k: {**split, "description": docs[k]} for k in ("train", "test")}}  # fmt: skip
    setting = {**one, "required": ["label", "train", "test"],
               "properties": {**one["properties"], "label": {**_NAME, "description": docs["label"]}}}  # fmt: skip
    root["properties"]["data"] = {"description": data["description"], "anyOf": [one, _list(setting)]}
    root["properties"]["models"]["additionalProperties"]["properties"]["options"]["additionalProperties"] = True
    return root


def _insert(node: dict, parts: list[str], leaf: dict) -> None:
    """Put `leaf` at the dotted path `parts` under an object schema; "*" is any key (model keys)."""
    head, rest = parts[0], parts[1:]
    node.setdefault("additionalProperties", False)
    if head == "*":
        child = node["additionalProperties"] = node["additionalProperties"] or {"type": "object"}
    else:
        props = node.setdefault("properties", {})
        child = props.setdefault(head, {"type": "object"})
        if not rest:
            props[head] = {**leaf, **{k: v for k, v in child.items() if k in ("properties", "additionalProperties")}}
            return
    if rest:
        _insert(child, rest, leaf)
    else:
        child.update(leaf)


def markdown_reference() -> str:
    """The spec reference as Markdown tables, one per block: field, type, default, meaning."""
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for path, schema, default, doc in rows():
        kind = schema.get("type") or ("one of " + ", ".join(map(str, schema["enum"])) if "enum" in schema else
                                      "value or list")  # fmt: skip
        if isinstance(kind, list):
            kind = " or ".join(kind)
        if "minimum" in schema or "maximum" in schema:
            kind += f" [{schema.get('minimum', '')}, {schema.get('maximum', '')}]"
        shown = "" if default is None else f"`{default}`"
        lines.append(f"| `{path}` | {kind} | {shown} | {doc} |")
    return "\n".join(lines)
