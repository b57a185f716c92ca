"""Everything a run left under its output folder -> index.html: pair results, model-level CKA, inversion.

`run`, `invert` and `cka` each write their own tables; each then calls `publish`, so the page always shows
all of them, whichever command ran last.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import reduce
from .report import PAIR_METRICS, Section, matrix_figure, model_order, write_report
from .spec import GridSpec

CKA_COLUMNS = ("features", "logits")
INVERSION_SUMMARY = ["target_prob", "heldout_prob", "retrieval_top1", "chance", "ssim", "psnr"]


def used_models(spec: GridSpec) -> list[str]:
    return list(dict.fromkeys(k for p in spec.pairs for k in p))


def publish(output: Path, spec: GridSpec) -> Path:
    """Write output/index.html from the tables found there; returns its path."""
    output = Path(output)
    results = reduce.read_frame(output, "results")
    if results is None:
        results = pd.DataFrame(columns=["source", "target", "method", *PAIR_METRICS])
    models = reduce.read_frame(output, "models")
    if models is None:
        models = pd.DataFrame({"model": list(spec.models), "family": [m.source for m in spec.models.values()]})
    agree = results.pivot_table(index="source", columns="target", values="agreement", aggfunc="mean")
    order = model_order(models, agree if len(results) else None)
    sections = [_cka_section(spec, output, order), _layer_cka_section(output), _inversion_section(output)]
    sections = [s for s in sections if s is not None]
    return write_report(
        output,
        results=results,
        models=models,
        spec=spec.resolved(),
        provenance=reduce.read_json(output, "provenance.json") or {},
        sections=sections,
    )


def _cka_section(spec: GridSpec, output: Path, order: list[str]) -> Section | None:
    """Model-level CKA of penultimate features and of logits on the test split, beside the agreement matrix."""
    from .grid import cka_key

    used = used_models(spec)
    found = {c: reduce.load_cka(output, c, cka_key(spec, used)) for c in CKA_COLUMNS}
    matrices = {
        f"{c} ({r['rows']} test rows)": pd.DataFrame(r["cka"], index=r["models"], columns=r["models"])
        for c, r in found.items()
        if r is not None
    }
    if not matrices:
        return None
    fig = matrix_figure(
        matrices, [m for m in order if m in used], metric="cka", subtitle=f"{spec.test.key}/{spec.test.split}",
        axes=("model", "model"), hover=("model A", "model B"),
    )
    note = (
        "Linear CKA (Kornblith et al., 2019) between every two models' penultimate features, and between their "
        "logits, on the same test images: 1 means the representations agree up to rotation and isotropic scale. "
        "The menu switches between features and logits. High CKA with low agreement (or the reverse) shows that "
        "similar representations and linearly recoverable features are different questions."
    )
    return Section("Representation similarity (CKA)", figures=[fig], note=note)


def _layer_cka_section(output: Path) -> Section | None:
    """Layer-by-layer CKA heatmaps of the pairs the `cka` command compared."""
    from .cka import layer_cka_figure

    exports = reduce.read_json(output, "layer_cka.json")
    if not exports:
        return None
    note = (
        "Linear CKA between every layer of one model and every layer of another on the same test images "
        "(minibatch unbiased HSIC accumulated in float64; Nguyen, Raghu and Kornblith 2021). Layers listed in "
        "forward order; each model sees the images through its own input transform."
    )
    return Section("Layer-wise CKA", figures=[layer_cka_figure(e) for e in exports], note=note)


def _inversion_section(output: Path) -> Section | None:
    """Inversion results: a summary per model and method, and the image galleries."""
    from .invert import gallery_html

    table = reduce.read_frame(output, "inversion")
    images = reduce.read_json(output, "inversion_images.json")
    if table is None:
        return None
    summary = (
        table.groupby(["model", "method", "control"], dropna=False)[INVERSION_SUMMARY].mean().reset_index()
    )
    note = (
        "Class visualisation, combined and difference objectives, logit matching and a feed-forward decoder "
        "conditioned on logits, each with controls (an untrained network, the starting noise, and for the decoder "
        "the same decoder conditioned on one-hot labels). Logits carry instance information only where the logit "
        "decoder's retrieval top-1 beats the one-hot control's; chance is 1 / test gallery size. Means over seeds, "
        "classes and items."
    )
    html = gallery_html(output, [tuple(i) for i in images or []])
    return Section("Inverting logits back to images", tables=[summary], html=html, note=note)
