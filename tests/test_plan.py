"""The planner without Ray: the task graph, its keys, what is cached, and every input checked before anything runs."""

import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from featrec_grid import reduce
from featrec_grid.cli import main
from featrec_grid.errors import UserError
from featrec_grid.plan import (
    CACHED,
    TODO,
    Ref,
    check_inputs,
    pair_key,
    plan_grid,
    plan_invert,
    plan_layer_cka,
    spec_shard_key,
)
from featrec_grid.spec import load_spec
from featrec_grid.store import Store

SPEC = """
name: p
store: {tmp}/store
output: {tmp}/out
models:
  a: {{source: zoo, architecture: mlp}}
  b: {{source: zoo, architecture: cnn}}
data:
  train: {{dataset: digits, split: train}}
  test: {{dataset: digits, split: test}}
fit: {{method: [ridge, sgd], alpha: [0, 1]}}
"""


def _spec(tmp_path, extra="", text=SPEC):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text.format(tmp=tmp_path)) + textwrap.dedent(extra))
    return load_spec(path)


def _write_shards(spec, model, data, rows=30, classes=10, dim=8, seed=0):
    """A complete shard set under the key the planner computes, written with the store alone (no model)."""
    rng = np.random.default_rng(seed)
    index = np.arange(rows, dtype=np.int64)
    feats = rng.standard_normal((rows, dim)).astype(np.float32)
    w, b = rng.standard_normal((classes, dim)).astype(np.float32), np.zeros(classes, np.float32)
    store = Store(spec.store)
    meta = {"key": spec_shard_key(spec, spec.models[model], data), "model": model, "dataset": data.dataset,
            "split": data.split}
    store.write_split(store.split_dir(model, data), meta=meta, head=(w, b),
                      batches=[(index, index % classes, feats @ w.T + b, feats)])
    return store


def test_grid_graph_kinds_dependencies_and_refs(tmp_path):
    spec = _spec(tmp_path)
    graph = plan_grid(spec)
    assert graph.counts() == {"train_zoo": {TODO: 2, CACHED: 0}, "extract": {TODO: 4, CACHED: 0},
                              "source_stats": {TODO: 2, CACHED: 0}, "fit": {TODO: 8, CACHED: 0},
                              "head": {TODO: 2, CACHED: 0}, "similarity": {TODO: 2, CACHED: 0},
                              "cka": {TODO: 2, CACHED: 0}}
    names = list(graph.tasks)
    for task in graph.tasks.values():  # dependency order: every dependency planned before its task
        assert all(names.index(d) < names.index(task.name) for d in task.all_deps())
    fit = graph.get("fit a -> b [ridge]")
    assert fit.args[-1] == Ref("source_stats a digits/train") and fit.fn == "featrec_grid.pairs:fit_pair"
    assert set(fit.deps) == {f"extract {m} digits/{s}" for m in "ab" for s in ("train", "test")}
    assert graph.get("extract a digits/train").deps == ("train_zoo a",)
    sgd = graph.get("fit b -> a [sgd]")
    assert sgd.gpus == spec.resources.gpus_per_fit and "source_stats b digits/train" not in sgd.all_deps()
    assert graph.get("fit a -> b [ridge]").key == pair_key(spec, spec.cells()[0], "a", "b", "ridge")
    record = graph.get("cka features (2 models)").record()
    assert record["status"] == TODO and len(record["deps"]) == 2 and record["resources"] == {"cpus": 1.0, "gpus": 0.0}


