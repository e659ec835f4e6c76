"""minisd's pipelines against diffusers' own pipelines, on tiny random models.

Each model is built once as diffusers components (UNet2DConditionModel, AutoencoderKL,
transformers CLIPTextModel(WithProjection), CLIPTokenizer from our BPE file) with seeded
random weights, and mapped into a `StableDiffusion` through minisd's key tables
(`diffusers_format.unet_table`, `diffusers_format.vae_table`, `layouts.hf_table`). Both sides then run the
same request, and the outputs are compared:

- images: PIL outputs as uint8 arrays, max difference <= 1 level (1/255). The two
  sides agree to fp32 round-off, so a pixel can differ only where its value sits on a
  rounding boundary of `round(255 x)`;
- latents (minisd `output="latent"` vs diffusers `output_type="latent"`):
  `assert_rel_close` at LATENT_REL (see there).

Every scheduler is built from the official SD scheduler config (`OFFICIAL`), which is
what each minisd sampler name reproduces (see `minisd.samplers`):

    minisd sampler   diffusers scheduler
    ddim             DDIMScheduler(**OFFICIAL)          (eta 0)
    euler            EulerDiscreteScheduler(**OFFICIAL)
    euler_a          EulerAncestralDiscreteScheduler(**OFFICIAL)
    dpmpp_2m         DPMSolverMultistepScheduler(**OFFICIAL, algorithm_type="dpmsolver++", solver_order=2)

with `prediction_type` "epsilon" (SD1, SDXL) or "v_prediction" (SD2-v). minisd is given
the scheduler's own fp32 `alphas_cumprod` (`schedule=`), so both sample the same table;
`test_default_float64_schedule` measures the official float64 table instead.

The tiny models: SD1-like (CLIP-L-like quick_gelu text encoder, 1x1-conv transformers),
SD2-v-like (gelu encoder read by its last layer + final LN, as diffusers' 23-block SD2
folders are, pad token 0; linear transformers, head width 16), SDXL base (CLIP-L 768 +
bigG 1280 wide = the real 2048-wide context, two blocks each; y = pooled 32 + 6 x 256)
and refiner (the same bigG; context 1280, y = 32 + 5 x 256). The widths 2048 and 1280
are what diffusers' converter (and so `diffusers_format.unet_table`) knows as SDXL's.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKL as DiffusersVAE,
)
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from open_clip import tokenizer as oc_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTokenizer as HFCLIPTokenizer

from minisd import clip, unet, vae
from minisd.conditioning import MicroConditioning
from minisd.diffusers_format import unet_table, vae_table
from minisd.families import FAMILIES, TextEncoderUse, with_prediction
from minisd.keymap import load_strict
from minisd.layouts import hf_table
from minisd.model import StableDiffusion
from minisd.pipeline import Noise, Prompt, Sampling, txt2img
from minisd.schedules import DiscreteSchedule, from_variance_preserving
from minisd.tokenizer import CLIPTokenizer
from tests.test_clip import on_disk
from tests.test_unet import PREFIX, diffusers_config, randomize
from tests.test_vae import _diffusers_config as vae_diffusers_config
from tests.utils import assert_rel_close

PROMPT = "a photograph of an astronaut riding a horse"  # no "!" and no HTML entity (tokenizer divergences)
SIZE = 64  # pixels; latents are 32 x 32 (tiny VAE: factor 2)
STEPS = 4
# Latents agree to fp32 round-off: the same ops on the same weights, in another order
# (SDPA vs diffusers' attention processors, fused q/k/v in CLIP, sampler coefficients in
# float64 scalars vs fp32 tensors), amplified by guidance (scale 7.5) over a few steps.
# Measured: 0.45e-6 to 5.0e-6 of max|latent| over this file; a wrong timestep, scaling,
# conditioning or noise draw moves them by O(1e-2) or more.
LATENT_REL = 2e-5

# The official SD1/SD2/SDXL scheduler config (scheduler_config.json of the diffusers repos,
# and diffusers' single-file SCHEDULER_DEFAULT_CONFIG); each class takes the keys it knows.
OFFICIAL = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
)  # fmt: skip
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def make_scheduler(name: str, prediction_type: str):
    cls, extra = SCHEDULERS[name]
    return cls.from_config({**OFFICIAL, "prediction_type": prediction_type, **extra})


def table_of(scheduler) -> DiscreteSchedule:
    """The scheduler's own fp32 training table, for minisd's `schedule=`."""
    return DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


# --------------------------------------------------------------------------- tiny models
def hf_tokenizer(path, pad: str) -> HFCLIPTokenizer:
    """transformers' CLIPTokenizer from vocab.json / merges.txt written from our shipped BPE file
    with open_clip's byte table (as tests/test_tokenizer.py); SD1 pads with "<|endoftext|>",
    SD2 and SDXL's tokenizer_2 with "!" (id 0), as in the diffusers repos."""
    if not (path / "vocab.json").exists():
        data = (importlib.resources.files("minisd") / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
        merges = gzip.decompress(data).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        symbols = list(oc_tokenizer.bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
        (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return HFCLIPTokenizer.from_pretrained(path, pad_token=pad, model_max_length=77)


def tiny_text(width: int, act: str, eos: int, seed: int, projection: bool = False):
    """A 2-block HF CLIP text model and minisd's copy of it."""
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, hidden_act=act, projection_dim=32, layer_norm_eps=1e-5, eos_token_id=eos,
    )  # fmt: skip
    theirs = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    randomize(theirs, seed)
    config = clip.TextConfig.from_hf_config(cfg.to_dict(), projection=projection)
    with torch.device("meta"):
        ours = clip.TextTransformer(config)
    load_strict(ours, hf_table(config).to_ours(on_disk(theirs.state_dict(), theirs)), source="tiny HF CLIP")
    return theirs, ours.eval()


def tiny_unet(cfg: unet.UNetConfig, seed: int):
    with torch.device("meta"):
        ours = unet.UNetModel(cfg)
    theirs = UNet2DConditionModel(**diffusers_config(cfg, {PREFIX + k: v for k, v in ours.state_dict().items()})).eval()
    randomize(theirs, seed)
    load_strict(ours, unet_table(cfg).to_ours(theirs.state_dict()), source="tiny diffusers UNet")
    return theirs, ours.eval()


def tiny_vae(scale_factor: float, seed: int):
    cfg = vae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=scale_factor)
    theirs = DiffusersVAE(**vae_diffusers_config(cfg, {})).eval()
    randomize(theirs, seed)
    with torch.device("meta"):
        ours = vae.AutoencoderKL(cfg)
    load_strict(ours, vae_table(cfg).to_ours(theirs.state_dict()), source="tiny diffusers VAE")
    return theirs, ours.eval()


def minisd_model(family: str, u, v, encoders, uses, prediction_type=None) -> StableDiffusion:
    spec = FAMILIES[family].with_architecture(u.config, v.config, tuple(e.config for e in encoders))
    spec = with_prediction(spec, prediction_type or spec.prediction_type)
    return StableDiffusion(
        family=spec, unet=u, vae=v, text_encoders=list(encoders), text_uses=list(uses), tokenizer=CLIPTokenizer(),
    )  # fmt: skip


SD1_UNET = unet.UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
    transformer_depth=1, num_heads=2, context_dim=32,
)  # fmt: skip
SD2_UNET = unet.UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
    transformer_depth=1, num_head_channels=16, context_dim=32, use_linear_in_transformer=True,
)  # fmt: skip
XL_BASE_UNET = unet.UNetConfig(  # SDXL-like: no attention at full resolution
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), transformer_depth=(0, 1),
    num_head_channels=16, context_dim=768 + 1280, use_linear_in_transformer=True, adm_in_channels=32 + 6 * 256,
)  # fmt: skip
XL_REFINER_UNET = dataclasses.replace(XL_BASE_UNET, transformer_depth=1, context_dim=1280, adm_in_channels=32 + 5 * 256)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (minisd StableDiffusion, dict of diffusers components)}."""
    tok_dir = tmp_path_factory.mktemp("hf_tokenizer")
    tok_sd1, tok_pad0 = hf_tokenizer(tok_dir, "<|endoftext|>"), hf_tokenizer(tok_dir, "!")
    out = {}

    # SD1: CLIP-L-like encoder (quick_gelu, SD1's legacy eos_token_id 2), last layer + final LN.
    te_t, te_o = tiny_text(32, "quick_gelu", 2, seed=1)
    vae_t, vae_o = tiny_vae(0.18215, seed=2)
    sd1_use = FAMILIES["sd1"].text[0].use(te_o.config.layers)
    for family, cfg, seed in (("sd1", SD1_UNET, 3), ("sd1-inpaint", dataclasses.replace(SD1_UNET, in_channels=9), 4)):
        u_t, u_o = tiny_unet(cfg, seed)
        parts = dict(vae=vae_t, text_encoder=te_t, tokenizer=tok_sd1, unet=u_t)
        out[family] = (minisd_model(family, u_o, vae_o, [te_o], [sd1_use]), parts)

    # SD2-v: a diffusers SD2 folder's encoder is read by its last layer + final LN, padded with 0
    # (families.TextEncoderSpec.diffusers_drops_last).
    te2_t, te2_o = tiny_text(32, "gelu", 2, seed=5)
    u_t, u_o = tiny_unet(SD2_UNET, 6)
    use = TextEncoderUse(layer=te2_o.config.layers, final_ln=True, pad_token_id=0, tokenizer="open_clip")
    parts = dict(vae=vae_t, text_encoder=te2_t, tokenizer=tok_pad0, unet=u_t)
    out["sd2-v"] = (minisd_model("sd2-v", u_o, vae_o, [te2_o], [use]), parts)

    # SDXL base and refiner share the bigG-like encoder (as the official pipelines do) and the VAE.
    l_t, l_o = tiny_text(768, "quick_gelu", 2, seed=7)
    g_t, g_o = tiny_text(1280, "gelu", 49407, seed=8, projection=True)
    xvae_t, xvae_o = tiny_vae(0.13025, seed=9)
    u_t, u_o = tiny_unet(XL_BASE_UNET, 10)
    uses = [t.use(e.config.layers) for t, e in zip(FAMILIES["sdxl"].text, (l_o, g_o))]
    parts = dict(vae=xvae_t, text_encoder=l_t, text_encoder_2=g_t, tokenizer=tok_sd1, tokenizer_2=tok_pad0, unet=u_t)
    out["sdxl"] = (minisd_model("sdxl", u_o, xvae_o, [l_o, g_o], uses), parts)
    u_t, u_o = tiny_unet(XL_REFINER_UNET, 11)
    uses = [t.use(e.config.layers) for t, e in zip(FAMILIES["sdxl-refiner"].text, (g_o,))]
    parts = dict(vae=xvae_t, text_encoder=None, text_encoder_2=g_t, tokenizer=None, tokenizer_2=tok_pad0, unet=u_t)
    out["sdxl-refiner"] = (minisd_model("sdxl-refiner", u_o, xvae_o, [g_o], uses), parts)
    return out


def diffusers_pipe(cls, parts: dict, scheduler, **extra):
    if cls in (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline):
        extra["add_watermarker"] = False
    else:
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls(**parts, scheduler=scheduler, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- comparison
def as_array(images: list[PIL.Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def assert_same_images(ours: list[PIL.Image.Image], theirs: list[PIL.Image.Image]) -> None:
    a, b = as_array(ours), as_array(theirs)
    assert a.shape == b.shape, f"{a.shape} != {b.shape}"
    # a live picture, not a saturated or constant one
    assert b.std() > 20 and len(np.unique(b)) > 100, "degenerate reference image"
    diff = int(np.abs(a - b).max())
    assert diff <= 1, f"max pixel difference {diff} > 1/255"


def run_both(sd: StableDiffusion, pipe, ours_kwargs: dict, theirs_kwargs: dict, seed: int = 0, rel: float = LATENT_REL):
    """The same request as latents and as PIL images on both sides; returns minisd's latents."""
    results = {}
    for output in ("latent", "pil"):
        theirs = pipe(**theirs_kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type=output).images
        ours = sd.generate(**ours_kwargs, seed=seed, output=output)
        results[output] = ours, theirs
    ours, theirs = results["latent"]
    assert_rel_close(ours, theirs, rel, "latents")
    assert_same_images(*results["pil"])
    return ours


