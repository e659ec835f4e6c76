"""Bad requests to `StableDiffusion.generate`, images of every PIL mode, and non-finite model outputs.

Each bad-input class of issue 9 that `generate` owns has a test here that names the error it gets:

- arguments of the wrong type, NaN or infinite numbers, and non-finite tensors (`BAD_ARGUMENTS`);
- long values in error messages, cut to a readable length (`minisd.pipeline.shown`);
- PIL images and masks of every mode, read by their real range (`minisd.images.pil_to_array`);
- a NaN or inf produced by the U-Net, the text encoder or the VAE: `minisd.NonFiniteError`, naming
  the component and, for the U-Net, the step and sigma.

The models are tiny random SD1 and SDXL-refiner-like models built from minisd modules (the configs
of tests/tiny.py), 32 x 32 pixels, two steps: only the checks and the data flow are under test here;
parity with diffusers is tests/test_pipeline.py's.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import numpy as np
import PIL.Image
import pytest
import torch

import minisd
from minisd.clip import TextTransformer
from minisd.families import FAMILIES
from minisd.images import images_to_tensor, masks_to_tensor, pil_to_array
from minisd.model import StableDiffusion
from minisd.pipeline import NonFiniteError, shown
from minisd.unet import UNetModel
from minisd.vae import AutoencoderKL
from tests.test_pipeline import minisd_model
from tests.test_unet import randomize
from tests.tiny import tiny_config

PROMPT = "a red cube"
SIZE = 32  # pixels: 16 x 16 latents (tiny VAE factor 2)
OK = dict(width=SIZE, height=SIZE, steps=2, seed=0)
NAN, INF = math.nan, math.inf


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def tiny_model(family: str, seed: int = 0) -> StableDiffusion:
    """A tiny random model of `family` from minisd's own modules, every parameter seeded."""
    cfg = tiny_config(family)
    u, v = UNetModel(cfg["unet"]).eval(), AutoencoderKL(cfg["vae"]).eval()
    encoders = [TextTransformer(c).eval() for c in cfg["text_encoders"]]
    for i, module in enumerate([u, v, *encoders]):
        randomize(module, seed + i)
    uses = [t.use(e.config.layers) for t, e in zip(FAMILIES[family].text, encoders)]
    return minisd_model(family, u, v, encoders, uses)


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return tiny_model("sd1")


@pytest.fixture(scope="module")
def refiner() -> StableDiffusion:
    return tiny_model("sdxl-refiner")


def gray(value: float) -> torch.Tensor:
    """A (1, 3, SIZE, SIZE) init image tensor of one gray level."""
    return torch.full((1, 3, SIZE, SIZE), value)


# --------------------------------------------------------------------------- arguments
def one_bad(t: torch.Tensor, value: float = NAN) -> torch.Tensor:
    """`t` with `value` in its first entry."""
    t = t.clone()
    t.view(-1)[0] = value
    return t


def bad(case: str, message: str, **kwargs) -> pytest.param:
    """One class of bad input: `generate(PROMPT, **OK, **kwargs)` raises a ValueError matching `message`,
    which names the argument, what was expected and what was got."""
    return pytest.param({**OK, **kwargs}, message, id=case)


