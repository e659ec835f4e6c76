"""What does a checkpoint hold? The family from the header (or a folder's JSON files); the
prediction type from metadata, a known file hash, or one U-Net call.

- `read_safetensors_header` parses and validates the safetensors header (8-byte length,
  JSON, offsets), so a truncated or corrupt file is named before anything is read.
- `detect_keys` decides the family of an official single file from sentinel keys and
  shapes (diffusers' `CHECKPOINT_KEY_NAMES` idea) and records the evidence;
  `detect_diffusers` does the same for a diffusers folder from its JSON files.
- SD2's epsilon (512) and v (768) models share every key and shape. Metadata tells when
  present; otherwise `detect` leaves the prediction type open, and loading tries the
  file's SHA-256 against `KNOWN_SHA256` and then `probe_prediction_type` (one U-Net call).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import (
    PREDICTION_TYPES,
    Family,
    family_spec,
    inpainting_variant,
    prediction_is_ambiguous,
    with_prediction,
)
from .keymap import CheckpointError
from .unet import UNetModel

# Bytes per element of each safetensors dtype, to check a header against the file size.
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
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
            raise CheckpointError(
                f"{path}: corrupt header: {key!r} ({dtype} {list(shape)}) needs {expected} bytes, "
                f"offsets span {end - begin}"
            )
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
_SD1_CLIP = "cond_stage_model.transformer.text_model.final_layer_norm.weight"  # SD1: OpenAI CLIP-L
# The text-encoder key that tells each family, tried in this order (an SDXL base file holds both embedders).
_TEXT_SENTINELS = (
    (_SDXL_BIGG, "sdxl", "CLIP-L and OpenCLIP bigG conditioners (SDXL base)"),
    (_REFINER_BIGG, "sdxl-refiner", "OpenCLIP bigG alone, no second embedder (SDXL refiner)"),
    (_SD2_OPENCLIP, "sd2", "OpenCLIP ViT-H text encoder (SD2)"),
    (_SD1_CLIP, "sd1", "OpenAI CLIP ViT-L text encoder (SD1)"),
    # SD1 files written with transformers < 4.x lack the `text_model.` level
    (_SD1_CLIP.replace("text_model.", ""), "sd1", "OpenAI CLIP ViT-L text encoder (SD1, transformers 3.x names)"),
)

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
        family: the family record (`families.FAMILIES`).
        prediction_type: "epsilon", "v_prediction", or None when the header cannot tell
            (SD2 without metadata: `load` then runs the probe, see `probe_prediction_type`).
        prediction_reason: why that prediction type.
        evidence: the keys, shapes and metadata that decided the family, one line each.
        has_ema: the file also holds `model_ema.*` copies of the U-Net.
        dtypes: how many tensors of each dtype the file holds.
    """

    path: Path
    format: str
    family: Family
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
        return (
            "it looks like a VAE-only file; pass a full checkpoint (a standalone VAE can replace the checkpoint's VAE)"
        )
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
    ev.append(
        f"{_UNET_IN} has shape {list(tensors[_UNET_IN].shape)}: {in_ch} input channels"
        + (" (latents + mask + masked-image latents: inpainting)" if in_ch == 9 else "")
    )
    found = next((entry for entry in _TEXT_SENTINELS if entry[0] in tensors), None)
    if found is None:
        ctx = tensors[_UNET_CROSS].shape[1] if _UNET_CROSS in tensors else None
        raise CheckpointError(
            f"{path}: partial checkpoint: the U-Net is there (context width {ctx}) but no text encoder keys "
            "(`cond_stage_model.*` or `conditioner.embedders.*`) were found. minisd needs a full checkpoint."
        )
    key, name, what = found
    family = family_spec(name)
    ev.append(f"{key} present: {what}")
    if in_ch == 9:
        family = inpainting_variant(family, str(path))
    elif in_ch != 4:
        raise CheckpointError(
            f"{path}: the U-Net takes {in_ch} input channels; minisd knows 4 (txt2img) and 9 (inpainting)"
        )

    if prediction_is_ambiguous(family):
        prediction, reason = _prediction_from_metadata(metadata)
    else:
        prediction, reason = family.prediction_type, f"{family.name} models are trained with {family.prediction_type}"
    if prediction is not None:
        family = with_prediction(family, prediction)
    dtypes = Counter(t.dtype for t in tensors.values())
    return DetectedModel(
        path,
        "single-file",
        family,
        prediction,
        reason,
        ev,
        has_ema=any(k.startswith("model_ema.") for k in keys),
        dtypes=dict(dtypes),
    )


