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
from PIL import Image

from featrec_grid.errors import UserError

COLUMNS = (
    "model", "other_model", "method", "control", "seed", "target_class", "item", "target_prob", "heldout_model",
    "heldout_prob", "logit_l1_rel", "logit_l2_rel", "logit_l1_rel_start", "mse", "ssim", "psnr", "retrieval_top1",
    "retrieval_top1_features", "chance", "agreement_source", "agreement_heldout", "condition", "loss", "epochs",
    "seconds",
)  # fmt: skip
CROSS_COLUMNS = (
    "decoder_model", "judge_model", "condition", "agreement", "judge_prob", "retrieval_top1_features", "chance", "rows",
)  # fmt: skip
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(*parts: object) -> str:
    """A flat file name from parts: characters other than letters, digits and _-. become '_'."""
    return _SAFE.sub("_", "_".join(str(p) for p in parts))


def grid_image(rows: torch.Tensor | Sequence[torch.Tensor], scale: int = 4, pad: int = 1) -> Image.Image:
    """Images [R, K, 3, H, W] in [0, 1] (R rows of K) -> one RGB PIL image, nearest-upscaled by `scale`, grey gaps."""
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
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(rows: torch.Tensor | Sequence[torch.Tensor], path: Path, scale: int = 4) -> Path:
    """Write a grid (see grid_image) as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, scale=scale).save(path, format="PNG")
    return path


def results_table(rows: Iterable[dict]) -> pd.DataFrame:
    """Result dicts -> DataFrame with the standard columns first (NaN where a metric does not apply), extras after."""
    df = pd.DataFrame(list(rows))
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    return df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]]


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
