"""Image parameterisations (Fourier with decorrelated colour, phase-only), transformation robustness, normalised
objectives, the transfer table, the one-hot ceiling, bundled photos and class names, each against an independent
computation (numpy, scipy, scikit-image, direct loops)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import scipy.special
import skimage.data
import torch
from scipy.spatial.distance import cosine as scipy_cosine
from torch import nn

from featrec_grid.errors import UserError
from featrec_grid.invert.colour import COLOUR_MATRIX, from_rgb, to_rgb
from featrec_grid.invert.experiments import (
    OptimSettings,
    Recipe,
    class_visualisation,
    mimic_inversion,
    natural_inversion,
)
from featrec_grid.invert.fourier import FourierImage, frequencies, spectrum_scale
from featrec_grid.invert.gallery import grid_image, transfer_table
from featrec_grid.invert.labels import class_name
from featrec_grid.invert.maco import PhaseImage, standardise
from featrec_grid.invert.measures import onehot_ceiling, retrieval_top1
from featrec_grid.invert.optimise import class_objective, normalise
from featrec_grid.invert.paramopt import invert_spectral
from featrec_grid.invert.photos import load_photo
from featrec_grid.invert.robust import Robustness, warp
from featrec_grid.invert.run import InversionConfig
from featrec_grid.invert.transfer import TRANSFER_COLUMNS, judge_images, vector_distances
from featrec_grid.models import Classifier, InputConfig

SIZE = 16


def _clf(key: str, seed: int, classes: int = 5, scale: float = 1.0, shift: float = 0.0) -> Classifier:
    """A small random conv classifier (weights from `seed`); scale/shift multiply and offset its logits."""
    torch.manual_seed(seed)
    bb = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten()).eval()
    head = nn.Linear(32, classes)
    return Classifier(key=key, backbone=bb, head_weight=head.weight.detach() * scale,
                      head_bias=head.bias.detach() * scale + shift,
                      input=InputConfig(size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                      weights_digest=key, family="cnn", info={"label_space": "toy"})  # fmt: skip


# --- colour ------------------------------------------------------------------------------------------------------


def test_colour_matrix_is_lucids_normalised_and_invertible():
    lucid = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    expected = lucid / np.linalg.norm(lucid, axis=0).max()
    np.testing.assert_allclose(COLOUR_MATRIX.numpy(), expected, rtol=1e-12)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    direct = np.einsum("ij,njhw->nihw", expected, x.numpy())
    np.testing.assert_allclose(to_rgb(x).numpy(), direct, rtol=1e-12)
    np.testing.assert_allclose(from_rgb(to_rgb(x)).numpy(), x.numpy(), atol=1e-12)
    np.testing.assert_allclose(from_rgb(x).numpy(), np.einsum("ij,njhw->nihw", np.linalg.inv(expected), x.numpy()),
                               rtol=1e-10)  # fmt: skip
    # the square root of a correlation matrix: M M^T is symmetric positive definite with positive RGB correlations
    cov = expected @ expected.T
    assert np.all(np.linalg.eigvalsh(cov) > 0) and np.all(cov > 0)


# --- Fourier -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9)])
def test_frequencies_and_scale_match_a_direct_computation(h, w):
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[: w // 2 + 1]
    fx = np.abs(fx)  # rfft columns are the non-negative frequencies (fftfreq marks Nyquist negative for even w)
    f = np.sqrt(fx**2 + fy**2)
    np.testing.assert_allclose(frequencies(h, w).numpy(), f, rtol=1e-12)
    np.testing.assert_allclose(spectrum_scale(h, w, 1.5).numpy(), 1 / np.maximum(f, 1 / max(h, w)) ** 1.5)
    assert spectrum_scale(h, w)[0, 0] == max(h, w)


@pytest.mark.parametrize("size", [16, 15])
def test_fourier_image_reproduces_an_image_exactly(size):
    g = torch.Generator().manual_seed(0)
    img = 0.02 + 0.96 * torch.rand(2, 3, size, size, generator=g)
    for decorrelate in (True, False):
        out = FourierImage.from_image(img, decorrelate=decorrelate)()
        assert out.shape == img.shape
        torch.testing.assert_close(out, img, atol=2e-5, rtol=0)


def test_fourier_forward_matches_numpy():
    p = FourierImage.random([3, 4], 10, sd=0.5, decay_power=1.0)
    spec = p.spectrum.detach().double().numpy()
    scale = 1 / np.maximum(frequencies(10, 10).numpy(), 0.1)
    t = np.fft.irfft2((spec[..., 0] + 1j * spec[..., 1]) * scale, s=(10, 10), norm="ortho") / 4
    rgb = np.einsum("ij,njhw->nihw", COLOUR_MATRIX.numpy(), t)
    np.testing.assert_allclose(p().detach().numpy(), scipy.special.expit(rgb), atol=1e-6)
    # seeded per image: image 1 of the batch is the same as that seed alone
    torch.testing.assert_close(p()[1], FourierImage.random([4], 10, sd=0.5)()[0])


# --- phase-only (MaCo) -------------------------------------------------------------------------------------------


def test_phase_image_keeps_its_magnitude_template():
    img = PhaseImage.random([0, 1], 12)
    assert img().shape == (2, 3, 12, 12) and img().min() >= 0 and img().max() <= 1
    template = img.magnitude.double().numpy()

    def ratios():
        spec = np.abs(np.fft.rfft2(img.decorrelated().detach().double().numpy()))
        return spec[..., 1:-1] / template[None, :, :, 1:-1]  # columns without a conjugate-symmetry constraint

    opt = torch.optim.Adam(img.parameters(), lr=0.5)
    for _ in range(2):
        r = ratios()
        per_image = r.reshape(2, -1)
        np.testing.assert_allclose(per_image, per_image[:, :1].repeat(per_image.shape[1], 1), rtol=1e-4)
        loss = -img()[:, 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(img.phase, PhaseImage.random([0, 1], 12).phase)  # the phase moved; the magnitude did not


def test_standardise_matches_numpy():
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    a = x.numpy().reshape(3, -1)
    expected = (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(standardise(x).numpy().reshape(3, -1), expected, rtol=1e-10)


# --- transformation robustness -----------------------------------------------------------------------------------


def test_robustness_is_identity_at_zero_and_keeps_shapes():
    x = torch.rand(3, 3, 20, 20)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert Robustness.lucid(20, 0.0)(x, gens) is x
    r = Robustness.lucid(224)
    assert (r.pad, r.jitter, r.scale, r.angle) == (12, 8, 0.1, 10.0)
    r96 = Robustness.lucid(96)
    assert (r96.pad, r96.jitter) == (5, 3)
    out = r96(torch.rand(3, 3, 96, 96), gens)
    assert out.shape == (3, 3, 106, 106) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(UserError, match="robustness"):
        Robustness.lucid(96, -1)


def test_warp_against_rot90_roll_and_scipy():
    x = torch.rand(2, 3, 11, 11, dtype=torch.float64)
    no = torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    torch.testing.assert_close(warp(x, no), x, atol=1e-12, rtol=0)
    rot = torch.tensor([[0.0, 0.0, 1.0, 90.0]] * 2, dtype=torch.float64)
    np.testing.assert_allclose(warp(x, rot).numpy(), np.rot90(x.numpy(), 1, axes=(2, 3)), atol=1e-12)  # anticlockwise
    shift = torch.tensor([[2.0, -1.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    rolled = np.roll(x.numpy(), (-1, 2), axis=(2, 3))
    np.testing.assert_allclose(warp(x, shift).numpy()[..., :-1, 2:], rolled[..., :-1, 2:], atol=1e-12)
    assert np.allclose(warp(x, shift).numpy()[..., :, :2], 0.5)  # grey where nothing comes in
    # scale 1.25 about the centre: output p samples the input at c + (p - c) / s (scipy, bilinear)
    s, c = 1.25, 5.0
    scaled = warp(x, torch.tensor([[0.0, 0.0, s, 0.0]] * 2, dtype=torch.float64)).numpy()
    ref = scipy.ndimage.affine_transform(x.numpy()[0, 0], np.eye(2) / s, offset=c - c / s, order=1)
    np.testing.assert_allclose(scaled[0, 0, 2:-2, 2:-2], ref[2:-2, 2:-2], atol=1e-12)


def test_robust_draws_are_seeded_per_image():
    r = Robustness.lucid(32)
    x = torch.rand(2, 3, 32, 32)
    a = r(x, [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    b = r(x[1:], [torch.Generator().manual_seed(6)])
    torch.testing.assert_close(a[1:], b)


# --- objectives --------------------------------------------------------------------------------------------------


def test_normalised_objectives_against_scipy_and_numpy():
    z = torch.randn(4, 7, dtype=torch.float64) * 5 + 3
    np.testing.assert_allclose(normalise(z, "log_softmax").numpy(), scipy.special.log_softmax(z.numpy(), 1))
    a = z.numpy()
    np.testing.assert_allclose(normalise(z, "zscore").numpy(),
                               (a - a.mean(1, keepdims=True)) / a.std(1, ddof=1, keepdims=True))  # fmt: skip
    assert torch.equal(normalise(z, "logit"), z)
    with pytest.raises(UserError, match="objective"):
        normalise(z, "softmax")


def test_zscore_objective_needs_no_per_model_constant():
    """A model whose logits are 3 z + 7 gives the same z-score images as z; raw logits do not (the pixel method
    normalises the gradient, so use Adam on the Fourier image where the scale reaches the step)."""
    a, b = _clf("a", 0), _clf("b", 0, scale=3.0, shift=7.0)
    run = lambda clf, obj: invert_spectral(class_objective(clf, [1, 2], obj), [0, 1], "fourier", steps=5, lr=0.1)  # noqa: E731
    za, zb = (torch.stack([r.image for r in run(c, "zscore")]) for c in (a, b))
    torch.testing.assert_close(za, zb, atol=1e-4, rtol=0)
    sa, sb = (torch.stack([r.image for r in run(c, "log_softmax")]) for c in (a, b))
    assert (sa - sb).abs().max() > 1e-3


def test_spectral_inversion_raises_the_target_and_is_batch_independent():
    clf = _clf("a", 0)
    obj = class_objective(clf, [3, 3], "log_softmax")
    for param in ("fourier", "phase"):
        res = invert_spectral(obj, [0, 1], param, steps=30, lr=0.1)
        start_loss, end_loss = res[0].history["loss"][0], res[0].history["loss"][-1]
        assert end_loss < start_loss
        alone = invert_spectral(class_objective(clf, 3, "log_softmax"), [1], param, steps=30, lr=0.1)[0]
        torch.testing.assert_close(res[1].image, alone.image, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="parameterisation"):
        invert_spectral(obj, [0, 1], "wavelet", steps=2)


# --- the transfer table ------------------------------------------------------------------------------------------


def test_judge_images_against_direct_ranks():
    judges = [_clf("a", 0), _clf("b", 1)]
    x = torch.rand(4, 3, SIZE, SIZE)
    classes, seeds = [0, 1, 2, 3], [9, 9, 8, 8]
    rows = judge_images(x, classes, seeds, judges, generator="a", used=["a"], method="class",
                        parameterisation="fourier", objective="zscore")  # fmt: skip
    assert len(rows) == 8 and set(rows[0]) == set(TRANSFER_COLUMNS)
    for judge in judges:
        with torch.no_grad():
            z = judge.forward_logits((x - 0.5) / 0.5).double().numpy()
        p = scipy.special.softmax(z, 1)
        mine = [r for r in rows if r["judge"] == judge.key]
        for i, r in enumerate(mine):
            order = list(np.argsort(-z[i]))
            assert r["target_rank"] == order.index(classes[i]) + 1
            assert r["top1_is_target"] == (order[0] == classes[i])
            assert r["target_prob"] == pytest.approx(p[i, classes[i]], rel=1e-6)
            assert r["heldout"] == (judge.key != "a") and r["seed"] == seeds[i] and r["class"] == classes[i]
    df = transfer_table(rows)
    assert list(df.columns) == list(TRANSFER_COLUMNS) and df["target_rank"].dtype == "int64"
    assert list(transfer_table([]).columns) == list(TRANSFER_COLUMNS)


def test_vector_distances_against_scipy():
    z, t = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    l1, cos = vector_distances(z, t)
    for i in range(3):
        assert cos[i] == pytest.approx(scipy_cosine(z[i].numpy(), t[i].numpy()), rel=1e-9)
    a, b = z.numpy(), t.numpy()
    np.testing.assert_allclose(l1, np.abs(a - b).sum(1) / np.abs(b).sum(1), rtol=1e-12)


def test_onehot_ceiling_is_the_best_a_class_only_decoder_can_retrieve():
    groups = np.array([0, 0, 1, 2, 2, 2])
    assert onehot_ceiling(groups) == pytest.approx((2 * 0.5 + 1 + 3 / 3) / 6)
    assert onehot_ceiling(np.repeat(np.arange(10), 54)) == pytest.approx(10 / 540)  # the digits demo: 0.0185
    # queries that are the same within a class can retrieve at most one item of it: try every gallery choice
    rng = np.random.default_rng(0)
    gallery = torch.tensor(rng.normal(size=(6, 4)))
    best = 0.0
    for centres in rng.normal(size=(200, 3, 4)):
        queries = torch.tensor(centres[groups])
        best = max(best, retrieval_top1(queries, gallery))
    assert best <= onehot_ceiling(groups) + 1e-12
    queries = gallery[[0, 0, 2, 3, 3, 3]]  # each class's reconstruction equal to one of its gallery items
    assert retrieval_top1(queries, gallery) == pytest.approx(onehot_ceiling(groups))


# --- photos, names, labelled grids -------------------------------------------------------------------------------


def test_photos_are_centre_crops_of_scikit_images():
    a = skimage.data.chelsea()  # 300 x 451: the central 300 x 300 square, unresized at size 300
    expected = a[:, 75:375].astype(np.float32) / 255
    np.testing.assert_allclose(load_photo("chelsea", 300).permute(1, 2, 0).numpy(), expected, atol=1e-6)
    small = load_photo("motorcycle", 24)
    assert small.shape == (3, 24, 24) and small.min() >= 0 and small.max() <= 1
    with pytest.raises(UserError, match="photo 'dalmatian'"):
        load_photo("dalmatian", 24)


def test_class_names_from_timm_metadata():
    imagenet = _clf("lite", 0, classes=1000)
    imagenet.info["label_space"] = "imagenet"
    assert class_name(imagenet, 11) == "11 goldfinch, Carduelis carduelis"
    assert class_name(imagenet, 558, short=True) == "558 flute"
    assert class_name(_clf("toy", 0), 3) == "3"


def test_grid_row_labels_are_drawn_in_a_margin():
    rows = torch.rand(2, 3, 3, 8, 8)
    plain, labelled = grid_image(rows, scale=2), grid_image(rows, scale=2, row_labels=["0 tench", "11 goldfinch"])
    assert labelled.height == plain.height and labelled.width > plain.width
    margin = np.asarray(labelled)[:, : labelled.width - plain.width]
    assert (margin < 128).any() and (margin == 255).mean() > 0.5  # dark text on white
    np.testing.assert_array_equal(np.asarray(labelled)[:, labelled.width - plain.width :], np.asarray(plain))
    with pytest.raises(ValueError, match="row labels"):
        grid_image(rows, row_labels=["one"])


# --- the stages on small models ----------------------------------------------------------------------------------


def test_class_mimic_and_natural_stages_fill_rows_transfer_and_grids():
    a, b, c = _clf("a", 0), _clf("b", 1), _clf("c", 2)
    opt = OptimSettings(steps=25, fourier_lr=0.1)
    recipe = Recipe("fourier", "log_softmax", (a, b, c))
    got = class_visualisation(a, b, [1, 2], [0, 1], opt, ("untrained", "noise"), recipe=recipe, control_seeds=1)
    assert {(r["control"], r["parameterisation"], r["objective"]) for r in got.rows} == {
        ("none", "fourier", "log_softmax"), ("noise", "fourier", "log_softmax"), ("untrained", "fourier", "log_softmax")}
    gens = {r["generator"] for r in got.transfer}
    assert gens == {"a", "noise", "a~untrained"} and len(got.transfer) == (4 + 4 + 2) * 3
    assert all(r["heldout"] == (r["judge"] != "a") for r in got.transfer if r["generator"] != "noise")
    _, grid, labels = got.grids["class_a_none_fourier"]
    assert grid.shape[:2] == (2, 2) and labels == ("1", "2")

    recipe = Recipe("fourier", "logit", (a, b, c))  # the seed's L1 on raw logits: the distance it closes
    mim = mimic_inversion(b, a, c, [1, 4], [0], opt, recipe)
    for r in mim.rows:
        assert r["logit_cos_dist"] < r["logit_cos_dist_start"] and r["logit_l1_rel"] < r["logit_l1_rel_start"]
        assert r["third_model"] == "c" and isinstance(r["third_top1_is_target"], bool)
    assert {r["heldout"] for r in mim.transfer if r["generator"] == "b"} == {False, True}
    assert [r["judge"] for r in mim.transfer if r["heldout"] and r["generator"] == "b"] == ["c", "c"]

    photos = {"chelsea": load_photo("chelsea", SIZE), "coffee": load_photo("coffee", SIZE)}
    nat = natural_inversion(a, photos, [0], opt, recipe, third=b)
    assert [r["photo"] for r in nat.rows] == ["chelsea", "coffee"]
    assert all(r["logit_cos_dist"] < r["logit_cos_dist_start"] for r in nat.rows)
    assert {r["item"] for r in nat.transfer} == {"chelsea", "coffee"}
    _, grid, labels = nat.grids["natural_a_fourier"]
    assert grid.shape[:2] == (2, 2) and labels == ("chelsea", "coffee")


# --- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block,message", [
    ({"stages": ["class", "dream"]}, "stages: unknown \\['dream'\\]"),
    ({"parameterisations": ["pixels", "wavelet"]}, "parameterisations: unknown \\['wavelet'\\]"),
    ({"parameterisations": []}, "parameterisations must be a non-empty list"),
    ({"objective": "softmax"}, "objective 'softmax' is not one of logit, log_softmax, zscore"),
    ({"control_seeds": 0}, "control_seeds 0 must be a whole number >= 1"),
    ({"mimic": [["lite0", "lite0"]]}, "mimic .* must list pairs"),
    ({"mimic": "lite0"}, "mimic .* must list pairs"),
    ({"mimic_classes": [-1]}, "mimic_classes \\[-1\\] must list class indices"),
    ({"classes": 5}, "classes 5 must list class indices"),
    ({"per_stage": {"pair": {"classes": 5}}}, "per_stage.pair.classes 5 must list class indices"),
    ({"photos": ["dalmatian"]}, "photos: unknown \\['dalmatian'\\]"),
    ({"per_stage": {"decoder": {}}}, "per_stage: unknown \\['decoder'\\]"),
    ({"per_stage": {"pair": {"steps": 3}}}, "per_stage.pair must be a mapping with keys from"),
    ({"per_stage": {"pair": {"parameterisations": ["x"]}}}, "per_stage.pair.parameterisations: unknown"),
    ({"per_stage": {"pair": {"seeds": []}}}, "per_stage.pair.seeds"),
    ({"per_stage": {"class": {"controls": ["blank"]}}}, "unknown per_stage.class.controls"),
    ({"optim": {"fourier_lr": 0}}, "optim.fourier_lr 0 must be a number > 0"),
    ({"optim": {"robustness": 9}}, "optim.robustness 9 must be a number from 0"),
    ({"optim": {"decay_power": "one"}}, "optim.decay_power 'one'"),
])  # fmt: skip
def test_config_rejects_bad_new_fields(block, message):
    with pytest.raises(UserError, match=message):
        InversionConfig.from_dict(block)


def test_config_stage_settings_override_per_stage():
    cfg = InversionConfig.from_dict({"seeds": [0, 1], "classes": [1, 2], "mimic_classes": [5],
                                     "parameterisations": ["pixels", "phase"],
                                     "per_stage": {"pair": {"seeds": [3], "controls": ["noise"]}}})  # fmt: skip
    assert cfg.stage_settings("pair") == dict(classes=[1, 2], seeds=[3], parameterisations=["pixels", "phase"],
                                              controls=("noise",))  # fmt: skip
    assert cfg.stage_settings("mimic")["classes"] == [5] and cfg.stage_settings("class")["seeds"] == [0, 1]
