"""What does a checkpoint hold? The family from the header (or a folder's JSON files); the
prediction type from metadata, a known file hash, or one U-Net call.

- `read_safetensors_header` parses and validates the safetensors header (8-byte length,
  JSON, entries, offsets), so a truncated, corrupt or malformed file is named before
  anything is read; `detect` and `load` both read headers through it.
- `open_regular` and `read_json` are the only ways files are opened: a FIFO or a device
  is refused instead of blocking, and inside a diffusers folder nothing that resolves
  outside the folder is opened (`check_inside`).
- `detect_keys` decides the family of an official single file from sentinel keys and
  shapes (diffusers' `CHECKPOINT_KEY_NAMES` idea) and records the evidence;
  `detect_diffusers` does the same for a diffusers folder from its JSON files.
- SD2's epsilon (512) and v (768) models share every key and shape. Metadata tells when
  present; otherwise `detect` leaves the prediction type open, and loading tries the
  file's SHA-256 against `KNOWN_SHA256` and then `probe.probe_prediction_type` (one U-Net
  call), which may answer "unsure" (then the family's default stands).
- `what_else` says what a file that is not the kind asked for looks like (a LoRA, an
  embedding, a VAE, a checkpoint, ...), from the one table `WHAT_ELSE`; every loader uses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .clip import CLIP_VIT_L14, OPENCLIP_VIT_BIGG14, OPENCLIP_VIT_H14
from .diffusers_format import json_field
from .families import (
    FAMILIES,
    PREDICTION_TYPES,
    Family,
    TextEncoderSpec,
    family_spec,
    inpainting_variant,
    prediction_is_ambiguous,
    with_prediction,
    with_zero_terminal_snr,
)
from .keymap import CheckpointError
from .known_files import KNOWN_SHA256, KnownFile, _known  # noqa: F401  (re-exported from their old home)
from .probe import (  # noqa: F401  (re-exported from their old home)
    PROBE_EPSILON_SLOPES,
    PROBE_MAX_RESIDUAL,
    PROBE_SIZE,
    PROBE_V_SLOPES,
    ProbeResult,
    probe_prediction_type,
)

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
# The safetensors dtypes that hold real numbers: what a weight may be stored as.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference refuses headers over 100 MB
# JSON files of a diffusers folder (configs, shard indexes) are kilobytes; the largest real shard
# index lists a few thousand keys (< 1 MB). Anything past this bound is not one, and is not read.
_MAX_JSON = 64 * 1024 * 1024


def _short(value: object, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: error messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ------------------------------------------------------------------------------ opening files
_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _not_regular(path: Path, mode: int) -> CheckpointError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return CheckpointError(
        f"{path}: is {kind}, not a regular file; minisd reads checkpoints and configs only from regular files "
        "(reading a pipe or device could block forever). Save the data to a file and pass that."
    )


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for binary reading, or raise `CheckpointError` naming the path.

    A FIFO or a device would block `open` or `read` (a FIFO without a writer never returns), so
    the kind of file is checked before opening (`stat`) and again on the open descriptor
    (`fstat`, in case the path was swapped in between); the open itself is non-blocking."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open it ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_inside(path: Path, folder: Path) -> Path:
    """`path` itself, if it resolves (through symlinks and `..`) to a place inside `folder`; else
    a `CheckpointError`. A diffusers folder names files (shard indexes, sub-folders) that must not
    lead anywhere else on the machine. The one exception is the Hugging Face hub cache, whose
    snapshot folders (`<repo>/snapshots/<revision>/`) link every file to `<repo>/blobs/`."""
    root = folder.resolve()
    roots = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in roots):
        raise CheckpointError(
            f"{path}: resolves to {real}, outside the folder {folder}; minisd opens no file outside the folder "
            "it loads (a path-traversal guard). Copy the file into the folder if it belongs there."
        )
    return path


def read_json(path: Path, *, folder: Path | None = None) -> dict:
    """A JSON object from a regular file (inside `folder` when given), or a `CheckpointError`
    naming the file: missing, not a regular file, too large, not JSON, not an object."""
    if folder is not None:
        check_inside(path, folder)
    if not path.exists():
        raise CheckpointError(f"{path}: missing" + (" (a diffusers folder needs it)" if folder is not None else ""))
    with open_regular(path) as f:
        raw = f.read(_MAX_JSON + 1)
    if len(raw) > _MAX_JSON:
        raise CheckpointError(f"{path}: over {_MAX_JSON >> 20} MB, too large to be a config or index JSON file")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object {{...}}, got a JSON {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------ safetensors header
@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the safetensors header describes it."""

    dtype: str  # safetensors name: "F16", "BF16", "F32", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """The number of elements (the product of `shape`)."""
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    # where each tensor's bytes begin in the file (8 + header length + data_offsets[0]), for plain reads
    offsets: dict[str, int] = field(default_factory=dict)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"duplicate key(s) {_short(twice)}")
    return dict(pairs)


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data.

    Raises `CheckpointError` naming the file and the problem for a missing, non-regular,
    truncated or corrupt file, and for every header the safetensors reference would refuse:
    entries that are not {dtype, shape, data_offsets}, unknown dtypes, non-integer or negative
    shapes and offsets, sizes that disagree with the dtype and shape, overlapping or
    non-contiguous data, bytes past the last tensor, and metadata that is not strings."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
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
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt header: __metadata__ must be an object, got {_short(metadata)}")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise CheckpointError(
                f"{path}: corrupt header: __metadata__[{k!r}] must be a string (safetensors metadata maps strings "
                f"to strings), got {type(v).__name__} {_short(v)}"
            )
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        info, begin, end = _header_entry(path, key, entry)
        tensors[key] = info
        spans.append((begin, end, key))
    _check_data_layout(path, spans, size - 8 - n)
    return SafetensorsHeader(path, tensors, dict(metadata), {key: 8 + n + begin for begin, _, key in spans})


