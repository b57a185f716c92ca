"""`featrec-grid invert` end to end on a tiny config: table columns, PNGs, galleries rendered in Chromium."""

import pandas as pd
import pytest
from browser import open_page
from click.testing import CliRunner

from featrec_grid.cli import main

pytestmark = pytest.mark.slow

SPEC = """
name: inv
store: {store}
output: {out}
models:
  mlp: {{source: zoo, architecture: mlp, options: {{epochs: 3}}}}
  cnn: {{source: zoo, architecture: cnn, options: {{epochs: 2}}}}
data:
  train: {{dataset: digits, split: train}}
  test: {{dataset: digits, split: test}}
inversion:
  seeds: [0, 1]
  classes: [0, 1]
  optim: {{steps: 20}}
  decoder: {{epochs: 2}}
  gallery_items: 4
  manipulation_items: 2
"""


def test_invert_command_writes_table_images_and_report(tmp_path):
    spec = tmp_path / "inv.yaml"
    out = tmp_path / "out"
    spec.write_text(SPEC.format(store=tmp_path / "store", out=out))
    result = CliRunner().invoke(main, ["invert", str(spec), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'index.html'}" in result.output
    table = pd.read_parquet(out / "inversion.parquet")
    for col in ["model", "method", "seed", "target_prob", "heldout_prob", "retrieval_top1", "chance", "ssim", "psnr"]:
        assert col in table.columns
    assert {"class", "combined", "difference", "match", "decoder", "decoder_onehot"} <= set(table["method"])
    assert set(table["model"]) == {"mlp", "cnn"}
    dec = table[(table["method"] == "decoder") & (table["control"] == "none")]
    assert len(dec) == 2 and list(dec["chance"]) == pytest.approx([1 / 540] * 2)
    assert len(list(out.glob("inv_*.png"))) >= 6
    with open_page(out / "index.html", wait_for="document.readyState === 'complete'") as seen:
        widths = seen.page.evaluate("[...document.querySelectorAll('figure img')].map(i => i.naturalWidth)")
        assert "Inverting logits back to images" in seen.text()
        assert not seen.console_errors and not seen.page_errors and not seen.external_requests
    assert len(widths) >= 6 and all(w > 0 for w in widths)  # every gallery image decoded as a real PNG
