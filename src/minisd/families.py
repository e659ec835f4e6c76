"""The model families minisd knows, as one table of data.

A family fixes the architecture of every component (presets from `unet`, `vae`,
`clip`), where each component sits in the official single-file checkpoint and in
a diffusers folder, how the text encoders are read (`TextEncoderUse`), the
prediction type, and the defaults a user expects (size, guidance).

| family         | official file                         | U-Net             | text encoder(s)         | prediction |
|----------------|---------------------------------------|-------------------|-------------------------|------------|
| `sd1`          | v1-5-pruned-emaonly.safetensors       | `SD1_UNET`        | CLIP-L (HF layout)      | epsilon    |
| `sd1-inpaint`  | sd-v1-5-inpainting.ckpt               | `SD1_INPAINT_UNET`| CLIP-L (HF layout)      | epsilon    |
| `sd2`          | v2-1_512-ema-pruned.safetensors       | `SD2_UNET`        | OpenCLIP-H (open_clip)  | epsilon    |
| `sd2-v`        | v2-1_768-ema-pruned.safetensors       | `SD2_UNET`        | OpenCLIP-H (open_clip)  | v          |
| `sd2-inpaint`  | 512-inpainting-ema.safetensors        | `SD2_INPAINT_UNET`| OpenCLIP-H (open_clip)  | epsilon    |
| `sdxl`         | sd_xl_base_1.0.safetensors            | `SDXL_BASE_UNET`  | CLIP-L (HF) + bigG (open_clip) | epsilon |
| `sdxl-refiner` | sd_xl_refiner_1.0.safetensors         | `SDXL_REFINER_UNET`| bigG (open_clip)       | epsilon    |
"""

from __future__ import annotations

from dataclasses import dataclass