def _header_entry(path: Path, key: str, entry: object) -> tuple[TensorInfo, int, int]:
    """One tensor's entry, checked: its info and its [begin, end) byte span."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt header entry for {key!r}: {problem}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad(f"expected an object with dtype, shape and data_offsets, got {_short(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise bad(f"dtype {_short(dtype)} is not one of {sorted(_DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(_is_int(s) for s in shape):
        raise bad(f"shape must be a list of integers, got {_short(shape)}")
    if any(s < 0 for s in shape):
        raise bad(f"shape {_short(shape)} has a negative dimension")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad(f"data_offsets must be two integers [begin, end], got {_short(offsets)}")
    begin, end = offsets
    info = TensorInfo(dtype, tuple(shape))
    expected = info.numel * _DTYPE_BYTES[dtype]
    if begin < 0 or end - begin != expected:
        raise CheckpointError(
            f"{path}: corrupt header: {key!r} ({dtype} {_short(shape)}) needs {expected} bytes, "
            f"its data_offsets [{begin}, {end}] span {end - begin}"
        )
    return info, begin, end


def _check_data_layout(path: Path, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors' byte spans tile the data section exactly, as the safetensors reference requires:
    no overlap (two tensors sharing bytes), no gap, and nothing past the last tensor."""
    pos, previous = 0, None
    for begin, end, key in sorted(spans):
        if begin < pos:
            raise CheckpointError(f"{path}: corrupt header: the data of {key!r} overlaps that of {previous!r}")
        if begin > pos:
            raise CheckpointError(
                f"{path}: corrupt header: {begin - pos} unclaimed bytes before {key!r} (the data must be contiguous)"
            )
        pos, previous = end, key
    if pos > data_bytes:
        raise CheckpointError(
            f"{path}: truncated: the header promises {pos} bytes of tensor data but the file holds {data_bytes}. "
            "Download the file again."
        )
    if pos < data_bytes:
        raise CheckpointError(
            f"{path}: corrupt: {data_bytes - pos} bytes follow the last tensor's data (the header accounts for "
            f"{pos} of {data_bytes}); the file is damaged or was not written by safetensors"
        )


