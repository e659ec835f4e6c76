"""Standalone VAE files (`sd.load_vae`, `minisd.load(..., vae=)`) against diffusers' AutoencoderKL.

The model is a tiny official SD1 file (tests/tiny.py). The swapped-in VAE has other random weights; its
reference is diffusers' `AutoencoderKL` built by diffusers' own single-file converter
(`convert_ldm_vae_checkpoint`) from the official keys, and that reference's own `save_pretrained`
writes the diffusers layouts. Every layout must decode the same latents as the reference does.

Tolerance: both sides run the same fp32 convolutions and GroupNorms in another order (SDPA vs
diffusers' attention processor in the mid block): the decoded pixels agree to a few 1e-7 of their
range; 1e-5 leaves room for other CPUs' kernels, while a wrong or swapped weight moves them by O(1).

The fp16 test crafts a VAE whose decoder input convolution is scaled up 10^5 times: its activations
(about 10^5) exceed fp16's 65504 but are harmless in fp32, where every GroupNorm normalises them.
"""

from __future__ import annotations

import json
import logging

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

import minisd
from minisd import vae_files
from minisd.families import VAE_PREFIX
from minisd.keymap import CheckpointError
from minisd.known_files import KnownVAE
from minisd.vae import AutoencoderKL
from tests.test_vae import _diffusers_config as vae_diffusers_config
from tests.test_vae import _perturb_norms
from tests.tiny import official_checkpoint, tiny_config
from tests.utils import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

DECODE_REL = 1e-5  # see the module docstring


def _save(tensors: dict[str, torch.Tensor], path, metadata=None):
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny SD1 checkpoint, another VAE's official weights, and diffusers' reference for them."""
    tmp = tmp_path_factory.mktemp("vae_swap")
    ckpt = _save(official_checkpoint("sd1", seed=0).tensors, tmp / "sd1.safetensors")
    torch.manual_seed(123)
    other = _perturb_norms(AutoencoderKL(tiny_config("sd1")["vae"]), seed=123)
    official = {k: v.detach().clone() for k, v in other.state_dict().items()}
    prefixed = {VAE_PREFIX + k: v for k, v in official.items()}
    config = vae_diffusers_config(other.config, prefixed)
    ref = DiffusersVAE(**config).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(prefixed, config), strict=True)
    return dict(tmp=tmp, ckpt=ckpt, official=official, ref=ref)


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _load(files, **kwargs):
    return minisd.load(files["ckpt"], config=tiny_config("sd1"), **kwargs)


@torch.no_grad()
def _reference_decode(ref: DiffusersVAE, latents: torch.Tensor, scale: float) -> torch.Tensor:
    return (ref.decode(latents / scale).sample / 2 + 0.5).clamp(0, 1)  # diffusers' VaeImageProcessor


def _layouts(files) -> dict:
    """The swapped VAE written in every layout minisd reads: {name: path}."""
    tmp, official = files["tmp"], files["official"]
    extras = {"loss.discriminator.main.0.weight": torch.ones(2, 3), "loss.logvar": torch.zeros(()),
              "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}  # fmt: skip
    folder = tmp / "diffusers_vae"
    files["ref"].save_pretrained(folder, safe_serialization=True)
    diffusers_weights = safetensors.torch.load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    legacy = tmp / "legacy_vae"
    legacy.mkdir(exist_ok=True)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for k, v in diffusers_weights.items():
        for new, before in renames.items():
            k = k.replace(new, before)
        old[k] = v
    _save(old, legacy / "diffusion_pytorch_model.safetensors")
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    ckpt = tmp / "vae.ckpt"
    torch.save({"state_dict": {**official, **extras}}, ckpt)
    pipeline_folder = tmp / "pipeline"
    (pipeline_folder / "vae").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (pipeline_folder / "vae" / name).write_bytes((folder / name).read_bytes())
    return {
        "official": _save({**official, **extras}, tmp / "vae-ft-like.safetensors"),
        "official, prefixed": _save({VAE_PREFIX + k: v for k, v in official.items()}, tmp / "prefixed.safetensors"),
        "diffusers folder": folder,
        "diffusers file": folder / "diffusion_pytorch_model.safetensors",
        "diffusers < 0.14 names": legacy,
        "pipeline folder (vae/)": pipeline_folder,
        "official .ckpt": ckpt,
    }


@torch.no_grad()
def test_every_layout_decodes_as_diffusers(files):
    sd = _load(files)
    z = _latents() * sd.scale_factor
    before = sd.decode(z, output="tensor")
    expected = _reference_decode(files["ref"], z, sd.scale_factor)
    assert (before - expected).abs().max() > 0.05  # the checkpoint's own VAE decodes otherwise
    for name, path in _layouts(files).items():
        sd.load_vae(path, allow_pickle=name.endswith(".ckpt"))
        assert_rel_close(sd.decode(z, output="tensor"), expected, DECODE_REL, name)
        assert sd.vae.dtype == torch.float32 and sd.vae_precision.upcast, name


@torch.no_grad()
def test_load_with_vae_argument(files):
    path = _layouts(files)["official"]
    sd = _load(files, vae=path)
    z = _latents(1) * sd.scale_factor
    assert_rel_close(sd.decode(z, output="tensor"), _reference_decode(files["ref"], z, sd.scale_factor), DECODE_REL)


@pytest.mark.reliability(
    "load: VAE files",
    "a VAE whose shapes do not fit the model (another architecture), or a file that is not a VAE",
    "CheckpointError naming the file, every key with its expected and found shape, or what the file holds",
)
def test_a_vae_that_does_not_fit_is_refused(files):
    sd = _load(files)
    wide = AutoencoderKL(tiny_config("sd1")["vae"].__class__(ch=64, ch_mult=(1, 2), num_res_blocks=1))
    path = _save(wide.state_dict(), files["tmp"] / "wide_vae.safetensors")
    with pytest.raises(CheckpointError) as e:
        sd.load_vae(path)
    msg = str(e.value)
    assert str(path) in msg and "wrong shape" in msg
    assert "encoder.conv_in.weight (expected (32, 3, 3, 3), got (64, 3, 3, 3)" in msg
    not_vae = _save({"lora_unet_down.lora_down.weight": torch.zeros(2, 2)}, files["tmp"] / "lora.safetensors")
    with pytest.raises(CheckpointError, match="not a VAE file minisd knows"):
        sd.load_vae(not_vae)
    with pytest.raises(CheckpointError, match="not a VAE file.*a full checkpoint"):
        sd.load_vae(files["ckpt"])


@pytest.mark.reliability(
    "load: VAE files",
    "a VAE file with keys no layout explains, or a pickled .ckpt without allow_pickle",
    "CheckpointError listing the unexpected keys; the pickle refused before it is opened",
)
def test_unknown_keys_and_pickles_are_refused(files):
    sd = _load(files)
    path = _save({**files["official"], "decoder.extra.weight": torch.zeros(3)}, files["tmp"] / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): decoder.extra.weight"):
        sd.load_vae(path)
    with pytest.raises(CheckpointError, match="pickled checkpoints can run arbitrary code"):
        sd.load_vae(_layouts(files)["official .ckpt"])
    missing = {k: v for k, v in files["official"].items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): decoder.conv_out.bias"):
        sd.load_vae(_save(missing, files["tmp"] / "missing.safetensors"))


# --------------------------------------------------------------------------- fp16: the upcast decision
def _overflowing(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same VAE with its decoder input convolution scaled by 1e5: activations far above 65504."""
    out = dict(official)
    for k in ("decoder.conv_in.weight", "decoder.conv_in.bias"):
        out[k] = official[k] * 1e5
    return out


