"""Linear Gram matrices x x^T of one batch as a symmetric rank-k update (BLAS ?syrk): half the multiply-adds of
x @ x.T, because only one triangle of a symmetric product is computed.

torch exposes no syrk, but its x86 CPU builds link Intel MKL statically and export MKL's own `mkl_blas_ssyrk` /
`mkl_blas_dsyrk` (the routines behind BLAS ssyrk_/dsyrk_, Fortran calling convention), which run on torch's
OpenMP threads. They are found with ctypes, checked once on a small product against x @ x.T, and used for
contiguous float32/float64 CPU inputs; anything else (CUDA, other BLAS builds, a failed check, or
FEATREC_GRID_SYRK=0 in the environment) takes x @ x.T. Measured on this project's 2-core CPU: 0.65-0.70x the time
of torch's sgemm for [256, 1024..16384] float32 inputs."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

import torch

_ROUTINES = {torch.float32: ("mkl_blas_ssyrk", ctypes.c_float), torch.float64: ("mkl_blas_dsyrk", ctypes.c_double)}


def _bind(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """MKL's syrk for `dtype` as f(x [n, d] contiguous, out [n, n] contiguous) writing the lower triangle of
    x x^T into out (in row-major terms), or None where torch has none to offer."""
    if os.environ.get("FEATREC_GRID_SYRK", "1") == "0" or not torch.backends.mkl.is_available():
        return None
    name, scalar = _ROUTINES[dtype]
    try:
        routine = getattr(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")), name)
    except (OSError, AttributeError):
        return None
    routine.restype = None
    one, zero, uplo, trans = scalar(1.0), scalar(0.0), ctypes.c_char_p(b"U"), ctypes.c_char_p(b"T")

    def syrk(x: torch.Tensor, out: torch.Tensor) -> None:
        # row-major x [n, d] is column-major x^T [d, n]; C = (x^T)^T x^T with uplo U (column-major) is the
        # row-major lower triangle. 64-bit integers read right under both MKL's LP64 and ILP64 interfaces (little
        # endian, sizes < 2^31); the two trailing 1s are the Fortran lengths of the uplo and trans strings.
        n, d = (ctypes.c_int64(s) for s in x.shape)
        routine(uplo, trans, ctypes.byref(n), ctypes.byref(d), ctypes.byref(one), ctypes.c_void_p(x.data_ptr()),
                ctypes.byref(d), ctypes.byref(zero), ctypes.c_void_p(out.data_ptr()), ctypes.byref(n), 1, 1)  # fmt: skip

    x = torch.randn(6, 11, dtype=dtype, generator=torch.Generator().manual_seed(0))
    out = torch.full((6, 6), 7.0, dtype=dtype)
    syrk(x, out)
    lower = torch.ones(6, 6, dtype=torch.bool).tril()
    expected = torch.where(lower, x @ x.T, torch.full_like(out, 7.0))
    return syrk if torch.allclose(out, expected, rtol=1e-5, atol=1e-5) else None


_syrk = functools.lru_cache(maxsize=None)(_bind)


def lower_gram(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the lower triangle of x @ x.T (diagonal included) into `out` [n, n] and return it; x is [n, d] of
    out's dtype and device. `out` must be zero above the diagonal (a zero-filled buffer, reused) and stays so:
    it is the lower-triangular L with x x^T = L + L^T - diag(L)."""
    n, d = x.shape
    if out.shape != (n, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"lower_gram: out must be [{n}, {n}] {x.dtype} on {x.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")  # fmt: skip
    syrk = _syrk(x.dtype) if x.device.type == "cpu" and x.dtype in _ROUTINES else None
    if syrk is not None and 0 < d < 2**31 and x.is_contiguous() and out.is_contiguous():  # BLAS needs lda >= 1
        syrk(x, out)
    else:
        torch.tril(x @ x.T, out=out)
    return out
