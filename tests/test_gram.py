"""lower_gram: the lower triangle of x x^T from MKL's syrk inside torch, or from x @ x.T, checked against numpy."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from featrec_grid import gram
from featrec_grid.gram import lower_gram


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_lower_gram_is_the_lower_triangle_of_x_xt(dtype, contiguous):
    rng = np.random.default_rng(0)
    base = torch.tensor(rng.normal(size=(37, 530)) + 3.0, dtype=dtype)
    x = base if contiguous else base[:, ::2]  # a strided view takes the x @ x.T path
    out = torch.zeros(37, 37, dtype=dtype)
    assert lower_gram(x, out) is out
    reference = np.asarray(x, dtype=np.float64)
    reference = np.tril(reference @ reference.T)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(out.numpy(), reference, rtol=rtol, atol=rtol * np.abs(reference).max())
    assert not out.triu(1).any()  # zero above the diagonal, as passed in


@pytest.mark.skipif(
    not (torch.backends.mkl.is_available() and platform.machine() == "x86_64" and platform.system() == "Linux"),
    reason="the syrk fast path exists only in torch's MKL builds for x86-64 Linux",
)
def test_mkl_syrk_is_found_and_leaves_the_upper_triangle_alone():
    syrk = gram._syrk(torch.float32)
    assert syrk is not None
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    out = torch.full((5, 5), -1.0)
    syrk(x, out)
    lower = torch.ones(5, 5, dtype=torch.bool).tril()
    np.testing.assert_allclose(out[lower].numpy(), (x @ x.T)[lower].numpy(), rtol=1e-6)
    assert (out[~lower] == -1.0).all()


def test_no_features_give_a_zero_gram():
    out = torch.zeros(4, 4)
    assert not lower_gram(torch.ones(4, 0), out).any()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("FEATREC_GRID_SYRK", "0")
    assert gram._bind(torch.float32) is None


def test_out_of_the_wrong_shape_or_dtype_is_refused():
    x = torch.ones(4, 3)
    with pytest.raises(ValueError, match=r"out must be \[4, 4\] torch.float32"):
        lower_gram(x, torch.zeros(4, 4, dtype=torch.float64))