# --------------------------------------------------------------------------------- detection
# Sentinel keys, one per question (diffusers' CHECKPOINT_KEY_NAMES idea, our own choices).
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)
_UNET_PREFIX = "model.diffusion_model."
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


@dataclass(frozen=True)
class FileKind:
    """A kind of file minisd may be handed in place of another: the keys that mark it, what it is,
    and what to do with it. `use` is what it is for ("checkpoint", "lora", "embedding", "vae", or
    none of those), so a loader can skip its own kind."""

    use: str
    what: str
    todo: str
    prefixes: tuple[str, ...] = ()  # a key that starts with one of these marks the kind
    contains: tuple[str, ...] = ()  # so does a key that contains one of these

    def marker(self, keys: Iterable[str]) -> str | None:
        """The first key that marks this kind, or None."""
        return next((k for k in keys if k.startswith(self.prefixes) or any(s in k for s in self.contains)), None)


_AS_VAE = "pass it as a VAE (`minisd.load(checkpoint, vae=...)` or `sd.load_vae`)"
_AS_CHECKPOINT = "load it with minisd.load"
_AS_EMBEDDING = "load it with `sd.load_embedding`"
# The one table of what else a file may be, first match wins: more specific kinds before the
# ones whose keys they also hold (a full checkpoint holds a text encoder and a VAE).
WHAT_ELSE: tuple[FileKind, ...] = (
    FileKind("lora", "a LoRA (low-rank adapter)", "load a full checkpoint and apply the LoRA to it (`sd.load_lora`)",
             prefixes=("lora_unet_", "lora_te"), contains=("lora_down", "lora_up", "lora_A", "lora_B", "lora.down")),
    FileKind("controlnet", "a ControlNet", "minisd runs no ControlNet; pass a full Stable Diffusion checkpoint",
             contains=("control_model.", "controlnet")),
    FileKind("checkpoint", "a full Stable Diffusion checkpoint (official layout)", _AS_CHECKPOINT,
             prefixes=(_UNET_PREFIX,)),
    FileKind("checkpoint", "a full SDXL checkpoint (official layout)", _AS_CHECKPOINT,
             prefixes=("conditioner.embedders.",)),
    FileKind("text encoder", "a text encoder alone (transformers' CLIPTextModel or open_clip)",
             "pass the full checkpoint, or the diffusers folder it belongs to",
             prefixes=("text_model.", "transformer.resblocks."), contains=(".text_model.",)),
    FileKind("embedding", "an A1111 textual-inversion embedding", _AS_EMBEDDING,
             prefixes=("string_to_param", "emb_params")),
    FileKind("embedding", "an SDXL textual-inversion embedding", _AS_EMBEDDING, prefixes=("clip_l", "clip_g")),
    FileKind("vae", "the VAE of a checkpoint alone (it holds only the VAE, `first_stage_model.*`)", _AS_VAE,
             prefixes=("first_stage_model.",)),
    FileKind("vae", "a standalone VAE (a VAE-only file)", _AS_VAE,
             prefixes=("encoder.conv_in.", "decoder.conv_in.", "encoder.down", "decoder.up")),
    FileKind("diffusers component", "one component of a diffusers folder (a U-Net's weights alone)",
             "pass the folder that holds model_index.json", prefixes=("down_blocks.", "conv_in.")),
)  # fmt: skip


