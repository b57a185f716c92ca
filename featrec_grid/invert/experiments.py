"""The measured experiments, one function each: run an inversion method and its controls for one model (or pair),
return result rows (dicts for the table) and the images to show. No files are written here."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from featrec_grid.errors import UserError
from featrec_grid.invert import measures as M
from featrec_grid.invert.decoder import DecoderConfig, LogitDecoder, fit_decoder
from featrec_grid.invert.labels import class_name
from featrec_grid.invert.optimise import (
    InversionResult,
    Objective,
    class_objective,
    combined_objective,
    difference_objective,
    invert_many,
    match_objective,
    target_logits,
    untrained_copy,
)
from featrec_grid.invert.paramopt import invert_spectral
from featrec_grid.invert.pixels import embed, resize
from featrec_grid.invert.transfer import judge_images, vector_distances
from featrec_grid.models import Classifier


@dataclass(frozen=True)
class OptimSettings:
    """Settings of optimisation-based inversion shared by every objective. Pixels (optimise.invert_many): `steps`,
    `lr` and `blur_sigma` (annealed start -> end), `blur_every`, `jitter`, starting noise `noise_mean` +-
    `noise_scale`. Spectral parameterisations (paramopt.invert_spectral): Adam with `fourier_lr` / `phase_lr`,
    transformation robustness `robustness` (0 off, 1 Lucid's ranges scaled to the image size) and the spectrum's
    `decay_power`. `size`: the image side (None: the largest model input)."""

    steps: int = 200
    lr: tuple[float, float] = (0.05, 0.005)
    blur_sigma: tuple[float, float] = (1.0, 0.3)
    blur_every: int = 4
    jitter: int = 1
    noise_mean: float = 0.5
    noise_scale: float = 0.1
    size: int | None = None
    fourier_lr: float = 0.05
    phase_lr: float = 0.05
    robustness: float = 1.0
    decay_power: float = 1.0

    def __post_init__(self) -> None:
        for name in ("fourier_lr", "phase_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise UserError(f"inversion config: optim.{name} {value!r} must be a number > 0 (Adam's step size)")
        r = self.robustness
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r <= 4:
            raise UserError(f"inversion config: optim.robustness {r!r} must be a number from 0 (off) to 4 "
                            "(1 = Lucid's transform ranges)")  # fmt: skip
        d = self.decay_power
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d <= 3:
            raise UserError(f"inversion config: optim.decay_power {d!r} must be a number from 0 (white) to 3")

    def run(self, objective: Objective, seeds: Sequence[int], parameterisation: str = "pixels") -> list[InversionResult]:
        if parameterisation == "pixels":
            return invert_many(
                objective, seeds, steps=self.steps, lr=self.lr, blur_sigma=self.blur_sigma, blur_every=self.blur_every,
                jitter=self.jitter, size=self.size, noise_mean=self.noise_mean, noise_scale=self.noise_scale,
            )  # fmt: skip
        lr = self.fourier_lr if parameterisation == "fourier" else self.phase_lr
        return invert_spectral(objective, seeds, parameterisation, steps=self.steps, lr=lr, robustness=self.robustness,
                               decay_power=self.decay_power, size=self.size)  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """How the images of one stage are made: the image parameterisation and the objective's units (see
    optimise.normalise); every image is then judged by every model in `judges` (the transfer table)."""

    parameterisation: str = "pixels"
    objective: str = "logit"
    judges: tuple[Classifier, ...] = ()

    @property
    def columns(self) -> dict:
        return {"parameterisation": self.parameterisation, "objective": self.objective}

    def judge(self, images: torch.Tensor, classes, seeds, generator: str, used: Sequence[str], method: str,
              control: str = "none", items: Sequence[str] | None = None) -> list[dict]:  # fmt: skip
        return judge_images(images, classes, seeds, self.judges, generator=generator, used=used, method=method,
                            parameterisation=self.parameterisation, objective=self.objective, control=control,
                            items=items)  # fmt: skip


@dataclass
class Outcome:
    """Rows for the results table, the cross-model decoder table and the transfer table, and image grids: file
    stem -> (caption, images [R, K, 3, H, W] on the CPU, a label per row or None). Plain data: a Ray task returns
    it to the driver."""

    rows: list[dict] = field(default_factory=list)
    grids: dict[str, tuple[str, torch.Tensor, tuple[str, ...] | None]] = field(default_factory=dict)
    cross: list[dict] = field(default_factory=list)
    transfer: list[dict] = field(default_factory=list)

    def add(self, other: Outcome) -> Outcome:
        self.rows += other.rows
        self.grids.update(other.grids)
        self.cross += other.cross
        self.transfer += other.transfer
        return self


def _timed(
    opt: OptimSettings, objective: Objective, seeds: Sequence[int], parameterisation: str = "pixels"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run one batched inversion: (final images [B, 3, H, W], starting images [B, 3, H, W], seconds per image)."""
    t0 = time.perf_counter()
    res = opt.run(objective, seeds, parameterisation)
    sec = (time.perf_counter() - t0) / len(res)
    return torch.stack([r.image for r in res]), torch.stack([r.start for r in res]), sec


