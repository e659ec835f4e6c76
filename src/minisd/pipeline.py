"""A loaded Stable Diffusion model: its components, and the pipelines from prompt to pixels.

`StableDiffusion` is what `minisd.load` returns. It holds the components and the
settings that tie them together (family, prediction type, VAE scale factor, how the
text encoders are read), and runs the pipelines through one method, `generate`:

| call                                                   | diffusers pipeline it reproduces                       |
|--------------------------------------------------------|--------------------------------------------------------|
| `generate(prompt)`                                     | StableDiffusionPipeline, StableDiffusionXLPipeline     |
| `generate(prompt, init_image=, strength=)`             | StableDiffusion(XL)Img2ImgPipeline                     |
| `generate(prompt, init_image=, mask_image=)`           | StableDiffusionInpaintPipeline (9- or 4-channel U-Net) |
| base `generate(prompt, denoising_end=, output="latent")` | StableDiffusionXLPipeline(denoising_end=)            |
| refiner `generate(prompt, init_latents=, denoising_start=)` | StableDiffusionXLImg2ImgPipeline(denoising_start=) |

The stages are those of every reference pipeline: encode the prompts
(`conditioning`), draw the noise, encode the init image (`vae`), sample
(`samplers`, in fp32), decode, convert (`images`). Where diffusers' behaviour is a
choice rather than the math, the choice is named where it is made; the list:

- Sizes must be multiples of (VAE factor) x (U-Net factor): 64 px for SD1/SD2 and the
  SDXL refiner, 32 for SDXL base. diffusers accepts multiples of 8 because its U-Net
  resizes each upsampled map to its skip connection; the official LDM/sgm U-Net
  (minisd's) halves and doubles exactly. Init images and masks are never resized.
- `output="latent"` returns variance-preserving latents, the DDPM's x_t =
  (x0 + sigma n) / sqrt(1 + sigma^2) (what sgm's samplers take and what diffusers'
  DDIM / DPM-Solver hold). They are the clean scaled latents whenever sampling ends
  at sigma = 0; after `denoising_end`, diffusers' Euler-type schedulers hand over
  x0 + sigma n instead (multiply by sqrt(1 + sigma^2) to compare). `init_latents`
  with `denoising_start` is read in the same VP form.
- `clip_skip` applies to the prompt and the negative prompt (A1111, ComfyUI);
  diffusers applies it to the prompt only.
- SDXL base encodes an empty negative prompt as zeros (diffusers'
  `force_zeros_for_empty_prompt=True`, sgm's `force_uc_zero_embeddings=["txt"]`); the
  refiner encodes "" (its model_index.json and diffusers' single-file loader set
  the flag False). minisd zeroes each "" of a list; diffusers only when no
  negative prompt was passed at all.
- guidance_scale <= 1 runs the conditional model alone, as diffusers does (so 0
  means "no guidance", the SDXL-Turbo convention, not "unconditional").
- One init image or mask serves the whole batch; with one per prompt, image i goes
  with prompt i for all its `num_images` (diffusers tiles them instead).

Seeds (`noise=`): "diffusers" draws the initial noise of the whole batch, (B, 4, h, w),
in fp32 from one CPU `torch.Generator` seeded with `seed` (diffusers' `randn_tensor`
with a CPU generator; ComfyUI draws the same tensor). "a1111" draws image i from its
own generator seeded `seed + i` (A1111 with "RNG source: CPU"). The two coincide for
the first image (CPU randn fills in blocks of 16, so the first image of a batch draw
is the single-image draw). Every later draw (VAE posterior samples, ancestral/SDE
step noise) comes from the `seed` generator in diffusers' order. The start is
noise * sqrt(1 + sigma_0^2) (`SamplerPlan.init_noise_sigma`: diffusers' "leading"
spacing, sgm, ComfyUI); k-diffusion / A1111 use noise * sigma_0.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import PIL.Image
import torch
import torch.nn.functional as F

from .clip import TextTransformer
from .conditioning import Conditioning, encode_prompt, refiner_vector, sdxl_vector
from .families import FamilySpec, TextEncoderUse
from .images import ImageInput, images_to_tensor, masks_to_tensor, tensor_to_pil, to_unit_range
from .denoisers import Denoiser, DiscreteDenoiser, cfg_denoiser
from .samplers import SAMPLER_NAMES, Callback, plan_sampler
from .schedules import DiscreteSchedule, from_variance_preserving, img2img_start, split_sigmas, to_variance_preserving
from .tokenizer import CLIPTokenizer
from .unet import UNetModel
from .vae import AutoencoderKL

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "latent", "tensor")
NOISE_CONVENTIONS = ("diffusers", "a1111")
DEFAULT_STEPS = 50  # diffusers' num_inference_steps default


@dataclass
class StableDiffusion:
    """A ready model.

    Attributes:
        family: "sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl" or "sdxl-refiner".
        spec: the family's spec with the architecture actually loaded.
        unet, vae: the denoiser network and the autoencoder.
        text_encoders: the family's text encoders in official order (SDXL: CLIP-L, bigG).
        text_uses: how each encoder is read (layer, final LN, pad token).
        tokenizer: the CLIP BPE tokenizer.
        prediction_type: "epsilon" or "v_prediction".
        prediction_reason: how the prediction type was decided.
        ignored: checkpoint keys that were not loaded, with the reason for each.
    """

    family: str
    spec: FamilySpec
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[TextTransformer]
    text_uses: list[TextEncoderUse]
    tokenizer: CLIPTokenizer
    prediction_type: str
    prediction_reason: str = ""
    ignored: dict[str, str] = field(default_factory=dict)

    @property
    def scale_factor(self) -> float:
        """Latents are multiplied by this after encoding (LDM's `scale_factor`)."""
        return self.vae.config.scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE downsampling x U-Net downsampling."""
        return self.vae.config.downsample_factor * self.unet.config.downsample_factor

    def encode_prompt(self, prompts: str | Sequence[str], *, clip_skip: int = 0, zero_empty: bool = False) -> Conditioning:
        """Encode prompts as this family was trained (see `conditioning.encode_prompt`)."""
        return encode_prompt(
            prompts, self.family, self.text_encoders, self.tokenizer, uses=self.text_uses, clip_skip=clip_skip, zero_empty=zero_empty
        )

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component."""
        counts = {"unet": _count(self.unet), "vae": _count(self.vae)}
        for i, enc in enumerate(self.text_encoders):
            counts[f"text_encoder{'' if i == 0 else '_' + str(i + 1)}"] = _count(enc)
        return counts

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [0, 1] -> scaled latents: a posterior sample (drawn from
        `generator`, diffusers' `retrieve_latents(sample_mode="sample")`) times `scale_factor`. fp32."""
        vae_device = next(self.vae.parameters()).device
        posterior = self.vae.encode((2.0 * images - 1.0).to(vae_device))  # [0, 1] -> [-1, 1]
        return (posterior.sample(generator) * self.scale_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output: str = "pil") -> list[PIL.Image.Image] | torch.Tensor:
        """Scaled (VP) latents -> PIL images, or a `(B, 3, H, W)` fp32 tensor in [0, 1] (`output="tensor"`).
        The VAE runs in its own dtype (keep it fp32: the SDXL VAE overflows in fp16)."""
        _check_choice("output", output, ("pil", "tensor"))
        vae_device = next(self.vae.parameters()).device
        images = to_unit_range(self.vae.decode(latents.to(vae_device) / self.scale_factor))
        return tensor_to_pil(images) if output == "pil" else images

    # ------------------------------------------------------------------ the pipeline
    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        sampler: str = "euler",
        schedule: DiscreteSchedule | None = None,
        timestep_spacing: str = "leading",
        eta: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        num_images: int = 1,
        output: str = "pil",
        callback: Callback | None = None,
        clip_skip: int = 0,
        guidance_rescale: float = 0.0,
        noise: str = "diffusers",
        init_image: ImageInput | None = None,
        init_latents: torch.Tensor | None = None,
        strength: float | None = None,
        mask_image: ImageInput | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        original_size: tuple[int, int] | None = None,
        crop_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
    ) -> list[PIL.Image.Image] | torch.Tensor:
        """Text-to-image, image-to-image, inpainting, or one stage of SDXL's base -> refiner.

        Args:
            prompt: a prompt or a list of them (the batch); `negative_prompt` likewise (one for
                all, or one per prompt). Each prompt gives `num_images` images, in prompt order.
            width, height: pixels; default the family's training size (`spec.default_size`), or
                the init image's size. Multiples of `size_multiple`.
            steps: the sampler's steps over the whole schedule (img2img runs the last
                `int(steps * strength)` of them, as diffusers).
            guidance_scale: classifier-free guidance scale (default `spec.default_guidance`);
                <= 1 runs without guidance. guidance_rescale: Lin et al. 2023's phi.
            sampler: a name of `samplers.SAMPLER_NAMES` ("euler", "ddim", "dpmpp_2m_karras", ...);
                timestep_spacing: diffusers' "leading" (the official configs), "linspace" or
                "trailing"; eta: the sampler's eta where it has one (DDIM, ancestral, SDE).
            schedule: the training noise table (default the official float64
                `DiscreteSchedule.scaled_linear()`; diffusers computes it in fp32).
            seed / generator: the randomness (one of them; neither: a fresh random seed).
                noise: "diffusers" or "a1111" (see the module docstring).
            latents: the initial noise `(B * num_images, 4, h, w)`, unit variance, instead of a draw.
            output: "pil" (list of images), "tensor" (`(B, 3, H, W)` fp32 in [0, 1]) or
                "latent" (VP latents, see the module docstring).
            callback: called once per step with {"i", "x", "sigma", "sigma_next", "denoised"};
                return False to stop early (the current clean estimate is returned).
            clip_skip: read the text encoders this many blocks earlier.
            init_image: PIL image(s) or tensor(s) in [0, 1]: img2img, or the image to inpaint.
            init_latents: scaled VP latents to start from instead of an image (the base's
                output for the refiner's `denoising_start`).
            strength: how much of the schedule to run from the noised init image (diffusers'
                defaults: 0.8 img2img, 0.3 SDXL img2img, 1.0 inpainting = pure noise start).
            mask_image: white (>= 0.5) is repainted. 9-channel inpainting models get the mask and
                the masked image's latents as extra input channels; other models keep the known
                latents by blending at every step (diffusers' 4-channel inpainting).
            denoising_end / denoising_start: run only the steps above / below this fraction of
                the training timesteps (SDXL base -> refiner, `schedules.split_sigmas`).
            original_size, crop_coords_top_left, target_size: SDXL micro-conditioning, (h, w)
                and (top, left); default the output size, (0, 0), the output size.
            aesthetic_score, negative_aesthetic_score: the refiner's (default 6.0 and 2.5).
        """
        # 1. The request, checked before any work.
        prompts = _prompt_list(prompt, "prompt")
        negatives = _negative_list(negative_prompt, len(prompts))
        _check_choice("output", output, OUTPUT_TYPES)
        _check_choice("noise", noise, NOISE_CONVENTIONS)
        _check_choice("sampler", sampler, SAMPLER_NAMES)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images: expected an integer >= 1, got {num_images!r}")
        if init_image is not None and init_latents is not None:
            raise ValueError("pass init_image or init_latents, not both")
        if latents is not None and denoising_start is not None:
            raise ValueError("latents (the initial noise) has no use with denoising_start, which adds no noise")
        scale = self.spec.default_guidance if guidance_scale is None else float(guidance_scale)
        micro = self._micro_conditioning(
            original_size, crop_coords_top_left, target_size, aesthetic_score, negative_aesthetic_score
        )
        images = None if init_image is None else images_to_tensor(init_image)
        masks = None if mask_image is None else masks_to_tensor(mask_image)
        # Inpainting U-Nets (9 input channels) take the mask and masked image as extra channels;
        # any other model inpaints by keeping the known latents (`_keep_known`).
        concat_inpaint = self.unet.config.in_channels != self.unet.config.out_channels
        inpaint = masks is not None or concat_inpaint
        self._check_init(images, masks, concat_inpaint, inpaint, denoising_start)
        height, width = self._output_size(width, height, images, init_latents)
        has_init = images is not None or init_latents is not None
        if self.family == "sdxl-refiner" and not has_init:
            logger.warning(
                "minisd.pipeline: the SDXL refiner was trained on the last 20% of the noise levels only; "
                "text-to-image from pure noise will look poor. Pass init_image, or init_latents with denoising_start."
            )

        # 2. The sigmas to run: all, the tail (img2img strength, refiner), or the head (base).
        schedule = DiscreteSchedule.scaled_linear() if schedule is None else schedule
        plan = plan_sampler(sampler, schedule, steps, spacing=timestep_spacing)
        if has_init and strength is None and denoising_start is None:
            # diffusers' defaults: StableDiffusionImg2ImgPipeline 0.8, StableDiffusionXLImg2ImgPipeline 0.3,
            # StableDiffusionInpaintPipeline 1.0 (a pure-noise start)
            strength = 1.0 if inpaint else 0.3 if self.spec.is_sdxl else 0.8
        first, last = _sigma_range(
            plan.sigmas, schedule, steps, strength, denoising_start, denoising_end, has_init, inpaint
        )
        sigmas = plan.sigmas[first : last + 1]
        pure_noise = not has_init or (inpaint and strength == 1.0)  # diffusers' `is_strength_max`
        extra = {}
        if eta is not None:
            if "eta" not in inspect.signature(plan.sampler).parameters:
                raise ValueError(f"eta: sampler {sampler!r} has no eta")
            extra["eta"] = eta

        # 3. Conditioning: context, SDXL's y; the negative prompts' only when guided.
        guided = scale > 1.0
        cond, uncond = self._conditioning(prompts, negatives, num_images, guided, clip_skip, micro, height, width)

        # 4. The random draws, in diffusers' order: the init image's posterior sample, the noise,
        #    the masked image's posterior sample.
        generator = _make_generator(seed, generator)
        f = self.vae.config.downsample_factor
        shape = (len(prompts) * num_images, self.unet.config.out_channels, height // f, width // f)
        expand = lambda t, name: _expand(t, len(prompts), num_images, name).to(self.device)  # noqa: E731
        known = None  # the init latents (scaled)
        if images is not None and (not pure_noise or not concat_inpaint):
            # img2img and 4-channel inpainting always; 9-channel inpainting only from the noised image
            known = expand(self.encode_images(images, generator), "init_image")
        elif init_latents is not None:
            known = expand(init_latents.float(), "init_latents")
        if known is not None and known.shape[1:] != shape[1:]:
            raise ValueError(f"init latents must be (B, {', '.join(map(str, shape[1:]))}), got {tuple(known.shape)}")
        # diffusers' refiner adds no noise when it continues a run (denoising_start)
        n = None if denoising_start is not None else self._initial_noise(latents, shape, generator, noise)
        if inpaint:
            mask_latent = expand(F.interpolate(masks, size=shape[-2:]), "mask_image")  # nearest, as diffusers
        if concat_inpaint:
            # diffusers' `init_image * (mask < 0.5)` in [-1, 1]: repainted pixels become 0, mid-gray
            masked = expand(self.encode_images(torch.where(masks >= 0.5, 0.5, images), generator), "init_image")
            cond["concat"] = torch.cat([mask_latent, masked], dim=1)  # x, mask, masked image: LDM's order
            if uncond is not None:
                uncond["concat"] = cond["concat"]
        elif inpaint:
            # diffusers encodes the masked image for 4-channel models too, and drops it; the same
            # draw keeps the generator, and so any stochastic sampler, in step with diffusers.
            draw = (max(images.shape[0], masks.shape[0]), *shape[1:])
            torch.randn(draw, generator=generator, device=generator.device, dtype=self.vae.dtype)

        # 5. The start, in the VE form x = x0 + sigma n.
        sigma_0 = float(sigmas[0])
        if pure_noise:
            x = n * plan.init_noise_sigma
        elif n is None:  # denoising_start: the given VP latents are at sigma_0 already
            x = from_variance_preserving(known, sigma_0)
        else:  # img2img: every diffusers scheduler's `add_noise`, in VE form
            x = known + sigma_0 * n

        # 6. Sample: sampler math in fp32, the U-Net in its own dtype (cast in DiscreteDenoiser).
        denoiser = DiscreteDenoiser(
            _unet_fn(self.unet), schedule, self.prediction_type, quantize=plan.quantize, model_dtype=self.dtype
        )
        if guided:
            model = cfg_denoiser(denoiser, cond, uncond, scale, guidance_rescale)
        else:
            model = lambda x, sigma: denoiser(x, sigma, **cond)  # noqa: E731
        if inpaint and not concat_inpaint:
            model = _keep_known(model, mask_latent, known, n, sigma_0)
        stopped: list[int] = []
        x = plan.sampler(model, x, sigmas, generator=generator, callback=_watch(callback, stopped), **extra)

        # 7. The DDPM (VP) latent at the last noise level (a stopped run returned the clean estimate).
        x = to_variance_preserving(x, 0.0 if stopped else float(sigmas[-1]))
        if inpaint and not concat_inpaint:
            x = mask_latent * x + (1 - mask_latent) * known  # diffusers' last blend: the clean init latents
        return x if output == "latent" else self.decode(x, output)

    # ------------------------------------------------------------------ pieces of generate
    @staticmethod
    def _check_init(images, masks, concat_inpaint: bool, inpaint: bool, denoising_start) -> None:
        """The init image and mask agree with each other and with the model."""
        if inpaint and (images is None or masks is None):
            what = "a 9-channel inpainting model needs" if concat_inpaint else "inpainting needs"
            got = f"init_image={images is not None}, mask_image={masks is not None}"
            raise ValueError(f"{what} both init_image and mask_image (got {got})")
        if masks is None:
            return
        if masks.shape[-2:] != images.shape[-2:]:
            (mh, mw), (ih, iw) = masks.shape[-2:], images.shape[-2:]
            raise ValueError(f"mask_image is {mh}x{mw} (HxW) but init_image is {ih}x{iw}")
        if masks.shape[0] not in (1, images.shape[0]):
            n_images, n_masks = images.shape[0], masks.shape[0]
            raise ValueError(f"mask_image: expected 1 mask or one per init image ({n_images}), got {n_masks}")
        if denoising_start is not None:
            raise ValueError("denoising_start does not combine with inpainting; use strength")

    def _micro_conditioning(self, original_size, crop, target_size, score, negative_score) -> dict:
        """SDXL's size/crop/aesthetic conditioning, checked against the family."""
        given = {"original_size": original_size, "crop_coords_top_left": crop, "target_size": target_size}
        given |= {"aesthetic_score": score, "negative_aesthetic_score": negative_score}
        refiner = self.family == "sdxl-refiner"
        if not self.spec.is_sdxl:
            allowed = ()
        elif refiner:  # sd_xl_refiner.yaml: original size, crop, aesthetic score (no target size)
            allowed = ("original_size", "crop_coords_top_left", "aesthetic_score", "negative_aesthetic_score")
        else:  # sd_xl_base.yaml: original size, crop, target size
            allowed = ("original_size", "crop_coords_top_left", "target_size")
        for name, value in given.items():
            if value is not None and name not in allowed:
                takes = list(allowed) or "none"
                raise ValueError(f"{name} is not an input of the {self.family!r} family (it takes {takes})")
        return {
            "original_size": original_size,
            "crop": (0, 0) if crop is None else crop,
            "target_size": target_size,
            "score": 6.0 if score is None else score,  # diffusers' refiner defaults
            "negative_score": 2.5 if negative_score is None else negative_score,
        }

    def _output_size(self, width, height, images, init_latents) -> tuple[int, int]:
        """(height, width) in pixels: given, else the init's size, else the family's; checked."""
        f = self.vae.config.downsample_factor
        init = None
        if images is not None:
            init = tuple(images.shape[-2:])
        elif init_latents is not None:
            init = (init_latents.shape[-2] * f, init_latents.shape[-1] * f)
        default = init or (self.spec.default_size, self.spec.default_size)
        height = default[0] if height is None else height
        width = default[1] if width is None else width
        if init is not None and (height, width) != init:
            raise ValueError(
                f"width x height {width}x{height} differs from the init image's {init[1]}x{init[0]}; "
                "resize the image first"
            )
        m = self.size_multiple
        if height % m or width % m or height < m or width < m:
            raise ValueError(
                f"width and height must be positive multiples of {m} (VAE factor {f} x U-Net factor "
                f"{self.unet.config.downsample_factor}: the official U-Net halves and doubles its maps exactly), "
                f"got {width}x{height}"
            )
        return height, width

    def _conditioning(self, prompts, negatives, num_images, guided, clip_skip, micro, height, width):
        """The U-Net's conditioning for the batch [prompt 0] * num_images + [prompt 1] * num_images + ...
        (diffusers' order), and for the negative prompts when guided (else None)."""
        original = micro["original_size"] or (height, width)
        target = micro["target_size"] or (height, width)

        def build(texts: list[str], zero_empty: bool, score: float) -> dict[str, torch.Tensor]:
            c = self.encode_prompt(texts, clip_skip=clip_skip, zero_empty=zero_empty)
            out = {"context": c.context.repeat_interleave(num_images, dim=0).to(self.device)}
            if self.spec.is_sdxl:
                pooled = c.pooled.repeat_interleave(num_images, dim=0).to(self.device)
                if self.family == "sdxl-refiner":
                    out["y"] = refiner_vector(pooled, original, micro["crop"], score)
                else:  # the negative uses the same sizes and crop (sgm; diffusers' default too)
                    out["y"] = sdxl_vector(pooled, original, micro["crop"], target)
            return out

        cond = build(prompts, False, micro["score"])
        if not guided:
            return cond, None
        return cond, build(negatives, self.spec.zero_empty_negative, micro["negative_score"])

    def _initial_noise(self, latents, shape, generator, convention) -> torch.Tensor:
        """Unit-variance noise of `shape`, fp32 on the model's device: the caller's `latents`, or a
        draw on the generator's device (diffusers' `randn_tensor`) by the `noise` convention."""
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents: expected the initial noise of shape {shape}, got {tuple(latents.shape)}")
            return latents.to(self.device, torch.float32)
        if convention == "diffusers":  # the whole batch at once
            n = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        else:  # "a1111": image i from seed + i (image 0 from the generator itself)
            seed = generator.initial_seed()
            gens = [generator] + [torch.Generator(generator.device).manual_seed(seed + i) for i in range(1, shape[0])]
            one = (1, *shape[1:])
            n = torch.cat([torch.randn(one, generator=g, device=g.device, dtype=torch.float32) for g in gens])
        return n.to(self.device)


# ---------------------------------------------------------------------- helpers
def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def _prompt_list(prompt: str | Sequence[str], name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name}: expected a str or a non-empty list of str, got {prompt!r:.80}")
    return prompts


def _negative_list(negative: str | Sequence[str], batch: int) -> list[str]:
    negatives = _prompt_list(negative, "negative_prompt")
    if len(negatives) == 1:
        return negatives * batch
    if len(negatives) != batch:
        raise ValueError(f"negative_prompt: expected 1 or {batch} (one per prompt), got {len(negatives)}")
    return negatives


def _make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    """The run's generator: the caller's, or a CPU one seeded with `seed` (diffusers'
    `torch.Generator("cpu").manual_seed(seed)`), or with a fresh random seed (logged)."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if generator is not None:
        return generator
    generator = torch.Generator("cpu")
    if seed is None:
        logger.info("minisd.pipeline: seed %d", generator.seed())  # non-deterministic, recorded
    else:
        generator.manual_seed(seed)
    return generator


def _expand(t: torch.Tensor, num_prompts: int, num_images: int, name: str) -> torch.Tensor:
    """Per-item tensors laid out for the batch [prompt 0] * num_images + [prompt 1] * num_images + ...:
    one item for all, one per prompt, or one per output image."""
    batch = num_prompts * num_images
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.repeat(batch, *([1] * (t.dim() - 1)))
    if t.shape[0] == num_prompts:
        return t.repeat_interleave(num_images, dim=0)
    raise ValueError(f"{name}: expected 1, {num_prompts} (one per prompt) or {batch} items, got {t.shape[0]}")


def _sigma_range(
    sigmas: torch.Tensor,
    schedule: DiscreteSchedule,
    steps: int,
    strength: float | None,
    denoising_start: float | None,
    denoising_end: float | None,
    has_init: bool,
    inpaint: bool,
) -> tuple[int, int]:
    """Indices (first, last) of the sigmas to run: diffusers' `get_timesteps` (strength, or
    the refiner's denoising_start) and StableDiffusionXLPipeline's `denoising_end` cut-off."""
    if denoising_start is not None:
        if not has_init:
            raise ValueError("denoising_start needs init_latents (or init_image) to continue from")
        if strength is not None:
            raise ValueError("pass strength or denoising_start, not both (denoising_start sets where to start)")
        first = split_sigmas(schedule, sigmas, denoising_start)
    elif has_init:
        # strength 1 inpaints from pure noise (diffusers' `is_strength_max`); else noise the image
        first = 0 if inpaint and strength == 1.0 else img2img_start(steps, strength)
    elif strength is not None:
        raise ValueError("strength needs an init_image (it sets how much of the image is kept)")
    else:
        first = 0
    last = sigmas.numel() - 1 if denoising_end is None else split_sigmas(schedule, sigmas, denoising_end)
    if last <= first:
        raise ValueError(f"no step to run: the range starts at step {first} and ends at step {last} of {steps}")
    return first, last


def _unet_fn(unet: UNetModel) -> Callable[..., torch.Tensor]:
    """The U-Net as the denoiser's `model(x, t, context, y=None, concat=None)`.

    Inpainting U-Nets take [x, mask, masked-image latents] on the channel axis (sgm's
    `OpenAIWrapper`: `torch.cat((x, c["concat"]), dim=1)`). diffusers concatenates after
    `scale_model_input`, so the extra channels are not scaled by c_in; neither are they here."""

    def model(x, t, context, y=None, concat=None):
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        return unet(x, t, context, y)

    return model


def _keep_known(
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
        s = float(sigma[0])
        if s < sigma_start:
            x = mask * x + (1 - mask) * (known + s * noise)
        return model(x, sigma)

    return denoise


def _watch(callback: Callback | None, stopped: list[int]) -> Callback | None:
    """The caller's callback, noting in `stopped` whether it cancelled the run."""
    if callback is None:
        return None

    def on_step(info: dict) -> bool | None:
        result = callback(info)
        if result is False:
            stopped.append(info["i"])
        return result

    return on_step
