"""Load, detect and save Stable Diffusion checkpoints: official single files and diffusers folders.

Three entry points (re-exported as `minisd.load`, `minisd.detect`, `minisd.save`):

- `detect(path)` reads only the safetensors header (or a diffusers folder's JSON files),
  never the weights, and says which family the file holds and why (`DetectedModel`).
- `load(path, ...)` builds every component on the meta device, reads the tensors once,
  maps them through the key tables, casts them once, and assigns them
  (`keymap.load_strict(..., assign=True)`): no second copy of the weights is made.
- `save(sd, path, format="official" | "diffusers")` writes either layout.

Layouts (the tables live with their components, see `families.py` for the prefixes):

| component     | official single file                                  | diffusers folder          |
|---------------|-------------------------------------------------------|---------------------------|
| U-Net         | `model.diffusion_model.*` (our names: a prefix strip)  | `unet/` (`unet.diffusers_table`) |
| VAE           | `first_stage_model.*` (prefix strip)                   | `vae/` (`vae.diffusers_table`) |
| CLIP-L        | `cond_stage_model.transformer.*` / `conditioner.embedders.0.transformer.*` (`clip.hf_table`) | `text_encoder/` (`clip.hf_table`) |
| OpenCLIP H/bigG | `cond_stage_model.model.*` / `conditioner.embedders.N.model.*` (prefix strip) | `text_encoder(_2)/` (`clip.hf_table`) |

Safety: pickled checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) can run arbitrary code when
unpickled. They are refused unless the caller passes `allow_pickle=True`, and even then
they are read with `torch.load(weights_only=True)`, which only rebuilds tensors and
plain containers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .clip import TextConfig, TextTransformer, hf_table, open_clip_table
from .detection import (
    KNOWN_SHA256,
    PICKLE_SUFFIXES,
    TensorInfo,
    detect_diffusers,
    detect_keys,
    probe_prediction_type,
    read_json,
    read_safetensors_header,
    refuse_pickle,
    sha256,
)
from .diffusers_format import (
    SCHEDULER_CONFIG,
    text_from_hf,
    text_to_hf,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
    write_tokenizer,
)
from .families import UNET_PREFIX, VAE_PREFIX, FamilySpec, TextEncoderSpec, family_spec
from .keymap import CheckpointError, Ignore, KeyTable, Rule, load_strict
from .pipeline import StableDiffusion
from .schedules import ddpm_alphas_cumprod
from .tokenizer import CLIPTokenizer
from .unet import UNetConfig, UNetModel
from .unet import diffusers_table as unet_diffusers_table
from .vae import AutoencoderKL, VAEConfig
from .vae import diffusers_table as vae_diffusers_table

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ key tables
# Keys of official files that are not weights of the inference model. Each has its reason.
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2")
OFFICIAL_IGNORES = (
    *(Ignore(k, "DDPM schedule buffer of the training code; minisd computes the schedule (and checks this copy)")
      for k in _SCHEDULE_BUFFERS),
    Ignore("logvar", "LDM's learned-logvar training buffer, unused at inference"),
    Ignore("lvlb_weights", "LDM's variational-bound loss weights, unused at inference"),
    Ignore("model_ema.decay", "EMA bookkeeping"),
    Ignore("model_ema.num_updates", "EMA bookkeeping"),
    Ignore("denoiser.*", "sgm's discretized sigma buffer; minisd computes the schedule"),
    Ignore("cond_stage_model.model.visual.*", "OpenCLIP image tower, unused for text conditioning"),
)
_OFFICIAL_EXTRAS = KeyTable("official-file extras", (), OFFICIAL_IGNORES)
_EMA_REASON = "EMA copy of the U-Net (pass use_ema=True to load it instead)"
_NON_EMA_REASON = "non-EMA U-Net weights, replaced by the EMA copy (use_ema=True)"


def _ema_key(name: str) -> str:
    """LDM's `LitEma` stores `model.diffusion_model.X.Y` as `model_ema.diffusion_modelXY` (dots removed)."""
    return "model_ema." + ("diffusion_model." + name).replace(".", "")


