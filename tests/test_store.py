"""Store: shard round trips, foreign readers, checksums, atomicity, corruption, pickling, S3 through moto."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest
import safetensors.numpy
from moto_s3 import moto_bucket

from featrec_grid.errors import UserError
from featrec_grid.refs import DataRef
from featrec_grid.store import Store

SPLIT = "shards/digits/test/m1"
META = {
    "key": "k1",
    "model": "m1",
    "dataset": "digits",
    "split": "test",
    "weights_digest": "abc",
    "transform": {"size": 8},
}
C, D = 7, 12


def make_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "index": rng.permutation(10 * n)[:n].astype(np.int64),
        "label": rng.integers(0, C, n).astype(np.int64),
        "logits": rng.standard_normal((n, C)).astype(np.float32),
        "features": rng.standard_normal((n, D)).astype(np.float32),
    }


def batches_of(data: dict[str, np.ndarray], sizes: list[int]):
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        yield data["index"][sl], data["label"][sl], data["logits"][sl], data["features"][sl]
        start += size
    assert start == len(data["index"])


def make_head(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((C, D)).astype(np.float32), rng.standard_normal(C).astype(np.float32)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def written(store):
    """A split of 103 rows in uneven batches, 25 rows per shard: shards of 25, 25, 25, 25, 3."""
    data, head = make_data(103), make_head()
    manifest = store.write_split(
        SPLIT, meta=META, batches=batches_of(data, [10, 0, 37, 56]), head=head, rows_per_shard=25
    )
    return data, head, manifest


def split_path(store: Store, name: str = "") -> str:
    return os.path.join(store.uri, SPLIT, name)


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_over_several_shards(store, written):
    data, (w, b), _ = written
    out = store.read_split(SPLIT)
    assert set(out) == {"index", "label", "logits", "features"}
    for name, expected in data.items():
        assert out[name].dtype == expected.dtype and out[name].shape == expected.shape
        np.testing.assert_array_equal(out[name], expected)

    shards = list(store.iter_split(SPLIT))
    assert [len(s["index"]) for s in shards] == [25, 25, 25, 25, 3]
    np.testing.assert_array_equal(shards[3]["features"], data["features"][75:100])
    # Local reads are views of a read-only memory map, not private copies.
    assert not shards[0]["features"].flags.writeable and not shards[0]["features"].flags.owndata

    sub = list(store.iter_split(SPLIT, columns=["logits"]))
    assert all(set(s) == {"logits"} for s in sub)
    both = store.read_split(SPLIT, columns=("label", "features"))
    assert set(both) == {"label", "features"}
    np.testing.assert_array_equal(both["features"], data["features"])
    np.testing.assert_array_equal(both["label"], data["label"])

    w2, b2 = store.read_head(SPLIT)
    assert w2.dtype == np.float32 and b2.dtype == np.float32
    np.testing.assert_array_equal(w2, w)
    np.testing.assert_array_equal(b2, b)
    with pytest.raises(ValueError, match="columns"):
        store.read_split(SPLIT, columns=["logit"])


def test_max_shard_bytes_caps_rows_and_float64_input_is_cast(store):
    data = make_data(40)
    row_bytes = 16 + 4 * (C + D)
    batches = [(i, y, z.astype(np.float64), f) for i, y, z, f in batches_of(data, [40])]
    store.write_split(SPLIT, meta=META, batches=batches, head=make_head(), max_shard_bytes=15 * row_bytes + 5)
    assert [len(s["label"]) for s in store.iter_split(SPLIT)] == [15, 15, 10]
    np.testing.assert_array_equal(store.read_split(SPLIT)["logits"], data["logits"])


def test_empty_split_reads_as_empty_arrays(store):
    manifest = store.write_split(SPLIT, meta=META, batches=[], head=make_head())
    assert manifest["rows"] == 0 and manifest["files"] == []
    assert store.check_split(SPLIT, "k1").state == "complete"
    out = store.read_split(SPLIT)
    assert out["logits"].shape == (0, C) and out["features"].shape == (0, D) and out["index"].shape == (0,)


# ------------------------------------------------------------------------------------- foreign readers
def test_shards_readable_without_this_package(store, written):
    data, (w, b), _ = written
    expected_schema = pa.schema(
        [
            pa.field("index", pa.int64()),
            pa.field("label", pa.int64()),
            pa.field("logits", pa.list_(pa.field("item", pa.float32()), C)),
            pa.field("features", pa.list_(pa.field("item", pa.float32()), D)),
        ]
    )
    tables = []
    for i in range(5):
        path = split_path(store, f"part-{i:05d}.arrow")
        raw = Path(path).read_bytes()
        assert raw[:6] == b"ARROW1" and raw[-6:] == b"ARROW1"  # IPC *file* format (Feather v2)
        table = feather.read_table(path)
        assert table.schema.equals(expected_schema)
        with pa.OSFile(path) as f:
            assert pa.ipc.open_file(f).read_all().equals(table)
        tables.append(table)
    table = pa.concat_tables(tables)
    np.testing.assert_array_equal(table.column("index").to_numpy(), data["index"])
    logits = np.array(table.column("logits").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(logits, data["logits"])

    df = pd.concat(
        [pd.read_feather(split_path(store, f"part-{i:05d}.arrow")) for i in range(5)], ignore_index=True
    )
    assert list(df.columns) == ["index", "label", "logits", "features"]
    np.testing.assert_array_equal(df["label"].to_numpy(), data["label"])
    np.testing.assert_array_equal(np.stack(df["features"].to_numpy()), data["features"])

    head = safetensors.numpy.load_file(split_path(store, "head.safetensors"))
    np.testing.assert_array_equal(head["weight"], w)
    np.testing.assert_array_equal(head["bias"], b)


def test_manifest_fields_and_checksums(store, written):
    data, _, manifest = written
    on_disk = json.loads(Path(split_path(store, "manifest.json")).read_text())
    assert on_disk == manifest
    for k, v in META.items():
        assert manifest[k] == v
    assert manifest["format"] == "featrec-grid/shards/1"
    assert (manifest["rows"], manifest["logits_dim"], manifest["features_dim"]) == (103, C, D)
    assert [f["path"] for f in manifest["files"]] == [f"part-{i:05d}.arrow" for i in range(5)]
    assert [f["rows"] for f in manifest["files"]] == [25, 25, 25, 25, 3]
    for entry in [*manifest["files"], manifest["head"]]:
        raw = Path(split_path(store, entry["path"])).read_bytes()
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
        assert entry["bytes"] == len(raw)
    assert manifest["head"]["path"] == "head.safetensors"
    assert sorted(os.listdir(split_path(store))) == sorted(
        [f["path"] for f in manifest["files"]] + ["head.safetensors", "manifest.json"]
    )


# ------------------------------------------------------------------------------- states and corruption
def test_check_split_states(store, written):
    assert store.check_split(SPLIT, "k1").state == "complete"
    assert store.check_split("shards/digits/test/other", "k1").state == "missing"
    stale = store.check_split(SPLIT, "k2")
    assert stale.state == "stale" and "'k1'" in stale.reason and stale.manifest["model"] == "m1"

    shard = split_path(store, "part-00001.arrow")
    original = Path(shard).read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    Path(shard).write_bytes(bytes(flipped))
    status = store.check_split(SPLIT, "k1")
    assert status.state == "corrupt" and shard in status.reason and "sha256" in status.reason
    # Size-only checking cannot see a same-size change: documents what verify_checksums=False gives up.
    assert store.check_split(SPLIT, "k1", verify_checksums=False).state == "complete"

    Path(shard).write_bytes(original[:-10])
    status = store.check_split(SPLIT, "k1", verify_checksums=False)
    assert status.state == "corrupt" and shard in status.reason and "bytes" in status.reason

    os.remove(shard)
    status = store.check_split(SPLIT, "k1")
    assert status.state == "corrupt" and shard in status.reason and "missing" in status.reason
    Path(shard).write_bytes(original)
    assert store.check_split(SPLIT, "k1").state == "complete"

    head = split_path(store, "head.safetensors")
    os.remove(head)
    status = store.check_split(SPLIT, "k1")
    assert status.state == "corrupt" and head in status.reason

    manifest_path = split_path(store, "manifest.json")
    Path(manifest_path).write_text('{"key": "k1", "files": [')
    status = store.check_split(SPLIT, "k1")
    assert status.state == "corrupt" and manifest_path in status.reason
    os.remove(manifest_path)
    assert store.check_split(SPLIT, "k1").state == "missing"


def test_unreadable_shard_names_file_and_rebuild(store, written):
    shard = split_path(store, "part-00002.arrow")
    Path(shard).write_bytes(b"not an arrow file at all" * 10)
    with pytest.raises(UserError, match="--rebuild") as err:
        list(store.iter_split(SPLIT))
    assert shard in str(err.value)


def test_crash_mid_write_never_looks_complete(store, written):
    data, head, _ = written

    def crashing():
        yield from batches_of(make_data(60, seed=5), [30, 30])
        raise RuntimeError("extractor died")

    with pytest.raises(RuntimeError, match="extractor died"):
        store.write_split(SPLIT, meta=META, batches=crashing(), head=head, rows_per_shard=20)
    status = store.check_split(SPLIT, "k1")
    assert status.state == "missing"
    # The three shards of the failed attempt are removed, no temp file is left, and what is left of the
    # earlier write is unreferenced (no manifest).
    assert sorted(os.listdir(split_path(store))) == [
        "head.safetensors",
        "part-00003.arrow",
        "part-00004.arrow",
    ]

    store.write_split(SPLIT, meta=META, batches=batches_of(data, [103]), head=head, rows_per_shard=60)
    assert store.check_split(SPLIT, "k1").state == "complete"
    assert sorted(os.listdir(split_path(store))) == [
        "head.safetensors",
        "manifest.json",
        "part-00000.arrow",
        "part-00001.arrow",
    ]
    np.testing.assert_array_equal(store.read_split(SPLIT)["features"], data["features"])


def test_non_finite_values_are_rejected(store, written):
    data, head, _ = written
    bad = {k: v.copy() for k, v in data.items()}
    bad["features"][37, 4] = np.nan
    with pytest.raises(UserError) as err:
        store.write_split(SPLIT, meta=META, batches=batches_of(bad, [30, 73]), head=head)
    message = str(err.value)
    assert split_path(store).rstrip("/") in message
    assert "'features'" in message and "row 37" in message and f"index {data['index'][37]}" in message
    assert store.check_split(SPLIT, "k1").state == "missing"

    bad = {k: v.copy() for k, v in data.items()}
    bad["logits"][2, 0] = -np.inf
    with pytest.raises(UserError, match=r"'logits'.*row 2 "):
        store.write_split(SPLIT, meta=META, batches=batches_of(bad, [103]), head=head)


def test_inconsistent_dims_are_rejected(store):
    data, head = make_data(10), make_head()
    narrow = [(data["index"], data["label"], data["logits"][:, :5], data["features"])]
    with pytest.raises(UserError, match=r"'logits' has shape \(10, 5\), expected \(10, 7\)"):
        store.write_split(SPLIT, meta=META, batches=narrow, head=head)
    with pytest.raises(ValueError, match="split"):
        store.write_split(SPLIT, meta={"key": "k"}, batches=[], head=head)
    assert store.check_split(SPLIT, "k1").state == "missing"


def test_rewrite_with_fewer_shards_removes_stray_parts(store, written):
    data, head, _ = written
    manifest = store.write_split(
        SPLIT, meta=META, batches=batches_of(data, [103]), head=head, rows_per_shard=100
    )
    assert [f["path"] for f in manifest["files"]] == ["part-00000.arrow", "part-00001.arrow"]
    assert not os.path.exists(split_path(store, "part-00002.arrow"))
    assert [len(s["index"]) for s in store.iter_split(SPLIT)] == [100, 3]


# ------------------------------------------------------------------------------------ small files, uris
def test_small_files(store):
    store.write_bytes("a/b/c.bin", b"\x00\x00")
    inode = os.stat(os.path.join(store.uri, "a/b/c.bin")).st_ino
    store.write_bytes("a/b/c.bin", b"\x00\x01")
    # A new file renamed over the old one (atomic replace), not the old file truncated and rewritten.
    assert os.stat(os.path.join(store.uri, "a/b/c.bin")).st_ino != inode
    assert os.listdir(os.path.join(store.uri, "a/b")) == ["c.bin"]
    assert store.read_bytes("a/b/c.bin") == b"\x00\x01" and store.exists("a/b/c.bin") and store.exists("a")
    store.write_json("a/x.json", {"n": np.int64(3), "v": np.arange(2)})
    assert store.read_json("a/x.json") == {"n": 3, "v": [0, 1]}
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.array([1, 2], np.int64)}
    store.write_tensors("zoo/m/weights.safetensors", tensors, metadata={"arch": "mlp"})
    back = store.read_tensors("zoo/m/weights.safetensors")
    assert set(back) == {"w", "i"}
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype
        np.testing.assert_array_equal(back[k], tensors[k])
    store.remove("a")
    assert not store.exists("a/b/c.bin") and not store.exists("a")
    store.remove("a")  # removing what is gone is fine

    with pytest.raises(UserError) as err:
        store.read_bytes("zoo/none/info.json")
    assert os.path.join(store.uri, "zoo/none/info.json") in str(err.value)
    store.write_bytes("bad.json", b"{nope")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        store.read_json("bad.json")
    with pytest.raises(ValueError):
        store.read_bytes("../outside")
    with pytest.raises(ValueError):
        store.remove("")


def test_uri_normalisation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Store("rel/dir").uri == str(tmp_path / "rel" / "dir")
    assert Store("~/s").uri == str(tmp_path / "home" / "s")
    assert Store(f"file://{tmp_path}/f/").uri == str(tmp_path / "f")
    assert str(Store("rel")) == str(tmp_path / "rel")
    assert Store("rel").full_path("x/y.json") == str(tmp_path / "rel" / "x" / "y.json")
    s3 = Store(
        "s3://bucket/some/prefix/",
        storage_options={"endpoint_override": "127.0.0.1:1", "region": "us-east-1"},
    )
    assert s3.uri == "s3://bucket/some/prefix" and s3.full_path("a.json") == "s3://bucket/some/prefix/a.json"
    with pytest.raises(UserError, match="hdfs"):
        Store("hdfs://nn/path")
    with pytest.raises(UserError, match="bucket"):
        Store("s3:///prefix")
    with pytest.raises(UserError, match="storage_options"):
        Store("local", storage_options={"region": "x"})
    with pytest.raises(UserError, match="storage_options"):
        Store("s3://bucket/p", storage_options={"endpoint_override": "127.0.0.1:1", "no_such_option": 1})


def test_split_dir():
    assert Store.split_dir("m1", DataRef("digits", "test")) == "shards/digits/test/m1"
    assert (
        Store.split_dir("m1", DataRef("cifar10", "train", {"view": "seed"})) == "shards/cifar10-seed/train/m1"
    )
    with pytest.raises(UserError, match="model key"):
        Store.split_dir("a/b", DataRef("digits", "test"))


def test_pickled_store_works(store, written):
    data, _, _ = written
    copy = pickle.loads(pickle.dumps(store))
    assert copy.uri == store.uri and copy is not store
    np.testing.assert_array_equal(copy.read_split(SPLIT)["logits"], data["logits"])
    assert copy.check_split(SPLIT, "k1").state == "complete"
    copy.write_json("from_copy.json", {"ok": True})
    assert store.read_json("from_copy.json") == {"ok": True}


# ---------------------------------------------------------------------------------------- S3 via moto
BUCKET = "featrec-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with one bucket; the AWS SDK is kept away from any other address."""
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", nowhere)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        with moto_bucket(BUCKET) as (endpoint, client):
            yield endpoint, client


