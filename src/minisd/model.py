"""A loaded Stable Diffusion model, and `load`, the one call from a checkpoint to it.

`StableDiffusion` is the components of a checkpoint (`checkpoint.Components`) with what
you do with them: encode prompts, encode and decode images, and `generate`, the one-call
entry that checks a request and hands it to a pipeline (`minisd.pipeline`):

    generate(prompt)                                    -> txt2img
    generate(prompt, init_image=, strength=)            -> img2img
    generate(prompt, init_image=, mask_image=)          -> inpaint (9-channel U-Net) / inpaint_blend (4-channel)
    base: generate(prompt, denoising_end=, output="latent")
    refiner: generate(prompt, init_latents=, denoising_start=)  -> refine

docs/pipelines.md maps each to the diffusers pipeline it reproduces and has the conventions:
sizes, the VP latents of `output="latent"`, seeds and noise conventions, batch order, and
where minisd differs from diffusers on purpose.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from . import lora as _lora
from . import offload as _offload
from . import speed as _speed
from .checkpoint import Components, load_components
from .conditioning import Conditioning, MicroConditioning, encode_prompt
from .embeddings import Embeddings, check_token, read_embedding, vectors_for_model
from .families import Family
from .images import ImageInput, images_to_tensor, masks_to_tensor, tensor_to_pil, to_unit_range
from .pipeline import (
    HIRES_UPSCALERS,
    Hires,
    Init,
    InitImage,
    InitLatents,
    MaskedImage,
    Noise,
    Prompt,
    Sampled,
    Sampling,
    check_finite,
    check_latents,
    check_tensor,
    hires_fix,
    img2img,
    inpaint,
    inpaint_blend,
    refine,
    shown,
    txt2img,
)
from .prompt_syntax import PROMPT_SYNTAXES
from .samplers import SAMPLER_NAMES, Callback
from .schedules import DiscreteSchedule
from .vae_files import load_vae_file

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "latent", "tensor")
NOISE_CONVENTIONS = ("diffusers", "a1111")
DEFAULT_STEPS = 50  # diffusers' num_inference_steps default


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    family: str | None = None,
    config: Family | Mapping | str | Path | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    vae_dtype: torch.dtype | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    mmap: bool = False,
    vae: str | Path | None = None,
) -> StableDiffusion:
    """Load an official single-file checkpoint or a diffusers folder, ready to generate.

        sd = minisd.load("sd_xl_base_1.0.safetensors", device="cuda", dtype=torch.float16)
        sd = minisd.load(minisd.TINY)                    # the shipped 32 px model, on the CPU

    Args:
        path: a `.safetensors` file in the official layout, or a diffusers folder.
        device: where the weights go; tensors are read straight onto it.
        dtype: dtype of the U-Net and text encoders (default: float32, as diffusers). Each
            tensor is cast once as it is read, so an fp16 file loaded as fp16 is never upcast.
        family: override the detected family ("sd1", "sd2-v", ...).
        config: a non-standard architecture (see `sources.apply_config`), for tiny or custom models.
        prediction_type: override the prediction type ("epsilon" or "v_prediction").
        use_ema: load the `model_ema.*` copy of the U-Net from a non-pruned file.
        vae_dtype: the VAE's dtype; default float32 (the SDXL VAE overflows in fp16), or `dtype` for a
            VAE recorded as fp16-safe (`sd.vae_precision`; see `vae_files`).
        variant: a diffusers weights variant such as "fp16" (`*.fp16.safetensors`).
        allow_pickle: read `.ckpt`/`.pt` files with `torch.load(weights_only=True)`.
        mmap: keep weights that need no cast as views of the file's memory map instead of copies; the
            file must then never change while the model lives (see `checkpoint.load_components`).
        vae: a standalone VAE file or folder to use instead of the checkpoint's (`StableDiffusion.load_vae`).
    """
    components = load_components(
        path,
        device=device,
        dtype=dtype or torch.float32,
        family=family,
        config=config,
        prediction_type=prediction_type,
        use_ema=use_ema,
        vae_dtype=vae_dtype,
        variant=variant,
        allow_pickle=allow_pickle,
        mmap=mmap,
    )
    sd = StableDiffusion(**vars(components))
    if vae is not None:
        sd.load_vae(vae, vae_dtype=vae_dtype, allow_pickle=allow_pickle)
    return sd


def base_then_refiner(
    base: StableDiffusion,
    refiner: StableDiffusion,
    prompt: str | Sequence[str],
    *,
    refiner_at: float = 0.8,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    output: str = "pil",
    callback: Callback | None = None,
    width: int | None = None,
    height: int | None = None,
    **kwargs,
) -> list[PIL.Image.Image] | torch.Tensor:
    """SDXL's ensemble of expert denoisers (diffusers' base + refiner recipe, Podell et al. 2023 sec. 2.5): the
    base runs the schedule down to `refiner_at` (`denoising_end`) and hands its VP latents to the refiner, which
    runs the rest (`denoising_start`), both drawing from one generator. `kwargs` (steps, sampler, guidance_scale,
    negative_prompt, num_images, ...) go to both `generate` calls; `width`/`height` to the base only.

        images = base_then_refiner(base, refiner, "a lion", refiner_at=0.8, steps=40, seed=0)
    """
    generator = _make_generator(seed, generator)
    latents = base.generate(prompt, denoising_end=refiner_at, output="latent", generator=generator,
                            callback=callback, width=width, height=height, **kwargs)  # fmt: skip
    kwargs.pop("noise", None)  # the refiner draws no initial noise
    return refiner.generate(prompt, init_latents=latents, denoising_start=refiner_at, generator=generator,
                            output=output, callback=callback, **kwargs)  # fmt: skip


@dataclass
class StableDiffusion(Components):
    """A ready model: the components (`family`, `unet`, `vae`, `text_encoders`, `text_uses`,
    `tokenizer`, `prediction_reason`, `ignored`; see `checkpoint.Components`) and the pipelines."""

    # The LoRA / LyCORIS adapters applied to the U-Net and text encoders (see `minisd.lora`).
    loras: _lora.LoraSet = field(default_factory=_lora.LoraSet, repr=False, compare=False)
    # Textual-inversion embeddings whose tokens prompts may use (see `load_embedding`, `minisd.embeddings`).
    embeddings: Embeddings = field(default_factory=Embeddings, repr=False, compare=False)
    # The offload in force (`enable_model_offload` / `enable_sequential_offload`), or None.
    offload: _offload.ModelOffload | _offload.SequentialOffload | None = field(default=None, repr=False, compare=False)
    # VAE tiling: None tiles a decode when it would not fit in the device's free memory (never on the CPU);
    # an int is that budget in bytes (also on the CPU); True always tiles, False never (`decode`, `minisd.offload`).
    vae_tiling: bool | int | None = field(default=None, repr=False, compare=False)

    @property
    def scale_factor(self) -> float:
        """Latents are multiplied by this after encoding (LDM's `scale_factor`)."""
        return self.vae.config.scale_factor

    @property
    def device(self) -> torch.device:
        """Where the pipelines run: the U-Net's device, or under an offload the accelerator it runs on."""
        return self.offload.device if self.offload is not None else next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The U-Net's parameter dtype."""
        return next(self.unet.parameters()).dtype

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE downsampling x U-Net downsampling."""
        return self.vae.config.downsample_factor * self.unet.config.downsample_factor

    # ------------------------------------------------------------------ memory (minisd.offload)
    def enable_model_offload(self, device: str | torch.device = "cuda") -> None:
        """Keep the components on the CPU and move each to `device` only while it runs (diffusers'
        `enable_model_cpu_offload`). Call it after `load_vae` / LoRA loading; `disable_offload` undoes it."""
        self._set_offload(_offload.ModelOffload, device)

    def enable_sequential_offload(self, device: str | torch.device = "cuda") -> None:
        """For very small accelerators: each layer's weights go to `device` for its forward only (slow)."""
        self._set_offload(_offload.SequentialOffload, device)

    def disable_offload(self) -> None:
        """Remove the offload hooks; the weights stay on the CPU (`.to(device)` them as you wish)."""
        if self.offload is not None:
            self.offload.remove()
            self.offload = None

    @property
    def _vae_device(self) -> torch.device:
        return self.offload.device if self.offload is not None else next(self.vae.parameters()).device

    def _decode_tile(self, latents: torch.Tensor) -> int | None:
        """The tile size (latent pixels) for this decode, or None to decode whole (see `vae_tiling`)."""
        if isinstance(self.vae_tiling, bool):
            return 64 if self.vae_tiling else None  # vae.decode_tiled's default tile
        budget = self.vae_tiling if self.vae_tiling is not None else _offload.free_memory(latents.device)
        if budget is None or not _offload.should_tile(self.vae.config, latents, self.vae.dtype, budget):
            return None
        return _offload.tile_size_for(self.vae.config, latents, self.vae.dtype, budget)

    def _set_offload(self, kind: type, device: str | torch.device) -> None:
        self.disable_offload()
        home = torch.device("cpu")
        self.offload = kind([self.unet, self.vae, *self.text_encoders], torch.device(device), home)

    # ------------------------------------------------------------------ LoRA / LyCORIS (minisd.lora, docs/lora.md)
    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None, *,
                  allow_pickle: bool = False) -> str:  # fmt: skip
        """Apply a kohya / A1111, diffusers / PEFT, LoHa or LoKr file with `scale`; returns its name
        (default: the file's stem), used by `set_lora_scale` and `unload_lora`.

            name = sd.load_lora("watercolor.safetensors", scale=0.8)
            sd.set_lora_scale(name, 0.5); sd.unload_lora(name)
        """
        _speed.check_unfused(self, "load_lora")
        return _lora.load_lora(self, path, scale, name, allow_pickle=allow_pickle)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change one loaded adapter's scale."""
        _lora.set_lora_scale(self, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one adapter (or all): the weights are bit-identical to before."""
        _lora.unload_lora(self, name)

    def fuse_lora(self) -> None:
        """Write the loaded adapters into the weights (no per-forward cost); `unfuse_lora` undoes it exactly."""
        _lora.fuse_lora(self)

    def unfuse_lora(self) -> None:
        """Restore the original weights and apply the adapters in the forward again."""
        _lora.unfuse_lora(self)

    # ------------------------------------------------------------------ speed (minisd.speed, docs/performance.md)
    def fuse_projections(self) -> None:
        """One GEMM for each attention's q/k/v (self-attention) or k/v (cross-attention) in the U-Net and
        the VAE; `unfuse_projections` restores the official layers bit for bit. Refused while LoRAs are loaded."""
        _speed.fuse_model(self)

    def unfuse_projections(self) -> None:
        """The official separate to_q / to_k / to_v (and VAE q / k / v) layers again, bit-identical."""
        _speed.unfuse_model(self)

    def pack_convolutions(self) -> None:
        """CPU inference: keep every U-Net and VAE convolution's weight in oneDNN's blocked layout as
        well, packed once instead of at every call (`speed.PackedConv2d`); the state dict is unchanged."""
        _speed.pack_convolutions(self.unet)
        _speed.pack_convolutions(self.vae)

    def unpack_convolutions(self) -> None:
        """Plain convolutions again (`pack_convolutions` undone, the packed copies freed)."""
        _speed.unpack_convolutions(self.unet)
        _speed.unpack_convolutions(self.vae)

    def subpixel_upsampling(self) -> None:
        """Every U-Net and VAE upsampler computes nearest x2 + 3x3 conv as one 2x2 conv on its input
        (`speed.upsample_conv`: the same function, 2.25x fewer multiply-adds); the state dict is unchanged."""
        _speed.subpixel_upsampling(self.unet)
        _speed.subpixel_upsampling(self.vae)

    def plain_upsampling(self) -> None:
        """The official interpolate-then-conv upsamplers again (`subpixel_upsampling` undone)."""
        _speed.plain_upsampling(self.unet)
        _speed.plain_upsampling(self.vae)

    def compile(
        self, *, mode: str | None = None, fullgraph: bool = True, dynamic: bool | None = None
    ) -> StableDiffusion:
        """`torch.compile` the U-Net, the VAE decoder and the text encoders in place (`speed.compile_model`);
        returns self. `mode="reduce-overhead"` adds CUDA graphs on a GPU.

            sd = minisd.load("sd15.safetensors", device="cuda", dtype=torch.float16).compile()
        """
        return _speed.compile_model(self, mode=mode, fullgraph=fullgraph, dynamic=dynamic)

    def load_vae(
        self,
        path: str | Path,
        *,
        upcast: bool | None = None,
        vae_dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
    ) -> None:
        """Replace the VAE with a standalone VAE file or folder (the layouts are in `minisd.vae_files`),
        which must fit this model's VAE architecture. `upcast` records whether it must decode in float32
        under an fp16 model (default: the file's config.json or known hash says, else True); the VAE
        then runs in `vae_dtype`, else float32 or the model's dtype accordingly (`sd.vae_precision`).

            sd.load_vae("vae-ft-mse-840000-ema-pruned.safetensors")
        """
        device = next(self.vae.parameters()).device
        self.vae, self.vae_precision = load_vae_file(
            path, self.vae.config, device=device, model_dtype=self.dtype, vae_dtype=vae_dtype, upcast=upcast,
            allow_pickle=allow_pickle,
        )  # fmt: skip

    # ------------------------------------------------------------------ textual inversion (docs/prompts.md)
    def load_embedding(self, path: str | Path, token: str | None = None) -> str:
        """Load a textual-inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds, SDXL
        clip_l + clip_g; `minisd.embeddings`) under `token` (default: the file's stem); returns the token,
        which prompts may then use, in any prompt syntax and inside weighted spans.

            token = sd.load_embedding("EasyNegative.safetensors")    # "EasyNegative"
            sd.generate("a cat", negative_prompt=f"{token}, blurry")
        """
        file = read_embedding(path)
        vectors = vectors_for_model(file, self.family, [e.config.width for e in self.text_encoders])
        token = check_token(Path(path).stem if token is None else token, self.tokenizer, self.embeddings)
        self.embeddings.add(token, vectors)
        logger.info("minisd: embedding %r: %s from %s (%s)", token, file.described, file.path, file.layout)
        return token

    def unload_embedding(self, token: str) -> None:
        """Forget the embedding loaded under `token`."""
        self.embeddings.remove(token)

    def encode_prompt(
        self,
        prompts: str | Sequence[str],
        *,
        clip_skip: int = 0,
        zero_empty: bool = False,
        prompt_syntax: str = "plain",
    ) -> Conditioning:
        """Encode prompts as this family was trained (see `conditioning.encode_prompt`), with the
        loaded embeddings; `prompt_syntax` is "plain", "a1111" or "comfy" (docs/prompts.md).

            cond = sd.encode_prompt(["a (red:1.2) circle"], prompt_syntax="a1111")   # .context, .pooled
        """
        _check_choice("prompt_syntax", prompt_syntax, PROMPT_SYNTAXES)
        return encode_prompt(
            prompts,
            self.family,
            self.text_encoders,
            self.tokenizer,
            uses=self.text_uses,
            clip_skip=clip_skip,
            zero_empty=zero_empty,
            prompt_syntax=prompt_syntax,
            embeddings=self.embeddings,
        )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [0, 1] -> scaled latents: a posterior sample (drawn from
        `generator`, diffusers' `retrieve_latents(sample_mode="sample")`) times `scale_factor`. fp32.
        A non-finite result raises `NonFiniteError` ("VAE encoder")."""
        vae_device = self._vae_device
        posterior = self.vae.encode((2.0 * images - 1.0).to(vae_device))  # [0, 1] -> [-1, 1]
        return check_finite((posterior.sample(generator) * self.scale_factor).float(), "VAE encoder")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output: str = "pil") -> list[PIL.Image.Image] | torch.Tensor:
        """Scaled (VP) latents -> PIL images, or a `(B, 3, H, W)` fp32 tensor in [0, 1] (`output="tensor"`).
        The VAE runs in its own dtype (keep it fp32: the SDXL VAE overflows in fp16). A non-finite
        output raises `NonFiniteError` ("VAE decoder") instead of a black or white image."""
        _check_choice("output", output, ("pil", "tensor"))
        latents = check_tensor("latents", latents).to(self._vae_device) / self.scale_factor
        tile = self._decode_tile(latents)
        decoded = self.vae.decode(latents) if tile is None else self.vae.decode_tiled(latents, tile_size=tile)
        images = to_unit_range(check_finite(decoded, "VAE decoder"))  # clamping would hide inf (white), NaN -> black
        return tensor_to_pil(images) if output == "pil" else images

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
        timestep_spacing: str | None = None,
        eta: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        num_images: int = 1,
        output: str = "pil",
        callback: Callback | None = None,
        clip_skip: int = 0,
        prompt_syntax: str = "plain",
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
        hires_scale: float | None = None,
        hires_strength: float = 0.7,
        hires_steps: int | None = None,
        hires_upscale: str = "latent",
    ) -> list[PIL.Image.Image] | torch.Tensor:
        """Text-to-image, image-to-image, inpainting, or one stage of SDXL's base -> refiner.

        The arguments are diffusers' (the module docstring maps calls to pipelines; docs/pipelines.md
        has every argument). In short: a prompt or a list of them (each gives `num_images`);
        `width`/`height` default to the family's size or the init image's; `guidance_scale` <= 1 runs
        without guidance; `sampler` is one of `SAMPLER_NAMES`; `seed` or `generator` (neither: a fresh
        seed, logged) and `noise` ("diffusers" or "a1111") fix the draws, `latents` replaces the initial
        noise; `output` is "pil", "tensor" ((B, 3, H, W) in [0, 1]) or "latent" (VP latents);
        `callback(info)` runs once per step and stops the run by returning False (the current clean
        estimate is returned). `init_image` (+ `strength`), `mask_image`, `init_latents` (+
        `denoising_start`) and `denoising_end` pick the pipeline; `original_size`,
        `crop_coords_top_left`, `target_size` and the aesthetic scores are SDXL's micro-conditioning.
        `prompt_syntax` "a1111" or "comfy" reads weights, BREAK and long prompts (docs/prompts.md).
        `hires_scale` (with `hires_strength`, `hires_steps`, `hires_upscale`) runs A1111's two-pass hires fix
        (`pipeline.hires_fix`): `generate("a cat", width=512, height=512, hires_scale=2)` gives 1024x1024.
        A bad argument raises a ValueError naming it; a NaN or inf from a model, `NonFiniteError`.
        The keywords become one `GenerateRequest`, whose fields say what each None stands for.

            images = sd.generate("a lighthouse at dusk", seed=0, steps=30, sampler="dpmpp_2m_karras")
            images = sd.generate("a cat", init_image=photo, strength=0.6, seed=1)          # img2img
            images = sd.generate("a cat", width=512, height=512, hires_scale=2, seed=2)   # 1024 px, two passes
        """
        request = GenerateRequest(**{k: v for k, v in locals().items() if k != "self"})  # every keyword, checked
        inputs = request.resolve(self)
        result = self._pipeline(request, inputs)
        return result.latents if request.output == "latent" else self.decode(result.latents, request.output)

    def _pipeline(self, r: GenerateRequest, p: PipelineInputs) -> Sampled:
        """The pipeline a request names: inpainting for a mask or an inpainting model; else the refiner
        stage for `denoising_start`, img2img from an init image or latents, A1111's hires fix, or txt2img."""
        if p.masks is not None or self.family.inpainting:
            if p.hires is not None:
                raise ValueError("hires_scale does not combine with inpainting (mask_image or an inpainting model)")
            _check_inpainting(p.images, p.masks, self.family.inpainting, r.denoising_start)
            pipeline = inpaint if self.family.inpainting else inpaint_blend
            strength = 1.0 if r.strength is None else r.strength  # diffusers' default: a pure-noise start
            return pipeline(self, p.text, p.sampling, p.noise, MaskedImage(p.images, p.masks), strength, r.callback)
        if p.hires is not None:
            if p.init is not None or r.strength is not None or r.denoising_end is not None:
                raise ValueError(
                    "hires_scale is a text-to-image pass; it takes no init_image, init_latents, "
                    "strength or denoising_end (hires_strength sets the second pass's strength)"
                )
            return hires_fix(self, p.text, p.sampling, p.noise, p.size, p.hires, r.callback)
        if r.denoising_start is not None:
            if p.init is None:
                raise ValueError("denoising_start needs init_latents (or init_image) to continue from")
            if r.strength is not None:
                raise ValueError("pass strength or denoising_start, not both (denoising_start sets where to start)")
            if r.latents is not None:
                raise ValueError("latents (the initial noise) has no use with denoising_start, which adds no noise")
            return refine(self, p.text, p.sampling, p.noise.generator, p.init, r.denoising_start, r.callback)
        if p.init is not None:
            strength = self.family.default_strength if r.strength is None else r.strength
            return img2img(self, p.text, p.sampling, p.noise, p.init, strength, r.callback)
        if r.strength is not None:
            raise ValueError("strength needs an init_image (it sets how much of the image is kept)")
        return txt2img(self, p.text, p.sampling, p.noise, p.size, r.callback)


