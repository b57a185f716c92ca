"""Every inversion experiment for a set of classifiers -> PNG grids + the results table + the cross-model table.

The work is split into stages (class and match per model, the pair objectives, the decoders per model); each
stage is a plain function of loaded classifiers and images that returns an Outcome and writes nothing, so
`spec_run` can run each as a Ray task while `run_inversion` runs them in turn in this process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from featrec_grid.errors import UserError
from featrec_grid.invert.decoder import CONDITIONS, DecoderConfig
from featrec_grid.invert.experiments import (
    OptimSettings,
    Outcome,
    Recipe,
    class_visualisation,
    decoder_inversion,
    match_inversion,
    mimic_inversion,
    natural_inversion,
    pair_objectives,
    pick_items,
)
from featrec_grid.invert.gallery import cross_table, grid_scale, results_table, safe_name, save_grid
from featrec_grid.invert.manipulate import DEFAULT_VALUES, manipulation_grid
from featrec_grid.invert.optimise import OBJECTIVES
from featrec_grid.invert.paramopt import PARAMETERISATIONS
from featrec_grid.invert.photos import PHOTOS, load_photo
from featrec_grid.invert.pixels import embed, resize
from featrec_grid.models import Classifier

CONTROLS = ("untrained", "noise")


@dataclass(frozen=True)
class InversionConfig:
    """Defaults sized for ~3 small digits models in a few minutes on 2 CPU cores. `classes` None: up to
    `max_classes` classes evenly spaced over the label space. `pair` None: the first two models (in the order given)
    with equal class counts. `match_cross` adds a match of each model to another model's logits. `threads`: torch
    intra-op threads while running (restored after; None leaves torch's setting): 1 by default because these
    models are tiny and, measured on a shared 2-core machine, 2 threads made decoder training 3-13x slower.
    `gpus`: the share of a GPU each inversion task asks for when the Ray cluster has GPUs (ignored otherwise)."""

    optim: OptimSettings = field(default_factory=OptimSettings)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    classes: tuple[int, ...] | None = None
    max_classes: int = 10
    pair: tuple[str, str] | None = None
    combine_weights: tuple[float, float] = (0.5, 0.5)
    match_cross: bool = True
    controls: tuple[str, ...] = CONTROLS
    untrained_seed: int = 0
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    decoder_condition: str = "standardised"
    decoder_untrained_control: bool = True
    gallery_items: int = 10
    manipulation_items: int = 3
    threads: int | None = 1
    gpus: float = 0.25
    stages: tuple[str, ...] = ("class", "match", "pair", "decoder")
    parameterisations: tuple[str, ...] = ("pixels",)
    objective: str = "logit"
    control_seeds: int | None = None
    mimic: tuple[tuple[str, str], ...] | None = None
    mimic_classes: tuple[int, ...] | None = None
    photos: tuple[str, ...] = PHOTOS
    per_stage: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise UserError("inversion config: seeds must list at least one seed (5 or more recommended)")
        _check_controls(self.controls, "controls")
        _check_subset(self.stages, STAGES, "stages")
        _check_subset(self.parameterisations, PARAMETERISATIONS, "parameterisations")
        _check_subset(self.photos, PHOTOS, "photos", empty_ok="natural" not in self.stages)
        if self.objective not in OBJECTIVES:
            raise UserError(f"inversion config: objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.control_seeds is not None and (not _is_int(self.control_seeds) or self.control_seeds < 1):
            raise UserError(f"inversion config: control_seeds {self.control_seeds!r} must be a whole number >= 1 "
                            "(how many of the seeds the untrained control runs) or null (all)")  # fmt: skip
        if self.mimic is not None:
            pairs = self.mimic
            ok = isinstance(pairs, list | tuple) and len(pairs) > 0 and all(
                isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(k, str) for k in p) and p[0] != p[1]
                for p in pairs
            )
            if not ok:
                raise UserError(f"inversion config: mimic {pairs!r} must list pairs [mimicking model, source model] "
                                "of two different model keys")  # fmt: skip
            object.__setattr__(self, "mimic", tuple(tuple(p) for p in pairs))
        for name in ("classes", "mimic_classes"):
            value = getattr(self, name)
            if value is not None and not _class_list(value):
                shown = list(value) if isinstance(value, tuple) else value
                raise UserError(f"inversion config: {name} {shown!r} must list class indices (whole numbers >= 0)")
        if not isinstance(self.per_stage, dict):
            raise UserError(f"inversion config: per_stage must be a mapping stage -> settings, got {self.per_stage!r}")
        for stage, values in self.per_stage.items():
            _check_subset((stage,), OPTIM_STAGES, "per_stage")
            if not isinstance(values, dict) or set(values) - set(PER_STAGE):
                raise UserError(f"inversion config: per_stage.{stage} must be a mapping with keys from "
                                f"{list(PER_STAGE)}; got {values!r}")  # fmt: skip
            if "seeds" in values and not (isinstance(values["seeds"], list | tuple) and values["seeds"]
                                          and all(_is_int(v) for v in values["seeds"])):
                raise UserError(f"inversion config: per_stage.{stage}.seeds {values['seeds']!r} must list whole numbers")
            if "classes" in values and not _class_list(values["classes"]):
                raise UserError(f"inversion config: per_stage.{stage}.classes {values['classes']!r} must list class "
                                "indices (whole numbers >= 0)")  # fmt: skip
            if "parameterisations" in values:
                _check_subset(values["parameterisations"], PARAMETERISATIONS, f"per_stage.{stage}.parameterisations")
            if "controls" in values:
                _check_controls(values["controls"], f"per_stage.{stage}.controls")
        if self.decoder_condition not in CONDITIONS or self.decoder_condition == "onehot":
            raise UserError(
                f"inversion config: decoder_condition '{self.decoder_condition}' must be one of "
                f"{', '.join(c for c in CONDITIONS if c != 'onehot')} (onehot is the control, always run)"
            )
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int | float) or not 0 <= self.gpus <= 1:
            raise UserError(f"inversion config: gpus {self.gpus!r} must be a number from 0 to 1 (a share of one GPU)")


    def stage_settings(self, stage: str) -> dict[str, Any]:
        """classes (None: spread over the label space), seeds, parameterisations and controls of one stage: the
        top-level values overridden by per_stage[stage]."""
        over = self.per_stage.get(stage, {})
        classes = over.get("classes", self.mimic_classes if stage == "mimic" and self.mimic_classes else self.classes)
        return dict(classes=None if classes is None else [int(c) for c in classes],
                    seeds=[int(v) for v in over.get("seeds", self.seeds)],
                    parameterisations=list(over.get("parameterisations", self.parameterisations)),
                    controls=tuple(over.get("controls", self.controls)))  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InversionConfig:
        """Build from a plain mapping (a spec's `inversion:` block): nested `optim` and `decoder` mappings, lists
        for tuples; unknown keys are a UserError naming them."""
        def build(kind: type, values: dict[str, Any], where: str) -> Any:
            if not isinstance(values, dict):
                raise UserError(f"inversion config: '{where}' must be a mapping, got {type(values).__name__}")
            known = {f.name for f in fields(kind)}
            if bad := sorted(set(values) - known):
                raise UserError(f"inversion config: unknown key(s) {bad} in '{where}'; allowed: {sorted(known)}")
            return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}

        top = build(cls, d, "inversion")
        if "optim" in top:
            top["optim"] = OptimSettings(**build(OptimSettings, d["optim"], "inversion.optim"))
        if "decoder" in top:
            top["decoder"] = DecoderConfig(**build(DecoderConfig, d["decoder"], "inversion.decoder"))
        return cls(**top)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _class_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) > 0 and all(_is_int(c) and c >= 0 for c in value)


def _check_subset(values: Any, allowed: tuple[str, ...], name: str, empty_ok: bool = False) -> None:
    if not isinstance(values, list | tuple) or (not values and not empty_ok):
        raise UserError(f"inversion config: {name} must be a non-empty list from {', '.join(allowed)}; got {values!r}")
    if bad := [v for v in values if v not in allowed]:
        raise UserError(f"inversion config: {name}: unknown {bad}; allowed: {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise UserError(f"inversion config: {name} {list(values)} lists a value twice")


def _check_controls(values: Any, name: str) -> None:
    if not isinstance(values, list | tuple) or set(values) - set(CONTROLS):
        raise UserError(f"inversion config: unknown {name} {values!r}; allowed: {', '.join(CONTROLS)}")


def _classes(num_classes: int, cfg: InversionConfig, stage: str = "class") -> list[int]:
    classes = cfg.stage_settings(stage)["classes"]
    if classes is not None:
        if max(classes) >= num_classes:
            raise UserError(f"inversion config: classes {classes} of stage {stage} out of range 0..{num_classes - 1}")
        return classes
    return sorted({int(round(c)) for c in np.linspace(0, num_classes - 1, min(num_classes, cfg.max_classes))})


def check_images(name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or len(images) < 2:
        raise UserError(f"inversion: {name} must be a tensor [N >= 2, 3, H, W]; got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all() or images.min() < -1e-6 or images.max() > 1 + 1e-6:
        raise UserError(f"inversion: {name} must be finite pixels in [0, 1]")
    if len(labels) != len(images):
        raise UserError(f"inversion: {name} has {len(images)} images but {len(labels)} labels")


def _pair(classifiers: dict[str, Classifier], cfg: InversionConfig) -> tuple[str, str] | None:
    keys = list(classifiers)
    if cfg.pair is not None:
        a, b = cfg.pair
        if a not in classifiers or b not in classifiers or a == b:
            raise UserError(f"inversion config: pair {cfg.pair} must name two different models of {keys}")
        if classifiers[a].num_classes != classifiers[b].num_classes:
            raise UserError(f"inversion config: pair {cfg.pair} has different class counts; combined/difference "
                            "objectives need one label space")  # fmt: skip
        return a, b
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if classifiers[a].num_classes == classifiers[b].num_classes:
                return a, b
    return None


def _third(classifiers: dict[str, Classifier], heldout: dict[str, str], a: str, b: str) -> Classifier | None:
    """A held-out model for a pair: heldout[a] or heldout[b] if neither is in the pair, else any other model."""
    for k in (heldout.get(a), heldout.get(b), *classifiers):
        if k is not None and k not in (a, b) and classifiers[k].num_classes == classifiers[a].num_classes:
            return classifiers[k]
    return None


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


OPTIM_STAGES = ("class", "match", "pair", "mimic", "natural")
STAGES = (*OPTIM_STAGES, "decoder")
PER_STAGE = ("classes", "seeds", "parameterisations", "controls")


def _mimic_pairs(classifiers: dict[str, Classifier], heldout: dict[str, str], cfg: InversionConfig) -> list[tuple[str, str]]:
    """(mimicking model, source model) pairs: cfg.mimic, or each model mimicking its held-out model."""
    if cfg.mimic is None:
        return [(k, h) for k, h in heldout.items()]
    for a, b in cfg.mimic:
        if a not in classifiers or b not in classifiers:
            raise UserError(f"inversion config: mimic pair [{a}, {b}] must name models of {list(classifiers)}")
        if classifiers[a].num_classes != classifiers[b].num_classes:
            raise UserError(f"inversion config: mimic pair [{a}, {b}] crosses label spaces")
    return list(cfg.mimic)


def plan_stages(
    classifiers: dict[str, Classifier], cfg: InversionConfig, heldout: dict[str, str] | None = None
) -> list[tuple[str, Any]]:
    """Every stage of cfg.stages in report order, each optimisation stage once per parameterisation:
    (class, (model, p)), (match, (model, p)), (pair, (a, b, p)) for one pair, (mimic, (a, b, p)) per mimic pair,
    (natural, (model, p)), then (decoder, model)."""
    heldout = heldout if heldout is not None else {}
    steps: list[tuple[str, Any]] = []
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        if stage == "decoder":
            steps += [("decoder", k) for k in classifiers]
            continue
        for p in cfg.stage_settings(stage)["parameterisations"]:
            if stage in ("class", "match", "natural"):
                steps += [(stage, (k, p)) for k in classifiers]
            elif stage == "pair":
                pair = _pair(classifiers, cfg)
                steps += [("pair", (*pair, p))] if pair else []
            else:
                steps += [("mimic", (a, b, p)) for a, b in _mimic_pairs(classifiers, heldout, cfg)]
    return steps


def stage_name(stage: str, arg: Any) -> str:
    """A stage's task name: 'class mlp pixels', 'pair mlp cnn fourier', 'mimic lite1 lite0 phase', 'decoder resnet'."""
    return f"{stage} {' '.join(arg) if isinstance(arg, tuple) else arg}"


def stage_models(
    stage: str, arg: Any, classifiers: dict[str, Classifier], heldout: dict[str, str], cfg: InversionConfig
) -> list[str]:
    """The models a stage uses (in the order of `classifiers`): running the stage with only these loaded gives the
    same result as with all of them. Every stage uses every model of its label space: the optimisation stages
    as judges of the transfer table, the decoders as judges of the cross-model table."""
    first = classifiers[arg[0] if isinstance(arg, tuple) else arg]
    return [k for k, c in classifiers.items() if c.num_classes == first.num_classes]


def _natural_photos(cfg: InversionConfig, clf: Classifier) -> dict[str, torch.Tensor]:
    size = int(cfg.optim.size or clf.input.size)
    return {name: load_photo(name, size) for name in cfg.photos}


def run_stage(
    stage: str, arg: Any, classifiers: dict[str, Classifier], heldout: dict[str, str], train_images: torch.Tensor | None,
    test_images: torch.Tensor | None, test_labels: torch.Tensor | None, cfg: InversionConfig,
    device: str | torch.device = "cpu",
) -> Outcome:  # fmt: skip
    """Run one stage (see plan_stages) and return its rows, cross-table and transfer-table rows and image grids
    (CPU tensors); writes nothing. Classifiers compute where they live (pixels.on_device); decoders train on
    `device`. `classifiers` needs at least stage_models(...); `heldout[m]` names the model that scores m's images."""
    t0 = time.perf_counter()
    if stage not in STAGES:
        raise UserError(f"inversion: unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    if stage == "decoder":
        clf = classifiers[arg]
        held = classifiers.get(heldout.get(arg, ""))
        got = _decoders(classifiers, clf, held, _classes(clf.num_classes, cfg), train_images, test_images, test_labels,
                        cfg, device)  # fmt: skip
    else:
        *keys, param = arg
        first = classifiers[keys[0]]
        settings = cfg.stage_settings(stage)
        seeds, controls = settings["seeds"], settings["controls"]
        judges = tuple(c for c in classifiers.values() if c.num_classes == first.num_classes)
        recipe = Recipe(param, cfg.objective, judges)
        held = classifiers.get(heldout.get(keys[0], ""))
        classes = _classes(first.num_classes, cfg, stage)
        if stage == "class":
            got = class_visualisation(first, held, classes, seeds, cfg.optim, controls, cfg.untrained_seed, recipe,
                                      cfg.control_seeds)  # fmt: skip
        elif stage == "match":
            got = _match(classifiers, first, held, classes, test_images, test_labels, cfg, recipe, seeds, controls)
        elif stage == "pair":
            got = pair_objectives(first, classifiers[keys[1]], _third(classifiers, heldout, *keys), classes, seeds,
                                  cfg.optim, cfg.combine_weights, controls, cfg.untrained_seed, recipe)  # fmt: skip
        elif stage == "mimic":
            got = mimic_inversion(first, classifiers[keys[1]], _third(classifiers, heldout, *keys), classes, seeds,
                                  cfg.optim, recipe)  # fmt: skip
        else:
            got = natural_inversion(first, _natural_photos(cfg, first), seeds, cfg.optim, recipe, held)
    for row in got.rows:
        row.setdefault("stage_seconds", time.perf_counter() - t0)
        row.setdefault("device", str(device))
    return got


def write_outcome(result: Outcome, out_dir: Path) -> tuple[pd.DataFrame, list[tuple[str, str]], pd.DataFrame]:
    """The driver's part: write every grid as a PNG under out_dir; return (results table, [(caption, png name)],
    cross-model table). The transfer table is gallery.transfer_table(result.transfer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for stem, (caption, grid, labels) in result.grids.items():
        name = safe_name("inv", stem) + ".png"
        save_grid(grid, out_dir / name, scale=grid_scale(grid.shape[-1]), row_labels=labels)
        images.append((caption, name))
    return results_table(result.rows), images, cross_table(result.cross)


def run_inversion(
    classifiers: dict[str, Classifier],
    heldout: dict[str, str],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    config: InversionConfig | None = None,
    output_dir: Path | str = "inversion",
    progress: bool = True,
) -> pd.DataFrame:
    """Run class visualisation, combined/difference for a pair, match, the logit decoder and its one-hot control,
    with controls, for every classifier, one stage after another in this process (`featrec-grid invert` runs the
    same stages as Ray tasks); write PNG grids to output_dir; return the results table (one row per model, method,
    control, seed and class/item). `heldout[m]` names the held-out model that scores m's images (absent: heldout
    metrics NaN). Labels only choose which test images to show and match (one per class in turn).
    The returned frame's attrs["images"] lists (caption, png file name) for gallery_html, attrs["cross"] the
    cross-model decoder table as a list of row dicts (pandas.DataFrame(attrs["cross"])), attrs["transfer"] the
    transfer table's rows (gallery.transfer_table(attrs["transfer"]))."""
    cfg = config or InversionConfig()
    if not classifiers:
        raise UserError("inversion: no classifiers given")
    check_heldout(classifiers, heldout)
    check_images("train_images", train_images, train_labels)
    check_images("test_images", test_images, test_labels)
    result = Outcome()
    with torch_threads(cfg.threads):
        bar = tqdm(plan_stages(classifiers, cfg, heldout), desc="inversion", disable=not progress)
        for stage, arg in bar:
            bar.set_postfix_str(stage_name(stage, arg))
            result.add(run_stage(stage, arg, classifiers, heldout, train_images, test_images, test_labels, cfg))
    df, images, cross = write_outcome(result, Path(output_dir))
    df.attrs["images"] = images
    df.attrs["cross"] = cross.to_dict("records")
    df.attrs["transfer"] = result.transfer
    return df


def check_heldout(classifiers: dict[str, Classifier], heldout: dict[str, str]) -> None:
    for m, h in heldout.items():
        if m not in classifiers or h not in classifiers or m == h:
            raise UserError(f"inversion: heldout entry {m!r} -> {h!r} must map a model to a different model of "
                            f"{list(classifiers)}")  # fmt: skip
        if classifiers[m].num_classes != classifiers[h].num_classes:
            raise UserError(f"inversion: heldout entry {m!r} -> {h!r} crosses label spaces "
                            f"({classifiers[m].num_classes} vs {classifiers[h].num_classes} classes)")  # fmt: skip


def _match_source(
    classifiers: dict[str, Classifier], clf: Classifier, held: Classifier | None, cfg: InversionConfig
) -> Classifier | None:
    """The model whose logits clf cross-matches: another model of its label space other than the held-out one when
    possible, else the held-out one; None without cross-matching."""
    others = [c for k, c in classifiers.items() if k != clf.key and c.num_classes == clf.num_classes]
    if not cfg.match_cross or not others:
        return None
    return next((c for c in others if held is None or c.key != held.key), others[0])


def _match(
    classifiers: dict[str, Classifier], clf: Classifier, held: Classifier | None, classes: list[int],
    test_images: torch.Tensor, test_labels: torch.Tensor, cfg: InversionConfig, recipe: Recipe,
    seeds: list[int], controls: tuple[str, ...],
) -> Outcome:  # fmt: skip
    """Self-match (target: clf on a test image) and, if enabled, cross-match (target: another model on it; a model
    other than the held-out one when possible, else the held-out one, whose probabilities are then not reported)."""
    if test_images is None or test_labels is None:
        raise UserError("inversion: the match stage needs the spec's test images (data.test)")
    items = pick_items(test_labels, classes, len(seeds))
    out = match_inversion(clf, clf, held, test_images, items, seeds, cfg.optim, controls, cfg.untrained_seed, recipe)
    source = _match_source(classifiers, clf, held, cfg)
    if source is not None:
        scorer = held if held is not None and held.key != source.key else None
        out.add(match_inversion(clf, source, scorer, test_images, items, seeds, cfg.optim, controls,
                                cfg.untrained_seed, recipe))  # fmt: skip
    return out


def _decoders(
    classifiers: dict[str, Classifier], clf: Classifier, held: Classifier | None, classes: list[int],
    train_images: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor, cfg: InversionConfig,
    device: str | torch.device = "cpu",
) -> Outcome:  # fmt: skip
    """Logit decoder + one-hot control (+ untrained-network control), judged by every model of clf's label space
    (the cross-model table), reconstructions grid and manipulation grids."""
    judges = [c for c in classifiers.values() if c.num_classes == clf.num_classes]
    out, decoders = decoder_inversion(clf, held, train_images, test_images, cfg.decoder, cfg.decoder_condition,
                                      cfg.decoder_untrained_control, cfg.untrained_seed, judges, device)  # fmt: skip
    items = pick_items(test_labels, classes, cfg.gallery_items)
    rows = [resize(test_images[items].float(), cfg.decoder.size)]
    for name in ("decoder", "decoder_onehot", "decoder_untrained"):
        if name in decoders:
            dec, net = decoders[name]
            rows.append(dec.decode(embed(net, test_images[items])[0]))
    label = "originals, logit decoder, one-hot control"
    label += ", decoder of an untrained network's logits" if "decoder_untrained" in decoders else ""
    caption = f"reconstructions of test images, {clf.key}: rows = {label}"
    out.grids[f"recon_{clf.key}"] = (caption, torch.stack(rows), None)
    z, _ = embed(clf, test_images[items[: cfg.manipulation_items]])
    for kind, values in DEFAULT_VALUES.items():
        caption = f"logit manipulation '{kind}', {clf.key} (logit decoder): rows = test images, columns = {list(values)}"
        out.grids[f"manip_{kind}_{clf.key}"] = (caption, manipulation_grid(decoders["decoder"][0], z, kind, values), None)
    return out
