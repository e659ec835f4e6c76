"""`minisd explain` (issue 15): what it prints matches the library's own tensors, computed here independently.

- On the shipped tiny model: the printed token ids are the tokenizer's; the printed context statistics are
  `encode_prompt`'s; the printed sigmas are `plan_sampler`'s; each step's printed x0-hat is the one a
  `generate` callback sees; the guidance difference is F_cond - F_uncond of two separate U-Net calls; and
  the final image is `generate`'s with the same seed and settings, bit for bit (same calls, same order, CPU).
- The attention probabilities it recomputes are the ones the layer applied: P @ V through `to_out` gives the
  layer's own output.
- On a tiny SDXL model (tests/tiny.py): the y vector printed is `conditioning.sdxl_vector` of the pooled
  vector and the sizes, and changing `original_size` changes it.
- The command: `--help`, the stages in order, and the pictures of `--out`.
"""

from __future__ import annotations

import argparse
import re

import PIL.Image
import pytest
import safetensors.torch
import torch

import minisd
from minisd import explain as ex
from minisd.conditioning import sdxl_vector
from minisd.denoisers import DiscreteDenoiser
from minisd.samplers import plan_sampler
from minisd.schedules import DiscreteSchedule
from tests.tiny import official_checkpoint, tiny_config
from tests.utils import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a small yellow star in the top left on a black background"
STEPS = 4


@pytest.fixture(scope="module")
def tiny():
    return minisd.load(minisd.TINY)


@pytest.fixture(scope="module")
def run(tiny):
    return ex.explain(tiny, ex.Request(PROMPT, steps=STEPS, seed=3, size=(32, 32)))


def printed(lines: list[str], label: str) -> str:
    """The first printed line that starts (after indentation) with `label`."""
    return next(line for line in lines if line.strip().startswith(label))


def printed_number(line: str, name: str) -> float:
    return float(re.search(rf"{name} ([+-]?[0-9.]+)", line).group(1))


def test_token_ids_are_the_tokenizers(tiny, run):
    ids = [tiny.tokenizer.sot_token_id, *tiny.tokenizer.encode(PROMPT), tiny.tokenizer.eot_token_id]
    assert run.token_ids == [ids]
    shown = printed(run.lines, "49406:")
    assert [int(i) for i in re.findall(r"(\d+):'", shown)] == ids
    assert "4481:'yellow '" in shown  # the id's string, with CLIP's end-of-word as a space


def test_context_statistics_are_encode_prompts(tiny, run):
    context = tiny.encode_prompt(PROMPT).context
    assert torch.equal(run.context, context)
    line = printed(run.lines, "context:")
    assert f"shape {tuple(context.shape)}" in line
    assert printed_number(line, "std") == float(f"{context.std().item():.4f}")
    assert printed_number(line, "mean") == float(f"{context.mean().item():+.4f}")


def test_sigmas_are_the_sampler_plans(run):
    plan = plan_sampler("euler", DiscreteSchedule.scaled_linear(), STEPS, spacing="leading")
    assert torch.equal(run.sigmas, plan.sigmas)
    assert printed(run.lines, "sigma:").split()[1:] == [f"{s:.4g}" for s in plan.sigmas.tolist()]


def test_image_and_steps_are_generates(tiny, run):
    """The same seed and settings through `generate`: the image bit for bit, and each step's x0-hat as its
    callback sees it; the guidance difference from separate cond and uncond U-Net calls at that step's x."""
    seen = []

    def callback(info: dict) -> None:
        seen.append((info["x"].clone(), info["sigma"], info["denoised"]))

    image = tiny.generate(PROMPT, steps=STEPS, seed=3, width=32, height=32, output="tensor", callback=callback)
    assert torch.equal(run.image, image)
    assert len(run.steps) == len(seen) == STEPS
    rows = [line.split() for line in run.lines if re.match(r"\s+\d+\s+[0-9.]+\s+[+-]", line)]
    denoiser = DiscreteDenoiser(lambda x, t, context: tiny.unet(x, t, context), DiscreteSchedule.scaled_linear())
    cond, uncond = tiny.encode_prompt(PROMPT).context, tiny.encode_prompt("").context
    for step, row, (x, sigma, denoised) in zip(run.steps, rows, seen, strict=True):
        assert torch.equal(step.denoised, denoised) and step.sigma == sigma
        assert row[1:4] == [f"{sigma:.4f}", f"{denoised.mean().item():+.4f}", f"{denoised.std().item():.4f}"]
        s = torch.tensor([sigma])
        with torch.no_grad():
            f_cond, f_uncond = denoiser.model_output(x, s, context=cond), denoiser.model_output(x, s, context=uncond)
        # batch 2 vs two batch-1 calls: the same fp32 arithmetic up to the kernels' blocking. Each output is
        # ~40 rounding stages deep (~1e-7 each, ~1e-6 of its scale); the difference of two outputs is ~10x
        # smaller than either, so the error is bounded against the outputs' scale, not the difference's.
        err = (step.guidance_diff - (f_cond - f_uncond)).abs().max().item()
        assert err <= 1e-5 * f_cond.abs().max().item(), f"guidance diff at step {step.i}: {err:.3g}"
        assert step.guidance_diff.std() > 0.01  # a real difference, not zeros


