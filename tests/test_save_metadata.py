"""Files written by `minisd.save` record their architecture (metadata `minisd.config`) and reload
without `config=`: tiny and custom models (the shipped tiny model among them) take the ordinary path."""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch

import minisd
from minisd.keymap import CheckpointError
from tests.tiny import official_checkpoint, tiny_config


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_saved_file_reloads_without_config(family, tmp_path):
    src = tmp_path / "in.safetensors"
    meta = {"modelspec.prediction_type": "epsilon"}
    safetensors.torch.save_file(official_checkpoint(family).tensors, str(src), metadata=meta)
    with pytest.raises(CheckpointError):  # a tiny file is not the official preset
        minisd.load(src)
    sd = minisd.load(src, config=tiny_config(family))
    minisd.save(sd, tmp_path / "out.safetensors")
    again = minisd.load(tmp_path / "out.safetensors")
    assert again.family == sd.family
    for ours, theirs in ((again.unet, sd.unet), (again.vae, sd.vae), *zip(again.text_encoders, sd.text_encoders)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unreadable_recorded_config_is_named(tmp_path):
    src = tmp_path / "in.safetensors"
    safetensors.torch.save_file(official_checkpoint("sd1").tensors, str(src))
    sd = minisd.load(src, config=tiny_config("sd1"))
    out = tmp_path / "out.safetensors"
    minisd.save(sd, out)
    with safetensors.safe_open(str(out), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for bad, match in (("{not json", "not valid JSON"), (json.dumps({"unet": {"depth": 3}}), "unknown UNetConfig")):
        safetensors.torch.save_file(tensors, str(out), metadata={**meta, "minisd.config": bad})
        with pytest.raises(CheckpointError, match=f"minisd.config.*{match}"):
            minisd.load(out)


def test_a_model_generates_at_its_own_training_size_by_default(tmp_path):
    """The shipped model was trained at 32 px: without width/height it must not draw at SD1's 512 (a
    silently wrong picture). Its file records the size (`minisd.config` default_size), and a save keeps it."""
    sd = minisd.load(minisd.TINY)
    assert sd.family.default_size == 32
    image = sd.generate("a red circle on a blue background", steps=2, seed=0)[0]
    assert image.size == (32, 32)
    again = minisd.load(minisd.save(sd, tmp_path / "copy.safetensors"))
    assert again.family.default_size == 32
    with pytest.raises(ValueError, match=r"default_size must be a positive number of pixels, got '32'"):
        minisd.load(minisd.TINY, config={"default_size": "32"})
