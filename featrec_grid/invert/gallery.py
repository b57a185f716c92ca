"""Inversion outputs: PNG image grids (PIL), the results table (pandas), and an HTML gallery snippet for the report."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from featrec_grid.errors import UserError
from featrec_grid.invert.transfer import TRANSFER_COLUMNS

COLUMNS = (
    "model", "other_model", "method", "parameterisation", "objective", "control", "seed", "target_class", "item",
    "photo", "target_prob", "heldout_model", "heldout_prob", "logit_l1_rel", "logit_l2_rel", "logit_l1_rel_start",
    "logit_cos_dist", "logit_cos_dist_start", "third_model", "third_prob", "third_top1_is_target", "mse", "ssim",
    "psnr", "retrieval_top1", "retrieval_top1_features", "chance", "onehot_ceiling", "agreement_source",
    "agreement_heldout", "condition", "loss", "epochs", "seconds",
)  # fmt: skip
CROSS_COLUMNS = (
    "decoder_model", "judge_model", "condition", "agreement", "judge_prob", "retrieval_top1_features", "chance",
    "onehot_ceiling", "rows",
)  # fmt: skip
_TEXT_COLUMNS = ("model", "other_model", "method", "parameterisation", "objective", "control", "photo",
                 "heldout_model", "third_model", "condition", "loss")  # fmt: skip
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(*parts: object) -> str:
    """A flat file name from parts: characters other than letters, digits and _-. become '_'."""
    return _SAFE.sub("_", "_".join(str(p) for p in parts))


def grid_scale(h: int) -> int:
    """Nearest-neighbour upscale factor that shows an image of side h at about 64 px or more (16 px: 4, 96 px: 1)."""
    return max(1, round(64 / h))


def grid_image(
    rows: torch.Tensor | Sequence[torch.Tensor], scale: int = 4, pad: int = 1, row_labels: Sequence[str] | None = None
) -> Image.Image:
    """Images [R, K, 3, H, W] in [0, 1] (R rows of K) -> one RGB PIL image, nearest-upscaled by `scale`, grey gaps;
    `row_labels` (one per row) are written in a white margin on the left."""
    rows = torch.stack([torch.as_tensor(r) for r in rows]) if not torch.is_tensor(rows) else rows
    if rows.dim() != 5 or rows.shape[2] != 3:
        raise ValueError(f"grid_image wants [rows, cols, 3, H, W], got {tuple(rows.shape)}")
    r, k, _, h, w = rows.shape
    canvas = np.full((r * (h + pad) + pad, k * (w + pad) + pad, 3), 0.5)
    arr = rows.detach().float().clamp(0, 1).permute(0, 1, 3, 4, 2).numpy()
    for i in range(r):
        for j in range(k):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = arr[i, j]
    img = Image.fromarray((canvas * 255 + 0.5).astype(np.uint8), "RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
    return _labelled(img, row_labels, r) if row_labels else img


def _labelled(img: Image.Image, labels: Sequence[str], n_rows: int) -> Image.Image:
    """img with a white left margin holding labels[i] at the height of row i (PIL's bundled font, no files)."""
    if len(labels) != n_rows:
        raise ValueError(f"grid_image: {len(labels)} row labels for {n_rows} rows")
    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(img)
    width = max(int(draw.textlength(str(t), font=font)) for t in labels) + 8
    out = Image.new("RGB", (img.width + width, img.height), "white")
    out.paste(img, (width, 0))
    draw = ImageDraw.Draw(out)
    row_h = img.height / n_rows
    for i, text in enumerate(labels):
        draw.text((4, int(row_h * (i + 0.5)) - 7), str(text), fill="black", font=font)
    return out


def save_grid(
    rows: torch.Tensor | Sequence[torch.Tensor], path: Path, scale: int = 4, row_labels: Sequence[str] | None = None
) -> Path:
    """Write a grid (see grid_image) as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, scale=scale, row_labels=row_labels).save(path, format="PNG", optimize=True)
    return path


def results_table(rows: Iterable[dict]) -> pd.DataFrame:
    """Result dicts -> DataFrame with the standard columns first (NaN where a metric does not apply), extras after."""
    df = pd.DataFrame(list(rows))
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=object) if col in _TEXT_COLUMNS else np.nan
    return df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]]


def transfer_table(rows: Iterable[dict]) -> pd.DataFrame:
    """Transfer rows (transfer.judge_images) -> DataFrame with TRANSFER_COLUMNS, typed even when empty."""
    types = {"class": "int64", "seed": "int64", "target_prob": "float64", "target_rank": "int64",
             "top1_is_target": "bool", "heldout": "bool"}  # fmt: skip
    df = pd.DataFrame(list(rows), columns=list(TRANSFER_COLUMNS))
    return df.astype({c: t for c, t in types.items()}) if len(df) else df.astype(types)


def cross_table(rows: Iterable[dict]) -> pd.DataFrame:
    """Cross-model decoder rows (experiments.judge_reconstructions) -> DataFrame with CROSS_COLUMNS first."""
    df = pd.DataFrame(list(rows))
    for col in CROSS_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=object if col.endswith(("model", "condition")) else float)
    return df[list(CROSS_COLUMNS) + [c for c in df.columns if c not in CROSS_COLUMNS]]


def gallery_html(output_dir: Path, images: Sequence[tuple[str, str]]) -> str:
    """Trusted HTML: one <figure> per (caption, PNG path relative to output_dir), the image embedded as a base64
    data URI so the report is self-contained; captions are HTML-escaped."""
    root = Path(output_dir).resolve()
    parts = ['<div class="inversion-gallery">']
    for caption, rel in images:
        path = (root / rel).resolve()
        if root not in path.parents or path.suffix.lower() != ".png":
            raise UserError(f"gallery: image '{rel}' must be a .png inside {root}")
        if not path.is_file():
            raise UserError(f"gallery: image '{rel}' not found in {root}")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(str(caption), quote=True)}">'
            f"<figcaption>{html.escape(str(caption))}</figcaption></figure>"
        )
    parts.append("</div>")
    return "\n".join(parts)