LATENTS = (1, 4, 16, 16)
BAD_ARGUMENTS = [
    bad("width float", r"width: expected an integer, got 32\.0 \(float\); pass a Python int", width=32.0),
    bad("width str", r"width: expected an integer, got '32' \(str\)", width="32"),
    bad("height bool", r"height: expected an integer, got True \(bool\)", height=True),
    bad("steps float", r"steps: expected an integer >= 1, got 2\.0 \(float\)", steps=2.0),
    bad("steps bool", r"steps: expected an integer >= 1, got True \(bool\)", steps=True),
    bad("num_images str", r"num_images: expected an integer >= 1, got '2' \(str\)", num_images="2"),
    bad("num_images bool", r"num_images: expected an integer >= 1, got True \(bool\)", num_images=True),
    bad("seed bool", r"seed: expected an integer in \[-9223372036854775808, .*got True \(bool\)", seed=True),
    bad("seed float", r"seed: expected an integer in .*got 1\.5 \(float\)", seed=1.5),
    bad("seed too large", r"seed: expected an integer in .*18446744073709551615\], got 18446", seed=2**64),
    bad("clip_skip negative", r"clip_skip: expected an integer >= 0, got -1", clip_skip=-1),
    bad("guidance_scale NaN", r"guidance_scale: expected a finite number, got nan", guidance_scale=NAN),
    bad("guidance_scale inf", r"guidance_scale: expected a finite number, got inf", guidance_scale=INF),
    bad("guidance_scale str", r"guidance_scale: expected a finite number, got '7\.5' \(str\)", guidance_scale="7.5"),
    bad("guidance_rescale NaN", r"guidance_rescale: expected a value in \[0, 1\], got nan", guidance_rescale=NAN),
    bad("guidance_rescale > 1", r"guidance_rescale: expected a value in \[0, 1\], got 1.5", guidance_rescale=1.5),
    bad("strength NaN", r"strength: expected a value in \[0, 1\], got nan", init_image=gray(0.5), strength=NAN),
    bad("strength -inf", r"strength: expected a value in \[0, 1\], got -inf", init_image=gray(0.5), strength=-INF),
    bad("eta NaN", r"eta: expected a value in \[0, 1\], got nan", sampler="ddim", eta=NAN),
    bad("denoising_end NaN", r"denoising_end: expected a value in \(0, 1\), got nan", denoising_end=NAN),
    bad("denoising_end 1", r"denoising_end: expected a value in \(0, 1\), got 1", denoising_end=1),
    bad(
        "denoising_start inf",
        r"denoising_start: expected a value in \(0, 1\), got inf",
        init_latents=torch.zeros(LATENTS),
        denoising_start=INF,
    ),
    bad(
        "latents NaN",
        r"latents: expected finite values, got 1 NaN or infinite of 1024",
        latents=one_bad(torch.zeros(LATENTS)),
    ),
    bad("latents list", r"latents: expected a floating-point torch.Tensor, got \[\[0\.0\]\]", latents=[[0.0]]),
    bad(
        "init_latents inf",
        r"init_latents: expected finite values, got 1 NaN or infinite of 1024",
        init_latents=one_bad(torch.zeros(LATENTS), INF),
    ),
    bad(
        "init_latents int",
        r"init_latents: expected a floating-point torch.Tensor, got a Tensor of shape "
        r"\(1, 4, 16, 16\) \(torch.int64\)",
        init_latents=torch.zeros(LATENTS, dtype=torch.int64),
    ),
    bad(
        "init_image NaN tensor",
        r"init_image: tensor values must be finite, in \[0, 1\], got 1 NaN or infinite "
        "of 3072",
        init_image=one_bad(gray(0.5)),
    ),
    bad(
        "mask_image inf tensor",
        r"mask_image: tensor values must be finite, in \[0, 1\], got 1 NaN or infinite",
        init_image=gray(0.5),
        mask_image=one_bad(torch.ones(SIZE, SIZE), INF),
    ),
    bad(
        "init_image array",
        r"init_image: expected a PIL image, a torch tensor or a list of them, got a ndarray "
        r"of shape \(32, 32, 3\) \(float64\); convert arrays",
        init_image=np.zeros((SIZE, SIZE, 3)),
    ),
    bad("generator str", r"generator: expected a torch.Generator, got 'cpu'", seed=None, generator="cpu"),
    bad("output list", r"output: expected one of \('pil', 'latent', 'tensor'\), got \['pil'\]", output=["pil"]),
    bad("schedule str", r"schedule: expected a DiscreteSchedule or None, got 'linear'", schedule="linear"),
]


