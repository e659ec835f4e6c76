"""Key tables of the foreign layouts: the official single file, and inside it (and in diffusers
folders) the text encoders' transformers CLIPTextModel and open_clip layouts.

An official file holds every component under a prefix (`families.UNET_PREFIX`, ...): the U-Net
and VAE are our names after a prefix strip, the text encoders go through `hf_table` or
`open_clip_table`, and the keys that are not inference weights (EMA copies, schedule buffers,
...) are ignored, each with its reason (`OFFICIAL_IGNORES`).

`clip.TextTransformer` is named like open_clip's text tower, so `open_clip_table` is an
identity table with an ignore list, and `hf_table` renames HF transformers'
`CLIPTextModel` / `CLIPTextModelWithProjection` keys, fusing q/k/v into open_clip's
`in_proj` and transposing `text_projection`. Where each encoder sits in official files
and diffusers folders is `families.py`'s table; the rendered tables are in docs/key-tables.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from . import unet as _unet
from . import vae as _vae
from .clip import ResidualAttentionBlock, TextConfig, TextTransformer
from .families import UNET_PREFIX, VAE_PREFIX, Family
from .keymap import Ignore, KeyTable, Rule, on_meta
from .unet import UNetConfig, UNetModel, block_plan
from .vae import AutoencoderKL, VAEConfig, level_plan


# (ours, their HF transformers names, transform), in our state-dict order: the one list both
# tables are generated from. HF keeps q/k/v apart; nn.MultiheadAttention packs them as [q; k; v].
def _hf_rules(config: TextConfig) -> list[tuple[str, tuple[str, ...], str]]:
    rules = [
        ("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",), "identity"),
        ("positional_embedding", ("text_model.embeddings.position_embedding.weight",), "identity"),
    ]
    for i in range(config.layers):
        ours, hf = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            rules += [
                (f"{ours}ln_1.{p}", (f"{hf}layer_norm1.{p}",), "identity"),
                (f"{ours}attn.in_proj_{p}", tuple(f"{hf}self_attn.{x}_proj.{p}" for x in "qkv"), "concat0"),
                (f"{ours}attn.out_proj.{p}", (f"{hf}self_attn.out_proj.{p}",), "identity"),
                (f"{ours}ln_2.{p}", (f"{hf}layer_norm2.{p}",), "identity"),
                (f"{ours}mlp.c_fc.{p}", (f"{hf}mlp.fc1.{p}",), "identity"),
                (f"{ours}mlp.c_proj.{p}", (f"{hf}mlp.fc2.{p}",), "identity"),
            ]
    rules += [(f"ln_final.{p}", (f"text_model.final_layer_norm.{p}",), "identity") for p in ("weight", "bias")]
    if config.projection_dim is not None:
        # CLIPTextModelWithProjection's bias-free nn.Linear (out, in) = our (in, out) matrix, transposed.
        rules.append(("text_projection", ("text_projection.weight",), "transpose"))
    return rules


def hf_table(config: TextConfig) -> KeyTable:
    """HF transformers `CLIPTextModel` / `CLIPTextModelWithProjection` names (`text_model.*`,
    plus `text_projection.weight` when projected), relative to the encoder root. Works for any
    layer count (diffusers' SD2 text_encoder keeps 23 of OpenCLIP-H's 24 blocks).

    transformers >= 5.6 saves a plain `CLIPTextModel` without the `text_model.` level: add it back
    to those keys, or drop it from this table's, before applying the table."""
    ignore = (
        Ignore("text_model.embeddings.position_ids", "a buffer arange(77) (float in some SD1 files), not a weight"),
    )
    return KeyTable("HF CLIP text", tuple(Rule(o, t, f) for o, t, f in _hf_rules(config)), ignore)


def open_clip_table(config: TextConfig) -> KeyTable:
    """open_clip's names (ours), relative to the encoder root (`cond_stage_model.model.` in SD2)."""
    ignore = (
        Ignore("logit_scale", "CLIP's contrastive temperature, unused for conditioning"),
        Ignore("attn_mask", "a causal mask buffer some open_clip versions save; we use is_causal"),
    )
    return KeyTable.identity("open_clip text", [o for o, _, _ in _hf_rules(config)], ignore)


# ------------------------------------------------------------------------------ the official single file
# Keys of official files that are not weights of the inference model, each with its reason.
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2")  # fmt: skip
OFFICIAL_IGNORES = (
    *(Ignore(k, "DDPM schedule buffer of the training code; minisd computes the schedule (and checks this copy)")
      for k in _SCHEDULE_BUFFERS),
    Ignore("logvar", "LDM's learned-logvar training buffer, unused at inference"),
    Ignore("lvlb_weights", "LDM's variational-bound loss weights, unused at inference"),
    Ignore("model_ema.decay", "EMA bookkeeping"),
    Ignore("model_ema.num_updates", "EMA bookkeeping"),
    Ignore("denoiser.*", "sgm's discretized sigma buffer; minisd computes the schedule"),
    Ignore("cond_stage_model.model.visual.*", "OpenCLIP image tower, unused for text conditioning"),
    Ignore("v_pred", "empty marker: a v-prediction model (read by `detection`, as ComfyUI does)"),
    Ignore("ztsnr", "empty marker: trained with zero terminal SNR (read by `detection`, as ComfyUI does)"),
)  # fmt: skip
OFFICIAL_EXTRAS = KeyTable("official-file extras", (), OFFICIAL_IGNORES)
_EMA_REASON = "EMA copy of the U-Net (pass use_ema=True to load it instead)"
_NON_EMA_REASON = "non-EMA U-Net weights, replaced by the EMA copy (use_ema=True)"


