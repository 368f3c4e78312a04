"""ONNX export behind the parity gate, the onnxruntime backend, and its registry artifacts."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import cli_env, run_cli
from medcfx.errors import MedcfxError
from medcfx.export import OnnxDenoiser, export_model
from medcfx.nn import UNet
from medcfx.registry import Registry, sha256_file

NET = {"in_channels": 4, "out_channels": 4, "image_size": 16, "model_channels": 8, "channel_mult": [1, 2],
       "num_res_blocks": 1, "attention_resolutions": [8], "dropout": 0.0, "num_head_channels": 8,
       "num_classes": 2, "attention_conditioning": True, "label_tokens": 2, "label_token_dim": 8, "num_groups": 4}


def _register(home, name="tiny", net=NET, method="sanchez"):
    torch.manual_seed(0)
    unet = UNet(net)
    with torch.no_grad():  # zero-initialised output layers would make every comparison trivially 0
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = home / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    reg = Registry(home, bundled=False)
    cfg = {"network": net, "diffusion": {"schedule": "linear", "T": 100},
           "preprocess": {"size": 16}, "explain": {"steps": 6, "noise_level": 0.5, "guidance": 3.0,
                                                  "dn_percentile": 0.99, "batch_size": 4, "eval_size": 16}}
    return reg, reg.register(name, method, {"weights": path}, config=cfg), unet


def test_export_attaches_verified_onnx_with_parity_figures(home):
    reg, entry, unet = _register(home)
    out = export_model(reg, entry.ref, log=lambda *_: None)
    art = out.artifacts["onnx"]
    assert art["sha256"] == sha256_file(reg.artifact_path(out, "onnx"))
    info = out.extra["export"]
    assert info["inputs"] == ["x", "t", "y"] and info["dynamic_batch"] is True
    assert info["parity"]["per_call_max_abs"] < 1e-4 and info["parity"]["counterfactual_heatmap_max_abs"] < 1e-3
    # the session agrees with torch at a batch size never seen during export, with the null label
    den = OnnxDenoiser(reg.artifact_path(out, "onnx"))
    x = torch.randn(5, 4, 16, 16)
    t = torch.tensor([0, 10, 50, 99, 3])
    y = torch.tensor([0, 1, 2, 2, 1])
    np.testing.assert_allclose(den(x, t, {"y": y}).numpy(), unet.eval()(x, t, y).detach().numpy(), atol=1e-4)


def test_export_of_a_network_with_dropout_leaves_it_in_eval_mode_and_passes_the_gate(home, tmp_path):
    """torch.onnx.export restores the mode of the module it is handed; a train-mode wrapper used to switch the
    UNet's dropout back on, so the torch side of every later comparison (and of the caller) was random."""
    from medcfx.export import export_unet

    unet = UNet({**NET, "dropout": 0.3}).eval()
    export_unet(unet, tmp_path / "m.onnx")
    assert not any(m.training for m in unet.modules())
    reg, entry, _ = _register(home, name="dropout", net={**NET, "dropout": 0.3})
    out = export_model(reg, entry.ref, log=lambda *_: None)
    assert out.extra["export"]["parity"]["per_call_max_abs"] < 1e-4


def test_gate_refuses_a_disagreeing_export_and_attaches_nothing(home):
    reg, entry, _ = _register(home)
    with pytest.raises(MedcfxError, match="export refused"):
        export_model(reg, entry.ref, tol_call=1e-12, log=lambda *_: None)
    assert "onnx" not in reg.resolve(entry.ref).artifacts


def test_cli_export_show_and_onnx_backend_matches_torch(home, tmp_path):
    from medcfx.demo import make_demo

    reg, entry, _ = _register(home)
    env = cli_env(home)
    proc = run_cli(["export", entry.ref, "--format", "onnx"], env=env, check=0)
    assert "counterfactual parity" in proc.stdout
    shown = json.loads(run_cli(["models", "show", entry.ref, "--json"], env=env, check=0).stdout)
    assert shown["export"]["parity"]["per_call_max_abs"] < 1e-4 and "onnx" in shown["artifacts"]
    run_cli(["models", "verify", entry.ref], env=env, check=0)
    data = make_demo("brain", tmp_path / "b", cases=1, seed=0, shape=(32, 32, 10), tumour_free_fraction=0.0)
    case = next(p for p in data.iterdir() if p.is_dir())
    import nibabel as nib

    maps = {}
    for name, flags in (("torch", []), ("onnx", ["--backend", "onnx"]), ("bf16", ["--bf16"])):
        run_cli(["explain", case, "--model", entry.ref, "--out", tmp_path / name, "--device", "cpu", *flags],
                env=env, check=0)
        maps[name] = nib.load(str(tmp_path / name / case.name / "heatmap.nii.gz")).get_fdata()
        prov = json.loads((tmp_path / name / case.name / "provenance.json").read_text())
        assert prov["params"]["backend"] == ("onnx" if name == "onnx" else "torch")
        assert prov["params"]["bf16"] is (name == "bf16")
    assert np.abs(maps["torch"]).max() > 0
    np.testing.assert_allclose(maps["onnx"], maps["torch"], atol=1e-3)
    # bf16 autocast changes the numbers a little, not the picture
    assert np.abs(maps["bf16"] - maps["torch"]).mean() < 0.05 and not np.array_equal(maps["bf16"], maps["torch"])


