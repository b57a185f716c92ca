"""Everything a run left under its output folder -> index.html: pair results, model-level CKA, inversion.

`run`, `invert` and `cka` each write their own tables; each then calls `publish`, so the page always shows
all of them, whichever command ran last.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import reduce
from .plan import CKA_COLUMNS, cka_key, used_models
from .report import PAIR_METRICS, Section, matrix_figure, model_order, write_report
from .spec import GridSpec

INVERSION_SUMMARY = ["target_prob", "heldout_prob", "retrieval_top1", "chance", "ssim", "psnr"]


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
    sections = [_seed_section(spec, results), _head_section(models), _cka_section(spec, output, order),
                _layer_cka_section(output), _inversion_section(output)]  # fmt: skip
    sections = [s for s in sections if s is not None]
    return write_report(
        output,
        results=results,
        models=models,
        spec=spec.resolved(),
        provenance=reduce.read_json(output, "provenance.json") or {},
        sections=sections,
    )


def seed_table(spec: GridSpec, results: pd.DataFrame) -> pd.DataFrame:
    """The seed's published numbers beside ours: one row per spec `seed_results` entry, one column per mode and
    method that ran on at least one of these pairs (faithful first, e.g. `faithful sgd`, `default ridge`), NaN
    where that pair did not run."""
    columns = ["setting", "source", "target", "metric", "seed"]
    runs = list(results[["mode", "method"]].drop_duplicates().itertuples(index=False, name=None)) if len(results) else []
    runs.sort(key=lambda run: (run[0] != "faithful", run[1]))  # seed | faithful | default, as the seed reads
    records = []
    for item in spec.seed_results:
        row = {k: item[k] for k in columns[:4]} | {"seed": item["value"]}
        for mode, method in runs:
            hit = results[(results["setting"] == item["setting"]) & (results["mode"] == mode)
                          & (results["method"] == method) & (results["source"] == item["source"])
                          & (results["target"] == item["target"])]  # fmt: skip
            row[f"{mode} {method}"] = float(hit[item["metric"]].iloc[0]) if len(hit) else float("nan")
        records.append(row | {"note": item["note"]})
    table = pd.DataFrame.from_records(records)
    return table.dropna(axis=1, how="all")  # a mode/method that ran on none of these pairs


def _seed_section(spec: GridSpec, results: pd.DataFrame) -> Section | None:
    """The experiment's table: the seed's published number | ours, faithful | ours, default."""
    if not spec.seed_results:
        return None
    note = (
        "The FeatReconstruct seed's published numbers beside ours. 'faithful' reruns the seed's recipe: its data "
        "transform (CenterCrop without resize, so small images sit zero-padded in the frame; ImageNet mean/std) and "
        "its fitter (torch.nn.Linear, SGD lr 0.1, momentum 0.9, batch 256, 100 epochs, no shuffling). 'default' "
        "uses each model's own preprocessing and the closed-form ridge map. mse_total_seed is the seed's 'total MSE': "
        "the sum over test batches of 256 of each batch's mean squared error, not a mean. Agreement is a fraction."
    )
    return Section("Against the seed's published numbers", tables=[seed_table(spec, results)], note=note)


HEAD_COLUMNS = ["model", "classes", "feature_dim", "head_rank", "null_dims", "zero_head", "exact_inverse",
                "rowspace_variance", "pinv_r2", "pinv_agreement", "logit_variance", "reason"]  # fmt: skip


def _head_section(models: pd.DataFrame) -> Section | None:
    """Why self-reconstruction works or fails, per model: the head's shape and rank, and the analytic baseline."""
    if "head_rank" not in models.columns:
        return None
    note = (
        "Logits are z = W f + b. The analytic baseline reconstructs f^ = pinv(W)(z - b) with no fitting at all: it "
        "is exact when C >= D and W has full column rank, and otherwise recovers only the part of f in W's row space "
        "(rowspace_variance: that part's share of the test features' variance). pinv_agreement is the head's top-1 "
        "on f^ against its top-1 on f; a fitted map can do better than pinv only by exploiting correlations between "
        "the visible and the invisible directions of f."
    )
    return Section("Heads: why self-reconstruction succeeds or fails",
                   tables=[models[[c for c in HEAD_COLUMNS if c in models.columns]]], note=note)  # fmt: skip