def s3_options(endpoint: str) -> dict[str, str]:
    return {
        "endpoint_override": endpoint,
        "access_key": "testing",
        "secret_key": "testing",
        "region": "us-east-1",
    }


def test_s3_split_round_trip(s3):
    endpoint, client = s3
    store = Store(f"s3://{BUCKET}/runs/a/", storage_options=s3_options(endpoint))
    assert store.uri == f"s3://{BUCKET}/runs/a"
    data, (w, b) = make_data(53), make_head()
    manifest = store.write_split(
        SPLIT, meta=META, batches=batches_of(data, [20, 33]), head=(w, b), rows_per_shard=25
    )
    assert [f["rows"] for f in manifest["files"]] == [25, 25, 3]
    assert store.check_split(SPLIT, "k1").state == "complete"
    assert store.check_split(SPLIT, "other").state == "stale"

    out = store.read_split(SPLIT)
    for name, expected in data.items():
        np.testing.assert_array_equal(out[name], expected)
    assert [len(s["logits"]) for s in store.iter_split(SPLIT, columns=["logits"])] == [25, 25, 3]
    w2, b2 = store.read_head(SPLIT)
    np.testing.assert_array_equal(w2, w)
    np.testing.assert_array_equal(b2, b)

    # The objects are what the manifest says, byte for byte, seen through an independent client.
    for entry in [*manifest["files"], manifest["head"]]:
        body = client.get_object(Bucket=BUCKET, Key=f"runs/a/{SPLIT}/{entry['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    key = f"runs/a/{SPLIT}/part-00001.arrow"
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[100] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    status = store.check_split(SPLIT, "k1")
    assert status.state == "corrupt" and f"s3://{BUCKET}/{key}" in status.reason

    # Rewriting with fewer shards removes the stray object; a pickled copy sees the same data.
    manifest = store.write_split(
        SPLIT, meta=META, batches=batches_of(data, [53]), head=(w, b), rows_per_shard=30
    )
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/a/{SPLIT}/")["Contents"]
    # (pyarrow's delete_file leaves an empty "dir/" marker object behind, hence the filter)
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed if not o["Key"].endswith("/")) == [
        "head.safetensors",
        "manifest.json",
        "part-00000.arrow",
        "part-00001.arrow",
    ]
    copy = pickle.loads(pickle.dumps(store))
    assert copy.check_split(SPLIT, "k1").state == "complete"
    np.testing.assert_array_equal(copy.read_split(SPLIT)["features"], data["features"])

    client.delete_object(Bucket=BUCKET, Key=f"runs/a/{SPLIT}/manifest.json")
    assert store.check_split(SPLIT, "k1").state == "missing"


