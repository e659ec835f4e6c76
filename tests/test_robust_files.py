"""Bad and hostile files (issue 9): every class of problem gets a `CheckpointError` (or a
`ValueError` for an argument) that names the file and the field, never a hang, a crash, a read
outside a folder, or a model that changes under the user's feet.

The files start from the tiny official checkpoints of tests/tiny.py, and the diffusers folders
from `minisd.save(format="diffusers")` of them; each test breaks one thing.

Tolerances: none. Weights are compared with `torch.equal`: loading copies them bit for bit (an
fp32 -> fp16 cast is deterministic), and the model outputs compared run the same weights on the
same inputs in the same single-threaded process, so any difference means the weights changed.
Time bounds (2 s) are for work that takes milliseconds; what they guard against takes minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

import minisd
from minisd import checkpoint, cli, detection, sources
from minisd.clip import TextTransformer
from minisd.families import FAMILIES, UNET_PREFIX
from minisd.keymap import CheckpointError
from minisd.layouts import Size, text_size, unet_size, vae_size
from minisd.unet import UNetConfig, UNetModel
from minisd.vae import AutoencoderKL, VAEConfig
from tests.test_checkpoint import full_size_keys
from tests.tiny import TINY_UNETS, TINY_VAE, official_checkpoint, text_configs, tiny_config

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def write(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def config_dict(family: str) -> dict:
    """`tiny_config` as plain JSON-able dicts (what a config.json or the metadata would hold)."""
    cfg = tiny_config(family)
    return {"unet": dataclasses.asdict(cfg["unet"]), "vae": dataclasses.asdict(cfg["vae"]),
            "text_encoders": [dataclasses.asdict(c) for c in cfg["text_encoders"]]}  # fmt: skip


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory) -> Path:
    return write(official_checkpoint("sd1").tensors, tmp_path_factory.mktemp("file") / "sd1.safetensors")


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory, sd1_file) -> Path:
    folder = tmp_path_factory.mktemp("folder") / "sd1"
    minisd.save(minisd.load(sd1_file, config=tiny_config("sd1")), folder, format="diffusers")
    return folder


def copy_folder(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy", symlinks=True))


# ------------------------------------------------------------------------------ 1. a model owns its memory
# Run in a subprocess: if the weights were still views of the file's memory map, truncating the file
# would kill the process with SIGBUS at the next read, and pytest with it. One subprocess runs every
# case (importing torch is the slow part); a crash fails them all, naming the signal.
_OWNERSHIP = r"""
import json, os, shutil, sys
import torch
import minisd

torch.set_num_threads(1)


@torch.no_grad()
def run(spec):
    kw = {"mmap": spec["mmap"], "dtype": getattr(torch, spec["dtype"])}
    if spec["config"] is not None:
        kw["config"] = spec["config"]
    sd = minisd.load(spec["path"], **kw)
    modules = {"unet": sd.unet, "vae": sd.vae, **{f"text{i}": e for i, e in enumerate(sd.text_encoders)}}
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    context = torch.randn(1, 7, sd.unet.config.context_dim, generator=g)

    def outputs():
        out = {"vae": sd.vae.decode(z)}
        if spec["dtype"] == "float32":  # an fp16 U-Net is a cast copy anyway; the fp32 VAE is the point
            out["unet"] = sd.unet(x, torch.tensor([500.0]), context)
        return out

    def state():
        return {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.state_dict().items()}

    weights, before = {k: v.clone() for k, v in state().items()}, outputs()

    def changed():
        now, out = state(), outputs()
        return sorted(k for k in weights if not torch.equal(now[k], weights[k])) + sorted(
            k for k in before if not torch.equal(out[k], before[k]))

    result = {}
    for target, other in spec["files"]:
        shutil.copyfile(other, target)  # what `cp other target` does: the same inode, truncated and rewritten
    result["after_overwrite"] = changed()
    if not spec["mmap"]:  # a memory-mapped model would die of SIGBUS here
        for target, _ in spec["files"]:
            os.truncate(target, 0)
        result["after_truncate"] = changed()
    return result