# ---------------------------------------------------------------------- the request
@dataclass(frozen=True)
class GenerateRequest:
    """`StableDiffusion.generate`'s keywords as one record, in its order and with its defaults (a test
    holds the two together). None means "the model's or the input's", resolved by `resolve`.

    Creating one checks all that needs no model: each choice, and each number's type and range
    (`_NUMBERS`); `resolve` checks the rest against a model and builds the pipeline's records."""

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] = ""
    width: int | None = None  # None: the init image's (or init latents') width, else the family's default_size
    height: int | None = None
    steps: int = DEFAULT_STEPS
    guidance_scale: float | None = None  # None: the family's default_guidance
    sampler: str = "euler"
    schedule: DiscreteSchedule | None = None  # None: the family's training schedule (zero terminal SNR or not)
    timestep_spacing: str | None = None  # None: the family's ("trailing" for zero terminal SNR)
    eta: float | None = None  # None: the sampler's own default
    seed: int | None = None  # seed and generator both None: a fresh seed, logged
    generator: torch.Generator | None = None
    latents: torch.Tensor | None = None  # None: initial noise drawn from the generator
    num_images: int = 1  # per prompt
    output: str = "pil"
    callback: Callback | None = None
    clip_skip: int = 0
    prompt_syntax: str = "plain"
    guidance_rescale: float = 0.0
    noise: str = "diffusers"
    init_image: ImageInput | None = None
    init_latents: torch.Tensor | None = None
    strength: float | None = None  # None: the family's default_strength (img2img), 1.0 (inpainting)
    mask_image: ImageInput | None = None
    denoising_start: float | None = None
    denoising_end: float | None = None
    original_size: tuple[int, int] | None = None  # SDXL's micro-conditioning; None: the output size
    crop_coords_top_left: tuple[int, int] | None = None  # None: (0, 0)
    target_size: tuple[int, int] | None = None  # None: the output size
    aesthetic_score: float | None = None  # the refiner's; None: diffusers' 6.0 (and 2.5 for the negative)
    negative_aesthetic_score: float | None = None
    hires_scale: float | None = None  # None: no hires fix
    hires_strength: float = 0.7
    hires_steps: int | None = None  # None: `steps`
    hires_upscale: str = "latent"

    def __post_init__(self) -> None:
        _check_choice("output", self.output, OUTPUT_TYPES)
        _check_choice("noise", self.noise, NOISE_CONVENTIONS)
        _check_choice("prompt_syntax", self.prompt_syntax, PROMPT_SYNTAXES)
        _check_numbers(**{name: getattr(self, name) for name in _NUMBERS})
        _check_choice("hires_upscale", self.hires_upscale, tuple(HIRES_UPSCALERS))
        _check_choice("sampler", self.sampler, SAMPLER_NAMES)
        if self.schedule is not None and not isinstance(self.schedule, DiscreteSchedule):
            raise ValueError(f"schedule: expected a DiscreteSchedule or None, got {shown(self.schedule)}")

    def resolve(self, sd: StableDiffusion) -> PipelineInputs:
        """The pipeline's records for this request on `sd`: every None resolved, all checked against the model."""
        hires = None
        if self.hires_scale is not None:
            hires = Hires(self.hires_scale, self.hires_strength, self.hires_steps, self.hires_upscale)
        sampling = self._sampling(sd.family)
        images = None if self.init_image is None else images_to_tensor(self.init_image)
        masks = None if self.mask_image is None else masks_to_tensor(self.mask_image)
        init = self._init(images, sd.unet.config.out_channels)
        size = self._output_size(sd, init)
        text = self._prompt(sd.family, self._micro_conditioning(sd.family, size))
        noise = Noise(_make_generator(self.seed, self.generator), self.noise, self.latents)
        return PipelineInputs(text, sampling, noise, size, init, images, masks, hires)

    def _sampling(self, family: Family) -> Sampling:
        """By default the family's training schedule and timestep spacing (a zero-terminal-SNR model:
        the rescaled betas and "trailing", `Family.zero_terminal_snr`)."""
        schedule = self.schedule
        if schedule is None:
            schedule = DiscreteSchedule.scaled_linear(zero_terminal_snr=family.zero_terminal_snr)
        spacing = family.timestep_spacing if self.timestep_spacing is None else self.timestep_spacing
        return Sampling(self.sampler, int(self.steps), spacing, self.eta, schedule, self.denoising_end)

    def _prompt(self, family: Family, micro: MicroConditioning) -> Prompt:
        prompts = _prompt_list(self.prompt, "prompt")
        negatives = _prompt_list(self.negative_prompt, "negative_prompt")
        if len(negatives) not in (1, len(prompts)):
            raise ValueError(f"negative_prompt: expected 1 or {len(prompts)} (one per prompt), got {len(negatives)}")
        scale = family.default_guidance if self.guidance_scale is None else float(self.guidance_scale)
        negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        # numpy numbers -> Python
        rescale, n, skip = float(self.guidance_rescale), int(self.num_images), int(self.clip_skip)
        return Prompt(tuple(prompts), tuple(negatives), micro, n, scale, rescale, skip, self.prompt_syntax)

    def _micro_conditioning(self, family: Family, size: tuple[int, int]) -> MicroConditioning:
        """SDXL's size/crop/aesthetic conditioning (default: the output size, no crop), checked against
        the family's `y` inputs."""
        allowed = list(family.y_inputs)
        if "aesthetic_score" in allowed:
            allowed.append("negative_aesthetic_score")
        given = {name: getattr(self, name) for name in _MICRO_CONDITIONING}
        for name, value in given.items():
            if value is not None and name not in allowed:
                raise ValueError(f"{name} is not an input of the {family.name!r} family (it takes {allowed or 'none'})")
            if value is not None:
                _check_finite_numbers(name, value)
        values = {k: v for k, v in given.items() if v is not None}
        return MicroConditioning(**{"original_size": size, "target_size": size, **values})

    def _init(self, images: torch.Tensor | None, latent_channels: int) -> Init | None:
        """Where img2img or the refiner starts: the init image, or checked init latents, or nothing."""
        if images is not None and self.init_latents is not None:
            raise ValueError("pass init_image or init_latents, not both")
        if images is not None:
            return InitImage(images)
        if self.init_latents is not None:
            return InitLatents(check_latents("init_latents", self.init_latents, latent_channels))
        return None

    def _output_size(self, sd: StableDiffusion, init: Init | None) -> tuple[int, int]:
        """(height, width) in pixels: given, else the init's size, else the family's; checked."""
        f = sd.vae.config.downsample_factor
        size = None
        if isinstance(init, InitImage):
            size = tuple(init.images.shape[-2:])
        elif isinstance(init, InitLatents):
            size = (init.given.shape[-2] * f, init.given.shape[-1] * f)
        default = size or (sd.family.default_size, sd.family.default_size)
        height = default[0] if self.height is None else int(self.height)
        width = default[1] if self.width is None else int(self.width)
        if size is not None and (height, width) != size:
            raise ValueError(
                f"width x height {width}x{height} differs from the init image's {size[1]}x{size[0]}; "
                "resize the image first"
            )
        m = sd.size_multiple
        if height % m or width % m or height < m or width < m:
            raise ValueError(
                f"width and height must be positive multiples of {m} (VAE factor {f} x U-Net factor "
                f"{sd.unet.config.downsample_factor}: the official U-Net halves and doubles its maps exactly), "
                f"got {width}x{height}"
            )
        return height, width


