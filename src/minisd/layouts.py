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

import torch

from .clip import TextConfig
from .families import UNET_PREFIX, VAE_PREFIX, Family
from .keymap import Ignore, KeyTable, Rule
from .unet import UNetModel
from .vae import AutoencoderKL


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


def official_tables(family: Family, keys: set[str], *, use_ema: bool = False) -> dict[str, KeyTable]:
    """One table per component (U-Net, VAE, text encoders, in that order) from an official file's
    keys to our module names. The U-Net and VAE keys are ours under a prefix (read off modules
    built on the meta device); `keys` (the file's) picks the HF CLIP variant without `text_model.`."""
    with torch.device("meta"):
        unet_keys, vae_keys = list(UNetModel(family.unet).state_dict()), list(AutoencoderKL(family.vae).state_dict())
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