def what_else(keys: Iterable[str], *, asked: str, otherwise: str = "it is no other kind of file minisd reads") -> str:
    """A hint for a file that is not the `asked` kind ("checkpoint", "lora", "embedding", "vae"):
    what it looks like (`WHAT_ELSE`, skipping the asked kind) and what to do; `otherwise` when nothing matches."""
    keys = list(keys)
    for kind in WHAT_ELSE:
        key = None if kind.use == asked else kind.marker(keys)
        if key is not None:
            return f"it looks like {kind.what}, from its key {key!r}: {kind.todo}"
    return otherwise


def _sentinel(tensors: dict[str, TensorInfo], key: str, rank: int, what: str, path: Path) -> TensorInfo:
    info = tensors[key]
    if len(info.shape) != rank:
        raise CheckpointError(f"{path}: `{key}` has shape {list(info.shape)}; a Stable Diffusion file has {what} there")
    return info


# What each text encoder is, for messages about files that lack one.
_ENCODER_NAMES = {CLIP_VIT_L14: "OpenAI CLIP ViT-L/14", OPENCLIP_VIT_H14: "OpenCLIP ViT-H/14",
                  OPENCLIP_VIT_BIGG14: "OpenCLIP ViT-bigG/14"}  # fmt: skip


def _missing_text_encoders(keys: list[str], unet_context: int | None, path: Path) -> CheckpointError:
    """The error for a file with a U-Net and not every text encoder of any family: the families'
    text-encoder prefixes (`TextEncoderSpec.official_prefix`) are the sentinel table here. When
    some of a family's encoders are there and others not, the missing ones are named."""

    def held(enc: TextEncoderSpec) -> bool:
        return any(k.startswith(enc.official_prefix) for k in keys)

    def named(encoders: list[TextEncoderSpec]) -> str:
        return ", ".join(f"{_ENCODER_NAMES.get(t.config, t.layout)} (`{t.official_prefix}*`)" for t in encoders)

    for fam in FAMILIES.values():
        present, missing = [t for t in fam.text if held(t)], [t for t in fam.text if not held(t)]
        if present and missing:
            return CheckpointError(
                f"{path}: partial {fam.name} checkpoint: the U-Net (context width {unet_context}) and "
                f"{named(present)} are there, but its text encoder {named(missing)} is missing. "
                "minisd needs a full checkpoint."
            )
    return CheckpointError(
        f"{path}: partial checkpoint: the U-Net is there (context width {unet_context}) but no text encoder keys "
        "(`cond_stage_model.*` or `conditioner.embedders.*`) were found. minisd needs a full checkpoint."
    )


def detect_keys(tensors: dict[str, TensorInfo], metadata: dict[str, str], path: Path) -> DetectedModel:
    """Decide the family of an official-layout checkpoint from its keys, shapes and metadata."""
    keys = list(tensors)
    if _UNET_IN not in tensors:
        hint = what_else(keys, asked="checkpoint", otherwise="it is not a Stable Diffusion v1/v2/XL checkpoint")
        raise CheckpointError(f"{path}: no Stable Diffusion U-Net (`{_UNET_IN}` is missing): {hint}")
    ev = []
    unet_in = _sentinel(tensors, _UNET_IN, 4, "a 3x3 convolution (out, in, 3, 3)", path)
    in_ch = unet_in.shape[1]
    ev.append(
        f"{_UNET_IN} has shape {list(unet_in.shape)}: {in_ch} input channels"
        + (" (latents + mask + masked-image latents: inpainting)" if in_ch == 9 else "")
    )
    found = next((entry for entry in _TEXT_SENTINELS if entry[0] in tensors), None)
    if found is None:
        # the context width: any cross-attention key of the U-Net (SDXL has none at level 0)
        ctx = next((info.shape[1] for k, info in tensors.items() if k.startswith(_UNET_PREFIX)
                    and k.endswith(".attn2.to_k.weight") and len(info.shape) == 2), None)  # fmt: skip
        raise _missing_text_encoders(keys, ctx, path)
    key, name, what = found
    family = family_spec(name)
    ev.append(f"{key} present: {what}")
    if in_ch == 9:
        family = inpainting_variant(family, str(path))
    elif in_ch != 4:
        raise CheckpointError(
            f"{path}: the U-Net takes {in_ch} input channels; minisd knows 4 (txt2img) and 9 (inpainting)"
        )

    prediction, reason = _prediction_from_markers(tensors, metadata, path)
    if prediction is None:
        prediction, reason = _prediction_from_metadata(metadata)
    if prediction is None and not prediction_is_ambiguous(family):
        prediction, reason = family.prediction_type, f"{family.name} models are trained with {family.prediction_type}"
    if prediction is not None:
        family = with_prediction(family, prediction)
    if _zero_terminal_snr(tensors, metadata, prediction):
        family = with_zero_terminal_snr(family)
        reason += f"; {_ZTSNR} present: trained with zero terminal SNR (rescaled betas, trailing timesteps)"
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


