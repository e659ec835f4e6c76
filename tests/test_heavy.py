"""Full-size numerics (marker `heavy`): the real SD1.5 / SD2 / SDXL / refiner U-Nets, the VAE and the
three text encoders at their published sizes, with random weights, against the references.

Run with `pytest -m heavy` (CI runs them after the default suite when its time budget allows).
Each test builds the reference with PyTorch's default random init, maps its state dict into minisd
through the key tables (identity transforms share the tensors, so the U-Net costs one copy of the
weights), and compares one forward pass on CPU in fp32.

Tolerance: 1e-5 relative to the largest reference value, as for the tiny configs. Measured on this
CPU: the U-Nets agree bit for bit (0), the text encoders to 1e-6, the VAE decode to 2.2e-6 (its
512-channel GroupNorms and single-head attention over 256 pixels sum in another order). A wrong
mapping errs by order 1.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from minisd.clip import CLIP_VIT_L14, OPENCLIP_VIT_BIGG14, TextTransformer
from minisd.diffusers_format import text_to_hf, unet_table, unet_to_diffusers, vae_table, vae_to_diffusers
from minisd.keymap import load_strict
from minisd.layouts import hf_table
from minisd.unet import SD1_UNET, SD2_UNET, SDXL_BASE_UNET, SDXL_REFINER_UNET, UNetModel
from minisd.vae import SD_VAE, AutoencoderKL
from tests.test_clip import on_disk
from tests.utils import assert_rel_close

pytestmark = pytest.mark.heavy
REL = 1e-5


@pytest.mark.parametrize("name, cfg", [("sd1", SD1_UNET), ("sd2", SD2_UNET), ("sdxl", SDXL_BASE_UNET),
                                       ("refiner", SDXL_REFINER_UNET)])
@torch.no_grad()
def test_full_size_unet(name, cfg):
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**{k: v for k, v in unet_to_diffusers(cfg).items() if k != "_class_name"}).eval()
    with torch.device("meta"):
        ours = UNetModel(cfg)
    load_strict(ours, unet_table(cfg).to_ours(ref.state_dict()), source=f"diffusers {name}").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    t = torch.tensor([500.0])
    context = torch.randn(1, 77, cfg.context_dim, generator=g)
    kwargs = {}
    y = None
    if cfg.adm_in_channels is not None:
        n = 6 if name == "sdxl" else 5  # size/crop (+ target or score) numbers, 256 dims each
        text_embeds = torch.randn(1, cfg.adm_in_channels - n * 256, generator=g)
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0][:n]])
        from diffusers.models.embeddings import get_timestep_embedding

        fourier = get_timestep_embedding(time_ids.flatten(), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        y = torch.cat([text_embeds, fourier.reshape(1, -1)], dim=1)
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
    expected = ref(x, t, encoder_hidden_states=context, **kwargs).sample
    assert_rel_close(ours(x, t, context, y), expected, REL, f"{name} U-Net")


@torch.no_grad()
def test_full_size_vae():
    torch.manual_seed(0)
    ref = DiffusersVAE(**{k: v for k, v in vae_to_diffusers(SD_VAE).items() if k != "_class_name"}).eval()
    with torch.device("meta"):
        ours = AutoencoderKL(SD_VAE)
    load_strict(ours, vae_table(SD_VAE).to_ours(ref.state_dict()), source="diffusers VAE").eval()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_rel_close(ours.encode(images).mean, ref.encode(images).latent_dist.mean, REL, "VAE encode")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    assert_rel_close(ours.decode(z), ref.decode(z).sample, REL, "VAE decode")


@pytest.mark.parametrize("cfg", [CLIP_VIT_L14, OPENCLIP_VIT_BIGG14], ids=["clip-l", "bigG"])
@torch.no_grad()
def test_full_size_text_encoder(cfg):
    torch.manual_seed(0)
    hf = CLIPTextConfig(**{k: v for k, v in text_to_hf(cfg).items() if k not in ("architectures", "model_type")})
    hf._attn_implementation = "eager"
    ref = (CLIPTextModelWithProjection if cfg.projection_dim else CLIPTextModel)(hf).eval()
    with torch.device("meta"):
        ours = TextTransformer(cfg)
    load_strict(ours, hf_table(cfg).to_ours(on_disk(ref.state_dict(), ref)), source="transformers").eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    out = ref(ids, output_hidden_states=True)
    mine = ours(ids)
    assert_rel_close(mine.hidden_states[-2], out.hidden_states[-2], REL, "penultimate")
    assert_rel_close(mine.last_hidden_state, out.last_hidden_state, REL, "last")
    if cfg.projection_dim:
        assert_rel_close(mine.pooled, out.text_embeds, REL, "pooled")