def _without_text_model_level(table: KeyTable) -> KeyTable:
    """The HF CLIP table for files without the `text_model.` level: SD1 files written with
    transformers 3.x, and `CLIPTextModel` folders saved by transformers >= 5.6."""
    strip = lambda k: k.removeprefix("text_model.")  # noqa: E731
    return KeyTable(table.name + " (no text_model.)", tuple(Rule(r.ours, tuple(map(strip, r.theirs)), r.transform) for r in table.rules),
                    tuple(Ignore(strip(i.pattern), i.reason) for i in table.ignore))


def _text_table(cfg: TextConfig, layout: str, keys: set[str], prefix: str) -> KeyTable:
    if layout == "open_clip":
        return open_clip_table(cfg).prefixed(prefix)
    table = hf_table(cfg)
    if prefix + "text_model.final_layer_norm.weight" not in keys and prefix + "final_layer_norm.weight" in keys:
        table = _without_text_model_level(table)
    return table.prefixed(prefix)


def _module_keys(module: nn.Module) -> list[str]:
    return list(module.state_dict().keys())


# ------------------------------------------------------------------------------ reading tensors
class _LazyTensors(Mapping):
    """A read-on-access view of checkpoint tensors that casts and moves each tensor once, as it
    is read, so that only one copy of the weights ever exists (`dtype_of(key)` picks the dtype)."""

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]], dtype_of: Callable[[str], torch.dtype | None], device):
        self._readers, self._dtype_of, self._device = readers, dtype_of, device

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._readers[key]()
        dtype = self._dtype_of(key) if t.is_floating_point() else None
        return t.to(device=self._device, dtype=dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def _safetensors_readers(files: list[Path], device) -> dict[str, Callable[[], torch.Tensor]]:
    """Readers for every tensor of some safetensors files (each keeps its file open until dropped)."""
    readers = {}
    for f in files:
        h = safe_open(str(f), framework="pt", device=str(device) if torch.device(device).type != "meta" else "cpu")
        for k in h.keys():
            if k in readers:
                raise CheckpointError(f"{f}: tensor {k!r} appears in two files of the same component")
            readers[k] = (lambda h=h, k=k: h.get_tensor(k))
    return readers


def _pickle_readers(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Readers over a pickled state dict (read once, with `_pickle_state_dict`)."""
    return {k: (lambda v=v: v) for k, v in _pickle_state_dict(path).items()}


def _pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)`: only tensors and plain containers can be rebuilt, so a
    malicious pickle's payload cannot run. Shared storage is broken up by cloning views."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # UnpicklingError, RuntimeError for archives that are not torch's
        raise CheckpointError(f"{path}: refused to unpickle ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values() if not isinstance(v, (int, float))):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    seen: set[int] = set()
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen or v.numel() != v.untyped_storage().nbytes() // max(v.element_size(), 1):
            sd[k] = v.clone()
        seen.add(ptr)
    return sd


# ------------------------------------------------------------------------------ config override
def _component_config(cls, value):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"config: unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    raise ValueError(f"config: expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def apply_config(spec: FamilySpec, config: FamilySpec | Mapping | str | Path | None) -> FamilySpec:
    """The family spec with a non-standard architecture: a `FamilySpec`, or a dict / JSON file of the
    form {"unet": {UNetConfig fields}, "vae": {...}, "text_encoders": [{TextConfig fields}, ...]}
    (each part optional)."""
    if config is None or isinstance(config, FamilySpec):
        return config or spec
    if isinstance(config, (str, Path)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"config: cannot read {config}: {e}") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a FamilySpec, a dict or a JSON path, got {type(config).__name__}")
    unknown = sorted(set(config) - {"unet", "vae", "text_encoders"})
    if unknown:
        raise ValueError(f"config: unknown sections {unknown}; expected 'unet', 'vae', 'text_encoders'")
    unet = _component_config(UNetConfig, config.get("unet")) or spec.unet
    vae = _component_config(VAEConfig, config.get("vae")) or spec.vae
    text = spec.text
    if "text_encoders" in config:
        cfgs = config["text_encoders"]
        if len(cfgs) != len(spec.text):
            raise ValueError(f"config: family {spec.name} has {len(spec.text)} text encoder(s), config gives {len(cfgs)}")
        text = tuple(dataclasses.replace(t, config=_component_config(TextConfig, c)) for t, c in zip(spec.text, cfgs))
    return dataclasses.replace(spec, unet=unet, vae=vae, text=text)


# ------------------------------------------------------------------------------ load
def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    family: str | None = None,
    config: FamilySpec | Mapping | str | Path | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    vae_dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> StableDiffusion:
    """Load an official single-file checkpoint or a diffusers folder, ready to generate.

    Args:
        path: a `.safetensors` file in the official layout, or a diffusers folder.
        device: where the weights go; tensors are read straight onto it.
        dtype: dtype of the U-Net and text encoders (default: float32, as diffusers). Each
            tensor is cast once as it is read, so an fp16 file loaded as fp16 is never upcast.
        family: override the detected family ("sd1", "sd2-v", ...).
        config: a non-standard architecture (see `apply_config`), for tiny or custom models.
        prediction_type: override the prediction type ("epsilon" or "v_prediction").
        use_ema: load the `model_ema.*` copy of the U-Net from a non-pruned file.
        vae_dtype: the VAE's dtype; float32 by default because the SDXL VAE overflows in fp16.
        variant: a diffusers weights variant such as "fp16" (`*.fp16.safetensors`).
        allow_pickle: read `.ckpt`/`.pt` files with `torch.load(weights_only=True)`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    dtype = dtype or torch.float32
    if path.is_dir():
        return _load_diffusers(path, device, dtype, family, config, prediction_type, vae_dtype, variant, allow_pickle)
    return _load_single_file(path, device, dtype, family, config, prediction_type, use_ema, vae_dtype, allow_pickle)


def _build(spec: FamilySpec) -> tuple[UNetModel, AutoencoderKL, list[TextTransformer]]:
    """Every component on the meta device: no memory, no init; the checkpoint's tensors are assigned."""
    with torch.device("meta"):
        return UNetModel(spec.unet), AutoencoderKL(spec.vae), [TextTransformer(t.config) for t in spec.text]


def official_tables(spec: FamilySpec, keys: set[str], *, use_ema: bool = False, modules=None) -> dict[str, KeyTable]:
    """One table per component (U-Net, VAE, text encoders, in that order) from an official file's
    keys to our module names. `keys` (the file's) picks the HF CLIP variant without `text_model.`;
    `modules` are the components already built (else they are built on meta here)."""
    unet, vae, encoders = modules or _build(spec)
    unet_keys = _module_keys(unet)
    if use_ema:
        unet_table = KeyTable("U-Net (EMA)", tuple(Rule(k, (_ema_key(k),)) for k in unet_keys),
                              (Ignore(UNET_PREFIX + "*", _NON_EMA_REASON),))
    else:
        rules = KeyTable.identity("U-Net", unet_keys).prefixed(UNET_PREFIX).rules
        unet_table = KeyTable("U-Net", rules, (Ignore("model_ema.*", _EMA_REASON),))
    tables = {"U-Net": unet_table, "VAE": KeyTable.identity("VAE", _module_keys(vae)).prefixed(VAE_PREFIX)}
    for i, (enc, module) in enumerate(zip(spec.text, encoders)):
        tables[f"text encoder {i} ({enc.layout})"] = _text_table(enc.config, enc.layout, keys, enc.official_prefix)
    return tables


def _load_single_file(path, device, dtype, family, config, prediction_type, use_ema, vae_dtype, allow_pickle):
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            refuse_pickle(path)
        readers, metadata = _pickle_readers(path), {}
        infos = {k: TensorInfo(str(t.dtype), tuple(t.shape)) for k, t in ((k, r()) for k, r in readers.items())}
    else:
        header = read_safetensors_header(path)
        infos, metadata = header.tensors, header.metadata
        readers = _safetensors_readers([path], device)
    detected = detect_keys(infos, metadata, path)
    fam = family or detected.family
    spec = apply_config(family_spec(fam), config)
    keys = set(infos)

    unet, vae, encoders = _build(spec)
    if use_ema and not detected.has_ema:
        raise CheckpointError(f"{path}: use_ema=True but the file holds no `model_ema.*` weights (it is pruned)")
    tables = official_tables(spec, keys, use_ema=use_ema, modules=(unet, vae, encoders))
    dtype_of = lambda k: vae_dtype if k.startswith(VAE_PREFIX) else dtype  # noqa: E731
    state = _convert(tables, _LazyTensors(readers, dtype_of, device), keys, path)
    ignored = state.pop("__ignored__")
    modules = [unet, vae, *encoders]
    for module, (name, sd) in zip(modules, state.items()):
        load_strict(module, sd, source=f"{path} [{name}]")
    if "alphas_cumprod" in readers:
        _check_schedule(readers["alphas_cumprod"](), path)

    pt, reason = detected.prediction_type, detected.prediction_reason
    if family and family != detected.family:
        pt, reason = spec.prediction_type, f"family={family!r} given by the caller"
    if prediction_type:
        pt, reason = prediction_type, "prediction_type given by the caller"
    elif pt is None and path.suffix == ".safetensors" and (known := KNOWN_SHA256.get(sha256(path))):
        pt = family_spec(known[1]).prediction_type
        reason = f"SHA-256 of the official {known[0]}"
    if pt is None:
        pt, reason = probe_prediction_type(unet)
    if fam in ("sd2", "sd2-v"):
        fam = "sd2-v" if pt == "v_prediction" else "sd2"
        spec = dataclasses.replace(family_spec(fam), unet=spec.unet, vae=spec.vae, text=spec.text)
    logger.info("loaded %s as %s (%s); %s", path, fam, pt, "EMA U-Net" if use_ema else "regular U-Net weights")
    return StableDiffusion(fam, spec, unet.eval(), vae.eval(), [e.eval() for e in encoders], [t.use for t in spec.text],
                           CLIPTokenizer(), pt, reason, ignored)


def ignore_reason(key: str, tables: dict[str, KeyTable]) -> str | None:
    """Why loading skips a key of an official file (the file-wide list, then each component's), or None."""
    for table in (_OFFICIAL_EXTRAS, *tables.values()):
        reason = table.ignored_reason(key)
        if reason is not None:
            return reason
    return None


def _convert(tables: dict[str, KeyTable], source: Mapping, keys: set[str], path) -> dict:
    """Apply each component's table to the file; then make sure every key was used or ignored."""
    used: set[str] = set()
    out: dict = {}
    problems = []
    for name, table in tables.items():
        # Each table sees only its own keys (those it names, or that match its ignore list).
        own = {k for k in table.theirs_keys if k in keys}
        used |= own
        missing = [k for k in table.theirs_keys if k not in keys]
        if missing:
            more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
            problems.append(f"  {name}: {len(missing)} missing key(s): {', '.join(missing[:8])}{more}")
            continue
        out[name] = table.to_ours(_Subset(source, own), source=f"{path} [{name}]")
    ignored, unexpected = {}, []
    for k in sorted(keys - used):
        reason = ignore_reason(k, tables)
        if reason is None:
            unexpected.append(k)
        else:
            ignored[k] = reason
    if unexpected:
        more = f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""
        problems.append(f"  {len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}{more}")
    if problems:
        raise CheckpointError(
            f"{path} does not match the expected architecture:\n" + "\n".join(problems)
            + "\n  If this is a custom or fine-tuned architecture, pass config=...; to force a family, pass family=..."
        )
    out["__ignored__"] = ignored
    return out


class _Subset(Mapping):
    def __init__(self, source: Mapping, keys: set[str]):
        self._source, self._keys = source, keys

    def __getitem__(self, k):
        if k not in self._keys:
            raise KeyError(k)
        return self._source[k]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def _check_schedule(stored: torch.Tensor, path: Path) -> None:
    """Compare a stored `alphas_cumprod` (read as stored, not cast) with the scaled-linear schedule."""
    stored = stored.detach().to("cpu", torch.float64)
    expected = ddpm_alphas_cumprod()
    # fp16 files store alphabar with ~5e-4 resolution near 1; anything beyond 2e-3 is another schedule.
    if stored.shape != expected.shape or (stored - expected).abs().max() > 2e-3:
        last = float(stored[-1]) if stored.numel() else float("nan")
        logger.warning(
            "%s: the stored alphas_cumprod differs from the standard scaled_linear schedule (last value %.3g): "
            "a zero-terminal-SNR or otherwise custom fine-tune? Sample with the matching schedule "
            "(e.g. zero_terminal_snr=True with guidance_rescale).", path, last)


# ------------------------------------------------------------------------------ diffusers folders
_WEIGHT_BASENAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                     "text_encoder": "model", "text_encoder_2": "model"}


def _weight_files(comp: Path, base: str, variant: str | None, allow_pickle: bool) -> list[Path]:
    """The safetensors file(s) of one component: plain, a variant (`*.fp16.safetensors`), or shards."""
    names = [f"{base}.{variant}.safetensors"] if variant else [f"{base}.safetensors", f"{base}.fp16.safetensors"]
    for name in names:
        if (comp / name).exists():
            return [comp / name]
        index = comp / f"{name}.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map listing the shards")
            return [comp / s for s in sorted(set(weight_map.values()))]
    pickles = [comp / f"{base}.bin"] if (comp / f"{base}.bin").exists() else []
    if pickles:
        if not allow_pickle:
            refuse_pickle(pickles[0])
        return pickles
    raise CheckpointError(f"{comp}: no weights file ({' or '.join(names)})" + (f" for variant {variant!r}" if variant else ""))


