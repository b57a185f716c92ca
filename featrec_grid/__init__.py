"""featrec_grid: what do a classifier's logits still know about its features and its input?

Public API (imported lazily so `featrec-grid --help` stays fast):
    load_spec, run_grid, plan_grid     specs, the grid's task graph (no Ray) and running it
    Store, load_split                  the Arrow shard store
    fit_ridge, fit_sgd, LinearMap, Moments, RidgeSolver   linear maps
    DualSolver, fit_ridge_dual         ridge in the dual form (more classes than rows)
    fit_mlp, MLPConfig                 a nonlinear map, to tell linearity from the logits' limits
    head_analysis                      why self-reconstruction succeeds or fails for a head (W, b)
    pair_metrics, PairMetrics          reconstruction metrics
    CKA, linear_cka, kernel_cka        representation similarity
    cka_from_features                  layer CKA of pre-extracted features
    model_similarity                   mutual kNN, CKNNA, debiased/RBF CKA, SVCCA for all model pairs
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_spec": "spec",
    "GridSpec": "spec",
    "run_grid": "grid",
    "plan_grid": "plan",
    "Store": "store",
    "load_split": "store",
    "fit_ridge": "linmap",
    "fit_sgd": "linmap",
    "LinearMap": "linmap",
    "Moments": "linmap",
    "RidgeSolver": "linmap",
    "DualSolver": "linmap",
    "fit_ridge_dual": "linmap",
    "fit_mlp": "mlpmap",
    "MLPConfig": "mlpmap",
    "head_analysis": "heads",
    "pair_metrics": "metrics",
    "PairMetrics": "metrics",
    "CKA": "cka",
    "linear_cka": "cka",
    "kernel_cka": "cka",
    "cka_from_features": "cka",
    "model_similarity": "similarity",
    "UserError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'featrec_grid' has no attribute {name!r}")