print(json.dumps({name: run(spec) for name, spec in json.loads(sys.argv[1]).items()}))
"""

_WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors")  # fmt: skip
_OWNERSHIP_CASES = ("single file", "diffusers folder", "fp32 VAE of an fp16 load", "mmap=True")


@pytest.fixture(scope="module")
def ownership(tmp_path_factory) -> dict:
    """Each case's checkpoint and replacement weights (seed 1), and what the subprocess saw."""
    tmp = tmp_path_factory.mktemp("ownership")
    mine, other = official_checkpoint("sd1", seed=0), official_checkpoint("sd1", seed=1)
    specs = {}
    for i, case in enumerate(_OWNERSHIP_CASES):
        path = write(mine.tensors, tmp / f"{i}a.safetensors")
        replacement = write(other.tensors, tmp / f"{i}b.safetensors")
        if case == "diffusers folder":
            for src, dst in ((path, tmp / f"{i}a"), (replacement, tmp / f"{i}b")):
                minisd.save(minisd.load(src, config=tiny_config("sd1")), dst, format="diffusers")
            specs[case] = {"path": str(tmp / f"{i}a"), "config": None, "dtype": "float32", "mmap": False,
                           "files": [(str(tmp / f"{i}a" / f), str(tmp / f"{i}b" / f)) for f in _WEIGHT_FILES]}
        else:
            specs[case] = {"path": str(path), "config": config_dict("sd1"), "mmap": case == "mmap=True",
                           "dtype": "float16" if case.startswith("fp32 VAE") else "float32",
                           "files": [(str(path), str(replacement))]}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", _OWNERSHIP, json.dumps(specs)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode} (-7 is SIGBUS):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.reliability(
    "load: memory",
    (
        "the checkpoint overwritten (`cp`) or truncated after loading: single file, diffusers folder, the "
        "fp32 VAE of an fp16 load"
    ),
    (
        "nothing: every tensor was copied out of the file as it was read, so the model keeps its weights and "
        "outputs bit for bit (`mmap=True` opts out, with the hazard documented)"
    ),
)
@pytest.mark.parametrize("case", _OWNERSHIP_CASES)
def test_loaded_model_survives_overwrite_and_truncation(case, ownership):
    """Overwrite the checkpoint with other weights (as `cp` does), then truncate it: a model loaded
    before keeps its weights and outputs, bit for bit. With mmap=True the overwrite shows through,
    the documented hazard, which is what this test would catch if loading stopped copying."""
    if case == "mmap=True":
        assert any(k.startswith("unet.") for k in ownership[case]["after_overwrite"]), ownership[case]
    else:
        assert ownership[case] == {"after_overwrite": [], "after_truncate": []}


