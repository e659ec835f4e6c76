"""Standalone VAE files, loaded in place of a checkpoint's VAE (A1111's "SD VAE" setting, ComfyUI's
`VAELoader`, the `vae=` of a diffusers pipeline): `minisd.load(..., vae=PATH)` and `sd.load_vae(PATH)`.

Three layouts, each told by one sentinel key and read through the tables the checkpoint loader uses
(`sources.match_keys`, `check_tensors`, `LazyTensors`, `keymap.load_strict`):

| layout             | published as                                        | sentinel key                             |
|--------------------|-----------------------------------------------------|------------------------------------------|
| official           | vae-ft-mse-840000-ema-pruned.safetensors / .ckpt,   | `encoder.down.0.block.0.conv1.weight`    |
|                    | sdxl_vae.safetensors (our names: identity table)    |                                          |
| official, prefixed | a VAE cut out of a checkpoint                       | the same under `first_stage_model.`      |
| diffusers          | vae/diffusion_pytorch_model.safetensors, or its     | `encoder.down_blocks.0.resnets.0.conv1.` |
|                    | folder with config.json (`vae_table`)               | `weight`                                 |

diffusers files saved before diffusers 0.14 name the mid-block attention `query`/`key`/`value`/
`proj_attn` instead of `to_q`/`to_k`/`to_v`/`to_out.0`; diffusers renames them when loading, and so does
`_legacy_attention` here. The architecture is always the model's: the file must fit it key for key and
shape for shape, or it is refused with every mismatch named.

Precision (`VAEPrecision`): the SDXL VAE's activations exceed fp16's 65504, so a VAE decodes in fp32
("upcast") unless something records that it is fp16-safe: the caller (`upcast=False`), a diffusers
config.json's `force_upcast` (false in madebyollin's sdxl-vae-fp16-fix; diffusers' `AutoencoderKL`
defaults it to true), or a known file's SHA-256 (`known_files.KNOWN_VAES`). A model loaded in fp16
then keeps an fp16-safe VAE in fp16 and puts any other in fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .detection import PICKLE_SUFFIXES, read_json, read_safetensors_header, refuse_pickle, sha256, what_else
from .diffusers_format import json_field, vae_table
from .families import VAE_PREFIX
from .keymap import CheckpointError, Ignore, KeyTable, Rule, load_strict, on_meta
from .known_files import KNOWN_VAES
from .sources import (
    LazyTensors,
    Part,
    Subset,
    _pickle_tensors,
    _safetensors_tensors,
    check_tensors,
    component_tensors,
    match_keys,
)
from .vae import AutoencoderKL, VAEConfig

logger = logging.getLogger(__name__)

_OFFICIAL = "encoder.down.0.block.0.conv1.weight"
_DIFFUSERS = "encoder.down_blocks.0.resnets.0.conv1.weight"
_LEGACY_ATTENTION = "encoder.mid_block.attentions.0.query.weight"  # diffusers < 0.14
# What published VAE files hold besides the weights: A1111's `load_vae_dict` drops exactly these.
VAE_FILE_IGNORES = (
    Ignore("loss.*", "the training loss's discriminator and LPIPS weights (A1111's load_vae_dict drops loss*)"),
    Ignore("model_ema.decay", "EMA bookkeeping (A1111's vae_ignore_keys)"),
    Ignore("model_ema.num_updates", "EMA bookkeeping (A1111's vae_ignore_keys)"),
)
_EXTRAS = KeyTable("standalone VAE extras", (), VAE_FILE_IGNORES)
_DEFAULT_UPCAST = (
    "no record says this VAE is fp16-safe: it decodes in float32 (diffusers' AutoencoderKL default "
    "force_upcast=True); pass upcast=False for one that is (e.g. the SDXL fp16-fix VAE)"
)


@dataclass(frozen=True)
class VAEPrecision:
    """Whether a VAE must decode in float32 when the model runs in half precision, and why.

    Attributes:
        upcast: True unless the VAE is recorded as fp16-safe (diffusers' `force_upcast`).
        reason: the record that decided it (the caller, a config.json, a known file's hash, the default).
    """

    upcast: bool = True
    reason: str = _DEFAULT_UPCAST

    def dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The VAE's dtype for a model in `model_dtype`: float32 when it must upcast, else the model's."""
        return torch.float32 if self.upcast else model_dtype


def recorded_precision(config: Mapping | None, where: object) -> VAEPrecision:
    """What a diffusers `AutoencoderKL` config.json records (`force_upcast`, default true), or the default."""
    if config is None:
        return VAEPrecision()
    upcast = json_field(config, "force_upcast", where, "bool", True)
    absent = "" if "force_upcast" in config else " (absent: diffusers' default)"
    return VAEPrecision(upcast, f"{where}: force_upcast {str(upcast).lower()}{absent}")


@dataclass
class VAEFile:
    """A standalone VAE source: its layout, its tensors with the table to our names, its config.json."""

    path: Path
    layout: str
    part: Part
    config: dict | None = None  # a diffusers folder's config.json
    config_where: Path | None = None


def _legacy_attention(table: KeyTable) -> KeyTable:
    """`vae_table` for diffusers files older than 0.14 (`query`, `key`, `value`, `proj_attn`)."""
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def rename(key: str) -> str:
        for new, legacy in old.items():
            key = key.replace(new, legacy)
        return key

    rules = tuple(Rule(r.ours, tuple(map(rename, r.theirs)), r.transform) for r in table.rules)
    return KeyTable(table.name + " (diffusers < 0.14 attention names)", rules, table.ignore)


def _table(keys: set[str], config: VAEConfig, path: Path) -> tuple[KeyTable, str]:
    """The table from the file's layout (told by its sentinel key) to our names, and the layout's name."""
    with on_meta():
        ours = list(AutoencoderKL(config).state_dict())
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise CheckpointError(f"{path}: not a VAE file: a full checkpoint (with a U-Net); load it with minisd.load")
    if _OFFICIAL in keys:
        return KeyTable.identity("standalone VAE", ours), "official"
    if VAE_PREFIX + _OFFICIAL in keys:
        return KeyTable.identity("standalone VAE", ours).prefixed(VAE_PREFIX), f"official, under `{VAE_PREFIX}`"
    if _DIFFUSERS in keys and _LEGACY_ATTENTION in keys:
        return _legacy_attention(vae_table(config)), "diffusers AutoencoderKL (before 0.14)"
    if _DIFFUSERS in keys:
        return vae_table(config), "diffusers AutoencoderKL"
    raise CheckpointError(
        f"{path}: not a VAE file minisd knows: none of `{_OFFICIAL}` (official layout), `{VAE_PREFIX}{_OFFICIAL}` "
        f"or `{_DIFFUSERS}` (diffusers) is there; it holds keys such as {sorted(keys)[:3]}; "
        + what_else(sorted(keys), asked="vae")
    )


def open_vae_file(path: Path, config: VAEConfig, *, allow_pickle: bool = False, variant: str | None = None) -> VAEFile:
    """A standalone VAE file, or a diffusers VAE folder (with config.json; a pipeline folder's `vae/` too).
    Nothing is read but headers and JSON."""
    config_json = where = None
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        where = folder / "config.json"
        config_json = read_json(where, folder=path)
        tensors = component_tensors(path, folder, "diffusion_pytorch_model", variant, allow_pickle)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            refuse_pickle(path)
        tensors = _pickle_tensors(path)  # a `state_dict` entry is unwrapped, as A1111 does
    else:
        tensors = _safetensors_tensors([read_safetensors_header(path)])
    table, layout = _table(set(tensors.infos), config, path)
    return VAEFile(path, layout, Part(str(path), tensors, {"VAE": table}, _EXTRAS), config_json, where)


def _precision(source: VAEFile, upcast: bool | None) -> VAEPrecision:
    """The caller's word, else the folder's config.json, else a known file's hash, else the default."""
    if upcast is not None:
        return VAEPrecision(bool(upcast), f"upcast={bool(upcast)} given by the caller")
    if source.config is not None:
        return recorded_precision(source.config, source.config_where)
    if source.path.suffix.lower() == ".safetensors" and (known := KNOWN_VAES.get(sha256(source.path))):
        return VAEPrecision(not known.fp16_safe, f"SHA-256 of {known.name}")
    return VAEPrecision()


def load_vae_file(
    path: str | Path,
    config: VAEConfig,
    *,
    device: torch.device,
    model_dtype: torch.dtype,
    vae_dtype: torch.dtype | None = None,
    upcast: bool | None = None,
    allow_pickle: bool = False,
) -> tuple[AutoencoderKL, VAEPrecision]:
    """Read a standalone VAE into a new `AutoencoderKL` of the model's architecture `config`.

    Returns the VAE (eval mode, on `device`, in `vae_dtype` or else `VAEPrecision.dtype(model_dtype)`)
    and its precision record; the keys ignored are logged with their reasons. A file whose keys or shapes do not
    fit `config` raises `CheckpointError` naming the file, each key, and the expected and found shapes."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    source = open_vae_file(path, config, allow_pickle=allow_pickle)
    with on_meta():
        vae = AutoencoderKL(config)
    match = match_keys(source.part)
    problems = match.problems or check_tensors(source.part, match.own, {"VAE": vae})
    if problems:
        raise CheckpointError(
            f"{path} ({source.layout} layout) does not fit this model's VAE (ch {config.ch}, ch_mult "
            f"{list(config.ch_mult)}, {config.z_channels} latent channels):\n" + "\n".join(problems)
            + "\n  A VAE fits the family it was trained for (SD1 and SD2 share one; SDXL has its own)."
        )  # fmt: skip
    if source.config is not None:
        _check_scale_factor(source, config)
    precision = _precision(source, upcast)
    dtype = vae_dtype or precision.dtype(model_dtype)
    lazy = LazyTensors(source.part.tensors, dtype, device, copy=source.part.tensors.mapped)
    table = source.part.tables["VAE"]
    load_strict(vae, table.to_ours(Subset(lazy, match.own["VAE"]), source=str(path)), source=f"{path} [VAE]")
    logger.info("loaded the VAE %s (%s layout) in %s: %s", path, source.layout, dtype, precision.reason)
    for key, reason in match.ignored.items():
        logger.info("%s: ignored %s: %s", path, key, reason)
    return vae.eval(), precision


def _check_scale_factor(source: VAEFile, config: VAEConfig) -> None:
    """A folder's `scaling_factor` that differs from the model's means a VAE of another latent space."""
    theirs = json_field(source.config, "scaling_factor", source.config_where, "number", config.scale_factor)
    if abs(theirs - config.scale_factor) > 1e-6:
        logger.warning(
            "%s: scaling_factor %s differs from the model's %s: a VAE of another family? The model's is kept.",
            source.config_where, theirs, config.scale_factor,
        )  # fmt: skip