def _ema_key(name: str) -> str:
    """LDM's `LitEma` stores `model.diffusion_model.X.Y` as `model_ema.diffusion_modelXY` (dots removed)."""
    return "model_ema." + ("diffusion_model." + name).replace(".", "")


def _without_text_model_level(table: KeyTable) -> KeyTable:
    """The HF CLIP table for files without the `text_model.` level: SD1 files written with
    transformers 3.x, and `CLIPTextModel` folders saved by transformers >= 5.6."""
    strip = lambda k: k.removeprefix("text_model.")  # noqa: E731
    rules = tuple(Rule(r.ours, tuple(map(strip, r.theirs)), r.transform) for r in table.rules)
    return KeyTable(
        table.name + " (no text_model.)", rules, tuple(Ignore(strip(i.pattern), i.reason) for i in table.ignore)
    )


def text_table(cfg: TextConfig, layout: str, keys: set[str], prefix: str) -> KeyTable:
    """The table of one text encoder under `prefix`, in the variant the file's `keys` use."""
    if layout == "open_clip":
        return open_clip_table(cfg).prefixed(prefix)
    table = hf_table(cfg)
    if prefix + "text_model.final_layer_norm.weight" not in keys and prefix + "final_layer_norm.weight" in keys:
        table = _without_text_model_level(table)
    return table.prefixed(prefix)


def component_names(family: Family) -> list[str]:
    """The components' names in tables and messages, in `checkpoint.build` order."""
    return ["U-Net", "VAE", *(f"text encoder {i} ({t.layout})" for i, t in enumerate(family.text))]


_KEYS: dict[tuple[type, object], tuple[str, ...]] = {}  # (module class, frozen config) -> state-dict keys


def module_keys(cls: type, config: object) -> tuple[str, ...]:
    """The state-dict keys of `cls(config)`, in order. Cached per architecture (the configs are frozen
    dataclasses): the loader records the modules it builds (`remember_keys`), so a load builds each
    component once, not once more for its key table."""
    if (cls, config) not in _KEYS:
        with on_meta():
            _KEYS[cls, config] = tuple(cls(config).state_dict())
    return _KEYS[cls, config]


def remember_keys(module: nn.Module, config: object) -> None:
    """Record `module`'s state-dict keys as those of its class and `config` (see `module_keys`)."""
    _KEYS.setdefault((type(module), config), tuple(module.state_dict()))


def official_tables(family: Family, keys: set[str], *, use_ema: bool = False) -> dict[str, KeyTable]:
    """One table per component (U-Net, VAE, text encoders, in that order) from an official file's
    keys to our module names. The U-Net and VAE keys are ours under a prefix (read off modules
    built on the meta device); `keys` (the file's) picks the HF CLIP variant without `text_model.`."""
    unet_keys, vae_keys = module_keys(UNetModel, family.unet), module_keys(AutoencoderKL, family.vae)
    if use_ema:
        rules = tuple(Rule(k, (_ema_key(k),)) for k in unet_keys)
        unet_table_ = KeyTable("U-Net (EMA)", rules, (Ignore(UNET_PREFIX + "*", _NON_EMA_REASON),))
    else:
        rules = KeyTable.identity("U-Net", unet_keys).prefixed(UNET_PREFIX).rules
        unet_table_ = KeyTable("U-Net", rules, (Ignore("model_ema.*", _EMA_REASON),))
    vae_table = KeyTable.identity("VAE", vae_keys).prefixed(VAE_PREFIX)
    text = [text_table(enc.config, enc.layout, keys, enc.official_prefix) for enc in family.text]
    return dict(zip(component_names(family), [unet_table_, vae_table, *text], strict=True))


def ignore_reason(key: str, tables: dict[str, KeyTable]) -> str | None:
    """Why loading skips a key of an official file (the file-wide list, then each component's), or None."""
    for table in (OFFICIAL_EXTRAS, *tables.values()):
        reason = table.ignored_reason(key)
        if reason is not None:
            return reason
    return None


# ------------------------------------------------------------------------------ sizes
# How many tensors and elements an architecture implies, to check a config against the file's
# header before anything is built: a config.json claiming 10**7 layers, or a full-size preset on a
# tiny file, is refused in milliseconds (`checkpoint.check_sizes`).
@dataclass(frozen=True)
class Size:
    """The tensors of a component, and their elements in all (the key tables' transforms keep both sums)."""

    tensors: int = 0
    numel: int = 0

    def __add__(self, other: Size) -> Size:
        return Size(self.tensors + other.tensors, self.numel + other.numel)

    def __mul__(self, n: int) -> Size:
        return Size(self.tensors * n, self.numel * n)