def test_every_loaded_tensor_is_a_copy_not_a_view(sd1_file, monkeypatch):
    """Each tensor is copied out of the file as it is read (tensor by tensor: the readers hand out
    views of the memory map, and `Tensor.to(copy=True)`, also the cast, makes the one copy)."""
    calls = []
    real = sources.LazyTensors.__getitem__

    def spy(self, key):
        out = real(self, key)
        view = self._tensors.readers[key]()
        calls.append(out.untyped_storage().data_ptr() != view.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(sources.LazyTensors, "__getitem__", spy)
    minisd.load(sd1_file, config=tiny_config("sd1"))
    assert calls and all(calls)  # every tensor the model holds is its own memory


# ------------------------------------------------------------------------------ 2. files that are not regular
def finishes(fn, fifo: Path, timeout: float = 30.0):
    """fn() run in a thread; if it is still blocked on the FIFO after `timeout` s, a writer opens and
    closes the FIFO (the reader gets EOF) and the test fails instead of hanging."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(5)
        pytest.fail(f"blocked reading the FIFO {fifo}")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.mark.reliability(
    "load: checkpoint files",
    "a FIFO (or a device) as the checkpoint, for `load`, `detect`, `minisd info`",
    (
        '`CheckpointError`: "is a FIFO (named pipe), not a regular file", checked with `stat` before opening,'
        " so nothing blocks"
    ),
)
@pytest.mark.parametrize("entry", ["load", "detect", "minisd info"])
def test_fifo_is_refused_not_read(entry, tmp_path, capsys):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    if entry == "minisd info":  # one line, exit 1 (a runtime error); `describe` itself meets the check in `detect`
        assert finishes(lambda: cli.main(["info", str(fifo)]), fifo) == 1
        err = capsys.readouterr().err
        assert err.startswith("minisd: error: ") and "not a regular file" in err and err.count("\n") == 1
    call = {"load": minisd.load, "detect": minisd.detect, "minisd info": cli.describe}[entry]
    with pytest.raises(CheckpointError, match=r"model.safetensors: is a FIFO \(named pipe\), not a regular file"):
        finishes(lambda: call(fifo), fifo)


def test_device_file_is_refused():
    with pytest.raises(CheckpointError, match=r"/dev/null: is a character device, not a regular file"):
        minisd.detect("/dev/null")


@pytest.mark.reliability(
    "load: diffusers folders",
    "a FIFO as a folder's config.json or weights file, or as the `config=` JSON file",
    "`CheckpointError` naming the file: not a regular file; nothing blocks",
)
@pytest.mark.parametrize("where", ["unet/config.json", "vae/diffusion_pytorch_model.safetensors", "config="])
def test_fifo_inside_a_folder_or_as_config(where, sd1_folder, sd1_file, tmp_path):
    if where == "config=":
        fifo = tmp_path / "config.json"
        os.mkfifo(fifo)
        call = lambda: minisd.load(sd1_file, config=fifo)  # noqa: E731
    else:
        folder = copy_folder(sd1_folder, tmp_path)
        fifo = folder / where
        fifo.unlink()
        os.mkfifo(fifo)
        call = lambda: minisd.load(folder)  # noqa: E731
    with pytest.raises(CheckpointError, match=rf"{fifo.name}: is a FIFO"):
        finishes(call, fifo)


# ------------------------------------------------------------------------------ 3. configs validated before building
@pytest.mark.reliability(
    "load: configs",
    (
        "a `UNetConfig` / `VAEConfig` / `TextConfig` field of the wrong type (a str, float or bool for an "
        "int) or out of range (non-positive, past a sanity bound such as 10**7 layers)"
    ),
    (
        "`ValueError` from the config's `__post_init__` naming the field, the allowed range and the value, "
        "before anything is built"
    ),
)
@pytest.mark.parametrize(
    "cls, fields, match",
    [
        (UNetConfig, {"num_res_blocks": 10**7}, r"UNetConfig.num_res_blocks must be in \[1, 64\] \(a sanity bound"),
        (UNetConfig, {"num_res_blocks": 0}, r"UNetConfig.num_res_blocks must be in \[1, 64\], got 0"),
        (UNetConfig, {"model_channels": "320"}, r"UNetConfig.model_channels must be an int, got str '320'"),
        (UNetConfig, {"in_channels": True}, r"UNetConfig.in_channels must be an int, got bool True"),
        (UNetConfig, {"channel_mult": (1, 2.5)}, r"UNetConfig.channel_mult\[1\] must be an int, got float 2.5"),
        (UNetConfig, {"channel_mult": ()}, r"channel_mult must have at least one level"),
        (UNetConfig, {"channel_mult": (1,) * 9}, r"channel_mult has 9 entries, more than the bound 8"),
        (UNetConfig, {"transformer_depth": 10**7}, r"transformer_depth must be in \[0, 64\]"),
        (UNetConfig, {"transformer_depth": (1, -1, 1, 1)}, r"transformer_depth\[1\] must be in \[0, 64\], got -1"),
        (UNetConfig, {"context_dim": 0}, r"UNetConfig.context_dim must be in \[1, 65536\], got 0"),
        (UNetConfig, {"adm_in_channels": 2.0}, r"adm_in_channels must be an int, got float"),
        (UNetConfig, {"use_linear_in_transformer": 1}, r"use_linear_in_transformer must be True or False, got int"),
        (UNetConfig, {"model_channels": 48}, r"level 0 width 48 does not split into 32 groups"),
        (VAEConfig, {"ch": 0}, r"VAEConfig.ch must be in \[1, 65536\], got 0"),
        (VAEConfig, {"num_res_blocks": 10**7}, r"VAEConfig.num_res_blocks must be in \[1, 64\] \(a sanity bound"),
        (VAEConfig, {"ch_mult": (1,) * 9}, r"ch_mult must have 1 to 8 levels, got 9"),
        (VAEConfig, {"scale_factor": float("nan")}, r"scale_factor must be a finite number"),
        (VAEConfig, {"scale_factor": 0.0}, r"scale_factor must be positive"),
        (VAEConfig, {"dropout": 1.0}, r"VAEConfig.dropout must be a finite number in \[0.0, 1.0\)"),
        (VAEConfig, {"double_z": "yes"}, r"double_z must be True or False"),
        (VAEConfig, {"z_channels": 4.0}, r"VAEConfig.z_channels must be an int, got float"),
        ("text", {"layers": 10**7}, r"TextConfig.layers must be in \[0, 1024\] \(a sanity bound"),
        ("text", {"heads": 0}, r"TextConfig.heads must be in \[1, 65536\], got 0"),
        ("text", {"width": 33}, r"width 33 does not split into 4 heads"),
        ("text", {"vocab_size": 49408.0}, r"TextConfig.vocab_size must be an int, got float"),
        ("text", {"act": None}, r"TextConfig.act must be 'quick_gelu' or 'gelu', got None"),
        ("text", {"layer_norm_eps": 0}, r"layer_norm_eps must be a number in \(0, 1\), got 0"),
        ("text", {"projection_dim": -1}, r"projection_dim must be in \[1, 65536\], got -1"),
    ],
)
def test_config_fields_are_checked(cls, fields, match):
    base = {UNetConfig: TINY_UNETS["sd1"], VAEConfig: TINY_VAE, "text": text_configs("sd1")[0]}[cls]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(base, **fields)
    assert time.perf_counter() - t0 < 2.0


def test_config_lists_become_tuples():
    cfg = dataclasses.replace(TINY_UNETS["sdxl"], channel_mult=[1, 2], transformer_depth=[0, 2])
    assert cfg.channel_mult == (1, 2) and cfg.transformer_depth == (0, 2) and hash(cfg)


@pytest.mark.reliability(
    "load: configs",
    "a `config=` dict with a field out of range, missing fields, or sections of the wrong type",
    "`ValueError` naming the field or section, within 2 s",
)
@pytest.mark.parametrize("config, match", [
    ({"unet": {**config_dict("sd1")["unet"], "num_res_blocks": 10**7}}, r"num_res_blocks must be in \[1, 64\]"),
    ({"text_encoders": [{"width": 32}]}, r"TextConfig needs the fields \['heads', 'layers', 'mlp_width', 'act'"),
    ({"text_encoders": {"width": 32}}, r"text_encoders must be a list of TextConfig dicts, got dict"),
    ({"vae": {**config_dict("sd1")["vae"], "ch_mult": [1, "2"]}}, r"VAEConfig.ch_mult\[1\] must be an int, got str"),
])  # fmt: skip
def test_bad_config_argument_fails_at_once(config, match, sd1_file):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        minisd.load(sd1_file, config=config)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.reliability(
    "load: configs",
    (
        "an architecture (preset, `config=`, config.json) far larger than the tensors the file holds, e.g. "
        "1.3 million tensors within every bound, or a full-size preset on a tiny file"
    ),
    (
        '`CheckpointError` "far smaller than the architecture", each component\'s parameter and tensor counts '
        "against the file's, from the header alone, before any module is built"
    ),
)
def test_config_far_larger_than_the_file_fails_before_building(sd1_file, monkeypatch):
    # Within every field's bounds, yet 1.3 million tensors: building that on meta would take many minutes.
    huge = {**config_dict("sd1")["unet"], "channel_mult": [1] * 8, "num_res_blocks": 64, "transformer_depth": 64,
            "attention_resolutions": [1, 2, 4, 8, 16, 32, 64, 128]}  # fmt: skip
    monkeypatch.setattr(checkpoint, "build", lambda family: pytest.fail("a module was built"))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"far smaller than the architecture.*\n  U-Net: the architecture has "
                       r"[\d,]+ parameters in [\d,]{9} tensors; the file holds [\d,]+ in 286 under"):
        minisd.load(sd1_file, config={**config_dict("sd1"), "unet": huge})
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.reliability(
    "load: diffusers folders",
    "a config.json claiming 10**7 layers",
    "`CheckpointError` naming the file and the field's bound, in milliseconds",
)
def test_folder_config_json_claiming_1e7_layers_fails_at_once(sd1_folder, tmp_path):
    folder = copy_folder(sd1_folder, tmp_path)
    path = folder / "text_encoder" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_hidden_layers": 10**7}))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"text_encoder/config.json: TextConfig.layers must be in \[0, 1024\]"):
        minisd.load(folder)
    assert time.perf_counter() - t0 < 2.0


def _meta_size(module: torch.nn.Module) -> Size:
    state = module.state_dict()
    return Size(len(state), sum(v.numel() for v in state.values()))


_UNETS = {f.unet for f in FAMILIES.values()} | set(TINY_UNETS.values()) | {
    dataclasses.replace(TINY_UNETS["sdxl"], transformer_depth_middle=3, num_res_blocks=3)}
_VAES = {f.vae for f in FAMILIES.values()} | {TINY_VAE, dataclasses.replace(TINY_VAE, ch_mult=(1, 2, 2), z_channels=8,
                                                                             embed_dim=6)}  # fmt: skip
_TEXTS = {t.config for f in FAMILIES.values() for t in f.text} | {c for f in ("sd1", "sd2") for c in text_configs(f)}


@pytest.mark.parametrize("cfg", sorted(_UNETS | _VAES | _TEXTS, key=repr), ids=lambda c: type(c).__name__)
def test_sizes_from_blocks_match_a_full_build(cfg):
    """`layouts.*_size` add up each distinct block built alone; the whole model built on meta must agree."""
    with torch.device("meta"):
        if isinstance(cfg, UNetConfig):
            assert unet_size(cfg) == _meta_size(UNetModel(cfg))
        elif isinstance(cfg, VAEConfig):
            assert vae_size(cfg) == _meta_size(AutoencoderKL(cfg))
        else:
            assert text_size(cfg) == _meta_size(TextTransformer(cfg))


# ------------------------------------------------------------------------------ 4. compressed pickles
def _deflated_copy(src: Path, dst: Path, extra: tuple[str, int] | None = None) -> Path:
    """`src` (a torch archive) with every entry deflated; `extra` = (entry, n) replaces that entry by n zero bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if extra and info.filename.endswith(extra[0]):
                with zout.open(info.filename, "w") as f:
                    for _ in range(extra[1] >> 20):
                        f.write(bytes(1 << 20))
            else:
                zout.writestr(info.filename, zin.read(info.filename))
    return dst


@pytest.mark.reliability(
    "load: checkpoint files",
    "a compressed pickle (zip bomb) with `allow_pickle=True`",
    '`CheckpointError` "compression bomb" naming the largest entry, before `torch.load` inflates anything',
)
def test_zip_bomb_pickle_is_refused_before_unpickling(tmp_path, monkeypatch):
    torch.save({"state_dict": {"w": torch.zeros(4)}}, tmp_path / "small.ckpt")
    bomb = _deflated_copy(tmp_path / "small.ckpt", tmp_path / "bomb.ckpt", ("data/0", 64 << 20))
    assert bomb.stat().st_size < 1 << 20  # 64 MiB of zeros deflate to about 64 KiB
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a zip bomb"))
    with pytest.raises(CheckpointError, match=r"bomb.ckpt: the archive's entries expand to 67,10\d,\d+ bytes "
                       r"uncompressed, over 4 times .*compression bomb"):
        minisd.load(bomb, allow_pickle=True)


def test_deflated_torch_archive_still_loads(tmp_path):
    ckpt = official_checkpoint("sd1")
    torch.save({"state_dict": ckpt.tensors}, tmp_path / "plain.ckpt")
    path = _deflated_copy(tmp_path / "plain.ckpt", tmp_path / "deflated.ckpt")
    sd = minisd.load(path, config=tiny_config("sd1"), allow_pickle=True)
    key = "out.2.weight"
    assert torch.equal(sd.unet.state_dict()[key], ckpt.tensors[UNET_PREFIX + key])


# ------------------------------------------------------------------------------ 5. safetensors headers
def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(path: Path, header: dict | bytes, data: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _two_of_a_size(header: dict) -> tuple[str, str]:
    """Two tensors with the same byte size, the second after the first."""
    by_size: dict[int, list[str]] = {}
    for k, e in header.items():
        if k != "__metadata__":
            by_size.setdefault(e["data_offsets"][1] - e["data_offsets"][0], []).append(k)
    pair = next(sorted(ks, key=lambda k: header[k]["data_offsets"]) for n, ks in by_size.items() if n and len(ks) > 1)
    return pair[0], pair[1]


_OUT = UNET_PREFIX + "out.2.weight"  # (4, 32, 3, 3), F32


def _set(key: str, field: str, value):
    def edit(h, d):
        h[key][field] = value(h[key][field]) if callable(value) else value
        return h, d

    return edit


def _overlap(h, d):
    a, b = _two_of_a_size(h)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return h, d


def _nested(h, d):
    text = json.dumps(h).encode()
    deep = b"[" * 100_000 + b"]" * 100_000
    return b'{"__metadata__": {"x": ' + deep + b"}, " + text[1:], d


def _duplicate(h, d):
    text = json.dumps(h).encode()
    entry = json.dumps({_OUT: h[_OUT]}).encode()[1:-1]
    return b"{" + entry + b", " + text[1:], d


_HEADER_CASES = {
    "deep nesting": (_nested, r"corrupt safetensors header \(JSON nested too deeply\)"),
    "non-integer offsets": (_set(_OUT, "data_offsets", lambda o: [float(v) for v in o]),
                            r"data_offsets must be two integers \[begin, end\], got \[\d+\.0"),
    "offsets as strings": (_set(_OUT, "data_offsets", lambda o: [str(v) for v in o]), r"data_offsets must be two"),
    "non-integer shape": (_set(_OUT, "shape", [4.0, 32.0, 3.0, 3.0]), r"shape must be a list of integers"),
    "boolean in shape": (_set(_OUT, "shape", [4, 32, 3, True, 3]), r"shape must be a list of integers"),
    # (-4) x (-32) x 3 x 3 is 1152 elements, exactly the bytes the offsets span: only the sign check sees it
    "negative dimensions": (_set(_OUT, "shape", [-4, -32, 3, 3]), r"shape \[-4, -32, 3, 3\] has a negative dimension"),
    "overlapping offsets": (_overlap, r"corrupt header: the data of '.*' overlaps that of"),
    "bytes after the last tensor": (lambda h, d: (h, d + bytes(8)), r"corrupt: 8 bytes follow the last tensor's data"),
    "non-string metadata value": (lambda h, d: ({"__metadata__": {"modelspec.title": 5}, **h}, d),
                                  r"__metadata__\['modelspec.title'\] must be a string .* got int 5"),
    "metadata not an object": (lambda h, d: ({"__metadata__": ["a"], **h}, d), r"__metadata__ must be an object"),
    "duplicate tensor name": (_duplicate, r"duplicate key\(s\) \['model.diffusion_model.out.2.weight'\]"),
    "entry not an object": (lambda h, d: ({**h, _OUT: [1, 2]}, d), r"expected an object with dtype, shape and data_"),
    "dtype not a string": (_set(_OUT, "dtype", None), r"dtype None is not one of"),
    "size disagrees with shape": (_set(_OUT, "shape", [4, 32, 3, 4]), r"needs 6144 bytes, its data_offsets .* 4608"),
}  # fmt: skip


@pytest.mark.reliability(
    "load: checkpoint files",
    (
        "a malformed safetensors header: deep nesting, non-integer or string offsets and shapes, negative "
        "dimensions, overlapping offsets, bytes past the last tensor, non-string or non-object metadata, "
        "duplicate names, bad entries and dtypes"
    ),
    (
        "`CheckpointError` naming the file, the tensor and the fault, from `detect` and `load` alike (no "
        "family is reported for a file `load` refuses)"
    ),
)
@pytest.mark.parametrize("case", list(_HEADER_CASES))
def test_malformed_header(case, sd1_file, tmp_path):
    """The tiny SD1 file with one header fault: `detect` reports no family and `load` refuses, both with
    a CheckpointError naming the file and the fault (both read headers through `read_safetensors_header`)."""
    edit, match = _HEADER_CASES[case]
    header, data = _split(sd1_file)
    path = _join(tmp_path / "bad.safetensors", *edit(header, data))
    for call in (minisd.detect, lambda p: minisd.load(p, config=tiny_config("sd1"))):
        with pytest.raises(CheckpointError, match=r"bad.safetensors: .*" + match):
            call(path)


def _no_data_reads(monkeypatch):
    """Make every tensor read fail: the checks below must all happen before any data is read."""

    class Handle:
        def __init__(self, *args, **kwargs):
            pass

        def get_tensor(self, key):
            raise AssertionError(f"tensor data read ({key})")

    def read(f, offset, info, path):
        raise AssertionError(f"tensor data read ({path} at byte {offset})")

    monkeypatch.setattr(sources, "safe_open", Handle)  # the memory-mapped readers
    monkeypatch.setattr(sources, "_read_copy", read)  # the positioned reads of the default copy


_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"  # (32, 32)
_MAPPING_CASES = {
    "integer tensor where a float weight belongs": (
        _set(_OUT, "dtype", "I32"), r"U-Net: 1 integer tensor\(s\) where float weights belong: "
        r"model.diffusion_model.out.2.weight \(I32\)"),
    "wrong rank (a conv kernel flattened)": (
        _set(_OUT, "shape", [4, 288]), r"U-Net: 1 tensor\(s\) of the wrong shape: out.2.weight \(expected "
        r"\(4, 32, 3, 3\), got \(4, 288\) from model.diffusion_model.out.2.weight \[4, 288\]\)"),
    "wrong rank inside a fused q/k/v": (
        _set(_Q, "shape", [1024]), r"text encoder 0 \(hf\): 1 tensor\(s\) of the wrong shape: "
        r"transformer.resblocks.0.attn.in_proj_weight \(expected \(96, 32\), got no shape from .*q_proj.weight "
        r"\[1024\]"),
}  # fmt: skip


@pytest.mark.reliability(
    "load: checkpoint files",
    "integer tensors where float weights belong; tensors of the wrong rank or shape (also inside a fused q/k/v)",
    "`CheckpointError` naming each key with the expected and the found dtype or shape, before any tensor data is read",
)
@pytest.mark.parametrize("case", list(_MAPPING_CASES))
def test_tensor_kinds_checked_against_the_modules_before_reading(case, sd1_file, tmp_path, monkeypatch):
    edit, match = _MAPPING_CASES[case]
    path = _join(tmp_path / "bad.safetensors", *edit(*_split(sd1_file)))
    _no_data_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"bad.safetensors does not match the expected architecture:\n  " + match):
        minisd.load(path, config=tiny_config("sd1"))


@pytest.mark.reliability(
    "load: checkpoint files",
    "a detection sentinel key (`input_blocks.0.0.weight`) of the wrong rank",
    "`CheckpointError` naming the key, its shape and what belongs there",
)
def test_sentinel_of_the_wrong_rank(sd1_file, tmp_path):
    path = _join(tmp_path / "bad.safetensors", *_set(UNET_PREFIX + "input_blocks.0.0.weight", "shape", [32, 36])(
        *_split(sd1_file)))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"input_blocks.0.0.weight` has shape \[32, 36\]; a Stable Diffusion"):
        minisd.detect(path)