def test_stored_shards_and_pairs_are_cached_and_keys_follow_settings(tmp_path):
    spec = _spec(tmp_path)
    for m in "ab":
        for d in (spec.train, spec.test):
            _write_shards(spec, m, d)
    graph = plan_grid(spec)
    assert {t.status for t in graph.of_kind("extract")} == {CACHED} and not graph.of_kind("train_zoo")
    cell = spec.cells()[0]
    for s, t, m in (("a", "b", "ridge"), ("a", "b", "sgd")):
        reduce.save_pair(spec.output, {"setting": cell.setting, "mode": cell.mode, "source": s, "target": t,
                                       "method": m, "agreement": 0.5}, pair_key(spec, cell, s, t, m))  # fmt: skip
    graph = plan_grid(spec)
    cached = graph.get("fit a -> b [ridge]")
    assert cached.status == CACHED and cached.value["agreement"] == 0.5 and not cached.all_deps()
    assert graph.get("fit a -> a [ridge]").status == TODO
    assert "source_stats a digits/train" in graph.tasks  # a -> a still needs a's statistics
    changed = plan_grid(_spec(tmp_path, text=SPEC.replace("alpha: [0, 1]", "alpha: [0, 10]")))
    assert changed.get("fit a -> b [ridge]").status == TODO and changed.get("fit a -> b [sgd]").status == CACHED
    assert {t.status for t in plan_grid(spec, rebuild=True).tasks.values()} <= {TODO, CACHED}
    assert all(t.status == TODO for t in plan_grid(spec, rebuild=True).of_kind("fit", "extract"))


def test_corrupt_shards_stop_the_plan_unless_rebuild(tmp_path):
    spec = _spec(tmp_path)
    store = _write_shards(spec, "a", spec.train)
    part = next((tmp_path / "store" / "shards" / "digits" / "train" / "a").glob("part-*.arrow"))
    data = bytearray(part.read_bytes())
    data[-40] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt shard set .* rerun with --rebuild"):
        plan_grid(spec)
    assert plan_grid(spec, rebuild=True).get("extract a digits/train").status == TODO
    del store


def test_layer_cka_and_invert_graphs(tmp_path):
    spec = _spec(tmp_path, "cka: {pairs: [[a, b]], max_images: 64}\n")
    graph = plan_layer_cka(spec)
    assert list(graph.tasks) == ["train_zoo a", "train_zoo b", "layer_cka a b"]
    assert graph.get("layer_cka a b").args[-1]["max_images"] == 64
    inv = plan_invert(spec)
    stages = [t.name for t in inv.of_kind("invert")]
    assert stages[:2] == ["decoder a", "decoder b"] and {"class a pixels", "match b pixels", "pair a b pixels"} <= set(stages)
    assert inv.get("decoder a").deps == ("train_zoo a", "train_zoo b")  # decoders are judged by every model


def test_plan_cli_json_and_statuses(tmp_path):
    spec = _spec(tmp_path)
    for d in (spec.train, spec.test):
        _write_shards(spec, "a", d)
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "p.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    tasks = json.loads(result.output)
    assert {t["name"]: t["status"] for t in tasks if t["kind"] == "extract"} == {
        "extract a digits/train": CACHED, "extract a digits/test": CACHED,
        "extract b digits/train": TODO, "extract b digits/test": TODO}
    assert all(set(t) == {"name", "kind", "status", "deps", "resources", "runner"} for t in tasks)
    text = CliRunner().invoke(main, ["plan", str(tmp_path / "p.yaml")]).output
    assert "  cached  extract a digits/train" in text and "train_zoo a" not in text
    assert "21 tasks, 19 to do" in text  # b: train_zoo, 2 extracts; both: 2 stats, 8 fits, 2 heads, 2 sim., 2 CKA
    inv = CliRunner().invoke(main, ["plan", str(tmp_path / "p.yaml"), "--for", "invert"])
    assert inv.exit_code == 0 and "decoder a" in inv.output and "fit a" not in inv.output