@pytest.mark.reliability(
    "generate: arguments",
    "a size, step count, image count, clip_skip or seed that is not an integer (float, str, bool)",
    "`ValueError`: `width: expected an integer, got 32.0 (float); pass a Python int`",
)
@pytest.mark.reliability(
    "generate: arguments",
    "a NaN or infinite `guidance_scale` (NaN used to turn guidance off silently)",
    "`ValueError`: `guidance_scale: expected a finite number, got nan`",
)
@pytest.mark.reliability(
    "generate: arguments",
    "a NaN, infinite or out-of-range `guidance_rescale`, `strength`, `eta`, `denoising_start` or `denoising_end`",
    "`ValueError`: `strength: expected a value in [0, 1], got nan`",
)
@pytest.mark.reliability(
    "generate: arguments",
    "NaN or inf in `latents`, `init_latents`, an init-image or a mask tensor",
    "`ValueError`: `latents: expected finite values, got 1 NaN or infinite of 1024` "
    "(images: `tensor values must be finite`)",
)
@pytest.mark.reliability(
    "generate: arguments",
    "a wrong type for `latents`, `init_latents`, `init_image`, `generator`, `output` or `schedule`",
    "`ValueError` naming the argument and the type: `init_latents: expected a floating-point torch.Tensor, "
    "got a Tensor of shape (1, 4, 16, 16) (torch.int64)`",
)
@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS)
def test_bad_arguments_are_named(sd, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sd.generate(PROMPT, **kwargs)


MICRO = ["aesthetic_score", "negative_aesthetic_score", "original_size", "crop_coords_top_left"]


@pytest.mark.reliability(
    "generate: arguments",
    "NaN, inf or text in SDXL micro-conditioning (sizes, crop, aesthetic scores)",
    "`ValueError`: `aesthetic_score: expected finite numbers (one set for all images, or one per image), got nan`",
)
@pytest.mark.parametrize("name", MICRO)
@pytest.mark.parametrize("value", [NAN, INF, "high", (64, NAN)], ids=["nan", "inf", "str", "pair-with-nan"])
def test_micro_conditioning_must_be_finite_numbers(refiner, name, value):
    if "score" not in name and not isinstance(value, tuple):
        value = (value, 64)
    kwargs = dict(OK, init_latents=torch.zeros(1, 4, 16, 16), denoising_start=0.5, output="latent")
    with pytest.raises(ValueError, match=rf"{name}: expected finite numbers .*got .*(nan|inf|'high')"):
        refiner.generate(PROMPT, **kwargs, **{name: value})


def test_numpy_numbers_are_accepted(sd):
    """A numpy integer or float is a number: the same run as with Python numbers."""
    plain = sd.generate(PROMPT, **OK, guidance_scale=3.0, output="latent")
    as_numpy = dict(width=np.int64(SIZE), height=np.int32(SIZE), steps=np.int64(2), seed=np.uint32(0))
    assert torch.equal(sd.generate(PROMPT, **as_numpy, guidance_scale=np.float32(3.0), output="latent"), plain)


@pytest.mark.reliability(
    "generate: arguments",
    "a 10,000-item prompt list or a 1 MB value in an error message",
    "the value cut to a readable length with its real size: `['prompt 0', 'prompt 1', ...] (10001 items)`",
)
def test_long_values_are_cut_in_messages(sd):
    prompts = [f"prompt {i}" for i in range(10_000)] + [None]
    with pytest.raises(ValueError) as err:
        sd.generate(prompts, **OK)
    message = str(err.value)
    assert message.startswith("prompt: expected a str or a non-empty list of str, got ['prompt 0', 'prompt 1'")
    assert message.endswith("(10001 items)") and len(message) < 200
    with pytest.raises(ValueError) as err:
        sd.generate(PROMPT, **OK, sampler="x" * 1_000_000)
    assert str(err.value).endswith("(1000000 characters)") and len(str(err.value)) < 1000


def test_shown_cuts_values_to_a_readable_length():
    assert shown(0.5) == "0.5" and shown("euler") == "'euler'" and shown([1, 2]) == "[1, 2]"
    assert shown(list(range(100))) == "[0, 1, 2, 3, 4, 5, ...] (100 items)"
    assert shown(torch.zeros(2, 3)) == "a Tensor of shape (2, 3) (torch.float32)"
    long = shown("ab" * 5000)
    assert long.endswith("(10000 characters)") and len(long) < 100
    nested = shown([["x" * 1000] * 1000] * 1000)
    assert len(nested) < 200 and nested.endswith("(1000 items)")


# --------------------------------------------------------------------------- PIL modes
def _palette(mode: str, index_color: tuple[int, int, int]) -> PIL.Image.Image:
    im = PIL.Image.new(mode, (4, 4), 0 if mode == "P" else (0, 255))
    im.putpalette(list(index_color) + [0] * 765)
    return im


# (mode, the image, the RGB it must read as, in [0, 1]). Every mode of PIL.Image.MODES; the 8-bit ones
# as PIL converts them to RGB (alpha dropped, not composited), 16-bit by / 65535, float as [0, 1].
PIL_MODES = [
    ("1", PIL.Image.new("1", (4, 4), 1), (1.0, 1.0, 1.0)),
    ("L", PIL.Image.new("L", (4, 4), 128), (128 / 255,) * 3),
    ("LA", PIL.Image.new("LA", (4, 4), (128, 0)), (128 / 255,) * 3),
    ("La", PIL.Image.new("La", (4, 4), (64, 128)), (127 / 255,) * 3),  # premultiplied: 64 / (128 / 255)
    ("P", _palette("P", (10, 20, 30)), (10 / 255, 20 / 255, 30 / 255)),
    ("PA", _palette("PA", (10, 20, 30)), (10 / 255, 20 / 255, 30 / 255)),
    ("RGB", PIL.Image.new("RGB", (4, 4), (10, 128, 250)), (10 / 255, 128 / 255, 250 / 255)),
    ("RGBA", PIL.Image.new("RGBA", (4, 4), (10, 128, 250, 0)), (10 / 255, 128 / 255, 250 / 255)),
    ("RGBa", PIL.Image.new("RGBa", (4, 4), (64, 64, 64, 128)), (127 / 255,) * 3),
    ("RGBX", PIL.Image.new("RGBX", (4, 4), (10, 128, 250, 0)), (10 / 255, 128 / 255, 250 / 255)),
    ("CMYK", PIL.Image.new("CMYK", (4, 4), (0, 0, 0, 128)), (127 / 255,) * 3),  # 50% black ink
    ("YCbCr", PIL.Image.new("YCbCr", (4, 4), (128, 128, 128)), (128 / 255,) * 3),
    ("LAB", PIL.Image.new("LAB", (4, 4), (128, 128, 128)), (119 / 255,) * 3),  # L* 50 is sRGB 119
    ("HSV", PIL.Image.new("HSV", (4, 4), (0, 255, 255)), (1.0, 0.0, 0.0)),
    ("I;16", PIL.Image.new("I;16", (4, 4), 32768), (32768 / 65535,) * 3),
    ("I;16L", PIL.Image.new("I;16L", (4, 4), 32768), (32768 / 65535,) * 3),
    ("I;16B", PIL.Image.new("I;16B", (4, 4), 32768), (32768 / 65535,) * 3),
    ("I;16N", PIL.Image.new("I;16N", (4, 4), 32768), (32768 / 65535,) * 3),
    ("I", PIL.Image.new("I", (4, 4), 32768), (32768 / 65535,) * 3),
    ("F", PIL.Image.new("F", (4, 4), 0.25), (0.25,) * 3),
]


def test_every_pil_mode_is_covered():
    assert {m for m, _, _ in PIL_MODES} >= set(PIL.Image.MODES)


@pytest.mark.reliability(
    "generate: images",
    "a 16-bit (`I;16`, `I;16L`, `I;16B`, `I;16N`, `I`) or float (`F`) PIL image (a 50% gray I;16 used to read white)",
    "read by its real range: / 65535, float taken as [0, 1]; every 8-bit mode by PIL's exact RGB conversion",
)
@pytest.mark.parametrize("mode, image, rgb", PIL_MODES, ids=[m for m, _, _ in PIL_MODES])
def test_pil_images_read_by_their_real_range(mode, image, rgb):
    assert image.mode == mode
    t = images_to_tensor(image)
    assert t.shape == (1, 3, 4, 4) and t.dtype == torch.float32
    expected = torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(1, 3, 4, 4)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)