def _component_readers(comp: Path, base: str, variant, allow_pickle, device) -> tuple[dict, Path]:
    """Readers for every tensor of one component folder, and the first weights file (for messages)."""
    files = _weight_files(comp, base, variant, allow_pickle)
    if files[0].suffix == ".bin":
        return _pickle_readers(files[0]), files[0]
    for f in files:
        read_safetensors_header(f)  # clear errors for truncated or corrupt files
    return _safetensors_readers(files, device), files[0]


def _load_diffusers(folder, device, dtype, family, config, prediction_type, vae_dtype, variant, allow_pickle):
    detected = detect_diffusers(folder)
    fam = family or detected.family
    spec = family_spec(fam)
    read = lambda name: _component_readers(folder / name, _WEIGHT_BASENAMES[name], variant, allow_pickle, device)  # noqa: E731
    readers = {name: read(name) for name in ("unet", "vae", *(t.diffusers_folder for t in spec.text))}

    # A folder carries its architecture in its config.json files (`config` still wins). Whether a
    # text encoder is projected (CLIPTextModelWithProjection) is read off its weights.
    def text_config(enc: TextEncoderSpec) -> TextConfig:
        where = folder / enc.diffusers_folder / "config.json"
        projected = "text_projection.weight" in readers[enc.diffusers_folder][0]
        return text_from_hf(read_json(where), projection=projected, where=str(where))

    spec = dataclasses.replace(
        spec,
        unet=unet_from_diffusers(read_json(folder / "unet" / "config.json"), str(folder / "unet" / "config.json")),
        vae=vae_from_diffusers(read_json(folder / "vae" / "config.json"), str(folder / "vae" / "config.json")),
        text=tuple(dataclasses.replace(enc, config=text_config(enc)) for enc in spec.text),
    )
    index = read_json(folder / "model_index.json")
    if "force_zeros_for_empty_prompt" in index:  # the folder's own say on SDXL's empty negative prompt
        spec = dataclasses.replace(spec, zero_empty_negative=bool(index["force_zeros_for_empty_prompt"]))
    spec = apply_config(spec, config)
    unet, vae, encoders = _build(spec)
    parts = [("unet", unet, unet_diffusers_table(spec.unet), dtype), ("vae", vae, vae_diffusers_table(spec.vae), vae_dtype)]
    for enc, module in zip(spec.text, encoders):
        table = _text_table(module.config, "hf", set(readers[enc.diffusers_folder][0]), "")
        parts.append((enc.diffusers_folder, module, table, dtype))
    ignored: dict[str, str] = {}
    for name, module, table, dt in parts:
        comp_readers, first_file = readers[name]
        comp_ignored: dict[str, str] = {}
        sd = table.to_ours(_LazyTensors(comp_readers, lambda k, dt=dt: dt, device), source=str(first_file), ignored=comp_ignored)
        ignored.update({f"{name}/{k}": r for k, r in comp_ignored.items()})
        load_strict(module, sd, source=str(folder / name))
    pt, reason = detected.prediction_type, detected.prediction_reason
    if prediction_type:
        pt, reason = prediction_type, "prediction_type given by the caller"
    # diffusers' SD2 text encoders hold 23 blocks and are read at their last one (see families.py).
    uses = [dataclasses.replace(t.use, skip=t.use.skip - 1) if t.diffusers_drops_last else t.use for t in spec.text]
    return StableDiffusion(fam, spec, unet.eval(), vae.eval(), [e.eval() for e in encoders], uses, CLIPTokenizer(), pt, reason, ignored)


