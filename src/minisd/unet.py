"""The denoising U-Net of Stable Diffusion v1/v2 and SDXL: the LDM/sgm `UNetModel`.

An encoder of ResBlocks and SpatialTransformers at several resolutions, a middle
block, and a decoder that concatenates the encoder's activations back in
(Ronneberger et al. 2015; Rombach et al. 2022, sec. 3.3; Podell et al. 2023 for
SDXL). It reproduces `sgm/modules/diffusionmodules/openaimodel.py` and
`sgm/modules/attention.py` (and the identical `ldm/` files of SD1/SD2).

Module names copy the official single-file checkpoints without the
`model.diffusion_model.` prefix, so an official file loads by a prefix strip.
`block_plan` says what the opaque `input_blocks[n]` / `output_blocks[n]` hold;
see docs/unet.md for the block table of SD1.5 and SDXL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from minisd.attention import attention

# --------------------------------------------------------------------------- config
# Sanity bounds of `UNetConfig.__post_init__`. No released model comes near them (the widest layer
# is the refiner's 1536 channels, the deepest transformer SDXL's 10 blocks, the most levels 4);
# they make a mistyped or hostile config (a config.json claiming 10**7 layers) fail at once instead
# of building modules for minutes. Raise one if a real model ever needs it.
_MAX_WIDTH = 1 << 16  # channels of any layer, and of the context and y vectors
_MAX_LEVELS = 8  # resolution levels: 7 halvings take a 1024 px image's 128 x 128 latent to 1 x 1
_MAX_REPEAT = 64  # ResBlocks per level, transformer blocks per SpatialTransformer
_MAX_LATENT = 1024  # latent channels in and out (4; 9 for inpainting)


def _check_int(owner: str, name: str, value: object, lo: int, hi: int) -> None:
    """A ValueError naming `owner.name` unless `value` is an int (not a bool) in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be an int, got {type(value).__name__} {repr(value)[:60]}")
    if not lo <= value <= hi:
        bound = " (a sanity bound far above any released model)" if value > hi else ""
        raise ValueError(f"{owner}.{name} must be in [{lo}, {hi}]{bound}, got {value}")


