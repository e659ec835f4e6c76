"""From prompt strings to the conditioning tensors each U-Net family was trained with.

The U-Net sees two kinds of conditioning:

- `context`, `(B, 77, context_dim)`: token features for cross-attention;
- `y`, `(B, adm_in_channels)` (SDXL only): a vector added to the timestep embedding,
  made of the pooled text embedding and the "micro-conditioning" sizes.

Which hidden state of which text encoder makes `context` is fixed by each official
config (the `cond_stage_config` / `conditioner` of the LDM and sgm YAMLs):

- SD1: CLIP ViT-L/14 (`FrozenCLIPEmbedder`, layer "last");
  context `ln_final(hidden_states[12])` (last block + final LN); pad 49407.
- SD2: OpenCLIP ViT-H/14 (`FrozenOpenCLIPEmbedder`, layer "penultimate");
  context `ln_final(hidden_states[23])`; pad 0.
- SDXL base: CLIP-L (`layer: hidden, layer_idx: 11`) and OpenCLIP bigG
  (`FrozenOpenCLIPEmbedder2`, penultimate, `legacy: False`);
  context `cat(hidden_states_L[11], hidden_states_G[31])`, no final LN; pad 49407 / 0.
- SDXL refiner: OpenCLIP bigG (penultimate); context `hidden_states_G[31]`, no final LN; pad 0.

Each encoder's prompts are tokenized as its embedder did: the CLIP-L embedders call
transformers' `CLIPTokenizer`, the OpenCLIP ones `open_clip.tokenize`. They share the BPE and
differ in the pad token and in which literals typed in a prompt are special tokens
("<|endoftext|>" is the end token to the first, ordinary text to the second; docs/tokenizer.md).

`families.TextEncoderSpec` records these settings per family, and a loaded model's
`TextEncoderUse` the hidden state it reads, as an absolute index: diffusers' SD2 folders
store the OpenCLIP-H tower without its unused 24th block, and layer 23 is then its last.

SDXL's pooled vector is `ln_final(hidden_states_G[32])[eot] @ text_projection`
(sgm `FrozenOpenCLIPEmbedder2.forward` with `always_return_pooled`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .clip import TextTransformer
from .families import SDXL_BASE_Y, SDXL_REFINER_Y, Family, TextEncoderUse
from .tokenizer import CLIPTokenizer
from .unet import timestep_embedding


@dataclass
class Conditioning:
    """What the text side hands to the U-Net.

    Attributes:
        context: `(B, 77, context_dim)` tokens for cross-attention.
        pooled: `(B, 1280)` pooled bigG embedding for SDXL families, else None.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None


def encode_prompt(
    prompts: str | Sequence[str],
    family: Family,
    encoders: Sequence[TextTransformer],
    tokenizer: CLIPTokenizer | None = None,
    *,
    uses: Sequence[TextEncoderUse] | None = None,
    clip_skip: int = 0,
    zero_empty: bool = False,
) -> Conditioning:
    """Encode prompts the way the official `family` model was trained.

    Args:
        prompts: one prompt or a batch of them, each of at most `tokenizer.MAX_TEXT_CHARS`
            characters. Prompts longer than 75 BPE tokens are truncated, as the references do.
        family: the model family (`families.FAMILIES[...]`, or a loaded model's `family`).
        encoders: the family's text encoders, in the official order (SDXL: CLIP-L, then bigG).
        tokenizer: the BPE tokenizer (one vocabulary serves CLIP and OpenCLIP; the pad token
            and the special-token rules differ, and both are taken from `uses`).
        uses: how to read each encoder; default the family's official reading of full towers
            (a loaded model passes its own: a diffusers SD2 folder's tower is one block shorter).
        clip_skip: read the context this many blocks earlier than the family's default
            (diffusers' `clip_skip`; A1111's "clip skip 2" is `clip_skip=1`). The final
            LayerNorm is applied exactly when the family applies it. Pooled outputs are
            not affected, as in diffusers.
        zero_empty: return zeros for empty prompts instead of encoding "" (sgm's
            `force_uc_zero_embeddings=["txt"]`, diffusers' `force_zeros_for_empty_prompt`,
            used by SDXL base for the unconditional branch of guidance).
    """
    if len(encoders) != len(family.text):
        raise ValueError(
            f"encode_prompt: family {family.name!r} needs {len(family.text)} text encoder(s), got {len(encoders)}"
        )
    if uses is None:
        uses = [t.use(e.config.layers) for t, e in zip(family.text, encoders)]
    if clip_skip < 0:
        raise ValueError(f"encode_prompt: clip_skip must be >= 0, got {clip_skip}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokenizer = tokenizer or CLIPTokenizer()

    contexts, pooled = [], None
    for encoder, use in zip(encoders, uses, strict=True):
        layer = use.layer - clip_skip
        if layer < 0:
            raise ValueError(
                f"encode_prompt: clip_skip {clip_skip} reaches below the first block of a "
                f"{encoder.config.layers}-block encoder read at layer {use.layer}"
            )
        device = encoder.token_embedding.weight.device
        tokens = tokenizer(prompts, pad_token_id=use.pad_token_id, special_tokens=use.tokenizer)
        input_ids, eot = tokens.input_ids.to(device), tokens.eot_index.to(device)
        # Run only the blocks we read, unless this encoder also supplies the pooled vector,
        # which is taken after the last block.
        out = encoder(input_ids, eot, num_layers=None if use.pooled else layer)
        hidden = out.hidden_states[layer]
        contexts.append(encoder.ln_final(hidden) if use.final_ln else hidden)
        if use.pooled:
            pooled = out.pooled

    # SDXL base: the CLIP-L (768) and bigG (1280) tokens are concatenated along channels
    # (sgm `GeneralConditioner` concatenates "crossattn" outputs on the last axis).
    context = torch.cat(contexts, dim=-1)
    if zero_empty:
        empty = torch.tensor([p == "" for p in prompts], device=context.device)
        context = torch.where(empty[:, None, None], torch.zeros_like(context), context)
        if pooled is not None:
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    return Conditioning(context=context, pooled=pooled)


# ------------------------------------------------------------------ SDXL vector conditioning
def _embed(values: torch.Tensor) -> torch.Tensor:
    """Each scalar of `values` `(B, n)` embedded like a timestep, `[cos(v f_i), sin(v f_i)]` with
    256 dims, side by side: `(B, n * 256)`, as sgm's `ConcatTimestepEmbedderND` lays it out."""
    b, n = values.shape
    return timestep_embedding(values.flatten(), 256).reshape(b, n * 256)  # (b n) d -> b (n d)


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): sizes as (height, width), the crop
    as (top, left), and the refiner's aesthetic scores for the prompt and the negative prompt."""

    original_size: tuple[int, int]
    target_size: tuple[int, int]
    crop_coords_top_left: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0  # diffusers' refiner defaults
    negative_aesthetic_score: float = 2.5

    def values(self, *, negative: bool) -> dict[str, tuple[float, ...]]:
        """Each input by name; the negative prompt differs only by its aesthetic score (sgm)."""
        score = self.negative_aesthetic_score if negative else self.aesthetic_score
        return {"original_size": self.original_size, "crop_coords_top_left": self.crop_coords_top_left,
                "target_size": self.target_size, "aesthetic_score": (score,)}  # fmt: skip