# ------------------------------------------------------------------------------ save
def _official_state_dict(sd: StableDiffusion) -> dict[str, torch.Tensor]:
    out = {UNET_PREFIX + k: v for k, v in sd.unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in sd.vae.state_dict().items()})
    for enc, use, module in zip(sd.spec.text, sd.text_uses, sd.text_encoders):
        cfg, weights = module.config, module.state_dict()
        if enc.diffusers_drops_last and use.skip < enc.use.skip:
            cfg, weights = _restore_dropped_block(cfg, weights)
        table = (hf_table if enc.layout == "hf" else open_clip_table)(cfg).prefixed(enc.official_prefix)
        out.update(table.to_theirs(weights))
    return out


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


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write atomically (a temporary file, then rename), with tensors that share storage cloned
    (safetensors refuses shared storage), so an interrupted save leaves nothing half-written."""
    seen: set[int] = set()
    clean = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        clean[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    tmp = path.with_name(path.name + ".partial")
    save_file(clean, str(tmp), metadata=metadata)
    tmp.replace(path)


def save(sd: StableDiffusion, path: str | Path, format: str = "official", *, overwrite: bool = False) -> Path:
    """Export a model as an official single file (`format="official"`) or a diffusers folder.

    An official file reloads to the same tensors under the same keys as the file it was loaded
    from, less the ignored extras (`sd.ignored`: EMA copies, schedule buffers, position_ids, ...).
    Nothing is overwritten unless `overwrite=True`."""
    path = Path(path)
    if format not in ("official", "diffusers"):
        raise ValueError(f"save: format must be 'official' or 'diffusers', got {format!r}")
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    metadata = {"minisd.family": sd.family, "minisd.prediction_type": sd.prediction_type}
    if format == "official":
        if path.suffix != ".safetensors":
            raise ValueError(f"save: an official single file must end in .safetensors, got {path.name}")
        _write_safetensors(_official_state_dict(sd), path, metadata)
        return path
    _save_diffusers(sd, path, metadata)
    return path


_SCHEDULER_CLASS = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler"}


def _save_diffusers(sd: StableDiffusion, folder: Path, metadata: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    spec = sd.spec
    index: dict = {"_class_name": spec.diffusers_pipeline, "_diffusers_version": "0.42.1",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    write = lambda sub, name, obj: (folder / sub).mkdir(exist_ok=True) or (folder / sub / name).write_text(json.dumps(obj, indent=2))  # noqa: E731
    write("unet", "config.json", unet_to_diffusers(sd.unet.config))
    _write_safetensors(unet_diffusers_table(sd.unet.config).to_theirs(sd.unet.state_dict()),
                       folder / "unet" / "diffusion_pytorch_model.safetensors", metadata)
    write("vae", "config.json", vae_to_diffusers(sd.vae.config))
    _write_safetensors(vae_diffusers_table(sd.vae.config).to_theirs(sd.vae.state_dict()),
                       folder / "vae" / "diffusion_pytorch_model.safetensors", metadata)
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        index[name] = [None, None]
    for enc, module in zip(spec.text, sd.text_encoders):
        cfg, weights = module.config, module.state_dict()
        if enc.diffusers_drops_last and cfg.layers > 1:
            # diffusers' converter drops SD2's last OpenCLIP block (never read) and its projection.
            last = f"transformer.resblocks.{cfg.layers - 1}."
            weights = {k: v for k, v in weights.items() if not k.startswith(last) and k != "text_projection"}
            cfg = dataclasses.replace(cfg, layers=cfg.layers - 1, projection_dim=None)
        sub = enc.diffusers_folder
        write(sub, "config.json", text_to_hf(cfg))
        _write_safetensors(hf_table(cfg).to_theirs(weights), folder / sub / "model.safetensors", metadata)
        tok = sub.replace("text_encoder", "tokenizer")
        write_tokenizer(folder / tok, pad_token="<|endoftext|>" if enc.use.pad_token_id == 49407 else "!")
        index[sub] = ["transformers", "CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"]
        index[tok] = ["transformers", "CLIPTokenizer"]
    base = spec.name.split("-")[0]
    scheduler = dict(SCHEDULER_CONFIG, _class_name=_SCHEDULER_CLASS[base], prediction_type=sd.prediction_type)
    if base == "sd1":
        scheduler["skip_prk_steps"] = True
    write("scheduler", "scheduler_config.json", scheduler)
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    if base == "sdxl":
        index["force_zeros_for_empty_prompt"] = spec.zero_empty_negative
        if spec.name == "sdxl-refiner":
            index["requires_aesthetics_score"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