# Marker keys of v-prediction fine-tunes (NoobAI-XL v-pred and other SDXL merges): empty tensors at the
# top level. ComfyUI reads them (comfy/supported_models.py, `SDXL.model_type`): `v_pred` means
# v-prediction, and `ztsnr` beside it the zero-terminal-SNR schedule; `ztsnr` alone means nothing.
_V_PRED, _ZTSNR = "v_pred", "ztsnr"
MARKER_KEYS = (_V_PRED, _ZTSNR)


def _prediction_from_markers(tensors: dict[str, TensorInfo], metadata: dict[str, str], path: Path) -> tuple[
        str | None, str]:  # fmt: skip
    """v-prediction from the `v_pred` marker key, checked against the metadata when both speak."""
    if _V_PRED not in tensors:
        return None, ""
    said, _ = _prediction_from_metadata(metadata)
    if said == "epsilon":
        raise CheckpointError(
            f"{path}: contradicts itself: the marker key {_V_PRED!r} says v-prediction, its metadata says epsilon "
            "(modelspec.prediction_type). Pass prediction_type= to choose."
        )
    return "v_prediction", f"marker key {_V_PRED!r} present (ComfyUI's v-prediction marker)"


def _zero_terminal_snr(tensors: dict[str, TensorInfo], metadata: dict[str, str], prediction: str | None) -> bool:
    """Trained on the zero-terminal-SNR schedule: the `ztsnr` marker, read only beside v-prediction
    (as ComfyUI does), or the `minisd.zero_terminal_snr` metadata `minisd.save` writes."""
    if prediction != "v_prediction":
        return False
    return _ZTSNR in tensors or metadata.get("minisd.zero_terminal_snr") == "true"


def _prediction_from_metadata(metadata: dict[str, str]) -> tuple[str | None, str]:
    """The prediction type the metadata states, if any: SAI ModelSpec's `modelspec.prediction_type`
    ("epsilon" or "v", as kohya's sai_model_spec writes it), SD2's `modelspec.architecture`, or the
    `minisd.prediction_type` that `minisd.save` writes. (SD2 512 and 768 share every key and shape:
    for them only metadata, a known hash or the probe tells.)"""
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
    return None, "the header carries no prediction type (SD2 epsilon and v models have identical keys)"


def refuse_pickle(path: Path) -> None:
    """Raise CheckpointError for the pickled checkpoint at `path`, saying how to convert or allow it."""
    raise CheckpointError(
        f"{path}: pickled checkpoints can run arbitrary code when loaded, so minisd refuses them by default. "
        "Convert it once to safetensors (e.g. `minisd convert` from a trusted machine, or "
        "`safetensors.torch.save_file(torch.load(path, weights_only=True)['state_dict'], out)`), "
        "or pass allow_pickle=True to read it with torch.load(weights_only=True)."
    )


# The model_index.json entries minisd reads: `[library, class]`, or `[null, null]` for an absent component.
_INDEX_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")


def _component_present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return entry is not None and entry[1] is not None


