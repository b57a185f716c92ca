"""featrec-grid: Click commands. Each parses, calls one function, prints; errors a user can fix exit 2."""

from __future__ import annotations

import json
import sys

import click

from .errors import UserError


class _Group(click.Group):
    """Turns UserError into its lines on stderr and exit code 2, never a traceback; Ctrl-C into exit 130 (finished
    work is saved as each task ends, so a rerun resumes)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished tasks are saved; rerun the same command to resume", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featrec_grid")
def main() -> None:
    """What do a classifier's logits still know? Fit linear maps from every model's logits to every
    model's penultimate features (an N x N grid on Ray) and report agreement, R2, MSE and CKA.

    Start with `featrec-grid run grid_specs/demo.yaml`: it runs offline on the bundled digits and
    ImageNet-pretrained EfficientNet-Lite models and prints the path of the HTML report.
    """


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (default: the spec's `output`).")
@click.option("--address", help="Join this Ray cluster ('auto' or host:port); default: a fresh single-node Ray.")
@click.option("--store", "store_uri", help="Store location overriding the spec's (a path, s3://... or gs://...).")
@click.option("--rebuild", is_flag=True, help="Recompute shards (also corrupt ones) and pairs instead of reusing them.")
@click.option("--download", is_flag=True,
              help="Download missing datasets (CIFAR-10/100, Places365) through torchvision into each data root.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar over tasks.")
def run(
    spec: str, output: str | None, address: str | None, store_uri: str | None, rebuild: bool, download: bool,
    progress: bool,
) -> None:  # fmt: skip
    """Run the grid in SPEC: extract, fit every pair, reduce, write the report.

    Exit codes: 0 done; 1 some tasks failed (finished work kept, rerun resumes); 2 bad input.
    """
    from .grid import run_grid

    grid_spec = _load(spec, store_uri, download)
    outcome = run_grid(grid_spec, address=address, output=output, rebuild=rebuild, progress=progress, echo=click.echo)
    if outcome.user_error:
        raise UserError(outcome.user_error)
    click.echo(f"report: {outcome.report}")
    sys.exit(outcome.exit_code)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--for", "command", type=click.Choice(["run", "cka", "invert"]), default="run", show_default=True,
              help="Which command's graph to show.")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (default: the spec's `output`).")
@click.option("--store", "store_uri", help="Store location overriding the spec's.")
@click.option("--rebuild", is_flag=True, help="Show the graph of a run with --rebuild (everything to do).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task: name, kind, status, deps, resources.")
def plan(spec: str, command: str, output: str | None, store_uri: str | None, rebuild: bool, as_json: bool) -> None:
    """Validate SPEC and print the exact task graph `run` (or `cka`, `invert`) would execute, without running
    anything: every task with its status (todo, or cached: its stored result is current and will be reused)."""
    from .plan import check_inputs, plan_for

    grid_spec = _load(spec, store_uri)
    check_inputs(grid_spec)
    graph = plan_for(grid_spec, command, output, rebuild=rebuild)
    if as_json:
        click.echo(json.dumps(graph.records(), indent=1))
        return
    cells = ", ".join(f"{c.setting}/{c.mode} [{' '.join(c.fit.methods)}]" for c in grid_spec.cells())
    click.echo(f"spec {grid_spec.name}: {len(grid_spec.models)} models, {len(grid_spec.pairs)} pairs; {cells}")
    click.echo(f"store  {grid_spec.store}\noutput {output or grid_spec.output}")
    for t in graph.tasks.values():
        click.echo(f"  {t.status:6}  {t.name}")
    counts = ", ".join(f"{k} {c['todo']}" + (f" (+{c['cached']} cached)" if c["cached"] else "")
                       for k, c in graph.counts().items())  # fmt: skip
    click.echo(f"{len(graph.tasks)} tasks, {len(graph.todo())} to do: {counts}")


@main.command()
@click.option("--markdown", is_flag=True, help="The spec reference as a Markdown table (what the README shows).")
def schema(markdown: bool) -> None:
    """Print the JSON Schema of spec files (for editors: completion and checks), or the Markdown reference."""
    from .spec_schema import json_schema, markdown_reference

    click.echo(markdown_reference() if markdown else json.dumps(json_schema(), indent=1))


def _load(spec: str, store_uri: str | None = None, download: bool = False):
    """The validated spec, with the --store and --download overrides applied."""
    from dataclasses import replace

    from .spec import absolute_location, load_spec

    grid_spec = load_spec(spec)
    if store_uri:
        grid_spec = replace(grid_spec, store=absolute_location(store_uri))
    return grid_spec.with_download() if download else grid_spec


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (default: the spec's `output`).")
@click.option("--address", help="Join this Ray cluster ('auto' or host:port); default: a fresh single-node Ray.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def invert(spec: str, output: str | None, address: str | None, progress: bool) -> None:
    """Invert logits back to images for the models in SPEC (its `inversion:` block tunes it).

    Gradient-based class visualisation, combined and difference objectives and logit matching, then a
    decoder conditioned on logits against the same decoder conditioned on one-hot labels, with controls,
    and every decoder's reconstructions judged by every model. Each stage is a Ray task (on a GPU when the
    cluster has one). Writes inversion.parquet, inversion_cross.parquet, PNG galleries and the report section.

    Exit codes: 0 done; 1 some tasks failed (the others' results are written); 2 bad input.
    """
    from pathlib import Path

    from .grid import run_invert
    from .publish import publish
    from .reduce import save_inversion

    grid_spec = _load(spec)
    out = Path(output or grid_spec.output)
    outcome = run_invert(grid_spec, out, progress, address=address)
    save_inversion(out, outcome)
    click.echo(f"report: {publish(out, grid_spec)}")
    for name, msg in outcome.failures.items():
        click.echo(f"failed: {name}: {msg}")
    click.echo(f"inversion: {len(outcome.failures)} of {outcome.tasks} tasks failed, {outcome.seconds:.1f} s")
    if outcome.user_error:
        raise UserError(outcome.user_error)
    sys.exit(outcome.exit_code)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (default: the spec's `output`).")
@click.option("--address", help="Join this Ray cluster ('auto' or host:port); default: a fresh single-node Ray.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def cka(spec: str, output: str | None, address: str | None, progress: bool) -> None:
    """Layer-wise CKA of model pairs in SPEC (its `cka:` block: pairs, layers, max_images, batch_size), one task per
    pair on the Ray cluster (or a fresh single-node Ray).

    Writes layer_cka.json and adds heatmaps to the report. Model-level CKA of features and logits is part of `run`.
    Exit codes: 0 done; 1 some pairs failed (the others are written); 2 bad input.
    """
    from .grid import run_layer_cka

    outcome = run_layer_cka(_load(spec), address=address, output=output, progress=progress)
    click.echo(f"report: {outcome.report}")
    for name, msg in outcome.failures.items():
        click.echo(f"failed: {name}: {msg}")
    if outcome.user_error:
        raise UserError(outcome.user_error)
    sys.exit(outcome.exit_code)


@main.command()
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False),
              help="The spec the folder was made with (default: OUTPUT/spec.resolved.yaml).")
def report(output: str, spec_path: str | None) -> None:
    """Rebuild OUTPUT/index.html from what the output folder holds, without Ray and without recomputing."""
    from .publish import rebuild_report

    click.echo(f"report: {rebuild_report(output, spec_path)}")


@main.group()
def bench() -> None:
    """Benchmarks: the project against its named baseline in one process, printed as ratios."""


def _emit(result: dict, as_json: bool, formatter) -> None:
    click.echo(json.dumps(result, indent=1, default=str) if as_json else formatter(result))


def _device(value: str | None) -> str | None:
    """A torch device name a benchmark may use: cpu, cuda or cuda:N."""
    import re

    if value is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r} is not a device here; use cpu, cuda or cuda:N")
    return value


@bench.command("fit")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--store", default="store", show_default=True, help="Store holding the demo shards (run the demo first).")
@click.option("--rows", default=50_000, type=click.IntRange(min=16), show_default=True,
              help="Rows of the synthetic CIFAR-100-sized case.")
@click.option("--epochs", default=100, type=click.IntRange(min=1), show_default=True,
              help="Epochs of the seed's SGD recipe.")
def bench_fit(as_json: bool, store: str, rows: int, epochs: int) -> None:
    """Closed-form ridge vs the seed's SGD recipe: per pair (demo shards, synthetic 50k x 1000 -> 512) and per grid."""
    from .bench.fit import format_fit_bench, run_fit_bench

    _emit(run_fit_bench(store=store, rows=rows, epochs=epochs), as_json, format_fit_bench)


@bench.command("extract")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--throughput", is_flag=True,
              help="Images/s of a torchvision model on random images: extraction path vs bare forward (GPU mode).")
