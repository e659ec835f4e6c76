"""The pipelines from prompt to latents: text-to-image, image-to-image, inpainting, and the refiner stage.

Each pipeline is a straight line over the same named steps (as mlx-examples'
`generate_latents` / `generate_latents_from_image`):

1. `encode`: prompts and negative prompts -> the U-Net's conditioning (context, SDXL's `y`);
2. the start latents: noise (`draw_noise`), or the init image's latents noised to the
   first sigma (`image_start`);
3. `guided_denoiser`: the U-Net as a denoiser D(x, sigma) with classifier-free guidance;
4. `sample`: the sampler over `sigmas_to_run`, returning DDPM (variance-preserving) latents;
5. decoding is `StableDiffusion.decode`, done by the caller that wants pixels.

`StableDiffusion.generate` (`minisd.model`) checks a request and picks the pipeline.
Choices made only to match diffusers for the same seed live in `compat`; the
conventions (sizes, VP latents, seeds, batch order) are in docs/pipelines.md.

A component whose output is NaN or infinite (NaN weights, an fp16 overflow) stops the run with a
`NonFiniteError` naming it and the step, rather than a black or white image (`check_finite`).
"""

from __future__ import annotations

import functools
import logging
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import compat
from .conditioning import Conditioning, MicroConditioning, pad_context, vector_conditioning
from .denoisers import Denoiser, DiscreteDenoiser, cfg_denoiser
from .samplers import Callback, SamplerPlan, plan_sampler
from .schedules import DiscreteSchedule, from_variance_preserving, img2img_start, split_sigmas, to_variance_preserving

if TYPE_CHECKING:
    from .model import StableDiffusion

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- errors
# reprlib elides inside long strings and containers without building their whole repr.
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxdict = 4
_SHOWN_MAX = 160  # characters of a value in an error message


