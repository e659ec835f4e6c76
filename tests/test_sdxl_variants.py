"""More SDXL single files: v-prediction / zero-terminal-SNR fine-tunes, and the 9-channel inpainting model.

The models are tiny official SDXL files (tests/tiny.py), changed as the real variants differ:

- v-prediction fine-tunes carry the empty marker keys `v_pred` (and `ztsnr`) at the top level, as
  ComfyUI reads them (comfy/supported_models.py, `SDXL.model_type`), or SAI ModelSpec's
  `modelspec.prediction_type` metadata ("epsilon" / "v", as kohya's sai_model_spec writes it);
- the inpainting model (sd_xl_base_1.0_inpainting_0.1) has a U-Net whose `input_blocks.0.0.weight` takes
  9 channels (latents, mask, masked-image latents).

Each is loaded by minisd, exported with `minisd.save(..., format="diffusers")` (the exporter is checked
against diffusers in tests/test_sdxl_export.py), and run by diffusers' own pipeline from that folder with a
scheduler built here from the official config: `StableDiffusionXLPipeline` with
EulerDiscreteScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
timestep_spacing="trailing") and guidance_rescale 0.7, and `StableDiffusionXLInpaintPipeline`. minisd
runs with its defaults for the family (no `schedule=` or `timestep_spacing=` given): images within 1/255
and latents within LATENT_REL (tests/test_pipeline.py explains both; minisd's float64 training table
and diffusers' fp32 one differ by ~1e-6 relative, well inside it).
"""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

import minisd
from minisd.families import FAMILIES, UNET_PREFIX
from minisd.keymap import CheckpointError
from tests.test_pipeline import OFFICIAL, PROMPT, init_pictures
from tests.test_sdxl_export import from_pretrained, run_both
from tests.tiny import official_checkpoint, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

SIZE, STEPS = 64, 4
# A zero-terminal-SNR run starts at sigma_max = 4096 (alphabar 2^-24): the first sample x = sigma_max * n,
# |n| up to ~4.5, has magnitude ~1.8e4, where fp32 numbers lie 2^-9 = 2e-3 apart. Rounding it (half that)
# in another order on each side stays in the latents as an absolute error of ~1e-3, which is 1.5-2e-4 of
# max|latent| (~5.6) -- measured 1.5e-4, with minisd's table or diffusers' fp32 one alike. A wrong
# schedule, spacing or parameterization moves the latents by O(1) (checked below).
VPRED_LATENT_REL = 5e-4
# Inpainting: the same fp32 round-off as tests/test_pipeline.py's LATENT_REL, on latents that also carry
# the VAE's encoding of the init image through guidance 7.5; measured 0.8e-5 (strength 1) and 1.4e-5
# (strength 0.75) of max|latent|, too close to 2e-5 for other CPUs' kernels. A wrong mask, masked-image
# latent or conditioning moves them by O(1) (measured 0.3 with guidance 5 instead of the pipeline's 7.5).
INPAINT_LATENT_REL = 5e-5


def _write(tmp_path, name: str, tensors: dict, metadata: dict | None = None):
    path = tmp_path / name
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _sdxl(**extra) -> dict[str, torch.Tensor]:
    return {**official_checkpoint("sdxl", seed=3).tensors, **extra}


MARKER = torch.zeros(0)  # an empty tensor, as the merging tools write them


# --------------------------------------------------------------------------- detection
@pytest.mark.parametrize(
    "extra,metadata,prediction,ztsnr,evidence",
    [
        ({"v_pred": MARKER, "ztsnr": MARKER}, None, "v_prediction", True, ["'v_pred'", "ztsnr"]),
        ({"v_pred": MARKER}, None, "v_prediction", False, ["'v_pred'"]),
        ({"ztsnr": MARKER}, None, "epsilon", False, ["sdxl models are trained with epsilon"]),  # ComfyUI: alone, no say
        ({}, {"modelspec.prediction_type": "v"}, "v_prediction", False, ["modelspec.prediction_type='v'"]),
        ({}, {"modelspec.prediction_type": "epsilon"}, "epsilon", False, ["modelspec.prediction_type='epsilon'"]),
        ({}, None, "epsilon", False, ["sdxl models are trained with epsilon"]),
    ],
)
def test_prediction_markers_and_metadata(tmp_path, extra, metadata, prediction, ztsnr, evidence):
    path = _write(tmp_path, "xl.safetensors", _sdxl(**extra), metadata)
    found = minisd.detect(path)
    assert (found.family.prediction_type, found.family.zero_terminal_snr) == (prediction, ztsnr)
    sd = minisd.load(path, config=tiny_config("sdxl"), device="meta")
    assert (sd.prediction_type, sd.family.zero_terminal_snr) == (prediction, ztsnr)
    assert sd.family.timestep_spacing == ("trailing" if ztsnr else "leading")
    for words in evidence:
        assert words in sd.prediction_reason
    assert set(extra) <= set(sd.ignored)  # the markers are read, not loaded


