"""From prompt strings to the conditioning tensors each U-Net family was trained with.

The U-Net sees two kinds of conditioning:

- `context`, `(B, 77, context_dim)`: token features for cross-attention;
- `y`, `(B, adm_in_channels)` (SDXL only): a vector added to the timestep embedding,
  made of the pooled text embedding and the "micro-conditioning" sizes.

Which hidden state of which text encoder makes `context` is fixed by each official
config (the `cond_stage_config` / `conditioner` of the LDM and sgm YAMLs):

| family        | encoder(s)                          | context                                                | pad |
|---------------|-------------------------------------|--------------------------------------------------------|-----|
| SD1           | CLIP ViT-L/14 (`FrozenCLIPEmbedder`, layer "last") | `ln_final(hidden_states[12])`: last block + final LN | 49407 |
| SD2           | OpenCLIP ViT-H/14 (`FrozenOpenCLIPEmbedder`, layer "penultimate") | `ln_final(hidden_states[23])` | 0 |
| SDXL base     | CLIP-L (`layer: hidden, layer_idx: 11`) and OpenCLIP bigG (`FrozenOpenCLIPEmbedder2`, penultimate, `legacy: False`) | `cat(hidden_states_L[11], hidden_states_G[31])`, no final LN | 49407 / 0 |
| SDXL refiner  | OpenCLIP bigG (penultimate)         | `hidden_states_G[31]`, no final LN                     | 0 |

`families.TextEncoderUse` records these settings per family. diffusers' SD2 folders
store the OpenCLIP-H encoder with its unused 24th block dropped and read the last
of the 23 that remain: the same tensor, which the loader accounts for.

SDXL's pooled vector is `ln_final(hidden_states_G[32])[eot] @ text_projection`
(sgm `FrozenOpenCLIPEmbedder2.forward` with `always_return_pooled`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .clip import TextTransformer
from .families import TextEncoderUse, family_spec
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
    family: str,
    encoders: Sequence[TextTransformer],
    tokenizer: CLIPTokenizer | None = None,
    *,
    uses: Sequence[TextEncoderUse] | None = None,
    clip_skip: int = 0,
    zero_empty: bool = False,
) -> Conditioning:
    """Encode prompts the way the official `family` model was trained.

    Args:
        prompts: one prompt or a batch of them. Prompts longer than 75 BPE tokens are
            truncated, as the references do.
        family: a family name of `families.FAMILIES` (`"sd1"`, `"sd2"`, `"sdxl"`, ...).
        encoders: the family's text encoders, in the official order (SDXL: CLIP-L, then bigG).
        tokenizer: the BPE tokenizer (one vocabulary serves CLIP and OpenCLIP; only the
            pad token differs, and it is taken from the family's settings).
        uses: how to read each encoder; defaults to the family's official settings
            (a diffusers SD2 folder's 23-block encoder is read with `skip=0`).
        clip_skip: read the context this many blocks earlier than the family's default
            (diffusers' `clip_skip`; A1111's "clip skip 2" is `clip_skip=1`). The final
            LayerNorm is applied exactly when the family applies it. Pooled outputs are
            not affected, as in diffusers.
        zero_empty: return zeros for empty prompts instead of encoding "" (sgm's
            `force_uc_zero_embeddings=["txt"]`, diffusers' `force_zeros_for_empty_prompt`,
            used by SDXL base for the unconditional branch of guidance).
    """
    if uses is None:
        uses = [t.use for t in family_spec(family).text]
    if len(encoders) != len(uses):
        raise ValueError(f"encode_prompt: family {family!r} needs {len(uses)} text encoder(s), got {len(encoders)}")
    if clip_skip < 0:
        raise ValueError(f"encode_prompt: clip_skip must be >= 0, got {clip_skip}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokenizer = tokenizer or CLIPTokenizer()

    contexts, pooled = [], None
    for encoder, use in zip(encoders, uses, strict=True):
        layer = encoder.config.layers - use.skip - clip_skip
        if layer < 0:
            raise ValueError(
                f"encode_prompt: clip_skip {clip_skip} reaches below the first block of a "
                f"{encoder.config.layers}-block encoder (the family already skips {use.skip})"
            )
        device = encoder.token_embedding.weight.device
        tokens = tokenizer(prompts, pad_token_id=use.pad_token_id)
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


def _pairs(name: str, value: Sequence[float] | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=torch.float32, device=device)
    if v.dim() == 1:
        v = v.expand(batch, -1)
    if v.shape != (batch, 2):
        raise ValueError(f"{name}: expected 2 numbers (height, width) or (top, left) per image, got shape {tuple(v.shape)}")
    return v


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
    b, dev = pooled.shape[0], pooled.device
    sizes = torch.cat(
        [
            _pairs("original_size", original_size, b, dev),
            _pairs("crop_coords_top_left", crop_coords_top_left, b, dev),
            _pairs("target_size", target_size, b, dev),
        ],
        dim=1,
    )
    return torch.cat([pooled.float(), _embed(sizes)], dim=1).to(pooled.dtype)


def refiner_vector(
    pooled: torch.Tensor,
    original_size: Sequence[int] | torch.Tensor,
    crop_coords_top_left: Sequence[int] | torch.Tensor,
    aesthetic_score: float | torch.Tensor,
) -> torch.Tensor:
    """SDXL refiner's `y` (2560 = 1280 + 2 x 2 x 256 + 256): pooled, original size,
    crop top-left, aesthetic score (`sd_xl_refiner.yaml` order; the score is one number)."""
    b, dev = pooled.shape[0], pooled.device
    score = torch.as_tensor(aesthetic_score, dtype=torch.float32, device=dev).reshape(-1, 1).expand(b, 1)
    sizes = torch.cat(
        [_pairs("original_size", original_size, b, dev), _pairs("crop_coords_top_left", crop_coords_top_left, b, dev), score],
        dim=1,
    )
    return torch.cat([pooled.float(), _embed(sizes)], dim=1).to(pooled.dtype)