def init_pictures() -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A smooth RGB test picture and a mask: a white disc (repaint) on black (keep)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([np.sin(6 * xx) * 0.5 + 0.5, yy, np.cos(4 * xx * yy) * 0.5 + 0.5], axis=-1)
    image = PIL.Image.fromarray((rgb * 255).round().astype(np.uint8))
    disc = ((xx - 0.55) ** 2 + (yy - 0.45) ** 2 < 0.09).astype(np.uint8) * 255
    return image, PIL.Image.fromarray(disc, mode="L")


# --------------------------------------------------------------------------- text to image
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_txt2img_matches_stable_diffusion_pipeline(models, family, sampler):
    # StableDiffusionPipeline with the scheduler above; SD2-v: prediction_type="v_prediction".
    sd, parts = models[family]
    scheduler = make_scheduler(sampler, sd.prediction_type)
    pipe = diffusers_pipe(StableDiffusionPipeline, parts, scheduler)
    ours = dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, sampler=sampler, schedule=table_of(scheduler))
    theirs = dict(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=7.5)
    run_both(sd, pipe, ours, theirs, seed=11)


@pytest.mark.parametrize("sampler,rescale", [("euler", 0.0), ("dpmpp_2m", 0.7)])
def test_txt2img_matches_stable_diffusion_xl_pipeline(models, sampler, rescale):
    # StableDiffusionXLPipeline (force_zeros_for_empty_prompt=True: the empty negative prompt is
    # zeros), default micro-conditioning (original = target = output size, crop (0, 0)),
    # guidance 5.0 (the family default), guidance_rescale as given.
    sd, parts = models["sdxl"]
    scheduler = make_scheduler(sampler, "epsilon")
    pipe = diffusers_pipe(StableDiffusionXLPipeline, parts, scheduler)
    ours = dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, sampler=sampler, schedule=table_of(scheduler),
                guidance_rescale=rescale)  # fmt: skip
    theirs = dict(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_rescale=rescale)
    run_both(sd, pipe, ours, theirs, seed=12)


