"""The two medcfx methods of this plugin: ``mediffusion-ae`` (the latent autoencoder) and ``mediffusion``
(the joint diffusion classifier: train, predict, evaluate, calibrate, explain, sample).

This module registers them and holds their thin components; the work is done in
``train.py`` (train), ``sampling.py`` (explain, sample) and ``scoring.py`` (predict, evaluate, calibrate), with the
settings in ``config.py``."""

from __future__ import annotations

import copy

from medcfx.method import Method, Option

from medcfx_mediffusion import quality as cq
from medcfx_mediffusion.config import AE_DEFAULTS, AE_PRESETS, CF_IMAGES, DEFAULTS, PRESETS
from medcfx_mediffusion.sampling import explain, sample
from medcfx_mediffusion.scoring import calibrate, evaluate, evaluate_autoencoder, predict
from medcfx_mediffusion.train import train_autoencoder, train_joint

# ------------------------------------------------------------------------------------------ components


class AETrainer:
    def train(self, request) -> dict:
        return train_autoencoder(request)


class AEScorer:
    def evaluate(self, request) -> dict:
        return evaluate_autoencoder(request)


class JointTrainer:
    def train(self, request) -> dict:
        return train_joint(request)


class JointSampler:
    def explain(self, request) -> dict:
        return explain(request)

    def sample(self, request) -> dict:
        return sample(request)


class JointScorer:
    def predict(self, request) -> dict:
        return predict(request)

    def evaluate(self, request) -> dict:
        return evaluate(request)

    def calibrate(self, request) -> dict:
        return calibrate(request)


# ------------------------------------------------------------------------------------------ registration

INVERSION_OPTION = Option("inversion_limit", float, cq.INVERSION_LIMIT,
                          "self-check limit: mean |input - unguided reconstruction| (intensity 0-1) above which "
                          "a case is flagged", bounds="(0, inf)")
TARGET_HELP = "<finding> adds it, no-<finding> removes it; comma-separated for several (e.g. no-cardiomegaly,no-effusion)"


def _sampling_options() -> list[Option]:
    """The counterfactual settings shared by explain and calibrate (a threshold holds for the maps of its
    settings)."""
    return [
        Option("target", list, [], TARGET_HELP),
        Option("t", int, None, "noise the latent to this timestep (default 300 to remove, 200 to add)",
               bounds="[1, inf)"),
        Option("scale", float, None, "guidance scale for every target (default 500 to remove, 200 to add)",
               bounds="[0, inf)"),
        Option("steps", str, None, "reverse steps from t to 0: a number or 'all' (default all)"),
        Option("sampler", str, None, "ddpm (ancestral, default) or ddim", choices=("ddpm", "ddim")),
    ]


def methods() -> list[Method]:
    ae_defaults = copy.deepcopy(AE_DEFAULTS)
    ae_defaults["presets"] = copy.deepcopy(AE_PRESETS)
    defaults = copy.deepcopy(DEFAULTS)
    defaults["presets"] = copy.deepcopy(PRESETS)
    return [
        Method(
            name="mediffusion-ae",
            summary="KL autoencoder for mediffusion's latent space (L1 + SSIM + small KL, optional patch GAN)",
            capabilities={"train", "evaluate"},
            trainer=AETrainer(), scorer=AEScorer(), input_channels=(1, 3), defaults=ae_defaults,
            deterministic={"evaluate": "mediffusion-ae evaluate decodes the posterior mean (deterministic)"},
        ),
        Method(
            name="mediffusion",
            summary="joint latent diffusion classifier (Kaleta et al. 2025): semi-supervised, self-explaining",
            capabilities={"train", "explain", "sample", "predict", "evaluate", "calibrate"},
            trainer=JointTrainer(), sampler=JointSampler(), scorer=JointScorer(), input_channels=(1, 3),
            conditioning=("classifier",), targets=("<finding>", "no-<finding>"), defaults=defaults,
            deterministic={"predict": "mediffusion classifies the clean latent (deterministic)"},
            options={
                "train": [
                    Option("label_fraction", float, 1.0, "share of the labelled images whose labels are used (0-1]",
                           bounds="(0, 1]"),
                    Option("label_seed", int, 0, "seed of the (nested) label subsampling"),
                    Option("ae", str, "mediffusion-ae", "registry reference of the trained autoencoder"),
                ],
                "explain": [
                    *_sampling_options(),
                    Option("self_check", bool, True, "inversion self-check: the same chain unguided, its error "
                                                     "reported and the case flagged above --inversion-limit "
                                                     "(--self-check=false skips it, about a third of the time)"),
                    INVERSION_OPTION,
                    Option("operating_point", str, None, "calibrated threshold for mask.png: fpr<N> (default) or "
                                                         "valDice (needs `medcfx calibrate` for the same target)"),
                ],
                "calibrate": [
                    *_sampling_options(),
                    Option("cf_images", int, 64, "at most this many validation images (each one guided reverse "
                                                 "chain); 0: all", bounds="[0, inf)"),
                ],
                "evaluate": [
                    Option("cf_images", int, CF_IMAGES, "test images with a counterfactual quality check (0: "
                                                        "none); each runs a guided and an unguided reverse chain "
                                                        "(explain.* settings)", bounds="[0, inf)"),
                    Option("cf_target", list, [], "target(s) of the quality check (default no-<first finding>)"),
                    INVERSION_OPTION,
                    Option("localise_images", int, 0, "score the difference maps of the calibrated target on this "
                                                      "many test images against their boxes (pixel AP, Dice at the "
                                                      "calibrated thresholds, ...; needs `medcfx calibrate`; one "
                                                      "guided reverse chain each)", bounds="[0, inf)"),
                ],
                "sample": [
                    Option("target", list, [], TARGET_HELP + "; none: unguided"),
                    Option("scale", float, None, "guidance scale (default 300)", bounds="[0, inf)"),
                    Option("steps", str, None, "reverse steps from T to 0 (default 250; the paper: DDIM 50)"),
                    Option("sampler", str, None, "ddpm (ancestral, default) or ddim (the paper's)", choices=("ddpm", "ddim")),
                ],
            },
        ),
    ]
