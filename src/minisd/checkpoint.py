"""Load and save Stable Diffusion checkpoints: official single files and diffusers folders.

`load_components` reads either source in the same steps (as nanoGPT's `from_pretrained`
and openai/CLIP's `build_model` do):

1. open the source: which family it holds (`detection`, which validates every header and
   JSON file), and a reader for each tensor, under the source's own names (nothing is read yet);
2. resolve the family and its architecture: the family's presets, a diffusers folder's
   `config.json` files, the caller's `config` (each config checks its own fields), and check
   the sizes it implies against the header's (`check_sizes`) before anything is built;
3. build every component on the meta device (no memory, no initialisation);
4. match the keys through the key tables, and the header's dtypes and shapes against the
   modules, all before any data is read; then read the tensors into one state dict per
   component, in our names (`KeyTable.to_ours`), copying each out of the file as it is read
   (the copy is also the cast: one copy of the weights), and load them strictly with
   `load_state_dict(assign=True)`. The model owns its memory; `mmap=True` opts out;
5. settle the prediction type: metadata, a known file hash, or the one-call probe (on the
   meta device, or when the probe is unsure, the family's default).

`minisd.load` (in `minisd.model`) composes the result into a `StableDiffusion`.
`save(model, path, format=)` writes either layout back.

Where each component's tensors live, and the key table that maps them to our names:

- U-Net: `model.diffusion_model.*` in a single file (our names: a prefix strip);
  `unet/` in a diffusers folder (`diffusers_format.unet_table`).
- VAE: `first_stage_model.*` (prefix strip); `vae/` (`diffusers_format.vae_table`).
- CLIP-L: `cond_stage_model.transformer.*` / `conditioner.embedders.0.transformer.*`
  (`layouts.hf_table`); `text_encoder/` (`layouts.hf_table`).
- OpenCLIP H/bigG: `cond_stage_model.model.*` / `conditioner.embedders.N.model.*`
  (`layouts.open_clip_table`); `text_encoder(_2)/` (`layouts.hf_table`).

Pickled checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) can run code when unpickled: they are
refused unless `allow_pickle=True`, and then read with `torch.load(weights_only=True)`, after
their zip archive is checked not to expand far beyond its size. Inside a diffusers folder no
file that resolves outside the folder is opened (`detection.check_inside`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .clip import TextConfig, TextTransformer
from .detection import (
    MARKER_KEYS,
    DetectedModel,
    probe_prediction_type,
    read_json,
)
from .diffusers_format import (
    SCHEDULER_CONFIG,
    text_to_hf,
    unet_table,
    unet_to_diffusers,
    vae_table,
    vae_to_diffusers,
    write_tokenizer,
)
from .families import (
    PREDICTION_TYPES,
    UNET_PREFIX,
    VAE_PREFIX,
    Family,
    TextEncoderUse,
    family_spec,
    prediction_is_ambiguous,
    with_prediction,
)
from .files import atomic_folder, atomic_write, atomic_write_text, check_destination
from .keymap import CheckpointError, load_strict, on_meta
from .layouts import (
    Size,
    component_names,
    component_sizes,
    hf_table,
    open_clip_table,
    remember_keys,
)
from .sources import (
    DiffusersFolder,
    LazyTensors,
    SingleFile,
    Subset,
    apply_config,
    check_tensors,
    match_keys,
)
from .speed import projections_fused
from .tokenizer import EOT_TOKEN_ID, CLIPTokenizer
from .unet import UNetModel
from .vae import AutoencoderKL
from .vae_files import VAEPrecision, recorded_precision

logger = logging.getLogger(__name__)



@dataclass
class Components:
    """The modules of a checkpoint, built and loaded, and what decided them.

    Attributes:
        family: the family record, with the architecture actually loaded and its prediction type.
        unet, vae: the denoiser network and the autoencoder (eval mode).
        text_encoders: the family's text encoders in official order (SDXL: CLIP-L, bigG).
        text_uses: which hidden state of each encoder the context reads (see `TextEncoderUse`).
        prediction_reason: the evidence for the prediction type.
        ignored: keys of the source that were not loaded, with the reason for each.
        tokenizer: the CLIP BPE tokenizer (one vocabulary serves every family).
        vae_precision: whether the VAE must decode in float32 under an fp16 model, and why (`vae_files`).
    """

    family: Family
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[TextTransformer]
    text_uses: list[TextEncoderUse]
    prediction_reason: str = ""
    ignored: dict[str, str] = field(default_factory=dict)
    tokenizer: CLIPTokenizer = field(default_factory=CLIPTokenizer)
    vae_precision: VAEPrecision = field(default_factory=VAEPrecision)

    @property
    def prediction_type(self) -> str:
        """ "epsilon" or "v_prediction": what the U-Net predicts (the family record carries it)."""
        return self.family.prediction_type


# ------------------------------------------------------------------------------ load
def build(family: Family) -> tuple[UNetModel, AutoencoderKL, list[TextTransformer]]:
    """Every component of `family` on the meta device: no memory, no init (the weights are assigned)."""
    with on_meta():
        unet, vae = UNetModel(family.unet), AutoencoderKL(family.vae)
        encoders = [TextTransformer(t.config) for t in family.text]
    remember_keys(unet, family.unet)  # the key tables read these, instead of building them again
    remember_keys(vae, family.vae)
    return unet, vae, encoders


def load_components(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
    config: Family | Mapping | str | Path | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    vae_dtype: torch.dtype | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    mmap: bool = False,
) -> Components:
    """Read a checkpoint into built components (the steps are in the module docstring).

    The arguments are `minisd.load`'s; see there. Every tensor is copied out of the file as it is
    read (cast and moved in the same copy), so the model owns its memory: the file may be
    overwritten, truncated or deleted afterwards. `mmap=True` skips that copy for tensors that need
    no cast or move (a CPU load in the file's dtype): they stay views of the file's memory map,
    which saves a copy's worth of RAM and time, at a cost. The model is then only as stable as the
    file: copying other weights over it changes the loaded model silently, and truncating it
    (or replacing it mid-download) kills the process with SIGBUS at the next use."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", variant)):
        raise ValueError(f"variant must be a weights variant name such as 'fp16' (letters, digits, _, -): {variant!r}")
    device = torch.device(device)
    # 1. Open the source: its family, and a reader per tensor in the source's own names (nothing read yet).
    if path.is_dir():
        source = DiffusersFolder(path, variant=variant, allow_pickle=allow_pickle)
    else:
        source = SingleFile(path, allow_pickle=allow_pickle)
    # 2. The family and its architecture: presets, then the folder's config.json, then the caller's config;
    #    then what it implies against what the file holds, before anything is built.
    fam = apply_config(source.architecture(family_spec(family) if family else source.detected.family), config)
    check_sizes(fam, source.sizes(fam, use_ema=use_ema), path)
    # 3. Every component on the meta device.
    unet, vae, encoders = build(fam)
    modules = dict(zip(component_names(fam), [unet, vae, *encoders]))
    # 4. The keys through the tables, then the header's dtypes and shapes against the modules: all
    #    before any data is read. Then each component's tensors, cast once as read; strict assign.
    parts = source.parts(fam, use_ema=use_ema)
    matches = [match_keys(part) for part in parts]
    _raise_problems(path, [p for m in matches for p in m.problems])
    _raise_problems(path, [p for part, m in zip(parts, matches) for p in check_tensors(part, m.own, modules)])
    precision = _vae_precision(path)
    vae_dtype = vae_dtype or precision.dtype(dtype)  # float32 unless the VAE is recorded as fp16-safe
    dtypes = dict(zip(modules, [dtype, vae_dtype, *[dtype] * len(encoders)]))
    for part, m in zip(parts, matches):
        for name, table in part.tables.items():
            lazy = LazyTensors(part.tensors, dtypes[name], device, copy=part.tensors.mapped and not mmap)
            lazy.prefetch(sorted(m.own[name]))  # safetensors writers store tensors in name order
            state = table.to_ours(Subset(lazy, m.own[name]), source=f"{part.where} [{name}]")
            load_strict(modules[name], state, source=f"{path} [{name}]")
    ignored = {key: reason for m in matches for key, reason in m.ignored.items()}
    if device.type != "meta":
        source.check()
    # 5. The prediction type, and with it the family (sd2 <-> sd2-v).
    fam, reason = _prediction(source, fam, family, prediction_type, unet, on_meta=device.type == "meta")
    uses = [t.use(source.full_layers(t, e.config)) for t, e in zip(fam.text, encoders)]
    logger.info(
        "loaded %s as %s (%s); %s", path, fam.name, fam.prediction_type, "EMA U-Net" if use_ema else "U-Net weights"
    )
    return Components(fam, unet.eval(), vae.eval(), [e.eval() for e in encoders], uses, reason, ignored,
                      vae_precision=precision)  # fmt: skip


