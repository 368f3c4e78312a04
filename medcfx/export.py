"""ONNX export of a registered denoiser, behind a parity gate, and the onnxruntime denoiser backend.

``export_model(registry, ref)`` exports the UNet of a registry entry with named inputs (x, t as int64, then
y / cond_image / z_sem as the network has them) and a dynamic batch axis, then refuses the result unless,
with the real weights,

1. per call: max |eps_onnx - eps_torch| < ``tol_call`` (1e-4) at several timesteps, with labels, the null
   label and random conditioning, at batch 1 and 3; and
2. end to end: a full counterfactual (DDIM encode L of N steps, guided decode; the entry's own sampling
   settings) through both backends gives heatmaps |x - x_cf| (channel mean) within ``tol_map`` (1e-3).

Only then are the .onnx file (and an external-data file if onnx wrote one) added to that model version as
artifacts (sha256-verified like every artifact), with the achieved tolerances under ``export`` in the entry.
A bundled model is read-only: it is copied into the user's store first (:func:`store_copy`: the next
version of its name, same verified artifacts, ``parent`` = the bundled version), and the ONNX file is
attached to that copy, which ``--model NAME`` then resolves to (the latest version).

``OnnxDenoiser`` implements the denoiser contract with an onnxruntime session: the CUDA execution provider
with IO binding when onnxruntime-gpu and a GPU are present, else the CPU provider.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from medcfx.errors import MedcfxError, UsageError

TOL_CALL = 1e-4
TOL_MAP = 1e-3


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MedcfxError("the ONNX backend needs onnxruntime: pip install 'medcfx[onnx]' (or 'medcfx[gpu]')") from None
    return onnxruntime


def providers(device: str = "auto") -> list[str]:
    """CUDA (with CPU fallback) when asked or available, else CPU."""
    ort = _ort()
    have = ort.get_available_providers()
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        raise UsageError("--backend onnx on cuda needs onnxruntime-gpu (pip install 'medcfx[gpu]')")
    return ["CPUExecutionProvider"]


class OnnxDenoiser:
    """``denoiser(x, t, cond) -> eps`` through an onnxruntime session of an exported UNet."""

    def __init__(self, model: str | Path | bytes, device: str = "cpu", threads: int | None = None):
        """``model``: a path, or the serialized model itself (what :func:`verified_onnx_bytes` returns, so
        that the bytes that run are the bytes that were hashed)."""
        ort = _ort()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            source = model if isinstance(model, bytes) else str(model)
            self.session = ort.InferenceSession(source, sess_options=opts, providers=providers(device))
        except Exception as exc:  # onnxruntime raises its own exception types
            shown = "(in memory)" if isinstance(model, bytes) else model
            raise MedcfxError(f"cannot load ONNX model {shown}: {str(exc).splitlines()[0]}") from None
        self.names = [i.name for i in self.session.get_inputs()]
        self.cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        cond = dict(cond or {})
        values = {"x": x, "t": t, **cond}
        missing = [n for n in self.names if n not in values]
        if missing:
            raise UsageError(f"the ONNX model needs inputs {missing} that the sampler did not give")
        if self.cuda and x.is_cuda:
            return self._run_bound(values, x, "cuda")
        feed = {}
        for n in self.names:
            v = values[n].detach()
            feed[n] = v.to("cpu", torch.int64 if n in ("t", "y") else torch.float32).numpy()
        (eps,) = self.session.run(["eps"], feed)
        return torch.from_numpy(eps).to(x.device, x.dtype)

    def _run_bound(self, values, x, device_type: str):
        """IO binding: onnxruntime reads the inputs from and writes eps into torch's own memory (no copies).
        Used with "cuda" (tensors stay on the GPU); the tests run the same code with "cpu" tensors."""
        binding = self.session.io_binding()
        keep = []
        for n in self.names:
            v = values[n].detach().contiguous()
            v = v.to(torch.int64) if n in ("t", "y") else v.to(torch.float32)
            keep.append(v)
            binding.bind_input(n, device_type, v.device.index or 0, np.int64 if n in ("t", "y") else np.float32,
                               tuple(v.shape), v.data_ptr())
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        binding.bind_output("eps", device_type, out.device.index or 0, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out.to(x.dtype)


def export_unet(unet, path: Path, opset: int = 17, dynamic_batch: bool = True) -> list[str]:
    """Write ``unet`` as ONNX at ``path`` (legacy TorchScript exporter: fast and robust for this graph)."""
    from medcfx.nn.unet import UNetForExport

    names, example = unet.onnx_inputs(1)
    axes = {n: {0: "batch"} for n in [*names, "eps"]} if dynamic_batch else None
    import warnings

    # torch.onnx.export puts the module it is given back into that module's own mode afterwards, recursively:
    # the wrapper must be in eval mode too, or the UNet comes back in train mode (dropout on)
    was_training = unet.training
    wrapper = UNetForExport(unet).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about shape-dependent Python values in GroupNorm
            torch.onnx.export(wrapper, example, str(path), input_names=names, output_names=["eps"],
                              opset_version=opset, dynamic_axes=axes, dynamo=False)
    finally:
        unet.train(was_training)
    return names


def _cond_for(unet, batch: int, g: torch.Generator, label: int | None = None) -> dict:
    cfg = unet.config
    cond = {}
    if cfg.num_classes:
        cond["y"] = (torch.full((batch,), label, dtype=torch.long) if label is not None
                     else torch.arange(batch, dtype=torch.long) % (cfg.num_classes + 1))
    if cfg.cond_image_channels:
        cond["cond_image"] = torch.rand(batch, cfg.cond_image_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    if cfg.z_sem_dim:
        cond["z_sem"] = torch.randn(batch, cfg.z_sem_dim, generator=g)
    return cond


def parity_per_call(unet, onnx_den, T: int, batches=(1, 3)) -> float:
    """Max |eps_onnx - eps_torch| over several timesteps, batch sizes and conditionings."""
    from medcfx.diffusion import TorchDenoiser

    torch_den = TorchDenoiser(unet)
    g = torch.Generator().manual_seed(0)
    s, c = unet.config.image_size, unet.config.in_channels
    worst = 0.0
    for b in batches:
        for t in (0, T // 4, T // 2, T - 1):
            x = torch.randn(b, c, s, s, generator=g)
            tt = torch.full((b,), t, dtype=torch.long)
            cond = _cond_for(unet, b, g)
            worst = max(worst, float((onnx_den(x, tt, cond) - torch_den(x, tt, cond)).abs().max()))
    return worst


def parity_counterfactual(unet, onnx_den, schedule, steps: int = 100, noise_level: float = 0.75,
                          guidance: float = 3.0, dn_percentile: float = 0.99) -> float:
    """Max heatmap difference of one full counterfactual (encode null / guided decode) through both backends."""
    from medcfx.diffusion import TorchDenoiser, classifier_free, decode, dynamic_normalise, encode, static_clip

    g = torch.Generator().manual_seed(1)
    cfg = unet.config
    s = cfg.image_size
    # a smooth, image-like input in [-1, 1] (blurred noise), deterministic
    x = torch.nn.functional.avg_pool2d(torch.rand(2, cfg.in_channels, s + 6, s + 6, generator=g), 7, 1) * 2 - 1
    x = x.clamp(-1, 1)
    grid = schedule.respace(f"ddim{steps}")
    L = grid.level_for_fraction(noise_level)
    proc = dynamic_normalise(dn_percentile) if dn_percentile > 0 else static_clip
    maps = []
    for den in (TorchDenoiser(unet), onnx_den):
        cond = _cond_for(unet, 2, torch.Generator().manual_seed(2))
        if cfg.num_classes:
            null = unet.null_label
            x_l = encode(den, x, grid, L, cond={**cond, "y": torch.full((2,), null)}, x0_process=proc)
            guided = classifier_free(den, guidance, null)
            x_cf = decode(guided, x_l, grid, L, cond={**cond, "y": torch.zeros(2, dtype=torch.long)}, x0_process=proc)
        else:
            x_l = encode(den, x, grid, L, cond=cond, x0_process=proc)
            x_cf = decode(den, x_l, grid, L, cond=cond, x0_process=proc)
        maps.append((x - x_cf).abs().mean(1))
    return float((maps[0] - maps[1]).abs().max())


def export_model(registry, ref: str, opset: int = 17, dynamic_batch: bool = True, tol_call: float = TOL_CALL,
                 tol_map: float = TOL_MAP, log=print):
    """Export, gate on parity, and attach the ONNX artifact(s) to the entry. Returns the updated entry. A
    bundled entry is copied into the user's store first (:func:`store_copy`, said through ``log``); the
    copy gets the ONNX file, and is what is returned."""
    from medcfx.diffusion import Schedule
    from medcfx.loading import load_unet

    unet, entry = load_unet(registry, ref)
    d = entry.config.get("diffusion", {"schedule": "linear", "T": 1000})
    schedule = Schedule.create(d["schedule"], d["T"])
    ex = entry.config.get("explain", {})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{entry.name}-v{entry.version}.onnx"
        t0 = time.perf_counter()
        names = export_unet(unet, path, opset, dynamic_batch)
        export_s = time.perf_counter() - t0
        onnx_den = OnnxDenoiser(path)
        per_call = parity_per_call(unet, onnx_den, schedule.T, batches=(1, 3) if dynamic_batch else (1,))
        log(f"per-call parity: max |eps_onnx - eps_torch| = {per_call:.2e} (gate {tol_call:g})")
        if not per_call < tol_call:
            raise MedcfxError(f"export refused: ONNX and torch differ by {per_call:.2e} per call (gate {tol_call:g})")
        if not dynamic_batch:
            cf = None  # the counterfactual check runs at batch 2 (4 with guidance): needs the dynamic axis
        else:
            cf = parity_counterfactual(unet, onnx_den, schedule, int(ex.get("steps", 100)),
                                       float(ex.get("noise_level", 0.75)), float(ex.get("guidance", 3.0)),
                                       float(ex.get("dn_percentile", 0.99)))
            log(f"counterfactual parity: max heatmap difference = {cf:.2e} (gate {tol_map:g})")
            if not cf < tol_map:
                raise MedcfxError(f"export refused: counterfactual heatmaps differ by {cf:.2e} (gate {tol_map:g})")
        artifacts = {"onnx": path}
        external = {}  # onnx refers to external-data files by name: keep the names to inline them on load
        for i, extra in enumerate(sorted(p for p in Path(tmp).iterdir() if p != path)):
            artifacts[f"onnx_data{i}"] = extra
            external[f"onnx_data{i}"] = extra.name
        info = {"format": "onnx", "external_data": external, "opset": opset, "inputs": names, "output": "eps", "dynamic_batch": dynamic_batch,
                "parity": {"per_call_max_abs": per_call, "counterfactual_heatmap_max_abs": cf,
                           "gates": {"per_call": tol_call, "heatmap": tol_map}},
                "export_seconds": round(export_s, 2), "torch_version": torch.__version__}
        target = entry
        if entry.bundled:  # only after the parity gates passed: a refused export leaves no copy behind
            target = store_copy(registry, entry)
            use = (f"`--model {entry.name}` now means {target.ref}" if registry.resolve(entry.name).ref == target.ref
                   else f"use `--model {target.ref}`")
            log(f"{entry.ref} is bundled (read-only): copied it into your model store ({registry.home}) as "
                f"{target.ref}, which gets the ONNX file; {use}")
        return registry.add_artifacts(target.ref, artifacts, extra={"export": info})


def store_copy(registry, entry):
    """A user-store copy of the bundled ``entry``: an existing copy (parent = entry, same digest and config,
    in the user's store) is reused, else :meth:`Registry.derive` makes one (the next version of its name,
    the same sha256-verified artifacts)."""
    for e in reversed(registry.entries()):
        if not e.bundled and e.parent == entry.ref and e.digest == entry.digest and e.config == entry.config:
            return e
    return registry.derive(entry, {})


def denoiser_for(request, entry, unet):
    """The denoiser a sampler should use for ``--backend`` (request.extra['backend'], default torch)."""
    from medcfx.diffusion import TorchDenoiser

    backend = (request.extra or {}).get("backend", "torch")
    if backend == "torch":
        return TorchDenoiser(unet, autocast_bf16=bool((request.extra or {}).get("bf16")))
    if backend == "onnx":
        if "onnx" not in entry.artifacts:
            raise UsageError(f"model {entry.ref} has no ONNX export: run `medcfx export {entry.ref} --format onnx`")
        return OnnxDenoiser(verified_onnx_bytes(request.registry, entry), device=request.device)
    raise UsageError(f"--backend must be torch or onnx, got {backend!r}")


def _tensors(graph):
    """Every TensorProto of an ONNX graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def verified_onnx_bytes(registry, entry) -> bytes:
    """The serialized ONNX model of ``entry``, built only from sha256-verified artifact bytes.

    An export whose weights sit in external-data files (``export.external_data``: role -> file name, as
    onnx writes for models over 2 GB) is inlined in memory: each external tensor's ``location`` must be one
    of the declared names, each declared name a plain file name (no folder part; IntegrityError otherwise),
    and its bytes are taken from the verified artifact at the recorded offset and length. Nothing is
    written to disk. Raises IntegrityError / MedcfxError for a missing, modified or malformed artifact."""
    from medcfx.errors import IntegrityError
    from medcfx.registry.store import confine_file_name

    data, _ = registry.read_verified(entry, "onnx")
    external = (entry.extra.get("export") or {}).get("external_data") or {}
    if not external:
        return data
    if not isinstance(external, dict):
        raise IntegrityError(f"model {entry.ref}: export.external_data must map artifact roles to file names")
    import onnx

    blobs = {confine_file_name(name, f"model {entry.ref} (export.external_data.{role})"):
             registry.read_verified(entry, role)[0] for role, name in external.items()}
    model = onnx.load_model_from_string(data)
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {kv.key: kv.value for kv in tensor.external_data}
        location = info.get("location", "")
        if location not in blobs:
            raise IntegrityError(f"model {entry.ref}: ONNX tensor {tensor.name!r} refers to external data "
                                 f"{location!r}, which is not one of its verified artifacts")
        blob = blobs[location]
        offset = int(info.get("offset", 0))
        length = int(info.get("length", len(blob) - offset))
        if offset < 0 or length < 0 or offset + length > len(blob):
            raise IntegrityError(f"model {entry.ref}: ONNX tensor {tensor.name!r} reads bytes {offset}..{offset + length} "
                                 f"of {location!r}, which holds {len(blob)}")
        tensor.raw_data = blob[offset:offset + length]
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    try:
        return model.SerializeToString()
    except ValueError:  # protobuf's 2 GB limit
        raise MedcfxError(f"model {entry.ref}: the ONNX model with its external data is over 2 GB and cannot be "
                          f"loaded from verified bytes; use --backend torch") from None
