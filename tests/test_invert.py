"""Tests of featrec_grid.invert: optimisation-based inversion, decoder, metrics, manipulations, gallery.
Classifiers are small modules trained here for a few seconds on scikit-learn's bundled digits (no downloads)."""

from __future__ import annotations

import base64
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.datasets import load_digits
from torch import nn

from featrec_grid.errors import UserError
from featrec_grid.invert import (
    DecoderConfig,
    InversionConfig,
    OptimSettings,
    build_decoder,
    class_objective,
    class_prob,
    difference_objective,
    fit_decoder,
    gallery_html,
    invert_many,
    logit_distance,
    match_objective,
    psnr,
    retrieval_top1,
    run_inversion,
    save_grid,
    ssim,
    target_logits,
    untrained_copy,
)
from featrec_grid.invert.experiments import decoder_inversion
from featrec_grid.invert.gallery import COLUMNS, CROSS_COLUMNS
from featrec_grid.invert.manipulate import manipulated_logits
from featrec_grid.invert.optimise import gaussian_blur
from featrec_grid.invert.pixels import device_of, embed, on_device
from featrec_grid.invert.run import plan_stages, stage_models, stage_name
from featrec_grid.models import Classifier, InputConfig

SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread avoids oversubscribing the 2 shared cores (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """Digits as [N, 3, 8, 8] pixels in [0, 1], a fixed 70/30 split (every third image is test)."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target)
    test = torch.arange(len(y)) % 3 == 0
    return x[~test], y[~test], x[test], y[test]


def _train(backbone: nn.Module, digits, key: str, epochs: int, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    xtr, ytr, _, _ = digits
    x = (F.interpolate(xtr, size=(SIZE, SIZE), mode="bilinear", align_corners=False) - 0.5) / 0.5
    dim = backbone(x[:2]).shape[1]
    head = nn.Linear(dim, 10)
    model = nn.Sequential(backbone, head)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        model.train()
        for b in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(x[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    backbone.eval()
    return Classifier(key=key, backbone=backbone, head_weight=head.weight.detach().clone(),
                      head_bias=head.bias.detach().clone(),
                      input=InputConfig(size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                      weights_digest=key, family=key, info={"label_space": "digits"})  # fmt: skip


@pytest.fixture(scope="module")
def mlp(digits) -> Classifier:
    torch.manual_seed(0)
    bb = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    return _train(bb, digits, "mlp", epochs=10)


@pytest.fixture(scope="module")
def cnn(digits) -> Classifier:
    torch.manual_seed(1)
    bb = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                       nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                       nn.Flatten())  # fmt: skip
    return _train(bb, digits, "cnn", epochs=6, seed=1)


def test_classifiers_are_trained(mlp, cnn, digits):
    _, _, xte, yte = digits
    for clf in (mlp, cnn):
        acc = (embed(clf, xte)[0].argmax(1) == yte).double().mean()
        assert acc > 0.9, (clf.key, acc)


def test_class_prob_matches_direct_softmax(mlp, digits):
    x = digits[2][:7]
    direct = torch.softmax(mlp.forward_logits((F.interpolate(x, size=(SIZE, SIZE), mode="bilinear") - 0.5) / 0.5), 1)
    classes = [0, 1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(class_prob(mlp, x, classes), direct[range(7), classes].detach().numpy(), rtol=1e-5)


def test_class_inversion_reaches_target_and_beats_noise(mlp):
    seeds = [0, 1, 2, 3, 4]
    for c in (2, 5):
        res = invert_many(class_objective(mlp, c), seeds, steps=120)
        images = torch.stack([r.image for r in res])
        starts = torch.stack([r.start for r in res])
        assert images.shape == (5, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
        reached = class_prob(mlp, images, [c] * 5)
        noise = class_prob(mlp, starts, [c] * 5)
        assert reached.mean() >= 0.9, reached
        assert noise.mean() < 0.5 and reached.mean() - noise.mean() > 0.4, (reached, noise)
        assert all(r.history["loss"][-1] < r.history["loss"][0] for r in res)
        # different seeds start from different noise and end in different images
        assert not torch.allclose(images[0], images[1])


def test_invert_is_seeded_and_batch_independent(mlp):
    obj = class_objective(mlp, 4)
    together = invert_many(obj, [3, 8], steps=20)
    alone = invert_many(obj, [8], steps=20)
    torch.testing.assert_close(together[1].image, alone[0].image, rtol=0, atol=1e-5)


def test_difference_objective_separates_models(mlp, cnn):
    res = invert_many(difference_objective(mlp, cnn, 7), [0, 1, 2], steps=120)
    images = torch.stack([r.image for r in res])
    assert class_prob(mlp, images, [7] * 3).mean() > class_prob(cnn, images, [7] * 3).mean()


def test_match_reduces_logit_distance(mlp, digits):
    natural = digits[2][10]
    target = target_logits(mlp, natural)
    direct = mlp.forward_logits((F.interpolate(natural[None], size=(SIZE, SIZE), mode="bilinear") - 0.5) / 0.5)[0]
    torch.testing.assert_close(target, direct.detach(), rtol=1e-5, atol=1e-5)
    for s in (0, 1):
        res = invert_many(match_objective(mlp, target, natural), [s], steps=200)[0]
        z_start, z_end = embed(mlp, res.start[None])[0], embed(mlp, res.image[None])[0]
        l1_start, _ = logit_distance(z_start, target)
        l1_end, l2_end = logit_distance(z_end, target)
        assert l1_end[0] < 0.4 * l1_start[0], (l1_start, l1_end)
        ref = (z_end - target).norm() / target.norm()
        assert l2_end[0] == pytest.approx(float(ref), rel=1e-5)


def test_match_rejects_bad_targets(mlp):
    with pytest.raises(UserError, match="10 logits per image"):
        match_objective(mlp, torch.zeros(11))
    with pytest.raises(UserError, match="NaN"):
        match_objective(mlp, torch.full((10,), float("nan")))
    with pytest.raises(UserError, match="out of range"):
        class_objective(mlp, 10)


def _direct_ssim(a: np.ndarray, b: np.ndarray, win: int = 7, data_range: float = 1.0) -> float:
    """SSIM from the formula: uniform win x win windows fully inside the image, sample (co)variances, averaged."""
    c1, c2, n = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2, win * win
    vals = []
    for ch in range(a.shape[0]):
        wa = sliding_window_view(a[ch], (win, win)).reshape(-1, n)
        wb = sliding_window_view(b[ch], (win, win)).reshape(-1, n)
        ma, mb = wa.mean(1), wb.mean(1)
        va, vb = wa.var(1, ddof=1), wb.var(1, ddof=1)
        cov = ((wa - ma[:, None]) * (wb - mb[:, None])).sum(1) / (n - 1)
        s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def test_psnr_and_ssim_against_references():
    rng = np.random.default_rng(0)
    x = rng.random((3, 16, 16))
    noise = rng.normal(0, 0.05, x.shape)
    y = x + noise
    assert psnr(x, x) == float("inf")
    assert psnr(x, y) == pytest.approx(10 * np.log10(1.0 / np.mean(noise**2)), rel=1e-12)
    assert psnr(x, y) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), rel=1e-12)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, y) == pytest.approx(_direct_ssim(x, y), rel=1e-9)
    assert ssim(x, y) == pytest.approx(structural_similarity(x, y, data_range=1.0, channel_axis=0), rel=1e-12)
    assert ssim(x, y) < 0.99
    small = rng.random((3, 6, 6))  # smaller than the 7x7 window: the largest odd window that fits (5)
    assert ssim(small, small + 0.1) == pytest.approx(_direct_ssim(small, small + 0.1, win=5), rel=1e-9)


def test_retrieval_top1_constructed_cases():
    rng = torch.Generator().manual_seed(0)
    originals = torch.rand(60, 3, 8, 8, generator=rng)
    recons = originals + 0.01 * torch.randn(originals.shape, generator=rng)
    assert retrieval_top1(recons, originals) == 1.0
    perm = torch.randperm(60, generator=rng)
    shuffled = recons[perm]  # query i is a copy of original perm[i]: correct only at fixed points
    assert retrieval_top1(shuffled, originals) == pytest.approx(float((perm == torch.arange(60)).double().mean()))
    assert retrieval_top1(shuffled, originals) <= 5 / 60  # about chance (1/60)
    q, g = shuffled.reshape(60, -1).numpy(), originals.reshape(60, -1).numpy()
    brute = np.mean([np.argmin(((g - q[i]) ** 2).sum(1)) == i for i in range(60)])
    assert retrieval_top1(shuffled, originals) == pytest.approx(brute)


def test_gaussian_blur_matches_scipy():
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = gaussian_blur(x, 1.0).numpy()
    ref = np.stack([[gaussian_filter(x[i, c].numpy(), 1.0, mode="mirror", truncate=2.0) for c in range(3)]
                    for i in range(2)])  # fmt: skip
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    torch.testing.assert_close(gaussian_blur(x, 0.0), x)


def test_untrained_copy_is_fresh_and_leaves_original(cnn):
    before = {k: v.clone() for k, v in cnn.backbone.state_dict().items()}
    u = untrained_copy(cnn, seed=0)
    after = cnn.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for k, v in u.backbone.state_dict().items():
        assert v.shape == after[k].shape
        if k.endswith("weight") and v.dim() > 1:
            assert not torch.allclose(v, after[k])
    assert u.head_weight.shape == cnn.head_weight.shape and not torch.allclose(u.head_weight, cnn.head_weight)
    torch.testing.assert_close(untrained_copy(cnn, seed=0).head_weight, u.head_weight)


def test_decoder_trains_and_onehot_control_has_same_architecture(mlp, digits):
    xtr, _, xte, _ = digits
    cfg = DecoderConfig(epochs=12, channels=16, seed=0)
    z_tr, z_te = embed(mlp, xtr)[0], embed(mlp, xte)[0]
    target = F.interpolate(xte, size=(16, 16), mode="bilinear", align_corners=False)
    untrained_mse = ((build_decoder(z_tr, "standardised", cfg).decode(z_te) - target) ** 2).mean()
    dec = fit_decoder(z_tr, xtr, "standardised", cfg)
    onehot = fit_decoder(z_tr, xtr, "onehot", cfg)
    rec = dec.decode(z_te)
    assert rec.shape == (len(xte), 3, 16, 16) and rec.min() >= 0 and rec.max() <= 1
    mse = ((rec - target) ** 2).mean()
    assert mse < 0.5 * untrained_mse, (mse, untrained_mse)
    assert ((onehot.decode(z_te) - target) ** 2).mean() < 0.5 * untrained_mse
    cond = onehot.conditioning(z_te)
    torch.testing.assert_close(cond, F.one_hot(z_te.argmax(1), 10).float())
    a, b = dict(dec.named_parameters()), dict(onehot.named_parameters())
    assert a.keys() == b.keys()
    conditioning_layer = "generator.embed.0."
    assert all(a[k].shape == b[k].shape for k in a if not k.startswith(conditioning_layer))
    rest = [k for k in a if not k.startswith(conditioning_layer)]
    assert sum(a[k].numel() for k in rest) == sum(b[k].numel() for k in rest)
    # the one-hot decoder's output depends on the argmax only
    same_class = z_te[:1].repeat(2, 1)
    same_class[1] += 0.3 * torch.randn(10, generator=torch.Generator().manual_seed(0))
    same_class[1, same_class[0].argmax()] += 100
    out = onehot.decode(same_class)
    torch.testing.assert_close(out[0], out[1])


def test_manipulated_logits():
    z = torch.tensor([1.0, -2.0, 3.0])
    shifted = manipulated_logits(z, "shift", [-1, 0, 2])
    torch.testing.assert_close(shifted[2], z + 2)
    torch.testing.assert_close(torch.softmax(shifted, 1), torch.softmax(z, 0).expand(3, 3))
    torch.testing.assert_close(manipulated_logits(z, "scale", [0.5])[0], z * 0.5)
    noisy = manipulated_logits(z, "noise", [0.0, 1.0], seed=3)
    torch.testing.assert_close(noisy[0], z)
    assert not torch.allclose(noisy[1], z)
    with pytest.raises(UserError):
        manipulated_logits(z, "rotate", [1])


def test_gallery_html_escapes_and_embeds(tmp_path):
    save_grid(torch.rand(1, 2, 3, 4, 4), tmp_path / "a.png")
    html = gallery_html(tmp_path, [("<script>alert(1)</script> & co", "a.png")])
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html
    data = html.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(data) == (tmp_path / "a.png").read_bytes()
    for bad in ("../a.png", "missing.png"):
        with pytest.raises(UserError):
            gallery_html(tmp_path, [("x", bad)])


def test_run_inversion_small(mlp, cnn, digits, tmp_path):
    xtr, ytr, xte, yte = digits
    cfg = InversionConfig(optim=OptimSettings(steps=15), seeds=(0, 1), classes=(1, 6),
                          decoder=DecoderConfig(epochs=1, channels=8), gallery_items=3, manipulation_items=2)  # fmt: skip
    df = run_inversion({"mlp": mlp, "cnn": cnn}, {"mlp": "cnn"}, xtr, ytr, xte, yte, cfg, tmp_path, progress=False)
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    methods = {"class", "combined", "difference", "match", "decoder", "decoder_onehot"}
    assert set(df.method) == methods
    assert set(df.control) == {"none", "untrained", "noise"}
    cls = df[(df.method == "class") & (df.control == "none")]
    assert len(cls) == 2 * 2 * 2  # models x classes x seeds
    assert cls[cls.model == "mlp"].heldout_prob.notna().all() and cls[cls.model == "cnn"].heldout_prob.isna().all()
    dec = df[df.method.str.startswith("decoder")]
    assert dec.chance.eq(1 / len(xte)).all() and dec.retrieval_top1.between(0, 1).all()
    assert df[df.method == "class"].ssim.isna().all() and df[df.method == "match"].ssim.notna().all()
    for _, name in df.attrs["images"]:
        assert (tmp_path / name).is_file() and set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-.")
    assert len({n for _, n in df.attrs["images"]}) == len(df.attrs["images"])
    assert set(df.device) == {"cpu"} and df.stage_seconds.gt(0).all()
    cross = pd.DataFrame(df.attrs["cross"])
    assert list(cross.columns[: len(CROSS_COLUMNS)]) == list(CROSS_COLUMNS)
    assert len(cross) == 2 * 2 * 2  # decoder models x judges x {logits, onehot}
    assert set(zip(cross.decoder_model, cross.judge_model, cross.condition, strict=True)) == {
        (a, b, c) for a in ("mlp", "cnn") for b in ("mlp", "cnn") for c in ("logits", "onehot")}
    assert cross.chance.eq(1 / len(xte)).all() and cross.rows.eq(len(xte)).all()
    # the diagonal is the decoder row's own agreement; mlp's held-out judge (cnn) its held-out columns
    row = dec[(dec.model == "mlp") & (dec.method == "decoder") & (dec.control == "none")].iloc[0]
    cell = cross.set_index(["decoder_model", "judge_model", "condition"])
    assert cell.loc[("mlp", "mlp", "logits"), "agreement"] == pytest.approx(row.agreement_source)
    assert cell.loc[("mlp", "cnn", "logits"), "agreement"] == pytest.approx(row.agreement_heldout)
    assert cell.loc[("mlp", "cnn", "logits"), "retrieval_top1_features"] == pytest.approx(row.retrieval_top1_features)
    with pytest.raises(UserError, match="heldout"):
        run_inversion({"mlp": mlp}, {"mlp": "mlp"}, xtr, ytr, xte, yte, cfg, tmp_path, progress=False)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        run_inversion({"mlp": mlp}, {}, xtr * 2, ytr, xte, yte, cfg, tmp_path, progress=False)



def test_config_from_dict():
    cfg = InversionConfig.from_dict({"seeds": [0, 1, 2, 3, 4, 5], "optim": {"steps": 50, "lr": [0.1, 0.01]},
                                     "decoder": {"epochs": 3, "loss": "l1+hinge"}})  # fmt: skip
    assert cfg.seeds == (0, 1, 2, 3, 4, 5) and cfg.optim.steps == 50 and cfg.optim.lr == (0.1, 0.01)
    assert cfg.decoder.epochs == 3 and cfg.decoder.loss == "l1+hinge" and cfg.decoder.size == 16
    with pytest.raises(UserError, match="stepz"):
        InversionConfig.from_dict({"optim": {"stepz": 1}})
    with pytest.raises(UserError, match="loss"):
        InversionConfig.from_dict({"decoder": {"loss": "mse"}})
    with pytest.raises(UserError, match="controls"):
        InversionConfig.from_dict({"controls": ["shuffled"]})


def _direct(judge: Classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A judge's logits and features computed here from scratch: resize to its input, normalise, backbone, head."""
    x = (F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False) - 0.5) / 0.5
    with torch.no_grad():
        f = judge.backbone(x)
    return f @ judge.head_weight.T + judge.head_bias, f


