"""Load and save Stable Diffusion checkpoints: official single files and diffusers folders.

`load_components` reads either source in the same steps (as nanoGPT's `from_pretrained`
and openai/CLIP's `build_model` do):

1. open the source: which family it holds (`detection`), and a reader for each tensor,
   under the source's own names (nothing is read yet);
2. resolve the family and its architecture: the family's presets, a diffusers folder's
   `config.json` files, the caller's `config`;
3. build every component on the meta device (no memory, no initialisation);
4. read the tensors into one state dict per component, in our names, through the key
   tables (`KeyTable.to_ours`), casting each tensor once as it is read, and load them
   strictly with `load_state_dict(assign=True)`: no second copy of the weights is made;
5. settle the prediction type: metadata, a known file hash, or the one-call probe.

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
refused unless `allow_pickle=True`, and then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .clip import TextConfig, TextTransformer
from .detection import (
    KNOWN_SHA256,
    PICKLE_SUFFIXES,
    DetectedModel,
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
    unet_table,
    unet_to_diffusers,
    vae_from_diffusers,
    vae_table,
    vae_to_diffusers,
    write_tokenizer,
)
from .families import (
    PREDICTION_TYPES,
    UNET_PREFIX,
    VAE_PREFIX,
    Family,
    TextEncoderSpec,
    TextEncoderUse,
    family_spec,
    with_prediction,
)
from .keymap import CheckpointError, KeyTable, load_strict
from .layouts import OFFICIAL_EXTRAS, component_names, hf_table, official_tables, open_clip_table, text_table
from .schedules import ddpm_alphas_cumprod
from .tokenizer import EOT_TOKEN_ID, CLIPTokenizer
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

logger = logging.getLogger(__name__)

Reader = Callable[[], torch.Tensor]  # reads one tensor from the file when called


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
    """

    family: Family
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[TextTransformer]
    text_uses: list[TextEncoderUse]
    prediction_reason: str = ""
    ignored: dict[str, str] = field(default_factory=dict)
    tokenizer: CLIPTokenizer = field(default_factory=CLIPTokenizer)

    @property
    def prediction_type(self) -> str:
        """ "epsilon" or "v_prediction": what the U-Net predicts (the family record carries it)."""
        return self.family.prediction_type


