"""The GPU path of extraction, exercised on CPU: OOM-halving batch search, bf16 autocast, channels_last, cache keys
that separate precisions, manifests, and the throughput bench through the CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest
import torch
import torchvision
from click.testing import CliRunner

from featrec_grid.cli import main
from featrec_grid.errors import UserError
from featrec_grid.extract import (
    FORMAT_VERSION,
    extract_batch,
    extract_split,
    largest_batch,
    shard_key,
    split_status,
)
from featrec_grid.models import load_classifier
from featrec_grid.refs import DataRef, ModelRef
from featrec_grid.store import Store

TINY = ModelRef("tv18", "torchvision", "resnet18", options={"num_classes": 10, "seed": 0, "img_size": 32})


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _reference() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random-init torchvision resnet18, built directly: (full model, model with fc = Identity)."""
    torch.manual_seed(0)
    full = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    trunk = copy.deepcopy(full)
    trunk.fc = torch.nn.Identity()
    return full, trunk


# --- largest_batch ------------------------------------------------------------------------------------------------


class FakeGPU:
    """try_batch for largest_batch: 'out of memory' for batches above `fits`, recording every attempt."""

    def __init__(self, fits: int):
        self.fits, self.tried, self.emptied = fits, [], 0

    def __call__(self, n: int) -> None:
        self.tried.append(n)
        if n > self.fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory trying batch {n}")

    def empty_cache(self) -> None:
        self.emptied += 1


@pytest.mark.parametrize(("fits", "expected"), [(5000, 1024), (1024, 1024), (1023, 512), (700, 512), (3, 2), (1, 1)])
def test_largest_batch_halves_to_the_largest_power_of_two_that_fits(fits, expected):
    gpu = FakeGPU(fits)
    assert largest_batch(gpu, start=1024, minimum=1, on_oom=gpu.empty_cache) == expected
    powers = [1024 >> i for i in range(11)]
    assert gpu.tried == powers[: powers.index(expected) + 1]  # halving, stopping at the first that fits
    assert gpu.emptied == len(gpu.tried) - 1  # the cache is emptied after every failure, never after success


def test_largest_batch_user_error_when_even_the_minimum_fails():
    gpu = FakeGPU(fits=3)
    with pytest.raises(UserError, match="out of GPU memory even at batch size 8"):
        largest_batch(gpu, start=64, minimum=8)
    assert gpu.tried == [64, 32, 16, 8]
    with pytest.raises(UserError, match="batch size 1"):
        largest_batch(FakeGPU(fits=0), start=16)


def test_largest_batch_lets_other_errors_through():
    def broken(n: int) -> None:
        raise RuntimeError("shape mismatch")  # not an OOM: halving would hide a real bug

    with pytest.raises(RuntimeError, match="shape mismatch"):
        largest_batch(broken, start=8)


# --- precision and memory format ------------------------------------------------------------------------------------


def test_bf16_autocast_features_close_to_fp32_reference_and_stored_as_float32():
    clf = load_classifier(TINY)
    full, trunk = _reference()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_features, ref_logits = trunk(x), full(x)
    feats32, logits32 = extract_batch(clf, x, check=True)
    feats16, logits16 = extract_batch(clf, x, check=True, precision="bf16")  # the fp32 split check must pass
    assert feats16.dtype == logits16.dtype == torch.float32
    assert _rel(feats32, ref_features) < 1e-5 and _rel(logits32, ref_logits) < 1e-5
    assert _rel(feats16, ref_features) < 2e-2 and _rel(logits16, ref_logits) < 2e-2
    assert _rel(feats16, ref_features) > 1e-4  # bf16 really ran: its rounding shows
    # the head is applied in float32 to the float32 features
    torch.testing.assert_close(logits16, feats16 @ clf.head_weight.T + clf.head_bias, rtol=1e-5, atol=1e-5)