from .clip import CLIP_VIT_L14, OPENCLIP_VIT_BIGG14, OPENCLIP_VIT_H14, TextConfig
from .unet import SD1_INPAINT_UNET, SD1_UNET, SD2_INPAINT_UNET, SD2_UNET, SDXL_BASE_UNET, SDXL_REFINER_UNET, UNetConfig
from .vae import SD_VAE, SDXL_VAE, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TextEncoderUse:
    """How a family reads one text encoder (the official embedder's settings).

    Attributes:
        skip: how many final blocks the context skips: it is `hidden_states[layers - skip]`
            (index 0 = token embeddings, n = output of block n). 0 is the last block,
            1 the penultimate one.
        final_ln: apply `ln_final` to that hidden state (SD1's layer "last", SD2's
            `FrozenOpenCLIPEmbedder`), or not (SDXL's `layer: hidden` / `legacy: False`).
        pad_token_id: 49407 (`<|endoftext|>`) for OpenAI CLIP as SD1 and SDXL use it;
            0 for open_clip's tokenizer (SD2, SDXL's bigG).
        pooled: this encoder supplies the pooled text embedding (SDXL's bigG).
    """

    skip: int
    final_ln: bool
    pad_token_id: int
    pooled: bool = False


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: its architecture, where its weights sit, how it is read."""

    config: TextConfig
    layout: str  # "hf" (transformers CLIPTextModel names) or "open_clip"
    official_prefix: str  # prefix of its keys in the official single file
    diffusers_folder: str  # "text_encoder" or "text_encoder_2" (always HF layout there)
    use: TextEncoderUse
    # diffusers' converter drops SD2's last OpenCLIP block, which the penultimate-layer
    # context never reads: its folders hold 23 blocks and read the last one.
    diffusers_drops_last: bool = False


@dataclass(frozen=True)
class FamilySpec:
    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[TextEncoderSpec, ...]
    prediction_type: str  # "epsilon" or "v_prediction"
    default_size: int  # the training resolution, in pixels
    default_guidance: float
    diffusers_pipeline: str  # `_class_name` in a diffusers folder's model_index.json
    # Encode an empty negative prompt as zeros: SDXL base (sgm's `force_uc_zero_embeddings=["txt"]`,
    # diffusers' `force_zeros_for_empty_prompt=True`); the refiner's model_index.json sets it False,
    # and the SD1/SD2 pipelines always encode "".
    zero_empty_negative: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.unet.adm_in_channels is not None

    @property
    def is_inpaint(self) -> bool:
        return self.unet.in_channels == 9


# SD1 `FrozenCLIPEmbedder` (v1-inference.yaml): transformers CLIPTextModel, last hidden state.
_SD1_CLIP = TextEncoderSpec(
    CLIP_VIT_L14, "hf", "cond_stage_model.transformer.", "text_encoder", TextEncoderUse(skip=0, final_ln=True, pad_token_id=49407)
)
# SD2 `FrozenOpenCLIPEmbedder` (v2-inference.yaml, layer "penultimate"): block 23 of 24, then ln_final.
_SD2_CLIP = TextEncoderSpec(
    OPENCLIP_VIT_H14,
    "open_clip",
    "cond_stage_model.model.",
    "text_encoder",
    TextEncoderUse(skip=1, final_ln=True, pad_token_id=0),
    diffusers_drops_last=True,
)
# sd_xl_base.yaml: embedders.0 is `FrozenCLIPEmbedder` (layer: hidden, layer_idx: 11),
# embedders.1 is `FrozenOpenCLIPEmbedder2` (layer: penultimate, always_return_pooled, legacy: False).
_SDXL_CLIP_L = TextEncoderSpec(
    CLIP_VIT_L14, "hf", "conditioner.embedders.0.transformer.", "text_encoder", TextEncoderUse(skip=1, final_ln=False, pad_token_id=49407)
)
_SDXL_BIGG = TextEncoderSpec(
    OPENCLIP_VIT_BIGG14,
    "open_clip",
    "conditioner.embedders.1.model.",
    "text_encoder_2",
    TextEncoderUse(skip=1, final_ln=False, pad_token_id=0, pooled=True),
)
# sd_xl_refiner.yaml: embedders.0 is the bigG `FrozenOpenCLIPEmbedder2` alone.
_REFINER_BIGG = TextEncoderSpec(
    OPENCLIP_VIT_BIGG14,
    "open_clip",
    "conditioner.embedders.0.model.",
    "text_encoder_2",
    TextEncoderUse(skip=1, final_ln=False, pad_token_id=0, pooled=True),
)

FAMILIES: dict[str, FamilySpec] = {
    f.name: f
    for f in (
        FamilySpec("sd1", SD1_UNET, SD_VAE, (_SD1_CLIP,), "epsilon", 512, 7.5, "StableDiffusionPipeline"),
        FamilySpec("sd1-inpaint", SD1_INPAINT_UNET, SD_VAE, (_SD1_CLIP,), "epsilon", 512, 7.5, "StableDiffusionInpaintPipeline"),
        FamilySpec("sd2", SD2_UNET, SD_VAE, (_SD2_CLIP,), "epsilon", 512, 7.5, "StableDiffusionPipeline"),
        FamilySpec("sd2-v", SD2_UNET, SD_VAE, (_SD2_CLIP,), "v_prediction", 768, 7.5, "StableDiffusionPipeline"),
        FamilySpec("sd2-inpaint", SD2_INPAINT_UNET, SD_VAE, (_SD2_CLIP,), "epsilon", 512, 7.5, "StableDiffusionInpaintPipeline"),
        FamilySpec("sdxl", SDXL_BASE_UNET, SDXL_VAE, (_SDXL_CLIP_L, _SDXL_BIGG), "epsilon", 1024, 5.0, "StableDiffusionXLPipeline",
                   zero_empty_negative=True),
        FamilySpec("sdxl-refiner", SDXL_REFINER_UNET, SDXL_VAE, (_REFINER_BIGG,), "epsilon", 1024, 5.0, "StableDiffusionXLImg2ImgPipeline"),
    )
}


def family_spec(name: str) -> FamilySpec:
    """The spec of a family by name, or a ValueError listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]