def detect_diffusers(folder: Path) -> DetectedModel:
    """The family of a diffusers folder, from model_index.json and the components' config.json files.
    Every field read is checked for its JSON type and range (`diffusers_format.json_field`)."""
    where = folder / "model_index.json"
    if not where.exists():
        raise CheckpointError(
            f"{folder}: a directory without model_index.json is not a diffusers pipeline folder; "
            "pass the folder that holds model_index.json, or a single-file .safetensors checkpoint"
        )
    index = read_json(where, folder=folder)
    cls = json_field(index, "_class_name", where, "str", "?")
    for name in _INDEX_COMPONENTS:
        json_field(index, name, where, "component", None)
    unet_where = folder / "unet" / "config.json"
    unet_cfg = read_json(unet_where, folder=folder)
    ev = [f"model_index.json: _class_name {cls!r}"]
    has_1, has_2 = _component_present(index, "text_encoder"), _component_present(index, "text_encoder_2")
    if has_1 and has_2:
        name, what = "sdxl", "text_encoder and text_encoder_2 present (CLIP-L + bigG): SDXL base"
    elif has_2:
        name, what = "sdxl-refiner", "text_encoder_2 alone (bigG): SDXL refiner"
    elif has_1:
        text_where = folder / "text_encoder" / "config.json"
        # OpenAI CLIP's activation is quick_gelu (transformers' default); OpenCLIP's is gelu
        act = json_field(read_json(text_where, folder=folder), "hidden_act", text_where, "str", "quick_gelu")
        name, what = ("sd1", "OpenAI CLIP (SD1)") if act == "quick_gelu" else ("sd2", "OpenCLIP (SD2)")
        what = f"text_encoder/config.json hidden_act {act!r}: {what}"
    else:
        raise CheckpointError(f"{folder}: model_index.json lists no text encoder; not a Stable Diffusion pipeline")
    family = family_spec(name)
    ev.append(what)
    in_ch = json_field(unet_cfg, "in_channels", unet_where, "int", 4, low=1)
    ev.append(f"unet/config.json in_channels {in_ch}")
    if in_ch == 9:
        family = inpainting_variant(family, str(folder))
    elif in_ch != 4:
        raise CheckpointError(f"{folder}: a {in_ch}-channel {family.name} U-Net is not a family minisd knows")
    sched = folder / "scheduler" / "scheduler_config.json"
    zsnr = False
    if sched.exists():
        sched_cfg = read_json(sched, folder=folder)
        pt = json_field(sched_cfg, "prediction_type", sched, "str", "epsilon")
        zsnr = json_field(sched_cfg, "rescale_betas_zero_snr", sched, "bool", False)
        reason = f"scheduler/scheduler_config.json prediction_type {pt!r}"
    else:
        pt, reason = "epsilon", "no scheduler config: epsilon"
    if pt not in PREDICTION_TYPES:
        raise CheckpointError(f"{sched}: prediction_type {pt!r} is not one minisd supports {PREDICTION_TYPES}")
    family = with_prediction(family, pt)
    if zsnr and pt == "v_prediction":  # as the markers of a single file (`_zero_terminal_snr`)
        family = with_zero_terminal_snr(family)
        reason += ", rescale_betas_zero_snr true: zero terminal SNR (rescaled betas, trailing timesteps)"
    return DetectedModel(folder, "diffusers", family, pt, reason, ev)


def detect(path: str | Path) -> DetectedModel:
    """What a checkpoint holds, from its header (or a diffusers folder's JSON files) alone: the
    prediction type of an SD2 file without metadata stays None (loading decides it, see above).

        minisd.detect("v1-5-pruned-emaonly.safetensors")   # family "sd1", with the evidence for it
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return detect_diffusers(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    header = read_safetensors_header(path)
    return detect_keys(header.tensors, header.metadata, path)


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    """The SHA-256 of the file at `path` as a hex string, read `chunk` bytes at a time."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
