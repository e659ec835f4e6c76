"""The reference side of `minisd parity`: diffusers and transformers, imported here only, lazily.

- `load_reference` loads a checkpoint with the references' own converters, offline. A single file goes
  through diffusers' `from_single_file` for the U-Net and VAE, given a config folder that minisd writes
  from its resolved architecture (`checkpoint._save_diffusers(with_weights=False)`: JSON files and
  tokenizers, no weights), and through diffusers' CLIP converters into transformers' `CLIPTextModel(WithProjection)`
  for the text encoders, at the prefix the family says (diffusers' own dispatch tells SDXL's two encoders
  apart by width, which a custom or tiny model need not follow). A diffusers folder loads with
  `from_pretrained`.
- `run_reference` makes the outputs `parity.run_minisd` makes, from the same inputs; each sampling run
  is diffusers' pipeline loop (scale_model_input, one U-Net call on [uncond, cond], guidance, step) with
  the scheduler `SCHEDULERS` names, its latents kept in fp32 as minisd's samplers keep theirs.
- `localise` pairs modules through the key tables (`diffusers_format.unet_table` / `vae_table`,
  `layouts.hf_table`) and finds the first one whose output difference jumps.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import _save_diffusers
from .diffusers_format import SCHEDULER_CONFIG, unet_table, vae_table
from .keymap import KeyTable
from .layouts import hf_table
from .model import StableDiffusion
from .parity import TIMESTEPS, Divergence, ParityError, Row, Settings, relative_difference, sdxl_y

# The diffusers scheduler each base sampler reproduces (the comments of `samplers.SAMPLERS`), with its extra config.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
}
_PACKAGES = {"diffusers": "diffusers", "transformers": "transformers"}  # import name -> pip name


def _require(name: str):
    """Import a reference package, or say which one is missing and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ParityError(
            f"minisd parity needs the reference package {_PACKAGES[name]!r}, which is not installed: "
            f"pip install 'minisd[parity]' (or compare against a recorded bundle with --bundle)"
        ) from None


def require_references() -> None:
    """Raise `ParityError` naming the first reference package that is not installed."""
    for name in _PACKAGES:
        _require(name)


def versions() -> dict[str, str]:
    """The versions of the packages a reference run used."""
    names = ("minisd", "torch", "diffusers", "transformers")
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "not installed"
    return {"implementation": "diffusers", **out}


@dataclass
class Reference:
    """The reference models of one checkpoint, in the run's dtype and device."""

    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    text_time: bool  # y enters diffusers' U-Net as `added_cond_kwargs` (SDXL's "text_time")


# ----------------------------------------------------------------------------------------- loading
def load_reference(checkpoint: str | Path, sd: StableDiffusion, settings: Settings) -> Reference:
    """The checkpoint loaded by the references (see the module docstring), on `settings`' dtype and device."""
    diffusers, _ = _require("diffusers"), _require("transformers")
    path, dtype = Path(checkpoint), settings.dtype
    with tempfile.TemporaryDirectory(prefix="minisd-parity-") as tmp:
        if path.is_dir():
            folder, state = path, None
        else:
            folder = Path(tmp)
            _save_diffusers(sd, folder, {}, with_weights=False)
            from diffusers.loaders.single_file_utils import load_single_file_checkpoint

            state = load_single_file_checkpoint(str(path), local_files_only=True)
        source = str(path) if state is None else state

        def component(cls, sub: str):
            if state is None:
                return cls.from_pretrained(str(folder), subfolder=sub, torch_dtype=dtype, local_files_only=True)
            return cls.from_single_file(source, config=str(folder), subfolder=sub, torch_dtype=dtype,
                                        local_files_only=True)  # fmt: skip

        unet = component(diffusers.UNet2DConditionModel, "unet")
        vae = component(diffusers.AutoencoderKL, "vae")
        encoders = [_text_encoder(folder / enc.diffusers_folder, enc, state, dtype) for enc in sd.family.text]
    text_time = unet.config.addition_embed_type == "text_time"
    if sd.unet.config.adm_in_channels is not None and not text_time:
        raise ParityError(f"{path}: the reference U-Net does not take y as SDXL's text_time embedding")
    models = [m.to(settings.device).eval() for m in (unet, vae, *encoders)]
    return Reference(models[0], models[1], models[2:], text_time)


def _text_encoder(folder: Path, enc, state: dict | None, dtype: torch.dtype) -> nn.Module:
    """transformers' model of one text encoder: from its folder, or made by diffusers' converters from
    the single file's `state` at the family's prefix (open_clip layouts by `convert_open_clip_checkpoint`)."""
    import transformers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    if state is None:
        return cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    model = cls(transformers.CLIPTextConfig.from_pretrained(str(folder)))
    if enc.layout == "open_clip":
        weights = convert_open_clip_checkpoint(model, state, prefix=enc.official_prefix)
    else:
        weights = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(enc.official_prefix)},
                                              enc.official_prefix)  # fmt: skip
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattens CLIPTextModel
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    missing, _ = model.load_state_dict(weights, strict=False)  # unexpected: position_ids, SD2's dropped block
    if missing:
        raise ParityError(f"diffusers' converter left {len(missing)} weights of the text encoder unset: {missing[:5]}")
    return model.to(dtype)