def test_sdxl_micro_conditioning_and_negative_prompt(models):
    # Non-default sizes and crop, and a real negative prompt (encoded, not zeroed): diffusers'
    # add_time_ids are (original, crop, target) for both branches.
    sd, parts = models["sdxl"]
    scheduler = make_scheduler("euler", "epsilon")
    pipe = diffusers_pipe(StableDiffusionXLPipeline, parts, scheduler)
    cond = dict(original_size=(512, 256), crop_coords_top_left=(16, 32), target_size=(128, 64))
    ours = dict(prompt=PROMPT, negative_prompt="blurry, low quality", width=SIZE, height=SIZE, steps=3,
                schedule=table_of(scheduler), **cond)  # fmt: skip
    theirs = dict(prompt=PROMPT, negative_prompt="blurry, low quality", width=SIZE, height=SIZE, num_inference_steps=3,
                  original_size=(512, 256), crops_coords_top_left=(16, 32), target_size=(128, 64))  # fmt: skip
    latents = run_both(sd, pipe, ours, theirs, seed=13)
    plain = sd.generate(PROMPT, negative_prompt="blurry, low quality", width=SIZE, height=SIZE, steps=3,
                        schedule=table_of(scheduler), seed=13, output="latent")  # fmt: skip
    assert (plain - latents).abs().max() > 1e-3  # the sizes really reach the U-Net


