"""Inverting logits back to images: optimisation (seed 003) and a logit-conditioned decoder (seed 004), with controls."""

from featrec_grid.invert.decoder import DecoderConfig, LogitDecoder, build_decoder, fit_decoder
from featrec_grid.invert.experiments import OptimSettings
from featrec_grid.invert.fourier import FourierImage
from featrec_grid.invert.gallery import gallery_html, results_table, save_grid
from featrec_grid.invert.maco import PhaseImage
from featrec_grid.invert.manipulate import manipulate, manipulation_grid
from featrec_grid.invert.measures import class_prob, logit_distance, psnr, retrieval_top1, ssim
from featrec_grid.invert.optimise import (
    InversionResult,
    Objective,
    class_objective,
    combined_objective,
    difference_objective,
    invert,
    invert_many,
    match_objective,
    target_logits,
    untrained_copy,
)
from featrec_grid.invert.paramopt import invert_spectral
from featrec_grid.invert.robust import Robustness
from featrec_grid.invert.run import InversionConfig, run_inversion
from featrec_grid.invert.transfer import judge_images

__all__ = [
    "FourierImage", "PhaseImage", "Robustness", "invert_spectral", "judge_images",
    "DecoderConfig", "InversionConfig", "InversionResult", "LogitDecoder", "Objective", "OptimSettings",
    "build_decoder", "class_objective", "class_prob", "combined_objective", "difference_objective", "fit_decoder",
    "gallery_html", "invert", "invert_many", "logit_distance", "manipulate", "manipulation_grid", "match_objective",
    "psnr", "results_table", "retrieval_top1", "run_inversion", "save_grid", "ssim", "target_logits", "untrained_copy",
]  # fmt: skip
