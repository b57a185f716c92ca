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
    class_visualisation,
    decoder_inversion,
    match_inversion,
    pair_objectives,
    pick_items,
)
from featrec_grid.invert.gallery import cross_table, results_table, safe_name, save_grid
from featrec_grid.invert.manipulate import DEFAULT_VALUES, manipulation_grid
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

    def __post_init__(self) -> None:
        if not self.seeds:
            raise UserError("inversion config: seeds must list at least one seed (5 or more recommended)")
        if bad := set(self.controls) - set(CONTROLS):
            raise UserError(f"inversion config: unknown controls {sorted(bad)}; allowed: {', '.join(CONTROLS)}")
        if self.decoder_condition not in CONDITIONS or self.decoder_condition == "onehot":
            raise UserError(
                f"inversion config: decoder_condition '{self.decoder_condition}' must be one of "
                f"{', '.join(c for c in CONDITIONS if c != 'onehot')} (onehot is the control, always run)"
            )
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int | float) or not 0 <= self.gpus <= 1:
            raise UserError(f"inversion config: gpus {self.gpus!r} must be a number from 0 to 1 (a share of one GPU)")


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


def _classes(num_classes: int, cfg: InversionConfig) -> list[int]:
    if cfg.classes is not None:
        return list(cfg.classes)
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


STAGES = ("class", "match", "pair", "decoder")


def plan_stages(classifiers: dict[str, Classifier], cfg: InversionConfig) -> list[tuple[str, Any]]:
    """Every stage in report order: (class, model), (match, model), (pair, (a, b)) for one pair, (decoder, model)."""
    pair = _pair(classifiers, cfg)
    steps: list[tuple[str, Any]] = [("class", k) for k in classifiers] + [("match", k) for k in classifiers]
    steps += [("pair", pair)] if pair else []
    return steps + [("decoder", k) for k in classifiers]


def stage_name(stage: str, arg: Any) -> str:
    """A stage's task name: 'class mlp', 'pair mlp cnn', 'decoder resnet'."""
    return f"{stage} {' '.join(arg) if isinstance(arg, tuple) else arg}"


def stage_models(
    stage: str, arg: Any, classifiers: dict[str, Classifier], heldout: dict[str, str], cfg: InversionConfig
) -> list[str]:
    """The models a stage uses (in the order of `classifiers`): running the stage with only these loaded gives the
    same result as with all of them. Decoders use every model of their label space (the cross-model judges)."""
    if stage == "pair":
        a, b = arg
        third = _third(classifiers, heldout, a, b)
        need = {a, b} | ({third.key} if third is not None else set())
    else:
        clf = classifiers[arg]
        held = classifiers.get(heldout.get(arg, ""))
        need = {arg} | ({held.key} if held is not None else set())
        if stage == "match":
            source = _match_source(classifiers, clf, held, cfg)
            need |= {source.key} if source is not None else set()
        elif stage == "decoder":
            need |= {k for k, c in classifiers.items() if c.num_classes == clf.num_classes}
    return [k for k in classifiers if k in need]


def run_stage(
    stage: str, arg: Any, classifiers: dict[str, Classifier], heldout: dict[str, str], train_images: torch.Tensor | None,
    test_images: torch.Tensor | None, test_labels: torch.Tensor | None, cfg: InversionConfig,
    device: str | torch.device = "cpu",
) -> Outcome:  # fmt: skip
    """Run one stage (see plan_stages) and return its rows, cross-table rows and image grids (CPU tensors); writes
    nothing. Classifiers compute where they live (pixels.on_device); decoders train on `device`. `classifiers`
    needs at least stage_models(...); `heldout[m]` names the model that scores m's images."""
    t0 = time.perf_counter()
    if stage == "pair":
        a, b = classifiers[arg[0]], classifiers[arg[1]]
        got = pair_objectives(a, b, _third(classifiers, heldout, *arg), _classes(a.num_classes, cfg), cfg.seeds,
                              cfg.optim, cfg.combine_weights, cfg.controls, cfg.untrained_seed)  # fmt: skip
    elif stage in STAGES:
        clf = classifiers[arg]
        held = classifiers.get(heldout.get(arg, ""))
        classes = _classes(clf.num_classes, cfg)
        if stage == "class":
            got = class_visualisation(clf, held, classes, cfg.seeds, cfg.optim, cfg.controls, cfg.untrained_seed)
        elif stage == "match":
            got = _match(classifiers, clf, held, classes, test_images, test_labels, cfg)
        else:
            got = _decoders(classifiers, clf, held, classes, train_images, test_images, test_labels, cfg, device)
    else:
        raise UserError(f"inversion: unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    for row in got.rows:
        row.setdefault("stage_seconds", time.perf_counter() - t0)
        row.setdefault("device", str(device))
    return got


def write_outcome(result: Outcome, out_dir: Path) -> tuple[pd.DataFrame, list[tuple[str, str]], pd.DataFrame]:
    """The driver's part: write every grid as a PNG under out_dir; return (results table, [(caption, png name)],
    cross-model table)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for stem, (caption, grid) in result.grids.items():
        name = safe_name("inv", stem) + ".png"
        save_grid(grid, out_dir / name)
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
    cross-model decoder table as a list of row dicts (pandas.DataFrame(attrs["cross"]))."""
    cfg = config or InversionConfig()
    if not classifiers:
        raise UserError("inversion: no classifiers given")
    check_heldout(classifiers, heldout)
    check_images("train_images", train_images, train_labels)
    check_images("test_images", test_images, test_labels)
    result = Outcome()
    with torch_threads(cfg.threads):
        bar = tqdm(plan_stages(classifiers, cfg), desc="inversion", disable=not progress)
        for stage, arg in bar:
            bar.set_postfix_str(stage_name(stage, arg))
            result.add(run_stage(stage, arg, classifiers, heldout, train_images, test_images, test_labels, cfg))
    df, images, cross = write_outcome(result, Path(output_dir))
    df.attrs["images"] = images
    df.attrs["cross"] = cross.to_dict("records")
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
    test_images: torch.Tensor, test_labels: torch.Tensor, cfg: InversionConfig,
) -> Outcome:  # fmt: skip
    """Self-match (target: clf on a test image) and, if enabled, cross-match (target: another model on it; a model
    other than the held-out one when possible, else the held-out one, whose probabilities are then not reported)."""
    items = pick_items(test_labels, classes, len(cfg.seeds))
    out = match_inversion(clf, clf, held, test_images, items, cfg.seeds, cfg.optim, cfg.controls, cfg.untrained_seed)
    source = _match_source(classifiers, clf, held, cfg)
    if source is not None:
        scorer = held if held is not None and held.key != source.key else None
        out.add(match_inversion(clf, source, scorer, test_images, items, cfg.seeds, cfg.optim, cfg.controls,
                                cfg.untrained_seed))  # fmt: skip
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
    out.grids[f"recon_{clf.key}"] = (caption, torch.stack(rows))
    z, _ = embed(clf, test_images[items[: cfg.manipulation_items]])
    for kind, values in DEFAULT_VALUES.items():
        caption = f"logit manipulation '{kind}', {clf.key} (logit decoder): rows = test images, columns = {list(values)}"
        out.grids[f"manip_{kind}_{clf.key}"] = (caption, manipulation_grid(decoders["decoder"][0], z, kind, values))
    return out