def _vae_precision(path: Path) -> VAEPrecision:
    """A folder's vae/config.json `force_upcast`; a single file records none (the default: upcast)."""
    where = path / "vae" / "config.json"
    return recorded_precision(read_json(where, folder=path), where) if path.is_dir() else VAEPrecision()


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(
            f"{path} does not match the expected architecture:\n" + "\n".join(problems)
            + "\n  If this is a custom or fine-tuned architecture, pass config=...; to force a family, pass family=..."
        )  # fmt: skip


# Building on meta costs time in proportion to the number of tensors (modules), not their sizes. An
# architecture with up to twice the file's tensors (plus this many) is still built, so that the
# key-by-key check can name exactly what differs: that work is bounded by the file's own size.
_TENSOR_SLACK = 64


def check_sizes(family: Family, held: list[tuple[str, Size]], path: Path) -> None:
    """The tensors and elements `family`'s architecture implies (`layouts.component_sizes`, in
    milliseconds for any config) against what the file holds for each component, before anything
    is built.

    When some component's architecture has more than twice the file's tensors (a full-size preset
    on a tiny file, a hostile config), loading stops here, naming every component whose sizes
    differ. Any smaller difference, in tensors or elements, is left to the key and shape checks
    (`_match`, `_check_tensors`), which cannot pass when the sizes differ, run before any data is
    read, and name the keys."""
    lines, too_big = [], False
    for name, implied, (where, have) in zip(component_names(family), component_sizes(family), held):
        too_big |= implied.tensors > 2 * have.tensors + _TENSOR_SLACK
        if implied != have:
            lines.append(
                f"  {name}: the architecture has {implied.numel:,} parameters in {implied.tensors:,} tensors; "
                f"the file holds {have.numel:,} in {have.tensors:,} {where}"
            )
    if too_big:
        raise CheckpointError(
            f"{path} is far smaller than the architecture it is loaded as ({family.name}):\n" + "\n".join(lines)
            + "\n  Pass config= with the file's real architecture, or family= if the family was detected wrongly."
        )  # fmt: skip