def _cka_section(spec: GridSpec, output: Path, order: list[str]) -> Section | None:
    """Model-level CKA of penultimate features and of logits on the test split, beside the agreement matrix."""
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


INVERSION_CROSS = {"logits": "logit decoder", "onehot": "one-hot control"}
INVERSION_CROSS_METRICS = {
    "retrieval_top1_features": "retrieval top-1 in B's features",
    "agreement": "B's top-1 agreement",
    "judge_prob": "B's probability of its class",
}


def inversion_cross_figures(cross: pd.DataFrame) -> list:
    """One heatmap per condition of the cross-model decoder table (rows = the model whose logits the decoder was
    trained on, A; columns = the judge, B), a menu switching between the metrics; one 0-1 colour scale for all."""
    from .report import plotly_text

    order = list(dict.fromkeys([*cross["decoder_model"].astype(str), *cross["judge_model"].astype(str)]))
    frame = cross.assign(decoder_model=cross["decoder_model"].astype(str), judge_model=cross["judge_model"].astype(str))
    figures = []
    for condition, label in INVERSION_CROSS.items():
        sub = frame[frame["condition"] == condition]
        if not len(sub):
            continue
        matrices = {
            name: sub.pivot_table(index="decoder_model", columns="judge_model", values=metric, aggfunc="mean")
            for metric, name in INVERSION_CROSS_METRICS.items()
        }
        fig = matrix_figure(matrices, order, metric="agreement", axes=("decoder trained on A's logits", "judge B"),
                            hover=("decoder of A", "judge B"))  # fmt: skip
        for trace, name in zip(fig.data, matrices, strict=True):
            trace.hovertemplate = trace.hovertemplate.replace("Top-1 agreement", plotly_text(name))
        chance = float(sub["chance"].max())
        fig.update_layout(title_text=(
            f"<b>Cross-model: {plotly_text(label)}</b><br><span style='font-size:12px'>"
            f"{int(sub['rows'].max())} test images; retrieval chance {chance:.4f}</span>"
        ))  # fmt: skip
        figures.append(fig)
    return figures


def _inversion_section(output: Path) -> Section | None:
    """Inversion results: a summary per model and method, the image galleries, and the cross-model decoder table
    (heatmaps of agreement per condition and the full table)."""
    from .invert import gallery_html

    table = reduce.read_frame(output, "inversion")
    images = reduce.read_json(output, "inversion_images.json")
    cross = reduce.read_frame(output, "inversion_cross")
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
    figures, tables = [], [summary]
    if cross is not None and len(cross):
        note += (
            " Cross-model table (heatmaps and the last table, below the galleries): a decoder is trained on model "
            "A's logits and decodes A's logits of every test image; row A, column B scores those reconstructions "
            "with model B. retrieval_top1_features: how often B's features of a reconstruction are nearest those "
            "of its own original among all test images (against chance); agreement: how often B gives the "
            "reconstruction the class it gives the original; judge_prob: B's mean probability of that class. The "
            "diagonal (B = A) asks what of A's own view survives, off-diagonal cells whether other models see it "
            "too; where the logit decoder's cells beat the one-hot control's, A's logits carried more than the class."
        )
        figures = inversion_cross_figures(cross)
        cols = ["decoder_model", "judge_model", "condition", "agreement", "judge_prob", "retrieval_top1_features",
                "chance", "rows"]  # fmt: skip
        tables.append(cross[cols].sort_values(["condition", "decoder_model", "judge_model"], kind="stable"))
    html = gallery_html(output, [tuple(i) for i in images or []])
    return Section("Inverting logits back to images", figures=figures, tables=tables, html=html, note=note)