def _check_ints(owner: str, config: object, name: str, lo: int, hi: int, max_len: int) -> None:
    """The same for a tuple field (a list, as JSON gives it, is stored as a tuple), at most `max_len` long."""
    value = getattr(config, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(config, name, value)  # frozen dataclass: the one place a field is normalised
    if not isinstance(value, tuple):
        raise ValueError(f"{owner}.{name} must be a tuple of ints, got {type(value).__name__} {repr(value)[:60]}")
    if len(value) > max_len:
        raise ValueError(f"{owner}.{name} has {len(value)} entries, more than the bound {max_len}")
    for i, v in enumerate(value):
        _check_int(owner, f"{name}[{i}]", v, lo, hi)


@dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters, named as in the official YAMLs (`unet_config` / `network_config`).

    Head rule (openaimodel.UNetModel): with `num_head_channels == -1` every
    attention has `num_heads` heads of width `ch // num_heads` (SD1); otherwise
    `ch // num_head_channels` heads of width `num_head_channels` (SD2, SDXL).
    ldm's `legacy=True` rewrote `dim_head = ch // num_heads` for spatial
    transformers, which equals both branches above, so it needs no field (and
    every official YAML sets `legacy: False`).
    """

    in_channels: int = 4  # latent channels (9 for inpainting: latent + mask + masked latent)
    out_channels: int = 4
    model_channels: int = 320  # width of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # ResBlocks per level in the encoder (one more in the decoder)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors 2**level that get attention
    transformer_depth: int | tuple[int, ...] = 1  # BasicTransformerBlocks per SpatialTransformer, or per level
    transformer_depth_middle: int | None = None  # None: transformer_depth of the last level (sgm)
    num_heads: int = -1
    num_head_channels: int = -1
    context_dim: int = 768  # width of the cross-attention tokens (text encoder hidden size)
    use_linear_in_transformer: bool = False  # proj_in/proj_out: nn.Linear (SD2, SDXL) or 1x1 conv (SD1)
    adm_in_channels: int | None = None  # width of the vector `y` (num_classes="sequential"); None: no y

    def __post_init__(self) -> None:
        """Check the type and range of every field (lists become tuples), then how they fit together,
        so a bad config fails here, before any module is built."""
        for name, hi in (("in_channels", _MAX_LATENT), ("out_channels", _MAX_LATENT), ("model_channels", _MAX_WIDTH),
                         ("num_res_blocks", _MAX_REPEAT), ("context_dim", _MAX_WIDTH)):
            _check_int("UNetConfig", name, getattr(self, name), 1, hi)
        _check_ints("UNetConfig", self, "channel_mult", 1, _MAX_WIDTH, _MAX_LEVELS)
        # downsampling factors 2**level; each level is named at most once or twice
        _check_ints("UNetConfig", self, "attention_resolutions", 1, 2 ** (_MAX_LEVELS - 1), 8 * _MAX_LEVELS)
        if not self.channel_mult:
            raise ValueError("UNetConfig.channel_mult must have at least one level, got ()")
        if isinstance(self.transformer_depth, (list, tuple)):
            _check_ints("UNetConfig", self, "transformer_depth", 0, _MAX_REPEAT, _MAX_LEVELS)
        else:
            _check_int("UNetConfig", "transformer_depth", self.transformer_depth, 0, _MAX_REPEAT)
        if self.transformer_depth_middle is not None:
            _check_int("UNetConfig", "transformer_depth_middle", self.transformer_depth_middle, 0, _MAX_REPEAT)
        for name in ("num_heads", "num_head_channels"):
            if getattr(self, name) != -1:  # -1: unset (sgm's convention)
                _check_int("UNetConfig", name, getattr(self, name), 1, _MAX_WIDTH)
        if self.adm_in_channels is not None:
            _check_int("UNetConfig", "adm_in_channels", self.adm_in_channels, 1, _MAX_WIDTH)
        if not isinstance(self.use_linear_in_transformer, bool):
            got = f"{type(self.use_linear_in_transformer).__name__} {self.use_linear_in_transformer!r}"
            raise ValueError(f"UNetConfig.use_linear_in_transformer must be True or False, got {got}")
        heads, head_channels = self.num_heads, self.num_head_channels
        if (heads == -1) == (head_channels == -1):
            # sgm asserts "Either num_heads or num_head_channels has to be set"; when both are set,
            # num_head_channels silently wins there, so minisd asks for exactly one.
            raise ValueError(f"UNetConfig: set one of num_heads ({heads}) and num_head_channels ({head_channels})")
        if isinstance(self.transformer_depth, tuple) and len(self.transformer_depth) != len(self.channel_mult):
            n = len(self.transformer_depth)
            raise ValueError(f"UNetConfig: transformer_depth has {n} entries, expected {len(self.channel_mult)}")
        for level, mult in enumerate(self.channel_mult):
            ch = self.model_channels * mult
            if ch > _MAX_WIDTH:
                raise ValueError(f"UNetConfig: level {level} is {ch} channels wide, over the bound {_MAX_WIDTH}")
            if ch % 32 or ch % (heads if head_channels == -1 else head_channels):
                raise ValueError(f"UNetConfig: level {level} width {ch} does not split into 32 groups and into heads")

    @property
    def depths(self) -> tuple[int, ...]:
        """Transformer depth per level (sgm expands an int to every level)."""
        d = self.transformer_depth
        return (d,) * len(self.channel_mult) if isinstance(d, int) else d

    @property
    def middle_depth(self) -> int:
        """Transformer depth of the middle block (the deepest level's unless set)."""
        return self.depths[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle

    @property
    def downsample_factor(self) -> int:
        """Latent height and width must be multiples of this (one halving per level transition)."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads(self, ch: int) -> tuple[int, int]:
        """(heads, dim_head) of an attention over `ch` channels (see the class docstring)."""
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels


# stablediffusion configs/stable-diffusion/v1-inference.yaml (SD 1.4/1.5): 8 heads, 1x1-conv projections.
SD1_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_resolutions=(4, 2, 1), transformer_depth=1, num_heads=8, context_dim=768,
    use_linear_in_transformer=False,
)
# runwayml v1-inpainting-inference.yaml: SD1 with 9 input channels (latent, mask, masked-image latent).
SD1_INPAINT_UNET = replace(SD1_UNET, in_channels=9)
# stablediffusion v2-inference.yaml and v2-inference-v.yaml (512 eps and 768 v share the network):
# heads of width 64, linear projections, OpenCLIP ViT-H context.
SD2_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_resolutions=(4, 2, 1), transformer_depth=1, num_head_channels=64, context_dim=1024,
    use_linear_in_transformer=True,
)
# stablediffusion v2-inpainting-inference.yaml (512-inpainting-ema): SD2 with 9 input channels.
SD2_INPAINT_UNET = replace(SD2_UNET, in_channels=9)
# generative-models configs/inference/sd_xl_base.yaml. transformer_depth [1, 2, 10]: the 1 is unused
# because attention starts at factor 2 (so [0, 2, 10] in effect); the middle takes the last (10).
SDXL_BASE_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
    attention_resolutions=(4, 2), transformer_depth=(1, 2, 10), num_head_channels=64, context_dim=2048,
    use_linear_in_transformer=True, adm_in_channels=2816,
)
# generative-models configs/inference/sd_xl_refiner.yaml. The YAML's context_dim [1280] * 4 is one
# width per transformer block, all equal, so one int says the same.
SDXL_REFINER_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_resolutions=(4, 2), transformer_depth=4, num_head_channels=64, context_dim=1280,
    use_linear_in_transformer=True, adm_in_channels=2560,
)


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Block:
    """What one `input_blocks[n]` (n >= 1) or `output_blocks[n]` holds.

    A ResBlock `ch_in -> ch_out` (key `.0`), then a SpatialTransformer of
    `UNetConfig.depths[level]` blocks when `attn` (`.1`), then an Upsample when `up`
    (`.2`, or `.1` without attention); or, when `down`, only a Downsample (`.0.op`)."""

    level: int  # index into channel_mult: the block runs at 1 / 2**level of the latent size
    index: int  # position within the level (diffusers' `resnets.{index}` / `attentions.{index}`)
    ch_in: int  # ResBlock input width (decoder: current + skip channels); a Downsample's width
    ch_out: int  # ResBlock output width (= ch_in for a Downsample)
    attn: bool = False  # a SpatialTransformer follows the ResBlock
    down: bool = False  # the block is a lone Downsample (encoder, end of a level)
    up: bool = False  # the block ends with an Upsample (decoder, end of a level)


@dataclass(frozen=True)
class UNetPlan:
    """The blocks of a U-Net, in the loop order of openaimodel.UNetModel.__init__."""

    inputs: tuple[Block, ...]  # input_blocks[1:] (input_blocks[0] is conv_in, model_channels wide)
    outputs: tuple[Block, ...]  # output_blocks[0:]
    middle_channels: int  # width of middle_block: ResBlock, SpatialTransformer, ResBlock


def block_plan(cfg: UNetConfig) -> UNetPlan:
    """The block plan of `cfg`. `UNetModel.__init__` and the diffusers key table
    (`diffusers_format.unet_table`) are both generated from it, so the modules and
    the table cannot disagree. For SD1.5 (n: kind, level; docs/unet.md has the widths):

        input_blocks   0 conv_in | 1-2 Res+ST L0 | 3 Down | 4-5 Res+ST L1 | 6 Down
                       7-8 Res+ST L2 | 9 Down | 10-11 Res L3
        output_blocks  0-2 Res L3, Up | 3-5 Res+ST L2, Up | 6-8 Res+ST L1, Up | 9-11 Res+ST L0

    "Up" marks the last block of a level. `output_blocks[m]` takes
    `input_blocks[len - 1 - m]`'s output as its skip connection."""
    mc, last = cfg.model_channels, len(cfg.channel_mult) - 1
    inputs: list[Block] = []
    skips = [mc]  # widths of everything the encoder pushes (input_blocks.0 is conv_in)
    ch = mc
    for level, mult in enumerate(cfg.channel_mult):
        attn = 2**level in cfg.attention_resolutions
        for i in range(cfg.num_res_blocks):
            inputs.append(Block(level, i, ch, mult * mc, attn=attn))
            ch = mult * mc
            skips.append(ch)
        if level != last:
            inputs.append(Block(level, 0, ch, ch, down=True))
            skips.append(ch)
    middle = ch
    outputs: list[Block] = []
    for level in reversed(range(len(cfg.channel_mult))):
        attn = 2**level in cfg.attention_resolutions
        for i in range(cfg.num_res_blocks + 1):
            out = cfg.channel_mult[level] * mc
            outputs.append(Block(level, i, ch + skips.pop(), out, attn=attn, up=level > 0 and i == cfg.num_res_blocks))
            ch = out
    return UNetPlan(tuple(inputs), tuple(outputs), middle)


# --------------------------------------------------------------------------- layers
def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, `(B,) -> (B, dim)`, in fp32.

    sgm `diffusionmodules/util.py: timestep_embedding`: frequencies
    `max_period ** (-i / half)`, laid out as `[cos, sin]` (the reverse of
    Vaswani et al. 2017; diffusers calls this `flip_sin_to_cos=True`)."""
    half = dim // 2
    # Always fp32: t up to 999 times frequencies near 1 loses whole radians in fp16.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if `x` is stored that way (and not also plainly contiguous), else NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (sgm util.GroupNorm32:
    `super().forward(x.float()).type(x.dtype)`), used by the ResBlocks and `out`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm computed in fp32: (B, C, H, W) -> (B, C, H, W), in x's dtype."""
        # Affine parameters are upcast too, so an fp16/bf16 model needs no autocast here.
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """openaimodel.ResBlock (no scale-shift norm, no up/down): two 3x3 convs with the
    timestep embedding added in between, plus a (1x1 conv when widths differ) skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        # GroupNorm32 eps is the nn.GroupNorm default 1e-5, as sgm's `normalization()`
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Identity(),  # the reference's nn.Dropout(p=0.0): keeps the conv at index 3
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # 1x1 conv when the width changes (use_conv=False in every SD config)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) and timestep embedding emb (B, E) -> (B, C_out, H, W)."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C) broadcast over h, w
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """sgm attention.CrossAttention: self-attention when `context` is None."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.is_self_attention = context_dim is None  # attn1; attn2 attends to the text
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.chunk_size: int | None = None  # see UNetModel.set_attention_chunk_size
        # None: the official to_q/to_k/to_v. After `minisd.speed.fuse_projections`, "qkv" (self-attention:
        # one `to_qkv` of rows [W_q; W_k; W_v]) or "kv" (cross-attention: `to_q` and one `to_kv`).
        self.fused: str | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # [Linear, the reference's nn.Dropout(p=0.0)]: a Sequential for the key `to_out.0`
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, C) attending to context (B, T, C_ctx) or to itself when None -> (B, L, C)."""
        q, k, v = self._project(x, context)  # (B, L, heads * d) each
        return self.to_out(attention(q, k, v, heads=self.heads, chunk_size=self.chunk_size))

    def _project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """q from x; k, v from the context (x itself for self-attention). A fused projection is one
        GEMM over the stacked weight rows; its output splits into the same three products."""
        if self.fused == "qkv":
            if context is not None:
                raise ValueError("CrossAttention: a fused self-attention (to_qkv) takes no context")
            return self.to_qkv(x).chunk(3, dim=-1)
        context = x if context is None else context
        if self.fused == "kv":
            return (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        return self.to_q(x), self.to_k(context), self.to_v(context)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2x width, `x * gelu(gate)` (exact GELU)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gated GELU projection: (B, L, C) -> (B, L, C_out)."""
        x, gate = self.proj(x).chunk(2, dim=-1)  # the value half comes first, as sgm
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """sgm attention.FeedForward with glu=True, mult=4."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            GEGLU(dim, inner),
            nn.Identity(),  # the reference's nn.Dropout(p=0.0): keeps the output Linear at index 2
            nn.Linear(inner, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, L, C)."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)  # self-attention over the pixels
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)  # pixels attend to the text tokens
        # plain LayerNorms (eps 1e-5), no upcast in the reference
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Self-attention, cross-attention on context (B, T, C_ctx), MLP: (B, L, C) -> (B, L, C)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """sgm attention.SpatialTransformer: feature map -> tokens -> transformer blocks -> feature map, residual."""

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        # sgm `Normalize`: a plain GroupNorm with eps 1e-6 (no fp32 upcast, unlike GroupNorm32);
        # PyTorch's half-precision norm kernels accumulate the statistics in fp32 anyway.
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        # SD1: 1x1 convolutions; SD2/SDXL (`use_linear_in_transformer`): linears on the tokens
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Transformer blocks over the pixels of x, with context (B, T, C_ctx): (B, C, H, W) -> (B, C, H, W)."""
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # Back to a feature map laid out like the input (NCHW, or channels_last for a
        # channels_last model), as sgm's `.contiguous()` does for NCHW: the bare view would
        # be channels_last-strided and steer the next convolution to another kernel.
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous(memory_format=memory_format_of(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    """A stride-2 3x3 convolution (openaimodel.Downsample, use_conv=True)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (openaimodel.Upsample)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """openaimodel.TimestepEmbedSequential: a Sequential whose ResBlocks also get the
    timestep embedding and whose SpatialTransformers also get the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore
        """Each layer with what it takes (emb (B, E), context (B, T, C_ctx)): (B, C, H, W) -> (B, C', H', W')."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------- model
class UNetModel(nn.Module):
    """The SD/SDXL U-Net: `forward(x, timesteps, context, y=None)` predicts eps (or v).

    Memory options: `set_attention_chunk_size(n)` computes attention n queries at a
    time; `gradient_checkpointing = True` recomputes each block in the backward pass
    (training mode only)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        mc = config.model_channels
        emb_dim = 4 * mc  # time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.adm_in_channels is not None:
            # num_classes="sequential": an MLP on the vector y. The outer Sequential holds one
            # module and exists only for the key `label_emb.0.{0,2}` of the official files.
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        def block(b: Block) -> TimestepEmbedSequential:
            if b.down:
                return TimestepEmbedSequential(Downsample(b.ch_in))
            layers: list[nn.Module] = [ResBlock(b.ch_in, emb_dim, b.ch_out)]
            if b.attn:
                layers.append(self._transformer(b.ch_out, config.depths[b.level]))
            if b.up:
                layers.append(Upsample(b.ch_out))
            return TimestepEmbedSequential(*layers)

        plan = block_plan(config)
        conv_in = TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))
        self.input_blocks = nn.ModuleList([conv_in] + [block(b) for b in plan.inputs])
        ch = plan.middle_channels
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch), self._transformer(ch, config.middle_depth), ResBlock(ch, emb_dim, ch)
        )
        self.output_blocks = nn.ModuleList([block(b) for b in plan.outputs])
        self.out = nn.Sequential(GroupNorm32(32, mc), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1))

    def _transformer(self, ch: int, depth: int) -> SpatialTransformer:
        cfg = self.config
        heads, dim_head = cfg.heads(ch)
        return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)

    def set_attention_chunk_size(self, chunk_size: int | None) -> None:
        """Compute every attention `chunk_size` queries at a time (None: all at once).

        Exact (each query attends independently); bounds the (queries, keys) score
        matrix when SDPA falls back to its math kernel on large images."""
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"UNetModel: chunk_size must be a positive int or None, got {chunk_size!r}")
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.chunk_size = chunk_size

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            x: latents `(B, in_channels, H, W)`, H and W multiples of `config.downsample_factor`;
                the model's dtype.
            timesteps: `(B,)` or a scalar (DDPM steps 0..999, may be fractional).
            context: text tokens `(B, L, context_dim)`.
            y: the vector conditioning `(B, adm_in_channels)` (SDXL: pooled text + size/crop
                embeddings), required exactly when `config.adm_in_channels` is set.

        Returns:
            `(B, out_channels, H, W)` in x's dtype.
        """
        timesteps = self._check_inputs(x, timesteps, context, y)
        # 1. Conditioning vector: sinusoidal timestep embedding (fp32), cast to the model's dtype
        #    at the MLP boundary, plus the MLP of y (SDXL).
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        context = context.to(x.dtype)

        # 2. Encoder: remember every block's output for the decoder.
        hs: list[torch.Tensor] = []
        h = x
        for module in self.input_blocks:
            h = self._run(module, h, emb, context)
            hs.append(h)
        # 3. Middle: ResBlock, SpatialTransformer, ResBlock at the lowest resolution.
        h = self._run(self.middle_block, h, emb, context)
        # 4. Decoder: concatenate the matching encoder output on the channel axis, last in first out.
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(module, h, emb, context)
        # 5. Output head: GroupNorm (fp32), SiLU, conv to the latent channels.
        return self.out(h)

    def _run(self, module: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One block, recomputed in the backward pass when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, h, emb, context, use_reentrant=False)
        return module(h, emb, context)

    def _check_inputs(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        """Raise a ValueError naming the mismatch; return timesteps as a `(B,)` tensor."""
        cfg = self.config
        adm = cfg.adm_in_channels
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            hint = " (inpainting: latent, mask, masked-image latent)" if cfg.in_channels == 9 else ""
            raise ValueError(
                f"UNetModel: x must be (B, in_channels={cfg.in_channels}, H, W){hint}, got {tuple(x.shape)}"
            )
        weight_dtype = self.input_blocks[0][0].weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"UNetModel: x is {x.dtype} but the weights are {weight_dtype}; cast x to the model's dtype"
            )
        b, _, height, width = x.shape
        if height % cfg.downsample_factor or width % cfg.downsample_factor:
            raise ValueError(
                f"UNetModel: latent height and width must be multiples of {cfg.downsample_factor} "
                f"(2**(len(channel_mult)-1)), got {height}x{width}"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device)
        timesteps = timesteps.expand(b) if timesteps.dim() == 0 else timesteps
        if timesteps.shape != (b,):
            raise ValueError(f"UNetModel: timesteps must be a scalar or of shape ({b},), got {tuple(timesteps.shape)}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            want = f"({b}, L, {cfg.context_dim})"
            raise ValueError(f"UNetModel: context must be (B, L, context_dim) = {want}, got {tuple(context.shape)}")
        if adm is None and y is not None:
            raise ValueError(f"UNetModel: this model takes no y (adm_in_channels=None), got shape {tuple(y.shape)}")
        if adm is not None and (y is None or y.shape != (b, adm)):
            got = None if y is None else tuple(y.shape)
            raise ValueError(f"UNetModel: y must be (B, adm_in_channels) = ({b}, {adm}), got {got}")
        return timesteps