def _numbers(name: str, value: Sequence[float] | torch.Tensor, batch: int, width: int, device) -> torch.Tensor:
    """One input as `(batch, width)` fp32: `width` numbers for all images, or a row per image."""
    v = torch.as_tensor(value, dtype=torch.float32, device=device)
    if width == 1:  # a score: one number, or one per image
        v = v.reshape(-1, 1)
    if v.dim() == 1:
        v = v[None]
    if v.shape[0] == 1:
        v = v.expand(batch, -1)
    if v.shape != (batch, width):
        what = "1 number" if width == 1 else "2 numbers (height, width) or (top, left)"
        raise ValueError(f"{name}: expected {what} per image, got shape {tuple(v.shape)}")
    return v


# The number of scalars of each micro-conditioning input.
_WIDTHS = {"original_size": 2, "crop_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}


def vector_conditioning(pooled: torch.Tensor, inputs: Sequence[str], values: Mapping) -> torch.Tensor:
    """SDXL's `y`: the pooled text vector, then each input's numbers embedded like timesteps
    (256 dims each), in the order of `inputs` (`Family.y_inputs`, the sgm embedder order)."""
    b, dev = pooled.shape[0], pooled.device
    numbers = torch.cat([_numbers(name, values[name], b, _WIDTHS[name], dev) for name in inputs], dim=1)
    return torch.cat([pooled.float(), _embed(numbers)], dim=1).to(pooled.dtype)


def sdxl_vector(
    pooled: torch.Tensor,
    original_size: Sequence[int] | torch.Tensor,
    crop_coords_top_left: Sequence[int] | torch.Tensor,
    target_size: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """SDXL base's `y` (2816 = 1280 + 3 x 2 x 256): pooled, then original size (h, w),
    crop top-left (top, left) and target size (h, w), each number sinusoidally embedded.

    The order is the `conditioner.embedders` order of `sd_xl_base.yaml`; sizes are (height, width)
    as sgm's `original_size_as_tuple` (diffusers' `add_time_ids` use the same order)."""
    values = {"original_size": original_size, "crop_coords_top_left": crop_coords_top_left, "target_size": target_size}
    return vector_conditioning(pooled, SDXL_BASE_Y, values)


def refiner_vector(
    pooled: torch.Tensor,
    original_size: Sequence[int] | torch.Tensor,
    crop_coords_top_left: Sequence[int] | torch.Tensor,
    aesthetic_score: float | torch.Tensor,
) -> torch.Tensor:
    """SDXL refiner's `y` (2560 = 1280 + 2 x 2 x 256 + 256): pooled, original size,
    crop top-left, aesthetic score (`sd_xl_refiner.yaml` order; the score is one number)."""
    values = {"original_size": original_size, "crop_coords_top_left": crop_coords_top_left,
              "aesthetic_score": aesthetic_score}  # fmt: skip
    return vector_conditioning(pooled, SDXL_REFINER_Y, values)
