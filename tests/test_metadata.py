"""PNG metadata: A1111's infotext that other tools read, minisd's JSON copy, `--from-png` and `info IMG`.

References: the `sd-parsers` package (how other tools read A1111 images) and A1111's own format, written
out by hand here from modules/processing.py `create_infotext` and modules/infotext_utils.py `quote`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sd_parsers import ParserManager

import minisd
from minisd import cli
from minisd.metadata import Generation, from_infotext, infotext, parse_infotext, quote, read_generation

pytestmark = pytest.mark.usefixtures("one_thread")


def make(tmp_path, name="a.png", *extra) -> tuple:
    out = tmp_path / name
    argv = ["generate", "a red circle, bold: bright", "-o", str(out), "--negative", "blurry, dark", "--steps", "3",
            "--sampler", "dpmpp_2m_karras", "--seed", "41", "--guidance", "6.5", "--clip-skip", "2", "--device", "cpu"]
    assert cli.main([*argv, *extra]) == 0
    return out


def test_sd_parsers_reads_our_pngs(tmp_path):
    out = make(tmp_path)
    info = ParserManager().parse(out)
    sampler = info.samplers[0]
    assert info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in info.prompts] == ["a red circle, bold: bright"]
    assert [p.value for p in info.negative_prompts] == ["blurry, dark"]
    assert sampler.name == "DPM++ 2M" and sampler.parameters["scheduler"] == "Karras"
    assert (sampler.parameters["seed"], sampler.parameters["steps"], sampler.parameters["cfg_scale"]) == ("41", "3",
                                                                                                          "6.5")
    assert info.metadata["Size"] == "32x32" and info.metadata["Clip skip"] == "2"
    # A1111's short model hash: the first 10 hex digits of the file's SHA-256
    assert sampler.model.hash == hashlib.sha256(minisd.TINY.read_bytes()).hexdigest()[:10]
    assert sampler.model.name == "tiny-sd"


def test_from_png_regenerates_bit_for_bit_and_options_override(tmp_path, capsys):
    out = make(tmp_path)
    assert cli.main(["generate", "--from-png", str(out), "-o", str(tmp_path / "again.png"), "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))
    assert Image.open(out).text == Image.open(tmp_path / "again.png").text  # the same request, recorded the same
    # any option overrides the recorded one, and the new image records the new value
    assert cli.main(["generate", "--from-png", str(out), "-o", str(tmp_path / "s.png"), "--seed", "7",
                     "--device", "cpu"]) == 0  # fmt: skip
    changed = read_generation(tmp_path / "s.png")
    assert changed.seed == 7 and changed.sampler == "dpmpp_2m_karras" and changed.negative_prompt == "blurry, dark"
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "s.png")))
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "Negative prompt: blurry, dark" in shown and "Sampler: DPM++ 2M, Schedule type: Karras" in shown
    assert "sampler: 'dpmpp_2m_karras'" in shown


@pytest.mark.reliability("command line", "`--from-png` of an image without parameters, or one A1111 made, without "
                         "--model", "one line naming the file and what is missing, exit status 1")
def test_from_png_without_parameters(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    assert cli.main(["generate", "--from-png", str(tmp_path / "bare.png"), "-o", str(tmp_path / "x.png")]) == 1
    assert "bare.png: no generation parameters" in capsys.readouterr().err
    # an A1111 image names a model minisd does not have: --model is asked for, naming A1111's model and hash
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
                                "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")  # fmt: skip
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    assert cli.main(["generate", "--from-png", str(tmp_path / "a1111.png"), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "was not made by minisd (model v1-5-pruned-emaonly, hash 6ce0161689): pass --model" in err


def test_infotext_is_a1111s_format():
    g = Generation(prompt="a cat", negative_prompt="ugly", steps=20, sampler="euler_a", guidance_scale=7.0, seed=1,
                   width=512, height=768, clip_skip=2, model_name="v1-5", model_hash="6ce0161689",
                   lora_hashes=("add_detail: 0123456789ab", "film: ba9876543210"), version="minisd 0.1.0")
    # written out by hand from create_infotext: "key: value" joined by ", ", quoted when a value has , : or \n
    assert infotext(g) == (
        "a cat\nNegative prompt: ugly\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: 1, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5, Clip skip: 2, Lora hashes: "add_detail: 0123456789ab, film: '
        'ba9876543210", Version: minisd 0.1.0'
    )
    assert quote("plain") == "plain" and quote('a, "b"') == '"a, \\"b\\""' and quote("x:y") == '"x:y"'
    prompt, negative, params = parse_infotext(infotext(g))
    assert (prompt, negative) == ("a cat", "ugly")
    assert params["Lora hashes"] == "add_detail: 0123456789ab, film: ba9876543210" and params["Size"] == "512x768"


def test_an_a1111_image_is_read_from_its_infotext():
    # an infotext as A1111 1.10 writes it (multi-line prompt, an extension's quoted value)
    text = ("masterpiece, a castle\non a hill\nNegative prompt: lowres\nSteps: 30, Sampler: DPM++ 2M, "
            'Schedule type: Karras, CFG scale: 5.5, Seed: 1234, Size: 640x512, Model hash: abcdef0123, '
            'Model: dreamshaper, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 1.5, Hires steps: 10, '
            'Hires upscaler: Latent, ADetailer prompt: "a, b", Version: v1.10.1')  # fmt: skip
    g = from_infotext(text, "castle.png")
    assert (g.prompt, g.negative_prompt) == ("masterpiece, a castle\non a hill", "lowres")
    assert (g.steps, g.sampler, g.guidance_scale, g.seed, g.width, g.height, g.clip_skip) == (
        30, "dpmpp_2m_karras", 5.5, 1234, 640, 512, 2)
    assert (g.hires_scale, g.hires_steps, g.hires_strength) == (1.5, 10, 0.45)
    with pytest.raises(ValueError, match="castle.png: A1111 sampler 'UniPC'"):
        from_infotext(text.replace("DPM++ 2M", "UniPC"), "castle.png")
