"""`minisd generate` reaches every pipeline, maps its options to the library exactly, and exits cleanly.

The reference for each command is the library call it stands for, made directly (`StableDiffusion.generate`,
`model.base_then_refiner`): the command line holds no logic of its own, so the images must be equal bit for
bit on the CPU (same code, same thread count, same draws). The hires fix is checked against the two passes
composed by hand from public calls, and its latent upscale against `F.interpolate` as A1111 calls it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import minisd
from minisd import cli
from minisd.model import base_then_refiner
from minisd.progress import LATENT_RGB, Preview, ProgressBar, latents_to_rgb
from minisd.samplers import SAMPLER_NAMES
from tests.test_cli import config_json, one_error_line, tiny_file

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def tiny():
    return minisd.load(minisd.TINY)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def run(tmp_path, *argv) -> int:
    return cli.main(["generate", *argv, "--device", "cpu"])


def test_txt2img_options_reach_the_library(tmp_path, tiny, capsys):
    out = tmp_path / "a.png"
    argv = [PROMPT, "-o", str(out), "--steps", "3", "--sampler", "euler_a", "--seed", "5", "--guidance", "4",
            "--clip-skip", "2", "--negative", "green", "--num-images", "2", "--guidance-rescale", "0.3"]
    assert run(tmp_path, *argv) == 0
    assert capsys.readouterr().err == ""  # not a terminal: no progress bar
    # A1111's clip skip 2 is the library's clip_skip=1; image i has seed 5 + i, drawn alone (noise="a1111")
    kw = dict(negative_prompt="green", steps=3, sampler="euler_a", guidance_scale=4.0, clip_skip=1,
              guidance_rescale=0.3, width=32, height=32, noise="a1111")
    for i, path in enumerate([out, tmp_path / "a-1.png"]):
        expected = np.asarray(tiny.generate(PROMPT, seed=5 + i, **kw)[0])
        assert np.array_equal(pixels(path), expected), path


def test_img2img_and_inpainting_reach_the_library(tmp_path, tiny):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(init)
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None] * 8, (32, 1))).save(mask)  # right half repainted
    assert run(tmp_path, PROMPT, "-o", str(tmp_path / "i.png"), "--init-image", str(init), "--strength", "0.6",
               "--steps", "4", "--seed", "2") == 0  # fmt: skip
    expected = tiny.generate(PROMPT, init_image=Image.open(init), strength=0.6, steps=4, seed=2, noise="a1111")[0]
    assert np.array_equal(pixels(tmp_path / "i.png"), np.asarray(expected))
    assert run(tmp_path, PROMPT, "-o", str(tmp_path / "m.png"), "--init-image", str(init), "--mask", str(mask),
               "--steps", "3", "--seed", "2") == 0  # fmt: skip
    expected = tiny.generate(PROMPT, init_image=Image.open(init), mask_image=Image.open(mask), steps=3, seed=2,
                             noise="a1111")[0]  # fmt: skip
    assert np.array_equal(pixels(tmp_path / "m.png"), np.asarray(expected))
    assert "Denoising strength: 0.6" in Image.open(tmp_path / "i.png").text["parameters"]


def test_hires_fix_is_two_passes(tmp_path, tiny):
    """The library's hires fix equals txt2img, A1111's latent upscale (bilinear, no antialias) and an img2img
    that runs exactly --hires-steps steps: A1111 runs the last n of int(n / strength) steps
    (sd_samplers_common.setup_img2img_steps), i.e. diffusers' img2img with steps=int(n / s), strength=s."""
    got = tiny.generate(PROMPT, steps=4, seed=3, width=32, height=32, hires_scale=2, hires_strength=0.5, hires_steps=3,
                        output="latent")
    g = torch.Generator().manual_seed(3)
    first = tiny.generate(PROMPT, steps=4, generator=g, width=32, height=32, output="latent")
    up = F.interpolate(first, scale_factor=2, mode="bilinear", antialias=False)
    second = tiny.generate(PROMPT, init_latents=up, strength=0.5, steps=6, generator=g, output="latent")
    assert got.shape == (1, 4, 16, 16) and torch.equal(got, second)  # 64x64 pixels, VAE factor 4
    # the command line: the same call; the PNG says so as A1111 does (Size is the first pass's)
    assert run(tmp_path, PROMPT, "-o", str(tmp_path / "h.png"), "--steps", "4", "--seed", "3", "--hires-scale", "2",
               "--hires-strength", "0.5", "--hires-steps", "3") == 0  # fmt: skip
    assert np.array_equal(pixels(tmp_path / "h.png"), np.asarray(tiny.decode(got)[0]))
    text = Image.open(tmp_path / "h.png").text["parameters"]
    assert "Size: 32x32" in text and "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent" in text
    # pixel upscaling: the decoded image resized and encoded again, at the larger size
    pixel = tiny.generate(PROMPT, steps=2, seed=3, width=32, height=32, hires_scale=2, hires_upscale="pixel",
                          hires_steps=1)[0]
    assert pixel.size == (64, 64)
    with pytest.raises(ValueError, match="hires_scale is a text-to-image pass"):
        tiny.generate(PROMPT, steps=2, hires_scale=2, init_image=pixel.resize((32, 32)), width=32, height=32)


