"""The grid with its store on object storage: a moto S3 server on loopback, the grid as a CLI subprocess.

Shards, heads and manifests land in the bucket, the results equal those of a local store, and a rerun
reuses every pair; a run into a new output folder reuses the shards in the bucket without rewriting them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from moto_s3 import moto_bucket

pytestmark = pytest.mark.slow

BUCKET = "featrec-grid"
PREFIX = "runs/s3"
KEYS = ["source", "target", "method"]
METRICS = ["mse", "mse_total_seed", "r2", "agreement", "cosine", "accuracy_real", "accuracy_recon"]
MODELS = ("mlp", "cnn", "lite0")

# rows_per_shard 256 keeps every object under 10 MiB: pyarrow uploads bigger files in parts, and moto
# 5.2.1 answers CompleteMultipartUpload with a body pyarrow reads as an error (moto 5.2.5 does not).
SPEC = f"""
store: s3://{BUCKET}/{PREFIX}
models:
  mlp: {{source: zoo, architecture: mlp, options: {{epochs: 2}}}}
  cnn: {{source: zoo, architecture: cnn, options: {{epochs: 2}}}}
  lite0: {{source: lite, architecture: tf_efficientnet_lite0, options: {{img_size: 32}}}}
data:
  train: {{dataset: digits, split: train}}
  test: {{dataset: digits, split: test}}
fit: {{alpha: [0, 1]}}
resources: {{rows_per_shard: 256}}
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; (boto3 client, env for the grid subprocess)."""
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    with moto_bucket(BUCKET) as (endpoint, client):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")
        }
        env.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
            # Keep the AWS SDKs away from any other address: no config files, no instance metadata, no proxy.
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=nowhere,
            AWS_SHARED_CREDENTIALS_FILE=nowhere,
            NO_PROXY="127.0.0.1,localhost",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        )
        yield client, env


def _run(spec: Path, env: dict[str, str], *args: str) -> str:
    cmd = [sys.executable, "-m", "featrec_grid.cli", "run", str(spec), "--no-progress", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _objects(client) -> dict[str, dict]:
    """Key (relative to the store) -> {size, etag, modified} of every object under the store's prefix."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/"):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):  # pyarrow leaves empty "dir/" markers behind
                found[o["Key"][len(PREFIX) + 1 :]] = {
                    "size": o["Size"], "etag": o["ETag"], "modified": o["LastModified"],
                }  # fmt: skip
    return found


def _results(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "results.parquet").sort_values(KEYS).reset_index(drop=True)


@pytest.fixture(scope="module")
def grid(s3, tmp_path_factory):
    client, env = s3
    tmp = tmp_path_factory.mktemp("s3grid")
    spec = tmp / "s3grid.yaml"
    spec.write_text(f"name: s3grid\noutput: {tmp / 'out'}\n{SPEC}")
    first = _run(spec, env)
    return tmp, spec, first, _objects(client)


def test_grid_writes_its_store_to_the_bucket(s3, grid):
    client, _ = s3
    _, _, first, objects = grid
    assert "pairs: computed=9 reused=0 failed=0" in first
    for model in MODELS:
        for split in ("train", "test"):
            rel = f"shards/digits/{split}/{model}"
            manifest = json.loads(
                client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}/manifest.json")["Body"].read()
            )
            assert manifest["model"] == model and manifest["split"] == split
            assert manifest["rows"] == {"train": 1257, "test": 540}[split]
            assert all(f["rows"] <= 256 for f in manifest["files"]) and len(manifest["files"]) >= 3
            parts = sorted(k.rsplit("/", 1)[1] for k in objects if k.startswith(f"{rel}/part-"))
            assert parts == sorted(f["path"] for f in manifest["files"])
            for entry in [*manifest["files"], manifest["head"]]:  # bytes as recorded, read by another client
                body = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}/{entry['path']}")["Body"].read()
                assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    assert any(k.startswith("zoo/") and k.endswith("weights.safetensors") for k in objects)  # the trained zoo
    assert max(o["size"] for o in objects.values()) < 10 << 20


def test_results_equal_a_local_store(grid, s3):
    _, env = s3
    tmp, spec, _, _ = grid
    local = _run(spec, env, "--store", str(tmp / "local_store"), "--output", str(tmp / "local"))
    assert "pairs: computed=9 reused=0 failed=0" in local
    got, want = _results(tmp / "out"), _results(tmp / "local")
    assert got[KEYS].values.tolist() == want[KEYS].values.tolist() and len(got) == 9
    assert (got["train_rows"] == 1257).all() and (got["test_rows"] == 540).all()
    for col in METRICS:
        np.testing.assert_allclose(got[col].astype(float), want[col].astype(float), rtol=1e-6, err_msg=col)


def test_rerun_reuses_pairs_and_shards(grid, s3):
    client, env = s3
    tmp, spec, _, before = grid
    assert "pairs: computed=0 reused=9 failed=0" in _run(spec, env)
    # A fresh output folder refits every pair from the shards already in the bucket, rewriting none of them.
    fresh = _run(spec, env, "--output", str(tmp / "fresh"))
    assert "pairs: computed=9 reused=0 failed=0" in fresh
    assert _objects(client) == before
    got, want = _results(tmp / "fresh"), _results(tmp / "out")
    for col in METRICS:
        np.testing.assert_allclose(got[col].astype(float), want[col].astype(float), rtol=1e-12, err_msg=col)
