"""medcfx plugin ``diffae``: diffusion-autoencoder counterfactuals for classification and grading
(Atad et al. 2024, "Counterfactual explanations for medical image classification and regression using
diffusion autoencoder"; see docs/methods/diffae.md).

Methods registered:

- ``diffae``: the autoencoder. ``train`` (unsupervised, ``--data images/``), ``explain`` (reconstruction
  with ``--reconstruct``, binary counterfactual with a grader) and ``evaluate`` (detection / grading /
  reconstruction against a supervised CNN baseline trained inside the evaluation).
- ``diffae-grader``: linear classifiers + grade calibration on z_sem. ``train`` (``--model AE --data
  labelled/``) and ``grade`` (``medcfx grade IMAGE``; the bundled ``diffae-grader-demo`` by default).
"""

from __future__ import annotations

from medcfx import hookimpl
from medcfx.method import Method, Option

from medcfx_diffae.configs import (
    DEMO_ENCODER,
    DEMO_NETWORK,
    GRADER_METHOD,
    INVERSION_LIMIT,
    METHOD,
    PAPER_ENCODER,
    PAPER_NETWORK,
)

DEFAULTS = {
    "network": PAPER_NETWORK,
    "encoder": PAPER_ENCODER,
    "diffusion": {"schedule": "linear", "T": 1000},
    "train": {"steps": 187500, "batch_size": 64, "lr": 1e-4, "weight_decay": 0.0, "ema_decay": 0.9999,
              "ema_warmup": False, "grad_clip": 1.0, "bf16": False, "warmup_steps": 0, "log_every": 100,
              "ckpt_every": 5000},
    "preprocess": {"size": 96, "percentile": 99.0, "clip": True, "image_channels": 1, "intensity": "percentile"},
    # DDIM step counts of the stochastic encoder (inversion) and the decoder (Atad et al. sec. 4.2)
    "sample": {"encode_steps": 250, "decode_steps": 100},
    "presets": {
        "paper": {},
        "demo": {
            "network": DEMO_NETWORK,
            "encoder": DEMO_ENCODER,
            # EMA warm-up: with a fixed 0.999 a short run's EMA weights keep 0.999^steps of the random
            # initialisation (13.5 % after 2,000 steps), which left the first demo model unable to use z_sem.
            # 6,000 steps (~45 min on 2 cores) check that training works; the bundled diffae-demo:3 is this
            # preset with train.steps=20000, where z_sem decides the decoded image (docs/methods/diffae.md)
            "train": {"steps": 6000, "batch_size": 16, "lr": 3e-4, "ema_decay": 0.999, "ema_warmup": True,
                      "warmup_steps": 100, "log_every": 50, "ckpt_every": 500},
            "preprocess": {"size": 48},
        },
    },
}

GRADER_DEFAULTS = {
    "grader": {
        "label": "",  # binary label column for rows without a grade ('' = the first label column)
        "positive_grades": [2, 3],
        "negative_grades": [0],
        "ungraded_positive": False,
        "calibration_grades": [],  # [] = every graded row
        "degree": 1,
        # C of the linear classifiers: a number, or "cv" (5-fold AUROC over 1e-4..1, one-standard-error rule)
        "svm_C": "cv",
        "logreg_C": "cv",
        "class_weight": "balanced",
    },
}


def _methods():
    from medcfx_diffae.commands import AESampler, AEScorer, GraderSampler
    from medcfx_diffae.grader import GraderTrainer
    from medcfx_diffae.trainer import Trainer

    steps = [
        Option("encode_steps", int, 0, "DDIM inversion steps to x_T (0: the model's default, paper 250)",
               bounds="[0, inf)"),
        Option("decode_steps", int, 0, "DDIM decoding steps (0: the model's default, paper 100)",
               bounds="[0, inf)"),
    ]
    limit = Option("inversion_limit", float, INVERSION_LIMIT,
                   "self-check limit: mean |input - reconstruction| (intensity 0-1) above which a case is flagged",
                   bounds="(0, inf)")
    ae = Method(
        name=METHOD,
        summary="diffusion autoencoder (semantic z_sem + stochastic x_T); reconstruction, latent counterfactuals",
        capabilities={"train", "explain", "evaluate"},
        trainer=Trainer(), sampler=AESampler(), scorer=AEScorer(),
        input_channels=(), conditioning=("semantic",), targets=(),
        options={
            "explain": [Option("reconstruct", bool, False, "write the reconstruction and its error"),
                        Option("grader", str, "", "grader for a binary counterfactual (default: none, or the "
                                                   "--model itself when it is a grader)"),
                        Option("classifier", str, "", "hyperplane: svm or logreg (default: the grader's)",
                               choices=("", "svm", "logreg")), *steps, limit],
            "evaluate": [Option("grader", str, "", "grader to evaluate (default: --model if it is a grader, else "
                                                   "the latest grader of that autoencoder)"),
                         Option("train_data", str, "", "labelled data for the CNN baseline (default: the "
                                                       "grader's training data)"),
                         Option("baseline", bool, True, "train and evaluate the supervised CNN baseline"),
                         Option("baseline_steps", int, 600, "training steps of the CNN baseline", bounds="[1, inf)"),
                         Option("recon_images", int, 16, "test images whose encode-decode error (the inversion "
                                                             "self-check) and reflection flip are measured",
                                bounds="[0, inf)"),
                         *steps, limit],
        },
        defaults=DEFAULTS,
        deterministic={"explain": "the diffae counterfactual is deterministic (DDIM inversion and decoding)"},
    )
    grader = Method(
        name=GRADER_METHOD,
        summary="linear SVM / logistic regression on diffae z_sem + grade calibration; grade counterfactuals",
        capabilities={"train", "grade"},
        trainer=GraderTrainer(), sampler=GraderSampler(),
        input_channels=(), conditioning=("semantic",), targets=(),
        options={
            "train": [Option("model", str, "", "the diffusion autoencoder (registry reference)")],
            "grade": [Option("classifier", str, "", "hyperplane: svm or logreg (default: the grader's)",
                             choices=("", "svm", "logreg")),
                      Option("grades", list, [], "target grades of the strip (default: the calibrated range)"),
                      *steps, limit],
        },
        defaults=GRADER_DEFAULTS,
        deterministic={"grade": "diffae grading is deterministic (DDIM inversion and decoding)"},
    )
    return ae, grader


@hookimpl
def register_methods(register):
    for m in _methods():
        register(m)