_MICRO_CONDITIONING = ("original_size", "crop_coords_top_left", "target_size", "aesthetic_score",
                       "negative_aesthetic_score")  # fmt: skip


@dataclass(frozen=True)
class PipelineInputs:
    """A `GenerateRequest` resolved against a model: the pipeline's records, the output size
    (height, width), and what the run starts from."""

    text: Prompt
    sampling: Sampling
    noise: Noise
    size: tuple[int, int]
    init: Init | None  # img2img's or the refiner's start
    images: torch.Tensor | None  # the init images, (B, 3, H, W) in [0, 1]
    masks: torch.Tensor | None  # (N, 1, H, W): 1 = repaint
    hires: Hires | None


# ---------------------------------------------------------------------- request checks
@dataclass(frozen=True)
class _Number:
    """What one number of a request must be: an integer (never a bool) or a finite real, in [low, high]
    ((low, high) when `open`); `optional` ones may be None (their default)."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    open: bool = False
    optional: bool = False

    def expected(self) -> str:
        if self.low is None:
            return "an integer" if self.integer else "a finite number"
        if self.high is None:
            return f"an integer >= {self.low}" if self.integer else f"a number >= {self.low}"
        bounds = f"({self.low}, {self.high})" if self.open else f"[{self.low}, {self.high}]"
        return f"an integer in {bounds}" if self.integer else f"a value in {bounds}"

    def check(self, name: str, value: object) -> None:
        if value is None and self.optional:
            return
        kind = numbers.Integral if self.integer else numbers.Real
        if not isinstance(value, kind) or isinstance(value, bool):
            python = "int" if self.integer else "float"
            raise ValueError(f"{name}: expected {self.expected()}, got {shown(value)} ({type(value).__name__}); "
                             f"pass a Python {python}")  # fmt: skip
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        inside = low < value < high if self.open else low <= value <= high  # False for NaN
        try:
            finite = self.integer or math.isfinite(value)
        except OverflowError:  # an int beyond float range, for a float argument
            finite = False
        if not (inside and finite):
            raise ValueError(f"{name}: expected {self.expected()}, got {shown(value)}")


# The numbers of `generate`. Their consequences (sizes vs the model, steps vs strength) are checked
# where they are used; here only type and range, so that a NaN, inf, bool or str is named up front
# instead of passing silently (NaN > 1 is False: a NaN guidance_scale used to turn guidance off).
_NUMBERS = {
    "width": _Number(integer=True, optional=True),
    "height": _Number(integer=True, optional=True),
    "steps": _Number(integer=True, low=1),
    "num_images": _Number(integer=True, low=1),
    "clip_skip": _Number(integer=True, low=0),
    "seed": _Number(integer=True, low=-(2**63), high=2**64 - 1, optional=True),  # torch's manual_seed range
    "guidance_scale": _Number(optional=True),
    "guidance_rescale": _Number(low=0, high=1),
    "strength": _Number(low=0, high=1, optional=True),
    "eta": _Number(low=0, high=1, optional=True),
    "denoising_start": _Number(low=0, high=1, open=True, optional=True),
    "denoising_end": _Number(low=0, high=1, open=True, optional=True),
    "hires_scale": _Number(low=1, optional=True),  # A1111's slider starts at 1
    "hires_strength": _Number(low=0, high=1, open=True),  # (0, 1): A1111 runs int(steps / strength) steps
    "hires_steps": _Number(integer=True, low=1, optional=True),
}


def _check_numbers(**values: object) -> None:
    for name, value in values.items():
        _NUMBERS[name].check(name, value)


def _check_finite_numbers(name: str, value: object) -> None:
    """SDXL micro-conditioning (a pair, a score, or a row per image): finite numbers."""
    try:
        ok = not isinstance(value, bool) and bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all())
    except (TypeError, ValueError, RuntimeError):  # strings, ragged lists
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected finite numbers (one set for all images, or one per image), "
                         f"got {shown(value)}")  # fmt: skip


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {shown(value)}")


def _prompt_list(prompt: str | Sequence[str], name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name}: expected a str or a non-empty list of str, got {shown(prompt)}")
    return prompts


def _check_inpainting(
    images: torch.Tensor | None, masks: torch.Tensor | None, concat: bool, denoising_start: float | None
) -> None:
    """The init image and mask agree with each other and with the model."""
    if images is None or masks is None:
        what = "a 9-channel inpainting model needs" if concat else "inpainting needs"
        got = f"init_image={images is not None}, mask_image={masks is not None}"
        raise ValueError(f"{what} both init_image and mask_image (got {got})")
    if masks.shape[-2:] != images.shape[-2:]:
        (mh, mw), (ih, iw) = masks.shape[-2:], images.shape[-2:]
        raise ValueError(f"mask_image is {mh}x{mw} (HxW) but init_image is {ih}x{iw}")
    if masks.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"mask_image: expected 1 mask or one per init image ({images.shape[0]}), got {masks.shape[0]}")
    if denoising_start is not None:
        raise ValueError("denoising_start does not combine with inpainting; use strength")


def _make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    """The run's generator: the caller's, or a CPU one seeded with `seed` (diffusers'
    `torch.Generator("cpu").manual_seed(seed)`), or with a fresh random seed (logged)."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator, got {shown(generator)}; or pass seed=")
        return generator
    generator = torch.Generator("cpu")
    if seed is None:
        logger.info("minisd: seed %d", generator.seed())  # non-deterministic, recorded
    else:
        generator.manual_seed(int(seed))  # a numpy integer too (checked by _check_numbers)
    return generator