def test_batch_negative_prompts_and_ancestral_noise(models):
    # Two prompts x two images, one negative prompt each, Euler ancestral (the step noise comes
    # from the same generator after the initial draw, as diffusers' scheduler.step(generator=)).
    sd, parts = models["sd1"]
    scheduler = make_scheduler("euler_a", "epsilon")
    pipe = diffusers_pipe(StableDiffusionPipeline, parts, scheduler)
    prompts, negatives = [PROMPT, "a red cube on a table"], ["ugly", "blurry"]
    ours = dict(prompt=prompts, negative_prompt=negatives, num_images=2, width=SIZE, height=SIZE, steps=3,
                sampler="euler_a", schedule=table_of(scheduler))  # fmt: skip
    theirs = dict(prompt=prompts, negative_prompt=negatives, num_images_per_prompt=2, width=SIZE, height=SIZE,
                  num_inference_steps=3)  # fmt: skip
    latents = run_both(sd, pipe, ours, theirs, seed=14)
    assert latents.shape == (4, 4, SIZE // 2, SIZE // 2)


def test_clip_skip_and_no_guidance_match_diffusers(models):
    # guidance_scale 1 runs the conditional branch alone (no negative prompt, where diffusers'
    # clip_skip would not apply); clip_skip=1 reads the penultimate block, then the final LN.
    # diffusers 0.42.1's own clip_skip path reaches `text_encoder.text_model.final_layer_norm`,
    # which transformers 5.23 no longer has (CLIPTextModel is flattened), so its computation
    # is done here by hand and passed as `prompt_embeds`.
    sd, parts = models["sd1"]
    scheduler = make_scheduler("euler", "epsilon")
    pipe = diffusers_pipe(StableDiffusionPipeline, parts, scheduler)
    encoder = parts["text_encoder"]
    tokens = parts["tokenizer"](PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = tokens.input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]  # hidden_states[-(clip_skip + 1)]
        final_ln = encoder.text_model.final_layer_norm if hasattr(encoder, "text_model") else encoder.final_layer_norm
        embeds = final_ln(hidden)
    ours = dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=3, guidance_scale=1.0, clip_skip=1,
                schedule=table_of(scheduler))  # fmt: skip
    theirs = dict(prompt_embeds=embeds, width=SIZE, height=SIZE, num_inference_steps=3, guidance_scale=1.0)
    latents = run_both(sd, pipe, ours, theirs, seed=15)
    no_skip = sd.generate(**{**ours, "clip_skip": 0}, seed=15, output="latent")
    assert (no_skip - latents).abs().max() > 1e-3


