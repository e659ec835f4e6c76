"""The two kinds of checkpoint source, read the same way: an official single file and a diffusers folder.

Each source says which family it holds (`detection`), what architecture it declares
(`architecture`: the presets, a folder's config.json files, or the `minisd.config` a file
written by `minisd.save` records), and hands its tensors to the loader as `Part`s: a
reader per tensor under the source's own names, with the key tables that map them to
ours. Nothing is read until the loader asks; reading copies each tensor out of the file
(unless `mmap=True`), so a loaded model never shares memory with the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .clip import TextConfig
from .detection import (
    FLOAT_DTYPES,
    KNOWN_SHA256,
    PICKLE_SUFFIXES,
    SafetensorsHeader,
    TensorInfo,
    check_inside,
    detect_diffusers,
    detect_keys,
    open_regular,
    read_json,
    read_safetensors_header,
    refuse_pickle,
    sha256,
)
from .diffusers_format import (
    json_field,
    text_from_hf,
    unet_from_diffusers,
    unet_table,
    unet_text_time,
    vae_from_diffusers,
    vae_table,
)
from .families import (
    UNET_PREFIX,
    VAE_PREFIX,
    Family,
    TextEncoderSpec,
)
from .keymap import CheckpointError, KeyTable
from .layouts import (
    OFFICIAL_EXTRAS,
    Size,
    _ema_key,
    component_names,
    held_size,
    official_sizes,
    official_tables,
    text_table,
)
from .schedules import ddpm_alphas_cumprod
from .unet import UNetConfig
from .vae import VAEConfig

logger = logging.getLogger(__name__)

Reader = Callable[[], torch.Tensor]  # reads one tensor from the file when called


# ------------------------------------------------------------------------------ reading tensors
# torch's dtype for each safetensors dtype name (the header's `TensorInfo.dtype`)
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                 "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                 "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}  # fmt: skip


@dataclass
class _Tensors:
    """The tensors of one file (or set of shards): the header's word on each, and readers (nothing
    is read until a reader is called).

    `readers` return each tensor as the source holds it: a view of the file's memory map
    (safetensors: `mapped`), or the tensor itself (a pickle, already in memory). `copies` (mapped
    sources only) read a tensor into fresh memory of its own with plain positioned reads
    (`os.preadv`), never through the map: the file's pages then stay in the page cache, outside the
    process's resident memory, so a copied model costs RAM once, not twice."""

    infos: dict[str, TensorInfo]
    readers: dict[str, Reader]
    mapped: bool
    copies: dict[str, Reader] = field(default_factory=dict)


# Threads that read a copied checkpoint: reading 2 GB into fresh memory is bound by page faults and
# memory copies, which run in parallel (docs/performance.md, "Loading").
READ_THREADS = min(4, os.cpu_count() or 1)


class LazyTensors(Mapping):
    """A read-on-access view of checkpoint tensors that casts and moves each tensor once, as it
    is read, so that only one copy of the weights ever exists.

    With `copy`, every tensor is read into memory of its own (`_Tensors.copies`): the model owns its
    memory, and the file may change or vanish afterwards. Off the CPU, each tensor then goes from the
    file to the device through a host buffer of its own size: there is never a host copy of the whole
    model, and the file's pages stay out of the process's memory. Without `copy` (`mmap=True`), on the
    CPU, a tensor in the wanted dtype stays a view of the file's memory map (no copy at all), and one
    that needs a cast is cast straight from the map, in one pass.
    On the meta device nothing is read: each tensor is an empty meta tensor of the header's shape.

    `prefetch` reads the copies on several threads ahead of the caller (positioned reads, page faults
    and casts release the GIL), each tensor still read once, into its own memory."""

    def __init__(self, tensors: _Tensors, dtype: torch.dtype, device: torch.device, *, copy: bool) -> None:
        self._tensors, self._dtype, self._device, self._copy = tensors, dtype, device, copy
        self._pending: dict[str, Future] = {}

    def prefetch(self, keys: Iterable[str], workers: int | None = None) -> None:
        """Start reading `keys` on `workers` threads, in order (a no-op unless tensors are copied out of a
        mapped file); `self[key]` then waits for its own. Peak memory is unchanged: every tensor read is
        one the caller keeps (`KeyTable.to_ours` holds them all until they are assigned)."""
        workers = READ_THREADS if workers is None else workers
        if workers < 2 or self._device.type == "meta" or not (self._tensors.copies and self._copy):
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="minisd-read")
        self._pending = {k: pool.submit(self._read, k) for k in keys}
        pool.shutdown(wait=False)  # the queued reads go on; the threads end with them

    def __getitem__(self, key: str) -> torch.Tensor:
        pending = self._pending.pop(key, None)
        return self._read(key) if pending is None else pending.result()

    def _read(self, key: str) -> torch.Tensor:
        info = self._tensors.infos[key]
        if self._device.type == "meta":
            return torch.empty(info.shape, dtype=self._dtype, device="meta")
        if self._tensors.copies and (self._copy or self._device.type != "cpu"):
            t = self._tensors.copies[key]()  # fresh memory, read past the map; cast and moved below
        else:
            t = self._tensors.readers[key]()  # a view of the map (kept, or cast from it), or in memory
        return t.to(device=self._device, dtype=self._dtype if t.is_floating_point() else None)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._tensors.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors.readers)

    def __len__(self) -> int:
        return len(self._tensors.readers)