@pytest.mark.reliability(
    "load: prediction type",
    "an SDXL file whose `v_pred` marker and modelspec.prediction_type metadata disagree",
    "CheckpointError naming both, and prediction_type= to choose",
)
def test_contradicting_markers_are_refused(tmp_path):
    path = _write(tmp_path, "xl.safetensors", _sdxl(v_pred=MARKER), {"modelspec.prediction_type": "epsilon"})
    with pytest.raises(CheckpointError, match="contradicts itself.*'v_pred'.*epsilon"):
        minisd.detect(path)


def test_caller_prediction_type_drops_zero_terminal_snr(tmp_path):
    path = _write(tmp_path, "xl.safetensors", _sdxl(v_pred=MARKER, ztsnr=MARKER))
    sd = minisd.load(path, config=tiny_config("sdxl"), device="meta", prediction_type="epsilon")
    assert sd.prediction_type == "epsilon" and not sd.family.zero_terminal_snr


# --------------------------------------------------------------------------- parity with diffusers
def _export(sd, tmp_path, name: str):
    return minisd.save(sd, tmp_path / name, format="diffusers")


@torch.no_grad()
def test_vpred_ztsnr_sdxl_matches_diffusers(tmp_path):
    path = _write(tmp_path, "vpred.safetensors", _sdxl(v_pred=MARKER, ztsnr=MARKER))
    sd = minisd.load(path, config=tiny_config("sdxl"))
    assert sd.prediction_type == "v_prediction" and sd.family.zero_terminal_snr
    folder = _export(sd, tmp_path, "vpred-diffusers")
    again = minisd.load(folder)  # the folder's scheduler config says it back
    assert again.prediction_type == "v_prediction" and again.family.zero_terminal_snr
    reloaded = minisd.load(minisd.save(sd, tmp_path / "again.safetensors"))  # and the official file's markers
    assert reloaded.family.zero_terminal_snr and {"v_pred", "ztsnr"} <= set(reloaded.ignored)
    pipe = from_pretrained(StableDiffusionXLPipeline, folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        {**OFFICIAL, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    )
    assert pipe.scheduler.alphas_cumprod[-1] == 2.0**-24  # diffusers' stand-in for alphabar = 0
    ours = dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, sampler="euler", guidance_rescale=0.7)
    theirs = dict(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_rescale=0.7)
    rel, pixels = run_both(sd, pipe, ours, theirs, seed=50, rel=VPRED_LATENT_REL)
    print(f"v-pred ztsnr sdxl: latent error {rel:.2e} of max|latent|, max pixel difference {pixels}")
    # The same file read as epsilon with the leading schedule gives another picture: the defaults mattered.
    eps = sd.generate(**ours, seed=50, output="latent", timestep_spacing="leading")
    assert (eps - sd.generate(**ours, seed=50, output="latent")).abs().max() > 1e-2


def _inpainting_sdxl() -> dict[str, torch.Tensor]:
    """The tiny SDXL file with a 9-channel first convolution (seeded, std 1/sqrt(fan_in) as tests/test_unet.py)."""
    tensors = _sdxl()
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    out_ch, _, kh, kw = tensors[key].shape
    g = torch.Generator().manual_seed(9)
    tensors[key] = torch.randn(out_ch, 9, kh, kw, generator=g) / (9 * kh * kw) ** 0.5
    return tensors


@pytest.mark.parametrize("strength", [1.0, 0.75])
@torch.no_grad()
def test_sdxl_inpainting_matches_diffusers(tmp_path, strength):
    path = _write(tmp_path, "xl-inpaint.safetensors", _inpainting_sdxl())
    config = tiny_config("sdxl")
    config["unet"] = dataclasses.replace(config["unet"], in_channels=9)
    sd = minisd.load(path, config=config)
    assert sd.family.name == "sdxl-inpaint" and sd.family.inpainting
    assert sd.family.y_inputs == FAMILIES["sdxl"].y_inputs
    folder = _export(sd, tmp_path, "inpaint-diffusers")
    assert minisd.load(folder).family.name == "sdxl-inpaint"
    pipe = from_pretrained(StableDiffusionXLInpaintPipeline, folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config({**OFFICIAL, "prediction_type": "epsilon"})
    image, mask = init_pictures()
    ours = dict(prompt=PROMPT, init_image=image, mask_image=mask, strength=strength, steps=STEPS, sampler="euler")
    theirs = dict(prompt=PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=STEPS,
                  width=SIZE, height=SIZE)  # fmt: skip
    rel, pixels = run_both(sd, pipe, ours, theirs, seed=51, rel=INPAINT_LATENT_REL)
    print(f"sdxl inpaint (strength {strength}): latent error {rel:.2e} of max|latent|, max pixel difference {pixels}")