def test_attention_probabilities_are_the_layers(tiny, run):
    """P recomputed by the hook, applied to the layer's own values, reproduces the layer's output; each
    pixel's probabilities over the 77 tokens sum to 1 in the saved maps."""
    module = tiny.unet.get_submodule(run.attention_layer)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, module.to_q.in_features, generator=g)
    context = torch.randn(2, 77, module.to_k.in_features, generator=g)
    p = ex.attention_probabilities(module, x, context)
    v = module.to_v(context).unflatten(-1, (module.heads, -1)).transpose(1, 2)  # b h l d
    rebuilt = module.to_out((p @ v).transpose(1, 2).flatten(2))
    with torch.no_grad():
        # a 77-term weighted sum per channel, fp32, two summation orders: ~1e-6 of the output's scale
        assert_rel_close(rebuilt, module(x, context), 1e-5, "P @ V")
    assert run.attention.shape == (77, 4, 4)  # the tiny U-Net's cross-attention runs on 4x4 latents
    assert torch.allclose(run.attention.sum(0), torch.ones(4, 4), atol=1e-5)  # 77 fp32 terms, ~1e-7 each


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    path = tmp_path_factory.mktemp("xl") / "sdxl.safetensors"
    tensors = official_checkpoint("sdxl").tensors
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return minisd.load(path, config=tiny_config("sdxl"))


def test_sdxl_vector_is_printed(tiny_sdxl):
    sd = tiny_sdxl
    run = ex.explain(sd, ex.Request("a cube", steps=2, size=(16, 16), original_size=(8, 24)))
    pooled = sd.encode_prompt("a cube").pooled
    y = sdxl_vector(pooled, (8, 24), (0, 0), (16, 16))
    assert torch.equal(run.y, y)
    line = printed(run.lines, "y:")
    assert f"shape {tuple(y.shape)}" in line and printed_number(line, "std") == float(f"{y.std().item():.4f}")
    assert "original_size (8, 24), crop_coords_top_left (0, 0), target_size (16, 16)" in printed(run.lines, "inputs:")
    image = sd.generate("a cube", steps=2, seed=0, width=16, height=16, original_size=(8, 24), output="tensor")
    assert torch.equal(run.image, image)
    other = ex.explain(sd, ex.Request("a cube", steps=2, size=(16, 16), original_size=(16, 16)))
    assert not torch.equal(other.y[:, pooled.shape[1] :], y[:, pooled.shape[1] :])
    assert torch.equal(other.y[:, : pooled.shape[1]], y[:, : pooled.shape[1]])  # the text part is the same


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minisd")
    ex.add_parser(p.add_subparsers(dest="command"))
    return p


def test_command_prints_the_stages_in_order_and_saves_pictures(tmp_path, capsys):
    args = parser().parse_args(["explain", "a red circle on a blue background", "--steps", "2", "--guidance", "4",
                                "--out", str(tmp_path / "out")])  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    stages = [out.index(f"[{k}] ") for k in (1, 2, 4, 5, 6, 7, 8)]
    assert stages == sorted(stages) and "[3] " not in out  # SD1 has no vector conditioning
    for name, where in [("tokens", "tokenizer.py"), ("context", "conditioning.py"), ("sampling", "samplers.py"),
                        ("image", "vae.py")]:  # fmt: skip
        assert re.search(rf"\] {name} .*{where}", out), name
    sizes = {p.name: PIL.Image.open(p).size for p in (tmp_path / "out").iterdir()}
    assert sizes["image.png"] == (128, 128)  # 32 px at x4, nearest
    assert sizes["trajectory.png"][0] == 2 * 128 + 4  # one tile per step (2 steps), 4 px apart
    assert sizes["attention.png"][0] == 8 * 128 + 7 * 4  # the image and the 7 prompt tokens


def test_help(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["explain", "--help"])
    assert "examples:" in capsys.readouterr().out


@pytest.mark.reliability(
    "minisd explain",
    "--original-size for a family without size conditioning; an --attention-layer that is not a cross-attention",
    "ValueError naming the option, what is expected (the U-Net's attn2 layers) and what to do",
)
def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="original_size: the 'sd1' family has no size conditioning"):
        ex.explain(tiny, ex.Request("a cube", steps=1, size=(32, 32), original_size=(64, 64)))
    with pytest.raises(ValueError, match="attention-layer.*expected one of"):
        ex.explain(tiny, ex.Request("a cube", steps=1, size=(32, 32), attention_layer="middle_block.1"))
