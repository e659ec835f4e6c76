"""The diffusers folder format: its `config.json` files in both directions, and the folder's extras.

A diffusers folder (`StableDiffusionPipeline.save_pretrained`) holds one sub-folder per
component, each with a `config.json` and a weights file:

    model_index.json            pipeline class and component classes
    unet/config.json            UNet2DConditionModel config  <-> `unet.UNetConfig`
    vae/config.json             AutoencoderKL config         <-> `vae.VAEConfig`
    text_encoder(_2)/config.json  CLIPTextConfig             <-> `clip.TextConfig`
    scheduler/scheduler_config.json   (prediction_type)
    tokenizer(_2)/vocab.json, merges.txt, ...

The weights go through the component key tables (`unet.diffusers_table`, ...); this
module only translates the hyperparameters. diffusers' names are not always what they
say: its `attention_head_dim` is the number of heads per level (an int for SD1, a list
for SD2/SDXL), not their width.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from .clip import TextConfig
from .keymap import CheckpointError
from .tokenizer import bytes_to_unicode
from .unet import UNetConfig
from .vae import VAEConfig

# diffusers' `create_unet_diffusers_config_from_ldm`: only these context widths make an SDXL
# "text_time" added embedding; any other `y` is a "projection" class embedding.
_TEXT_TIME_CONTEXT = (2048, 1280)


def _need(d: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise CheckpointError(f"{what}: config.json lacks {missing}")


# ----------------------------------------------------------------------------------- U-Net
def unet_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """The `UNet2DConditionModel` config of a U-Net (what diffusers' converter writes)."""
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
        "sample_size": 64,
    }
    if cfg.transformer_depth_middle is not None and cfg.transformer_depth_middle != cfg.depths[-1]:
        raise CheckpointError(f"diffusers has no separate middle-block depth ({cfg.transformer_depth_middle})")
    if cfg.adm_in_channels is not None:
        if cfg.context_dim in _TEXT_TIME_CONTEXT:
            d.update(addition_embed_type="text_time", addition_time_embed_dim=256)
        else:
            d.update(class_embed_type="projection")
        d["projection_class_embeddings_input_dim"] = cfg.adm_in_channels
    return d


def unet_from_diffusers(d: Mapping[str, Any], where: str = "unet/config.json") -> UNetConfig:
    """A `UNetConfig` from a `UNet2DConditionModel` config.json."""
    _need(d, ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim"), where)
    widths = list(d["block_out_channels"])
    mc = widths[0]
    if any(w % mc for w in widths):
        raise CheckpointError(f"{where}: block_out_channels {widths} are not multiples of the first")
    for key, expected in (("flip_sin_to_cos", True), ("freq_shift", 0), ("time_embedding_type", "positional"),
                          ("center_input_sample", False), ("mid_block_type", "UNetMidBlock2DCrossAttn")):
        if d.get(key, expected) != expected:  # a config option, not a weight: absent means diffusers' default
            raise CheckpointError(f"{where}: {key}={d[key]!r} is not a Stable Diffusion U-Net (expected {expected!r})")
    # diffusers' `num_attention_heads` (newer) wins over its misnamed `attention_head_dim`.
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    if isinstance(heads, int):
        head_kw = {"num_heads": heads}
    else:
        per_level = {w // h for w, h in zip(widths, heads, strict=True)}
        if len(per_level) != 1:
            raise CheckpointError(f"{where}: head widths differ per level ({sorted(per_level)}); sgm has one num_head_channels")
        head_kw = {"num_head_channels": per_level.pop()}
    depth = d.get("transformer_layers_per_block", 1)
    adm = None
    if d.get("addition_embed_type") == "text_time" or d.get("class_embed_type") == "projection":
        adm = d["projection_class_embeddings_input_dim"]
    elif d.get("addition_embed_type") or d.get("class_embed_type"):
        raise CheckpointError(f"{where}: unsupported added conditioning {d.get('addition_embed_type') or d.get('class_embed_type')!r}")
    cross = d["cross_attention_dim"]
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=d["layers_per_block"],
        attention_resolutions=tuple(2**i for i, t in enumerate(d["down_block_types"]) if "CrossAttn" in t),
        transformer_depth=depth if isinstance(depth, int) else tuple(depth),
        context_dim=cross if isinstance(cross, int) else cross[0],
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        adm_in_channels=adm,
        **head_kw,
    )


# ------------------------------------------------------------------------------------- VAE
def vae_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
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
    }


def vae_from_diffusers(d: Mapping[str, Any], where: str = "vae/config.json") -> VAEConfig:
    _need(d, ("block_out_channels", "latent_channels"), where)
    widths = list(d["block_out_channels"])
    ch = widths[0]
    if d.get("norm_num_groups", 32) != 32:
        raise CheckpointError(f"{where}: norm_num_groups={d['norm_num_groups']}; the LDM VAE uses 32")
    return VAEConfig(
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=d.get("layers_per_block", 2),
        z_channels=d["latent_channels"],
        embed_dim=d["latent_channels"],
        in_channels=d.get("in_channels", 3),
        out_ch=d.get("out_channels", 3),
        resolution=d.get("sample_size", 256),
        scale_factor=d.get("scaling_factor", 0.18215),
    )


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


def text_from_hf(d: Mapping[str, Any], *, projection: bool, where: str = "text_encoder/config.json") -> TextConfig:
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
    raw = gzip.decompress(resources.files("minisd").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes())
    merges = raw.decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