def test_16_bit_ramp_reads_linearly():
    """0, 50% and full white of a 16-bit image read 0, 0.5 and 1 (today's bug: 50% gray read as white)."""
    for mode in ("I;16", "I;16B", "I"):
        im = PIL.Image.new(mode, (3, 1))
        im.putdata([0, 32768, 65535])
        assert pil_to_array(im, "x", gray=True)[0].tolist() == pytest.approx([0.0, 32768 / 65535, 1.0], abs=1e-7)


@pytest.mark.reliability(
    "generate: images",
    "an `I` image outside 0-65535, an `F` image outside [0, 1] or with NaN",
    "`ValueError`: `init_image: a PIL 'F' image must hold values in [0, 1], got [255, 255]; scale it to [0, 1] ...`",
)
@pytest.mark.parametrize(
    "mode, value, message",
    [
        ("I", 70000, r"init_image: a PIL 'I' image must hold values in \[0, 65535\], got \[70000, 70000\]; mode 'I'"),
        ("I", -1, r"init_image: a PIL 'I' image must hold values in \[0, 65535\], got \[-1, -1\]"),
        ("F", 255.0, r"init_image: a PIL 'F' image must hold values in \[0, 1\], got \[255, 255\]; .*divide by 255"),
        ("F", NAN, r"init_image: a PIL 'F' image must hold values in \[0, 1\], got \[nan, nan\]"),
    ],
)
def test_wide_pil_images_outside_their_range_raise(mode, value, message):
    with pytest.raises(ValueError, match=message):
        images_to_tensor(PIL.Image.new(mode, (4, 4), value))