def test_default_float64_schedule(models):
    # minisd's default training table is the official float64 one; diffusers builds it in fp32
    # (sigmas up to 1.3e-5 relative apart near t = 0, tests/test_samplers.py). Measured here:
    # latents 2.6e-6 relative apart after 4 guided steps, no more than with diffusers' own table.
    sd, parts = models["sd1"]
    pipe = diffusers_pipe(StableDiffusionPipeline, parts, make_scheduler("euler", "epsilon"))
    ours = dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS)
    theirs = dict(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS)
    run_both(sd, pipe, ours, theirs, seed=16)


# --------------------------------------------------------------------------- image to image
@pytest.mark.parametrize("sampler,strength,eta", [("euler", 0.6, None), ("ddim", 0.75, 0.5), ("dpmpp_2m", 0.5, None)])
def test_img2img_matches_stable_diffusion_img2img_pipeline(models, sampler, strength, eta):
    # StableDiffusionImg2ImgPipeline: posterior sample of the image (generator), then noise at
    # the first of the last int(steps * strength) timesteps (get_timesteps, add_noise).
    # DDIM with eta 0.5 draws its step noise from the same generator (DDIMScheduler.step(eta=)).
    sd, parts = models["sd1"]
    image, _ = init_pictures()
    scheduler = make_scheduler(sampler, "epsilon")
    pipe = diffusers_pipe(StableDiffusionImg2ImgPipeline, parts, scheduler)
    ours = dict(prompt=PROMPT, init_image=image, strength=strength, steps=STEPS, sampler=sampler, eta=eta,
                schedule=table_of(scheduler))  # fmt: skip
    theirs = dict(prompt=PROMPT, image=image, strength=strength, num_inference_steps=STEPS, eta=eta or 0.0)
    run_both(sd, pipe, ours, theirs, seed=17)


# --------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("sampler,strength", [("euler", 1.0), ("dpmpp_2m", 0.75)])
def test_inpainting_9_channel_matches_inpaint_pipeline(models, sampler, strength):
    # StableDiffusionInpaintPipeline with a 9-channel U-Net: [latents, mask, masked-image latents];
    # strength 1.0 (its default) starts from pure noise, 0.75 from the noised image.
    sd, parts = models["sd1-inpaint"]
    image, mask = init_pictures()
    scheduler = make_scheduler(sampler, "epsilon")
    pipe = diffusers_pipe(StableDiffusionInpaintPipeline, parts, scheduler)
    ours = dict(prompt=PROMPT, init_image=image, mask_image=mask, strength=strength, steps=STEPS, sampler=sampler,
                schedule=table_of(scheduler))  # fmt: skip
    theirs = dict(prompt=PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=STEPS,
                  width=SIZE, height=SIZE)  # fmt: skip
    run_both(sd, pipe, ours, theirs, seed=18)