# ------------------------------------------------------------------------------ 6. diffusers folders
def _edit(value):
    """A JSON edit: a function of the parsed file, or a dict of fields to set."""
    return value if callable(value) else (lambda d: {**d, **value})


_FOLDER_CASES = [
    ("model_index.json", lambda d: [d], r"model_index.json: expected a JSON object \{...\}, got a JSON list"),
    ("model_index.json", {"text_encoder": "CLIPTextModel"}, r"field 'text_encoder' must be \[library, class\]"),
    ("model_index.json", {"force_zeros_for_empty_prompt": "yes"}, r"'force_zeros_for_empty_prompt' must be true or"),
    ("unet/config.json", lambda d: "config", r"unet/config.json: expected a JSON object \{...\}, got a JSON str"),
    ("unet/config.json", {"layers_per_block": "1"}, r"unet/config.json: field 'layers_per_block' must be an integer"),
    ("unet/config.json", {"block_out_channels": []}, r"'block_out_channels' must be a non-empty list of integers"),
    ("unet/config.json", {"block_out_channels": [32, -64]}, r"'block_out_channels' must be at least 1"),
    ("unet/config.json", {"cross_attention_dim": 0}, r"'cross_attention_dim' must be at least 1, got 0"),
    ("unet/config.json", {"use_linear_projection": "false"}, r"'use_linear_projection' must be true or false"),
    ("unet/config.json", {"in_channels": 4.0}, r"unet/config.json: field 'in_channels' must be an integer, got float"),
    ("unet/config.json", {"attention_head_dim": [4]}, r"'attention_head_dim' has 1 entries, expected 2"),
    ("unet/config.json", {"down_block_types": ["A", "B"]}, r"\['A', 'B'\] are not Stable Diffusion U-Net blocks"),
    ("unet/config.json", {"transformer_layers_per_block": 10**7},
     r"unet/config.json: UNetConfig.transformer_depth must be in \[0, 64\]"),
    ("unet/config.json", {"addition_embed_type": 3}, r"'addition_embed_type' must be a string or null, got int"),
    ("vae/config.json", {"latent_channels": "4"}, r"vae/config.json: field 'latent_channels' must be an integer"),
    ("vae/config.json", {"scaling_factor": float("nan")}, r"'scaling_factor' must be a finite number, got float nan"),
    ("vae/config.json", {"sample_size": -1}, r"field 'sample_size' must be at least 1, got -1"),
    ("vae/config.json", {"block_out_channels": [32, 48]}, r"block_out_channels \[32, 48\] are not multiples"),
    ("vae/config.json", {"shift_factor": 0.1159}, r"shift_factor=0.1159 is not the LDM KL autoencoder"),
    ("text_encoder/config.json", {"num_hidden_layers": 3.5}, r"'num_hidden_layers' must be an integer, got float"),
    ("text_encoder/config.json", {"hidden_act": 5}, r"text_encoder/config.json: field 'hidden_act' must be a string"),
    ("text_encoder/config.json", {"num_attention_heads": True}, r"'num_attention_heads' must be an integer, got bool"),
    ("scheduler/scheduler_config.json", {"prediction_type": 3}, r"field 'prediction_type' must be a string, got int"),
    ("scheduler/scheduler_config.json", {"prediction_type": "sample"}, r"'sample' is not one minisd supports"),
    ("scheduler/scheduler_config.json", lambda d: [], r"scheduler_config.json: expected a JSON object"),
]  # fmt: skip