def _prob(clf: Classifier | None, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    return M.class_prob(clf, images, classes) if clf is not None else np.full(len(images), np.nan)


def _grid(images: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[R * K, 3, H, W] in row-major order -> [R, K, 3, H, W]."""
    return images.reshape(n_rows, -1, *images.shape[1:])


def _class_seed_batch(classes: Sequence[int], seeds: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Every (class, seed) combination, class-major: per-image classes [B] and seeds [B]."""
    return torch.tensor([c for c in classes for _ in seeds]), [s for _ in classes for s in seeds]


def _names(clf: Classifier, classes: Sequence[int]) -> tuple[str, ...]:
    return tuple(class_name(clf, int(c), short=True) for c in classes)


def _how(recipe: Recipe) -> str:
    return f"{recipe.parameterisation}, objective {recipe.objective}"


def class_visualisation(
    clf: Classifier, heldout: Classifier | None, classes: Sequence[int], seeds: Sequence[int], opt: OptimSettings,
    controls: Sequence[str] = ("untrained", "noise"), untrained_seed: int = 0, recipe: Recipe = Recipe(),
    control_seeds: int | None = None,
) -> Outcome:  # fmt: skip
    """Maximise each class's logit (in recipe.objective's units) from each seed (one batch); controls: an untrained
    same-architecture network optimised the same way from the first `control_seeds` seeds (None: all) ("untrained":
    target_prob under that network), and the starting images scored by the trained model ("noise"; averaged over
    all classes from the same seeds it is exactly 1/C, so read it per class). Every image is judged by every model
    of recipe.judges (generator clf.key, "<key>~untrained" or "noise")."""
    out = Outcome()
    nets = [("none", clf, list(seeds))]
    if "untrained" in controls:
        nets.append(("untrained", untrained_copy(clf, untrained_seed), list(seeds)[: control_seeds or len(seeds)]))
    hk = heldout.key if heldout is not None else None
    for control, net, sds_used in nets:
        cls, sds = _class_seed_batch(classes, sds_used)
        images, starts, sec = _timed(opt, class_objective(net, cls, recipe.objective), sds, recipe.parameterisation)
        scored = [(images, control, net, sec, clf.key if control == "none" else net.key)]
        if control == "none" and "noise" in controls:
            scored.append((starts, "noise", clf, 0.0, "noise"))
        for batch, ctrl, scorer, seconds, generator in scored:
            tp, hp = _prob(scorer, batch, cls), _prob(heldout, batch, cls)
            out.rows += [dict(model=clf.key, method="class", control=ctrl, seed=s, target_class=int(c),
                              target_prob=tp[i], heldout_model=hk, heldout_prob=hp[i], seconds=seconds,
                              **recipe.columns)
                         for i, (c, s) in enumerate(zip(cls, sds, strict=True))]  # fmt: skip
            used = [] if ctrl == "noise" else [clf.key]
            out.transfer += recipe.judge(batch, cls, sds, generator, used, "class", ctrl)
        suffix = "" if control == "none" else f" ({control} control)"
        caption = (f"class visualisation, {clf.key}{suffix} ({_how(recipe)}): rows = classes "
                   f"{', '.join(_names(clf, classes))}; columns = seeds {sds_used}")  # fmt: skip
        key = f"class_{clf.key}_{control}_{recipe.parameterisation}"
        out.grids[key] = (caption, _grid(images, len(classes)), _names(clf, classes))
    return out


def pair_objectives(
    a: Classifier, b: Classifier, heldout: Classifier | None, classes: Sequence[int], seeds: Sequence[int],
    opt: OptimSettings, weights: tuple[float, float] = (0.5, 0.5), controls: Sequence[str] = ("untrained", "noise"),
    untrained_seed: int = 0, recipe: Recipe = Recipe(),
) -> Outcome:  # fmt: skip
    """Seed 003's two-model objectives per class and seed: combined (w_a A + w_b B) and difference (A - B and
    B - A), in recipe.objective's units. target_prob: the mean of both models' probabilities (combined) or the
    maximised model's (difference); prob_model / prob_other give each side (for "noise": the trained models
    scoring the starting images). Transfer generators: "a+b", "a-b", "b-a" (their untrained controls with
    "~untrained" appended)."""
    out = Outcome()
    hk = heldout.key if heldout is not None else None
    nets = [("none", a, b)]
    if "untrained" in controls:
        nets.append(("untrained", untrained_copy(a, untrained_seed), untrained_copy(b, untrained_seed + 1)))
    cls, sds = _class_seed_batch(classes, seeds)
    for control, na, nb in nets:
        for method, flip in (("combined", False), ("difference", False), ("difference", True)):
            first, second, keys = (nb, na, (b.key, a.key)) if flip else (na, nb, (a.key, b.key))
            make = combined_objective if method == "combined" else difference_objective
            w = weights if method == "combined" else (1.0, 1.0)
            images, starts, sec = _timed(opt, make(first, second, cls, w, recipe.objective), sds, recipe.parameterisation)
            op = "+" if method == "combined" else "-"
            generator = f"{keys[0]}{op}{keys[1]}" + ("" if control == "none" else "~untrained")
            scored = [(images, control, sec, generator)]
            scored += [(starts, "noise", 0.0, "noise")] if control == "none" and "noise" in controls else []
            for batch, ctrl, seconds, gen in scored:
                pa, pb = _prob(first, batch, cls), _prob(second, batch, cls)
                tp, hp = (pa + pb) / 2 if method == "combined" else pa, _prob(heldout, batch, cls)
                out.rows += [dict(model=keys[0], other_model=keys[1], method=method, control=ctrl, seed=s,
                                  target_class=int(c), target_prob=tp[i], prob_model=pa[i], prob_other=pb[i],
                                  heldout_model=hk, heldout_prob=hp[i], seconds=seconds, **recipe.columns)
                             for i, (c, s) in enumerate(zip(cls, sds, strict=True))]  # fmt: skip
                if not (flip and ctrl == "noise"):  # the noise of B - A is the noise of A - B: judged once
                    out.transfer += recipe.judge(batch, cls, sds, gen, [] if ctrl == "noise" else list(keys), method, ctrl)
            suffix = "" if control == "none" else f" ({control} control)"
            caption = (f"{method}: {keys[0]} {op} {keys[1]}{suffix} ({_how(recipe)}); rows = classes "
                       f"{', '.join(_names(a, classes))}; columns = seeds {list(seeds)}")  # fmt: skip
            key = f"{method}_{keys[0]}_{keys[1]}_{control}_{recipe.parameterisation}"
            out.grids[key] = (caption, _grid(images, len(classes)), _names(a, classes))
    return out


def _matched(net: Classifier, images: torch.Tensor, starts: torch.Tensor, t: torch.Tensor) -> dict[str, np.ndarray]:
    """Distances between net's output vectors and the targets t, after (images) and before (starts)."""
    l1, l2 = M.logit_distance(embed(net, images)[0], t)
    l1_start, _ = M.logit_distance(embed(net, starts)[0], t)
    _, cos = vector_distances(embed(net, images)[0], t)
    _, cos_start = vector_distances(embed(net, starts)[0], t)
    return dict(logit_l1_rel=l1, logit_l2_rel=l2, logit_l1_rel_start=l1_start, logit_cos_dist=cos,
                logit_cos_dist_start=cos_start)  # fmt: skip


def match_inversion(
    clf: Classifier, source: Classifier, heldout: Classifier | None, naturals: torch.Tensor, items: Sequence[int],
    seeds: Sequence[int], opt: OptimSettings, controls: Sequence[str] = ("untrained", "noise"), untrained_seed: int = 0,
    recipe: Recipe = Recipe(),
) -> Outcome:  # fmt: skip
    """Make `clf`'s logits match `source`'s logits on natural image naturals[items[i]] (L1, seed 003), image i
    starting from seeds[i]; source = clf is self-inversion. SSIM/PSNR/MSE against the natural image at the
    inversion size; logit distances relative to the target at the end and at the start. Controls: an untrained
    clf matching (its own, for self-inversion) targets, and the starting images."""
    out = Outcome()
    other = None if source is clf else source.key
    hk = heldout.key if heldout is not None else None
    nats = naturals[list(items)].float()
    nets = [("none", clf, source)]
    if "untrained" in controls:
        u = untrained_copy(clf, untrained_seed)
        nets.append(("untrained", u, u if source is clf else source))
    grid_rows: list[torch.Tensor] = []
    method = "match" if source is clf else "match_cross"
    for control, net, src in nets:
        t = target_logits(src, nats)
        images, starts, sec = _timed(opt, match_objective(net, t, nats, objective=recipe.objective), seeds,
                                     recipe.parameterisation)  # fmt: skip
        nat = resize(nats, images.shape[-1])
        c = t.argmax(1)
        dist_start = M.logit_distance(embed(net, starts)[0], t)[0]
        scored = [(images, control, net, sec, clf.key if control == "none" else net.key)]
        scored += [(starts, "noise", clf, 0.0, "noise")] if control == "none" and "noise" in controls else []
        for batch, ctrl, scorer, seconds, generator in scored:
            z, _ = embed(scorer, batch)
            l1, l2 = M.logit_distance(z, t)
            _, cos = vector_distances(z, t)
            tp, hp = torch.softmax(z.double(), 1).gather(1, c[:, None])[:, 0].numpy(), _prob(heldout, batch, c)
            ss, ps = M.paired(M.ssim, batch, nat), M.paired(M.psnr, batch, nat)
            mse = ((batch - nat) ** 2).mean(dim=(1, 2, 3))
            out.rows += [dict(model=clf.key, other_model=other, method="match", control=ctrl, seed=s, item=int(item),
                              target_class=int(c[i]), target_prob=tp[i], heldout_model=hk, heldout_prob=hp[i],
                              logit_l1_rel=l1[i], logit_l2_rel=l2[i], logit_l1_rel_start=dist_start[i],
                              logit_cos_dist=cos[i], mse=float(mse[i]), ssim=ss[i], psnr=ps[i], seconds=seconds,
                              **recipe.columns)
                         for i, (item, s) in enumerate(zip(items, seeds, strict=True))]  # fmt: skip
            used = [] if ctrl == "noise" else [clf.key] + ([] if other is None else [other])
            out.transfer += recipe.judge(batch, c, seeds, generator, used, method, ctrl, [str(i) for i in items])
        grid_rows += ([nat] if control == "none" else []) + [images]
    src_name = "itself" if source is clf else source.key
    label = f"match: {clf.key} matching the logits of {src_name} on test images ({_how(recipe)}); rows = natural, inversion"
    label += ", untrained-network inversion" if len(grid_rows) > 2 else ""
    names = ("natural", "inversion", "untrained")[: len(grid_rows)]
    out.grids[f"match_{clf.key}_{src_name}_{recipe.parameterisation}"] = (
        label + "; columns = seeds (one image each)", torch.stack(grid_rows), names)
    return out


def mimic_inversion(
    clf: Classifier, source: Classifier, third: Classifier | None, classes: Sequence[int], seeds: Sequence[int],
    opt: OptimSettings, recipe: Recipe = Recipe(),
) -> Outcome:  # fmt: skip
    """The seed's "mimic": `source` visualises each class (its class image, made as in class_visualisation with
    the same recipe), then `clf` starts from its own seeded image and matches source's output vector on that class
    image (L1 on normalised outputs). Rows: relative L1 and cosine distance between clf's and source's vectors at
    the start and the end, the probability clf gives the class, and whether a `third` model's top-1 on clf's
    image is the class (third_top1_is_target, third_prob). Transfer generator: clf.key, method "mimic"; clf's
    gradients made the image and source's vector is its target, so judges other than these two are held out."""
    out = Outcome()
    cls, sds = _class_seed_batch(classes, seeds)
    shown, _, _ = _timed(opt, class_objective(source, cls, recipe.objective), sds, recipe.parameterisation)
    t = target_logits(source, shown)
    images, starts, sec = _timed(opt, match_objective(clf, t, objective=recipe.objective), sds, recipe.parameterisation)
    dist = _matched(clf, images, starts, t)
    z, _ = embed(clf, images)
    tp = torch.softmax(z.double(), 1).gather(1, cls[:, None])[:, 0].numpy()
    third_z = embed(third, images)[0] if third is not None else None
    for i, (c, s) in enumerate(zip(cls, sds, strict=True)):
        row = dict(model=clf.key, other_model=source.key, method="mimic", control="none", seed=s, target_class=int(c),
                   target_prob=tp[i], seconds=sec, **recipe.columns, **{k: v[i] for k, v in dist.items()})  # fmt: skip
        if third_z is not None:
            p3 = torch.softmax(third_z[i].double(), 0)
            row.update(third_model=third.key, third_prob=float(p3[c]), third_top1_is_target=bool(p3.argmax() == c))
        out.rows.append(row)
    out.transfer += recipe.judge(images, cls, sds, clf.key, [clf.key, source.key], "mimic")
    out.transfer += recipe.judge(starts, cls, sds, "noise", [], "mimic", "noise")
    names = _names(clf, classes)
    caption = (f"mimic: {clf.key} reproducing {source.key}'s output vector on {source.key}'s class image "
               f"({_how(recipe)}); columns = classes {', '.join(names)} x seeds {list(seeds)}; rows = {source.key}'s "
               f"class image, {clf.key}'s mimic")  # fmt: skip
    out.grids[f"mimic_{clf.key}_{source.key}_{recipe.parameterisation}"] = (
        caption, torch.stack([shown, images]), (f"{source.key} class", f"{clf.key} mimic"))
    return out


def natural_inversion(
    clf: Classifier, photos: dict[str, torch.Tensor], seeds: Sequence[int], opt: OptimSettings,
    recipe: Recipe = Recipe(), third: Classifier | None = None,
) -> Outcome:  # fmt: skip
    """Natural-image targets (the seed's Dalmatian photos): clf matches its own output vector on each photo
    ([3, H, W] in [0, 1]) from each seed. Rows: the photo, clf's top-1 on it (target_class), vector distances at
    start and end, SSIM/PSNR against the photo, and whether `third`'s top-1 on the inversion is that class.
    Transfer: every judge's view of the inversions, class = clf's top-1 on the photo."""
    out = Outcome()
    names = list(photos)
    batch_names = [n for n in names for _ in seeds]
    sds = [s for _ in names for s in seeds]
    nats = torch.stack([photos[n] for n in batch_names]).float()
    t = target_logits(clf, nats)
    c = t.argmax(1)
    images, starts, sec = _timed(opt, match_objective(clf, t, nats, objective=recipe.objective), sds,
                                 recipe.parameterisation)  # fmt: skip
    nat = resize(nats, images.shape[-1])
    dist = _matched(clf, images, starts, t)
    ss, ps = M.paired(M.ssim, images, nat), M.paired(M.psnr, images, nat)
    tp = _prob(clf, images, c)
    third_z = embed(third, images)[0] if third is not None else None
    for i, (n, s) in enumerate(zip(batch_names, sds, strict=True)):
        row = dict(model=clf.key, method="natural", control="none", seed=s, photo=n, target_class=int(c[i]),
                   target_prob=tp[i], ssim=ss[i], psnr=ps[i], seconds=sec, **recipe.columns,
                   **{k: v[i] for k, v in dist.items()})  # fmt: skip
        if third_z is not None:
            p3 = torch.softmax(third_z[i].double(), 0)
            row.update(third_model=third.key, third_prob=float(p3[c[i]]), third_top1_is_target=bool(p3.argmax() == c[i]))
        out.rows.append(row)
    out.transfer += recipe.judge(images, c, sds, clf.key, [clf.key], "natural", items=batch_names)
    out.transfer += recipe.judge(starts, c, sds, "noise", [], "natural", "noise", items=batch_names)
    top = [class_name(clf, int(c[i * len(seeds)]), short=True) for i in range(len(names))]
    caption = (f"natural-image targets: {clf.key} matching its own output on scikit-image photos ({_how(recipe)}); "
               f"rows = photos ({', '.join(f'{n}: {clf.key} sees {k}' for n, k in zip(names, top, strict=True))}); "
               f"columns = the photo, then seeds {list(seeds)}")  # fmt: skip
    grid = torch.cat([resize(torch.stack([photos[n] for n in names]).float(), images.shape[-1])[:, None],
                      images.reshape(len(names), len(seeds), *images.shape[1:])], dim=1)  # fmt: skip
    out.grids[f"natural_{clf.key}_{recipe.parameterisation}"] = (caption, grid, tuple(names))
    return out


def evaluate_decoder(
    decoder: LogitDecoder, source: Classifier, heldout: Classifier | None, test_logits: torch.Tensor,
    test_images: torch.Tensor,
) -> tuple[dict, torch.Tensor]:  # fmt: skip
    """Decode test logits (z = 0) and measure: pixel MSE, mean SSIM and PSNR against the originals at decode size;
    top-1 agreement of source and held-out classifiers on reconstructions vs originals (and their mean probability
    of that class, as target_prob / heldout_prob); retrieval top-1 among all test items in pixel space and in the
    held-out classifier's feature space; chance = 1 / test size; onehot_ceiling: the most a decoder that sees only
    the argmax class of `test_logits` can retrieve (measures.onehot_ceiling), the baseline for "beats one-hot"."""
    recon = decoder.decode(test_logits)
    orig = resize(test_images.float(), recon.shape[-1])
    z_src_rec, _ = embed(source, recon)
    z_src_orig, _ = embed(source, orig)
    row = dict(
        mse=float(((recon - orig) ** 2).mean()), ssim=float(M.paired(M.ssim, recon, orig).mean()),
        psnr=float(M.paired(M.psnr, recon, orig).mean()), retrieval_top1=M.retrieval_top1(recon, orig),
        chance=1.0 / len(orig), onehot_ceiling=M.onehot_ceiling(test_logits.argmax(1)),
        agreement_source=M.agreement(z_src_rec, z_src_orig),
        target_prob=float(torch.softmax(z_src_rec.double(), 1).gather(1, z_src_orig.argmax(1, keepdim=True)).mean()),
    )  # fmt: skip
    if heldout is not None:
        z_h_rec, f_h_rec = embed(heldout, recon)
        z_h_orig, f_h_orig = embed(heldout, orig)
        row.update(
            heldout_model=heldout.key, agreement_heldout=M.agreement(z_h_rec, z_h_orig),
            retrieval_top1_features=M.retrieval_top1(f_h_rec, f_h_orig),
            heldout_prob=float(torch.softmax(z_h_rec.double(), 1).gather(1, z_h_orig.argmax(1, keepdim=True)).mean()),
        )  # fmt: skip
    return row, recon


CROSS_CONDITIONS = {"decoder": "logits", "decoder_onehot": "onehot"}


def judge_reconstructions(
    decoder_model: str, recons: dict[str, torch.Tensor], originals: torch.Tensor, judge: Classifier,
    ceiling: float = float("nan"),
) -> list[dict]:  # fmt: skip
    """Rows of the cross-model table: model `judge` (B) looks at reconstructions (condition -> images [N, 3, s, s])
    decoded from model `decoder_model`'s (A's) logits and at the originals [N, 3, s, s]: top-1 agreement of B on
    reconstruction vs original, B's mean probability of the class it gives the original (judge_prob), retrieval
    top-1 in B's penultimate feature space (is reconstruction i nearest original i among all N), chance = 1 / N,
    onehot_ceiling = the one-hot decoder's best possible retrieval (given by the caller)."""
    z_orig, f_orig = embed(judge, originals)
    label = z_orig.argmax(1, keepdim=True)
    rows = []
    for condition, recon in recons.items():
        z_rec, f_rec = embed(judge, recon)
        rows.append(dict(
            decoder_model=decoder_model, judge_model=judge.key, condition=condition,
            agreement=M.agreement(z_rec, z_orig),
            judge_prob=float(torch.softmax(z_rec.double(), 1).gather(1, label).mean()),
            retrieval_top1_features=M.retrieval_top1(f_rec, f_orig), chance=1.0 / len(originals),
            onehot_ceiling=ceiling, rows=len(originals),
        ))  # fmt: skip
    return rows


def decoder_inversion(
    clf: Classifier, heldout: Classifier | None, train_images: torch.Tensor, test_images: torch.Tensor,
    cfg: DecoderConfig, condition: str = "standardised", untrained_control: bool = True, untrained_seed: int = 0,
    judges: Sequence[Classifier] = (), device: str | torch.device = "cpu",
) -> tuple[Outcome, dict[str, tuple[LogitDecoder, Classifier]]]:  # fmt: skip
    """Train the logit decoder and its controls on the train split, evaluate on test. Controls: the same decoder
    conditioned on the one-hot argmax (method decoder_onehot: class identity only), and (optionally) the logit
    decoder trained on an untrained same-architecture network's logits (control "untrained"; agreement and
    target_prob still use the trained classifier). Every model in `judges` (same label space; clf itself
    included if listed) then judges the reconstructions of the logit decoder (condition "logits") and of the
    one-hot control ("onehot"): Outcome.cross (see judge_reconstructions). Decoders train on `device`.
    Returns rows and (decoder, conditioning network) by name."""
    out, decoders = Outcome(), {}
    runs = [("decoder", "none", clf, condition), ("decoder_onehot", "none", clf, "onehot")]
    if untrained_control:
        runs.append(("decoder", "untrained", untrained_copy(clf, untrained_seed), condition))
    recons: dict[str, torch.Tensor] = {}
    for method, control, net, cond in runs:
        z_train, _ = embed(net, train_images)
        z_test, _ = embed(net, test_images)
        t0 = time.perf_counter()
        dec = fit_decoder(z_train, train_images, cond, cfg, device=device)
        sec = time.perf_counter() - t0
        row, recon = evaluate_decoder(dec, clf, heldout, z_test, test_images)
        decoders[method if control == "none" else f"{method}_{control}"] = (dec, net)
        if control == "none":
            recons[CROSS_CONDITIONS[method]] = recon
        out.rows.append(dict(model=clf.key, method=method, control=control, seed=cfg.seed, condition=cond,
                             loss=cfg.loss, epochs=dec.info["epochs"], seconds=sec, train_l1=dec.info["train_l1"],
                             **row))  # fmt: skip
    originals = resize(test_images.float(), cfg.size)
    ceiling = next(r["onehot_ceiling"] for r in out.rows if r["method"] == "decoder_onehot")
    for judge in judges:
        if judge.num_classes != clf.num_classes:
            raise UserError(f"inversion: judge '{judge.key}' has {judge.num_classes} classes, decoder model "
                            f"'{clf.key}' {clf.num_classes}; the cross table needs one label space")  # fmt: skip
        out.cross += judge_reconstructions(clf.key, recons, originals, judge, ceiling)
    return out, decoders


def pick_items(labels: torch.Tensor, classes: Sequence[int], count: int) -> list[int]:
    """`count` test items cycling through `classes`: the k-th item of class c is the k-th test image labelled c
    (falling back to item order when a class is missing)."""
    labels = torch.as_tensor(labels)
    picked: list[int] = []
    seen: dict[int, int] = {}
    for i in range(count):
        c = int(classes[i % len(classes)])
        idx = torch.nonzero(labels == c).flatten().tolist()
        k = seen.get(c, 0)
        seen[c] = k + 1
        choice = idx[k] if k < len(idx) else None
        if choice is None or choice in picked:
            choice = next(j for j in range(len(labels)) if j not in picked)
        picked.append(choice)
    return picked
