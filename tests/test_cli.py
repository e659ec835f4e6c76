"""The `minisd` command line: info, convert, generate, demo, and its error handling."""

from __future__ import annotations

import dataclasses
import json

import safetensors.torch
import torch
from PIL import Image

import minisd
from minisd import cli, detection
from minisd.checkpoint import apply_config
from tests.tiny import official_checkpoint, tiny_config


def tiny_file(tmp_path, family="sd1", **kw):
    path = tmp_path / f"{family}.safetensors"
    safetensors.torch.save_file(official_checkpoint(family, **kw).tensors, str(path))
    return path


def config_json(tmp_path, family="sd1"):
    cfg = tiny_config(family)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"unet": dataclasses.asdict(cfg["unet"]), "vae": dataclasses.asdict(cfg["vae"]),
                                "text_encoders": [dataclasses.asdict(c) for c in cfg["text_encoders"]]}))
    return path


def test_info_reports_family_evidence_counts_and_ignored(tmp_path, capsys, monkeypatch):
    path = tiny_file(tmp_path, "sdxl", ema=True)
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family:      sdxl" in out and "conditioner.embedders.1.model.ln_final.weight present" in out
    assert "EMA copy of the U-Net (pass use_ema=True" in out and "292 key(s)" in out
    assert "text encoder 1 (open_clip)" in out and "F32 x806" in out
    assert "differs from the official sdxl preset" in out  # a tiny model is not the full-size preset
    assert "(not a known official file)" in out
    # with the tiny architecture as "the preset" and the file's hash as "official", info says so
    digest = detection.sha256(path)
    monkeypatch.setitem(detection.KNOWN_SHA256, digest, ("sd_xl_base_1.0.safetensors", "sdxl"))
    detected = cli.detect(path)
    tiny = dataclasses.replace(detected, family=apply_config(detected.family, tiny_config("sdxl")))
    monkeypatch.setattr(cli, "detect", lambda p: tiny)
    cli.main(["info", str(path)])
    out = capsys.readouterr().out
    assert "the official sdxl preset, key for key" in out and "= official sd_xl_base_1.0.safetensors" in out


def test_sd2_prediction_from_a_known_hash(tmp_path, monkeypatch):
    path = tiny_file(tmp_path, "sd2")
    monkeypatch.setitem(detection.KNOWN_SHA256, detection.sha256(path), ("v2-1_768-ema-pruned.safetensors", "sd2-v"))
    sd = minisd.load(path, config=tiny_config("sd2"))
    assert (sd.family.name, sd.prediction_type) == ("sd2-v", "v_prediction")
    assert sd.prediction_reason == "SHA-256 of the official v2-1_768-ema-pruned.safetensors"


def test_convert_ckpt_needs_allow_pickle(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": official_checkpoint("sd1").tensors}, ckpt)
    cfg = config_json(tmp_path)
    out = tmp_path / "model.safetensors"
    assert cli.main(["convert", str(ckpt), str(out), "--config", str(cfg)]) == 2
    assert "refuses them by default" in capsys.readouterr().err and not out.exists()
    assert cli.main(["convert", str(ckpt), str(out), "--config", str(cfg), "--allow-pickle"]) == 0
    assert minisd.detect(out).family.name == "sd1"
    assert cli.main(["convert", str(ckpt), str(out), "--config", str(cfg), "--allow-pickle"]) == 2  # exists
    assert "exists" in capsys.readouterr().err


def test_generate_writes_png(tmp_path, capsys):
    path, cfg, out = tiny_file(tmp_path), config_json(tmp_path), tmp_path / "cat.png"
    args = ["generate", str(path), "a cat", "-o", str(out), "--config", str(cfg), "--steps", "2",
            "--width", "64", "--height", "64", "--device", "cpu"]
    assert cli.main(args) == 0
    assert Image.open(out).size == (64, 64)
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err  # the user's file is kept


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "-o", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert "family:      sd1" in capsys.readouterr().out