@functools.lru_cache(maxsize=1024)
def _built(cls: type, *args: object) -> Size:
    """The size of one block, built on the meta device (no memory, microseconds)."""
    with on_meta():
        state = cls(*args).state_dict()
    return Size(len(state), sum(v.numel() for v in state.values()))


def unet_size(cfg: UNetConfig) -> Size:
    """What `UNetModel(cfg)` holds, summed over its block plan, each distinct block built once on meta:
    the same composition as `UNetModel.__init__` (tests/test_robust_files.py checks the two agree)."""
    mc, emb = cfg.model_channels, 4 * cfg.model_channels
    size = _built(nn.Linear, mc, emb) + _built(nn.Linear, emb, emb) + _built(nn.Conv2d, cfg.in_channels, mc, 3)
    if cfg.adm_in_channels is not None:  # label_emb
        size += _built(nn.Linear, cfg.adm_in_channels, emb) + _built(nn.Linear, emb, emb)

    def transformer(ch: int, depth: int) -> Size:
        heads, dim_head = cfg.heads(ch)
        shell = _built(_unet.SpatialTransformer, ch, heads, dim_head, 0, cfg.context_dim, cfg.use_linear_in_transformer)
        return shell + _built(_unet.BasicTransformerBlock, ch, heads, dim_head, cfg.context_dim) * depth

    plan = block_plan(cfg)
    for b in (*plan.inputs, *plan.outputs):
        if b.down:
            size += _built(_unet.Downsample, b.ch_in)
            continue
        size += _built(_unet.ResBlock, b.ch_in, emb, b.ch_out)
        size += transformer(b.ch_out, cfg.depths[b.level]) if b.attn else Size()
        size += _built(_unet.Upsample, b.ch_out) if b.up else Size()
    ch = plan.middle_channels
    size += _built(_unet.ResBlock, ch, emb, ch) * 2 + transformer(ch, cfg.middle_depth)
    return size + _built(nn.GroupNorm, 32, mc) + _built(nn.Conv2d, mc, cfg.out_channels, 3)


def vae_size(cfg: VAEConfig) -> Size:
    """What `AutoencoderKL(cfg)` holds, summed over its level plan (as `unet_size`)."""
    plan = level_plan(cfg)
    c, z = plan.mid_channels, cfg.z_channels
    mid = _built(_vae.ResnetBlock, c, c, 0.0) * 2 + _built(_vae.AttnBlock, c)
    size = _built(nn.Conv2d, cfg.in_channels, cfg.ch, 3) + mid + _built(nn.GroupNorm, 32, c)
    size += _built(nn.Conv2d, c, 2 * z, 3) + _built(nn.Conv2d, z, c, 3) + mid  # encoder out, decoder in
    for lv, resample in [(lv, _vae.Downsample) for lv in plan.down] + [(lv, _vae.Upsample) for lv in plan.up]:
        size += sum((_built(_vae.ResnetBlock, c_in, c_out, 0.0) for c_in, c_out in lv.blocks), Size())
        size += _built(resample, lv.channels) if lv.resample else Size()
    c0 = plan.up[0].channels
    size += _built(nn.GroupNorm, 32, c0) + _built(nn.Conv2d, c0, cfg.out_ch, 3)
    return size + _built(nn.Conv2d, 2 * z, 2 * cfg.embed_dim, 1) + _built(nn.Conv2d, cfg.embed_dim, z, 1)


def text_size(cfg: TextConfig) -> Size:
    """What `TextTransformer(cfg)` holds: the embeddings and heads, plus `layers` identical blocks."""
    shell = _built(TextTransformer, dataclasses.replace(cfg, layers=0))
    return shell + _built(ResidualAttentionBlock, cfg) * cfg.layers


def component_sizes(family: Family) -> list[Size]:
    """The size of each component of `family`, in `component_names` order."""
    return [unet_size(family.unet), vae_size(family.vae), *(text_size(t.config) for t in family.text)]


def held_size(shapes: Mapping[str, tuple[int, ...]], prefix: str, ignores: Iterable[KeyTable] = ()) -> Size:
    """What a file holds under `prefix` (its keys' shapes), less the keys some table ignores."""
    ignores = tuple(ignores)
    kept = [s for k, s in shapes.items() if k.startswith(prefix) and not any(t.ignored_reason(k) for t in ignores)]
    return Size(len(kept), sum(math.prod(s) for s in kept))


def official_sizes(family: Family, shapes: Mapping[str, tuple[int, ...]], *, use_ema: bool = False) -> list[Size]:
    """What an official file holds for each component of `family` (as `component_sizes`): the keys under
    each component's prefix, less the ignored ones (schedule buffers, `position_ids`, `logit_scale`, ...)."""
    sizes = [held_size(shapes, _ema_key("") if use_ema else UNET_PREFIX), held_size(shapes, VAE_PREFIX)]
    for enc in family.text:
        table = text_table(enc.config, enc.layout, set(shapes), enc.official_prefix)
        sizes.append(held_size(shapes, enc.official_prefix, (OFFICIAL_EXTRAS, table)))
    return sizes
