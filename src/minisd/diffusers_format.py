"""The diffusers folder format: its `config.json` files and key tables, both directions, and the folder's extras.

A diffusers folder (`StableDiffusionPipeline.save_pretrained`) holds one sub-folder per
component, each with a `config.json` and a weights file:

    model_index.json            pipeline class and component classes
    unet/config.json            UNet2DConditionModel config  <-> `unet.UNetConfig`
    vae/config.json             AutoencoderKL config         <-> `vae.VAEConfig`
    text_encoder(_2)/config.json  CLIPTextConfig             <-> `clip.TextConfig`
    scheduler/scheduler_config.json   (prediction_type)
    tokenizer(_2)/vocab.json, merges.txt, ...

The U-Net and VAE weights go through the key tables `unet_table` and `vae_table` here,
generated from the models' block plans (`unet.block_plan`, `vae.level_plan`); the text
encoders' through `layouts.hf_table`. diffusers' names are not always what they say: its
`attention_head_dim` is the number of heads per level (an int for SD1, a list for
SD2/SDXL), not their width.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .clip import TextConfig
from .files import atomic_write_text
from .keymap import CheckpointError, KeyTable, Rule, on_meta
from .tokenizer import EOT_TOKEN, SOT_TOKEN, read_merges, vocabulary
from .unet import UNetConfig, UNetModel, block_plan
from .vae import VAEConfig, level_plan

# diffusers' `create_unet_diffusers_config_from_ldm`: only these context widths make an SDXL
# "text_time" added embedding; any other `y` is a "projection" class embedding. This is the guess
# diffusers makes for a single file; a folder's config.json and a family's `y_inputs` say it outright.
_TEXT_TIME_CONTEXT = (2048, 1280)


# ----------------------------------------------------------------------------------- JSON fields
def _int_ok(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints_ok(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(_int_ok(v) for v in x)


def _number_ok(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _component_ok(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(v is None or isinstance(v, str) for v in x)


# kind -> (test, what the message says is expected)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_int_ok, "an integer"),
    "bool": (lambda x: isinstance(x, bool), "true or false"),
    "str": (lambda x: isinstance(x, str), "a string"),
    "str|null": (lambda x: x is None or isinstance(x, str), "a string or null"),
    "number": (_number_ok, "a finite number"),
    "ints": (_ints_ok, "a non-empty list of integers"),
    "int|ints": (lambda x: _int_ok(x) or _ints_ok(x), "an integer or a non-empty list of integers"),
    "strs": (lambda x: isinstance(x, list) and all(isinstance(v, str) for v in x), "a list of strings"),
    "object": (lambda x: isinstance(x, dict), "a JSON object"),
    "component": (_component_ok, "[library, class] (strings or null)"),
}
_REQUIRED = object()


def json_field(d: Mapping[str, Any], key: str, where: object, kind: str, default: Any = _REQUIRED, *,
               low: int | None = None) -> Any:  # fmt: skip
    """`d[key]`, checked to be of `kind` (a key of `_KINDS`) and, for integers (and each integer
    of a list), at least `low`; `default` when the key is absent (or null, for a non-null kind).
    Raises `CheckpointError` naming the file `where`, the field, what was expected and what was got."""
    value = d.get(key)
    if key not in d or (value is None and not kind.endswith("null") and default is not _REQUIRED):
        if default is _REQUIRED:
            raise CheckpointError(f"{where}: lacks the field {key!r} ({_KINDS[kind][1]})")
        return default
    test, expected = _KINDS[kind]
    if not test(value):
        got = f"{type(value).__name__} {value!r}"
        raise CheckpointError(f"{where}: field {key!r} must be {expected}, got {got[:80]}")
    if low is not None:
        for v in value if isinstance(value, list) else [value]:
            if _int_ok(v) and v < low:
                raise CheckpointError(f"{where}: field {key!r} must be at least {low}, got {value!r}"[:200])
    return value


def _same_length(d: Mapping[str, Any], key: str, where: object, n: int, of: str) -> None:
    if isinstance(d.get(key), list) and len(d[key]) != n:
        raise CheckpointError(f"{where}: field {key!r} has {len(d[key])} entries, expected {n} (one per {of})")


def _config(cls: type, where: object, **fields: Any) -> Any:
    """cls(**fields); the config's own validation (`__post_init__`) names the field, and this names the file."""
    try:
        return cls(**fields)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------- U-Net