# ------------------------------------------------------------------------------ reading tensors
class _LazyTensors(Mapping):
    """A read-on-access view of checkpoint tensors that casts and moves each tensor once, as it
    is read, so that only one copy of the weights ever exists."""

    def __init__(self, readers: Mapping[str, Reader], dtype: torch.dtype, device: torch.device | str):
        self._readers, self._dtype, self._device = readers, dtype, device

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._readers[key]()
        return t.to(device=self._device, dtype=self._dtype if t.is_floating_point() else None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def _safetensors_readers(files: list[Path], device: torch.device | str) -> dict[str, Reader]:
    """Readers for every tensor of some safetensors files (each keeps its file open until dropped)."""
    readers: dict[str, Reader] = {}
    for f in files:
        read_safetensors_header(f)  # a clear error for a truncated or corrupt file
        h = safe_open(str(f), framework="pt", device=str(device) if torch.device(device).type != "meta" else "cpu")
        for k in h.keys():
            if k in readers:
                raise CheckpointError(f"{f}: tensor {k!r} appears in two files of the same component")
            readers[k] = lambda h=h, k=k: h.get_tensor(k)
    return readers


def _pickle_readers(path: Path) -> dict[str, Reader]:
    """Readers over a pickled state dict, read once with `torch.load(weights_only=True)`: only
    tensors and plain containers can be rebuilt, so a malicious pickle's payload cannot run.
    Tensors that share storage (an EMA copy aliasing the weights) are cloned apart."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # UnpicklingError, RuntimeError for archives that are not torch's
        raise CheckpointError(f"{path}: refused to unpickle ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(
        isinstance(v, torch.Tensor) for v in sd.values() if not isinstance(v, (int, float))
    ):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    seen: set[int] = set()
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen or v.numel() != v.untyped_storage().nbytes() // max(v.element_size(), 1):
            sd[k] = v.clone()
        seen.add(ptr)
    return {k: (lambda v=v: v) for k, v in sd.items()}


class _Subset(Mapping):
    """The keys of a source that one table reads."""

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


def _missing(what: str, keys: list[str]) -> str:
    more = f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""
    return f"  {what}: {', '.join(keys[:8])}{more}"


@dataclass
class _Part:
    """One file (or set of shards) of a source, and the tables of the components it holds.
    An official file is one part holding every component; a diffusers folder has one per component."""

    where: str  # the file or folder, for messages
    readers: dict[str, Reader]
    tables: dict[str, KeyTable]  # component name -> table (their names -> ours)
    extras: KeyTable = KeyTable("no extras", ())  # keys ignored file-wide
    label: str = ""  # prefix of its keys in `Components.ignored` ("unet/" in a folder)


@dataclass
class _Read:
    """What one part gave: each component's state dict in our names (read and cast lazily), the keys
    ignored with their reasons, and the problems (missing or unexpected keys) found."""

    states: dict[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _read(part: _Part, dtypes: Mapping[str, torch.dtype], device: torch.device | str) -> _Read:
    """Each component of `part` through its table. Every key of the part must be used by a table or
    ignored with a reason; anything else is a problem, reported with every other before raising."""
    keys = set(part.readers)
    used: set[str] = set()
    out = _Read()
    for name, table in part.tables.items():
        own = {k for k in table.theirs_keys if k in keys}  # each table sees only the keys it names
        used |= own
        missing = [k for k in table.theirs_keys if k not in keys]
        if missing:
            out.problems.append(_missing(f"{name}: {len(missing)} missing key(s)", missing))
            continue
        tensors = _Subset(_LazyTensors(part.readers, dtypes[name], device), own)
        out.states[name] = table.to_ours(tensors, source=f"{part.where} [{name}]")
    unexpected = []
    for k in sorted(keys - used):
        reason = next((r for t in (part.extras, *part.tables.values()) if (r := t.ignored_reason(k))), None)
        if reason is None:
            unexpected.append(k)
        else:
            out.ignored[part.label + k] = reason
    if unexpected:
        out.problems.append(_missing(f"{len(unexpected)} unexpected key(s)", unexpected))
    return out


# ------------------------------------------------------------------------------ the two sources
class _SingleFile:
    """An official single-file checkpoint: every component in one file, under the official prefixes."""

    def __init__(self, path: Path, *, allow_pickle: bool, device: torch.device | str) -> None:
        self.path = path
        if path.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                refuse_pickle(path)
            self.readers, metadata = _pickle_readers(path), {}
            infos = {
                k: TensorInfo(str(t.dtype), tuple(t.shape)) for k, t in ((k, r()) for k, r in self.readers.items())
            }
        else:
            header = read_safetensors_header(path)
            infos, metadata = header.tensors, header.metadata
            self.readers = _safetensors_readers([path], device)
        self.detected = detect_keys(infos, metadata, path)

    def architecture(self, family: Family) -> Family:
        return family  # a single file carries no config: the presets (or the caller's config) hold

    def parts(self, family: Family, *, use_ema: bool) -> list[_Part]:
        if use_ema and not self.detected.has_ema:
            raise CheckpointError(
                f"{self.path}: use_ema=True but the file holds no `model_ema.*` weights (it is pruned)"
            )
        tables = official_tables(family, set(self.readers), use_ema=use_ema)
        return [_Part(str(self.path), self.readers, tables, OFFICIAL_EXTRAS)]

    def full_layers(self, enc: TextEncoderSpec, cfg: TextConfig) -> int:
        return cfg.layers  # the official file holds whole towers

    def known_file(self) -> tuple[str, str] | None:
        """(prediction type, reason) when the file is a known official release (by its SHA-256)."""
        if self.path.suffix != ".safetensors" or (known := KNOWN_SHA256.get(sha256(self.path))) is None:
            return None
        return family_spec(known[1]).prediction_type, f"SHA-256 of the official {known[0]}"

    def check(self) -> None:
        if "alphas_cumprod" in self.readers:
            _check_schedule(self.readers["alphas_cumprod"](), self.path)


_WEIGHT_BASENAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                     "text_encoder": "model", "text_encoder_2": "model"}  # fmt: skip


class _DiffusersFolder:
    """A diffusers pipeline folder: one sub-folder per component, each with its config.json."""

    def __init__(self, folder: Path, *, variant: str | None, allow_pickle: bool, device: torch.device | str) -> None:
        self.path = folder
        self.detected = detect_diffusers(folder)
        subs = ("unet", "vae", *(t.diffusers_folder for t in self.detected.family.text))
        self.readers = {
            sub: self._readers(folder / sub, _WEIGHT_BASENAMES[sub], variant, allow_pickle, device) for sub in subs
        }

    @staticmethod
    def _readers(comp: Path, base: str, variant: str | None, allow_pickle: bool, device) -> dict[str, Reader]:
        """The tensors of one component: plain, a variant (`*.fp16.safetensors`), shards, or a trusted `.bin`."""
        names = [f"{base}.{variant}.safetensors"] if variant else [f"{base}.safetensors", f"{base}.fp16.safetensors"]
        for name in names:
            if (comp / name).exists():
                return _safetensors_readers([comp / name], device)
            index = comp / f"{name}.index.json"
            if index.exists():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{index}: no weight_map listing the shards")
                return _safetensors_readers([comp / s for s in sorted(set(weight_map.values()))], device)
        if (comp / f"{base}.bin").exists():
            if not allow_pickle:
                refuse_pickle(comp / f"{base}.bin")
            return _pickle_readers(comp / f"{base}.bin")
        for_variant = f" for variant {variant!r}" if variant else ""
        raise CheckpointError(f"{comp}: no weights file ({' or '.join(names)}){for_variant}")

    def architecture(self, family: Family) -> Family:
        """The folder's config.json files (a projected text encoder is told by its weights)."""
        missing = [t.diffusers_folder for t in family.text if t.diffusers_folder not in self.readers]
        if missing:
            raise CheckpointError(
                f"{self.path}: family {family.name} needs {missing}, which model_index.json does not list"
            )
        where = {sub: self.path / sub / "config.json" for sub in self.readers}
        unet = unet_from_diffusers(read_json(where["unet"]), str(where["unet"]))
        vae = vae_from_diffusers(read_json(where["vae"]), str(where["vae"]))
        subs = [t.diffusers_folder for t in family.text]
        projected = ["text_projection.weight" in self.readers[sub] for sub in subs]
        text = tuple(
            text_from_hf(read_json(where[sub]), projection=p, where=str(where[sub])) for sub, p in zip(subs, projected)
        )
        family = family.with_architecture(unet, vae, text)
        index = read_json(self.path / "model_index.json")
        if "force_zeros_for_empty_prompt" in index:  # the folder's own say on SDXL's empty negative prompt
            family = dataclasses.replace(family, zero_empty_negative=bool(index["force_zeros_for_empty_prompt"]))
        return family

    def parts(self, family: Family, *, use_ema: bool) -> list[_Part]:
        if use_ema:
            raise CheckpointError(f"{self.path}: use_ema=True, but a diffusers folder holds one set of U-Net weights")
        names = component_names(family)
        parts = [
            _Part(str(self.path / "unet"), self.readers["unet"], {names[0]: unet_table(family.unet)}, label="unet/"),
            _Part(str(self.path / "vae"), self.readers["vae"], {names[1]: vae_table(family.vae)}, label="vae/"),
        ]
        for name, enc in zip(names[2:], family.text):
            sub = enc.diffusers_folder
            table = text_table(enc.config, "hf", set(self.readers[sub]), "")
            parts.append(_Part(str(self.path / sub), self.readers[sub], {name: table}, label=f"{sub}/"))
        return parts

    def full_layers(self, enc: TextEncoderSpec, cfg: TextConfig) -> int:
        return cfg.layers + 1 if enc.diffusers_drops_last else cfg.layers

    def known_file(self) -> tuple[str, str] | None:
        return None  # a folder's scheduler config already said (detection)

    def check(self) -> None:
        pass


# ------------------------------------------------------------------------------ load
def build(family: Family) -> tuple[UNetModel, AutoencoderKL, list[TextTransformer]]:
    """Every component of `family` on the meta device: no memory, no init (the weights are assigned)."""
    with torch.device("meta"):
        return UNetModel(family.unet), AutoencoderKL(family.vae), [TextTransformer(t.config) for t in family.text]


def load_components(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
    config: Family | Mapping | str | Path | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    vae_dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> Components:
    """Read a checkpoint into built components (the steps are in the module docstring).

    The arguments are `minisd.load`'s; see there."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    # 1. Open the source: its family, and a reader per tensor in the source's own names.
    if path.is_dir():
        source = _DiffusersFolder(path, variant=variant, allow_pickle=allow_pickle, device=device)
    else:
        source = _SingleFile(path, allow_pickle=allow_pickle, device=device)
    # 2. The family and its architecture: presets, then the folder's config.json, then the caller's config.
    fam = apply_config(source.architecture(family_spec(family) if family else source.detected.family), config)
    # 3. Every component on the meta device.
    unet, vae, encoders = build(fam)
    # 4. Each component's state dict in our names, through the tables, cast once as read; strict assign.
    dtypes = dict(zip(component_names(fam), [dtype, vae_dtype, *[dtype] * len(encoders)]))
    reads = [_read(part, dtypes, device) for part in source.parts(fam, use_ema=use_ema)]
    problems = [p for r in reads for p in r.problems]
    if problems:
        raise CheckpointError(
            f"{path} does not match the expected architecture:\n" + "\n".join(problems)
            + "\n  If this is a custom or fine-tuned architecture, pass config=...; to force a family, pass family=..."
        )  # fmt: skip
    states = {name: state for r in reads for name, state in r.states.items()}
    ignored = {key: reason for r in reads for key, reason in r.ignored.items()}
    for name, module in zip(component_names(fam), [unet, vae, *encoders]):
        load_strict(module, states[name], source=f"{path} [{name}]")
    source.check()
    # 5. The prediction type, and with it the family (sd2 <-> sd2-v).
    fam, reason = _prediction(source, fam, family, prediction_type, unet)
    uses = [t.use(source.full_layers(t, e.config)) for t, e in zip(fam.text, encoders)]
    logger.info(
        "loaded %s as %s (%s); %s", path, fam.name, fam.prediction_type, "EMA U-Net" if use_ema else "U-Net weights"
    )
    return Components(fam, unet.eval(), vae.eval(), [e.eval() for e in encoders], uses, reason, ignored)


def _prediction(
    source, fam: Family, given_family: str | None, given: str | None, unet: UNetModel
) -> tuple[Family, str]:
    """The prediction type and its evidence: the caller's word, the source's (metadata, scheduler
    config), a known official file's, or else the probe (SD2 files without metadata)."""
    detected: DetectedModel = source.detected
    if given:
        pt, reason = given, "prediction_type given by the caller"
    elif given_family and given_family != detected.family.name:
        pt, reason = fam.prediction_type, f"family={given_family!r} given by the caller"
    elif detected.prediction_type:
        pt, reason = detected.prediction_type, detected.prediction_reason
    elif known := source.known_file():
        pt, reason = known
    else:
        pt, reason = probe_prediction_type(unet)
    return with_prediction(fam, pt), reason


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
            "(e.g. zero_terminal_snr=True with guidance_rescale).", path, last)  # fmt: skip


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


def apply_config(family: Family, config: Family | Mapping | str | Path | None) -> Family:
    """The family with a non-standard architecture: a `Family`, or a dict / JSON file of the form
    {"unet": {UNetConfig fields}, "vae": {...}, "text_encoders": [{TextConfig fields}, ...]}
    (each part optional)."""
    if config is None or isinstance(config, Family):
        return config or family
    if isinstance(config, (str, Path)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"config: cannot read {config}: {e}") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a Family, a dict or a JSON path, got {type(config).__name__}")
    unknown = sorted(set(config) - {"unet", "vae", "text_encoders"})
    if unknown:
        raise ValueError(f"config: unknown sections {unknown}; expected 'unet', 'vae', 'text_encoders'")
    unet = _component_config(UNetConfig, config.get("unet")) or family.unet
    vae = _component_config(VAEConfig, config.get("vae")) or family.vae
    text = tuple(t.config for t in family.text)
    if "text_encoders" in config:
        cfgs = config["text_encoders"]
        if len(cfgs) != len(family.text):
            raise ValueError(
                f"config: family {family.name} has {len(family.text)} text encoder(s), config gives {len(cfgs)}"
            )
        text = tuple(_component_config(TextConfig, c) for c in cfgs)
    return family.with_architecture(unet, vae, text)


# ------------------------------------------------------------------------------ save
def _official_state_dict(model: Components) -> dict[str, torch.Tensor]:
    out = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in model.vae.state_dict().items()})
    for enc, use, module in zip(model.family.text, model.text_uses, model.text_encoders):
        cfg, weights = module.config, module.state_dict()
        if cfg.layers < use.layer + enc.skip:  # a diffusers SD2 tower, one block short of the official one
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