def test_cross_table_matches_direct_computation(mlp, cnn, digits):
    xtr, _, xte, _ = digits
    xte = xte[:120]
    cfg = DecoderConfig(epochs=2, channels=8, seed=0)
    out, decoders = decoder_inversion(mlp, cnn, xtr, xte, cfg, untrained_control=False, judges=[mlp, cnn],
                                      device="cpu")  # fmt: skip
    cross = pd.DataFrame(out.cross).set_index(["judge_model", "condition"])
    assert len(cross) == 4 and set(pd.DataFrame(out.cross).decoder_model) == {"mlp"}
    originals = F.interpolate(xte, size=(16, 16), mode="bilinear", align_corners=False)
    z_mlp, _ = _direct(mlp, xte)  # the decoder's input: mlp's logits of the test images
    for condition, name in (("logits", "decoder"), ("onehot", "decoder_onehot")):
        recon = decoders[name][0].decode(z_mlp)
        assert recon.device.type == "cpu" and recon.shape == (120, 3, 16, 16)
        for judge in (mlp, cnn):
            z_rec, f_rec = _direct(judge, recon)
            z_orig, f_orig = _direct(judge, originals)
            label = z_orig.argmax(1)
            agreement = (z_rec.argmax(1) == label).double().mean().item()
            prob = torch.softmax(z_rec.double(), 1)[torch.arange(120), label].mean().item()
            dist = ((f_rec[:, None, :].double() - f_orig[None, :, :].double()) ** 2).sum(-1)
            retrieval = (dist.argmin(1) == torch.arange(120)).double().mean().item()
            got = cross.loc[(judge.key, condition)]
            assert got.agreement == pytest.approx(agreement, abs=1e-12), (judge.key, condition)
            assert got.judge_prob == pytest.approx(prob, rel=1e-5)
            assert got.retrieval_top1_features == pytest.approx(retrieval, abs=1e-12)
            assert got.chance == pytest.approx(1 / 120) and got.rows == 120
    # the judges see different things: the one-hot control gives every test image of a class one picture
    assert cross.loc[("mlp", "onehot"), "retrieval_top1_features"] < 0.1
    with pytest.raises(UserError, match="label space"):
        three = untrained_copy(mlp)
        three.head_weight, three.head_bias = three.head_weight[:3], three.head_bias[:3]
        decoder_inversion(mlp, None, xtr, xte, cfg, untrained_control=False, judges=[three])


