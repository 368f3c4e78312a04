"""Data plumbing: the preprocessed training set, single input images, latents, the stored models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medcfx.data import PreprocessConfig, SliceGeometry, prepare
from medcfx.data.io import IMAGE_SUFFIXES, is_image_file
from medcfx.errors import MedcfxError, UsageError
from medcfx.loading import load_state

from medcfx_mediffusion.autoencoder import KLAutoencoder
from medcfx_mediffusion.joint import build_joint


def preprocess_config(cfg: dict) -> PreprocessConfig:
    return PreprocessConfig(size=int(cfg["size"]), image_channels=cfg.get("image_channels"),
                            intensity=cfg.get("intensity", "percentile"))


def stored_preprocess(d: dict) -> PreprocessConfig:
    """The preprocessing a model entry stores (its config's ``preprocess``)."""
    return PreprocessConfig.from_dict(d)


def load_dataset(path: Path, pp: PreprocessConfig):
    """The cached SliceSet of a dataset (2D images only)."""
    ss = prepare(path, pp)
    if ss.dims != 2:
        raise MedcfxError(f"--data {path}: mediffusion works on 2D images; this dataset holds {ss.dims}D volumes")
    return ss


def train_rows(ss) -> np.ndarray:
    """Rows used for training: every row whose split is not 'test' (all rows when there is no split)."""
    return np.flatnonzero(np.asarray(ss.split) != "test")


def eval_rows(ss) -> np.ndarray:
    """Rows used for evaluation: the 'test' split when the dataset has one, else every row."""
    test = np.flatnonzero(np.asarray(ss.split) == "test")
    return test if len(test) else np.arange(len(ss))


def images_tensor(ss, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(ss.images[np.asarray(rows)]), dtype=np.float32))


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Image files, with folders replaced by the image files they hold (sorted)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise UsageError(f"input {p}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        else:
            out.append(p)
    return out


def read_input(path: Path, pp: PreprocessConfig, channels: int, log=None) -> tuple[torch.Tensor, SliceGeometry]:
    """One 2D image -> (x float32 [1, C, S, S] in [-1, 1], geometry), read and scaled as every command reads
    a 2D image (:func:`medcfx.inputs.load_image`: the model's recorded intensity rule, grey <-> RGB by luma);
    ``log`` gets one line per note of the reader."""
    from medcfx.inputs import load_image

    case = load_image(Path(path), pp, channels, log=log)
    return torch.from_numpy(np.ascontiguousarray(case.images, dtype=np.float32)), case.result.geometry


# ---------------------------------------------------------------------------------------------- models


class LatentCodec:
    """E and D of a registered autoencoder with its latent scale: ``encode(x) = s * mu(x)``,
    ``decode(z) = D(z / s)``."""

    def __init__(self, ae: KLAutoencoder, scale_factor: float) -> None:
        self.ae = ae.eval()
        self.scale = float(scale_factor)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
        self.ae.check_input(x)
        return torch.cat([self.ae.encoder(x[i:i + batch])[0] for i in range(0, len(x), batch)]) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = 64) -> torch.Tensor:
        return torch.cat([self.ae.decoder(z[i:i + batch] / self.scale) for i in range(0, len(z), batch)])


def load_codec(registry, entry, role: str, ae_cfg: dict, device: str = "cpu") -> LatentCodec:
    ae = KLAutoencoder(ae_cfg["network"])
    load_state(ae, registry.load_tensors(entry, role), f"{entry.ref} ({role})")
    return LatentCodec(ae.to(device), ae_cfg["scale_factor"])


def resolve_ae(registry, ref: str):
    """The autoencoder entry named by --ae (an error that says how to make one when there is none); the
    default name falls back to the bundled 'mediffusion-ae-demo'."""
    if ref == "mediffusion-ae":
        try:
            ref = default_model(registry, ("mediffusion-ae", "mediffusion-ae-demo"))
        except MedcfxError:
            pass
    try:
        entry = registry.resolve(ref)
    except MedcfxError:
        raise MedcfxError(f"--ae {ref}: no such autoencoder in the registry; train one first with "
                          f"'medcfx train mediffusion-ae --data IMAGES/' (or pass --ae NAME[:VERSION])") from None
    if entry.method != "mediffusion-ae":
        raise MedcfxError(f"--ae {ref}: {entry.ref} is a '{entry.method}' model, not a mediffusion-ae autoencoder")
    return entry


DEFAULT_MODELS = ("mediffusion", "mediffusion-demo")


def default_model(registry, names=DEFAULT_MODELS) -> str:
    """The first of ``names`` the registry knows (your own 'mediffusion', else the bundled demo)."""
    for name in names:
        try:
            registry.resolve(name)
            return name
        except MedcfxError:
            continue
    raise MedcfxError(f"no mediffusion model in the registry (looked for {', '.join(names)}); train one with "
                      f"'medcfx train mediffusion --data DATA' or pass --model REF")


def load_joint(registry, ref: str | None, device: str = "cpu"):
    """(JointModel, LatentCodec, entry) of a mediffusion model (default: 'mediffusion', else the bundled
    'mediffusion-demo')."""
    entry = registry.resolve(ref or default_model(registry))
    if entry.method != "mediffusion":
        raise MedcfxError(f"--model {entry.ref} is a '{entry.method}' model, not a mediffusion model")
    cfg = entry.config
    model = build_joint(cfg["network"], cfg["classifier"], len(cfg["classifier"]["findings"]))
    load_state(model.unet, registry.load_tensors(entry, "weights"), f"{entry.ref} (weights)")
    load_state(model.head, registry.load_tensors(entry, "head"), f"{entry.ref} (head)")
    codec = load_codec(registry, entry, "ae", cfg["ae"], device)
    return model.to(device).eval(), codec, entry