@pytest.mark.parametrize("sampler,strength", [("euler", 1.0), ("euler_a", 0.75), ("ddim", 1.0)])
def test_inpainting_4_channel_matches_inpaint_pipeline(models, sampler, strength):
    # StableDiffusionInpaintPipeline with a 4-channel U-Net: after each step the kept region
    # is reset to the init latents noised to the next timestep, and to the clean latents at
    # the end. Euler ancestral checks the generator order (image posterior, noise, the unused
    # masked-image posterior, then the step noise); DDIM the final blend at sigma(t=0) > 0.
    sd, parts = models["sd1"]
    image, mask = init_pictures()
    scheduler = make_scheduler(sampler, "epsilon")
    pipe = diffusers_pipe(StableDiffusionInpaintPipeline, parts, scheduler)
    ours = dict(prompt=PROMPT, init_image=image, mask_image=mask, strength=strength, steps=STEPS, sampler=sampler,
                schedule=table_of(scheduler))  # fmt: skip
    theirs = dict(prompt=PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=STEPS,
                  width=SIZE, height=SIZE)  # fmt: skip
    latents = run_both(sd, pipe, ours, theirs, seed=19)
    # The kept region (mask 0 after nearest downsampling) is exactly the init image's latents.
    # (The first draw of seed 19 is the init image's posterior sample, as in diffusers.)
    pixels_mask = torch.from_numpy(np.asarray(mask) / 255.0)[None, None].float()
    keep = (torch.nn.functional.interpolate(pixels_mask, size=(32, 32)) < 0.5).expand_as(latents)
    pixels = torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1)[None].float()
    known = sd.encode_images(pixels, torch.Generator().manual_seed(19))
    assert torch.equal(latents[keep], known[keep])


def test_tensor_inputs_equal_pil_inputs(models):
    # An image tensor in [0, 1] and an (H, W) mask tensor are read as the PIL images they hold.
    sd, _ = models["sd1"]
    image, mask = init_pictures()
    image_t = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)
    mask_t = torch.from_numpy(np.asarray(mask).astype(np.float32) / 255.0)
    kwargs = dict(strength=0.75, steps=2, seed=5, output="latent")
    from_pil = sd.generate(PROMPT, init_image=image, mask_image=mask, **kwargs)
    from_tensors = sd.generate(PROMPT, init_image=image_t, mask_image=mask_t, **kwargs)
    assert torch.equal(from_pil, from_tensors)
    # A list of two images, one per prompt, gives two different results.
    pair = sd.generate([PROMPT, PROMPT], init_image=[image, image.transpose(PIL.Image.FLIP_LEFT_RIGHT)],
                       mask_image=mask, **kwargs)  # fmt: skip
    assert pair.shape[0] == 2 and (pair[0] - pair[1]).abs().max() > 1e-2


# --------------------------------------------------------------------------- SDXL base -> refiner
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_base_to_refiner_matches_diffusers(models, sampler):
    # StableDiffusionXLPipeline(denoising_end=0.5, output_type="latent") then
    # StableDiffusionXLImg2ImgPipeline(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    # (image=latents, denoising_start=0.5): the base runs timesteps 751, 501, the refiner 251, 1.
    base, base_parts = models["sdxl"]
    refiner, refiner_parts = models["sdxl-refiner"]
    scheduler = make_scheduler(sampler, "epsilon")
    table = table_of(scheduler)
    pipe = diffusers_pipe(StableDiffusionXLPipeline, base_parts, scheduler)
    theirs_mid = pipe(PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, denoising_end=0.5,
                      output_type="latent", generator=torch.Generator().manual_seed(20)).images  # fmt: skip
    ours_mid = base.generate(PROMPT, width=SIZE, height=SIZE, steps=STEPS, denoising_end=0.5, sampler=sampler,
                             schedule=table, seed=20, output="latent")  # fmt: skip
    # minisd hands over the VP latent; diffusers' Euler scheduler holds x0 + sigma n (VE), DPM-Solver VP.
    sigma = float(table.t_to_sigma(torch.tensor(251.0)))
    ours_as_theirs = from_variance_preserving(ours_mid, sigma) if sampler == "euler" else ours_mid
    assert_rel_close(ours_as_theirs, theirs_mid, LATENT_REL, "handoff latents")

    # The refiner: aesthetic scores 6.0 / 2.5, the empty negative prompt encoded (not zeroed).
    refine = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, refiner_parts, make_scheduler(sampler, "epsilon"),
                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)  # fmt: skip
    ours = dict(prompt=PROMPT, init_latents=ours_mid, steps=STEPS, denoising_start=0.5, sampler=sampler, schedule=table)
    theirs = dict(prompt=PROMPT, image=theirs_mid, num_inference_steps=STEPS, denoising_start=0.5)
    run_both(refiner, refine, ours, theirs, seed=21)