@click.option("--pipeline", is_flag=True, help="Input pipeline: JPEG decoding at 0/1/2 workers, tensor transforms of "
              "uint8 arrays, extraction with a near-free backbone; with --arch also a real model (GPU mode).")
@click.option("--arch", help="[--throughput] torchvision architecture, random weights.  [default: resnet50]")
@click.option("--size", type=click.IntRange(min=1), help="[--throughput] image side in pixels.  [default: 224]")
@click.option("--device", callback=lambda ctx, param, v: _device(v),
              help="[--throughput] cuda, cuda:N or cpu.  [default: cuda if available, else cpu]")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]),
              help="[--throughput] fp32, or bf16 autocast.  [default: fp32]")
@click.option("--images", type=click.IntRange(min=1),
              help="[--throughput] images per timed run, rounded up to whole batches.  [default: 8192]")
@click.option("--batch-size", help="[--throughput] a positive integer or 'auto' (largest power of two <= 1024 "
              "that fits on CUDA; 64 on CPU).  [default: auto]")
@click.option("--repeats", type=click.IntRange(min=1),
              help="[--throughput] alternating timed runs per side; the best counts.  [default: 3]")
def bench_extract(
    as_json: bool, throughput: bool, pipeline: bool, arch: str | None, size: int | None, device: str | None,
    precision: str | None, images: int | None, batch_size: str | None, repeats: int | None,
) -> None:
    """Extraction into the store vs a bare forward loop over the same model and data.

    With --throughput: images/s of a torchvision model (random weights, random images) through the
    extraction path (extract_batch, channels_last on CUDA, optional bf16) vs a bare forward loop of the
    same model at the same batch size and precision, and their ratio. For example, on a GPU machine:
    featrec-grid bench extract --throughput --device cuda --precision bf16

    With --pipeline: the input pipeline itself (see bench.extract.run_pipeline_bench), e.g. on a GPU machine:
    featrec-grid bench extract --pipeline --device cuda --arch resnet50 --precision bf16
    """
    from .bench.extract import (
        format_extract_bench,
        format_pipeline_bench,
        format_throughput_bench,
        run_extract_bench,
        run_pipeline_bench,
        run_throughput_bench,
    )

    given = {"arch": arch, "size": size, "device": device, "precision": precision, "images": images,
             "batch_size": batch_size, "repeats": repeats}
    given = {k: v for k, v in given.items() if v is not None}
    if throughput and pipeline:
        raise UserError("--throughput and --pipeline are two benchmarks; choose one")
    if not (throughput or pipeline):
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UserError(f"{names} only apply with --throughput or --pipeline")
        _emit(run_extract_bench(), as_json, format_extract_bench)
        return
    if "batch_size" in given and given["batch_size"] != "auto":
        try:
            given["batch_size"] = int(given["batch_size"])
        except ValueError:
            raise UserError(f"--batch-size {batch_size!r} is not allowed; use a positive integer or 'auto'") from None
    if pipeline:
        if given.get("batch_size") == "auto" or "size" in given:
            raise UserError("--pipeline takes an integer --batch-size and no --size (images are 500x375 -> 224 px)")
        _emit(run_pipeline_bench(**given), as_json, format_pipeline_bench)
        return
    _emit(run_throughput_bench(**given), as_json, format_throughput_bench)