@torch.no_grad()
def test_fp16_decoding_upcasts_unless_the_vae_is_recorded_fp16_safe(files, caplog, monkeypatch):
    tmp = files["tmp"]
    sd = _load(files, dtype=torch.float16)
    # a single file records no precision: its VAE decodes in fp32 under an fp16 model (diffusers' default)
    assert sd.vae.dtype == torch.float32 and sd.vae_precision.upcast
    z = _latents(2) * sd.scale_factor

    # The overflowing VAE: finite in fp32, and loaded in fp32 by default (no record says fp16-safe).
    broken = _save(_overflowing(files["official"]), tmp / "overflowing.safetensors")
    sd.load_vae(broken)
    assert sd.vae.dtype == torch.float32 and "force_upcast=True" in sd.vae_precision.reason
    fp32 = sd.decode(z, output="tensor")
    assert torch.isfinite(fp32).all()
    # Forced into fp16 it overflows: inf/NaN from its first convolution on.
    sd.load_vae(broken, upcast=False)
    assert sd.vae.dtype == torch.float16
    raw = sd.vae._decode((z / sd.scale_factor).half())
    assert not torch.isfinite(raw).all()

    # The "fixed" VAE: a diffusers folder whose config.json says force_upcast false; it stays fp16.
    folder = tmp / "fp16_fix"
    files["ref"].save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    sd.load_vae(folder)
    assert sd.vae.dtype == torch.float16 and not sd.vae_precision.upcast
    assert "force_upcast false" in sd.vae_precision.reason
    with caplog.at_level(logging.WARNING, logger="minisd.vae"):
        half = sd.decode(z, output="tensor")
    assert sd.vae.dtype == torch.float16 and not caplog.records  # no overflow, no upcast
    # fp16 round-off (2^-11 relative) over ~20 layers of the tiny decoder: measured ~1e-3 of the range
    assert_rel_close(half, _reference_decode(files["ref"], z, sd.scale_factor), 1e-2, "fp16 decode")

    # A known file's SHA-256 records it too (the official-layout fp16-fix file has no config.json).
    official = _save(files["official"], tmp / "fixed_official.safetensors")
    monkeypatch.setitem(vae_files.KNOWN_VAES, minisd.detection.sha256(official), KnownVAE("fixed", fp16_safe=True))
    sd.load_vae(official)
    assert sd.vae.dtype == torch.float16 and sd.vae_precision.reason == "SHA-256 of fixed"