def test_device_parameter_on_cpu(mlp, digits):
    """No GPU here: device="cpu" explicitly; decoders, classifiers and results stay on / come back to the CPU."""
    xtr, _, xte, _ = digits
    assert on_device(mlp, "cpu") is mlp and device_of(mlp).type == "cpu"
    z = embed(mlp, xtr[:64])[0]
    cfg = DecoderConfig(epochs=1, channels=8)
    a = fit_decoder(z, xtr[:64], "standardised", cfg, device="cpu")
    assert a.device.type == "cpu" and a.info["device"] == "cpu" and a.decode(z[:5]).device.type == "cpu"


def test_stage_models_load_only_what_a_stage_uses(mlp, cnn):
    third = untrained_copy(mlp, seed=3)
    third.key = "third"
    clfs = {"mlp": mlp, "cnn": cnn, "third": third}
    held = {"mlp": "cnn", "cnn": "third", "third": "mlp"}
    cfg = InversionConfig()
    stages = plan_stages(clfs, cfg, held)
    assert [stage_name(*s) for s in stages] == ["class mlp pixels", "class cnn pixels", "class third pixels",
                                                "match mlp pixels", "match cnn pixels", "match third pixels",
                                                "pair mlp cnn pixels", "decoder mlp", "decoder cnn",
                                                "decoder third"]  # fmt: skip
    two = InversionConfig(stages=("class", "mimic", "natural"), parameterisations=("pixels", "fourier"),
                          mimic=(("cnn", "mlp"),), per_stage={"natural": {"parameterisations": ["phase"]}})
    assert [stage_name(*s) for s in plan_stages(clfs, two, held)] == [
        "class mlp pixels", "class cnn pixels", "class third pixels", "class mlp fourier", "class cnn fourier",
        "class third fourier", "mimic cnn mlp pixels", "mimic cnn mlp fourier", "natural mlp phase",
        "natural cnn phase", "natural third phase"]  # fmt: skip
    default_mimic = InversionConfig(stages=("mimic",))
    assert [a for _, a in plan_stages(clfs, default_mimic, held)] == [("mlp", "cnn", "pixels"),
                                                                      ("cnn", "third", "pixels"),
                                                                      ("third", "mlp", "pixels")]  # fmt: skip
    # every stage loads every model of its label space (judges of the transfer and cross tables), no other
    other = replace(untrained_copy(mlp, seed=4), key="other", head_weight=torch.zeros(3, mlp.feature_dim),
                    head_bias=torch.zeros(3))  # fmt: skip
    clfs["other"] = other
    for stage, arg in [("class", ("mlp", "pixels")), ("pair", ("mlp", "cnn", "fourier")), ("decoder", "cnn")]:
        assert stage_models(stage, arg, clfs, held, cfg) == ["mlp", "cnn", "third"]
    assert stage_models("class", ("other", "pixels"), clfs, held, cfg) == ["other"]
    with pytest.raises(UserError, match="gpus"):
        InversionConfig(gpus=2)