@bench.command("cka")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--device", default="cpu", show_default=True, callback=lambda ctx, param, v: _device(v),
              help="cpu, cuda or cuda:N.")
def bench_cka(as_json: bool, device: str) -> None:
    """Our CKA vs torch-cka, pytorch-cka and ckatorch on ResNet18 vs ResNet34 (light and heavy case): time, bare
    forward time, error against the float64 estimator."""
    from .bench.cka import format_cka_bench, run_cka_bench

    _emit(run_cka_bench(device=device), as_json, format_cka_bench)


@bench.command("scale")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--rows", default=1_000_000, type=click.IntRange(min=1000), show_default=True,
              help="Rows of the big synthetic pair.")
@click.option("--models", default=16, type=click.IntRange(min=1, max=256), show_default=True,
              help="Models of the synthetic grid (N^2 pairs).")
@click.option("--similarity-models", default=8, type=click.IntRange(min=2, max=256), show_default=True,
              help="Models of the similarity-measure part (32 is the grid scale).")
@click.option("--similarity-rows", default=2000, type=click.IntRange(min=4), show_default=True,
              help="Test rows of the similarity-measure part (10000 is the grid scale).")
def bench_scale(as_json: bool, rows: int, models: int, similarity_models: int, similarity_rows: int) -> None:
    """Memory-bounded fit of a 1M x 1000 -> 2048 pair from shards (peak RSS), how a synthetic grid grows with N,
    and the cost of the model-level similarity measures (seconds per model and per pair, peak memory)."""
    from .bench.scale import format_scale_bench, run_scale_bench

    result = run_scale_bench(rows=rows, models=models, similarity_models=similarity_models,
                             similarity_rows=similarity_rows)  # fmt: skip
    _emit(result, as_json, format_scale_bench)


if __name__ == "__main__":
    main()