def test_onnx_backend_without_export_and_tampered_onnx_are_refused(home, tmp_path):
    reg, entry, _ = _register(home)
    env = cli_env(home)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(img)
    proc = run_cli(["explain", img, "--model", entry.ref, "--backend", "onnx", "--out", tmp_path / "o"], env=env)
    assert proc.returncode == 2 and "has no ONNX export" in proc.stderr
    entry = export_model(reg, entry.ref, log=lambda *_: None)
    blob = reg.artifact_path(entry, "onnx")
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-5] + b"xxxxx")
    proc = run_cli(["explain", img, "--model", entry.ref, "--backend", "onnx", "--out", tmp_path / "o"], env=env)
    assert proc.returncode == 3 and "sha256" in proc.stderr and not (tmp_path / "o" / "x").exists()


def test_bench_paths_agree_with_the_reference_loop(home):
    """The batched-CFG and channels_last paths compute the authors' two-pass loop's heatmaps."""
    import io

    from rich.console import Console

    from medcfx.bench import SamplingPath, bench, example_batch, run_path
    from medcfx.diffusion import Schedule

    reg, entry, unet = _register(home)
    sched = Schedule.create("linear", 100)
    x = example_batch(unet, 3)
    kw = dict(steps=8, noise_level=0.75, guidance=3.0, dn_percentile=0.99)
    ref = run_path(unet, sched, x, SamplingPath("ref", batched_cfg=False), **kw)
    batched = run_path(unet, sched, x, SamplingPath("batched"), **kw)
    last = run_path(unet, sched, x, SamplingPath("cl", channels_last=True), **kw)
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(batched, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(last, ref, atol=1e-4, rtol=0)  # another summation order, 38 chained calls
    assert next(unet.parameters()).is_contiguous()  # the channels_last path worked on a copy
    out = run_cli(["bench", entry.ref, "--backend", "reference,torch", "--batch", "2", "--steps", "4"],
                  env=cli_env(home), check=0).stdout
    assert "reference (two passes, fp32)" in out and "torch (batched cfg, fp32)" in out
    # --solver reaches the non-reference paths: DPM-Solver++ differs from the DDIM reference loop
    rows = bench(reg, entry.ref, ["reference", "torch"], [2], 12, 1, Console(file=io.StringIO()), solver="dpm++2m")
    assert rows[1]["path"] == "torch (batched cfg, fp32, dpm++2m)" and rows[1]["max_heatmap_diff"] > 1e-3, rows
    same = bench(reg, entry.ref, ["reference", "torch"], [2], 12, 1, Console(file=io.StringIO()))
    assert same[1]["max_heatmap_diff"] < 1e-4
    proc = run_cli(["bench", entry.ref, "--solver", "euler"], env=cli_env(home))
    assert proc.returncode == 2 and "--solver must be one of ddim, dpm++2m, dpm++3m, got 'euler'" in proc.stderr


def test_io_binding_path_gives_the_same_eps_as_the_feed_path(tmp_path):
    """The IO-binding code that serves CUDA tensors, run with CPU tensors through a real session: the same
    names, dtypes (t and y int64), shapes and memory as the GPU path, only the device string differs."""
    from medcfx.export import export_unet

    torch.manual_seed(1)
    unet = UNet(NET).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_unet(unet, tmp_path / "u.onnx")
    den = OnnxDenoiser(tmp_path / "u.onnx")
    x = torch.randn(3, 4, 16, 16)
    t = torch.tensor([0, 40, 99])  # int64 as the samplers pass it
    y = torch.tensor([0, 1, 2])
    fed = den(x, t, {"y": y})
    bound = den._run_bound({"x": x, "t": t.to(torch.int32), "y": y}, x, "cpu")  # int32 t is cast, not misread
    assert bound.shape == x.shape and bound.dtype == x.dtype
    torch.testing.assert_close(bound, fed, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(bound, unet(x, t, y=y), rtol=0, atol=1e-4)


@pytest.mark.parametrize("solver, interval, reuse", [("ddim", (0.0, 1.0), False), ("dpm++2m", (0.3, 1.0), False),
                                                     ("ddim", (0.0, 1.0), True), ("dpm++2m", (0.0, 1.0), True),
                                                     ("dpm++3m", (0.2, 0.8), True)])
def test_forwards_per_slice_counts_what_the_sampling_path_runs(home, solver, interval, reuse):
    """The forward count the benchmarks report equals the samples the UNet actually saw, counted by a
    forward hook, for every lever (solver, guidance interval, reused inversion)."""
    from medcfx.bench import SamplingPath, example_batch, forwards_per_slice, run_path
    from medcfx.diffusion import Schedule

    _, _, unet = _register(home)
    seen = []
    unet.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    sched = Schedule.create("linear", 100)
    x = example_batch(unet, 2)
    path = SamplingPath("p", solver=solver, guidance_interval=interval, reuse_inversion=reuse)
    run_path(unet, sched, x, path, steps=12, noise_level=0.75)
    assert sum(seen) / 2 == forwards_per_slice(sched, 12, 0.75, True, interval, reuse, solver)
