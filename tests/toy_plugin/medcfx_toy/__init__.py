"""A third-party-style toy method used by the tests: a tiny unconditional DDPM on an .npy image stack.

It is deliberately written only against medcfx's public contracts (hookimpl, Method, Request, fit,
Registry, UNet, Schedule, the core samplers), as an outside plugin author would.
"""

from pathlib import Path

import numpy as np

from medcfx import hookimpl
from medcfx.method import Method, Option

NETWORK = dict(in_channels=1, out_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_head_channels=16, num_groups=8)
DEFAULTS = {
    "network": NETWORK,
    "diffusion": {"schedule": "linear", "T": 100},
    "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "log_every": 1, "ckpt_every": 5},
    "sample": {"steps": "ddim10"},
}


class Trainer:
    def train(self, request):
        import torch

        from medcfx.diffusion import Schedule
        from medcfx.diffusion.losses import eps_loss
        from medcfx.nn import UNet
        from medcfx.train import TrainConfig, fit, register_fit, start_run, uniform_batches

        data = torch.from_numpy(np.load(request.data, allow_pickle=False)).float()
        cfg = request.config
        torch.manual_seed(request.seed)
        model = UNet.from_config(cfg["network"])
        schedule = Schedule.create(cfg["diffusion"]["schedule"], cfg["diffusion"]["T"])
        run = start_run(request, Path(request.data).stem)
        slow = request.options["slow"]

        def loss_fn(net, batch):
            if slow:
                import time

                time.sleep(slow)
            return eps_loss(net, data[batch.indices], schedule, batch), {}

        result = fit(model, loss_fn, uniform_batches(len(data)), TrainConfig.from_dict(cfg["train"]), run,
                     seed=request.seed, device=request.device, resume=request.resume, progress=False)
        dump = request.options["dump_rank_weights"]
        if dump:
            import os

            from safetensors.torch import save_file

            Path(dump).mkdir(parents=True, exist_ok=True)
            save_file(model.state_dict(), str(Path(dump) / f"rank{os.environ.get('RANK', '0')}.safetensors"))
        if run is None:  # not the main process
            return {"printed": True}
        entry = register_fit(request, result, "toy", config={"network": cfg["network"], "diffusion": cfg["diffusion"]},
                             metrics={"final_loss": result.final_loss})
        return {"model": entry.ref, "run": str(run)}


class Sampler:
    def sample(self, request):
        import torch

        from medcfx.diffusion import Schedule, TorchDenoiser, sample
        from medcfx.loading import load_unet

        model, entry = load_unet(request.registry, request.model or "toy")
        d = entry.config["diffusion"]
        schedule = Schedule.create(d["schedule"], d["T"])
        g = torch.Generator().manual_seed(request.seed)
        n = request.extra["n"]
        x = sample(TorchDenoiser(model), (n, 1, 8, 8), schedule.respace(request.options["steps"]), generator=g)
        request.out.mkdir(parents=True, exist_ok=True)
        np.save(request.out / "samples.npy", x.numpy())
        return {"samples": str(request.out / "samples.npy"), "model": entry.ref}


@hookimpl
def register_methods(register):
    register(Method(
        name="toy", summary="tiny unconditional DDPM (test plugin)", capabilities={"train", "sample"},
        trainer=Trainer(), sampler=Sampler(), input_channels=(1,), defaults=DEFAULTS,
        options={"train": [Option("slow", float, 0.0, "sleep this long per step (tests)"),
                           Option("dump_rank_weights", str, "", "each process saves its weights here (tests)")],
                 "sample": [Option("steps", str, "ddim10", "respacing of the sampler")]},
    ))


@hookimpl
def register_commands(app):
    @app.command(name="toy-hello")
    def toy_hello(name: str = "world"):
        """Say hello (proves plugins can add CLI commands)."""
        print(f"hello {name} from toy")
