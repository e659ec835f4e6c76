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
import fnmatch
import json
import logging
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from safetensors.torch import save_file

from .clip import TextConfig, TextTransformer, hf_table, open_clip_table
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

# Bytes per element of each safetensors dtype, to check a header against the file size.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference refuses headers over 100 MB


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the safetensors header describes it."""

    dtype: str  # safetensors name: "F16", "BF16", "F32", ...
    shape: tuple[int, ...]


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data.

    Raises `CheckpointError` naming the file for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file (truncated or empty?)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: not a valid safetensors file: the header claims {n} bytes but the file holds {size} "
                "(truncated download, or not a safetensors file at all)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            numel = 1
            for s in shape:
                numel *= s
            expected = numel * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}: {entry!r}") from None
        if end - begin != expected or begin < 0:
            raise CheckpointError(f"{path}: corrupt header: {key!r} ({dtype} {list(shape)}) needs {expected} bytes, offsets span {end - begin}")
        end_max = max(end_max, end)
        tensors[key] = TensorInfo(dtype, shape)
    if end_max > data_bytes:
        raise CheckpointError(
            f"{path}: truncated: the header promises {end_max} bytes of tensor data but the file holds {data_bytes}. "
            "Download the file again."
        )
    return SafetensorsHeader(path, tensors, dict(metadata))


# --------------------------------------------------------------------------------- detection
# Sentinel keys, one per question (diffusers' CHECKPOINT_KEY_NAMES idea, our own choices).
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)
_UNET_CROSS = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # (inner, context_dim)
_SDXL_BIGG = "conditioner.embedders.1.model.ln_final.weight"  # SDXL base: CLIP-L is embedder 0, bigG embedder 1
_REFINER_BIGG = "conditioner.embedders.0.model.ln_final.weight"  # refiner: bigG is embedder 0, alone
_SD2_OPENCLIP = "cond_stage_model.model.ln_final.weight"  # SD2: OpenCLIP-H
_SD1_CLIP = ("cond_stage_model.transformer.text_model.final_layer_norm.weight",
             # SD1 files written with transformers < 4.x lack the `text_model.` level
             "cond_stage_model.transformer.final_layer_norm.weight")

# SAI "modelspec" metadata (https://github.com/Stability-AI/ModelSpec) and what it says
# about SD2's prediction type, when a file carries it.
_V_ARCHITECTURES = ("stable-diffusion-v2-768-v",)
_EPS_ARCHITECTURES = ("stable-diffusion-v2-512",)


@dataclass
class DetectedModel:
    """What a checkpoint holds, and the evidence that decided it.

    Attributes:
        path: the file or folder.
        format: "single-file" (official layout) or "diffusers".
        family: one of `families.FAMILIES`.
        prediction_type: "epsilon", "v_prediction", or None when the header cannot tell
            (SD2 without metadata: `load` then runs the probe, see `probe_prediction_type`).
        prediction_reason: why that prediction type.
        evidence: the keys, shapes and metadata that decided the family, one line each.
        has_ema: the file also holds `model_ema.*` copies of the U-Net.
        dtypes: how many tensors of each dtype the file holds.
    """

    path: Path
    format: str
    family: str
    prediction_type: str | None
    prediction_reason: str
    evidence: list[str] = field(default_factory=list)
    has_ema: bool = False
    dtypes: dict[str, int] = field(default_factory=dict)


def _what_else(keys: list[str]) -> str:
    """A hint for a safetensors file that holds no SD U-Net: what does it look like?"""
    joined = " ".join(keys[:2000])
    if any(s in joined for s in ("lora_down", "lora_up", "lora_A", "lora_B", "lora_unet_", "lora_te")):
        return "it looks like a LoRA (low-rank adapter); load a full checkpoint and apply the LoRA to it"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "it looks like a VAE-only file; pass a full checkpoint (a standalone VAE can replace the checkpoint's VAE)"
    if all(k.startswith("first_stage_model.") for k in keys):
        return "it holds only the VAE (`first_stage_model.*`); pass a full checkpoint"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "it looks like one component of a diffusers folder; pass the folder that holds model_index.json"
    if any(".text_model." in k or k.startswith(("text_model.", "transformer.resblocks.")) for k in keys):
        return "it looks like a text encoder alone; pass a full checkpoint"
    if any("control_model." in k or "controlnet" in k for k in keys):
        return "it looks like a ControlNet; pass a full Stable Diffusion checkpoint"
    return "it is not a Stable Diffusion v1/v2/XL checkpoint"


def detect_keys(tensors: dict[str, TensorInfo], metadata: dict[str, str], path: Path) -> DetectedModel:
    """Decide the family of an official-layout checkpoint from its keys, shapes and metadata."""
    keys = list(tensors)
    if _UNET_IN not in tensors:
        raise CheckpointError(f"{path}: no Stable Diffusion U-Net (`{_UNET_IN}` is missing): {_what_else(keys)}")
    ev = []
    in_ch = tensors[_UNET_IN].shape[1]
    ev.append(f"{_UNET_IN} has shape {list(tensors[_UNET_IN].shape)}: {in_ch} input channels"
              + (" (latents + mask + masked-image latents: inpainting)" if in_ch == 9 else ""))
    if _SDXL_BIGG in tensors:
        family = "sdxl"
        ev.append(f"{_SDXL_BIGG} present: CLIP-L and OpenCLIP bigG conditioners (SDXL base)")
    elif _REFINER_BIGG in tensors:
        family = "sdxl-refiner"
        ev.append(f"{_REFINER_BIGG} present and no second embedder: OpenCLIP bigG alone (SDXL refiner)")
    elif _SD2_OPENCLIP in tensors:
        family = "sd2"
        ev.append(f"{_SD2_OPENCLIP} present: OpenCLIP ViT-H text encoder (SD2)")
    elif any(k in tensors for k in _SD1_CLIP):
        family = "sd1"
        ev.append(f"{next(k for k in _SD1_CLIP if k in tensors)} present: OpenAI CLIP ViT-L text encoder (SD1)")
    else:
        ctx = tensors[_UNET_CROSS].shape[1] if _UNET_CROSS in tensors else None
        raise CheckpointError(
            f"{path}: partial checkpoint: the U-Net is there (context width {ctx}) but no text encoder keys "
            "(`cond_stage_model.*` or `conditioner.embedders.*`) were found. minisd needs a full checkpoint."
        )
    if in_ch == 9:
        if family not in ("sd1", "sd2"):
            raise CheckpointError(f"{path}: a 9-channel (inpainting) {family} U-Net is not a family minisd knows")
        family += "-inpaint"
    elif in_ch != 4:
        raise CheckpointError(f"{path}: the U-Net takes {in_ch} input channels; minisd knows 4 (txt2img) and 9 (inpainting)")

    prediction, reason = "epsilon", "SD1 and SDXL are trained with epsilon-prediction"
    if family == "sd2":
        prediction, reason = _sd2_prediction_from_metadata(metadata)
        if prediction == "v_prediction":
            family = "sd2-v"
    elif family == "sd2-inpaint":
        reason = "the SD2 inpainting model (512-inpainting-ema) is trained with epsilon-prediction"
    dtypes = Counter(t.dtype for t in tensors.values())
    return DetectedModel(path, "single-file", family, prediction, reason, ev,
                         has_ema=any(k.startswith("model_ema.") for k in keys), dtypes=dict(dtypes))


def _sd2_prediction_from_metadata(metadata: dict[str, str]) -> tuple[str | None, str]:
    """SD2 512 (epsilon) and 768 (v) share every key and shape: only metadata (or a probe) tells."""
    pt = metadata.get("modelspec.prediction_type", "").lower()
    if pt in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", f"safetensors metadata modelspec.prediction_type={pt!r}"
    if pt in ("epsilon", "eps"):
        return "epsilon", f"safetensors metadata modelspec.prediction_type={pt!r}"
    arch = metadata.get("modelspec.architecture", "")
    if arch in _V_ARCHITECTURES:
        return "v_prediction", f"safetensors metadata modelspec.architecture={arch!r}"
    if arch in _EPS_ARCHITECTURES:
        return "epsilon", f"safetensors metadata modelspec.architecture={arch!r}"
    if metadata.get("minisd.prediction_type") in ("epsilon", "v_prediction"):
        return metadata["minisd.prediction_type"], "safetensors metadata minisd.prediction_type (written by minisd.save)"
    return None, "SD2 epsilon and v models have identical keys; the header carries no prediction type"


# ------------------------------------------------------------------------------ SD2 probe
@torch.no_grad()
def probe_prediction_type(unet: UNetModel, *, size: int = 32) -> tuple[str, str]:
    """Tell an SD2 epsilon model from a v model by one U-Net call at t = 999.

    At the last training step alphabar = 0.0047, so x_t = sqrt(alphabar) x_0 + sqrt(1 - alphabar) eps
    is 99.8 % noise. An epsilon-model must hand (nearly) its input back: for data of standard
    deviation s, the exact eps-prediction is x_t times (1 - sqrt(alphabar) k) / sqrt(1 - alphabar)
    plus a constant, with k = sqrt(alphabar) s^2 / (alphabar s^2 + 1 - alphabar), a slope of 0.96 or
    more for any s <= 3. The exact v = sqrt(alphabar) eps - sqrt(1 - alphabar) x_0 has slope
    sqrt(alphabar / (1 - alphabar)) - sqrt(1 - alphabar) k, between -0.53 and +0.07 for s <= 3.
    SD latents are scaled to unit variance (s about 1), far inside that range. So we feed pure
    Gaussian noise (seed 0, zero context), regress the output on the input, and call a slope
    above 0.5 epsilon.

    This is the technique A1111 and stable-diffusion.cpp use (one call at t=999); they threshold
    the mean of `out - x` on a constant input, a rule calibrated on the real weights. The slope
    rule follows from the two parameterizations and is tested on exact (analytic) denoisers.
    """
    p = next(unet.parameters())
    cfg = unet.config
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(1, cfg.in_channels, size, size, generator=g).to(p.device)
    context = torch.zeros(1, 77, cfg.context_dim, device=p.device, dtype=p.dtype)
    y = None if cfg.adm_in_channels is None else torch.zeros(1, cfg.adm_in_channels, device=p.device, dtype=p.dtype)
    t = torch.full((1,), 999.0, device=p.device)
    out = unet(x.to(p.dtype), t, context, y).float()
    a = x[:, : cfg.out_channels].flatten()
    a = a - a.mean()
    slope = float(((out.flatten() - out.mean()) * a).sum() / (a * a).sum())
    kind = "epsilon" if slope > 0.5 else "v_prediction"
    return kind, f"probe: one U-Net call at t=999 on noise; output/input slope {slope:.2f} ({'>' if slope > 0.5 else '<='} 0.5)"


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


def _safetensors_readers(files: list[Path], device) -> tuple[dict[str, Callable[[], torch.Tensor]], list]:
    """Readers for every tensor of some safetensors files (open handles are returned to close later)."""
    readers, handles = {}, []
    for f in files:
        h = safe_open(str(f), framework="pt", device=str(device) if torch.device(device).type != "meta" else "cpu")
        handles.append(h)
        for k in h.keys():
            if k in readers:
                raise CheckpointError(f"{f}: tensor {k!r} appears in two files of the same component")
            readers[k] = (lambda h=h, k=k: h.get_tensor(k))
    return readers, handles


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


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: pickled checkpoints can run arbitrary code when loaded, so minisd refuses them by default. "
        "Convert it once to safetensors (e.g. `minisd convert` from a trusted machine, or "
        "`safetensors.torch.save_file(torch.load(path, weights_only=True)['state_dict'], out)`), "
        "or pass allow_pickle=True to read it with torch.load(weights_only=True)."
    )


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


def detect(path: str | Path) -> DetectedModel:
    """What a checkpoint holds, from its header (or a diffusers folder's JSON files) alone."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return _detect_diffusers(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    header = read_safetensors_header(path)
    return detect_keys(header.tensors, header.metadata, path)


def _build(spec: FamilySpec) -> tuple[UNetModel, AutoencoderKL, list[TextTransformer]]:
    """Every component on the meta device: no memory, no init; the checkpoint's tensors are assigned."""
    with torch.device("meta"):
        return UNetModel(spec.unet), AutoencoderKL(spec.vae), [TextTransformer(t.config) for t in spec.text]


def official_tables(spec: FamilySpec, keys: set[str], *, use_ema: bool = False) -> dict[str, KeyTable]:
    """One table per component (U-Net, VAE, text encoders, in that order) from an official file's
    keys to our module names. `keys` (the file's) picks the HF CLIP variant without `text_model.`."""
    unet, vae, encoders = _build(spec)
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
            _refuse_pickle(path)
        tensors = _pickle_state_dict(path)
        infos = {k: TensorInfo(str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
        readers, handles, metadata = {k: (lambda v=v: v) for k, v in tensors.items()}, [], {}
    else:
        header = read_safetensors_header(path)
        infos, metadata = header.tensors, header.metadata
        readers, handles = _safetensors_readers([path], device)
    detected = detect_keys(infos, metadata, path)
    fam = family or detected.family
    spec = apply_config(family_spec(fam), config)
    keys = set(infos)

    unet, vae, encoders = _build(spec)
    if use_ema and not detected.has_ema:
        raise CheckpointError(f"{path}: use_ema=True but the file holds no `model_ema.*` weights (it is pruned)")
    tables = official_tables(spec, keys, use_ema=use_ema)
    dtype_of = lambda k: vae_dtype if k.startswith(VAE_PREFIX) else dtype  # noqa: E731
    source = _LazyTensors(readers, dtype_of, device)
    try:
        state = _convert(tables, source, keys, OFFICIAL_IGNORES, path)
    finally:
        del handles
    ignored = state.pop("__ignored__")
    modules = [unet, vae, *encoders]
    for module, (name, sd) in zip(modules, state.items()):
        load_strict(module, sd, source=f"{path} [{name}]")
    _check_schedule(source, keys, path)

    pt, reason = detected.prediction_type, detected.prediction_reason
    if family and family != detected.family:
        pt, reason = spec.prediction_type, f"family={family!r} given by the caller"
    if prediction_type:
        pt, reason = prediction_type, "prediction_type given by the caller"
    elif pt is None:
        pt, reason = probe_prediction_type(unet)
    if fam in ("sd2", "sd2-v"):
        fam = "sd2-v" if pt == "v_prediction" else "sd2"
        spec = dataclasses.replace(family_spec(fam), unet=spec.unet, vae=spec.vae, text=spec.text)
    logger.info("loaded %s as %s (%s); %s", path, fam, pt, "EMA U-Net" if use_ema else "regular U-Net weights")
    return StableDiffusion(fam, spec, unet.eval(), vae.eval(), [e.eval() for e in encoders], [t.use for t in spec.text],
                           CLIPTokenizer(), pt, reason, ignored)


def _convert(tables: dict[str, KeyTable], source: Mapping, keys: set[str], ignores, path) -> dict:
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
    all_ignores = tuple(ignores) + tuple(i for t in tables.values() for i in t.ignore)
    ignored, unexpected = {}, []
    for k in sorted(keys - used):
        reason = next((i.reason for i in all_ignores if fnmatch.fnmatchcase(k, i.pattern)), None)
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


def _check_schedule(source: Mapping, keys: set[str], path: Path) -> None:
    """Compare a stored `alphas_cumprod` with the scaled-linear schedule minisd computes."""
    if "alphas_cumprod" not in keys:
        return
    stored = source["alphas_cumprod"].detach().to("cpu", torch.float64)
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


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a diffusers folder needs it)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _component_present(index: dict, name: str) -> bool:
    """model_index.json lists `[library, class]`, or `[null, null]` for an absent component."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _detect_diffusers(folder: Path) -> DetectedModel:
    if not (folder / "model_index.json").exists():
        raise CheckpointError(
            f"{folder}: a directory without model_index.json is not a diffusers pipeline folder; "
            "pass the folder that holds model_index.json, or a single-file .safetensors checkpoint"
        )
    index = _read_json(folder / "model_index.json")
    cls = index.get("_class_name", "?")
    unet_cfg = _read_json(folder / "unet" / "config.json")
    ev = [f"model_index.json: _class_name {cls!r}"]
    has_1, has_2 = _component_present(index, "text_encoder"), _component_present(index, "text_encoder_2")
    if has_1 and has_2:
        family = "sdxl"
        ev.append("text_encoder and text_encoder_2 present (CLIP-L + bigG): SDXL base")
    elif has_2:
        family = "sdxl-refiner"
        ev.append("text_encoder_2 alone (bigG): SDXL refiner")
    elif has_1:
        act = _read_json(folder / "text_encoder" / "config.json").get("hidden_act")
        family = "sd1" if act == "quick_gelu" else "sd2"
        ev.append(f"text_encoder/config.json hidden_act {act!r}: "
                  + ("OpenAI CLIP (SD1)" if family == "sd1" else "OpenCLIP (SD2)"))
    else:
        raise CheckpointError(f"{folder}: model_index.json lists no text encoder; not a Stable Diffusion pipeline")
    in_ch = unet_cfg.get("in_channels", 4)
    ev.append(f"unet/config.json in_channels {in_ch}")
    if in_ch == 9 and family in ("sd1", "sd2"):
        family += "-inpaint"
    elif in_ch != 4:
        raise CheckpointError(f"{folder}: a {in_ch}-channel {family} U-Net is not a family minisd knows")
    sched = folder / "scheduler" / "scheduler_config.json"
    pt = _read_json(sched).get("prediction_type", "epsilon") if sched.exists() else "epsilon"
    reason = f"scheduler/scheduler_config.json prediction_type {pt!r}" if sched.exists() else "no scheduler config: epsilon"
    if pt not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{sched}: prediction_type {pt!r} is not one minisd supports (epsilon, v_prediction)")
    if family == "sd2" and pt == "v_prediction":
        family = "sd2-v"
    return DetectedModel(folder, "diffusers", family, pt, reason, ev)


def _weight_files(comp: Path, base: str, variant: str | None, allow_pickle: bool) -> list[Path]:
    """The safetensors file(s) of one component: plain, a variant (`*.fp16.safetensors`), or shards."""
    names = [f"{base}.{variant}.safetensors"] if variant else [f"{base}.safetensors", f"{base}.fp16.safetensors"]
    for name in names:
        if (comp / name).exists():
            return [comp / name]
        index = comp / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            return [comp / s for s in shards]
    pickles = [comp / f"{base}.bin"] if (comp / f"{base}.bin").exists() else []
    if pickles:
        if not allow_pickle:
            _refuse_pickle(pickles[0])
        return pickles
    raise CheckpointError(f"{comp}: no weights file ({' or '.join(names)})" + (f" for variant {variant!r}" if variant else ""))


def _component_readers(comp: Path, base: str, variant, allow_pickle, device) -> tuple[dict, Path]:
    """Readers for every tensor of one component folder, and the first weights file (for messages)."""
    files = _weight_files(comp, base, variant, allow_pickle)
    if files[0].suffix == ".bin":
        sd = _pickle_state_dict(files[0])
        return {k: (lambda v=v: v) for k, v in sd.items()}, files[0]
    for f in files:
        read_safetensors_header(f)  # clear errors for truncated or corrupt files
    readers, _handles = _safetensors_readers(files, device)
    return readers, files[0]


def _load_diffusers(folder, device, dtype, family, config, prediction_type, vae_dtype, variant, allow_pickle):
    detected = _detect_diffusers(folder)
    fam = family or detected.family
    spec = family_spec(fam)
    read = lambda name: _component_readers(folder / name, _WEIGHT_BASENAMES[name], variant, allow_pickle, device)  # noqa: E731
    readers = {name: read(name) for name in ("unet", "vae", *(t.diffusers_folder for t in spec.text))}

    # A folder carries its architecture in its config.json files (`config` still wins). Whether a
    # text encoder is projected (CLIPTextModelWithProjection) is read off its weights.
    def text_config(enc: TextEncoderSpec) -> TextConfig:
        where = folder / enc.diffusers_folder / "config.json"
        projected = "text_projection.weight" in readers[enc.diffusers_folder][0]
        return text_from_hf(_read_json(where), projection=projected, where=str(where))

    spec = dataclasses.replace(
        spec,
        unet=unet_from_diffusers(_read_json(folder / "unet" / "config.json"), str(folder / "unet" / "config.json")),
        vae=vae_from_diffusers(_read_json(folder / "vae" / "config.json"), str(folder / "vae" / "config.json")),
        text=tuple(dataclasses.replace(enc, config=text_config(enc)) for enc in spec.text),
    )
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
        index["force_zeros_for_empty_prompt"] = spec.name == "sdxl"
        if spec.name == "sdxl-refiner":
            index["requires_aesthetics_score"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