def _plan(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    result = CliRunner().invoke(main, ["plan", str(path)])
    return path, result


@pytest.mark.parametrize(("extra", "message"), [
    ("inversion: {decoder: {epochs: forty}}\n", "inversion.decoder.epochs: 'forty' is not an integer"),
    ("inversion: {optim: {steps: -1}}\n", "inversion.optim.steps: -1 is not an integer in [1, 100000]"),
    ("inversion: {seeds: abc}\n", "inversion.seeds: 'abc' must be a list"),
    ("inversion: {decoderr: {}}\n", "did you mean 'decoder'?"),
    ("cka: {batch_size: 0}\n", "cka.batch_size: 0 is not an integer in [4, 65536]"),
    ("cka: {max_images: abc}\n", "cka.max_images: 'abc' is not an integer"),
    ("cka: {pairs: [[a, c]]}\n", "cka.pairs[0]: 'c' is not one of a, b"),
    ("report: {ci: 2}\n", "report.ci: 2 is not a number in [0.5, 0.999]"),
    ("resources: {batch_size: 1e23}\n", "resources.batch_size: 1e+23 is not an integer"),
    ("fit: {alpha: .inf}\n", "fit.alpha: inf is not a number >= 0 (infinity and NaN mean nothing here)"),
    ("fit: {method: mlp, mlp: {search: {hiden: [8]}}}\n", "fit.mlp.search: unknown field 'hiden'"),
])
def test_typed_blocks_exit_2_from_plan(tmp_path, extra, message):
    base = SPEC.format(tmp=tmp_path)
    if extra.startswith("fit:"):
        base = base.replace("fit: {method: [ridge, sgd], alpha: [0, 1]}\n", "")
    _, result = _plan(tmp_path, base + extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_three_mistakes_are_listed_at_once(tmp_path):
    text = (SPEC.format(tmp=tmp_path).replace("architecture: cnn", "architecture: cnnn")
            + "cka: {batch_size: 0}\nresources: {precision: fp16}\n")
    path, result = _plan(tmp_path, text)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[0] == "error: 3 problems:" and len(lines) == 4
    assert all(line.startswith(str(path)) for line in lines[1:])
    assert "models.b.architecture" in lines[1] and "resources.precision" in lines[2] and "cka.batch_size" in lines[3]


def test_files_a_spec_names_are_checked_before_anything_runs(tmp_path):
    spec = _spec(tmp_path, text=SPEC.replace("b: {{source: zoo, architecture: cnn}}",
                                             "b: {{source: checkpoint, architecture: 'timm:resnet18', "
                                             "weights: {tmp}/nope.safetensors}}"))  # fmt: skip
    with pytest.raises(UserError, match="models.b.weights: .*nope.safetensors' does not exist"):
        check_inputs(spec)
    (tmp_path / "dir.pth").mkdir()
    spec = _spec(tmp_path, text=SPEC.replace("b: {{source: zoo, architecture: cnn}}",
                                             "b: {{source: checkpoint, architecture: 'timm:resnet18', "
                                             "weights: {tmp}/dir.pth}}"))  # fmt: skip
    with pytest.raises(UserError, match="is a directory, not a weight file"):
        check_inputs(spec)
    text = SPEC.replace("test: {{dataset: digits, split: test}}",
                        "test: {{dataset: folder, split: val, options: {{root: {tmp}/missing}}}}")
    for command in ("plan", "run"):
        path, _ = _plan(tmp_path, text.format(tmp=tmp_path))
        result = CliRunner().invoke(main, [command, str(path)])
        assert result.exit_code == 2 and "missing does not exist" in result.output, result.output


@pytest.mark.parametrize(("raw", "message"), [
    ("name: t\nmodels: {a: 1}\n".encode("utf-16"), "holds NUL bytes"),
    ("name: caf\u00e9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    (b"a: " + b"[" * 5000 + b"]" * 5000, "nested"),
    (b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n", "expands to more than"),
    (b"name: t\nmodels:\n  no: {source: zoo, architecture: mlp}\n", "key 'no' must be a name (YAML reads"),
    (b"name: t\nmodels:\n  123: {source: zoo, architecture: mlp}\n", "key '123' must be a name"),
    (b'name: "t\\n"\nmodels: {}\ndata: {}\n', "name: 't\\n' must be a spec name"),
])
def test_malformed_spec_files_exit_2(tmp_path, raw, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(raw)
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_yaml_niceties_are_read_as_meant(tmp_path):
    """1e-3 is a number (YAML 1.1 reads it as a string); merge keys share options; a quoted key is a name."""
    spec = _spec(tmp_path, text=SPEC.replace("fit: {{method: [ridge, sgd], alpha: [0, 1]}}",
                                             "fit: {{alpha: [0, 1e-3]}}").replace(
        "  a: {{source: zoo, architecture: mlp}}", "  a: &m {{source: zoo, architecture: mlp, options: {{epochs: 2}}}}"
    ).replace("  b: {{source: zoo, architecture: cnn}}", "  b: {{<<: *m, architecture: cnn}}"))
    assert spec.fit.alphas == (0.0, 1e-3)
    assert spec.models["b"].architecture == "cnn" and spec.models["b"].options == {"epochs": 2}


def test_schema_covers_every_field_the_checker_accepts():
    from featrec_grid import spec as S
    from featrec_grid.spec_schema import json_schema, markdown_reference, rows

    paths = {r[0] for r in rows()}
    for block, names in (("", S.TOP_FIELDS), ("models.*.", S.MODEL_FIELDS), ("data.*.", S.DATA_FIELDS),
                         ("fit.", S.FIT_FIELDS), ("fit.sgd.", S.SGD_FIELDS), ("fit.mlp.", S.MLP_FIELDS),
                         ("faithful.", S.FAITHFUL_FIELDS), ("seed_results.", S.SEED_RESULT_FIELDS)):
        assert {f"{block}{n}" for n in names} <= paths
    assert all(doc for _, _, _, doc in rows()), [r[0] for r in rows() if not r[3]]
    schema = json_schema()
    assert schema["properties"]["cka"]["properties"]["batch_size"]["minimum"] == 4
    assert schema["properties"]["inversion"]["properties"]["decoder"]["properties"]["epochs"]["type"] == "integer"
    assert "| `resources.gpus_per_fit` | number [0.0, 1.0] | `0.25` |" in markdown_reference()


def test_every_bundled_spec_matches_the_json_schema():
    import glob

    import jsonschema
    import yaml

    from featrec_grid.spec_schema import json_schema

    schema = json_schema()
    for path in sorted(glob.glob("grid_specs/**/*.yaml", recursive=True)):
        with open(path) as fh:
            jsonschema.validate(yaml.safe_load(fh), schema)


def test_readme_spec_reference_is_the_generated_one():
    import re
    from pathlib import Path

    from featrec_grid.spec_schema import markdown_reference

    text = (Path(__file__).parents[1] / "README.md").read_text()
    found = re.search(r"<!-- spec-reference:start -->\n(.*)\n<!-- spec-reference:end -->", text, re.S)
    assert found and found.group(1) == markdown_reference(), "rerun: featrec-grid schema --markdown"


def test_long_splits_become_row_range_tasks(tmp_path):
    spec = _spec(tmp_path, "resources: {rows_per_task: 500, cpus_per_extract: 3}\n")
    graph = plan_grid(spec)
    train = [t for t in graph.of_kind("extract") if t.name.startswith("extract a digits/train rows")]
    assert [t.args[3:5] for t in train] == [(0, 448), (448, 896), (896, 1257)]  # 1,257 rows on 64-row batches
    finish = graph.get("extract a digits/train")
    assert finish.kind == "finish_split" and finish.deps == tuple(t.name for t in train)
    assert {t.cpus for t in train} == {3} and train[0].kwargs["cpus"] == 3 and train[0].deps == ("train_zoo a",)
    assert graph.get("fit a -> b [ridge]").deps[0] == "extract a digits/train"  # fits wait for the whole split


def test_each_shard_key_once_per_planning_pass(tmp_path, monkeypatch):
    """A shard key hashes weights and walks folders: one plan computes each (model, split) key once, not four times
    per pair; a new plan computes them again (a checkpoint rewritten in between must change them)."""
    from featrec_grid import plan

    spec = _spec(tmp_path)
    calls = []
    real = plan.shard_key
    monkeypatch.setattr(plan, "shard_key", lambda *a: calls.append(a) or real(*a))
    plan_grid(spec)
    assert len(calls) == 4  # 2 models x (train, test)
    assert len({(repr(m), repr(d)) for m, d, _ in calls}) == 4
    plan_grid(spec)
    assert len(calls) == 8


FURTHER = [  # malformed inputs of the same kinds as the cases, none of them tried there
    ("name: t\nmodels: {}\n".encode("utf-32"), "holds NUL bytes"),
    (b"name: t\nmodels: {a\xff: 1}\n", "not UTF-8 text"),
    (b"name: t\x00\n", "holds NUL bytes"),
    (b"a: " + b"{b: " * 5000 + b"1" + b"}" * 5000, "nested"),
    (b"a: &a {x: 1, y: 1, z: 1, w: 1, v: 1, u: 1, t: 1, s: 1, r: 1}\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n", "expands to more than"),
    ("report: {resamples: 0}\n", "report.resamples: 0"),
    ("resources: {rows_per_task: 0}\n", "resources.rows_per_task: 0"),
    ("inversion: {optim: {steps: 1.5}}\n", "inversion.optim.steps: 1.5"),
    ("fit: {val_fraction: 1.5}\n", "fit.val_fraction: 1.5"),
    ("fit: {alpha: .nan}\n", "fit.alpha: nan"),
    ("resources: {batch_size: -3}\n", "resources.batch_size: -3"),
    ("models:\n  ../up: {source: zoo, architecture: mlp}\n", "'../up' must be a model key: 1-64 characters"),
    ("models:\n  <b>x</b>: {source: zoo, architecture: mlp}\n", "'<b>x</b>' must be a model key"),
    ("models:\n  a b: {source: zoo, architecture: mlp}\n", "'a b' must be a model key"),
]


@pytest.mark.parametrize("command", ["plan", "run", "cka", "invert"])
@pytest.mark.parametrize(("extra", "message"), FURTHER)
def test_further_malformed_inputs_are_refused_by_every_command(tmp_path, command, extra, message):
    """Refused in the spec check, before Ray or any model: exit 2, one message naming the field, no traceback."""
    if isinstance(extra, bytes):
        path = tmp_path / "bad.yaml"
        path.write_bytes(extra)
    else:
        base = SPEC.format(tmp=tmp_path)
        if extra.startswith("fit:"):
            base = base.replace("fit: {method: [ridge, sgd], alpha: [0, 1]}\n", "")
        if extra.startswith("models:"):
            base = base.replace("models:\n", extra)
        path = tmp_path / "p.yaml"
        path.write_text(base if extra.startswith("models:") else base + extra)
    result = CliRunner().invoke(main, [command, str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) <= 3, result.output


@pytest.mark.parametrize(("args", "message"), [
    (["bench", "scale", "--rows", "-5"], "Invalid value for '--rows': -5 is not in the range x>=1000"),
    (["bench", "extract", "--device", "tpu"], "'tpu' is not a device here; use cpu, cuda or cuda:N"),
    (["bench", "cka", "--device", "tpu"], "'tpu' is not a device here; use cpu, cuda or cuda:N"),
])
def test_bench_options_are_checked_before_anything_runs(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_zoo_option_of_the_wrong_type_is_refused(tmp_path, command):
    path = tmp_path / "p.yaml"
    path.write_text(SPEC.format(tmp=tmp_path).replace("architecture: mlp}", "architecture: mlp, options: {img_size: big}}"))
    result = CliRunner().invoke(main, [command, str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "models.a.options.img_size: 'big'" in result.output, result.output