def _prediction(
    source, fam: Family, given_family: str | None, given: str | None, unet: UNetModel, *, on_meta: bool
) -> tuple[Family, str]:
    """The prediction type and its evidence: the caller's word, the source's (metadata, scheduler
    config), a known official file's, or else the probe (SD2 files without metadata). When the probe
    is unsure (`detection.ProbeResult`), and on the meta device, where there are no weights to hash
    or probe, the family's default stands (sd2: epsilon), and the reason says so."""
    detected: DetectedModel = source.detected
    if given:
        pt, reason = given, "prediction_type given by the caller"
    elif given_family and given_family != detected.family.name:
        pt, reason = fam.prediction_type, f"family={given_family!r} given by the caller"
    elif detected.prediction_type:
        pt, reason = detected.prediction_type, detected.prediction_reason
    elif on_meta:
        pt = fam.prediction_type
        reason = (
            f"device='meta': no weights are read, so neither the file's SHA-256 nor the probe could tell; "
            f"kept {fam.name}'s default {pt}"
        )
    elif known := source.known_file():
        pt, reason = known
    elif (probe := probe_prediction_type(unet)).verdict != "unsure":
        pt, reason = probe.verdict, probe.reason
    else:  # the probe does not guess: the family's default stands, and the reason says why
        pt, reason = fam.prediction_type, f"{probe.reason}; kept {fam.name}'s default {fam.prediction_type}"
        logger.warning("%s: %s (pass prediction_type= to choose)", source.path, reason)
    return with_prediction(fam, pt), reason


# ------------------------------------------------------------------------------ save
def _official_state_dict(model: Components) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors under the official keys, and the architecture they have (`apply_config`'s form)."""
    out = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in model.vae.state_dict().items()})
    text_configs = []
    for enc, use, module in zip(model.family.text, model.text_uses, model.text_encoders):
        cfg, weights = module.config, module.state_dict()
        if cfg.layers < use.layer + enc.skip:  # a diffusers SD2 tower, one block short of the official one
            cfg, weights = _restore_dropped_block(cfg, weights)
        table = (hf_table if enc.layout == "hf" else open_clip_table)(cfg).prefixed(enc.official_prefix)
        out.update(table.to_theirs(weights))
        text_configs.append(dataclasses.asdict(cfg))
    architecture = {"unet": dataclasses.asdict(model.unet.config), "vae": dataclasses.asdict(model.vae.config),
                    "text_encoders": text_configs}  # fmt: skip
    return out, architecture


