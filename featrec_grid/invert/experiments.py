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
from featrec_grid.invert.pixels import embed, resize
from featrec_grid.models import Classifier


@dataclass(frozen=True)
class OptimSettings:
    """Settings of optimisation-based inversion shared by every objective (see optimise.invert_many)."""

    steps: int = 200
    lr: tuple[float, float] = (0.05, 0.005)
    blur_sigma: tuple[float, float] = (1.0, 0.3)
    blur_every: int = 4
    jitter: int = 1
    noise_mean: float = 0.5
    noise_scale: float = 0.1
    size: int | None = None

    def run(self, objective: Objective, seeds: Sequence[int]) -> list[InversionResult]:
        return invert_many(
            objective, seeds, steps=self.steps, lr=self.lr, blur_sigma=self.blur_sigma, blur_every=self.blur_every,
            jitter=self.jitter, size=self.size, noise_mean=self.noise_mean, noise_scale=self.noise_scale,
        )  # fmt: skip


@dataclass
class Outcome:
    """Rows for the results table, rows for the cross-model decoder table, and image grids: file stem ->
    (caption, images [R, K, 3, H, W] on the CPU). Plain data: a Ray task returns it to the driver."""

    rows: list[dict] = field(default_factory=list)
    grids: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)
    cross: list[dict] = field(default_factory=list)

    def add(self, other: Outcome) -> Outcome:
        self.rows += other.rows
        self.grids.update(other.grids)
        self.cross += other.cross
        return self


