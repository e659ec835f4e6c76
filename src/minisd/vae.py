"""The KL autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G).

An image `(B, 3, H, W)` in [-1, 1] is encoded to a diagonal Gaussian over latents
`(B, 4, H/8, W/8)`; the diffusion model works on `scale_factor * z`. This is
`ldm.models.autoencoder.AutoencoderKL` with the `Encoder` / `Decoder` of
`sgm/modules/diffusionmodules/model.py` and ldm's `DiagonalGaussianDistribution`.

Modules are named like the official single-file keys without `first_stage_model.`:

    encoder.conv_in, encoder.down[l].block[i], encoder.down[l].downsample (l < last),
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out (mean, logvar)
    quant_conv, post_quant_conv (1x1 convs on either side of the latent)
    decoder.conv_in, decoder.mid.{block_1,attn_1,block_2},
    decoder.up[l].block[i] (num_res_blocks + 1 of them), decoder.up[l].upsample (l > 0),
    decoder.norm_out, decoder.conv_out

Level l = 0 is the full resolution in both halves. So the decoder's `up` list is
stored in reverse order of application: `up[len(ch_mult) - 1]` runs first and
`up[0]` last (the official code builds it with `self.up.insert(0, up)`). diffusers
numbers its `up_blocks` in application order: official `up.{n-1-i}` is
`up_blocks.{i}` (see `diffusers_format.vae_table`). `level_plan` lists the levels
and their widths; the modules and the diffusers key table are both generated from it.

Numerics follow the reference: GroupNorm runs in the module's dtype (no upcast
there), and `decode` returns the raw decoder output, nominally in [-1, 1] but NOT
clamped (the reference pipelines clamp when converting to pixels). The VAE is
meant to run in fp32, because the SDXL VAE overflows in fp16 (see `AutoencoderKL`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minisd.attention import attention

logger = logging.getLogger(__name__)

# Normalize() of the reference: GroupNorm(32 groups, eps=1e-6, affine).
_GROUPS = 32
_HALF = (torch.float16, torch.bfloat16)


# Sanity bounds of `VAEConfig.__post_init__`, far above the SD/SDXL VAE (512 channels, 4 levels, 2 blocks):
# a mistyped or hostile config fails at once instead of building modules for minutes.
_MAX_WIDTH = 1 << 16  # channels of any layer
_MAX_LEVELS = 8  # resolution levels
_MAX_REPEAT = 64  # ResnetBlocks per level
_MAX_CHANNELS = 1024  # image and latent channels


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    """A ValueError naming `VAEConfig.name` unless `value` is an int (not a bool) in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"VAEConfig.{name} must be an int, got {type(value).__name__} {repr(value)[:60]}")
    if not lo <= value <= hi:
        bound = " (a sanity bound far above any released model)" if value > hi else ""
        raise ValueError(f"VAEConfig.{name} must be in [{lo}, {hi}]{bound}, got {value}")