@pytest.mark.reliability("command line", "`--refiner` with the SDXL base",
                         "the base stops at --refiner-at and the refiner ends, as `model.base_then_refiner`")
def test_refiner_handoff(tmp_path):
    base_path, refiner_path = tiny_file(tmp_path, "sdxl"), tiny_file(tmp_path, "sdxl-refiner")
    base_cfg = config_json(tmp_path, "sdxl").rename(tmp_path / "base.json")
    refiner_cfg = config_json(tmp_path, "sdxl-refiner")
    out = tmp_path / "r.png"
    assert run(tmp_path, "a lion", "--model", str(base_path), "--config", str(base_cfg), "--refiner",
               str(refiner_path), "--refiner-config", str(refiner_cfg), "--refiner-at", "0.5", "--steps", "4",
               "--width", "64", "--height", "64", "-o", str(out)) == 0  # fmt: skip
    base = minisd.load(base_path, config=base_cfg)
    refiner = minisd.load(refiner_path, config=refiner_cfg)
    kw = dict(steps=4, width=64, height=64, guidance_scale=5.0)
    expected = base_then_refiner(base, refiner, "a lion", refiner_at=0.5, seed=0, noise="a1111", **kw)[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    # the handoff itself: the base's VP latents at denoising_end continue in the refiner from denoising_start
    g = torch.Generator().manual_seed(0)
    latents = base.generate("a lion", denoising_end=0.5, output="latent", generator=g, **kw)
    by_hand = refiner.generate("a lion", init_latents=latents, denoising_start=0.5, generator=g, **kw)[0]
    assert np.array_equal(np.asarray(by_hand), np.asarray(expected))
    assert "Refiner: sdxl-refiner, Refiner switch at: 0.5" in Image.open(out).text["parameters"]


def test_adapters_reach_the_library(tmp_path):
    """--vae, --lora FILE:SCALE and --embedding go through `_apply_adapters` to the library's own calls; the
    PNG names the LoRA by A1111's short hash (sha256 of the file after its safetensors header, by hand here)."""
    sd = minisd.load(minisd.TINY)
    g = torch.Generator().manual_seed(0)
    fc1 = sd.text_encoders[0].state_dict()["transformer.resblocks.0.mlp.c_fc.weight"]  # (128, 32)
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # kohya's name of that layer
    lora, embedding, vae = tmp_path / "detail.safetensors", tmp_path / "my-style-x.safetensors", tmp_path / "v.st"
    save_file({f"{key}.lora_down.weight": torch.randn(2, fc1.shape[1], generator=g),
               f"{key}.lora_up.weight": torch.randn(fc1.shape[0], 2, generator=g), f"{key}.alpha": torch.tensor(2.0)},
              lora)  # fmt: skip
    save_file({"emb_params": torch.randn(2, 32, generator=g)}, embedding)  # A1111's safetensors embedding
    save_file({k: v * 1.01 for k, v in sd.vae.state_dict().items()}, vae)  # an official-layout VAE
    prompt = "a red circle in my-style-x"
    out = tmp_path / "a.png"
    assert run(tmp_path, prompt, "-o", str(out), "--steps", "2", "--lora", f"{lora}:0.5", "--embedding",
               str(embedding), "--vae", str(vae)) == 0  # fmt: skip
    sd.load_vae(vae)
    sd.load_lora(lora, scale=0.5)
    sd.load_embedding(embedding)
    expected = sd.generate(prompt, steps=2, seed=0, width=32, height=32, noise="a1111", prompt_syntax="a1111")[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    data = lora.read_bytes()
    header = int.from_bytes(data[:8], "little")
    short = hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    assert f'Lora hashes: "detail: {short}"' in Image.open(out).text["parameters"]
    plain = run(tmp_path, prompt, "-o", str(tmp_path / "b.png"), "--steps", "2", "--vae", str(vae))
    assert plain == 0 and not np.array_equal(pixels(tmp_path / "b.png"), pixels(out))  # the adapters changed it


# ------------------------------------------------------------------------------ errors, help, listing
@pytest.mark.reliability("command line", "a runtime error (a bad value only the library sees), or a bug",
                         "one `minisd: error:` line, exit status 1; the traceback only with --debug")
def test_runtime_errors_are_one_line_exit_1(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, PROMPT, "-o", str(tmp_path / "x.png"), "--width", "30") == 1  # not a multiple of 8
    one_error_line(capsys, "multiples of 8", "30")
    assert run(tmp_path, "-o", str(tmp_path / "x.png")) == 1
    one_error_line(capsys, "no prompt", "--prompts", "--from-png")

    def bug(*a, **k):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "describe", bug)
    path = tiny_file(tmp_path)
    assert cli.main(["info", str(path)]) == 1
    one_error_line(capsys, "internal error, TypeError: a bug")
    assert cli.main(["info", str(path), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_every_option_has_help_and_every_command_examples():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("generate", "info"):
        command = commands[name]
        assert "examples:" in command.epilog, name
        for action in command._actions:
            assert action.help, (name, action.dest)
    assert {"--hires-scale", "--refiner", "--lora", "--embedding", "--vae", "--prompt-syntax", "--mask",
            "--preview", "--from-png", "--prompts", "--clip-skip", "--guidance-rescale", "--spacing", "--eta"} <= set(
        commands["generate"]._option_string_actions)  # fmt: skip


def test_samplers_lists_every_name_with_its_a1111_and_diffusers_names(capsys):
    assert cli.main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in SAMPLER_NAMES:
        assert any(line.split()[0] == name for line in lines if line.strip()), name
    row = next(line for line in lines if line.startswith("dpmpp_2m_karras "))
    assert "DPM++ 2M, Karras" in row and "DPMSolverMultistepScheduler" in row and "use_karras_sigmas=True" in row
    assert "Euler a, Uniform" in next(line for line in lines if line.startswith("euler_a "))


# ------------------------------------------------------------------------------ progress and previews
def test_progress_bar_and_cheap_preview(tmp_path):
    stream = io.StringIO()
    bar = ProgressBar(stream, "1/1", total=4)
    for i in range(4):
        bar({"i": i})
    bar.close()
    last = stream.getvalue().split("\r")[-1]
    assert last.startswith("1/1 [" + "#" * 24 + "] 4/4") and "it/s" in last and "0:00 left" in last
    # the cheap decode is A1111's einsum "lxy,lr -> rxy" with its SD1 table, mapped from [-1, 1] to [0, 1]
    latents = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    rgb = latents_to_rgb(latents, 0.18215)
    for r in range(3):
        by_hand = sum(latents[0, c] * LATENT_RGB["sd"][c][r] for c in range(4))
        assert torch.allclose(rgb[0, r], ((by_hand + 1) / 2).clamp(0, 1), atol=1e-6)  # 4 fp32 products
    assert not torch.allclose(latents_to_rgb(latents, 0.13025), rgb)  # SDXL's latent space has its own table
    written = []
    preview = Preview(tmp_path, "img", 2, 0.18215, lambda image, path: written.append((image.size, path.name)))
    for i in range(5):
        preview({"i": i, "denoised": latents})
    assert written == [((5, 3), "img-step002.png"), ((5, 3), "img-step004.png")]


def test_preview_option_writes_the_forming_image(tmp_path, capsys):
    assert run(tmp_path, PROMPT, "-o", str(tmp_path / "a.png"), "--steps", "4", "--preview", str(tmp_path / "p"),
               "--preview-every", "2") == 0  # fmt: skip
    assert sorted(os.listdir(tmp_path / "p")) == ["a-step002.png", "a-step004.png"]
    assert Image.open(tmp_path / "p" / "a-step004.png").size == (8, 8)  # latent resolution (32 / 4), no VAE


# ------------------------------------------------------------------------------ signals, in a real process
@pytest.mark.reliability("command line", "Ctrl-C (SIGINT) or SIGTERM in the middle of a run",
                         "exit status 130 / 143, one line, no traceback, no partial or temporary file")
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_signals_mid_run_leave_nothing(tmp_path, sig, code, word):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "minisd", "generate", PROMPT, "-o", str(tmp_path / "out" / "a.png"),
            "--steps", "900", "--num-images", "3", "--preview", str(tmp_path / "p"), "--preview-every", "1"]
    (tmp_path / "out").mkdir()
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored (as
    # nohup wants); a terminal's Ctrl-C reaches a process whose SIGINT is the default, so start it so.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "p").exists() or len(os.listdir(tmp_path / "p")) < 2:  # sampling has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code and err == f"minisd: {word}\n", (proc.returncode, err)
    assert os.listdir(tmp_path / "out") == []  # no image, no .minisd-*.tmp
    assert not [f for f in os.listdir(tmp_path / "p") if f.endswith(".tmp")]
