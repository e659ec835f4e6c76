"""How `minisd.load` reads a file: each tensor read once, straight into its final memory (or left a view
of the file's map with `mmap=True`), never through torch's meta `cat` (which imports torch._dynamo); the
tokenizer's vocabulary read on first use; the SD2 probe at its smallest deciding size, in the load's dtype;
the meta device reading nothing; and, for accelerators, the per-tensor path from the file to the device.
(Times are not asserted here: benchmarks/bench_load.py measures them.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

import minisd
from minisd import checkpoint, sources
from minisd.detection import PROBE_SIZE, probe_prediction_type
from minisd.families import FAMILIES
from minisd.keymap import TRANSFORMS
from tests.tiny import official_checkpoint, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "probe-v.safetensors"


def write(tensors: dict, path: Path) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def fp16_sd1(tmp_path_factory) -> Path:
    """A tiny SD1 file stored in fp16 throughout (as the official fp16 files are)."""
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in official_checkpoint("sd1").tensors.items()}
    return write(tensors, tmp_path_factory.mktemp("fp16") / "sd1-fp16.safetensors")


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path` (Linux /proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi))
    return out


def _in_map(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi in ranges)


def test_mmap_load_assigns_views_of_the_file_without_copies(fp16_sd1):
    """fp16 file, fp16 load, `mmap=True`: every U-Net and text-encoder weight that needs no transform is
    the file's mapped memory itself; the VAE (cast to fp32) and the fused q/k/v are not (their own memory)."""
    sd = minisd.load(fp16_sd1, config=tiny_config("sd1"), dtype=torch.float16, mmap=True)
    ranges = _mapped_ranges(fp16_sd1)
    assert ranges, "the file is not mapped"
    assert all(_in_map(p, ranges) for p in sd.unet.parameters())
    assert not any(_in_map(p, ranges) for p in sd.vae.parameters())
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float32}
    text = dict(sd.text_encoders[0].named_parameters())
    assert not _in_map(text["transformer.resblocks.0.attn.in_proj_weight"], ranges)  # q, k, v concatenated
    assert _in_map(text["transformer.resblocks.0.mlp.c_fc.weight"], ranges)


def test_default_load_owns_its_memory_and_reads_each_tensor_once(fp16_sd1, monkeypatch):
    """Without `mmap`, no weight points into a map of the file, and each tensor is read exactly once
    (a `k in mapping` test once read every tensor a second time, and took twice the memory)."""
    reads = []
    real = sources._read_copy

    def spy(f, offset, info, path):
        reads.append(offset)
        return real(f, offset, info, path)

    monkeypatch.setattr(sources, "_read_copy", spy)
    sd = minisd.load(fp16_sd1, config=tiny_config("sd1"), dtype=torch.float16)
    ranges = _mapped_ranges(fp16_sd1)
    modules = [sd.unet, sd.vae, *sd.text_encoders]
    assert not any(_in_map(p, ranges) for m in modules for p in m.parameters())
    assert len(reads) == len(set(reads))
    # every tensor of the file but the ignored extras (the stored schedule is checked through the map: 4 kB)
    with safetensors.safe_open(str(fp16_sd1), "pt") as f:
        n_keys = len(f.keys())
    assert len(reads) == n_keys - len(sd.ignored)