def _restore_dropped_block(cfg: TextConfig, weights: dict[str, torch.Tensor]) -> tuple[TextConfig, dict]:
    """An SD2 text encoder that came from a diffusers folder lacks the last OpenCLIP block and the
    projection, which the official layout has (and SD2's penultimate-layer context never reads).
    They are written back as zeros, so the file has the official shapes and reads the same way."""
    logger.info("SD2 text encoder from a diffusers folder: writing the unused last block and text_projection as zeros")
    last = f"transformer.resblocks.{cfg.layers - 1}."
    weights = dict(weights)
    for k in [k for k in weights if k.startswith(last)]:
        weights[k.replace(last, f"transformer.resblocks.{cfg.layers}.")] = torch.zeros_like(weights[k])
    if cfg.projection_dim is None:
        weights["text_projection"] = torch.zeros(cfg.width, cfg.width, dtype=weights["ln_final.weight"].dtype)
    return dataclasses.replace(cfg, layers=cfg.layers + 1, projection_dim=cfg.projection_dim or cfg.width), weights


def _write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], *, overwrite: bool
) -> None:
    """Write atomically (`files.atomic_write`: a temporary file, then rename), with tensors that share
    storage cloned (safetensors refuses shared storage): a full disk or an interrupted save leaves an
    existing file whole and no temporary file behind."""
    seen: set[int] = set()
    clean = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        clean[k] = v.clone() if ptr in seen else v
        seen.add(ptr)

    def write(tmp: Path) -> None:
        try:
            save_file(clean, str(tmp), metadata=metadata)
        except SafetensorError as e:  # safetensors reports I/O errors (a full disk) as its own type
            raise OSError(f"{path}: could not write the file: {e}") from None

    atomic_write(path, write, overwrite=overwrite)


def save(model: Components, path: str | Path, format: str = "official", *, overwrite: bool = False) -> Path:
    """Export a model as an official single file (`format="official"`) or a diffusers folder.

        minisd.save(sd, "model.safetensors")
        minisd.save(sd, "model-diffusers/", format="diffusers")   # diffusers' from_pretrained reads it

    An official file reloads to the same tensors under the same keys as the file it was loaded
    from, less the ignored extras (`model.ignored`: EMA copies, schedule buffers, position_ids, ...).
    Nothing is overwritten unless `overwrite=True`, and the destination is checked before any work
    (`files.check_destination`). Files are replaced atomically, and a new diffusers folder appears
    only once complete (`files.atomic_folder`); files in an existing folder that save does not
    write are kept."""
    path = Path(path)
    if format not in ("official", "diffusers"):
        raise ValueError(f"save: format must be 'official' or 'diffusers', got {format!r}")
    if projections_fused(model.unet) or projections_fused(model.vae):  # the layouts name the separate layers
        raise ValueError("save: the attention projections are fused (sd.fuse_projections()); call "
                         "sd.unfuse_projections() first (it restores the official layers exactly), then save")
    check_destination(path, overwrite=overwrite, folder=format == "diffusers")
    if format == "official" and path.suffix != ".safetensors":
        raise ValueError(f"save: an official single file must end in .safetensors, got {path.name}")
    metadata = {"minisd.family": model.family.name, "minisd.prediction_type": model.prediction_type}
    if model.family.zero_terminal_snr:
        metadata["minisd.zero_terminal_snr"] = "true"
    if format == "official":
        tensors, architecture = _official_state_dict(model)
        tensors.update(_markers(model.family))
        architecture["default_size"] = model.family.default_size  # a tiny model's own size, not its family's
        metadata["minisd.config"] = json.dumps(architecture)  # reloads without config= (`SingleFile.architecture`)
        _write_safetensors(tensors, path, metadata, overwrite=overwrite)
    else:
        with atomic_folder(path, overwrite=overwrite) as folder:
            _save_diffusers(model, folder, metadata)
    return path


