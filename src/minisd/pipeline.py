"""A loaded Stable Diffusion model: its components, and the pipelines from prompt to pixels.

`StableDiffusion` is what `minisd.load` returns. It holds the components and the
settings that tie them together (family, prediction type, VAE scale factor, how the
text encoders are read), and runs the pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .clip import TextTransformer
from .conditioning import Conditioning, encode_prompt
from .families import FamilySpec, TextEncoderUse
from .tokenizer import CLIPTokenizer
from .unet import UNetModel
from .vae import AutoencoderKL


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


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