# --------------------------------------------------------------------------- seeds, callbacks, dtypes
def test_noise_conventions(models):
    # "a1111": image i from its own generator seeded seed + i, which is what diffusers does with
    # a list of generators; "diffusers" draws the batch from one generator. Image 0 coincides.
    sd, parts = models["sd1"]
    scheduler = make_scheduler("euler", "epsilon")
    pipe = diffusers_pipe(StableDiffusionPipeline, parts, scheduler)
    kwargs = dict(width=SIZE, height=SIZE, steps=2, schedule=table_of(scheduler), output="latent", num_images=3)
    a1111 = sd.generate(PROMPT, seed=30, noise="a1111", **kwargs)
    generators = [torch.Generator().manual_seed(30 + i) for i in range(3)]
    theirs = pipe(PROMPT, width=SIZE, height=SIZE, num_inference_steps=2, num_images_per_prompt=3,
                  generator=generators, output_type="latent").images  # fmt: skip
    assert_rel_close(a1111, theirs, LATENT_REL, "a1111 = diffusers with per-image generators")
    whole = sd.generate(PROMPT, seed=30, **kwargs)
    assert_rel_close(whole[:1], a1111[:1], LATENT_REL, "first image")
    assert (whole[1:] - a1111[1:]).abs().max() > 1e-2
    single = sd.generate(PROMPT, seed=31, **{**kwargs, "num_images": 1})
    assert_rel_close(a1111[1:2], single, LATENT_REL, "a1111 image 1 = seed 31 alone")
    # a passed generator is the seed's generator
    again = sd.generate(PROMPT, generator=torch.Generator().manual_seed(30), **kwargs)
    assert torch.equal(again, whole)


def test_callback_sees_every_step_and_can_stop(models):
    sd, _ = models["sd1"]
    kwargs = dict(width=SIZE, height=SIZE, steps=STEPS, seed=3, output="latent")
    seen = []
    full = sd.generate(PROMPT, callback=lambda info: seen.append((info["i"], info["sigma"])), **kwargs)
    assert [i for i, _ in seen] == list(range(STEPS))
    assert all(a[1] > b[1] for a, b in zip(seen, seen[1:]))
    stopped = []

    def stop_after_two(info):
        stopped.append(info["denoised"])
        return info["i"] < 1

    early = sd.generate(PROMPT, callback=stop_after_two, **kwargs)
    assert len(stopped) == 2
    # A stopped run returns that step's clean estimate (sigma = 0: VP = VE).
    assert torch.equal(early, stopped[-1]) and not torch.allclose(early, full)


def test_a_pipeline_result_says_where_the_callback_stopped(models):
    # The pipelines return `Sampled`: a run the callback cancels says at which step, one that
    # runs to the end says it was not stopped; `generate` returns the same latents.
    sd, _ = models["sd1"]
    prompt = Prompt((PROMPT,), ("",), MicroConditioning((SIZE, SIZE), (SIZE, SIZE)), guidance_scale=7.5)
    sampling = Sampling(steps=STEPS)

    def run(callback):
        return txt2img(sd, prompt, sampling, Noise(torch.Generator().manual_seed(3)), (SIZE, SIZE), callback)

    full = run(None)
    assert full.stopped_at is None
    early = run(lambda info: info["i"] < 2)
    assert early.stopped_at == 2 and not torch.allclose(early.latents, full.latents)
    assert torch.equal(full.latents, sd.generate(PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=3, output="latent"))


def test_unet_runs_in_its_own_dtype(models):
    # A bf16 U-Net gets bf16 inputs; sampling stays fp32; the fp32 VAE decodes in fp32.
    sd, _ = models["sd1"]
    u = unet.UNetModel(sd.unet.config).eval()
    u.load_state_dict(sd.unet.state_dict())
    half = dataclasses.replace(sd, unet=u.to(torch.bfloat16))
    seen = []
    u.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    kwargs = dict(width=SIZE, height=SIZE, steps=2, seed=4)
    out = half.generate(PROMPT, output="latent", **kwargs)
    assert set(seen) == {torch.bfloat16} and out.dtype == torch.float32
    reference = sd.generate(PROMPT, output="latent", **kwargs)
    assert_rel_close(out, reference, 5e-2, "bf16 U-Net vs fp32")  # bf16: 8 mantissa bits
    images = half.generate(PROMPT, output="tensor", **kwargs)
    assert images.dtype == torch.float32 and images.shape == (1, 3, SIZE, SIZE)
    assert 0 <= float(images.min()) and float(images.max()) <= 1