def _markers(family: Family) -> dict[str, torch.Tensor]:
    """The empty marker tensors ComfyUI reads (`detection.MARKER_KEYS`) for a v-prediction (zero-terminal-SNR)
    model of a family whose files do not otherwise tell (not SD2, whose 768-v model is a family of its own)."""
    if family.prediction_type != "v_prediction" or prediction_is_ambiguous(family):
        return {}
    return {key: torch.zeros(0) for key in MARKER_KEYS[: 2 if family.zero_terminal_snr else 1]}


# diffusers' scheduler config of a zero-terminal-SNR model (Lin et al. 2023: rescaled betas, trailing timesteps).
_ZERO_SNR_SCHEDULER = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
# diffusers' scheduler configs: what each class needs beyond the official SD config.
_SCHEDULER_EXTRAS = {"PNDMScheduler": {"skip_prk_steps": True}}


def _save_diffusers(model: Components, folder: Path, metadata: dict[str, str], *, with_weights: bool = True) -> None:
    """The folder; `with_weights=False` writes only its JSON and tokenizer files (`minisd.parity`'s config folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    family = model.family
    save_weights = _write_safetensors if with_weights else lambda *args, **kwargs: None

    def write(sub: str, name: str, obj: dict) -> None:
        (folder / sub).mkdir(exist_ok=True)
        atomic_write_text(folder / sub / name, json.dumps(obj, indent=2), overwrite=True)

    index: dict = {"_class_name": family.diffusers_pipeline, "_diffusers_version": "0.42.1",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    text_time = bool(family.y_inputs)  # SDXL's y is "text_time" in diffusers, whatever the model's width
    # diffusers' pipelines default to unet sample_size x the VAE factor: the family's size, as the official folders
    sample_size = family.default_size // model.vae.config.downsample_factor
    write("unet", "config.json", unet_to_diffusers(model.unet.config, text_time=text_time, sample_size=sample_size))
    save_weights(unet_table(model.unet.config, text_time=text_time).to_theirs(model.unet.state_dict()),
                 folder / "unet" / "diffusion_pytorch_model.safetensors", metadata, overwrite=True)  # fmt: skip
    write("vae", "config.json", vae_to_diffusers(model.vae.config, force_upcast=model.vae_precision.upcast))
    save_weights(vae_table(model.vae.config).to_theirs(model.vae.state_dict()),
                 folder / "vae" / "diffusion_pytorch_model.safetensors", metadata, overwrite=True)  # fmt: skip
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        index[name] = [None, None]
    for enc, use, module in zip(family.text, model.text_uses, model.text_encoders):
        cfg, weights = module.config, module.state_dict()
        if enc.diffusers_drops_last and cfg.layers > use.layer:
            # diffusers' converter drops SD2's last OpenCLIP block (never read) and its projection.
            last = f"transformer.resblocks.{cfg.layers - 1}."
            weights = {k: v for k, v in weights.items() if not k.startswith(last) and k != "text_projection"}
            cfg = dataclasses.replace(cfg, layers=cfg.layers - 1, projection_dim=None)
        sub = enc.diffusers_folder
        write(sub, "config.json", text_to_hf(cfg))
        theirs = hf_table(cfg).to_theirs(weights)
        save_weights(theirs, folder / sub / "model.safetensors", metadata, overwrite=True)
        tok = sub.replace("text_encoder", "tokenizer")
        write_tokenizer(folder / tok, pad_token="<|endoftext|>" if enc.pad_token_id == EOT_TOKEN_ID else "!")
        index[sub] = ["transformers", "CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"]
        index[tok] = ["transformers", "CLIPTokenizer"]
    scheduler = {**SCHEDULER_CONFIG, "_class_name": family.diffusers_scheduler,
                 "prediction_type": model.prediction_type,
                 **(_ZERO_SNR_SCHEDULER if family.zero_terminal_snr else {}),
                 **_SCHEDULER_EXTRAS.get(family.diffusers_scheduler, {})}  # fmt: skip
    write("scheduler", "scheduler_config.json", scheduler)
    index["scheduler"] = ["diffusers", family.diffusers_scheduler]
    if family.y_inputs:  # SDXL pipelines
        index["force_zeros_for_empty_prompt"] = family.zero_empty_negative
        if "aesthetic_score" in family.y_inputs:
            index["requires_aesthetics_score"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2), overwrite=True)
