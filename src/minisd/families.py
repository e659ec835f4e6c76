"""The model families minisd knows, as records of data.

A `Family` says everything that differs between SD1, SD2, SDXL base and the refiner:
the architecture of every component (presets from `unet`, `vae`, `clip`), where each
text encoder sits in an official file and in a diffusers folder and how it is read,
the vector conditioning `y`, the prediction type, the diffusers classes that
reproduce it, and the defaults a user expects (size, guidance, img2img strength).
Code reads these fields; it never parses or compares family names.

| family         | official file                   | U-Net               | text encoder(s)                | prediction |
|----------------|---------------------------------|---------------------|--------------------------------|------------|
| `sd1`          | v1-5-pruned-emaonly.safetensors | `SD1_UNET`          | CLIP-L (HF layout)             | epsilon    |
| `sd1-inpaint`  | sd-v1-5-inpainting.ckpt         | `SD1_INPAINT_UNET`  | CLIP-L (HF layout)             | epsilon    |
| `sd2`          | v2-1_512-ema-pruned.safetensors | `SD2_UNET`          | OpenCLIP-H (open_clip)         | epsilon    |
| `sd2-v`        | v2-1_768-ema-pruned.safetensors | `SD2_UNET`          | OpenCLIP-H (open_clip)         | v          |
| `sd2-inpaint`  | 512-inpainting-ema.safetensors  | `SD2_INPAINT_UNET`  | OpenCLIP-H (open_clip)         | epsilon    |
| `sdxl`         | sd_xl_base_1.0.safetensors      | `SDXL_BASE_UNET`    | CLIP-L (HF) + bigG (open_clip) | epsilon    |
| `sdxl-inpaint` | sd_xl_base_1.0_inpainting_0.1   | `SDXL_INPAINT_UNET` | CLIP-L (HF) + bigG (open_clip) | epsilon    |
| `sdxl-refiner` | sd_xl_refiner_1.0.safetensors   | `SDXL_REFINER_UNET` | bigG (open_clip)               | epsilon    |

Any family may be loaded with another prediction type (`with_prediction`: an SDXL v-prediction
fine-tune) and, for v-prediction, with the zero-terminal-SNR schedule (`with_zero_terminal_snr`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .clip import CLIP_VIT_L14, OPENCLIP_VIT_BIGG14, OPENCLIP_VIT_H14, TextConfig
from .tokenizer import EOT_TOKEN_ID
from .unet import SD1_INPAINT_UNET, SD1_UNET, SD2_INPAINT_UNET, SD2_UNET, SDXL_BASE_UNET, SDXL_REFINER_UNET, UNetConfig
from .vae import SD_VAE, SDXL_VAE, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class TextEncoderUse:
    """How the U-Net's context is read from one loaded text encoder.

    Attributes:
        layer: the context is `hidden_states[layer]` (0 = token embeddings, n = output of
            block n). An absolute index, so a diffusers SD2 folder's 23-block tower and the
            official 24-block one are both read at layer 23.
        final_ln: apply `ln_final` to that hidden state (SD1's layer "last", SD2's
            `FrozenOpenCLIPEmbedder`), or not (SDXL's `layer: hidden` / `legacy: False`).
        pad_token_id: `<|endoftext|>` (49407) for OpenAI CLIP as SD1 and SDXL use it;
            0 for open_clip's tokenizer (SD2, SDXL's bigG).
        tokenizer: whose special-token literals a prompt may contain (`tokenizer.SPECIAL_TOKENS`):
            "hf" (transformers' CLIPTokenizer, CLIP-L) or "open_clip" (OpenCLIP-H, bigG).
        pooled: this encoder supplies the pooled text embedding (SDXL's bigG).
    """

    layer: int
    final_ln: bool
    pad_token_id: int
    tokenizer: str
    pooled: bool = False


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: its architecture, where its weights sit, how it is read.

    `skip`, `final_ln`, `pad_token_id`, `tokenizer` and `pooled` are the official embedder's settings;
    `skip` counts the blocks of the full tower after the one read (0: "last", 1: "penultimate")."""

    config: TextConfig  # the full tower, as the official file holds it
    layout: str  # "hf" (transformers CLIPTextModel names) or "open_clip"
    official_prefix: str  # prefix of its keys in the official single file
    diffusers_folder: str  # "text_encoder" or "text_encoder_2" (always HF layout there)
    skip: int
    final_ln: bool
    pad_token_id: int
    tokenizer: str  # the embedder's tokenizer: "hf" (transformers CLIPTokenizer) or "open_clip"
    pooled: bool = False
    # diffusers' converter drops SD2's last OpenCLIP block (and the projection), which the
    # penultimate-layer context never reads: its folders hold a tower one block shorter.
    diffusers_drops_last: bool = False

    def use(self, full_layers: int | None = None) -> TextEncoderUse:
        """The reading of a tower whose full (official) depth is `full_layers` (default: `config`'s)."""
        layers = self.config.layers if full_layers is None else full_layers
        return TextEncoderUse(layers - self.skip, self.final_ln, self.pad_token_id, self.tokenizer, self.pooled)


@dataclass(frozen=True)
class Family:
    """A model family (see the module table). Presets live in `FAMILIES`; a loaded model carries
    a copy whose component configs are the architecture actually loaded (`with_architecture`)."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[TextEncoderSpec, ...]
    prediction_type: str  # "epsilon" or "v_prediction"
    default_size: int  # the training resolution, in pixels
    default_guidance: float
    # img2img's default strength: diffusers' StableDiffusionImg2ImgPipeline 0.8, its SDXL one 0.3
    default_strength: float
    # The vector conditioning `y`: the micro-conditioning inputs embedded after the pooled text
    # vector, in the official `conditioner.embedders` order; () for families without `y`.
    y_inputs: tuple[str, ...] = ()
    # Encode an empty negative prompt as zeros: SDXL base (sgm's `force_uc_zero_embeddings=["txt"]`,
    # diffusers' `force_zeros_for_empty_prompt=True`); the refiner's model_index.json sets it False,
    # and the SD1/SD2 pipelines always encode "".
    zero_empty_negative: bool = False
    # The SDXL refiner was trained on the lowest 20% of noise levels only (sgm's refiner
    # config): text-to-image from pure noise is outside what it learned.
    low_noise_only: bool = False
    diffusers_pipeline: str = "StableDiffusionPipeline"  # `_class_name` in model_index.json
    diffusers_scheduler: str = "PNDMScheduler"  # the scheduler the official diffusers repo ships
    # Trained on betas rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1; always with
    # v-prediction): sampling then uses that schedule and "trailing" timesteps (their sec. 3.3), as
    # diffusers' `rescale_betas_zero_snr=True, timestep_spacing="trailing"`. No official release is.
    zero_terminal_snr: bool = False

    @property
    def timestep_spacing(self) -> str:
        """diffusers' `timestep_spacing` a sampler uses by default: the official configs' "leading", or
        "trailing" for a zero-terminal-SNR model (Lin et al. 2023, sec. 3.3: start at the last timestep)."""
        return "trailing" if self.zero_terminal_snr else "leading"

    @property
    def inpainting(self) -> bool:
        """The U-Net takes the mask and the masked image's latents as extra input channels."""
        return self.unet.in_channels != self.unet.out_channels

    def with_architecture(self, unet: UNetConfig, vae: VAEConfig, text: tuple[TextConfig, ...]) -> Family:
        """The same family with other component configs (a tiny, custom or loaded architecture)."""
        if len(text) != len(self.text):
            raise ValueError(f"family {self.name} has {len(self.text)} text encoder(s), got {len(text)} configs")
        encoders = tuple(dataclasses.replace(t, config=c) for t, c in zip(self.text, text))
        return dataclasses.replace(self, unet=unet, vae=vae, text=encoders)


# SD1 `FrozenCLIPEmbedder` (v1-inference.yaml): transformers CLIPTextModel, last hidden state.
_SD1_CLIP = TextEncoderSpec(
    CLIP_VIT_L14,
    "hf",
    "cond_stage_model.transformer.",
    "text_encoder",
    skip=0,
    final_ln=True,
    pad_token_id=EOT_TOKEN_ID,
    tokenizer="hf",
)
# SD2 `FrozenOpenCLIPEmbedder` (v2-inference.yaml, layer "penultimate"): block 23 of 24, then ln_final.
_SD2_CLIP = TextEncoderSpec(
    OPENCLIP_VIT_H14, "open_clip", "cond_stage_model.model.", "text_encoder", skip=1, final_ln=True, pad_token_id=0,
    tokenizer="open_clip", diffusers_drops_last=True,
)  # fmt: skip
# sd_xl_base.yaml: embedders.0 is `FrozenCLIPEmbedder` (layer: hidden, layer_idx: 11),
# embedders.1 is `FrozenOpenCLIPEmbedder2` (layer: penultimate, always_return_pooled, legacy: False).
_SDXL_CLIP_L = TextEncoderSpec(
    CLIP_VIT_L14, "hf", "conditioner.embedders.0.transformer.", "text_encoder", skip=1, final_ln=False,
    pad_token_id=EOT_TOKEN_ID, tokenizer="hf",
)  # fmt: skip
_SDXL_BIGG = TextEncoderSpec(
    OPENCLIP_VIT_BIGG14, "open_clip", "conditioner.embedders.1.model.", "text_encoder_2", skip=1, final_ln=False,
    pad_token_id=0, tokenizer="open_clip", pooled=True,
)  # fmt: skip
# sd_xl_refiner.yaml: embedders.0 is the bigG `FrozenOpenCLIPEmbedder2` alone.
_REFINER_BIGG = dataclasses.replace(_SDXL_BIGG, official_prefix="conditioner.embedders.0.model.")

# The vector conditioning of sd_xl_base.yaml and sd_xl_refiner.yaml (each after the pooled vector).
SDXL_BASE_Y = ("original_size", "crop_coords_top_left", "target_size")
SDXL_REFINER_Y = ("original_size", "crop_coords_top_left", "aesthetic_score")

_SD1 = Family("sd1", SD1_UNET, SD_VAE, (_SD1_CLIP,), "epsilon", 512, 7.5, 0.8)
_SD2 = Family("sd2", SD2_UNET, SD_VAE, (_SD2_CLIP,), "epsilon", 512, 7.5, 0.8, diffusers_scheduler="DDIMScheduler")
_SDXL = Family(
    "sdxl", SDXL_BASE_UNET, SDXL_VAE, (_SDXL_CLIP_L, _SDXL_BIGG), "epsilon", 1024, 5.0, 0.3, y_inputs=SDXL_BASE_Y,
    zero_empty_negative=True, diffusers_pipeline="StableDiffusionXLPipeline",
    diffusers_scheduler="EulerDiscreteScheduler",
)  # fmt: skip
_INPAINT = "StableDiffusionInpaintPipeline"
# sd_xl_base_1.0_inpainting_0.1 (diffusers/stable-diffusion-xl-1.0-inpainting-0.1): the base U-Net
# with 9 input channels (latents, mask, masked-image latents), as SD1/SD2's inpainting models.
SDXL_INPAINT_UNET = dataclasses.replace(SDXL_BASE_UNET, in_channels=9)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _SD1,
        dataclasses.replace(_SD1, name="sd1-inpaint", unet=SD1_INPAINT_UNET, diffusers_pipeline=_INPAINT),
        _SD2,
        dataclasses.replace(_SD2, name="sd2-v", prediction_type="v_prediction", default_size=768),
        dataclasses.replace(_SD2, name="sd2-inpaint", unet=SD2_INPAINT_UNET, diffusers_pipeline=_INPAINT),
        _SDXL,
        # guidance 7.5: StableDiffusionXLInpaintPipeline's default (its text-to-image pipeline's is 5.0)
        dataclasses.replace(
            _SDXL,
            name="sdxl-inpaint",
            unet=SDXL_INPAINT_UNET,
            default_guidance=7.5,
            diffusers_pipeline="StableDiffusionXLInpaintPipeline",
        ),
        dataclasses.replace(
            _SDXL,
            name="sdxl-refiner",
            unet=SDXL_REFINER_UNET,
            text=(_REFINER_BIGG,),
            y_inputs=SDXL_REFINER_Y,
            zero_empty_negative=False,
            low_noise_only=True,
            diffusers_pipeline="StableDiffusionXLImg2ImgPipeline",
        ),  # fmt: skip
    )
}