def test_s3_small_files_and_env_config(s3, monkeypatch):
    endpoint, client = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = Store(f"s3://{BUCKET}/env")
    store.write_json("zoo/mlp/info.json", {"acc": 0.97})
    assert store.read_json("zoo/mlp/info.json") == {"acc": 0.97}
    assert json.loads(client.get_object(Bucket=BUCKET, Key="env/zoo/mlp/info.json")["Body"].read()) == {
        "acc": 0.97
    }
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    store.write_tensors("zoo/mlp/weights.safetensors", tensors)
    np.testing.assert_array_equal(store.read_tensors("zoo/mlp/weights.safetensors")["w"], tensors["w"])
    assert store.exists("zoo/mlp") and store.exists("zoo/mlp/info.json")
    store.remove("zoo")
    assert not store.exists("zoo/mlp/info.json")
    with pytest.raises(UserError, match=f"s3://{BUCKET}/env/zoo/mlp/info.json"):
        store.read_bytes("zoo/mlp/info.json")


# ------------------------------------------------------------------------------------------ robustness (issue 15)
def test_edited_manifest_metadata_is_caught(store, written):
    """label_space edited by hand: the manifest no longer matches its meta_sha256, so the split is corrupt; a
    manifest from before the checksum is stale (recomputed)."""
    manifest_path = Path(split_path(store, "manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    body = {k: v for k, v in manifest.items() if k != "meta_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert manifest["meta_sha256"] == hashlib.sha256(canonical).hexdigest()  # the documented rule, by hand
    manifest_path.write_text(json.dumps({**manifest, "label_space": "imagenet"}))
    status = store.check_split(SPLIT, "k1")
    assert status.state == "corrupt" and str(manifest_path) in status.reason and "meta_sha256" in status.reason
    manifest_path.write_text(json.dumps(body))
    assert store.check_split(SPLIT, "k1").state == "stale"


def test_keyed_results_carry_a_checksum_and_are_recomputed_when_edited(tmp_path):
    """An edited value, a wrong type, a dropped checksum or another key: load_keyed says recompute (None), never
    crashes; the file stays a flat JSON object readable without this package."""
    from featrec_grid.reduce import load_keyed, save_keyed

    path = tmp_path / "pairs" / "p.json"
    row = {"source": "a", "agreement": 0.98, "mse": np.float32(0.25), "alpha": None, "scores": {"0.1": 1.5}}
    save_keyed(path, row, "key1")
    saved = json.loads(path.read_text())
    assert saved["key"] == "key1" and saved["agreement"] == 0.98 and len(saved["sha256"]) == 64
    assert load_keyed(path, "key1") == {**row, "mse": 0.25}
    assert load_keyed(path, "key2") is None
    for edit in ({"agreement": 0.18}, {"agreement": "0.98"}, {"mse": [1, 2]}, {"sha256": "0" * 64}):
        path.write_text(json.dumps({**saved, **edit}))
        assert load_keyed(path, "key1") is None, edit
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "sha256"}))
    assert load_keyed(path, "key1") is None
    path.write_text('["not", "an", "object"]')
    assert load_keyed(path, "key1") is None


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_created_with_the_umask(tmp_path, store, umask):
    """Store files, outputs (reduce) and the report are 0666 minus the umask, as any program's files."""
    from featrec_grid.reduce import save_keyed
    from featrec_grid.report import _write_atomic

    old = os.umask(umask)
    try:
        store.write_bytes(f"u{umask}/a.bin", b"x")
        save_keyed(tmp_path / f"out{umask}" / "p.json", {"v": 1}, "k")
        _write_atomic(tmp_path / f"out{umask}" / "index.html", "<html></html>")
    finally:
        os.umask(old)
    for path in (Path(store.uri) / f"u{umask}" / "a.bin", tmp_path / f"out{umask}" / "p.json",
                 tmp_path / f"out{umask}" / "index.html"):  # fmt: skip
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path


