"""Model and sequential offload (`minisd.offload`), and VAE tiling when a decode would not fit.

There is no GPU here: the CPU plays both the accelerator and the host. The hooks still run, count
their moves and (sequential offload) swap each layer's weights for a copy during its forward, so the
tests check what moves when, that the outputs are bit-identical to the model without offload, and
that nothing is left behind. benchmarks/gpu_check.py measures peak VRAM and seconds per image.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import minisd
from minisd.offload import DECODE_MAPS, decode_bytes, tile_size_for
from minisd.vae import SD_VAE
from tests.tiny import official_checkpoint, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
GEN = dict(steps=2, width=16, height=16, seed=0, output="tensor")


@pytest.fixture(scope="module")
def sd1_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload") / "sd1.safetensors"
    safetensors.torch.save_file(official_checkpoint("sd1").tensors, str(path))
    return path


def _load(path):
    return minisd.load(path, config=tiny_config("sd1"))


def _hooks(sd) -> int:
    modules = [m for c in [sd.unet, sd.vae, *sd.text_encoders] for m in c.modules()]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def test_model_offload_moves_each_component_once_per_generation(sd1_path):
    sd = _load(sd1_path)
    expected = sd.generate("a cat", **GEN)
    sd.enable_model_offload("cpu")
    assert sd.device == torch.device("cpu") and _hooks(sd) > 0
    out = sd.generate("a cat", **GEN)
    assert torch.equal(out, expected)
    # text encoder, then the U-Net (both guided steps: no move), then the VAE
    assert sd.offload.moves == 3 and sd.offload.active is sd.vae
    sd.generate("a cat", **GEN)
    assert sd.offload.moves == 6
    sd.disable_offload()
    assert sd.offload is None and _hooks(sd) == 0
    assert torch.equal(sd.generate("a cat", **GEN), expected)


def test_sequential_offload_swaps_each_layers_weights_for_its_forward_only(sd1_path):
    sd = _load(sd1_path)
    expected = sd.generate("a cat", **GEN)
    masters = {id(p): p.data_ptr() for c in [sd.unet, sd.vae, *sd.text_encoders] for p in c.parameters()}
    sd.enable_sequential_offload("cpu")
    seen = []  # during each Linear's forward: is its weight the host master?
    for m in sd.unet.modules():
        if isinstance(m, torch.nn.Linear):  # registered after the offload's hook, so it runs after it
            m.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr() == masters[id(m.weight)]))
    out = sd.generate("a cat", **GEN)
    assert torch.equal(out, expected)
    assert seen and not any(seen)  # a copy (on a GPU: the device copy) during every forward
    now = {id(p): p.data_ptr() for c in [sd.unet, sd.vae, *sd.text_encoders] for p in c.parameters()}
    assert now == masters  # every weight back on its host master afterwards: nothing left on the device
    assert sd.offload.moves >= len(masters)
    sd.disable_offload()
    assert _hooks(sd) == sum(isinstance(m, torch.nn.Linear) for m in sd.unet.modules())  # only the spies remain


def test_decode_bytes_by_hand():
    """SD's VAE, 64x64 latent, fp32: the largest map is level 1 after its upsample, 256 channels at
    512x512; plus the mid-block attention's 4096^2 fp32 scores. The H100 measured 1,090 MiB
    (benchmarks/README.md), which the estimate must not undercut."""
    largest = 256 * 512 * 512
    expected = DECODE_MAPS * largest * 4 + 4 * 4096**2
    assert decode_bytes(SD_VAE, (64, 64), 1, torch.float32) == expected
    assert expected > 1090 * 2**20
    assert decode_bytes(SD_VAE, (64, 64), 2, torch.bfloat16) == 2 * (DECODE_MAPS * largest * 2 + 4 * 4096**2)


def test_decode_tiles_only_when_it_would_not_fit(sd1_path, monkeypatch):
    sd = _load(sd1_path)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = []
    real = type(sd.vae).decode_tiled

    def spy(self, z, tile_size):
        calls.append(tile_size)
        return real(self, z, tile_size=tile_size)

    monkeypatch.setattr(type(sd.vae), "decode_tiled", spy)
    whole = sd.decode(latents, output="tensor")  # on the CPU without a budget: never tiled
    assert calls == []
    need = decode_bytes(sd.vae.config, (32, 32), 1, torch.float32)
    sd.vae_tiling = need  # a budget it fits in
    sd.decode(latents, output="tensor")
    assert calls == []
    sd.vae_tiling = need // 4  # a budget it does not fit in: tiles small enough to fit
    tiled = sd.decode(latents, output="tensor")
    assert len(calls) == 1 and calls[0] < 32
    assert decode_bytes(sd.vae.config, (calls[0],) * 2, 1, torch.float32) <= need // 4
    assert calls[0] == tile_size_for(sd.vae.config, latents, torch.float32, need // 4)
    # blended tiles approximate the whole decode (GroupNorm and attention per tile): same picture
    assert (tiled - whole).abs().mean() < 0.1
    sd.vae_tiling = True
    sd.decode(latents, output="tensor")
    assert calls[-1] == 64
