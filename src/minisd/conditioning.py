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

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .clip import TextTransformer
from .embeddings import Embeddings
from .families import SDXL_BASE_Y, SDXL_REFINER_Y, Family, TextEncoderUse
from .prompt_chunks import Chunk, chunked, tokenize_spans, truncated
from .prompt_syntax import parse_prompt
from .tokenizer import CLIPTokenizer
from .unet import timestep_embedding


@dataclass
class Conditioning:
    """What the text side hands to the U-Net.

    Attributes:
        context: `(B, 77 k, context_dim)` tokens for cross-attention: k = 1 chunk of 77 tokens, or
            more for long prompts (`prompt_syntax` "a1111" / "comfy").
        pooled: `(B, 1280)` pooled bigG embedding for SDXL families (of the first chunk), else None.
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
    prompt_syntax: str = "plain",
    embeddings: Embeddings | None = None,
) -> Conditioning:
    """Encode prompts the way the official `family` model was trained.

    Args:
        prompts: one prompt or a batch of them, each of at most `tokenizer.MAX_TEXT_CHARS` characters.
        family: the model family (`families.FAMILIES[...]`, or a loaded model's `family`).
        encoders: the family's text encoders, in the official order (SDXL: CLIP-L, then bigG).
        tokenizer: the BPE tokenizer (one vocabulary serves CLIP and OpenCLIP; the pad token
            and the special-token rules differ, and both are taken from `uses`).
        uses: how to read each encoder; default the family's official reading of full towers
            (a loaded model passes its own: a diffusers SD2 folder's tower is one block shorter).
        clip_skip: read the context this many blocks earlier than the family's default
            (diffusers' `clip_skip`; A1111's "clip skip 2" is `clip_skip=1`, see `a1111_clip_skip`).
            The final LayerNorm is applied exactly when the family applies it. Pooled outputs are
            not affected, as in diffusers.
        zero_empty: return zeros for empty prompts instead of encoding "" (sgm's
            `force_uc_zero_embeddings=["txt"]`, diffusers' `force_zeros_for_empty_prompt`,
            used by SDXL base for the unconditional branch of guidance).
        prompt_syntax: "plain" (the references' behaviour: the text as is, truncated to 75 tokens with
            a warning), or "a1111" / "comfy": A1111's weights, BREAK and prompts of any length in
            75-token chunks, with A1111's or ComfyUI's rule for the weights (docs/prompts.md).
        embeddings: textual-inversion embeddings whose tokens the prompts may use (`embeddings.Embeddings`).

    A batch's prompts are padded to the same number of chunks with the empty prompt's encoding.
    """
    uses, prompts, tokenizer = _checked(prompts, family, encoders, tokenizer, uses, clip_skip)
    spans = [parse_prompt(p, prompt_syntax) for p in prompts]
    chunks = [_chunks(spans, prompts, tokenizer, use, embeddings, i, prompt_syntax) for i, use in enumerate(uses)]
    count = max(len(c) for per_encoder in chunks for c in per_encoder)

    contexts, pooled = [], None
    for encoder, use, per_prompt in zip(encoders, uses, chunks, strict=True):
        layer = _read_layer(encoder, use, clip_skip)
        padded = [c + [Chunk()] * (count - len(c)) for c in per_prompt]  # the empty prompt's chunks
        context, chunk_pooled = _encode_chunks(encoder, use, layer, tokenizer, padded, prompt_syntax)
        contexts.append(context)
        pooled = chunk_pooled if use.pooled else pooled

    # SDXL base: the CLIP-L (768) and bigG (1280) tokens are concatenated along channels
    # (sgm `GeneralConditioner` concatenates "crossattn" outputs on the last axis).
    context = torch.cat(contexts, dim=-1)
    if zero_empty:
        empty = torch.tensor([p == "" for p in prompts], device=context.device)
        context = torch.where(empty[:, None, None], torch.zeros_like(context), context)
        if pooled is not None:
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    return Conditioning(context=context, pooled=pooled)


def _checked(prompts, family, encoders, tokenizer, uses, clip_skip):
    """`encode_prompt`'s arguments checked, with their defaults: (uses, list of prompts, tokenizer)."""
    if len(encoders) != len(family.text):
        raise ValueError(
            f"encode_prompt: family {family.name!r} needs {len(family.text)} text encoder(s), got {len(encoders)}"
        )
    if uses is None:
        uses = [t.use(e.config.layers) for t, e in zip(family.text, encoders)]
    if clip_skip < 0:
        raise ValueError(f"encode_prompt: clip_skip must be >= 0, got {clip_skip}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_prompt: expected a prompt or a non-empty list of prompts, got an empty list")
    tokenizer = tokenizer or CLIPTokenizer()
    for k, text in enumerate(prompts):  # every prompt checked before any work
        if not isinstance(text, str):
            raise ValueError(f"encode_prompt: prompts[{k}] must be a str, got {type(text).__name__}")
        tokenizer._check_length(text, f"CLIPTokenizer: texts[{k}]")
    return uses, prompts, tokenizer


def _read_layer(encoder: TextTransformer, use: TextEncoderUse, clip_skip: int) -> int:
    """The hidden state the context reads: the family's layer, `clip_skip` blocks earlier."""
    layer = use.layer - clip_skip
    if layer < 0:
        raise ValueError(
            f"encode_prompt: clip_skip {clip_skip} reaches below the first block of a "
            f"{encoder.config.layers}-block encoder read at layer {use.layer}"
        )
    return layer


def a1111_clip_skip(n: int) -> int:
    """A1111's "Clip skip" setting (1 = the last layer, 2 = the penultimate, ...) as `clip_skip`, which counts
    the blocks skipped (diffusers' numbering): `n - 1`. A1111's 1 and 2 are the common values."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"A1111 clip skip: expected an int >= 1 (1 = last layer), got {n!r:.40}")
    return n - 1


# ------------------------------------------------------------------ long and weighted prompts
def _chunks(spans, prompts, tokenizer, use, embeddings, index, syntax) -> list[list[Chunk]]:
    """Each prompt's chunks for one encoder: tokenized by its special-token rules, its embedding vectors."""
    table = embeddings.for_encoder(index) if embeddings else {}
    pattern = embeddings.pattern() if embeddings else None

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, special_tokens=use.tokenizer)

    comma = encode(",")[0]
    out = []
    for prompt, s in zip(prompts, spans):
        parts = tokenize_spans(s, encode, table, pattern)
        out.append(truncated(parts, prompt) if syntax == "plain" else chunked(parts, comma))
    return out


def _encode_chunks(encoder, use, layer, tokenizer, chunks: list[list[Chunk]], syntax: str):
    """Each prompt's `k` chunks (as many for every prompt) -> its context `(B, 77 k, width)`, weighted by
    `syntax`'s rule, the chunks side by side (A1111's hstack); and the first chunk's pooled vector."""
    empty = functools.cache(lambda: _encode_chunk(encoder, use, layer, tokenizer, [Chunk()], pooled=False)[0])
    parts, pooled = [], None
    for k in range(len(chunks[0])):
        batch = [c[k] for c in chunks]
        context, chunk_pooled = _encode_chunk(encoder, use, layer, tokenizer, batch, pooled=use.pooled and k == 0)
        parts.append(_weighted(context, batch, syntax, empty))
        pooled = chunk_pooled if k == 0 else pooled
    return torch.cat(parts, dim=1), pooled


def _encode_chunk(encoder, use, layer, tokenizer, batch: list[Chunk], *, pooled: bool):
    """One chunk of each prompt as 77 tokens `[sot] ids [eot] pad...` -> (context `(B, 77, width)`, pooled)."""
    device = encoder.token_embedding.weight.device
    tokens = tokenizer.from_ids([c.ids for c in batch], pad_token_id=use.pad_token_id)
    input_ids, eot = tokens.input_ids.to(device), tokens.eot_index.to(device)
    embeds = None
    if any(c.vectors for c in batch):  # textual inversion: the learned vectors replace their positions' embeddings
        embeds = encoder.token_embedding(input_ids)
        for b, chunk in enumerate(batch):
            for offset, v in chunk.vectors:
                embeds[b, 1 + offset : 1 + offset + v.shape[0]] = v.to(embeds)  # 1 +: after the start token
    # Run only the blocks we read, unless this encoder also supplies the pooled vector,
    # which is taken after the last block.
    out = encoder(input_ids, eot, num_layers=None if pooled else layer, token_embeds=embeds)
    hidden = out.hidden_states[layer]
    return (encoder.ln_final(hidden) if use.final_ln else hidden), (out.pooled if pooled else None)


def _weighted(z: torch.Tensor, batch: list[Chunk], syntax: str, empty) -> torch.Tensor:
    """One chunk's context `z` `(B, 77, C)` with its tokens' weights applied by `syntax`'s rule; prompts
    whose weights are all 1 are returned unchanged (bit for bit). `empty()` encodes the empty prompt."""
    w = torch.ones(z.shape[:2], dtype=torch.float32)
    for b, chunk in enumerate(batch):
        w[b, 1 : 1 + len(chunk.weights)] = torch.tensor(chunk.weights, dtype=torch.float32)
    w = w.to(z.device)
    weighted = (w != 1).any(dim=1)  # (B,)
    if syntax == "plain" or not bool(weighted.any()):
        return z
    rule = a1111_weights(z, w) if syntax == "a1111" else comfy_weights(z, w, empty())
    return torch.where(weighted[:, None, None], rule, z)


def a1111_weights(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's rule (modules/sd_emphasis.py `EmphasisOriginal`): scale each token's context by its weight,
    then rescale the chunk so its mean over all tokens and channels is the unweighted mean:

        z' = (w * z) * (mean(z) / mean(w * z))

    per prompt and 77-token chunk (A1111 takes the means over the whole batch it encodes at once: the same
    for one prompt). `z` `(B, 77, C)`, `w` `(B, 77)`; computed in fp32, returned in `z`'s dtype."""
    zf = z.float()
    scaled = zf * w[..., None]
    ratio = zf.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True)
    return (scaled * ratio).to(z.dtype)


def comfy_weights(z: torch.Tensor, w: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """ComfyUI's rule (comfy/sd1_clip.py `encode_token_weights`): move each token's context along the line
    from the empty prompt's context at the same position, `empty` `(1, 77, C)`, by its weight:

        z'_j = (z_j - e_j) * w_j + e_j        (tokens of weight 1 are kept as they are)

    `z` `(B, 77, C)`, `w` `(B, 77)`; computed in fp32, returned in `z`'s dtype."""
    zf, e = z.float(), empty.float()
    moved = (zf - e) * w[..., None] + e
    return torch.where(w[..., None] == 1, zf, moved).to(z.dtype)


def pad_context(c: Conditioning, tokens: int, empty: Conditioning) -> Conditioning:
    """`c` with the empty prompt's context (`empty`: one prompt, 77 tokens) appended until its context has
    `tokens` tokens: the shorter of the prompt and negative prompt made as long as the other, as A1111's
    `CFGDenoiser.pad_cond_uncond`. The pooled vector is unchanged."""
    missing, length = tokens - c.context.shape[1], empty.context.shape[1]
    if missing < 0 or missing % length:
        raise ValueError(f"pad_context: cannot pad {c.context.shape[1]} tokens to {tokens} with {length}-token chunks")
    pad = empty.context.to(c.context).expand(c.context.shape[0], length, -1).repeat(1, missing // length, 1)
    return Conditioning(torch.cat([c.context, pad], dim=1), c.pooled)


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