@dataclass(frozen=True)
class VAEConfig:
    """`first_stage_config.params.ddconfig` of the official YAML, plus `embed_dim`
    (a sibling of `ddconfig`) and `scale_factor` (from `model.params`)."""

    ch: int = 128  # base channel count; level l has ch * ch_mult[l] channels
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per resolution level
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (decoder: one more)
    z_channels: int = 4  # channels of the encoder/decoder latent side
    embed_dim: int = 4  # channels of the latent the diffusion model sees
    in_channels: int = 3  # image channels in
    out_ch: int = 3  # image channels out
    resolution: int = 256  # training resolution; unused at inference (any H, W work)
    attn_resolutions: tuple[int, ...] = ()  # extra attention per level; SD uses none
    double_z: bool = True  # the encoder predicts mean and logvar
    dropout: float = 0.0
    scale_factor: float = 0.18215  # latents are multiplied by this before diffusion

    def __post_init__(self) -> None:
        """Check the type and range of every field (a list becomes a tuple), then how they fit together."""
        for name, hi in (("ch", _MAX_WIDTH), ("num_res_blocks", _MAX_REPEAT), ("z_channels", _MAX_CHANNELS),
                         ("embed_dim", _MAX_CHANNELS), ("in_channels", _MAX_CHANNELS), ("out_ch", _MAX_CHANNELS),
                         ("resolution", 1 << 20)):
            _check_int(name, getattr(self, name), 1, hi)
        for name in ("ch_mult", "attn_resolutions"):
            if isinstance(getattr(self, name), list):  # as JSON gives it; frozen, so set once here
                object.__setattr__(self, name, tuple(getattr(self, name)))
            if not isinstance(getattr(self, name), tuple):
                raise ValueError(f"VAEConfig.{name} must be a tuple of ints, got {repr(getattr(self, name))[:60]}")
        if not 1 <= len(self.ch_mult) <= _MAX_LEVELS:
            raise ValueError(f"VAEConfig.ch_mult must have 1 to {_MAX_LEVELS} levels, got {len(self.ch_mult)}")
        for i, mult in enumerate(self.ch_mult):
            _check_int(f"ch_mult[{i}]", mult, 1, _MAX_WIDTH // self.ch)
        if not isinstance(self.double_z, bool):
            raise ValueError(f"VAEConfig.double_z must be True or False, got {self.double_z!r}")
        for name, lo, hi in (("dropout", 0.0, 1.0), ("scale_factor", 0.0, math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v < hi and math.isfinite(v)):
                raise ValueError(f"VAEConfig.{name} must be a finite number in [{lo}, {hi}), got {repr(v)[:60]}")
        if self.scale_factor == 0:
            raise ValueError("VAEConfig.scale_factor must be positive, got 0")
        for mult in self.ch_mult:
            if (self.ch * mult) % _GROUPS != 0:
                raise ValueError(f"VAEConfig: {self.ch * mult} channels (ch * ch_mult) are not {_GROUPS} groups")
        if self.attn_resolutions:
            # No SD/SDXL VAE has them, and diffusers' AutoencoderKL has no slot for them.
            raise ValueError(f"VAEConfig: attn_resolutions must be empty, got {self.attn_resolutions}")
        if not self.double_z:
            # ldm's AutoencoderKL asserts ddconfig["double_z"]: the KL posterior needs a logvar.
            raise ValueError("VAEConfig: double_z must be True for a KL autoencoder")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)


# SD 1.x and 2.x: first_stage_config of configs/stable-diffusion/v1-inference.yaml
# (CompVis/stable-diffusion) and v2-inference(-v).yaml (Stability-AI/stablediffusion);
# scale_factor 0.18215 from model.params of the same files.
SD_VAE = VAEConfig(
    ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4, in_channels=3, out_ch=3,
    resolution=256, attn_resolutions=(), double_z=True, dropout=0.0, scale_factor=0.18215,
)  # fmt: skip
# SDXL base and refiner: first_stage_config of configs/inference/sd_xl_base.yaml and
# sd_xl_refiner.yaml (Stability-AI/generative-models): the same ddconfig, retrained
# weights, and scale_factor 0.13025 (model.params).
SDXL_VAE = replace(SD_VAE, scale_factor=0.13025)


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Level:
    """One resolution level: `encoder.down[level]` or `decoder.up[level]`.

    `block[i]` is a ResnetBlock `blocks[i][0] -> blocks[i][1]` (with a 1x1 `nin_shortcut`
    when the two differ); `resample` says whether the level ends with `downsample`
    (encoder) or `upsample` (decoder), a conv at width `channels`."""

    level: int  # l: the level runs at 1 / 2**l of the image size (0 = full resolution)
    blocks: tuple[tuple[int, int], ...]  # (c_in, c_out) of each ResnetBlock `block[i]`
    resample: bool  # encoder: `downsample` (every level but the last); decoder: `upsample` (l > 0)

    @property
    def channels(self) -> int:
        """The level's width (ch * ch_mult[level]): every block's output, the resampler's width."""
        return self.blocks[-1][1]


@dataclass(frozen=True)
class VAEPlan:
    """The levels of the encoder and the decoder, each tuple indexed by level as the
    official `down` / `up` lists are (the decoder runs its levels from the last to 0)."""

    down: tuple[Level, ...]  # encoder.down[l]; runs after conv_in (cfg.ch wide), before mid
    up: tuple[Level, ...]  # decoder.up[l]; up[-1] runs first, after mid
    mid_channels: int  # width of encoder.mid and decoder.mid (block_1, attn_1, block_2)


def level_plan(cfg: VAEConfig) -> VAEPlan:
    """The level plan of `cfg`. `Encoder`, `Decoder` and the diffusers key table
    (`diffusers_format.vae_table`) are all generated from it. For SD's VAE (ch 128,
    ch_mult 1, 2, 4, 4): down[0..3] at 128, 256, 512, 512 wide, 2 blocks each, the
    first block of down[1] and down[2] widening; up[3..0] at 512, 512, 256, 128, 3 blocks
    each, the first block of up[1] and up[0] narrowing."""
    widths = [cfg.ch * mult for mult in cfg.ch_mult]
    last = len(widths) - 1
    down: list[Level] = []
    c_in = cfg.ch  # encoder.conv_in's output
    for lvl, c_out in enumerate(widths):
        blocks = tuple((c_out if i else c_in, c_out) for i in range(cfg.num_res_blocks))
        down.append(Level(lvl, blocks, resample=lvl != last))
        c_in = c_out
    up: list[Level] = []
    c_in = widths[-1]  # decoder.conv_in's output, through mid
    for lvl in reversed(range(len(widths))):  # application order: the lowest resolution first
        c_out = widths[lvl]
        blocks = tuple((c_out if i else c_in, c_out) for i in range(cfg.num_res_blocks + 1))
        up.insert(0, Level(lvl, blocks, resample=lvl != 0))  # stored by level, as `self.up.insert(0, up)`
        c_in = c_out
    return VAEPlan(tuple(down), tuple(up), widths[-1])


# --------------------------------------------------------------------------- layers
class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)), ldm's `DiagonalGaussianDistribution`."""

    def __init__(self, moments: torch.Tensor) -> None:
        # moments: (B, 2 * embed_dim, h, w), mean first, as quant_conv emits them.
        self.mean, logvar = moments.chunk(2, dim=1)
        # The reference clamps logvar to [-30, 20] so exp() neither under- nor overflows.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean, (B, C, h, w)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps drawn like diffusers' `randn_tensor` (on the generator's
        device, in the mean's dtype): a seeded generator gives `latent_dist.sample(generator)`."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the width changes.
    The VAE's blocks have no timestep embedding (temb_channels = 0 in the reference)."""

    def __init__(self, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.norm2 = _group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C_out, H, W)."""
        # The reference's nonlinearity is x * sigmoid(x), i.e. SiLU.
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h * w positions, with 1x1-conv q/k/v/proj_out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        # False: the official q/k/v convs; True after `minisd.speed.fuse_projections`: one `qkv` conv
        # with the stacked weights [q; k; v], one read of the normalised input instead of three.
        self.fused = False
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Single-head self-attention over the pixels, residual: (B, C, H, W) -> (B, C, H, W)."""
        _, _, h, w = x.shape
        n = self.norm(x)
        qkv = self.qkv(n).chunk(3, dim=1) if self.fused else (self.q(n), self.k(n), self.v(n))
        q, k, v = (rearrange(t, "b c h w -> b (h w) c") for t in qkv)
        # One head of width c, so the scale is c ** -0.5 as in the reference.
        out = rearrange(attention(q, k, v, heads=1), "b (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom only: torch convs pad
    symmetrically, so the reference pads (0, 1, 0, 1) by hand and uses padding=0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, dropout: float) -> nn.Module:
    """`mid`: block_1, attn_1, block_2 at the lowest resolution (a bare Module, as in the reference)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    """Image `(B, in_channels, H, W)` -> moments `(B, 2 * z_channels, H/f, W/f)`."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        plan = level_plan(cfg)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        for lv in plan.down:
            level = nn.Module()  # a bare Module holding `block` and `downsample`, as in the reference
            level.block = nn.ModuleList(ResnetBlock(c_in, c_out, cfg.dropout) for c_in, c_out in lv.blocks)
            level.downsample = Downsample(lv.channels) if lv.resample else None
            self.down.append(level)
        c = plan.mid_channels
        self.mid = _mid(c, cfg.dropout)
        self.norm_out = _group_norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> posterior moments (B, 2 z, H/f, W/f)."""
        h = self.conv_in(x)
        # down: full resolution first, halving after every level but the last
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        # mid: resnet, global attention, resnet
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent `(B, z_channels, h, w)` -> image `(B, out_ch, h*f, w*f)`."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        plan = level_plan(cfg)
        self.conv_in = nn.Conv2d(cfg.z_channels, plan.mid_channels, kernel_size=3, padding=1)
        self.mid = _mid(plan.mid_channels, cfg.dropout)
        levels: list[nn.Module] = []
        # Built from the lowest resolution up, as the reference, but stored by level (its
        # `self.up.insert(0, up)`), so up[0] is the full-resolution level, as in the official keys.
        for lv in reversed(plan.up):
            level = nn.Module()  # a bare Module holding `block` and `upsample`, as in the reference
            level.block = nn.ModuleList(ResnetBlock(c_in, c_out, cfg.dropout) for c_in, c_out in lv.blocks)
            level.upsample = Upsample(lv.channels) if lv.resample else None
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        c = plan.up[0].channels
        self.norm_out = _group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, z, h, w) -> images (B, 3, h f, w f)."""
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        # up: lowest resolution first, i.e. up[-1], ..., up[0]
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The SD / SDXL VAE: `encode` images in [-1, 1] to a `DiagonalGaussian`, `decode`
    UNSCALED latents (divide the diffusion latents by `config.scale_factor` first).

    Precision: inputs are cast to the module's dtype; keep it fp32 (SDXL's activations
    exceed fp16's 65504). If an fp16/bf16 module's output is not finite for a finite input,
    the module is upcast to fp32 *for good* (the overflow comes from the weights, so it
    would recur; fp32 costs ~335 MB), with a warning, and the call is redone in fp32.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def dtype(self) -> torch.dtype:
        """The parameter dtype."""
        return next(self.parameters()).dtype

    # -- public API
    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images `(B, in_channels, H, W)` in [-1, 1], sides multiples of f = 8 -> q(z|x)."""
        self._check(images, "images", self.config.in_channels, self.config.downsample_factor)
        return DiagonalGaussian(self._guarded(self._moments, images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents `(B, embed_dim, h, w)` -> images `(B, out_ch, f*h, f*w)`, not clamped."""
        self._check(latents, "latents", self.config.embed_dim, 1)
        return self._guarded(self._decode, latents)

    def encode_tiled(
        self, images: torch.Tensor, *, tile_size: int = 512, overlap: int | None = None
    ) -> DiagonalGaussian:
        """`encode` in overlapping `tile_size` pixel tiles blended in latent space, for images too
        large to encode at once. Approximate: GroupNorm statistics and attention become per tile."""
        f = self.config.downsample_factor
        self._check(images, "images", self.config.in_channels, f)
        run = lambda x: _blend_tiles(self._moments, x, tile_size, overlap, up=1, down=f)  # noqa: E731
        return DiagonalGaussian(self._guarded(run, images))

    def decode_tiled(self, latents: torch.Tensor, *, tile_size: int = 64, overlap: int | None = None) -> torch.Tensor:
        """`decode` in overlapping tiles of `tile_size` latent pixels, blended in pixel space;
        an approximation, as for `encode_tiled`."""
        self._check(latents, "latents", self.config.embed_dim, 1)
        f = self.config.downsample_factor
        return self._guarded(lambda z: _blend_tiles(self._decode, z, tile_size, overlap, up=f, down=1), latents)

    # -- the two halves, without checks
    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, 2 * embed_dim, H/f, W/f)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def _guarded(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn(x) in the module's dtype; redone in fp32 if a half-precision run overflowed."""
        dtype = self.dtype
        out = fn(x.to(dtype))
        if dtype in _HALF and not torch.isfinite(out).all() and torch.isfinite(x).all():
            why = "produced inf/NaN (activation overflow): upcasting it to float32 for good"
            logger.warning("minisd.vae: the %s VAE %s. Load it in float32 to skip the wasted pass.", dtype, why)
            self.float()
            out = fn(x.float())
        return out

    @staticmethod
    def _check(x: torch.Tensor, what: str, channels: int, multiple: int) -> None:
        if x.dim() != 4:
            raise ValueError(f"AutoencoderKL: {what} must be (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"AutoencoderKL: {what} must have {channels} channels, got {x.shape[1]}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            got = f"{x.shape[2]}x{x.shape[3]}"
            raise ValueError(f"AutoencoderKL: {what} sides must be multiples of {multiple}, got {got}")


# --------------------------------------------------------------------------- tiling
def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of `tile`-sized tiles covering [0, length) at a stride of tile - overlap,
    the last one flush with the far edge (so it may overlap its neighbour more)."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def _ramp(start: int, size: int, length: int, overlap: int, like: torch.Tensor) -> torch.Tensor:
    """1-D blend weights of the tile [start, start + size) of [0, length): 1 inside, and a
    linear ramp (0.5/overlap ... 1 - 0.5/overlap) over `overlap` pixels on each side that
    has a neighbouring tile. Never 0, so every pixel has positive total weight."""
    w = torch.ones(size, dtype=like.dtype, device=like.device)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=like.dtype, device=like.device) + 0.5) / overlap
        if start > 0:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if start + size < length:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