# --------------------------------------------------------------------------- bad input
def test_bad_requests_raise(models):
    sd, _ = models["sd1"]
    inpaint, _ = models["sd1-inpaint"]
    image, mask = init_pictures()
    ok = dict(width=SIZE, height=SIZE, steps=2)
    with pytest.raises(ValueError, match=r"multiples of 4 \(VAE factor 2 x U-Net factor 2.*got 66x64"):
        sd.generate(PROMPT, width=66, height=64)
    with pytest.raises(ValueError, match=r"steps: expected an integer >= 1, got 0"):
        sd.generate(PROMPT, **{**ok, "steps": 0})
    with pytest.raises(ValueError, match=r"strength: expected a value in \[0, 1\], got 1.5"):
        sd.generate(PROMPT, init_image=image, strength=1.5, steps=2)
    with pytest.raises(ValueError, match=r"leaves no step"):
        sd.generate(PROMPT, init_image=image, strength=0.1, steps=2)
    with pytest.raises(ValueError, match=r"strength needs an init_image"):
        sd.generate(PROMPT, strength=0.5, **ok)
    with pytest.raises(ValueError, match=r"mask_image is 32x64 \(HxW\) but init_image is 64x64"):
        sd.generate(PROMPT, init_image=image, mask_image=mask.resize((64, 32)), steps=2)
    with pytest.raises(ValueError, match=r"9-channel inpainting model needs both init_image and mask_image"):
        inpaint.generate(PROMPT, **ok)
    with pytest.raises(ValueError, match=r"inpainting needs both init_image and mask_image"):
        sd.generate(PROMPT, mask_image=mask, **ok)
    with pytest.raises(ValueError, match=r"output: expected one of \('pil', 'latent', 'tensor'\), got 'np'"):
        sd.generate(PROMPT, output="np", **ok)
    with pytest.raises(ValueError, match=r"sampler: expected one of .*got 'plms'"):
        sd.generate(PROMPT, sampler="plms", **ok)
    with pytest.raises(ValueError, match=r"noise: expected one of \('diffusers', 'a1111'\)"):
        sd.generate(PROMPT, noise="comfy", **ok)
    with pytest.raises(ValueError, match=r"pass seed or generator, not both"):
        sd.generate(PROMPT, seed=1, generator=torch.Generator(), **ok)
    with pytest.raises(ValueError, match=r"negative_prompt: expected 1 or 2 \(one per prompt\), got 3"):
        sd.generate([PROMPT, PROMPT], negative_prompt=["a", "b", "c"], **ok)
    with pytest.raises(ValueError, match=r"latents: expected the initial noise of shape \(1, 4, 32, 32\)"):
        sd.generate(PROMPT, latents=torch.zeros(1, 4, 16, 16), **ok)
    with pytest.raises(ValueError, match=r"differs from the init image's 64x64; resize the image first"):
        sd.generate(PROMPT, init_image=image, width=128, height=64, steps=2)
    with pytest.raises(ValueError, match=r"init_image: tensor values must lie in \[0, 1\], got \[-1"):
        sd.generate(PROMPT, init_image=torch.full((3, SIZE, SIZE), -1.0), steps=2)
    with pytest.raises(ValueError, match=r"target_size is not an input of the 'sd1' family"):
        sd.generate(PROMPT, target_size=(64, 64), **ok)
    with pytest.raises(ValueError, match=r"eta: sampler 'euler' has no eta"):
        sd.generate(PROMPT, eta=0.5, **ok)
    with pytest.raises(ValueError, match=r"denoising_start needs init_latents"):
        sd.generate(PROMPT, denoising_start=0.5, **ok)
    with pytest.raises(ValueError, match=r"num_images: expected an integer >= 1, got 0"):
        sd.generate(PROMPT, num_images=0, **ok)
    with pytest.raises(ValueError, match=r"latents \(the initial noise\) has no use with denoising_start"):
        sd.generate(PROMPT, init_latents=torch.zeros(1, 4, 32, 32), latents=torch.zeros(1, 4, 32, 32),
                    denoising_start=0.5, steps=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"no step to run"):
        sd.generate(PROMPT, denoising_end=0.1, **ok)  # the cut-off at t=900 is above the first step (t=501)


def test_refiner_from_pure_noise_warns(models, caplog):
    refiner, _ = models["sdxl-refiner"]
    with caplog.at_level(logging.WARNING, logger="minisd.pipeline"):
        out = refiner.generate(PROMPT, width=SIZE, height=SIZE, steps=1, seed=0, output="latent")
    assert out.shape == (1, 4, 32, 32)
    assert any("trained on the last 20% of the noise levels" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"target_size is not an input of the 'sdxl-refiner' family"):
        refiner.generate(PROMPT, width=SIZE, height=SIZE, steps=1, target_size=(64, 64))