def shown(value: object) -> str:
    """`value` as an error message shows it: a tensor or array by its type, shape and dtype;
    anything else by its repr, elided to a readable length, with the length it really has
    (a 10,000-item list or a 1 MB prompt must not flood the message)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(value.shape)} ({value.dtype})"
    text = _REPR.repr(value)
    text = text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."
    if isinstance(value, str | bytes) and len(value) > _REPR.maxstring:
        return f"{text} ({len(value)} characters)"
    if isinstance(value, list | tuple | set | dict) and len(value) > _REPR.maxlist:
        return f"{text} ({len(value)} items)"
    return text


_FP32 = "If the model runs in fp16, load it in fp32 (`minisd.load(..., dtype=torch.float32)`)"
_VAE32 = "{} in fp32 (`minisd.load(..., vae_dtype=torch.float32)`, the default: the SDXL VAE overflows in fp16)"
_WEIGHTS = "if it already is, the checkpoint's {} weights hold NaN or inf: check or re-download the file."
# What to try, by component (A1111 suggests the same: fp32 first, then the checkpoint).
_NON_FINITE_ADVICE = {
    "U-Net": f"{_FP32}; {_WEIGHTS.format('U-Net')}",
    "text encoder": f"{_FP32}; {_WEIGHTS.format('text encoder')}",
    "VAE encoder": f"{_VAE32.format('Encode')}; {_WEIGHTS.format('VAE')}",
    "VAE decoder": f"{_VAE32.format('Decode')}; {_WEIGHTS.format('VAE')}",
}


class NonFiniteError(ValueError):
    """A component's output holds NaN or infinite values, so the image would silently come out black or
    white (A1111: "A tensor with all NaNs was produced in Unet"). `component` is "U-Net", "text encoder",
    "VAE encoder" or "VAE decoder"; for the U-Net, `step` (0-based, the callback's "i") of `steps`, and
    `sigma`, say where."""

    def __init__(self, component: str, step: int | None = None, steps: int | None = None,
                 sigma: float | None = None) -> None:  # fmt: skip
        where = "" if step is None else f" at step {step} of {steps} (0-based; sigma {sigma:.4g})"
        advice = _NON_FINITE_ADVICE.get(component, "Check the checkpoint's weights.")
        super().__init__(f"{component} output is NaN or infinite{where}; the image would come out black or white. "
                         f"{advice}")  # fmt: skip
        self.component, self.step, self.steps, self.sigma = component, step, steps, sigma


def check_finite(t: torch.Tensor, component: str, **where) -> torch.Tensor:
    """`t`, if all its values are finite; else a `NonFiniteError` naming `component` (and `where`: step,
    steps, sigma). One reduction and one device sync per call, cheap beside the model call it checks."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(component, **where)
    return t


def check_tensor(name: str, value: object) -> torch.Tensor:
    """A tensor argument (`latents`, `init_latents`): a floating-point tensor whose values are all finite."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point torch.Tensor, got {shown(value)}")
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or infinite of {value.numel()}; "
                         "check where it came from (NaN latents decode to a black image)")  # fmt: skip
    return value


def check_latents(name: str, value: object, channels: int) -> torch.Tensor:
    """Latents to start from: a finite float tensor `(B, channels, h, w)`."""
    t = check_tensor(name, value)
    if t.dim() != 4 or t.shape[1] != channels:
        raise ValueError(f"{name}: expected (B, {channels}, h, w), got {tuple(t.shape)}")
    return t


# ---------------------------------------------------------------------- what a pipeline is asked
@dataclass(frozen=True)
class Prompt:
    """What to draw. The batch is [prompt 0] * num_images + [prompt 1] * num_images + ...
    (diffusers' order); `negatives` holds one negative prompt per prompt."""

    prompts: tuple[str, ...]
    negatives: tuple[str, ...]
    micro: MicroConditioning  # SDXL's size/crop/aesthetic conditioning (read by families with `y`)
    num_images: int = 1
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0  # Lin et al. 2023's phi
    clip_skip: int = 0
    prompt_syntax: str = "plain"  # "plain", "a1111" or "comfy" (prompt_syntax.py, docs/prompts.md)

    @property
    def batch(self) -> int:
        """The number of images: prompts x images per prompt."""
        return len(self.prompts) * self.num_images

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs when the scale exceeds 1 (diffusers; 0 means "no guidance")."""
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class Sampling:
    """How to sample: a named sampler (`samplers.SAMPLER_NAMES`) over the training schedule."""

    sampler: str = "euler"
    steps: int = 50  # over the whole schedule (img2img runs the last int(steps * strength))
    spacing: str = "leading"  # diffusers' timestep_spacing; "leading" is the official configs'
    eta: float | None = None  # the sampler's eta, for samplers that have one
    schedule: DiscreteSchedule = field(default_factory=DiscreteSchedule.scaled_linear)
    denoising_end: float | None = None  # stop above this fraction of the timesteps (SDXL base -> refiner)

    def plan(self) -> SamplerPlan:
        """The sampler plan (sigmas and steps) for these settings."""
        return plan_sampler(self.sampler, self.schedule, self.steps, spacing=self.spacing, eta=self.eta)


@dataclass(frozen=True)
class Noise:
    """The run's randomness: every draw comes from `generator`, in diffusers' order. The initial
    noise is `latents` when the caller gives it, else drawn by `convention` ("diffusers": the
    whole batch at once; "a1111": image i from seed + i)."""

    generator: torch.Generator
    convention: str = "diffusers"
    latents: torch.Tensor | None = None


@dataclass(frozen=True)
class Sampled:
    """A pipeline's result: scaled latents in the DDPM's variance-preserving form, and the step at
    which the callback stopped the run (then the latents are that step's clean estimate), if it did."""

    latents: torch.Tensor
    stopped_at: int | None = None


@dataclass(frozen=True)
class InitImage:
    """Where img2img starts: images `(B, 3, H, W)` in [0, 1], encoded by the VAE (a posterior sample)."""

    images: torch.Tensor

    def latents(self, sd: StableDiffusion, prompt: Prompt, generator: torch.Generator) -> torch.Tensor:
        """The init images encoded by the VAE, one per image of the batch: (B, C, H/f, W/f)."""
        return expand(sd.encode_images(self.images, generator), prompt, "init_image").to(sd.device)


@dataclass(frozen=True)
class InitLatents:
    """Where img2img (or the refiner) starts: scaled VP latents, e.g. the SDXL base's `output="latent"`."""

    given: torch.Tensor

    def latents(self, sd: StableDiffusion, prompt: Prompt, generator: torch.Generator) -> torch.Tensor:
        """The given latents in fp32, one per image of the batch: (B, C, h, w)."""
        given = check_latents("init_latents", self.given, sd.unet.config.out_channels)
        return expand(given.float(), prompt, "init_latents").to(sd.device)


Init = InitImage | InitLatents


@dataclass(frozen=True)
class MaskedImage:
    """What inpainting repaints: images `(B, 3, H, W)` in [0, 1], and masks `(1 or B, 1, H, W)`
    binarized to {0, 1} (`images.masks_to_tensor`), where 1 (white) is repainted."""

    images: torch.Tensor
    masks: torch.Tensor


# ---------------------------------------------------------------------- the pipelines
def txt2img(sd: StableDiffusion, prompt: Prompt, sampling: Sampling, noise: Noise,
            size: tuple[int, int], callback: Callback | None = None) -> Sampled:  # fmt: skip
    """Text to image (diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline): pure noise at
    the first sigma, denoised to the end of the schedule (or to `denoising_end`)."""
    if sd.family.low_noise_only:
        what = "text-to-image from pure noise will look poor. Pass init_image, or init_latents with denoising_start."
        logger.warning("%s was trained on the last 20%% of the noise levels only; %s", sd.family.name, what)
    plan = sampling.plan()
    sigmas = sigmas_to_run(plan, sampling, first=0)
    conds = encode(sd, prompt)
    x = draw_noise(sd, noise, latent_shape(sd, prompt, size)) * plan.init_noise_sigma
    model = guided_denoiser(sd, sampling, plan, prompt, conds)
    return sample(plan, model, x, sigmas, noise.generator, callback)


def img2img(sd: StableDiffusion, prompt: Prompt, sampling: Sampling, noise: Noise,
            init: Init, strength: float, callback: Callback | None = None) -> Sampled:  # fmt: skip
    """Image to image (StableDiffusion(XL)Img2ImgPipeline, SDEdit: Meng et al. 2022): the init
    latents noised to the sigma `strength` of the way up the schedule, then denoised from there."""
    plan = sampling.plan()
    sigmas = sigmas_to_run(plan, sampling, first=img2img_start(sampling.steps, strength))
    conds = encode(sd, prompt)
    known = init.latents(sd, prompt, noise.generator)  # the posterior sample is drawn before the noise
    x = image_start(known, draw_noise(sd, noise, tuple(known.shape)), float(sigmas[0]))
    model = guided_denoiser(sd, sampling, plan, prompt, conds)
    return sample(plan, model, x, sigmas, noise.generator, callback)


def refine(sd: StableDiffusion, prompt: Prompt, sampling: Sampling, generator: torch.Generator,
           init: Init, denoising_start: float, callback: Callback | None = None) -> Sampled:  # fmt: skip
    """The refiner stage of SDXL (StableDiffusionXLImg2ImgPipeline with `denoising_start`): continue
    a run whose VP latents stopped at `denoising_start`, adding no noise."""
    plan = sampling.plan()
    sigmas = sigmas_to_run(plan, sampling, first=split_sigmas(sampling.schedule, plan.sigmas, denoising_start))
    conds = encode(sd, prompt)
    x = from_variance_preserving(init.latents(sd, prompt, generator), float(sigmas[0]))  # at sigma_0 already
    model = guided_denoiser(sd, sampling, plan, prompt, conds)
    return sample(plan, model, x, sigmas, generator, callback)


def inpaint(sd: StableDiffusion, prompt: Prompt, sampling: Sampling, noise: Noise,
            target: MaskedImage, strength: float, callback: Callback | None = None) -> Sampled:  # fmt: skip
    """Inpainting with a 9-channel U-Net (StableDiffusionInpaintPipeline; LDM's inpainting models):
    the mask and the masked image's latents are extra input channels at every step."""
    plan = sampling.plan()
    from_noise = strength == 1.0  # diffusers' `is_strength_max`: the image enters only as the extra channels
    sigmas = sigmas_to_run(plan, sampling, first=0 if from_noise else img2img_start(sampling.steps, strength))
    conds = encode(sd, prompt)
    known = None if from_noise else InitImage(target.images).latents(sd, prompt, noise.generator)
    n = draw_noise(sd, noise, latent_shape(sd, prompt, tuple(target.images.shape[-2:])))
    mask = latent_mask(target.masks, prompt, n)
    # diffusers' `init_image * (mask < 0.5)` in [-1, 1]: repainted pixels become 0, mid-gray
    masked = InitImage(torch.where(target.masks >= 0.5, 0.5, target.images)).latents(sd, prompt, noise.generator)
    conds = conds.with_concat(torch.cat([mask, masked], dim=1))  # x, mask, masked image: LDM's channel order
    x = n * plan.init_noise_sigma if from_noise else image_start(known, n, float(sigmas[0]))
    model = guided_denoiser(sd, sampling, plan, prompt, conds)
    return sample(plan, model, x, sigmas, noise.generator, callback)


def inpaint_blend(sd: StableDiffusion, prompt: Prompt, sampling: Sampling, noise: Noise,
                  target: MaskedImage, strength: float, callback: Callback | None = None) -> Sampled:  # fmt: skip
    """Inpainting with an ordinary 4-channel U-Net (diffusers' StableDiffusionInpaintPipeline): the
    kept region is overwritten with the init latents at every step (`keep_known`)."""
    plan = sampling.plan()
    from_noise = strength == 1.0
    sigmas = sigmas_to_run(plan, sampling, first=0 if from_noise else img2img_start(sampling.steps, strength))
    conds = encode(sd, prompt)
    known = InitImage(target.images).latents(sd, prompt, noise.generator)
    n = draw_noise(sd, noise, tuple(known.shape))
    mask = latent_mask(target.masks, prompt, n)
    compat.draw_unused_masked_image(noise.generator, target.images, target.masks, known, sd.vae.dtype)
    x = n * plan.init_noise_sigma if from_noise else image_start(known, n, float(sigmas[0]))
    model = keep_known(guided_denoiser(sd, sampling, plan, prompt, conds), mask, known, n, float(sigmas[0]))
    out = sample(plan, model, x, sigmas, noise.generator, callback)
    return Sampled(mask * out.latents + (1 - mask) * known, out.stopped_at)  # diffusers' last blend: the clean init


# ---------------------------------------------------------------------- hires fix: two passes
# A1111's latent upscalers (modules/shared_items.py `latent_upscale_modes`): F.interpolate modes, no antialias.
HIRES_UPSCALERS = {
    "latent": ("bilinear", "Latent"),
    "latent-nearest": ("nearest-exact", "Latent (nearest-exact)"),
    "pixel": ("bicubic", "pixel (bicubic)"),  # decode, resize the image, encode again
}


@dataclass(frozen=True)
class Hires:
    """A1111's "hires fix": the second pass of `hires_fix`. `scale` multiplies the base size (rounded down
    to the model's size multiple); `strength` is the second pass's denoising strength; it runs `steps`
    steps (None: as many as the first pass); `upscale` is a key of `HIRES_UPSCALERS`."""

    scale: float = 2.0
    strength: float = 0.7  # A1111's default denoising strength
    steps: int | None = None
    upscale: str = "latent"

    def size(self, size: tuple[int, int], multiple: int) -> tuple[int, int]:
        """(height, width) of the second pass."""
        return int(size[0] * self.scale) // multiple * multiple, int(size[1] * self.scale) // multiple * multiple

    def sampling(self, sampling: Sampling) -> tuple[Sampling, int]:
        """The second pass's schedule and its first step. As A1111's `setup_img2img_steps` with the steps
        given (sd_samplers_common.py): a schedule of int(n / strength) steps of which the last n run, so
        exactly n steps run whatever the strength (diffusers' img2img runs int(steps * strength))."""
        n = self.steps or sampling.steps
        total = int(n / min(self.strength, 0.999))
        return replace(sampling, steps=total, denoising_end=None), total - n


def hires_fix(sd: StableDiffusion, prompt: Prompt, sampling: Sampling, noise: Noise, size: tuple[int, int],
              hires: Hires, callback: Callback | None = None) -> Sampled:  # fmt: skip
    """A1111's hires fix (processing.py, `StableDiffusionProcessingTxt2Img.sample_hr_pass`): txt2img at
    `size`, its latents upscaled (`upscale_latents`), then img2img at the larger size from the same generator."""
    first = txt2img(sd, prompt, sampling, noise, size, callback)
    if first.stopped_at is not None:
        return first
    big = hires.size(size, sd.size_multiple)
    known = upscale_latents(sd, first.latents, big, hires.upscale, noise.generator)
    if prompt.micro.target_size == size:  # SDXL's default micro-conditioning follows the image size
        prompt = replace(prompt, micro=replace(prompt.micro, original_size=big, target_size=big))
    second, start = hires.sampling(sampling)
    plan = second.plan()
    sigmas = sigmas_to_run(plan, second, first=start)
    conds = encode(sd, prompt)
    x = image_start(known, draw_noise(sd, replace(noise, latents=None), tuple(known.shape)), float(sigmas[0]))
    model = guided_denoiser(sd, second, plan, prompt, conds)
    return sample(plan, model, x, sigmas, noise.generator, callback)


def upscale_latents(sd: StableDiffusion, latents: torch.Tensor, size: tuple[int, int], how: str,
                    generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """VP latents resized to an image of `size` pixels: in latent space (A1111's "Latent" upscalers:
    `F.interpolate(samples, mode=..., antialias=False)`), or decoded, resized in pixels, and encoded again."""
    mode = HIRES_UPSCALERS[how][0]
    if how != "pixel":
        f = sd.vae.config.downsample_factor
        return F.interpolate(latents, size=(size[0] // f, size[1] // f), mode=mode)
    images = F.interpolate(sd.decode(latents, output="tensor"), size=size, mode=mode).clamp(0, 1)
    return sd.encode_images(images, generator).to(latents.device)


# ---------------------------------------------------------------------- 1. encode the prompts
@dataclass(frozen=True)
class Conditions:
    """The U-Net's keyword inputs (`context`, SDXL's `y`, inpainting's `concat`) for the prompts and
    for the negative prompts, each laid out for the batch."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]

    def with_concat(self, concat: torch.Tensor) -> Conditions:
        """These conditions with `concat` (channels concatenated to the U-Net input) on both sides."""
        return Conditions({**self.cond, "concat": concat}, {**self.uncond, "concat": concat})


def encode(sd: StableDiffusion, prompt: Prompt) -> Conditions:
    """Step 1: the conditioning of the prompts and of the negative prompts (SDXL base encodes an empty
    negative prompt as zeros, `Family.zero_empty_negative`; the negative's `y` uses its aesthetic score).
    Long prompts ("a1111" / "comfy" syntax) may give the two sides different numbers of 77-token chunks:
    the shorter is padded with its empty prompt's encoding (A1111's `pad_cond_uncond`)."""
    pos = _encoded(sd, prompt, prompt.prompts, negative=False)
    neg = _encoded(sd, prompt, prompt.negatives, negative=True)
    tokens = max(pos.context.shape[1], neg.context.shape[1])
    pos, neg = _padded(sd, prompt, pos, tokens, negative=False), _padded(sd, prompt, neg, tokens, negative=True)
    return Conditions(_condition(sd, prompt, pos, negative=False), _condition(sd, prompt, neg, negative=True))


def _encoded(sd: StableDiffusion, prompt: Prompt, texts: tuple[str, ...], *, negative: bool) -> Conditioning:
    zero_empty = negative and sd.family.zero_empty_negative
    return sd.encode_prompt(list(texts), clip_skip=prompt.clip_skip, zero_empty=zero_empty,
                            prompt_syntax=prompt.prompt_syntax)  # fmt: skip


def _padded(sd: StableDiffusion, prompt: Prompt, c: Conditioning, tokens: int, *, negative: bool) -> Conditioning:
    if c.context.shape[1] == tokens:
        return c
    return pad_context(c, tokens, _encoded(sd, prompt, ("",), negative=negative))


def _condition(sd: StableDiffusion, prompt: Prompt, c: Conditioning, *, negative: bool):
    check_finite(c.context, "text encoder")  # else the U-Net would be blamed for it
    out = {"context": c.context.repeat_interleave(prompt.num_images, dim=0).to(sd.device)}
    if sd.family.y_inputs:  # SDXL: pooled text vector and micro-conditioning (the same sizes for the negative)
        pooled = c.pooled.repeat_interleave(prompt.num_images, dim=0).to(sd.device)
        out["y"] = vector_conditioning(pooled, sd.family.y_inputs, prompt.micro.values(negative=negative))
    return out


# ---------------------------------------------------------------------- 2. the start latents
def latent_shape(sd: StableDiffusion, prompt: Prompt, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(batch, latent channels, h, w) of an image of `size` = (height, width) pixels."""
    f = sd.vae.config.downsample_factor
    return prompt.batch, sd.unet.config.out_channels, size[0] // f, size[1] // f


def draw_noise(sd: StableDiffusion, noise: Noise, shape: tuple[int, ...]) -> torch.Tensor:
    """Unit-variance noise of `shape`, fp32 on the model's device: the caller's `latents`, or a
    draw on the generator's device (diffusers' `randn_tensor`) by the noise convention."""
    if noise.latents is not None:
        if tuple(check_tensor("latents", noise.latents).shape) != tuple(shape):
            raise ValueError(
                f"latents: expected the initial noise of shape {tuple(shape)}, got {tuple(noise.latents.shape)}"
            )
        return noise.latents.to(sd.device, torch.float32)
    g = noise.generator
    if noise.convention == "diffusers":  # the whole batch at once
        n = torch.randn(shape, generator=g, device=g.device, dtype=torch.float32)
    else:  # "a1111": image i from seed + i (image 0 from the generator itself)
        gens = [g] + [torch.Generator(g.device).manual_seed(g.initial_seed() + i) for i in range(1, shape[0])]
        n = torch.cat(
            [torch.randn((1, *shape[1:]), generator=gi, device=gi.device, dtype=torch.float32) for gi in gens]
        )
    return n.to(sd.device)


def image_start(known: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The init latents noised to `sigma`, x = x0 + sigma n: every diffusers scheduler's `add_noise`, in VE form."""
    return known + sigma * noise


def latent_mask(masks: torch.Tensor, prompt: Prompt, like: torch.Tensor) -> torch.Tensor:
    """The mask at latent resolution (nearest, as diffusers), laid out for the batch."""
    return expand(F.interpolate(masks, size=like.shape[-2:]), prompt, "mask_image").to(like.device)


def expand(t: torch.Tensor, prompt: Prompt, name: str) -> torch.Tensor:
    """Per-item tensors laid out for the batch [prompt 0] * num_images + [prompt 1] * num_images + ...:
    one item for all, one per prompt, or one per output image."""
    n, batch = len(prompt.prompts), prompt.batch
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.repeat(batch, *([1] * (t.dim() - 1)))
    if t.shape[0] == n:
        return t.repeat_interleave(prompt.num_images, dim=0)
    raise ValueError(f"{name}: expected 1, {n} (one per prompt) or {batch} items, got {t.shape[0]}")


# ---------------------------------------------------------------------- 3. the guided denoiser
def guided_denoiser(
    sd: StableDiffusion, sampling: Sampling, plan: SamplerPlan, prompt: Prompt, conds: Conditions
) -> Denoiser:
    """Step 3: the U-Net as D(x, sigma): the sampler's math in fp32, the U-Net in its own dtype
    (`DiscreteDenoiser` casts), with classifier-free guidance when the scale exceeds 1."""
    denoiser = DiscreteDenoiser(_unet_fn(sd.unet), sampling.schedule, sd.prediction_type, quantize=plan.quantize,
                                model_dtype=sd.dtype)  # fmt: skip
    if prompt.guided:
        return cfg_denoiser(denoiser, conds.cond, conds.uncond, prompt.guidance_scale, prompt.guidance_rescale)
    return functools.partial(denoiser, **conds.cond)


def _unet_fn(unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """The U-Net as the denoiser's `model(x, t, context, y=None, concat=None)`.

    Inpainting U-Nets take [x, mask, masked-image latents] on the channel axis (sgm's
    `OpenAIWrapper`: `torch.cat((x, c["concat"]), dim=1)`). diffusers concatenates after
    `scale_model_input`, so the extra channels are not scaled by c_in; neither are they here."""

    def model(x, t, context, y=None, concat=None):
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        return unet(x, t, context, y)

    return model


def keep_known(
    model: Denoiser, mask: torch.Tensor, known: torch.Tensor, noise: torch.Tensor, sigma_start: float
) -> Denoiser:
    """Inpainting with an ordinary (4-channel) U-Net, as diffusers' StableDiffusionInpaintPipeline.

    After each step diffusers overwrites the kept region (mask 0) with the init latents
    noised to the new level, known + sigma n (n: the initial noise), and blends in the
    clean `known` after the last step. Every sampler updates each latent pixel from that
    pixel alone (given the model's output), so the overwrite matters only where the
    model reads it: its input. Here the model sees the overwritten latents, the
    repainted region evolves exactly as in diffusers (for any sampler), and the caller
    puts `known` back at the end. The first call, at sigma_start, sees the start
    unchanged, as diffusers' first model call does."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        # Chosen on the device (torch.where), not by reading sigma back: no host sync per step.
        s = sigma[0]
        return model(torch.where(s < sigma_start, mask * x + (1 - mask) * (known + s * noise), x), sigma)

    return denoise


# ---------------------------------------------------------------------- 4. sample
def sigmas_to_run(plan: SamplerPlan, sampling: Sampling, first: int) -> torch.Tensor:
    """The plan's sigmas from step `first` to the end, or to StableDiffusionXLPipeline's `denoising_end`."""
    sigmas, end = plan.sigmas, sampling.denoising_end
    last = sigmas.numel() - 1 if end is None else split_sigmas(sampling.schedule, sigmas, end)
    if last <= first:
        raise ValueError(
            f"no step to run: the range starts at step {first} and ends at step {last} of {sampling.steps}"
        )
    return sigmas[first : last + 1]


class _Stopped(Exception):
    """Raised through the sampler when the caller's callback returns False."""

    def __init__(self, step: int, denoised: torch.Tensor) -> None:
        super().__init__(f"stopped by the callback at step {step}")
        self.step, self.denoised = step, denoised


def sample(plan: SamplerPlan, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator,
           callback: Callback | None = None) -> Sampled:  # fmt: skip
    """Step 4: run the sampler over `sigmas` and return the DDPM (VP) latent at the last one. A callback
    that returns False stops the run; the result is then that step's clean estimate, marked stopped.
    Each step's clean estimate is checked finite (`NonFiniteError` naming the U-Net and the step): before
    the callback sees it, or, without a callback, on the device, read once after the loop (reading a
    value back at every step would make the host wait for the GPU at every step)."""
    steps = sigmas.numel() - 1
    finite: list[torch.Tensor] = []  # per step, without a callback: a 0-d bool on the device

    def on_step(info: dict) -> None:
        if callback is None:
            finite.append(torch.isfinite(info["denoised"]).all())
            return
        check_finite(info["denoised"], "U-Net", step=info["i"], steps=steps, sigma=info["sigma"])
        if callback(info) is False:
            raise _Stopped(info["i"], info["denoised"])

    try:
        x = plan.run(model, x, sigmas, generator=generator, callback=on_step)
    except _Stopped as stop:
        logger.info("minisd.pipeline: %s", stop)
        return Sampled(stop.denoised, stopped_at=stop.step)  # a clean estimate: sigma 0, where VE = VP
    if finite and not bool(torch.stack(finite).all()):  # the one read-back: name the first bad step
        step = int(torch.stack(finite).logical_not().nonzero()[0])
        raise NonFiniteError("U-Net", step=step, steps=steps, sigma=float(sigmas[step]))
    # the callback sees each step's first model call; a later one (Heun, DPM2) shows only in the result
    check_finite(x, "U-Net", step=steps - 1, steps=steps, sigma=float(sigmas[-2]))
    return Sampled(to_variance_preserving(x, float(sigmas[-1])))