# Families that share every key and shape and differ by what the file cannot show:
# SD2 512 (epsilon) and 768 (v) -- the one place where a prediction type picks a family.
_BY_PREDICTION = {("sd2", "v_prediction"): "sd2-v", ("sd2-v", "epsilon"): "sd2"}
# The inpainting model (9 input channels) of each text-to-image family that has one.
_INPAINTING = {"sd1": "sd1-inpaint", "sd2": "sd2-inpaint", "sdxl": "sdxl-inpaint"}


def family_spec(name: str) -> Family:
    """The family of a name, or a ValueError listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def with_prediction(family: Family, prediction_type: str) -> Family:
    """The family for a prediction type: sd2 <-> sd2-v (keeping the loaded architecture), else
    `family` itself with that prediction type (e.g. an SDXL v-prediction fine-tune)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if prediction_type == family.prediction_type:
        return family
    if family.zero_terminal_snr and prediction_type == "epsilon":  # Lin et al. 2023, sec. 3.2
        family = dataclasses.replace(family, zero_terminal_snr=False)
    other = _BY_PREDICTION.get((family.name, prediction_type))
    if other is None:
        return dataclasses.replace(family, prediction_type=prediction_type)
    return FAMILIES[other].with_architecture(family.unet, family.vae, tuple(t.config for t in family.text))