def save(model: Components, path: str | Path, format: str = "official", *, overwrite: bool = False) -> Path:
    """Export a model as an official single file (`format="official"`) or a diffusers folder.

    An official file reloads to the same tensors under the same keys as the file it was loaded
    from, less the ignored extras (`model.ignored`: EMA copies, schedule buffers, position_ids, ...).
    Nothing is overwritten unless `overwrite=True`."""
    path = Path(path)
    if format not in ("official", "diffusers"):
        raise ValueError(f"save: format must be 'official' or 'diffusers', got {format!r}")
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    metadata = {"minisd.family": model.family.name, "minisd.prediction_type": model.prediction_type}
    if format == "official":
        if path.suffix != ".safetensors":
            raise ValueError(f"save: an official single file must end in .safetensors, got {path.name}")
        _write_safetensors(_official_state_dict(model), path, metadata)
    else:
        _save_diffusers(model, path, metadata)
    return path


# diffusers' scheduler configs: what each class needs beyond the official SD config.
_SCHEDULER_EXTRAS = {"PNDMScheduler": {"skip_prk_steps": True}}


def _save_diffusers(model: Components, folder: Path, metadata: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    family = model.family

    def write(sub: str, name: str, obj: dict) -> None:
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / name).write_text(json.dumps(obj, indent=2))

    index: dict = {"_class_name": family.diffusers_pipeline, "_diffusers_version": "0.42.1",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    write("unet", "config.json", unet_to_diffusers(model.unet.config))
    _write_safetensors(unet_table(model.unet.config).to_theirs(model.unet.state_dict()),
                       folder / "unet" / "diffusion_pytorch_model.safetensors", metadata)  # fmt: skip
    write("vae", "config.json", vae_to_diffusers(model.vae.config))
    _write_safetensors(vae_table(model.vae.config).to_theirs(model.vae.state_dict()),
                       folder / "vae" / "diffusion_pytorch_model.safetensors", metadata)  # fmt: skip
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
        _write_safetensors(hf_table(cfg).to_theirs(weights), folder / sub / "model.safetensors", metadata)
        tok = sub.replace("text_encoder", "tokenizer")
        write_tokenizer(folder / tok, pad_token="<|endoftext|>" if enc.pad_token_id == EOT_TOKEN_ID else "!")
        index[sub] = ["transformers", "CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"]
        index[tok] = ["transformers", "CLIPTokenizer"]
    scheduler = {**SCHEDULER_CONFIG, "_class_name": family.diffusers_scheduler,
                 "prediction_type": model.prediction_type,
                 **_SCHEDULER_EXTRAS.get(family.diffusers_scheduler, {})}  # fmt: skip
    write("scheduler", "scheduler_config.json", scheduler)
    index["scheduler"] = ["diffusers", family.diffusers_scheduler]
    if family.y_inputs:  # SDXL pipelines
        index["force_zeros_for_empty_prompt"] = family.zero_empty_negative
        if "aesthetic_score" in family.y_inputs:
            index["requires_aesthetics_score"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