def unet_to_diffusers(cfg: UNetConfig, *, text_time: bool | None = None, sample_size: int = 64) -> dict[str, Any]:
    """The `UNet2DConditionModel` config of a U-Net (what diffusers' converter writes).

    `text_time`: the vector `y` is SDXL's (pooled text + size/crop embeddings: diffusers'
    `addition_embed_type="text_time"`), not a class embedding; the exporter passes what the
    family says (`Family.y_inputs`). None guesses from the context width, as diffusers does for
    a single file. `sample_size` is in latent pixels: diffusers' pipelines default to
    `sample_size` x the VAE factor, and its converter writes the training size / the VAE factor
    (128 for SDXL); the exporter passes the family's."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2**level in cfg.attention_resolutions for level in range(len(widths))]
    heads = cfg.num_heads if cfg.num_head_channels == -1 else [w // cfg.num_head_channels for w in widths]
    d: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": list(cfg.depths),
        "sample_size": sample_size,
    }
    if cfg.transformer_depth_middle is not None and cfg.transformer_depth_middle != cfg.depths[-1]:
        raise CheckpointError(f"diffusers has no separate middle-block depth ({cfg.transformer_depth_middle})")
    if cfg.adm_in_channels is not None:
        if _text_time(cfg, text_time):
            d.update(addition_embed_type="text_time", addition_time_embed_dim=256)
        else:
            d.update(class_embed_type="projection")
        d["projection_class_embeddings_input_dim"] = cfg.adm_in_channels
    return d


def unet_from_diffusers(d: Mapping[str, Any], where: object = "unet/config.json") -> UNetConfig:
    """A `UNetConfig` from a `UNet2DConditionModel` config.json, every field it reads checked
    (`json_field`), then the config's own validation, each error naming the file."""
    widths = json_field(d, "block_out_channels", where, "ints", low=1)
    n = len(widths)
    mc = widths[0]
    if any(w % mc for w in widths):
        raise CheckpointError(f"{where}: block_out_channels {widths} are not multiples of the first")
    blocks = json_field(d, "down_block_types", where, "strs")
    _same_length(d, "down_block_types", where, n, "entry of block_out_channels")
    _same_length(d, "up_block_types", where, n, "entry of block_out_channels")
    unknown = sorted(set(blocks) - {"CrossAttnDownBlock2D", "DownBlock2D"})
    if unknown:
        raise CheckpointError(f"{where}: down_block_types {unknown} are not Stable Diffusion U-Net blocks")
    for key, expected in (("flip_sin_to_cos", True), ("freq_shift", 0), ("time_embedding_type", "positional"),
                          ("center_input_sample", False), ("mid_block_type", "UNetMidBlock2DCrossAttn")):
        if d.get(key, expected) != expected:  # a config option, not a weight: absent means diffusers' default
            raise CheckpointError(f"{where}: {key}={d[key]!r} is not a Stable Diffusion U-Net (expected {expected!r})")
    # diffusers' `num_attention_heads` (newer) wins over its misnamed `attention_head_dim`.
    key = "num_attention_heads" if d.get("num_attention_heads") is not None else "attention_head_dim"
    heads = json_field(d, key, where, "int|ints", 8, low=1)
    if isinstance(heads, int):
        head_kw = {"num_heads": heads}
    else:
        _same_length(d, key, where, n, "entry of block_out_channels")
        if any(w % h for w, h in zip(widths, heads)) or len({w // h for w, h in zip(widths, heads)}) != 1:
            raise CheckpointError(
                f"{where}: {key} {heads} does not give one head width for block_out_channels {widths}; "
                "sgm has one num_head_channels"
            )
        head_kw = {"num_head_channels": widths[0] // heads[0]}
    depth = json_field(d, "transformer_layers_per_block", where, "int|ints", 1, low=0)
    _same_length(d, "transformer_layers_per_block", where, n, "entry of block_out_channels")
    added = json_field(d, "addition_embed_type", where, "str|null", None)
    class_embed = json_field(d, "class_embed_type", where, "str|null", None)
    adm = None
    if added == "text_time" or class_embed == "projection":
        adm = json_field(d, "projection_class_embeddings_input_dim", where, "int", low=1)
    elif added or class_embed:
        raise CheckpointError(f"{where}: unsupported added conditioning {added or class_embed!r}")
    cross = json_field(d, "cross_attention_dim", where, "int|ints", low=1)
    if isinstance(cross, list) and len(set(cross)) != 1:
        raise CheckpointError(f"{where}: cross_attention_dim {cross} differs per block; sgm has one context_dim")
    return _config(
        UNetConfig, where,
        in_channels=json_field(d, "in_channels", where, "int", 4, low=1),
        out_channels=json_field(d, "out_channels", where, "int", 4, low=1),
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=json_field(d, "layers_per_block", where, "int", low=1),
        attention_resolutions=tuple(2**i for i, t in enumerate(blocks) if t == "CrossAttnDownBlock2D"),
        transformer_depth=depth if isinstance(depth, int) else tuple(depth),
        context_dim=cross if isinstance(cross, int) else cross[0],
        use_linear_in_transformer=json_field(d, "use_linear_projection", where, "bool", False),
        adm_in_channels=adm,
        **head_kw,
    )  # fmt: skip


def unet_text_time(d: Mapping[str, Any], where: object = "unet/config.json") -> bool:
    """Whether a `UNet2DConditionModel` config.json embeds `y` as SDXL's "text_time" (`add_embedding`)."""
    return json_field(d, "addition_embed_type", where, "str|null", None) == "text_time"


def _text_time(cfg: UNetConfig, text_time: bool | None) -> bool:
    """The "text_time" choice for a U-Net with `y`: the caller's, or else diffusers' single-file guess by width."""
    return cfg.context_dim in _TEXT_TIME_CONTEXT if text_time is None else text_time


# ResBlock submodules -> diffusers ResnetBlock2D (convert_ldm_unet_checkpoint's renames).
_RESBLOCK_TO_DIFFUSERS = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}


def unet_table(config: UNetConfig, *, text_time: bool | None = None) -> KeyTable:
    """Diffusers `UNet2DConditionModel` state-dict names (theirs) <-> the official names (ours).

    `text_time` says where `y`'s MLP sits: `add_embedding` (SDXL's "text_time") or
    `class_embedding` ("projection"). A folder's loader passes what its config.json says
    (`unet_text_time`), the exporter what the family says; None guesses from the context width,
    as diffusers does for a single file.

    Generated from the block plan (`unet.block_plan`): `input_blocks.{n}` of level l,
    position i -> `down_blocks.{l}.resnets.{i}` / `.attentions.{i}` / `.downsamplers.0`;
    `output_blocks.{m}` -> `up_blocks.{L-1-l}...` (diffusers counts up blocks from
    the bottom); the transformers keep their inner names. Every tensor has the
    same shape in both layouts: SD1's 1x1-conv `proj_in`/`proj_out` are 1x1
    convs in diffusers too (`use_linear_projection=False`), so no transform is
    needed."""
    homes: list[tuple[str, str]] = [  # (our module, their module)
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    if config.adm_in_channels is not None:
        # addition_embed_type="text_time" puts y's MLP in `add_embedding`, class_embed_type="projection"
        # in `class_embedding` (the same two linears either way).
        mlp = "add_embedding" if _text_time(config, text_time) else "class_embedding"
        homes += [("label_emb.0.0", f"{mlp}.linear_1"), ("label_emb.0.2", f"{mlp}.linear_2")]

    def resblock(ours: str, theirs: str, ch_in: int, ch_out: int) -> None:
        for name, their_name in _RESBLOCK_TO_DIFFUSERS.items():
            if name != "skip_connection" or ch_in != ch_out:  # the 1x1 skip exists only then
                homes.append((f"{ours}.{name}", f"{theirs}.{their_name}"))

    plan = block_plan(config)
    for n, b in enumerate(plan.inputs, start=1):
        down = f"down_blocks.{b.level}"
        if b.down:
            homes.append((f"input_blocks.{n}.0.op", f"{down}.downsamplers.0.conv"))
            continue
        resblock(f"input_blocks.{n}.0", f"{down}.resnets.{b.index}", b.ch_in, b.ch_out)
        if b.attn:
            homes.append((f"input_blocks.{n}.1", f"{down}.attentions.{b.index}"))
    ch = plan.middle_channels
    resblock("middle_block.0", "mid_block.resnets.0", ch, ch)
    homes.append(("middle_block.1", "mid_block.attentions.0"))
    resblock("middle_block.2", "mid_block.resnets.1", ch, ch)
    for m, b in enumerate(plan.outputs):
        up = f"up_blocks.{len(config.channel_mult) - 1 - b.level}"
        resblock(f"output_blocks.{m}.0", f"{up}.resnets.{b.index}", b.ch_in, b.ch_out)
        if b.attn:
            homes.append((f"output_blocks.{m}.1", f"{up}.attentions.{b.index}"))
        if b.up:
            homes.append((f"output_blocks.{m}.{2 if b.attn else 1}.conv", f"{up}.upsamplers.0.conv"))

    # Expand each module pair into its tensors, reading the names off a meta-device model.
    with on_meta():
        model = UNetModel(config)
    rules = [
        Rule(f"{ours}.{key}", (f"{theirs}.{key}",))
        for ours, theirs in homes
        for key in model.get_submodule(ours).state_dict()
    ]
    if len(rules) != len(model.state_dict()):  # KeyTable itself rejects a tensor named twice
        raise RuntimeError(f"unet_table: {len(rules)} rules for {len(model.state_dict())} tensors")
    return KeyTable(f"diffusers UNet2DConditionModel ({config.model_channels} channels)", tuple(rules))


# ------------------------------------------------------------------------------------- VAE
def vae_to_diffusers(cfg: VAEConfig, *, force_upcast: bool = True) -> dict[str, Any]:
    """The `AutoencoderKL` config of a VAE; `force_upcast` false for one recorded as fp16-safe (`vae_files`)."""
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": cfg.resolution,
        "scaling_factor": cfg.scale_factor,
        "force_upcast": force_upcast,
    }


def vae_from_diffusers(d: Mapping[str, Any], where: object = "vae/config.json") -> VAEConfig:
    """A `VAEConfig` from an `AutoencoderKL` config.json, every field it reads checked (`json_field`)."""
    widths = json_field(d, "block_out_channels", where, "ints", low=1)
    ch = widths[0]
    if any(w % ch for w in widths):
        raise CheckpointError(f"{where}: block_out_channels {widths} are not multiples of the first")
    _same_length(d, "down_block_types", where, len(widths), "entry of block_out_channels")
    _same_length(d, "up_block_types", where, len(widths), "entry of block_out_channels")
    for key, expected in (("norm_num_groups", 32), ("act_fn", "silu"), ("shift_factor", None)):
        if d.get(key, expected) != expected:  # absent means diffusers' default, which is the LDM VAE's
            raise CheckpointError(f"{where}: {key}={d[key]!r} is not the LDM KL autoencoder (expected {expected!r})")
    latent = json_field(d, "latent_channels", where, "int", low=1)
    size = json_field(d, "sample_size", where, "int|ints", 256, low=1)
    return _config(
        VAEConfig, where,
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=json_field(d, "layers_per_block", where, "int", 2, low=1),
        z_channels=latent,
        embed_dim=latent,
        in_channels=json_field(d, "in_channels", where, "int", 3, low=1),
        out_ch=json_field(d, "out_channels", where, "int", 3, low=1),
        resolution=size if isinstance(size, int) else size[0],
        scale_factor=json_field(d, "scaling_factor", where, "number", 0.18215),
    )  # fmt: skip


def vae_table(config: VAEConfig) -> KeyTable:
    """Official names (ours) <-> diffusers `AutoencoderKL` names, generated from the level
    plan (`vae.level_plan`).

    Renames: `down.l.block.i` -> `down_blocks.l.resnets.i`, `nin_shortcut` -> `conv_shortcut`,
    `mid.block_1/2` -> `mid_block.resnets.0/1`, `mid.attn_1.{norm,q,k,v,proj_out}` ->
    `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (Linear (C, C) weights
    there, 1x1 convs (C, C, 1, 1) here), `norm_out` -> `conv_norm_out`, and the decoder's
    `up.l` -> `up_blocks.{n-1-l}` (diffusers counts in application order).
    """
    if config.embed_dim != config.z_channels:  # diffusers has one `latent_channels`
        got = f"{config.embed_dim} and {config.z_channels}"
        raise ValueError(f"vae_table: needs embed_dim == z_channels, got {got}")
    rules: list[Rule] = []

    def same(ours: str, theirs: str, names: tuple[str, ...] = ("weight", "bias")) -> None:
        rules.extend(Rule(f"{ours}.{n}", (f"{theirs}.{n}",)) for n in names)

    def resnet(ours: str, theirs: str, c_in: int, c_out: int) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            same(f"{ours}.{name}", f"{theirs}.{name}")
        if c_in != c_out:
            same(f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut")

    def mid(part: str, c: int) -> None:
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", c, c)
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", c, c)
        ours, theirs = f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0"
        same(f"{ours}.norm", f"{theirs}.group_norm")
        for o, t in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            rules.append(Rule(f"{ours}.{o}.weight", (f"{theirs}.{t}.weight",), "linear_to_conv1x1"))
            same(f"{ours}.{o}", f"{theirs}.{t}", ("bias",))

    plan, n = level_plan(config), len(config.ch_mult)
    same("quant_conv", "quant_conv")
    same("post_quant_conv", "post_quant_conv")
    for part in ("encoder", "decoder"):
        same(f"{part}.conv_in", f"{part}.conv_in")
        mid(part, plan.mid_channels)
        same(f"{part}.norm_out", f"{part}.conv_norm_out")
        same(f"{part}.conv_out", f"{part}.conv_out")
    # encoder: level l in, level l out
    for lv in plan.down:
        for i, (c_in, c_out) in enumerate(lv.blocks):
            resnet(f"encoder.down.{lv.level}.block.{i}", f"encoder.down_blocks.{lv.level}.resnets.{i}", c_in, c_out)
        if lv.resample:
            same(f"encoder.down.{lv.level}.downsample.conv", f"encoder.down_blocks.{lv.level}.downsamplers.0.conv")
    # decoder, in application order: official level l is diffusers' up_blocks[n - 1 - l]
    for lv in reversed(plan.up):
        theirs = f"decoder.up_blocks.{n - 1 - lv.level}"
        for i, (c_in, c_out) in enumerate(lv.blocks):
            resnet(f"decoder.up.{lv.level}.block.{i}", f"{theirs}.resnets.{i}", c_in, c_out)
        if lv.resample:
            same(f"decoder.up.{lv.level}.upsample.conv", f"{theirs}.upsamplers.0.conv")
    return KeyTable("diffusers AutoencoderKL", tuple(rules))


# ---------------------------------------------------------------------------- text encoders
def text_to_hf(cfg: TextConfig) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` dict (CLIPTextModelWithProjection when projected)."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.context_length,
        "hidden_act": cfg.act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.projection_dim or cfg.width,
        # The official repos' values: eos 2 makes transformers pool at argmax(ids), which is
        # the end token 49407 (the largest id), the same place as first-eos pooling.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


# The fields of a transformers `CLIPTextConfig` that `TextConfig.from_hf_config` reads, and their JSON kinds.
_HF_TEXT_FIELDS = {"hidden_size": "int", "num_attention_heads": "int", "num_hidden_layers": "int",
                   "intermediate_size": "int", "hidden_act": "str", "vocab_size": "int",
                   "max_position_embeddings": "int", "layer_norm_eps": "number"}  # fmt: skip


def text_from_hf(d: Mapping[str, Any], *, projection: bool, where: object = "text_encoder/config.json") -> TextConfig:
    """A `TextConfig` from a transformers `CLIPTextConfig` config.json (see `TextConfig.from_hf_config`),
    every field it reads checked for its JSON type first: `from_hf_config` converts with int()."""
    fields = {**_HF_TEXT_FIELDS, **({"projection_dim": "int"} if projection else {})}
    for key, kind in fields.items():
        json_field(d, key, where, kind, low=(0 if key == "num_hidden_layers" else 1) if kind == "int" else None)
    try:
        return TextConfig.from_hf_config(d, projection=projection)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


# ------------------------------------------------------------------------- folder extras
# The official scheduler_config.json of the SD repos, all but the class and prediction type.
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def write_tokenizer(folder: Path, *, pad_token: str) -> None:
    """transformers `CLIPTokenizer` files made from minisd's shipped BPE vocabulary.

    vocab.json: the 256 byte characters, the same with `</w>`, one token per merge, then
    the two special tokens (openai/CLIP `SimpleTokenizer.__init__` order); merges.txt: the
    merges after a version line. diffusers pads SD1's tokenizer with `<|endoftext|>` and
    SD2/SDXL's with `!` (id 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = read_merges()
    vocab = vocabulary(merges)
    # written as UTF-8 whatever the locale (the byte characters are not ASCII)
    vocab_json = json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    atomic_write_text(folder / "vocab.json", vocab_json, overwrite=True)
    lines = [" ".join(m) for m in merges]
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(lines) + "\n", overwrite=True)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": SOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2), overwrite=True)
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2), overwrite=True)