def test_channels_last_input_gives_the_contiguous_result():
    clf = load_classifier(TINY)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cl = x.contiguous(memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    f0, l0 = extract_batch(clf, x, check=False)
    f1, l1 = extract_batch(clf, cl, check=False)
    clf.backbone.to(memory_format=torch.channels_last)  # as extract_split does on CUDA
    f2, l2 = extract_batch(clf, cl, check=True)
    for f, logits in ((f1, l1), (f2, l2)):
        torch.testing.assert_close(f, f0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, l0, rtol=1e-5, atol=1e-5)


def test_unknown_precision_is_a_user_error(tmp_path):
    clf = load_classifier(TINY)
    for call in (
        lambda: extract_batch(clf, torch.randn(1, 3, 32, 32), precision="fp16"),
        lambda: shard_key(TINY, DataRef("digits", "test"), "fp16"),
        lambda: extract_split(TINY, DataRef("digits", "test"), Store(tmp_path / "store"), precision="fp16"),
    ):
        with pytest.raises(UserError, match=r"precision 'fp16' is unknown; allowed: fp32, bf16"):
            call()


# --- cache keys and manifests ------------------------------------------------------------------------------------


def test_shard_key_fp32_is_the_old_key_and_bf16_differs():
    # no weights file: a file's sha256 replaces its path in the key (test_models covers that case)
    model = ModelRef("m", "timm", "resnet18", weights=None, options={"img_size": 96, "b": [1, 2]})
    data = DataRef("cifar10", "train", {"limit": 100})
    old_payload = {
        "format": FORMAT_VERSION,
        "model": [model.source, model.architecture, model.weights, model.options],
        "data": [data.dataset, data.split, data.options],
    }
    old = hashlib.sha256(json.dumps(old_payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
    assert shard_key(model, data) == shard_key(model, data, "fp32") == old
    assert shard_key(model, data, "bf16") != old
    assert re.fullmatch(r"[0-9a-f]{20}", shard_key(model, data, "bf16"))


def test_extract_split_records_precision_and_never_reuses_across_precisions(tmp_path):
    store, data = Store(tmp_path / "store"), DataRef("digits", "test", {"limit": 10})
    bf16 = extract_split(TINY, data, store, precision="bf16", batch_size="auto", device="cpu")
    assert not bf16["reused"] and bf16["precision"] == "bf16" and bf16["batch_size"] == 64  # auto on CPU
    assert bf16["key"] == shard_key(TINY, data, "bf16") and bf16["rows"] == 10
    assert split_status(store, TINY, data, "bf16").state == "complete"
    assert split_status(store, TINY, data).state == "stale"  # bf16 shards never pass for fp32 ones
    fp32 = extract_split(TINY, data, store, batch_size=4, device="cpu")
    assert not fp32["reused"] and fp32["precision"] == "fp32" and fp32["batch_size"] == 4
    assert fp32["key"] == shard_key(TINY, data)
    assert extract_split(TINY, data, store, batch_size=4, device="cpu")["reused"]
    with pytest.raises(UserError, match="batch size 0"):
        extract_split(TINY, data, store, batch_size=0, device="cpu")


# --- throughput bench ---------------------------------------------------------------------------------------------


def test_throughput_bench_runs_on_cpu_and_prints_two_rates_and_their_ratio():
    args = ["bench", "extract", "--throughput", "--device", "cpu", "--arch", "resnet18", "--size", "32",
            "--images", "8", "--batch-size", "4", "--repeats", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    bare = re.search(r"bare forward loop\s+([\d.]+) images/s", result.output)
    ours = re.search(r"extraction path\s+([\d.]+) images/s", result.output)
    ratio = re.search(r"ratio extraction/bare\s+([\d.]+)", result.output)
    assert bare and ours and ratio, result.output
    assert float(bare[1]) > 0 and float(ours[1]) > 0
    assert "batch 4" in result.output and "fp32" in result.output and "8 images" in result.output

    as_json = CliRunner().invoke(main, [*args, "--precision", "bf16", "--json"])
    assert as_json.exit_code == 0, as_json.output
    r = json.loads(as_json.output)
    assert r["precision"] == "bf16" and r["batch_size"] == 4 and r["images"] == 8 and r["channels_last"] is False


def test_bench_extract_options_without_throughput_are_refused():
    result = CliRunner().invoke(main, ["bench", "extract", "--precision", "bf16"])
    assert result.exit_code == 2 and "--precision only apply with --throughput" in result.output
    result = CliRunner().invoke(main, ["bench", "extract", "--throughput", "--device", "cpu", "--batch-size", "x"])
    assert result.exit_code == 2 and "--batch-size 'x'" in result.output