class _FullDisk:
    """An output stream on a disk with `room[0]` bytes left (shared by every file): then it fails as a full one."""

    def __init__(self, out, room):
        self.out, self.room = out, room

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.room[0]:
            raise OSError(28, "No space left on device")
        self.room[0] -= n
        return self.out.write(data)

    def __getattr__(self, name):
        return getattr(self.out, name)


@pytest.mark.parametrize("room", [0, 3000, 9000, 11_000])  # in the first shard, a later one, the head, the manifest
def test_a_full_disk_mid_write_leaves_nothing_a_rerun_would_take_as_complete(store, written, monkeypatch, room):
    """ENOSPC while writing shards, head or manifest: a one-line UserError naming the file, the split reads as
    missing (no manifest), no temporary or partial file is left, and a rerun with room writes it whole."""
    import featrec_grid.store as store_module

    data, head, _ = written
    real, left = store_module._open_output, [room]
    monkeypatch.setattr(store_module, "_open_output", lambda fs, path: _FullDisk(real(fs, path), left))
    with pytest.raises(UserError) as err:
        store.write_split(SPLIT, meta=META, batches=batches_of(data, [103]), head=head, rows_per_shard=25)
    message = str(err.value)
    assert "No space left on device" in message and split_path(store) in message and "\n" not in message
    assert store.check_split(SPLIT, "k1").state == "missing"
    assert not [n for n in os.listdir(split_path(store)) if n.endswith(".tmp")]
    monkeypatch.setattr(store_module, "_open_output", real)
    store.write_split(SPLIT, meta=META, batches=batches_of(data, [103]), head=head, rows_per_shard=25)
    assert store.check_split(SPLIT, "k1").state == "complete"