def _blend_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int | None, *, up: int, down: int
) -> torch.Tensor:
    """Apply `fn` (which scales H and W by up/down) to overlapping tiles of `x` and blend.

    `tile` and `overlap` (default a quarter tile) are input pixels, multiples of `down`.
    Each tile's output is weighted by `_ramp` along y times `_ramp` along x, summed into
    the output and divided by the summed weights: tiles cross-fade linearly in an overlap,
    and the weights sum to 1 even where the last, edge-flush tile overlaps more. (diffusers'
    `tiled_decode` blends neighbours pairwise with `blend_v` / `blend_h` and crops instead.)
    A single tile covering `x` has weight 1 everywhere, so it gives exactly `fn(x)`.
    """
    overlap = tile // 4 // down * down if overlap is None else overlap
    if not 0 <= overlap < tile or tile % down or overlap % down:
        raise ValueError(f"tiling: need 0 <= overlap < tile_size, both multiples of {down}, got {overlap} and {tile}")
    _, _, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    out = total = None
    for y in _tile_starts(h, tile, overlap):
        for x0 in _tile_starts(w, tile, overlap):
            t = fn(x[:, :, y : y + th, x0 : x0 + tw])  # (B, C', th*up/down, tw*up/down)
            if out is None:
                out = t.new_zeros(t.shape[0], t.shape[1], h * up // down, w * up // down)
                total = t.new_zeros(h * up // down, w * up // down)
            ys, xs, oh, ow, o = y * up // down, x0 * up // down, t.shape[2], t.shape[3], overlap * up // down
            weight = _ramp(ys, oh, out.shape[2], o, t)[:, None] * _ramp(xs, ow, out.shape[3], o, t)[None, :]
            out[:, :, ys : ys + oh, xs : xs + ow] += t * weight
            total[ys : ys + oh, xs : xs + ow] += weight
    return out / total