# ----------------------------------------------------------------------------------------- running
def _text_model(model: nn.Module) -> nn.Module:
    return getattr(model, "text_model", model)


@torch.no_grad()
def run_reference(ref: Reference, sd: StableDiffusion, inputs: dict, settings: Settings) -> dict[str, torch.Tensor]:
    """The reference's output for every check, named as `parity.run_minisd`'s."""
    dev, dtype, out = torch.device(settings.device), settings.dtype, {}
    for i, (model, use) in enumerate(zip(ref.text_encoders, sd.text_uses)):
        o = model(inputs[f"text{i}.ids"].to(dev), output_hidden_states=True)
        hidden = o.hidden_states[use.layer]
        out[f"text{i}.context"] = _text_model(model).final_layer_norm(hidden) if use.final_ln else hidden
        if use.pooled:
            out[f"text{i}.pooled"] = o.text_embeds
    cond = _unet_kwargs(ref, inputs, dev, dtype)
    x = inputs["unet.x"].to(dev, dtype)
    for t in TIMESTEPS:
        raw = ref.unet(x, torch.full((2,), float(t), device=dev), **cond).sample.float()
        out[f"unet.t{t}"] = raw
        out[f"unet.t{t}.guided"] = raw[:1] + settings.guidance * (raw[1:] - raw[:1])
    out["vae.encode"] = ref.vae.encode(inputs["vae.image"].to(dev, dtype)).latent_dist.mode()
    out["vae.decode"] = ref.vae.decode(inputs["vae.latents"].to(dev, dtype)).sample
    for name in settings.samplers:
        out[f"sample.{name}"] = _sample(ref, sd, inputs, settings, name, cond)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def _unet_kwargs(ref: Reference, inputs: dict, dev: torch.device, dtype: torch.dtype) -> dict:
    """The U-Net's conditioning for the batch [uncond, cond], as diffusers' pipelines pass it."""
    kwargs = {"encoder_hidden_states": inputs["unet.context"].to(dev, dtype)}
    if ref.text_time:
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs["unet.pooled"].to(dev, dtype),
                                       "time_ids": inputs["unet.time_ids"].to(dev, dtype)}  # fmt: skip
    return kwargs


def make_scheduler(name: str, prediction_type: str) -> Any:
    """diffusers' scheduler for minisd sampler `name` on the official SD config (`SCHEDULER_CONFIG`)."""
    import diffusers

    base, extra = name, {}
    for kind in ("karras", "exponential"):
        if name.endswith("_" + kind):
            base, extra = name[: -len(kind) - 1], {f"use_{kind}_sigmas": True}
    cls_name, options = SCHEDULERS[base]
    config = {**SCHEDULER_CONFIG, "prediction_type": prediction_type, **options, **extra}
    return getattr(diffusers, cls_name).from_config(config)


def _sample(ref: Reference, sd: StableDiffusion, inputs: dict, settings: Settings, name: str, cond: dict):
    """diffusers' guided denoising loop (StableDiffusionPipeline.__call__), latents in fp32."""
    dev = torch.device(settings.device)
    scheduler = make_scheduler(name, sd.prediction_type)
    scheduler.set_timesteps(settings.steps, device=dev)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    latents = inputs["sample.noise"].to(dev) * scheduler.init_noise_sigma
    concat = inputs.get("sample.concat")
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        if concat is not None:  # StableDiffusionInpaintPipeline: [latents, mask, masked image latents]
            model_in = torch.cat([model_in, concat.to(dev).expand(2, -1, -1, -1)], dim=1)
        uncond, cond_out = ref.unet(model_in.to(settings.dtype), t, **cond).sample.float().chunk(2)
        noise_pred = uncond + settings.guidance * (cond_out - uncond)
        extra = {"generator": generator} if takes_generator else {}
        latents = scheduler.step(noise_pred, t, latents, **extra).prev_sample
    return latents