@pytest.mark.reliability(
    "load: diffusers folders",
    (
        "model_index.json, config.json or scheduler_config.json of the wrong JSON type, or with a field of "
        "the wrong type or range"
    ),
    "`CheckpointError` naming the file and the field, what was expected and what was found",
)
@pytest.mark.parametrize("name, edit, match", _FOLDER_CASES, ids=[f"{c[0]}:{i}" for i, c in enumerate(_FOLDER_CASES)])
def test_folder_json_of_the_wrong_type_or_range(name, edit, match, sd1_folder, tmp_path):
    folder = copy_folder(sd1_folder, tmp_path)
    path = folder / name
    path.write_text(json.dumps(_edit(edit)(json.loads(path.read_text()))))
    with pytest.raises(CheckpointError, match=match):
        minisd.load(folder)


def _shard(folder: Path) -> Path:
    """Split the folder's U-Net weights into two shards listed by an index; returns the index."""
    unet = folder / "unet"
    whole = unet / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(str(whole))
    keys = sorted(tensors)
    parts = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}  # fmt: skip
    for name, ks in parts.items():
        write({k: tensors[k] for k in ks}, unet / name)
    whole.unlink()
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}))
    return index


def _retarget(index: Path, target) -> None:
    """Point every entry of the index's second shard at `target(second shard path)`."""
    d = json.loads(index.read_text())
    second = sorted(set(d["weight_map"].values()))[1]
    new = target(index.parent / second)
    d["weight_map"] = {k: (new if v == second else v) for k, v in d["weight_map"].items()}
    index.write_text(json.dumps(d))