def _read_copy(f: BinaryIO, offset: int, info: TensorInfo, path: Path) -> torch.Tensor:
    """One tensor of a safetensors file (little-endian, C order), read at `offset` straight into
    a new tensor's memory: one copy, page cache -> tensor, and nothing mapped."""
    t = torch.empty(info.shape, dtype=_TORCH_DTYPES[info.dtype])
    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, written in place
    done = 0
    while done < len(buf):
        n = os.preadv(f.fileno(), [buf[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: the file ended while reading its tensors (truncated since it was opened?)")
        done += n
    return t


def _safetensors_tensors(headers: list[SafetensorsHeader]) -> _Tensors:
    """Readers for every tensor of some safetensors files, whose headers were read and validated
    (`read_safetensors_header`). Each file stays open, and mapped, until its readers are dropped."""
    infos: dict[str, TensorInfo] = {}
    readers: dict[str, Reader] = {}
    copies: dict[str, Reader] = {}
    for header in headers:
        try:
            h = safe_open(str(header.path), framework="pt", device="cpu")
        except SafetensorError as e:  # the file changed since its header was read
            raise CheckpointError(f"{header.path}: unreadable safetensors file ({e})") from None
        f = open_regular(header.path)
        for k, info in header.tensors.items():
            if k in readers:
                raise CheckpointError(f"{header.path}: tensor {k!r} appears in two files of the same component")
            infos[k] = info
            readers[k] = lambda h=h, k=k: h.get_tensor(k)
            copies[k] = lambda f=f, at=header.offsets[k], info=info, path=header.path: _read_copy(f, at, info, path)
    return _Tensors(infos, readers, mapped=True, copies=copies)


# torch writes its archive's entries stored, not compressed, but reads deflated ones too. Weights
# compress by well under 2x, so entries that expand past this multiple of the archive's size (plus
# 1 MiB for tiny files) are a zip bomb, refused before torch.load inflates them.
_MAX_EXPANSION = 4
# safetensors names of torch's floating dtypes, for the header-style dtype of a pickled tensor
_FLOAT_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # fmt: skip


def _check_archive(f: BinaryIO, path: Path) -> None:
    """Refuse a zip archive (torch's format since 1.6) whose entries expand far beyond the file's size."""
    if not zipfile.is_zipfile(f):
        f.seek(0)
        return  # torch's legacy format, or a plain pickle: nothing is compressed
    size = os.fstat(f.fileno()).st_size
    try:
        with zipfile.ZipFile(f) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: a damaged zip archive ({e})") from None
    total = sum(e.file_size for e in entries)
    if total > _MAX_EXPANSION * size + (1 << 20):
        big = max(entries, key=lambda e: e.file_size)
        raise CheckpointError(
            f"{path}: the archive's entries expand to {total:,} bytes uncompressed, over {_MAX_EXPANSION} times its "
            f"{size:,} bytes on disk ({big.filename!r}: {big.compress_size:,} -> {big.file_size:,} bytes): a "
            "compression bomb, refused before unpickling. Re-save the weights with torch.save or as safetensors."
        )
    f.seek(0)


def _pickle_tensors(path: Path) -> _Tensors:
    """Readers over a pickled state dict, read once with `torch.load(weights_only=True)`: only
    tensors and plain containers can be rebuilt, so a malicious pickle's payload cannot run, and a
    compressed archive is inspected first (`_check_archive`). Tensors that share storage (an EMA
    copy aliasing the weights) are cloned apart; all of them are the process's own memory."""
    with open_regular(path) as f:
        _check_archive(f, path)
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
        except Exception as e:  # UnpicklingError, RuntimeError for archives that are not torch's
            first = (str(e).splitlines() or [""])[0]
            raise CheckpointError(f"{path}: refused to unpickle ({type(e).__name__}: {first})") from None
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
    infos = {k: TensorInfo(_FLOAT_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in sd.items()}
    return _Tensors(infos, {k: (lambda v=v: v) for k, v in sd.items()}, mapped=False)


class Subset(Mapping):
    """The keys of a source that one table reads."""

    def __init__(self, source: Mapping, keys: set[str]):
        self._source, self._keys = source, keys

    def __getitem__(self, k):
        if k not in self._keys:
            raise KeyError(k)
        return self._source[k]

    def __contains__(self, k) -> bool:  # Mapping's default would read the tensor
        return k in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def _missing(what: str, keys: list[str]) -> str:
    more = f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""
    return f"  {what}: {', '.join(keys[:8])}{more}"


@dataclass
class Part:
    """One file (or set of shards) of a source, and the tables of the components it holds.
    An official file is one part holding every component; a diffusers folder has one per component."""

    where: str  # the file or folder, for messages
    tensors: _Tensors
    tables: dict[str, KeyTable]  # component name -> table (their names -> ours)
    extras: KeyTable = KeyTable("no extras", ())  # keys ignored file-wide
    label: str = ""  # prefix of its keys in `Components.ignored` ("unet/" in a folder)


@dataclass
class Match:
    """How one part's keys meet its tables: the keys each component's table reads, the keys ignored
    with their reasons, and the problems (missing or unexpected keys) found. Nothing is read."""

    own: dict[str, set[str]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def match_keys(part: Part) -> Match:
    """Every key of the part must be used by a table or ignored with a reason; anything else is a
    problem, reported with every other before raising."""
    keys = set(part.tensors.infos)
    used: set[str] = set()
    out = Match()
    for name, table in part.tables.items():
        out.own[name] = {k for k in table.theirs_keys if k in keys}  # each table sees only the keys it names
        used |= out.own[name]
        missing = [k for k in table.theirs_keys if k not in keys]
        if missing:
            out.problems.append(_missing(f"{name}: {len(missing)} missing key(s)", missing))
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


def _concat0_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    first = shapes[0]
    if not first or any(len(s) != len(first) or s[1:] != first[1:] for s in shapes):
        return None  # q, k, v of different ranks or widths cannot be concatenated
    return (sum(s[0] for s in shapes), *first[1:])


# The shape each of `keymap.TRANSFORMS` makes from its inputs' shapes (None: it cannot apply), in plain
# arithmetic: running the transforms on meta tensors would do, but torch's meta `cat` imports
# torch._dynamo on its first call (1.3 s and more, a third of a load). tests/test_load_paths.py checks
# that the two agree, transform by transform.
_SHAPES: dict[str, Callable[[list[tuple[int, ...]]], tuple[int, ...] | None]] = {
    "identity": lambda s: s[0],
    "transpose": lambda s: s[0][::-1] if len(s[0]) <= 2 else None,  # Tensor.t(): 0-d and 1-d stay as they are
    "concat0": _concat0_shape,
    "linear_to_conv1x1": lambda s: (*s[0], 1, 1) if len(s[0]) == 2 else s[0],
}


def transformed_shape(transform: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape `keymap.TRANSFORMS[transform]` makes from tensors of these shapes, or None if it cannot."""
    shape = _SHAPES[transform](shapes)
    return None if shape is None else tuple(shape)


def check_tensors(part: Part, own: Mapping[str, set[str]], modules: Mapping[str, torch.nn.Module]) -> list[str]:
    """Before any data is read: each component's tensors as the header describes them (dtype, shape),
    against the module built on meta. Integer tensors where the module has float weights, and
    tensors whose shape (rank included) is not the module's after the table's transform, are problems."""
    problems = []
    infos = part.tensors.infos
    for name, table in part.tables.items():
        ints = [f"{k} ({infos[k].dtype})" for k in sorted(own[name]) if infos[k].dtype not in FLOAT_DTYPES]
        if ints:
            problems.append(_missing(f"{name}: {len(ints)} integer tensor(s) where float weights belong", ints))
            continue
        expected = {k: tuple(v.shape) for k, v in modules[name].state_dict().items()}
        wrong = []
        for rule in table.rules:
            got = transformed_shape(rule.transform, [infos[t].shape for t in rule.theirs])
            if got != expected[rule.ours]:
                shapes = ", ".join(f"{t} {list(infos[t].shape)}" for t in rule.theirs)
                wrong.append(f"{rule.ours} (expected {expected[rule.ours]}, got {got or 'no shape'} from {shapes})")
        if wrong:
            problems.append(_missing(f"{name}: {len(wrong)} tensor(s) of the wrong shape", wrong))
    return problems


# ------------------------------------------------------------------------------ the two sources
class SingleFile:
    """An official single-file checkpoint: every component in one file, under the official prefixes."""

    def __init__(self, path: Path, *, allow_pickle: bool) -> None:
        self.path = path
        if path.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                refuse_pickle(path)
            self.tensors, metadata = _pickle_tensors(path), {}
        else:
            header = read_safetensors_header(path)
            self.tensors, metadata = _safetensors_tensors([header]), header.metadata
        self.metadata = metadata
        self.detected = detect_keys(self.tensors.infos, metadata, path)

    def architecture(self, family: Family) -> Family:
        """The presets, or the architecture a file written by `minisd.save` records in its metadata
        (`minisd.config`, the form `apply_config` takes), so that tiny and custom models reload as they are."""
        recorded = self.metadata.get("minisd.config")
        if recorded is None:
            return family
        try:
            config = json.loads(recorded)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: metadata minisd.config is not valid JSON ({e})") from None
        try:
            return apply_config(family, config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{self.path}: metadata minisd.config does not describe an architecture: {e}"
            ) from None

    def parts(self, family: Family, *, use_ema: bool) -> list[Part]:
        """The file as one part, read with the official key tables."""
        tables = official_tables(family, set(self.tensors.infos), use_ema=use_ema)
        return [Part(str(self.path), self.tensors, tables, OFFICIAL_EXTRAS)]

    def sizes(self, family: Family, *, use_ema: bool) -> list[tuple[str, Size]]:
        """What the file holds for each component (`layouts.official_sizes`), and where."""
        if use_ema and not self.detected.has_ema:
            raise CheckpointError(
                f"{self.path}: use_ema=True but the file holds no `model_ema.*` weights (it is pruned)"
            )
        shapes = {k: info.shape for k, info in self.tensors.infos.items()}
        prefixes = [_ema_key("") if use_ema else UNET_PREFIX, VAE_PREFIX, *(t.official_prefix for t in family.text)]
        sizes = official_sizes(family, shapes, use_ema=use_ema)
        return [(f"under `{prefix}`", size) for prefix, size in zip(prefixes, sizes)]

    def full_layers(self, enc: TextEncoderSpec, cfg: TextConfig) -> int:
        """The text encoder's layer count in the file: the whole tower."""
        return cfg.layers  # the official file holds whole towers

    def known_file(self) -> tuple[str, str] | None:
        """(prediction type, reason) when the file is a known official release (by its SHA-256)."""
        if (known := KNOWN_SHA256.get(sha256(self.path))) is None:
            return None
        return known.prediction_type, f"SHA-256 of the official {known.name}"

    def check(self) -> None:
        """Check the file's stored noise schedule (`alphas_cumprod`), if any."""
        if "alphas_cumprod" in self.tensors.readers:
            check_schedule(self.tensors.readers["alphas_cumprod"](), self.path)


_WEIGHT_BASENAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                     "text_encoder": "model", "text_encoder_2": "model"}  # fmt: skip


def component_tensors(root: Path, comp: Path, base: str, variant: str | None, allow_pickle: bool) -> _Tensors:
    """The tensors of one diffusers component folder `comp` (inside `root`): `{base}.safetensors`, a
    variant (`*.fp16.safetensors`), shards (`*.safetensors.index.json`), or a trusted `{base}.bin`."""
    names = [f"{base}.{variant}.safetensors"] if variant else [f"{base}.safetensors", f"{base}.fp16.safetensors"]
    for name in names:
        if (comp / name).exists():
            return _safetensors_tensors([read_safetensors_header(check_inside(comp / name, root))])
        index = comp / f"{name}.index.json"
        if index.exists():
            shards = [check_inside(comp / s, root) for s in _shards(index, root)]
            return _safetensors_tensors([read_safetensors_header(s) for s in shards])
    if (comp / f"{base}.bin").exists():
        if not allow_pickle:
            refuse_pickle(comp / f"{base}.bin")
        return _pickle_tensors(check_inside(comp / f"{base}.bin", root))
    for_variant = f" for variant {variant!r}" if variant else ""
    raise CheckpointError(f"{comp}: no weights file ({' or '.join(names)}){for_variant}")


def _shards(index: Path, root: Path) -> list[str]:
    """The shard file names a `*.safetensors.index.json` lists (its `weight_map`: tensor -> file)."""
    weight_map = json_field(read_json(index, folder=root), "weight_map", index, "object")
    if not weight_map:
        raise CheckpointError(f"{index}: field 'weight_map' is empty; it must list the shards")
    bad = next((v for v in weight_map.values() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{index}: field 'weight_map' must map tensor names to file names, got {bad!r}"[:200])
    return sorted(set(weight_map.values()))


class DiffusersFolder:
    """A diffusers pipeline folder: one sub-folder per component, each with its config.json.
    Every file it opens must resolve inside the folder (`detection.check_inside`)."""

    def __init__(self, folder: Path, *, variant: str | None, allow_pickle: bool) -> None:
        self.path = folder
        self.detected = detect_diffusers(folder)
        subs = ("unet", "vae", *(t.diffusers_folder for t in self.detected.family.text))
        self.tensors = {
            sub: component_tensors(folder, folder / sub, _WEIGHT_BASENAMES[sub], variant, allow_pickle) for sub in subs
        }
        self.text_time = False  # the U-Net's config.json says (`architecture`)

    def architecture(self, family: Family) -> Family:
        """The folder's config.json files (a projected text encoder is told by its weights)."""
        missing = [t.diffusers_folder for t in family.text if t.diffusers_folder not in self.tensors]
        if missing:
            raise CheckpointError(
                f"{self.path}: family {family.name} needs {missing}, which model_index.json does not list"
            )
        where = {sub: self.path / sub / "config.json" for sub in self.tensors}
        configs = {sub: read_json(w, folder=self.path) for sub, w in where.items()}
        unet = unet_from_diffusers(configs["unet"], where["unet"])
        self.text_time = unet_text_time(configs["unet"], where["unet"])
        vae = vae_from_diffusers(configs["vae"], where["vae"])
        subs = [t.diffusers_folder for t in family.text]
        projected = ["text_projection.weight" in self.tensors[sub].infos for sub in subs]
        text = tuple(text_from_hf(configs[sub], projection=p, where=where[sub]) for sub, p in zip(subs, projected))
        family = family.with_architecture(unet, vae, text)
        index_where = self.path / "model_index.json"
        zeros = json_field(read_json(index_where, folder=self.path), "force_zeros_for_empty_prompt", index_where,
                           "bool", None)  # fmt: skip
        if zeros is not None:  # the folder's own say on SDXL's empty negative prompt
            family = dataclasses.replace(family, zero_empty_negative=zeros)
        return family

    def parts(self, family: Family, *, use_ema: bool) -> list[Part]:
        """One part per component folder (unet/, vae/, text encoders), each with its diffusers key table."""
        names = component_names(family)
        unet = {names[0]: unet_table(family.unet, text_time=self.text_time)}
        parts = [
            Part(str(self.path / "unet"), self.tensors["unet"], unet, label="unet/"),
            Part(str(self.path / "vae"), self.tensors["vae"], {names[1]: vae_table(family.vae)}, label="vae/"),
        ]
        for name, enc in zip(names[2:], family.text):
            sub = enc.diffusers_folder
            parts.append(Part(str(self.path / sub), self.tensors[sub], {name: self._text_table(enc)}, label=f"{sub}/"))
        return parts

    def _text_table(self, enc: TextEncoderSpec) -> KeyTable:
        return text_table(enc.config, "hf", set(self.tensors[enc.diffusers_folder].infos), "")

    def sizes(self, family: Family, *, use_ema: bool) -> list[tuple[str, Size]]:
        """What each component's sub-folder holds (less the text encoders' ignored `position_ids`)."""
        if use_ema:
            raise CheckpointError(f"{self.path}: use_ema=True, but a diffusers folder holds one set of U-Net weights")

        def shapes(sub: str) -> dict[str, tuple[int, ...]]:
            return {k: info.shape for k, info in self.tensors[sub].infos.items()}

        out = [(f"in {sub}/", held_size(shapes(sub), "")) for sub in ("unet", "vae")]
        for enc in family.text:
            sub = enc.diffusers_folder
            out.append((f"in {sub}/", held_size(shapes(sub), "", (self._text_table(enc),))))
        return out

    def full_layers(self, enc: TextEncoderSpec, cfg: TextConfig) -> int:
        """The text encoder's layer count in the folder (one more where diffusers drops the last)."""
        return cfg.layers + 1 if enc.diffusers_drops_last else cfg.layers

    def known_file(self) -> tuple[str, str] | None:
        """None: a folder is not matched by hash (its scheduler config tells the prediction type)."""
        return None  # a folder's scheduler config already said (detection)

    def check(self) -> None:
        """Nothing to check for a folder."""
        pass


def check_schedule(stored: torch.Tensor, path: Path) -> None:
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


# ------------------------------------------------------------------------------ the caller's architecture
def _component_config(cls, value):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        fields = dataclasses.fields(cls)
        names = sorted(f.name for f in fields)
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"config: unknown {cls.__name__} fields {unknown}; known: {names}")
        no_default = [f.name for f in fields if f.default is f.default_factory is dataclasses.MISSING]
        needed = [name for name in no_default if name not in value]
        if needed:
            raise ValueError(f"config: {cls.__name__} needs the fields {needed}")
        return cls(**value)  # its __post_init__ checks every field's type and range
    raise ValueError(f"config: expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def apply_config(family: Family, config: Family | Mapping | str | Path | None) -> Family:
    """The family with a non-standard architecture: a `Family`, or a dict / JSON file of the form
    {"unet": {UNetConfig fields}, "vae": {...}, "text_encoders": [{TextConfig fields}, ...]}
    (each part optional)."""
    if config is None or isinstance(config, Family):
        return config or family
    if isinstance(config, (str, Path)):
        config = read_json(Path(config))  # a regular file holding a JSON object, or a CheckpointError
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a Family, a dict or a JSON path, got {type(config).__name__}")
    unknown = sorted(set(config) - {"unet", "vae", "text_encoders", "default_size"})
    if unknown:
        raise ValueError(
            f"config: unknown sections {unknown}; expected 'unet', 'vae', 'text_encoders', 'default_size'"
        )
    unet = _component_config(UNetConfig, config.get("unet")) or family.unet
    vae = _component_config(VAEConfig, config.get("vae")) or family.vae
    text = tuple(t.config for t in family.text)
    if "text_encoders" in config:
        cfgs = config["text_encoders"]
        if not isinstance(cfgs, (list, tuple)):
            raise ValueError(f"config: text_encoders must be a list of TextConfig dicts, got {type(cfgs).__name__}")
        if len(cfgs) != len(family.text):
            raise ValueError(
                f"config: family {family.name} has {len(family.text)} text encoder(s), config gives {len(cfgs)}"
            )
        text = tuple(_component_config(TextConfig, c) for c in cfgs)
    family = family.with_architecture(unet, vae, text)
    size = config.get("default_size", family.default_size)  # the training resolution, for generate's default
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"config: default_size must be a positive number of pixels, got {size!r}")
    return dataclasses.replace(family, default_size=size)