def _timed(opt: OptimSettings, objective: Objective, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run one batched inversion: (final images [B, 3, H, W], starting noise [B, 3, H, W], seconds per image)."""
    t0 = time.perf_counter()
    res = opt.run(objective, seeds)
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


def class_visualisation(
    clf: Classifier, heldout: Classifier | None, classes: Sequence[int], seeds: Sequence[int], opt: OptimSettings,
    controls: Sequence[str] = ("untrained", "noise"), untrained_seed: int = 0,
) -> Outcome:  # fmt: skip
    """Maximise each class's logit from each seed (one batch); controls: an untrained same-architecture network
    optimised the same way ("untrained": target_prob under that network), and the starting noise scored by the
    trained model ("noise"; averaged over all classes from the same seeds it is exactly 1/C, so read it per class)."""
    out = Outcome()
    nets = [("none", clf)] + ([("untrained", untrained_copy(clf, untrained_seed))] if "untrained" in controls else [])
    hk = heldout.key if heldout is not None else None
    cls, sds = _class_seed_batch(classes, seeds)
    for control, net in nets:
        images, starts, sec = _timed(opt, class_objective(net, cls), sds)
        scored = [(images, control, net, sec)]
        scored += [(starts, "noise", clf, 0.0)] if control == "none" and "noise" in controls else []
        for batch, ctrl, scorer, seconds in scored:
            tp, hp = _prob(scorer, batch, cls), _prob(heldout, batch, cls)
            out.rows += [dict(model=clf.key, method="class", control=ctrl, seed=s, target_class=int(c),
                              target_prob=tp[i], heldout_model=hk, heldout_prob=hp[i], seconds=seconds)
                         for i, (c, s) in enumerate(zip(cls, sds, strict=True))]  # fmt: skip
        suffix = "" if control == "none" else f" ({control} control)"
        caption = f"class visualisation, {clf.key}{suffix}: rows = classes {list(classes)}, columns = seeds"
        out.grids[f"class_{clf.key}_{control}"] = (caption, _grid(images, len(classes)))
    return out


def pair_objectives(
    a: Classifier, b: Classifier, heldout: Classifier | None, classes: Sequence[int], seeds: Sequence[int],
    opt: OptimSettings, weights: tuple[float, float] = (0.5, 0.5), controls: Sequence[str] = ("untrained", "noise"),
    untrained_seed: int = 0,
) -> Outcome:  # fmt: skip
    """Seed 003's two-model objectives per class and seed: combined (w_a A + w_b B) and difference (A - B and
    B - A). target_prob: the mean of both models' probabilities (combined) or the maximised model's (difference);
    prob_model / prob_other give each side (for "noise": the trained models scoring the starting noise)."""
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
            obj = make(first, second, cls, weights) if method == "combined" else make(first, second, cls)
            images, starts, sec = _timed(opt, obj, sds)
            scored = [(images, control, sec)] + ([(starts, "noise", 0.0)] if control == "none" and "noise" in controls else [])
            for batch, ctrl, seconds in scored:
                pa, pb = _prob(first, batch, cls), _prob(second, batch, cls)
                tp, hp = (pa + pb) / 2 if method == "combined" else pa, _prob(heldout, batch, cls)
                out.rows += [dict(model=keys[0], other_model=keys[1], method=method, control=ctrl, seed=s,
                                  target_class=int(c), target_prob=tp[i], prob_model=pa[i], prob_other=pb[i],
                                  heldout_model=hk, heldout_prob=hp[i], seconds=seconds)
                             for i, (c, s) in enumerate(zip(cls, sds, strict=True))]  # fmt: skip
            op = "+" if method == "combined" else "-"
            suffix = "" if control == "none" else f" ({control} control)"
            caption = f"{method}: {keys[0]} {op} {keys[1]}{suffix}; rows = classes {list(classes)}, columns = seeds"
            out.grids[f"{method}_{keys[0]}_{keys[1]}_{control}"] = (caption, _grid(images, len(classes)))
    return out


def match_inversion(
    clf: Classifier, source: Classifier, heldout: Classifier | None, naturals: torch.Tensor, items: Sequence[int],
    seeds: Sequence[int], opt: OptimSettings, controls: Sequence[str] = ("untrained", "noise"), untrained_seed: int = 0,
) -> Outcome:  # fmt: skip
    """Make `clf`'s logits match `source`'s logits on natural image naturals[items[i]] (L1, seed 003), image i
    starting from seeds[i]; source = clf is self-inversion. SSIM/PSNR/MSE against the natural image at the
    inversion size; logit distances relative to the target at the end and at the start. Controls: an untrained
    clf matching (its own, for self-inversion) targets, and the starting noise."""
    out = Outcome()
    other = None if source is clf else source.key
    hk = heldout.key if heldout is not None else None
    nats = naturals[list(items)].float()
    nets = [("none", clf, source)]
    if "untrained" in controls:
        u = untrained_copy(clf, untrained_seed)
        nets.append(("untrained", u, u if source is clf else source))
    grid_rows: list[torch.Tensor] = []
    for control, net, src in nets:
        t = target_logits(src, nats)
        images, starts, sec = _timed(opt, match_objective(net, t, nats), seeds)
        nat = resize(nats, images.shape[-1])
        c = t.argmax(1)
        l1_start, _ = M.logit_distance(embed(net, starts)[0], t)
        scored = [(images, control, net, sec)]
        scored += [(starts, "noise", clf, 0.0)] if control == "none" and "noise" in controls else []
        for batch, ctrl, scorer, seconds in scored:
            z, _ = embed(scorer, batch)
            l1, l2 = M.logit_distance(z, t)
            tp, hp = torch.softmax(z.double(), 1).gather(1, c[:, None])[:, 0].numpy(), _prob(heldout, batch, c)
            ss, ps = M.paired(M.ssim, batch, nat), M.paired(M.psnr, batch, nat)
            mse = ((batch - nat) ** 2).mean(dim=(1, 2, 3))
            out.rows += [dict(model=clf.key, other_model=other, method="match", control=ctrl, seed=s, item=int(item),
                              target_class=int(c[i]), target_prob=tp[i], heldout_model=hk, heldout_prob=hp[i],
                              logit_l1_rel=l1[i], logit_l2_rel=l2[i], logit_l1_rel_start=l1_start[i],
                              mse=float(mse[i]), ssim=ss[i], psnr=ps[i], seconds=seconds)
                         for i, (item, s) in enumerate(zip(items, seeds, strict=True))]  # fmt: skip
        grid_rows += ([nat] if control == "none" else []) + [images]
    src_name = "itself" if source is clf else source.key
    label = f"match: {clf.key} matching the logits of {src_name} on test images; rows = natural, inversion"
    label += ", untrained-network inversion" if len(grid_rows) > 2 else ""
    out.grids[f"match_{clf.key}_{src_name}"] = (label + "; columns = seeds (one image each)", torch.stack(grid_rows))
    return out


def evaluate_decoder(
    decoder: LogitDecoder, source: Classifier, heldout: Classifier | None, test_logits: torch.Tensor,
    test_images: torch.Tensor,
) -> tuple[dict, torch.Tensor]:  # fmt: skip
    """Decode test logits (z = 0) and measure: pixel MSE, mean SSIM and PSNR against the originals at decode size;
    top-1 agreement of source and held-out classifiers on reconstructions vs originals (and their mean probability
    of that class, as target_prob / heldout_prob); retrieval top-1 among all test items in pixel space and in the
    held-out classifier's feature space; chance = 1 / test size."""
    recon = decoder.decode(test_logits)
    orig = resize(test_images.float(), recon.shape[-1])
    z_src_rec, _ = embed(source, recon)
    z_src_orig, _ = embed(source, orig)
    row = dict(
        mse=float(((recon - orig) ** 2).mean()), ssim=float(M.paired(M.ssim, recon, orig).mean()),
        psnr=float(M.paired(M.psnr, recon, orig).mean()), retrieval_top1=M.retrieval_top1(recon, orig),
        chance=1.0 / len(orig), agreement_source=M.agreement(z_src_rec, z_src_orig),
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
    decoder_model: str, recons: dict[str, torch.Tensor], originals: torch.Tensor, judge: Classifier
) -> list[dict]:
    """Rows of the cross-model table: model `judge` (B) looks at reconstructions (condition -> images [N, 3, s, s])
    decoded from model `decoder_model`'s (A's) logits and at the originals [N, 3, s, s]: top-1 agreement of B on
    reconstruction vs original, B's mean probability of the class it gives the original (judge_prob), retrieval
    top-1 in B's penultimate feature space (is reconstruction i nearest original i among all N), chance = 1 / N."""
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
            rows=len(originals),
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
    for judge in judges:
        if judge.num_classes != clf.num_classes:
            raise UserError(f"inversion: judge '{judge.key}' has {judge.num_classes} classes, decoder model "
                            f"'{clf.key}' {clf.num_classes}; the cross table needs one label space")  # fmt: skip
        out.cross += judge_reconstructions(clf.key, recons, originals, judge)
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