def prediction_is_ambiguous(family: Family) -> bool:
    """Whether another family shares every key and shape and differs by prediction type (SD2 512 / 768):
    then only metadata, a known file hash or a probe can tell which one a file holds."""
    return any(name == family.name for name, _ in _BY_PREDICTION)


def with_zero_terminal_snr(family: Family) -> Family:
    """`family` trained on the zero-terminal-SNR schedule (a v-prediction model: with epsilon the last
    step would predict nothing, Lin et al. 2023, sec. 3.2)."""
    if family.prediction_type != "v_prediction":
        raise ValueError(
            f"zero terminal SNR needs a v_prediction model; {family.name} predicts {family.prediction_type}"
        )
    return dataclasses.replace(family, zero_terminal_snr=True)


def inpainting_variant(family: Family, where: str) -> Family:
    """The 9-channel inpainting family of a text-to-image family (`where` names the file for errors),
    keeping `family`'s prediction type and schedule."""
    if family.name not in _INPAINTING:
        raise ValueError(f"{where}: a 9-channel (inpainting) {family.name} U-Net is not a family minisd knows")
    inpaint = with_prediction(FAMILIES[_INPAINTING[family.name]], family.prediction_type)
    return dataclasses.replace(inpaint, zero_terminal_snr=family.zero_terminal_snr)
