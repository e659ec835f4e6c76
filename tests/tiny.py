"""Tiny random checkpoints in the exact official layouts, with their reference models.

`official_checkpoint(family)` builds the tensors of a single-file checkpoint the way the
official files lay them out, from independent sources:

- the U-Net and VAE from minisd modules with seeded random weights (their official names
  are checked against diffusers' own converter in tests/test_unet.py and tests/test_vae.py);
- CLIP-L from a transformers `CLIPTextModel` state dict (`text_model.*`, with the float
  `position_ids` some SD1 files carry), OpenCLIP from an open_clip state dict (with
  `logit_scale`), under the official prefixes.

The references for the outputs are diffusers' `UNet2DConditionModel` / `AutoencoderKL`
built by diffusers' single-file converter from the same tensors, and the transformers /
open_clip models themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from minisd.clip import TextConfig
from minisd.families import UNET_PREFIX, VAE_PREFIX, family_spec
from minisd.schedules import ddpm_alphas_cumprod
from minisd.unet import UNetConfig, UNetModel
from minisd.vae import AutoencoderKL, VAEConfig
from tests.test_clip import on_disk, tiny_hf, tiny_open_clip
from tests.test_unet import diffusers_config, randomize
from tests.test_vae import _diffusers_config as vae_diffusers_config
from tests.test_vae import _perturb_norms

# The text towers of tests/test_clip.py's tiny_hf / tiny_open_clip.
TINY_L = TextConfig(width=32, heads=4, layers=3, mlp_width=48, act="quick_gelu", projection_dim=None)
TINY_G = TextConfig(width=32, heads=4, layers=3, mlp_width=128, act="gelu", projection_dim=24)
TINY_H = TINY_G  # SD2's OpenCLIP-H, tiny: same shape as the bigG stand-in
_SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                  num_heads=4, context_dim=32)
_SD2 = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                  num_head_channels=8, context_dim=32, use_linear_in_transformer=True)
# SDXL-like: y = pooled (24) + 6 x 256 size/crop features; refiner: pooled + 5 x 256.
_XL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                 transformer_depth=(0, 2), num_head_channels=8, context_dim=64, use_linear_in_transformer=True,
                 adm_in_channels=24 + 6 * 256)
_REFINER = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                      num_head_channels=8, context_dim=32, use_linear_in_transformer=True, adm_in_channels=24 + 5 * 256)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)

TINY_UNETS = {"sd1": _SD1, "sd1-inpaint": UNetConfig(**{**_SD1.__dict__, "in_channels": 9}), "sd2": _SD2,
              "sd2-v": _SD2, "sd2-inpaint": UNetConfig(**{**_SD2.__dict__, "in_channels": 9}),
              "sdxl": _XL, "sdxl-inpaint": UNetConfig(**{**_XL.__dict__, "in_channels": 9}), "sdxl-refiner": _REFINER}
_TEXT = {"sd1": [TINY_L], "sd2": [TINY_H], "sdxl": [TINY_L, TINY_G], "sdxl-refiner": [TINY_G]}


def text_configs(family: str) -> list[TextConfig]:
    return _TEXT[family.replace("-inpaint", "").replace("-v", "")]


def tiny_config(family: str) -> dict:
    """The `config=` argument of `minisd.load` for a tiny checkpoint of `family`."""
    vae = VAEConfig(**{**TINY_VAE.__dict__, "scale_factor": family_spec(family).vae.scale_factor})
    return {"unet": TINY_UNETS[family], "vae": vae, "text_encoders": text_configs(family)}


@dataclass
class TinyCheckpoint:
    tensors: dict[str, torch.Tensor]  # official keys, as a file would hold them
    text_refs: list  # transformers / open_clip reference models, in the family's order
    unet_config: UNetConfig
    vae_config: VAEConfig


def official_checkpoint(family: str, seed: int = 0, *, ema: bool = False, extras: bool = True,
                        unet_dtype: torch.dtype = torch.float32) -> TinyCheckpoint:
    """A tiny official-layout checkpoint of `family` (see the module docstring).

    `ema` adds `model_ema.*` copies holding *different* values (so a test can tell which
    were loaded); `extras` adds the schedule buffers, float `position_ids` and `logit_scale`;
    `unet_dtype` stores the U-Net in another dtype (a mixed-dtype file)."""
    spec = family_spec(family)
    cfg = tiny_config(family)
    tensors: dict[str, torch.Tensor] = {}
    unet = UNetModel(cfg["unet"])
    randomize(unet, seed)
    tensors.update({UNET_PREFIX + k: v.to(unet_dtype) for k, v in unet.state_dict().items()})
    vae = _perturb_norms(AutoencoderKL(cfg["vae"]), seed)
    tensors.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    refs = []
    for i, (enc, tcfg) in enumerate(zip(spec.text, cfg["text_encoders"])):
        if enc.layout == "hf":
            ref = tiny_hf(with_projection=False, act=tcfg.act, eos_token_id=2, seed=seed + 10 + i)
            sd = on_disk(ref.state_dict(), ref)
            if extras:
                sd["text_model.embeddings.position_ids"] = torch.arange(77.0)[None]  # floats, as in some SD1 files
        else:
            ref = tiny_open_clip(tcfg.act, seed=seed + 10 + i)
            sd = dict(ref.state_dict())
            if not extras:
                sd.pop("logit_scale")
        refs.append(ref)
        tensors.update({enc.official_prefix + k: v for k, v in sd.items()})
    if ema:
        ema_unet = UNetModel(cfg["unet"])
        randomize(ema_unet, seed + 100)
        for k, v in ema_unet.state_dict().items():
            tensors["model_ema." + ("diffusion_model." + k).replace(".", "")] = v.to(unet_dtype)
        tensors["model_ema.decay"] = torch.tensor(0.9999)
        tensors["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    if extras:
        a = ddpm_alphas_cumprod()
        tensors["alphas_cumprod"] = a.float()
        tensors["betas"] = (1 - a / torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])).float()
    return TinyCheckpoint(tensors, refs, cfg["unet"], cfg["vae"])


def diffusers_unet(ckpt: TinyCheckpoint, *, ema: bool = False) -> UNet2DConditionModel:
    """diffusers' U-Net from the checkpoint's tensors, by diffusers' own single-file converter."""
    t = {k: v.float() for k, v in ckpt.tensors.items()}
    if ema:  # diffusers' converter takes the EMA copy when `extract_ema=True`
        config = diffusers_config(ckpt.unet_config, t)
        converted = convert_ldm_unet_checkpoint(t, config, extract_ema=True)
    else:
        t = {k: v for k, v in t.items() if not k.startswith("model_ema.")}
        config = diffusers_config(ckpt.unet_config, t)
        converted = convert_ldm_unet_checkpoint(t, config)
    model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def diffusers_vae(ckpt: TinyCheckpoint) -> DiffusersVAE:
    t = {k: v.float() for k, v in ckpt.tensors.items()}
    config = vae_diffusers_config(ckpt.vae_config, t)
    model = DiffusersVAE(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(t, config), strict=True)
    return model.eval()
