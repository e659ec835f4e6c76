"""The shipped tiny model (`minisd.TINY`): it loads through the ordinary path, is small, draws what it
is asked on a small evaluation, and the retrain command runs end to end (a few steps) and resumes."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from pathlib import Path

import PIL.Image
import pytest
import torch

import minisd
from minisd import shapes
from minisd import tiny_model as T
from minisd.detection import read_safetensors_header

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest.py)


def test_tiny_is_a_packaged_file_under_30_mb():
    assert minisd.TINY.is_file()
    assert minisd.TINY.parent.name == "data" and minisd.TINY.parent.parent.name == "minisd"
    assert minisd.TINY.stat().st_size < 30 * 2**20


def test_a_non_editable_install_ships_it():
    """pyproject's package-data takes the file into the wheel, beside the BPE vocabulary."""
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    patterns = re.findall(r'"([^"]+)"', section.split("minisd = ", 1)[1].split("]", 1)[0])
    assert any(fnmatch.fnmatch(f"data/{minisd.TINY.name}", p) for p in patterns), patterns


def test_tiny_loads_through_the_ordinary_path_with_its_architecture():
    header = read_safetensors_header(minisd.TINY)
    assert "minisd.config" in header.metadata  # the architecture travels in the file
    sd = minisd.load(minisd.TINY)
    assert sd.family.name == "sd1" and sd.prediction_type == "epsilon"
    assert sd.unet.config == T.TINY_UNET
    assert sd.text_encoders[0].config == T.TINY_TEXT
    # The VAE is TINY_VAE with the scale factor measured at training time (1 / std of the latents).
    assert dataclasses.replace(sd.vae.config, scale_factor=1.0) == T.TINY_VAE
    assert 0.1 < sd.scale_factor < 10 and sd.scale_factor != 1.0
    assert sd.dtype == torch.float32  # stored in fp16, cast once at load time
    recorded = json.loads(header.metadata["minisd.config"])
    assert recorded["vae"]["scale_factor"] == pytest.approx(sd.scale_factor)


@pytest.fixture(scope="module")
def evaluation() -> shapes.Evaluation:
    torch.manual_seed(0)
    sd = minisd.load(minisd.TINY)
    return shapes.evaluate(sd, 8, size=T.SIZE)  # the default sampler, steps and guidance


def test_tiny_draws_the_asked_colours(evaluation):
    """Issue 10's targets for background (>= 95%) and foreground (>= 90%) colour, on a small evaluation
    (the full one is benchmarks/eval_shapes.py; docs/tiny-model.md has its numbers)."""
    acc = evaluation.train.accuracy
    assert acc["bg"] >= 0.95, evaluation.table()
    assert acc["fg"] >= 0.90, evaluation.table()


def test_tiny_draws_the_asked_shape_more_often_than_chance(evaluation):
    # Four shapes: chance is 25%. (The target, 80%, is measured on the full evaluation.)
    assert evaluation.train.accuracy["shape"] >= 0.5, evaluation.table()


def test_retrain_runs_end_to_end_and_resumes(tmp_path):
    recipe = T.Recipe(vae_steps=2, vae_batch=4, cache_size=16, unet_steps=4, unet_batch=4, warmup_steps=1,
                      segments=2)  # fmt: skip
    path = T.retrain(tmp_path, seed=3, recipe=recipe)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["step-000002.safetensors",
                                                                          "step-000004.safetensors"]  # fmt: skip
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["seed"] == 3 and timings["recipe"]["unet_steps"] == 4
    sd = minisd.load(path)
    assert sd.unet.config == T.TINY_UNET and sd.scale_factor != 1.0
    first = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    # A second call finds every stage done and writes the same weights.
    again = minisd.load(T.retrain(tmp_path, seed=3, recipe=recipe))
    assert all(torch.equal(first[k], v) for k, v in again.unet.state_dict().items())
    image = sd.generate("a red circle on a blue background", steps=2, width=T.SIZE, height=T.SIZE, seed=0)[0]
    assert image.size == (T.SIZE, T.SIZE)


def test_generate_with_no_model_uses_tiny(tmp_path, capsys):
    from minisd import cli

    out = tmp_path / "out.png"
    assert cli.main(["generate", "a red circle on a blue background", "-o", str(out)]) == 0
    image = PIL.Image.open(out)
    assert image.size == (T.SIZE, T.SIZE)
    assert shapes.judge(image).bg == "blue"


def test_eval_shapes_command_prints_the_table(capsys):
    from minisd import cli

    assert cli.main(["eval-shapes", "--n", "1", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "| training | 3 |" in out and "| held-out | 3 |" in out