def test_a_full_disk_keeps_the_earlier_file(tmp_path, monkeypatch):
    import featrec_grid.store as store_module
    from featrec_grid.reduce import load_keyed, save_keyed

    path = tmp_path / "p.json"
    save_keyed(path, {"v": 1}, "k")
    real = store_module._open_output
    monkeypatch.setattr(store_module, "_open_output", lambda fs, p: _FullDisk(real(fs, p), [5]))
    with pytest.raises(UserError, match=f"cannot write {path}: No space left on device"):
        save_keyed(path, {"v": 2}, "k")
    assert load_keyed(path, "k") == {"v": 1} and os.listdir(tmp_path) == ["p.json"]


_HOLD = """
import sys, time
from featrec_grid.store import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_run_lock_refuses_a_second_run_and_frees_on_exit(tmp_path):
    """Another process holds the output's lock: a second run is refused at once naming the folder and the
    holder's pid; once the holder is killed (SIGKILL: no clean-up ran) the lock is free again."""
    import subprocess
    import sys

    from featrec_grid.store import run_lock

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = rf"{out} is in use by another featrec-grid run \(pid {holder.pid}\)"
        with pytest.raises(UserError, match=busy), run_lock(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(out), pytest.raises(UserError, match="in use"), run_lock(out):  # a second holder here too
        pass


def test_check_output_dir(tmp_path):
    from featrec_grid.store import check_output_dir

    check_output_dir(tmp_path / "new" / "out")
    assert os.listdir(tmp_path / "new" / "out") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"output {tmp_path / 'file'} is not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(UserError, match=f"output {tmp_path / 'file' / 'out'} cannot be written"):
        check_output_dir(tmp_path / "file" / "out")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            return  # running as root: permissions do not stop writes, the cases above cover the check
        with pytest.raises(UserError, match="cannot be written"):
            check_output_dir(locked)
    finally:
        locked.chmod(0o700)


def test_gcs_without_credentials_fails_at_once(tmp_path, monkeypatch):
    """No credentials anywhere and not on a GCE VM: refused before any network request, in one line."""
    import time

    import featrec_grid.store as store_module

    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "GCE_METADATA_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(store_module, "_on_gce", lambda: False)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="no Google Cloud credentials found") as err:
        Store("gs://bucket/prefix")
    assert time.perf_counter() - t0 < 1 and "\n" not in str(err.value)


def test_gcs_unreachable_endpoint_fails_within_seconds(tmp_path):
    """An endpoint on a closed loopback port (nothing outside is contacted): the bounded retry ends in seconds."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    store = Store("gs://bucket/prefix", {"anonymous": True, "scheme": "http",
                                        "endpoint_override": f"127.0.0.1:{port}", "retry_time_limit": 2})  # fmt: skip
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="store gs://bucket/prefix is not writable"):
        store.check_writable()
    assert time.perf_counter() - t0 < 30