def _prediction_from_metadata(metadata: dict[str, str]) -> tuple[str | None, str]:
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
        return metadata[
            "minisd.prediction_type"
        ], "safetensors metadata minisd.prediction_type (written by minisd.save)"
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
    return (
        kind,
        f"probe: one U-Net call at t=999 on noise; output/input slope {slope:.2f} ({'>' if slope > 0.5 else '<='} 0.5)",
    )


def refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: pickled checkpoints can run arbitrary code when loaded, so minisd refuses them by default. "
        "Convert it once to safetensors (e.g. `minisd convert` from a trusted machine, or "
        "`safetensors.torch.save_file(torch.load(path, weights_only=True)['state_dict'], out)`), "
        "or pass allow_pickle=True to read it with torch.load(weights_only=True)."
    )


def read_json(path: Path) -> dict:
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


def detect_diffusers(folder: Path) -> DetectedModel:
    """The family of a diffusers folder, from model_index.json and the components' config.json files."""
    if not (folder / "model_index.json").exists():
        raise CheckpointError(
            f"{folder}: a directory without model_index.json is not a diffusers pipeline folder; "
            "pass the folder that holds model_index.json, or a single-file .safetensors checkpoint"
        )
    index = read_json(folder / "model_index.json")
    cls = index.get("_class_name", "?")
    unet_cfg = read_json(folder / "unet" / "config.json")
    ev = [f"model_index.json: _class_name {cls!r}"]
    has_1, has_2 = _component_present(index, "text_encoder"), _component_present(index, "text_encoder_2")
    if has_1 and has_2:
        name, what = "sdxl", "text_encoder and text_encoder_2 present (CLIP-L + bigG): SDXL base"
    elif has_2:
        name, what = "sdxl-refiner", "text_encoder_2 alone (bigG): SDXL refiner"
    elif has_1:
        act = read_json(folder / "text_encoder" / "config.json").get("hidden_act")
        # OpenAI CLIP's activation is quick_gelu; OpenCLIP's is gelu
        name, what = ("sd1", "OpenAI CLIP (SD1)") if act == "quick_gelu" else ("sd2", "OpenCLIP (SD2)")
        what = f"text_encoder/config.json hidden_act {act!r}: {what}"
    else:
        raise CheckpointError(f"{folder}: model_index.json lists no text encoder; not a Stable Diffusion pipeline")
    family = family_spec(name)
    ev.append(what)
    in_ch = unet_cfg.get("in_channels", 4)
    ev.append(f"unet/config.json in_channels {in_ch}")
    if in_ch == 9:
        family = inpainting_variant(family, str(folder))
    elif in_ch != 4:
        raise CheckpointError(f"{folder}: a {in_ch}-channel {family.name} U-Net is not a family minisd knows")
    sched = folder / "scheduler" / "scheduler_config.json"
    pt = read_json(sched).get("prediction_type", "epsilon") if sched.exists() else "epsilon"
    reason = (
        f"scheduler/scheduler_config.json prediction_type {pt!r}" if sched.exists() else "no scheduler config: epsilon"
    )
    if pt not in PREDICTION_TYPES:
        raise CheckpointError(f"{sched}: prediction_type {pt!r} is not one minisd supports {PREDICTION_TYPES}")
    family = with_prediction(family, pt)
    return DetectedModel(folder, "diffusers", family, pt, reason, ev)


def detect(path: str | Path) -> DetectedModel:
    """What a checkpoint holds, from its header (or a diffusers folder's JSON files) alone: the
    prediction type of an SD2 file without metadata stays None (loading decides it, see above)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return detect_diffusers(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    header = read_safetensors_header(path)
    return detect_keys(header.tensors, header.metadata, path)


# SHA-256 of the official releases, as published with the files (the Hugging Face LFS pointers of
# runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1(-base) and
# stabilityai/stable-diffusion-xl-base/refiner-1.0). They cannot be re-checked offline here; a wrong
# entry could only make `info` call an official file unknown, never decide a family.
KNOWN_SHA256 = {
    "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa": ("v1-5-pruned-emaonly.safetensors", "sd1"),
    "1a189f0be69d6106a48548e7626207dddd7042a418dbf372cefd05e0cdba61b6": ("v1-5-pruned.safetensors", "sd1"),
    "ad2a33c361c1f593c4a1fb32ea81afce2b5bb7d1983c6b94793a26a3b54b08a0": ("v2-1_768-ema-pruned.safetensors", "sd2-v"),
    "88ecb782561455673c4b78d05093494b9c539fc6bfc08f3a9a4a0dd7b0b10f36": ("v2-1_512-ema-pruned.safetensors", "sd2"),
    "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b": ("sd_xl_base_1.0.safetensors", "sdxl"),
    "7440042bbdc8a24813002c09b6b69b64dc90fded4472613437b7f55f9b7d9c5f": (
        "sd_xl_refiner_1.0.safetensors",
        "sdxl-refiner",
    ),
}


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
