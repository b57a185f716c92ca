"""Arrow IPC shards, heads and small files on pyarrow.fs (local, file://, s3://, gs://).

Writes are atomic per file and a split's manifest is written last, so a split is complete exactly when its
manifest exists and every file it lists has the recorded size and sha256. Local reads are memory-mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import safetensors.numpy

from featrec_grid.errors import UserError
from featrec_grid.refs import DataRef

FORMAT = "featrec-grid/shards/1"
MANIFEST = "manifest.json"
HEAD = "head.safetensors"
COLUMNS = ("index", "label", "logits", "features")
SPLIT_STATES = ("missing", "complete", "corrupt", "stale")
DEFAULT_MAX_SHARD_BYTES = 256 << 20
_REQUIRED_META = ("key", "model", "dataset", "split")
META_DIGEST = "meta_sha256"  # manifest field: payload_digest of every other field, so edited metadata is caught
_PART_RE = re.compile(r"part-\d{5,}\.arrow")
_HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class SplitStatus:
    """What check_split found: `state` in SPLIT_STATES, a human `reason`, and the manifest when readable."""

    state: str
    reason: str
    manifest: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        """True when the split can be read as is."""
        return self.state == "complete"


def shard_schema(logits_dim: int, features_dim: int) -> pa.Schema:
    """The shard schema of the contract: index, label int64; logits, features fixed-size float32 lists."""
    return pa.schema(
        [
            ("index", pa.int64()),
            ("label", pa.int64()),
            ("logits", pa.list_(pa.float32(), logits_dim)),
            ("features", pa.list_(pa.float32(), features_dim)),
        ]
    )


class Store:
    """A root directory on a pyarrow filesystem; every method takes paths relative to it (posix style)."""

    def __init__(self, uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        self._scheme, self._root, self._fs_options = _parse_uri(os.fspath(uri), dict(storage_options or {}))
        # Built now so that bad options fail here rather than in a worker; rebuilt lazily after unpickling.
        self._fs: pafs.FileSystem | None = _make_fs(self._scheme, self._root, self._fs_options)

    # ----------------------------------------------------------------------------------------- identity
    @property
    def uri(self) -> str:
        """Normalised absolute location: a plain absolute path for local stores, else scheme://bucket/prefix."""
        return self._root if self._scheme == "local" else f"{self._scheme}://{self._root}"

    @property
    def is_local(self) -> bool:
        """True for local paths (atomic rename and memory-mapped reads apply)."""
        return self._scheme == "local"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __getstate__(self) -> dict[str, Any]:
        # The pyarrow filesystem is not shipped to Ray workers; each process rebuilds its own.
        return {"scheme": self._scheme, "root": self._root, "fs_options": self._fs_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._scheme, self._root, self._fs_options = state["scheme"], state["root"], state["fs_options"]
        self._fs = None

    @property
    def fs(self) -> pafs.FileSystem:
        """The pyarrow filesystem, created on first use in each process."""
        if self._fs is None:
            self._fs = _make_fs(self._scheme, self._root, self._fs_options)
        return self._fs

    def full_path(self, rel: str) -> str:
        """Absolute location of a relative path, for messages and for other tools."""
        rel = _clean_rel(rel, allow_root=True)
        if not rel:
            return self.uri
        return os.path.join(self._root, rel) if self.is_local else f"{self.uri}/{rel}"

    def _path(self, rel: str) -> str:
        return posixpath.join(self._root, _clean_rel(rel, allow_root=True)).rstrip("/") or "/"

    @staticmethod
    def split_dir(model_key: str, data: DataRef) -> str:
        """Relative directory of one model's shards for one dataset split."""
        for what, value in (("model key", model_key), ("dataset key", data.key), ("split", data.split)):
            if not value or "/" in value or "\\" in value or value in (".", ".."):
                raise UserError(
                    f"{what} {value!r} cannot be a path component: use a non-empty name without '/'"
                )
        return f"shards/{data.key}/{data.split}/{model_key}"

    # ------------------------------------------------------------------------------------ small files
    def exists(self, rel: str) -> bool:
        """True if a file or directory exists at rel (on object stores: any object under that prefix)."""
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically (temp file + fsync + rename locally, one PUT on object stores)."""
        with self._atomic_output(rel) as out:
            out.write(data)

    def check_writable(self) -> None:
        """Write and delete a probe file, so an unwritable store fails before any work starts, naming why."""
        rel = f".probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(rel, b"featrec-grid write probe")
            self.fs.delete_file(self._path(rel))
        except (OSError, UserError) as err:
            raise UserError(f"store {self.uri} is not writable: {_one_line(err)}") from None

    def read_bytes(self, rel: str) -> bytes:
        """Read a whole file; a missing file is a UserError naming its full location."""
        try:
            with self.fs.open_input_stream(self._path(rel)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise UserError(f"{self.full_path(rel)}: no such file") from e

    def write_json(self, rel: str, obj: Any) -> None:
        """Write JSON (indented, numpy scalars and arrays converted) atomically."""
        self.write_bytes(rel, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())

    def read_json(self, rel: str) -> Any:
        """Read a JSON file; invalid JSON is a UserError naming the file."""
        try:
            return json.loads(self.read_bytes(rel))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.full_path(rel)} is not valid JSON ({e})") from e

    def write_tensors(
        self, rel: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
    ) -> None:
        """Write named arrays as one safetensors file."""
        arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
        self.write_bytes(rel, safetensors.numpy.save(arrays, metadata=metadata))

    def read_tensors(self, rel: str) -> dict[str, np.ndarray]:
        """Read a safetensors file into numpy arrays."""
        data = self.read_bytes(rel)
        try:
            return safetensors.numpy.load(data)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise UserError(f"{self.full_path(rel)} is not a valid safetensors file ({e})") from e

    def remove(self, rel_dir: str) -> None:
        """Delete a directory tree or a file; nothing happens if it does not exist."""
        path = self._path(_clean_rel(rel_dir))
        kind = self.fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(path)

    # ----------------------------------------------------------------------------------------- splits
    def write_split(
        self,
        rel_dir: str,
        *,
        meta: dict[str, Any],
        batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
        head: tuple[np.ndarray, np.ndarray],
        rows_per_shard: int = 65536,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> dict[str, Any]:
        """Stream (index, label, logits, features) batches into shards, then the head, then the manifest.

        Each shard is one record batch of at most rows_per_shard rows (fewer if the rows would exceed
        max_shard_bytes), so reads are zero-copy. Returns the manifest.
        """
        rel_dir = _clean_rel(rel_dir)
        where = self.full_path(rel_dir)
        weight, bias, (cap, c, d) = _check_write("write_split", meta, head, rows_per_shard, max_shard_bytes, where)

        with contextlib.suppress(FileNotFoundError):  # from here on the split reads as "missing"
            self.fs.delete_file(self._path(f"{rel_dir}/{MANIFEST}"))
        written: list[str] = []
        try:
            files, total = self._stream_shards(rel_dir, batches, (cap, c, d), where, written, lambda n, _row: n)
            head_bytes = safetensors.numpy.save({"weight": weight, "bias": bias})
            written.append(f"{rel_dir}/{HEAD}")
            self.write_bytes(f"{rel_dir}/{HEAD}", head_bytes)
            manifest = {
                **meta,
                "format": FORMAT,
                "rows": total,
                "logits_dim": int(c),
                "features_dim": int(d),
                "files": files,
                "head": {
                    "path": HEAD,
                    "sha256": hashlib.sha256(head_bytes).hexdigest(),
                    "bytes": len(head_bytes),
                },
            }
            manifest[META_DIGEST] = payload_digest(manifest)
            self.write_json(f"{rel_dir}/{MANIFEST}", manifest)
        except BaseException:
            for rel in written:  # best effort: leave no orphans of this attempt behind
                with contextlib.suppress(OSError):
                    self.fs.delete_file(self._path(rel))
            raise
        self._remove_stray_parts(rel_dir, {f["path"] for f in files})
        return manifest

    def read_manifest(self, rel_dir: str) -> dict[str, Any]:
        """The split's manifest; a missing one is a UserError naming it."""
        manifest = self.read_json(f"{_clean_rel(rel_dir)}/{MANIFEST}")
        if not isinstance(manifest, dict):
            raise UserError(
                f"{self.full_path(f'{rel_dir}/{MANIFEST}')} is not a JSON object; rerun with --rebuild"
            )
        return manifest

    def _json_object(self, rel: str) -> tuple[dict[str, Any], None] | tuple[None, SplitStatus]:
        """(the JSON object at rel, None), or (None, the missing/corrupt status naming the file)."""
        where = self.full_path(rel)
        try:
            raw = self.read_bytes(rel)
        except UserError:
            return None, SplitStatus("missing", f"{where} does not exist")
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, SplitStatus("corrupt", f"{where} is not valid JSON ({e})")
        if not isinstance(manifest, dict):
            return None, SplitStatus("corrupt", f"{where} is not a JSON object")
        return manifest, None

    def check_split(self, rel_dir: str, key: str, *, verify_checksums: bool = True) -> SplitStatus:
        """Classify a split as missing, stale (other key or format), corrupt (a file absent/short/changed) or complete.

        verify_checksums=False checks sizes only (no full read of the shards).
        """
        rel_dir = _clean_rel(rel_dir)
        mrel = f"{rel_dir}/{MANIFEST}"
        manifest, problem = self._json_object(mrel)
        if problem is not None:
            return problem
        if manifest.get("format") != FORMAT:
            return SplitStatus(
                "stale",
                f"{self.full_path(mrel)} has format {manifest.get('format')!r}, expected {FORMAT!r}",
                manifest,
            )
        if META_DIGEST not in manifest:
            return SplitStatus(
                "stale", f"{self.full_path(mrel)} has no {META_DIGEST} (written before manifests were checksummed)",
                manifest,
            )
        recorded = manifest[META_DIGEST]
        if recorded != payload_digest({k: v for k, v in manifest.items() if k != META_DIGEST}):
            return SplitStatus(
                "corrupt", f"{self.full_path(mrel)}: its contents do not match its {META_DIGEST} (edited?)", manifest
            )
        if manifest.get("key") != key:
            return SplitStatus(
                "stale", f"{self.full_path(mrel)} has key {manifest.get('key')!r}, expected {key!r}", manifest
            )
        entries = _manifest_entries(manifest)
        if entries is None:
            return SplitStatus(
                "corrupt", f"{self.full_path(mrel)} has malformed 'files'/'head'/'rows'", manifest
            )
        rels = [f"{rel_dir}/{e['path']}" for e in entries]
        infos = self.fs.get_file_info([self._path(r) for r in rels])
        for entry, rel, info in zip(entries, rels, infos, strict=True):
            if info.type != pafs.FileType.File:
                return SplitStatus("corrupt", f"{self.full_path(rel)} is missing", manifest)
            if "bytes" in entry and info.size != entry["bytes"]:
                return SplitStatus(
                    "corrupt",
                    f"{self.full_path(rel)} has {info.size} bytes, manifest says {entry['bytes']}",
                    manifest,
                )
        if verify_checksums:
            for entry, rel in zip(entries, rels, strict=True):
                digest = self._sha256(rel)
                if digest != entry["sha256"]:
                    return SplitStatus(
                        "corrupt",
                        f"{self.full_path(rel)} has sha256 {digest}, manifest says {entry['sha256']}",
                        manifest,
                    )
        return SplitStatus("complete", f"{len(entries) - 1} shard(s), {manifest['rows']} rows", manifest)

    def iter_split(
        self, rel_dir: str, columns: Sequence[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield one dict of arrays per shard: index/label int64 [n], logits/features float32 [n, C] / [n, D].

        Arrays are read-only zero-copy views (of a memory map for local stores); only `columns` are read.
        """
        rel_dir = _clean_rel(rel_dir)
        cols = _check_columns(columns)
        manifest = self.read_manifest(rel_dir)
        dims = {"logits": manifest.get("logits_dim"), "features": manifest.get("features_dim")}
        for entry in manifest.get("files", []):
            yield self._read_shard(f"{rel_dir}/{entry['path']}", cols, dims, entry.get("rows"))

    def read_split(self, rel_dir: str, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """All shards of a split concatenated (no copy when there is a single shard)."""
        cols = _check_columns(columns)
        parts = list(self.iter_split(rel_dir, cols))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            manifest = self.read_manifest(rel_dir)
            empty = {
                "index": np.empty(0, np.int64),
                "label": np.empty(0, np.int64),
                "logits": np.empty((0, int(manifest["logits_dim"])), np.float32),
                "features": np.empty((0, int(manifest["features_dim"])), np.float32),
            }
            return {c: empty[c] for c in cols}
        return {c: np.concatenate([p[c] for p in parts]) for c in cols}

    def read_head(self, rel_dir: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's classifier head (W [C, D], b [C]) as float32."""
        rel = f"{_clean_rel(rel_dir)}/{HEAD}"
        tensors = self.read_tensors(rel)
        if "weight" not in tensors or "bias" not in tensors:
            raise UserError(
                f"{self.full_path(rel)} lacks 'weight' or 'bias' (has {sorted(tensors)}); rerun with --rebuild"
            )
        return tensors["weight"].astype(np.float32, copy=False), tensors["bias"].astype(
            np.float32, copy=False
        )

    # --------------------------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _atomic_output(self, rel: str) -> Iterator[pa.NativeFile]:
        """An output stream whose file appears complete or not at all (see atomic_output)."""
        with atomic_output(self._path(_clean_rel(rel)), self.fs, where=self.full_path(rel)) as out:
            yield out

    def _stream_shards(
        self,
        rel_dir: str,
        batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
        shape: tuple[int, int, int],
        where: str,
        written: list[str],
        number: Callable[[int, int], int],
    ) -> tuple[list[dict[str, Any]], int]:
        """Checked batches into shards of at most `shape`[0] rows ((rows per shard, C, D)); shard i, whose first row
        is the r-th row written, is part-<number(i, r)>. Returns (file entries, rows written); every path written is
        appended to `written` as it is started, so a caller can remove an interrupted attempt's files."""
        cap, c, d = shape
        shard, files, total, flushed = _ShardBuffer(cap, c, d), [], 0, 0
        for n, batch in enumerate(batches):
            index, label, logits, features = _check_batch(batch, n, total, c, d, where)
            taken = 0
            while taken < len(index):
                taken += shard.add(index, label, logits, features, taken)
                if shard.full:
                    files.append(self._write_shard(rel_dir, number(len(files), flushed), shard, written))
                    flushed, shard.rows = flushed + shard.rows, 0  # the file is closed: the buffer is free again
            total += len(index)
        if shard.rows:
            files.append(self._write_shard(rel_dir, number(len(files), flushed), shard, written))
        return files, total

    def _write_shard(
        self, rel_dir: str, number: int, shard: _ShardBuffer, written: list[str]
    ) -> dict[str, Any]:
        name = f"part-{number:05d}.arrow"
        rel = f"{rel_dir}/{name}"
        written.append(rel)
        batch = shard.record_batch()
        with self._atomic_output(rel) as out:
            sink = _HashingSink(out)
            with pa.PythonFile(sink, mode="w") as pyfile, pa.ipc.new_file(pyfile, batch.schema) as writer:
                writer.write_batch(batch)
        return {"path": name, "sha256": sink.hexdigest(), "rows": batch.num_rows, "bytes": sink.nbytes}

    def _remove_stray_parts(self, rel_dir: str, keep: set[str]) -> None:
        """Best effort: delete shards of an earlier, bigger write and temp files of crashed writes."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel_dir)))
        except OSError:
            return
        for info in infos:
            name = info.base_name
            stray = _PART_RE.fullmatch(name) and name not in keep
            if info.type == pafs.FileType.File and (
                stray or (name.startswith(".") and name.endswith(".tmp"))
            ):
                with contextlib.suppress(OSError):
                    self.fs.delete_file(info.path)

    def _sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self._path(rel)) as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _read_shard(
        self, rel: str, cols: tuple[str, ...], dims: dict[str, Any], rows: int | None
    ) -> dict[str, np.ndarray]:
        path, where = self._path(rel), self.full_path(rel)
        hint = "the split is damaged or was not written by featrec-grid; rerun with --rebuild"
        try:
            if self.is_local:  # zero-copy from the memory map; included_fields would copy the whole shard
                with pa.memory_map(path) as source:
                    table = pa.ipc.open_file(source).read_all().select(sorted(cols, key=COLUMNS.index))
            else:
                fields = [COLUMNS.index(c) for c in sorted(cols, key=COLUMNS.index)]
                with self.fs.open_input_file(path) as source:
                    options = pa.ipc.IpcReadOptions(included_fields=fields)
                    table = pa.ipc.open_file(source, options=options).read_all()
        except FileNotFoundError as e:
            raise UserError(f"shard {where} is missing; {hint}") from e
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"cannot read shard {where} ({e}); {hint}") from e
        if sorted(table.column_names) != sorted(cols):
            raise UserError(f"shard {where} has columns {table.column_names}, expected {list(cols)}; {hint}")
        if rows is not None and table.num_rows != rows:
            raise UserError(f"shard {where} has {table.num_rows} rows, manifest says {rows}; {hint}")
        try:
            return {c: _column_to_numpy(table.column(c), dims.get(c)) for c in cols}
        except (pa.ArrowException, ValueError) as e:
            raise UserError(f"shard {where}: {e}; {hint}") from e

    # ------------------------------------------------------------------ row ranges: one split written by many tasks
    # Each task writes rows [start, stop) of the split as shards named part-<position of their first row>.arrow
    # (unique across ranges), the shared head and a range manifest range-<start>-<stop>.json; finish_ranges then
    # writes the split's manifest.json listing every range's shards in row order, so readers see one plain split.

    _RANGE_MANIFEST_RE = re.compile(r"range-\d{12}-\d{12}\.json")

    @staticmethod
    def range_manifest_name(start: int, stop: int) -> str:
        """File name of the manifest of rows [start, stop) of a split written in ranges."""
        return f"range-{start:012d}-{stop:012d}.json"

    def write_range(
        self,
        rel_dir: str,
        start: int,
        stop: int,
        *,
        meta: dict[str, Any],
        batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
        head: tuple[np.ndarray, np.ndarray],
        rows_per_shard: int = 65536,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> dict[str, Any]:
        """Stream rows [start, stop) of a split into their own shards, the head (rewritten only when it differs)
        and last the range manifest, which is returned. The split's manifest.json is deleted first: the split
        reads as missing until finish_ranges lists every range."""
        rel_dir = _clean_rel(rel_dir)
        if not 0 <= start <= stop:
            raise ValueError(f"a row range needs 0 <= start <= stop, got [{start}, {stop})")
        where = f"{self.full_path(rel_dir)} rows [{start}, {stop})"
        weight, bias, (cap, c, d) = _check_write("write_range", meta, head, rows_per_shard, max_shard_bytes, where)
        mrel = f"{rel_dir}/{self.range_manifest_name(start, stop)}"
        for rel in (f"{rel_dir}/{MANIFEST}", mrel):
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self._path(rel))
        written: list[str] = []
        try:
            # shards named by the position of their first row: unique across the ranges of one split
            files, total = self._stream_shards(rel_dir, batches, (cap, c, d), where, written,
                                               lambda _n, row: start + row)  # fmt: skip
            if total != stop - start:
                raise ValueError(f"{where}: the batches held {total} rows, the range has {stop - start}")
            head_bytes = safetensors.numpy.save({"weight": weight, "bias": bias})
            head_entry = {"path": HEAD, "sha256": hashlib.sha256(head_bytes).hexdigest(), "bytes": len(head_bytes)}
            head_rel = f"{rel_dir}/{HEAD}"
            # Ranges share one head: rewrite it only when it differs, so a range never breaks another's head.
            if not (self.exists(head_rel) and self._sha256(head_rel) == head_entry["sha256"]):
                self.write_bytes(head_rel, head_bytes)
            manifest = {
                **meta,
                "format": FORMAT,
                "range": [start, stop],
                "rows": total,
                "logits_dim": int(c),
                "features_dim": int(d),
                "files": files,
                "head": head_entry,
            }
            self.write_json(mrel, manifest)
        except BaseException:
            for rel in written:  # this attempt's shards only: their names lie inside this range
                with contextlib.suppress(OSError):
                    self.fs.delete_file(self._path(rel))
            raise
        return manifest

    def check_range(self, rel_dir: str, key: str, start: int, stop: int, *, verify_checksums: bool = True) -> SplitStatus:
        """check_split for rows [start, stop) written by write_range: missing, stale, corrupt or complete."""
        rel_dir = _clean_rel(rel_dir)
        mrel = f"{rel_dir}/{self.range_manifest_name(start, stop)}"
        where = self.full_path(mrel)
        manifest, problem = self._json_object(mrel)
        if problem is not None:
            return problem
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            found = (manifest.get("format"), manifest.get("key"))
            return SplitStatus("stale", f"{where} has (format, key) {found}, expected {(FORMAT, key)}", manifest)
        entries = _manifest_entries(manifest)
        if entries is None or manifest.get("range") != [start, stop] or manifest["rows"] != stop - start:
            return SplitStatus("corrupt", f"{where} has malformed 'files'/'head'/'rows'/'range'", manifest)
        problem = self._entries_problem(rel_dir, entries, verify_checksums)
        if problem:
            return SplitStatus("corrupt", problem, manifest)
        return SplitStatus("complete", f"{len(entries) - 1} shard(s), {manifest['rows']} rows", manifest)

    def finish_ranges(
        self, rel_dir: str, key: str, ranges: Sequence[tuple[int, int]], *, verify_checksums: bool = False
    ) -> dict[str, Any]:
        """Write the split's manifest from its complete ranges (consecutive from row 0), listing their shards in row
        order; then delete shards and range manifests no range lists. A range that is not complete is a UserError."""
        rel_dir = _clean_rel(rel_dir)
        where = self.full_path(rel_dir)
        bounds = [(int(a), int(b)) for a, b in ranges]
        if not bounds or bounds[0][0] != 0 or any(b[0] != a[1] for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"{where}: ranges must be consecutive from row 0, got {bounds}")
        parts = []
        for start, stop in bounds:
            status = self.check_range(rel_dir, key, start, stop, verify_checksums=verify_checksums)
            if not status.complete:
                raise UserError(
                    f"{where}: rows [{start}, {stop}) are {status.state} ({status.reason}); rerun the extraction "
                    "to compute them"
                )
            parts.append(status.manifest)
        first = parts[0]
        shape = ("logits_dim", "features_dim", "head")
        for (start, stop), part in zip(bounds, parts, strict=True):
            if any(part[k] != first[k] for k in shape):
                raise UserError(
                    f"{where}: rows [{start}, {stop}) have another head or dims than rows {bounds[0]}; rerun with --rebuild"
                )
        manifest = {k: v for k, v in first.items() if k not in ("range", "files", "rows", META_DIGEST)}
        manifest.update(
            rows=sum(p["rows"] for p in parts),
            files=[f for p in parts for f in p["files"]],
            ranges=[list(b) for b in bounds],
        )
        manifest[META_DIGEST] = payload_digest(manifest)  # checksummed like a split written in one task
        self.write_json(f"{rel_dir}/{MANIFEST}", manifest)
        self._remove_stray_parts(rel_dir, {f["path"] for f in manifest["files"]})
        listed = {self.range_manifest_name(a, b) for a, b in bounds}
        with contextlib.suppress(OSError):
            for info in self.fs.get_file_info(pafs.FileSelector(self._path(rel_dir))):
                if self._RANGE_MANIFEST_RE.fullmatch(info.base_name) and info.base_name not in listed:
                    self.fs.delete_file(info.path)
        return manifest

    def _entries_problem(self, rel_dir: str, entries: list[dict[str, Any]], verify_checksums: bool) -> str | None:
        """Why the files of manifest entries are not as recorded (absent, other size, other sha256), or None."""
        rels = [f"{rel_dir}/{e['path']}" for e in entries]
        infos = self.fs.get_file_info([self._path(r) for r in rels])
        for entry, rel, info in zip(entries, rels, infos, strict=True):
            if info.type != pafs.FileType.File:
                return f"{self.full_path(rel)} is missing"
            if "bytes" in entry and info.size != entry["bytes"]:
                return f"{self.full_path(rel)} has {info.size} bytes, manifest says {entry['bytes']}"
        if verify_checksums:
            for entry, rel in zip(entries, rels, strict=True):
                digest = self._sha256(rel)
                if digest != entry["sha256"]:
                    return f"{self.full_path(rel)} has sha256 {digest}, manifest says {entry['sha256']}"
        return None


# ------------------------------------------------------------------------------------------- helpers
class _ShardBuffer:
    """Rows of one shard gathered into preallocated arrays, so a shard is written as one record batch."""

    def __init__(self, cap: int, c: int, d: int) -> None:
        self.cap, self.rows = cap, 0
        self.index = np.empty(cap, np.int64)
        self.label = np.empty(cap, np.int64)
        self.logits = np.empty((cap, c), np.float32)  # pages are touched only as rows arrive
        self.features = np.empty((cap, d), np.float32)

    @property
    def full(self) -> bool:
        return self.rows == self.cap

    def add(
        self, index: np.ndarray, label: np.ndarray, logits: np.ndarray, features: np.ndarray, start: int
    ) -> int:
        """Copy rows from `start` of the batch until the shard is full; return how many were taken."""
        take = min(self.cap - self.rows, len(index) - start)
        dst, src = slice(self.rows, self.rows + take), slice(start, start + take)
        self.index[dst], self.label[dst] = index[src], label[src]
        self.logits[dst], self.features[dst] = logits[src], features[src]
        self.rows += take
        return take

    def record_batch(self) -> pa.RecordBatch:
        """A zero-copy record batch over the filled rows."""
        n, c, d = self.rows, self.logits.shape[1], self.features.shape[1]
        return pa.record_batch(
            [
                pa.array(self.index[:n]),
                pa.array(self.label[:n]),
                pa.FixedSizeListArray.from_arrays(pa.array(self.logits[:n].reshape(-1)), c),
                pa.FixedSizeListArray.from_arrays(pa.array(self.features[:n].reshape(-1)), d),
            ],
            schema=shard_schema(c, d),
        )


class _HashingSink:
    """A write-only file object that hashes and counts what passes through to a pyarrow stream."""

    def __init__(self, out: pa.NativeFile) -> None:
        self._out, self._digest, self.nbytes, self.closed = out, hashlib.sha256(), 0, False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self._out.write(view)
        self.nbytes += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self.closed = True  # the underlying stream is closed (committed) by _atomic_output

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _check_write(
    caller: str, meta: dict[str, Any], head: Any, rows_per_shard: int, max_shard_bytes: int, where: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """What write_split and write_range check before the expensive part: the metadata (required keys, JSON-able),
    the shard bounds and the head; returns (weight, bias, (rows per shard, C, D))."""
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{caller} meta lacks {missing}; it needs {list(_REQUIRED_META)}")
    json.dumps(meta, default=_json_default)  # fail before the expensive part, not after it
    if rows_per_shard < 1 or max_shard_bytes < 1:
        raise ValueError(f"rows_per_shard and max_shard_bytes must be >= 1, got {rows_per_shard}, {max_shard_bytes}")
    weight, bias = _check_head(head, where)
    c, d = weight.shape
    return weight, bias, (max(1, min(rows_per_shard, max_shard_bytes // (16 + 4 * (c + d)))), c, d)


def _check_head(head: tuple[np.ndarray, np.ndarray], where: str) -> tuple[np.ndarray, np.ndarray]:
    weight, bias = (np.ascontiguousarray(a, dtype=np.float32) for a in head)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise UserError(
            f"{where}: head weight must be [C, D] and bias [C], got {weight.shape} and {bias.shape}"
        )
    for name, array in (("head weight", weight), ("head bias", bias)):
        if not np.isfinite(array).all():
            raise UserError(f"{where}: {name} has non-finite values; a head must be finite")
    return weight, bias


def _check_batch(
    batch: Any, number: int, offset: int, c: int, d: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate one (index, label, logits, features) batch against the head's C and D; reject NaN and inf."""
    if len(batch) != 4:
        raise UserError(
            f"{where}: batch {number} must be (index, label, logits, features), got {len(batch)} items"
        )
    index, label = (np.asarray(a) for a in batch[:2])
    logits, features = (np.ascontiguousarray(a, dtype=np.float32) for a in batch[2:])
    n = len(index)
    for name, array in (("index", index), ("label", label)):
        if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
            raise UserError(
                f"{where}: batch {number} column {name!r} must be integers of shape ({n},), got "
                f"{array.dtype} {array.shape}"
            )
    for name, array, width in (("logits", logits, c), ("features", features, d)):
        if array.shape != (n, width):
            raise UserError(
                f"{where}: batch {number} column {name!r} has shape {array.shape}, expected ({n}, {width}) "
                f"(the head weight is [{c}, {d}])"
            )
        finite = np.isfinite(array)
        if not finite.all():
            row = int(np.argmin(finite.all(axis=1)))
            raise UserError(
                f"{where}: column {name!r} has a non-finite value at row {offset + row} "
                f"(index {int(index[row])}); shards must be finite"
            )
    return index.astype(np.int64, copy=False), label.astype(np.int64, copy=False), logits, features


def _manifest_entries(manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The manifest's file entries plus the head's, or None when they are malformed."""
    files, head = manifest.get("files"), manifest.get("head")
    if not isinstance(files, list) or not isinstance(head, dict) or not isinstance(manifest.get("rows"), int):
        return None
    entries = [*files, head]
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)):
            return None
        if "/" in e["path"] or e["path"] in ("", ".", ".."):
            return None
    if sum(f.get("rows", -1) for f in files) != manifest["rows"]:
        return None
    return entries


def _column_to_numpy(column: pa.ChunkedArray, width: int | None) -> np.ndarray:
    """Zero-copy numpy view of one shard column (a copy only for multi-chunk files written elsewhere)."""
    array = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    if array.null_count:
        raise ValueError(f"column has {array.null_count} nulls")
    if pa.types.is_fixed_size_list(array.type):
        size = array.type.list_size
        if array.type.value_type != pa.float32() or (width is not None and size != width):
            raise ValueError(f"column type {array.type} does not match fixed_size_list<float32>[{width}]")
        return array.flatten().to_numpy(zero_copy_only=True).reshape(len(array), size)
    if array.type != pa.int64():
        raise ValueError(f"column type {array.type} is not int64")
    return array.to_numpy(zero_copy_only=True)


def _check_columns(columns: Sequence[str] | None) -> tuple[str, ...]:
    if columns is None:
        return COLUMNS
    cols = (columns,) if isinstance(columns, str) else tuple(columns)
    unknown = [c for c in cols if c not in COLUMNS]
    if unknown or not cols or len(set(cols)) != len(cols):
        raise ValueError(f"columns {list(cols)} must be distinct names from {list(COLUMNS)}")
    return cols


def _clean_rel(rel: str, allow_root: bool = False) -> str:
    """A normalised relative posix path; absolute paths and '..' are refused."""
    rel = str(rel).replace("\\", "/")
    norm = posixpath.normpath(rel) if rel else "."
    if rel.startswith("/") or norm == ".." or norm.startswith("../"):
        raise ValueError(f"store paths are relative and stay inside the store, got {rel!r}")
    if norm == ".":
        if not allow_root:
            raise ValueError("this operation needs a path inside the store, got the store root")
        return ""
    return norm


def _parse_uri(uri: str, options: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(scheme in {local, s3, gs}, filesystem root path, resolved filesystem options)."""
    if "://" not in uri:
        scheme, location = "local", uri
    else:
        parsed = urlparse(uri)
        scheme = {"file": "local", "s3": "s3", "gs": "gs", "gcs": "gs"}.get(parsed.scheme.lower())
        if scheme is None:
            raise UserError(
                f"store {uri!r}: scheme {parsed.scheme!r} is not supported; use a path, file://, s3:// or gs://"
            )
        if parsed.query or parsed.fragment:
            raise UserError(
                f"store {uri!r}: no query or fragment allowed; pass options via storage_options or env"
            )
        if scheme == "local":
            if parsed.netloc not in ("", "localhost"):
                raise UserError(f"store {uri!r}: file:// URIs name a local path (file:///abs/path)")
            location = unquote(parsed.path)
        else:
            if not parsed.netloc:
                raise UserError(f"store {uri!r}: the bucket name is missing ({scheme}://bucket/prefix)")
            location = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    if scheme == "local":
        if not location:
            raise UserError("store path is empty")
        if options:
            raise UserError(f"store {uri!r}: storage_options {sorted(options)} apply to s3:// and gs:// only")
        return scheme, os.path.abspath(os.path.expanduser(location)), {}
    if scheme == "s3":
        options = _s3_options(options, bucket=location.split("/")[0])
    if scheme == "gs":
        options = _gcs_options(options, uri)
    return scheme, location, options


def _s3_options(options: dict[str, Any], bucket: str) -> dict[str, Any]:
    """S3FileSystem keywords: endpoint and region from the environment, overridden by storage_options.

    Credentials are passed only when given (in options or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY);
    otherwise the AWS SDK's own chain finds them in each process.
    """
    env = os.environ
    resolved: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        resolved["endpoint_override"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        resolved["region"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY") and "access_key" not in options:
        resolved["access_key"], resolved["secret_key"] = (
            env["AWS_ACCESS_KEY_ID"],
            env["AWS_SECRET_ACCESS_KEY"],
        )
        if env.get("AWS_SESSION_TOKEN"):
            resolved["session_token"] = env["AWS_SESSION_TOKEN"]
    resolved.update(options)
    endpoint = resolved.get("endpoint_override")
    if endpoint and "://" in endpoint:
        url_scheme, _, host = endpoint.partition("://")
        resolved.setdefault("scheme", url_scheme)
        resolved["endpoint_override"] = host.rstrip("/")
    if "region" not in resolved:
        # A custom endpoint (MinIO, moto, ...) has no region to look up; on AWS ask for the bucket's region.
        with contextlib.suppress(OSError):
            resolved["region"] = "us-east-1" if endpoint else pafs.resolve_s3_region(bucket)
    # Small files go out as one PutObject instead of a multipart upload (fewer round trips).
    resolved.setdefault("allow_delayed_open", True)
    return resolved


GCS_RETRY_SECONDS = 15  # how long the GCS client retries a failing request before giving up (its default: 15 min)
_GCS_CREDENTIAL_OPTIONS = ("anonymous", "access_token", "target_service_account")


def _on_gce() -> bool:
    """True on a Google Compute Engine VM (its metadata server then provides credentials); read from the DMI
    product name, as google-auth does, without any network request."""
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().strip().startswith("Google")
    except OSError:
        return False


def _gcs_options(options: dict[str, Any], uri: str) -> dict[str, Any]:
    """GcsFileSystem keywords with a bounded retry time; credentials are looked for before any network request.

    Without credentials the GCS client would ask the GCE metadata server and retry for minutes, so a store whose
    credentials cannot be found anywhere (storage_options, GOOGLE_APPLICATION_CREDENTIALS, gcloud's application
    default credentials, a GCE VM) is refused at once.
    """
    import datetime

    resolved = dict(options)
    limit = resolved.get("retry_time_limit", GCS_RETRY_SECONDS)
    if isinstance(limit, int | float) and not isinstance(limit, bool):
        resolved["retry_time_limit"] = datetime.timedelta(seconds=float(limit))
    if any(resolved.get(k) for k in _GCS_CREDENTIAL_OPTIONS):
        return resolved
    env = os.environ
    config = env.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    found = (
        env.get("GOOGLE_APPLICATION_CREDENTIALS")
        or os.path.isfile(os.path.join(config, "application_default_credentials.json"))
        or env.get("GCE_METADATA_HOST")
        or _on_gce()
    )
    if not found:
        raise UserError(
            f"store {uri!r}: no Google Cloud credentials found; set GOOGLE_APPLICATION_CREDENTIALS to a key file, "
            "run `gcloud auth application-default login`, or pass storage_options {anonymous: true} for a public bucket"
        )
    return resolved


def _make_fs(scheme: str, root: str, options: dict[str, Any]) -> pafs.FileSystem:
    if scheme == "local":
        return pafs.LocalFileSystem()
    if scheme == "gs":
        try:
            return pafs.GcsFileSystem(**options)
        except TypeError as e:
            raise UserError(f"gs://{root}: bad storage_options ({e})") from e
    try:
        return pafs.S3FileSystem(**options)
    except TypeError as e:
        raise UserError(f"s3://{root}: bad storage_options ({e})") from e


def _fsync(path: str) -> None:
    """Flush a local file or directory to disk (best effort on platforms that refuse directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# ------------------------------------------------------------------------------ the package's one writer
def _local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _open_output(fs: pafs.FileSystem, path: str) -> pa.NativeFile:
    """The raw output stream of one file (new files get 0666 minus the umask, as any program's would)."""
    return fs.open_output_stream(path)


def _one_line(err: BaseException) -> str:
    """An OSError's reason on one line (strerror when set), any other error's first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], fs: pafs.FileSystem | None = None, *, where: str | None = None
) -> Iterator[pa.NativeFile]:
    """A stream whose file appears complete or not at all; the one atomic writer of the package.

    Local paths: a temporary file beside `path` (mode 0666 minus the umask), fsync, rename(2), fsync of the
    folder. Object stores: one object, invisible until its upload completes, deleted again on error. An OSError
    (a full disk, no permission, ...) leaves nothing at `path` and becomes a one-line UserError naming
    `where` (default: the path); earlier content of `path` stays as it was.
    """
    fs = fs or pafs.LocalFileSystem()
    path = os.fspath(path)
    where = where or path
    try:
        if not _local(fs):
            # pyarrow commits on close and has no abort, so on error delete whatever the close may have committed.
            out = _open_output(fs, path)
            try:
                yield out
                out.close()
            except BaseException:
                with contextlib.suppress(OSError):
                    out.close()
                with contextlib.suppress(OSError):
                    fs.delete_file(path)
                raise
            return
        path = os.path.abspath(path)
        parent, name = os.path.split(path)
        fs.create_dir(parent, recursive=True)
        tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
        out = _open_output(fs, tmp)
        try:
            yield out
            out.close()
            _fsync(tmp)
            fs.move(tmp, path)  # rename(2): replaces atomically
            _fsync(parent)
        except BaseException:
            with contextlib.suppress(OSError):
                out.close()
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            raise
    except OSError as err:
        raise UserError(f"cannot write {where}: {_one_line(err)}; nothing was written there") from None


def write_atomic(path: str | os.PathLike[str], data: bytes, fs: pafs.FileSystem | None = None) -> None:
    """Write a whole file atomically (atomic_output); the outputs folder, report and store all write this way."""
    with atomic_output(path, fs) as out:
        out.write(data)


def check_output_dir(path: str | os.PathLike[str]) -> None:
    """Create an output folder and write and delete a probe file in it, so that an output that cannot be written
    fails before any work starts (UserError naming the folder and why)."""
    folder = os.path.abspath(os.path.expanduser(os.fspath(path)))
    probe = os.path.join(folder, f".probe-{uuid.uuid4().hex}")
    try:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"output {folder} is not a folder (a file is in the way)")
        write_atomic(probe, b"featrec-grid write probe")
        os.remove(probe)
    except (OSError, UserError) as err:
        if isinstance(err, UserError) and str(err).startswith("output "):
            raise
        raise UserError(f"output {folder} cannot be written: {_one_line(err)}") from None


LOCK_FILE = ".featrec-grid.lock"


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on a local folder (an output, or a local store) for as long as the block runs.

    A second run on the same folder is refused at once with a UserError naming the folder and the holder's pid.
    flock(2) is released by the kernel when the holder exits, even on SIGKILL, so a crash leaves no stale lock.
    """
    import fcntl

    folder = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"cannot lock {folder}: {_one_line(err)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"{folder} is in use by another featrec-grid run (pid {holder}); wait for it to finish, "
                "or give this run another output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def payload_digest(obj: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces), as it reads back after a JSON round trip;
    stored beside cached results so that an edited or mistyped value is found and recomputed."""
    canonical = json.loads(json.dumps(obj, default=_json_default))
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_FILE_DIGESTS: dict[tuple, str] = {}
_RACY_SECONDS = 2.0  # a file modified this recently is hashed again on every call (its mtime may not move)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a local file's content, hashed once per process while its (size, mtime, inode) stay the same.

    A file changed less than _RACY_SECONDS before it was hashed is not remembered: timestamps move in clock
    ticks, so an in-place rewrite within one tick could otherwise keep an old digest (git's "racy" rule).
    """
    import time

    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)
    stamp = (real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if stamp in _FILE_DIGESTS:
        return _FILE_DIGESTS[stamp]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if time.time() - st.st_mtime_ns / 1e9 > _RACY_SECONDS:
        _FILE_DIGESTS[stamp] = value
    return value


def load_split(
    store: Store | str, model: str, dataset: str, split: str, columns: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """A notebook's way in: the arrays of one model on one dataset split, e.g. load_split("store", "lite0", "digits", "test")."""
    store = store if isinstance(store, Store) else Store(store)
    return store.read_split(store.split_dir(model, DataRef(dataset, split)), columns=columns)