def _outside(shard: Path) -> Path:
    """Move a shard out of the folder (a real, valid file: a traversal would read it successfully)."""
    out = shard.parents[3] / "outside.safetensors"
    shutil.move(shard, out)
    return out


def _symlink_out(shard: Path) -> str:
    out = _outside(shard)
    shard.symlink_to(out)
    return shard.name


_INDEX_CASES = {
    "relative path out of the folder": (lambda s: os.path.relpath(_outside(s), s.parent), r"outside the folder"),
    "absolute path": (lambda s: str(_outside(s)), r"outside the folder"),
    "symlink leading out": (_symlink_out, r"outside the folder"),
    "not a string": (lambda s: 5, r"field 'weight_map' must map tensor names to file names, got 5"),
}


@pytest.mark.reliability(
    "load: diffusers folders",
    (
        "a shard index whose weight_map names `../x`, an absolute path, a symlink leading outside the folder,"
        " or a non-string"
    ),
    '`CheckpointError` "outside the folder" (or naming the field): no file outside the folder is opened',
)
@pytest.mark.parametrize("case", list(_INDEX_CASES))
def test_shard_index_never_leads_outside_the_folder(case, sd1_folder, tmp_path):
    folder = copy_folder(sd1_folder, tmp_path)
    index = _shard(folder)
    minisd.load(folder)  # the sharded folder itself loads
    target, match = _INDEX_CASES[case]
    _retarget(index, target)
    with pytest.raises(CheckpointError, match=r"index.json: " + match if "field" in match else match):
        minisd.load(folder)