# (mode, value just below half of the mode's white, value at or just above it)
MASK_THRESHOLDS = [
    ("1", 0, 1),
    ("L", 127, 128),
    ("LA", (127, 255), (128, 0)),  # alpha ignored
    ("RGB", (127, 127, 127), (128, 128, 128)),
    ("RGBA", (127, 127, 127, 255), (255, 255, 255, 0)),
    ("LAB", (0, 128, 128), (255, 128, 128)),  # PIL has no LAB -> L: read through RGB
    ("I;16", 32767, 32768),
    ("I;16B", 32767, 32768),
    ("I", 32767, 32768),
    ("F", 0.4999, 0.5),
]


@pytest.mark.reliability(
    "generate: images",
    "a 16-bit or float PIL mask (an F mask of 1.0 used to read as keep)",
    "binarized at half of the mode's range: 128 of 255, 32768 of 65535, 0.5 of F",
)
@pytest.mark.parametrize("mode, keep, repaint", MASK_THRESHOLDS, ids=[m[0] for m in MASK_THRESHOLDS])
def test_masks_binarize_at_half_of_the_mode_range(mode, keep, repaint):
    masks = masks_to_tensor([PIL.Image.new(mode, (4, 4), keep), PIL.Image.new(mode, (4, 4), repaint)])
    assert masks.shape == (2, 1, 4, 4)
    assert masks[0].eq(0).all() and masks[1].eq(1).all()


def test_float_mask_of_one_is_repainted():
    """Today's bug: an "F" mask of 1.0 went through convert("L") to 1 of 255 and read as "keep"."""
    assert masks_to_tensor(PIL.Image.new("F", (4, 4), 1.0)).eq(1).all()
    with pytest.raises(ValueError, match=r"mask_image: a PIL 'F' image must hold values in \[0, 1\], got \[255, 255\]"):
        masks_to_tensor(PIL.Image.new("F", (4, 4), 255.0))


def test_wide_mode_images_reach_the_pipeline(sd):
    """A 50% gray I;16 init image and an F mask of 1.0 run as the equal tensors do."""
    gray16 = PIL.Image.new("I;16", (SIZE, SIZE), 32768)
    as_tensor = sd.generate(PROMPT, **OK, init_image=gray(32768 / 65535), output="latent")
    assert torch.equal(sd.generate(PROMPT, **OK, init_image=gray16, output="latent"), as_tensor)
    mask = PIL.Image.new("F", (SIZE, SIZE), 1.0)
    as_tensor = sd.generate(PROMPT, **OK, init_image=gray16, mask_image=torch.ones(SIZE, SIZE), output="latent")
    assert torch.equal(sd.generate(PROMPT, **OK, init_image=gray16, mask_image=mask, output="latent"), as_tensor)


# --------------------------------------------------------------------------- non-finite outputs
def with_poisoned(sd: StableDiffusion, part: str, parameter: str, value: float) -> StableDiffusion:
    """A copy of `sd` whose `part` ("unet", "vae", "text_encoders") has `value` in one entry of `parameter`."""
    module = copy.deepcopy(getattr(sd, part))
    target = module[0] if part == "text_encoders" else module
    with torch.no_grad():
        target.get_parameter(parameter).view(-1)[0] = value
    return dataclasses.replace(sd, **{part: module})


@pytest.mark.reliability(
    "generate: non-finite output",
    "NaN or inf from the U-Net (NaN weights, an fp16 overflow)",
    "`minisd.NonFiniteError`: `U-Net output is NaN or infinite at step 0 of 2 (0-based; sigma ...)` "
    "and what to try (fp32, the checkpoint)",
)
@pytest.mark.parametrize("value", [NAN, INF])
def test_unet_nan_weight_names_the_unet_and_step(sd, value):
    bad = with_poisoned(sd, "unet", "input_blocks.0.0.weight", value)
    message = r"^U-Net output is NaN or infinite at step 0 of 2 \(0-based; sigma \d"
    with pytest.raises(NonFiniteError, match=message) as err:
        bad.generate(PROMPT, **OK)
    assert isinstance(err.value, ValueError) and minisd.NonFiniteError is NonFiniteError
    assert err.value.component == "U-Net" and err.value.step == 0 and err.value.sigma > 1
    assert "dtype=torch.float32" in str(err.value) and "checkpoint" in str(err.value)