def test_reading_on_threads_gives_the_same_model_and_its_errors(fp16_sd1, tmp_path, monkeypatch):
    """`LazyTensors.prefetch` (on by default where there are 2+ CPUs): 4 reader threads load the very
    same tensors as one, each read once and owned; a file truncated since its header was read still
    gives the loader's own error, raised from the thread that hit it."""
    monkeypatch.setattr(sources, "READ_THREADS", 1)
    one = minisd.load(fp16_sd1, config=tiny_config("sd1"), dtype=torch.float16)
    reads = []
    real = sources._read_copy
    threads = set()

    def spy(*args):
        reads.append(args[1])
        threads.add(threading.current_thread().name.split("_")[0])
        return real(*args)

    monkeypatch.setattr(sources, "_read_copy", spy)
    monkeypatch.setattr(sources, "READ_THREADS", 4)
    four = minisd.load(fp16_sd1, config=tiny_config("sd1"), dtype=torch.float16)
    assert len(reads) == len(set(reads)) and reads
    assert threads == {"minisd-read"}  # read on the reader threads, not the caller's
    ranges = _mapped_ranges(fp16_sd1)
    for a, b in zip((one.unet, one.vae, *one.text_encoders), (four.unet, four.vae, *four.text_encoders)):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
        assert not any(_in_map(p, ranges) for p in b.parameters())
    short = tmp_path / "short.safetensors"
    short.write_bytes(fp16_sd1.read_bytes())
    source = sources.SingleFile(short, allow_pickle=False)  # header read; now the data goes missing
    os.truncate(short, short.stat().st_size // 2)
    lazy = sources.LazyTensors(source.tensors, torch.float16, torch.device("cpu"), copy=True)
    keys = sorted(source.tensors.infos)
    lazy.prefetch(keys, workers=4)
    with pytest.raises(minisd.CheckpointError, match="short.safetensors: the file ended while reading"):
        for k in keys:
            lazy[k]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_meta_reads_no_data(family, tmp_path, monkeypatch):
    """On meta neither a map view nor a plain read is made (and, as tests/test_robust_files.py checks,
    neither a hash nor the probe)."""
    path = write(official_checkpoint(family).tensors, tmp_path / "m.safetensors")
    monkeypatch.setattr(sources, "_read_copy", lambda *a: pytest.fail("read a tensor on meta"))
    monkeypatch.setattr(checkpoint, "probe_prediction_type", lambda u: pytest.fail("probed on meta"))
    monkeypatch.setattr(sources, "sha256", lambda p: pytest.fail("hashed the file on meta"))
    sd = minisd.load(path, config=tiny_config(family), device="meta")
    assert {p.device.type for m in [sd.unet, sd.vae, *sd.text_encoders] for p in m.parameters()} == {"meta"}


def test_accelerator_path_reads_tensor_by_tensor(fp16_sd1, monkeypatch):
    """Off the CPU, each tensor is read into a host buffer of its own size (never through the map) and
    moved at once: there is no host copy of the whole model. Checked with a stand-in device whose `.to`
    records the move (no GPU here; benchmarks/gpu_load_check.py measures the real one)."""
    source = sources.SingleFile(fp16_sd1, allow_pickle=False)
    for k in source.tensors.readers:
        source.tensors.readers[k] = lambda: pytest.fail("read through the map for a device load")
    moves = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if isinstance(kwargs.get("device"), torch.device) and kwargs["device"].type == "cuda":
            moves.append((self.numel(), self.untyped_storage().nbytes(), kwargs["dtype"]))
            kwargs["device"] = "cpu"
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    lazy = sources.LazyTensors(source.tensors, torch.float16, torch.device("cuda"), copy=False)
    keys = [k for k in source.tensors.infos if k.startswith("model.diffusion_model.")]
    for k in keys:
        lazy[k]
    # one move per tensor, each from a host buffer holding that tensor alone
    assert len(moves) == len(keys)
    assert all(nbytes == 2 * numel and dtype == torch.float16 for numel, nbytes, dtype in moves)


def test_shape_rules_match_the_transforms():
    """`sources.transformed_shape` (used to check a header before reading) is what each transform makes."""
    cases = {
        "identity": [[(4, 3)], [(5,)]],
        "transpose": [[(4, 3)], [(5,)], [(2, 3, 4)]],
        "concat0": [[(4, 3), (4, 3), (4, 3)], [(6,), (6,), (6,)], [(4, 3), (4, 2)], [(4, 3), (4,)], [(), ()]],
        "linear_to_conv1x1": [[(4, 3)], [(4, 3, 1, 1)]],
    }
    assert set(cases) == set(TRANSFORMS)
    for name, shape_lists in cases.items():
        for shapes in shape_lists:
            try:
                expected = tuple(TRANSFORMS[name][0]([torch.zeros(s) for s in shapes]).shape)
            except (RuntimeError, IndexError):
                expected = None
            assert sources.transformed_shape(name, shapes) == expected, (name, shapes)


def test_probe_runs_once_at_its_size_in_the_load_dtype(monkeypatch):
    """An SD2 file without metadata is probed by one U-Net call on two `PROBE_SIZE` latents, in the
    load's dtype (fp16 stays fp16: no fp32 U-Net), and the trained fixture is still told right."""
    calls = []

    def spy(unet):
        unet.register_forward_pre_hook(lambda m, args: calls.append((tuple(args[0].shape), args[0].dtype)))
        return probe_prediction_type(unet)

    monkeypatch.setattr(checkpoint, "probe_prediction_type", spy)
    sd = minisd.load(FIXTURE, dtype=torch.float16)
    assert calls == [((2, 4, PROBE_SIZE, PROBE_SIZE), torch.float16)]
    assert sd.prediction_type == "v_prediction" and sd.dtype == torch.float16


_FRESH = r"""
import json, sys, torch, minisd
from minisd import tokenizer
dynamo_at_import = "torch._dynamo" in sys.modules
sd = minisd.load(sys.argv[1], config=json.loads(sys.argv[2]))
print(dynamo_at_import, "torch._dynamo" in sys.modules, tokenizer._shipped_vocabulary.cache_info().currsize)
sd.encode_prompt("a cat")
print(tokenizer._shipped_vocabulary.cache_info().currsize)
"""


def test_load_imports_no_compiler_and_reads_no_vocabulary(tmp_path):
    """In a fresh process: loading does not import torch._dynamo (1.3 s or more) nor read the BPE
    vocabulary (a third of a second); the first prompt reads it."""
    path = write(official_checkpoint("sd1").tensors, tmp_path / "sd1.safetensors")
    cfg = tiny_config("sd1")
    config = json.dumps({"unet": dataclasses.asdict(cfg["unet"]), "vae": dataclasses.asdict(cfg["vae"]),
                         "text_encoders": [dataclasses.asdict(c) for c in cfg["text_encoders"]]})  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", _FRESH, str(path), config], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.split("\n")[:2]
    dynamo_at_import, dynamo_after_load, vocab_after_load = first.split()
    assert dynamo_after_load == dynamo_at_import  # the load itself imported nothing of the compiler
    assert (vocab_after_load, second) == ("0", "1")