@pytest.mark.reliability(
    "load: diffusers folders",
    "a shard index whose weight_map is not an object, or is empty",
    "`CheckpointError` naming the index file and the field",
)
@pytest.mark.parametrize("weight_map, match", [([], r"field 'weight_map' must be a JSON object, got list"),
                                               ({}, r"field 'weight_map' is empty")])  # fmt: skip
def test_shard_index_fields(weight_map, match, sd1_folder, tmp_path):
    folder = copy_folder(sd1_folder, tmp_path)
    index = _shard(folder)
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors.index.json: " + match):
        minisd.load(folder)


@pytest.mark.reliability(
    "load: diffusers folders",
    "a config.json that is a symlink leading outside the folder",
    (
        "`CheckpointError` naming the link and where it resolves; the Hugging Face cache's `snapshots/` -> "
        "`blobs/` links are allowed"
    ),
)
def test_config_symlinked_out_of_the_folder(sd1_folder, tmp_path):
    folder = copy_folder(sd1_folder, tmp_path)
    config = folder / "vae" / "config.json"
    outside = tmp_path / "vae-config.json"
    shutil.move(config, outside)
    config.symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"vae/config.json: resolves to .*vae-config.json, outside the folder"):
        minisd.load(folder)


def test_hugging_face_cache_layout_loads(sd1_folder, tmp_path):
    """The hub cache links every file of `snapshots/<rev>/` to `blobs/`: the one place links may leave."""
    repo = tmp_path / "models--tiny--sd1"
    snapshot = repo / "snapshots" / "0123abc"
    shutil.copytree(sd1_folder, snapshot)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(p for p in snapshot.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.move(f, blob)
        f.symlink_to(os.path.relpath(blob, f.parent))
    assert minisd.load(snapshot).family.name == "sd1"


@pytest.mark.reliability(
    "load: diffusers folders",
    "a `variant=` that is a path (`../x`)",
    "`ValueError` naming the argument",
)
def test_variant_must_be_a_name(sd1_folder):
    with pytest.raises(ValueError, match=r"variant must be a weights variant name .*'../x'"):
        minisd.load(sd1_folder, variant="../x")


# ------------------------------------------------------------------------------ 7. SDXL "text_time" folders
@pytest.mark.reliability(
    "load: diffusers folders",
    (
        'an SDXL folder whose U-Net has `addition_embed_type: "text_time"` at a context width other than 2048'
        " or 1280 (tiny and custom models)"
    ),
    (
        "it loads: the folder's config.json decides the key table, and SDXL-family models export as "
        '"text_time" whatever their width'
    ),
)
@torch.no_grad()
def test_sdxl_folder_with_text_time_at_any_width(tmp_path):
    """A tiny SDXL model (context width 64) exports with SDXL's `addition_embed_type: "text_time"` (the
    family decides, not the width), diffusers' own UNet2DConditionModel takes the weights strictly, and
    the folder loads back by what its config.json says."""
    from diffusers import UNet2DConditionModel

    path = write(official_checkpoint("sdxl").tensors, tmp_path / "xl.safetensors")
    sd = minisd.load(path, config=tiny_config("sdxl"))
    assert sd.unet.config.context_dim not in (2048, 1280)
    minisd.save(sd, tmp_path / "xl", format="diffusers")
    config = json.loads((tmp_path / "xl" / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] == "text_time" and config["addition_time_embed_dim"] == 256
    theirs = UNet2DConditionModel.from_config({k: v for k, v in config.items() if k != "_class_name"})
    weights = safetensors.torch.load_file(str(tmp_path / "xl" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert "add_embedding.linear_1.weight" in weights
    theirs.load_state_dict(weights, strict=True)
    again = minisd.load(tmp_path / "xl")
    for k, v in sd.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[k], v), k


# ------------------------------------------------------------------------------ 8. the meta device
@pytest.mark.reliability(
    "load: checkpoint files",
    '`device="meta"` for any family, including SD2 files without metadata',
    (
        "loads without reading data, hashing or probing; the family's default prediction type, with the "
        "reason recorded in `prediction_reason`"
    ),
)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_on_meta_reads_nothing(family, tmp_path, monkeypatch):
    """Every family loads on meta: no tensor data read, no SHA-256, no probe. An SD2 file without
    metadata keeps the family's default prediction type and says why."""
    meta = {"modelspec.prediction_type": "v"} if family == "sd2-v" else None
    path = write(official_checkpoint(family).tensors, tmp_path / "m.safetensors", meta)
    _no_data_reads(monkeypatch)
    monkeypatch.setattr(sources, "sha256", lambda p: pytest.fail("hashed the file on meta"))
    monkeypatch.setattr(checkpoint, "probe_prediction_type", lambda u: pytest.fail("probed on meta"))
    sd = minisd.load(path, config=tiny_config(family), device="meta")
    assert sd.family.name == family and {p.device.type for p in sd.unet.parameters()} == {"meta"}
    if family == "sd2":
        assert sd.prediction_type == "epsilon" and sd.prediction_reason.startswith("device='meta': no weights")


def test_full_size_sd2_on_meta(tmp_path):
    """The reported crash: a full-size SD2 file without metadata on meta. A sparse file holds the real
    header (every key and shape) over 1.7 GB of holes that are never read."""
    header, offset = {}, 0
    for k, info in full_size_keys("sd2").items():
        size = 2 * math.prod(info.shape)
        header[k] = {"dtype": "F16", "shape": list(info.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    path = tmp_path / "v2-1_768-nometa.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    sd = minisd.load(path, device="meta")
    assert (sd.family.name, sd.prediction_type) == ("sd2", "epsilon")
    assert "neither the file's SHA-256 nor the probe" in sd.prediction_reason


# ------------------------------------------------------------------------------ 9. partial SDXL files
@pytest.mark.reliability(
    "load: checkpoint files",
    "a partial SDXL file: U-Net and CLIP-L, no OpenCLIP bigG",
    (
        "`CheckpointError` naming the encoder that is there and the one missing, with its key prefix "
        "`conditioner.embedders.1.model.`"
    ),
)
def test_sdxl_file_without_bigg_names_the_missing_encoder(tmp_path):
    t = {k: v for k, v in official_checkpoint("sdxl").tensors.items() if not k.startswith("conditioner.embedders.1.")}
    path = write(t, tmp_path / "xl-partial.safetensors")
    match = (r"xl-partial.safetensors: partial sdxl checkpoint: the U-Net \(context width 64\) and OpenAI CLIP "
             r"ViT-L/14 \(`conditioner.embedders.0.transformer.\*`\) are there, but its text encoder OpenCLIP "
             r"ViT-bigG/14 \(`conditioner.embedders.1.model.\*`\) is missing")  # fmt: skip
    with pytest.raises(CheckpointError, match=match):
        minisd.detect(path)
    with pytest.raises(CheckpointError, match=match):
        minisd.load(path, config=tiny_config("sdxl"))


def test_header_is_validated_once_for_detect_and_load(sd1_file, monkeypatch):
    """detect and load read headers through the same validating reader (so they cannot disagree)."""
    seen = []
    real = detection.read_safetensors_header

    def spy(path):
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(detection, "read_safetensors_header", spy)
    monkeypatch.setattr(sources, "read_safetensors_header", spy)
    minisd.detect(sd1_file)
    minisd.load(sd1_file, config=tiny_config("sd1"))
    assert seen == [sd1_file, sd1_file]