# ----------------------------------------------------------------------------------------- localising
def _pairs(table: KeyTable, ours: nn.Module, theirs: nn.Module) -> list[tuple[str, str, tuple, tuple]]:
    """(our module, their module, our keys, their keys) for each of our modules that holds weights:
    their module is the one holding the keys the table maps ours to (for fused q/k/v: their parent)."""
    held: dict[str, tuple[list, list]] = {}
    for rule in table.rules:
        ours_keys, theirs_keys = held.setdefault(rule.ours.rpartition(".")[0], ([], []))
        ours_keys.append(rule.ours)
        theirs_keys.extend(rule.theirs)
    their_modules, pairs = dict(theirs.named_modules()), []
    for name, (ours_keys, theirs_keys) in held.items():
        parts = [k.split(".")[:-1] for k in theirs_keys]
        common = []
        for level in zip(*parts):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        their_name = ".".join(common)
        if name and their_name in their_modules:
            pairs.append((name, their_name, tuple(ours_keys), tuple(theirs_keys)))
    return pairs


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _record(module: nn.Module, names: list[str], seen: list) -> list:
    """Forward hooks recording (name, input, output) of each named submodule, in the order they finish."""
    handles = []
    for name in names:
        def hook(m, args, kwargs, output, name=name):
            x = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
            seen.append((name, x, _first_tensor(output)))

        handles.append(module.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    return handles


def _aligned(ours: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
    """Their activation in our layout: a (B, HW, C) token sequence as (B, C, H, W), or None if it cannot be."""
    if ours is None or theirs is None or ours.numel() != theirs.numel():
        return None
    if ours.shape == theirs.shape:
        return theirs
    if ours.dim() == 4 and theirs.dim() == 3:
        return theirs.transpose(1, 2).reshape(ours.shape)
    return None


def _component(row: Row, ref: Reference, sd: StableDiffusion):
    """(table, our module, their module, a function running both on the row's inputs) of a failing row."""
    part = row.name.split(".")[0]
    if part.startswith("text"):
        i = int(part[4:])
        model = ref.text_encoders[i]
        table = hf_table(sd.text_encoders[i].config)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            table = KeyTable(table.name, tuple(type(r)(r.ours, tuple(t.removeprefix("text_model.") for t in r.theirs),
                                                       r.transform) for r in table.rules))  # fmt: skip
        return table, sd.text_encoders[i], model
    if part == "vae":
        return vae_table(sd.vae.config), sd.vae, ref.vae
    if part == "unet":
        return unet_table(sd.unet.config, text_time=ref.text_time), sd.unet, ref.unet
    return None


@torch.no_grad()
def localise(row: Row, ref: Reference, sd: StableDiffusion, inputs: dict, settings: Settings) -> Divergence | None:
    """The first module on the path to `row`'s output whose difference jumps: its output differs by more
    than the row's tolerance, and by more than 4 times its input does. None for sampling rows (the U-Net's
    rows localise a U-Net difference; a sampler's own difference is in its arithmetic, not a module)."""
    found = _component(row, ref, sd)
    if found is None:
        return None
    table, ours, theirs = found
    pairs = _pairs(table, ours, theirs)
    ours_seen, theirs_seen = [], []
    handles = _record(ours, [p[0] for p in pairs], ours_seen) + _record(theirs, [p[1] for p in pairs], theirs_seen)
    try:
        _run_both(row, ref, sd, inputs, settings)
    finally:
        for h in handles:
            h.remove()
    theirs_by_name = {name: (x, y) for name, x, y in theirs_seen}
    by_ours = {p[0]: p for p in pairs}
    candidates = []
    for name, x, y in ours_seen:
        their_name = by_ours[name][1]
        if their_name not in theirs_by_name:
            continue
        tx, ty = (_aligned(a, b) for a, b in zip((x, y), theirs_by_name[their_name]))
        if ty is None:
            continue
        in_rel = relative_difference(x, tx) if tx is not None else 0.0
        out_rel = relative_difference(y, ty)
        if out_rel > row.tolerance:
            candidates.append((name, in_rel, out_rel))
    jumps = [c for c in candidates if c[2] > 4 * c[1]] or candidates
    if not jumps:
        return None
    name, in_rel, out_rel = jumps[0]
    _, their_name, our_keys, their_keys = by_ours[name]
    return Divergence(row.name, name, their_name, in_rel, out_rel, our_keys, their_keys)


def _run_both(row: Row, ref: Reference, sd: StableDiffusion, inputs: dict, settings: Settings) -> None:
    """One forward of the row's component on each side, on the row's inputs (hooks record the activations)."""
    dev, dtype = torch.device(settings.device), settings.dtype
    part = row.name.split(".")[0]
    if part.startswith("text"):
        ids = inputs[f"{part}.ids"].to(dev)
        sd.text_encoders[int(part[4:])](ids)
        ref.text_encoders[int(part[4:])](ids)
    elif row.name == "vae.encode":
        sd.vae.encode(inputs["vae.image"].to(dev))
        ref.vae.encode(inputs["vae.image"].to(dev, dtype))
    elif row.name == "vae.decode":
        sd.vae.decode(inputs["vae.latents"].to(dev))
        ref.vae.decode(inputs["vae.latents"].to(dev, dtype))
    else:
        t = torch.full((2,), float(row.name.split(".")[1][1:]), device=dev)
        x = inputs["unet.x"].to(dev, dtype)
        y = sdxl_y(sd, inputs)
        sd.unet(x, t, inputs["unet.context"].to(dev), None if y is None else y.to(dev))
        ref.unet(x, t, **_unet_kwargs(ref, inputs, dev, dtype))