def test_unet_nan_at_a_later_step_is_located(sd):
    """The U-Net turns non-finite at its second call (step 1): the error says step 1 and that step's sigma."""
    calls, sigmas = [], []
    hook = sd.unet.register_forward_hook(lambda m, i, out: out * math.nan if len(calls) == 1 else calls.append(1))
    try:
        with pytest.raises(NonFiniteError) as err:
            sd.generate(PROMPT, **OK, callback=lambda info: sigmas.append(info["sigma"]))
    finally:
        hook.remove()
    assert err.value.step == 1 and len(sigmas) == 1  # the callback never saw the bad step
    assert err.value.sigma < sigmas[0] and re.search(r"at step 1 of 2 \(0-based; sigma ", str(err.value))


def test_unet_nan_in_a_last_extra_evaluation_is_caught(sd):
    """Heun's second evaluation of the last step (with denoising_end, sigma_next > 0) shows only in the
    result, after the last callback: the result is checked too."""
    calls, seen = [], []
    kwargs = dict(OK, steps=4, sampler="heun", denoising_end=0.5, output="latent")
    hook = sd.unet.register_forward_hook(lambda m, i, out: calls.append(1))
    sd.generate(PROMPT, **kwargs)
    hook.remove()
    n = len(calls)  # the U-Net calls of one run; the last is a second evaluation
    poison = sd.unet.register_forward_hook(lambda m, i, out: out * NAN if len(calls) == 2 * n - 1 else calls.append(1))
    try:
        with pytest.raises(NonFiniteError) as err:
            sd.generate(PROMPT, **kwargs, callback=lambda info: seen.append(info["i"]))
    finally:
        poison.remove()
    steps = err.value.steps
    assert n == 2 * steps and seen == list(range(steps))  # every step's callback saw finite values
    assert err.value.step == steps - 1 and f"at step {steps - 1} of {steps}" in str(err.value)


@pytest.mark.reliability(
    "generate: non-finite output",
    "NaN or inf from the VAE decoder (a black or white image)",
    "`minisd.NonFiniteError`: `VAE decoder output is NaN or infinite; ...` and `vae_dtype=torch.float32`",
)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan-black", "inf-white"])
def test_vae_decoder_nan_names_the_decoder(sd, value):
    bad = with_poisoned(sd, "vae", "decoder.conv_out.bias", value)
    latents = bad.generate(PROMPT, **OK, output="latent")  # the U-Net's part is fine
    assert torch.isfinite(latents).all()
    with pytest.raises(NonFiniteError, match=r"^VAE decoder output is NaN or infinite; .*vae_dtype=torch.float32"):
        bad.generate(PROMPT, **OK)
    with pytest.raises(NonFiniteError, match=r"^VAE decoder"):
        bad.decode(latents, output="tensor")


@pytest.mark.reliability(
    "generate: non-finite output",
    "NaN or inf from the VAE encoder (img2img, inpainting)",
    "`minisd.NonFiniteError`: `VAE encoder output is NaN or infinite; ...`",
)
def test_vae_encoder_nan_names_the_encoder(sd):
    bad = with_poisoned(sd, "vae", "encoder.conv_in.weight", NAN)
    with pytest.raises(NonFiniteError, match=r"^VAE encoder output is NaN or infinite"):
        bad.generate(PROMPT, **OK, init_image=gray(0.5))


@pytest.mark.reliability(
    "generate: non-finite output",
    "NaN or inf from a text encoder",
    "`minisd.NonFiniteError`: `text encoder output is NaN or infinite; ...`",
)
def test_text_encoder_nan_names_the_text_encoder(sd):
    bad = with_poisoned(sd, "text_encoders", "positional_embedding", NAN)
    with pytest.raises(NonFiniteError, match=r"^text encoder output is NaN or infinite"):
        bad.generate(PROMPT, **OK)


@pytest.mark.reliability(
    "generate: arguments",
    "NaN latents passed to `StableDiffusion.decode`",
    "`ValueError`: `latents: expected finite values, got 1 NaN or infinite of 1024`",
)
def test_decode_rejects_non_finite_latents(sd):
    latents = torch.zeros(1, 4, 16, 16)
    latents[0, 0, 0, 0] = NAN
    with pytest.raises(ValueError, match=r"latents: expected finite values, got 1 NaN or infinite of 1024"):
        sd.decode(latents)
