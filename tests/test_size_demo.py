"""The size-conditioning demo (`minisd.tiny_sdxl`, walkthrough 3's picture): the degradation and the
sharpness measure against hand computations, the data and the training hook that hand each picture's
original_size to the U-Net's `y`, and the committed model (docs/assets/tiny-sdxl-size.safetensors)."""

from __future__ import annotations

import math

import pytest
import torch

import minisd
from minisd import shapes
from minisd import tiny_sdxl as X
from minisd.detection import read_safetensors_header
from minisd.train import TrainConfig, init_model, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest.py)


# ---------------------------------------------------------------------------------- degradation and measure
def _edge(s: int) -> torch.Tensor:
    """(3, s, s): 0 left of the middle column boundary, 1 right of it (a vertical edge at x = s / 2)."""
    x = torch.zeros(3, s, s)
    x[..., s // 2 :] = 1.0
    return x


def test_degrade_is_half_pixel_bilinear_upscaling_by_hand():
    """Output pixel j samples the input at u = (j + 0.5) * s / 32 - 0.5 (clamped to the edge pixels),
    interpolating linearly between floor(u) and floor(u) + 1 (PIL / torch align_corners=False)."""
    s, n = 12, 32
    image = torch.rand(3, s, s, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def taps(j):
        u = min(max((j + 0.5) * s / n - 0.5, 0.0), s - 1.0)
        i0 = math.floor(u)
        i1, w = min(i0 + 1, s - 1), u - i0
        return i0, i1, w

    expected = torch.empty(3, n, n, dtype=torch.float64)
    for r in range(n):
        r0, r1, wr = taps(r)
        for c in range(n):
            c0, c1, wc = taps(c)
            top = (1 - wc) * image[:, r0, c0] + wc * image[:, r0, c1]
            bottom = (1 - wc) * image[:, r1, c0] + wc * image[:, r1, c1]
            expected[:, r, c] = (1 - wr) * top + wr * bottom
    # fp32 interpolation of values in [0, 1]: a few roundings of ~6e-8 each.
    torch.testing.assert_close(X.degrade(image.float()).double(), expected, atol=1e-6, rtol=0)
    same = torch.rand(3, n, n)
    assert torch.equal(X.degrade(same), same)  # at the target size: unchanged


def test_sharpness_is_the_mean_absolute_laplacian_by_hand():
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(1))
    for b in range(2):
        total = 0.0
        for c in range(3):
            for i in range(1, 6):
                for j in range(1, 8):
                    v = x[b, c]
                    total += abs(4 * v[i, j] - v[i - 1, j] - v[i + 1, j] - v[i, j - 1] - v[i, j + 1]).item()
        # a mean of 105 fp32 terms, each of 5 roundings
        assert X.sharpness(x)[b].item() == pytest.approx(total / (3 * 5 * 7), rel=1e-5)


def test_an_upscaled_small_picture_has_less_high_frequency_energy_by_hand():
    """A vertical edge at the middle, made at s px and upscaled to 32: the 1-D Laplacian 2 x - left - right
    (rows are constant, so the vertical neighbours cancel 2 x) over each row's 30 interior pixels is:

    s = 32: the edge between columns 15 and 16 gives -1, +1: sum |.| = 2 per row;
    s = 16: u = (j + 0.5) / 2 - 0.5 gives columns 15, 16 = 0.25, 0.75: Laplacians at 14..17 are
            -0.25, -0.25, 0.25, 0.25: sum 1;
    s = 8:  u = (j + 0.5) / 4 - 0.5 gives columns 14..17 = 0.125, 0.375, 0.625, 0.875: Laplacians at 13..18
            are -0.125, -0.125, 0, 0, 0.125, 0.125: sum 0.5.

    So the mean over the 30 x 30 interior pixels is 30 x sum / 900."""
    for s, row_sum in ((32, 2.0), (16, 1.0), (8, 0.5)):
        measured = X.sharpness(X.degrade(_edge(s))[None]).item()
        assert measured == pytest.approx(30 * row_sum / 900, abs=1e-6), s


def test_sharpness_of_the_training_pictures_grows_with_the_original_size():
    scenes = shapes.eval_scenes(4)
    measured = [X.sharpness(torch.stack([X.degrade(shapes.to_tensor(shapes.render(sc, s))) for sc in scenes]))
                for s in X.SIZES]  # fmt: skip
    for smaller, larger in zip(measured, measured[1:]):
        assert bool((smaller < larger).all())  # every scene, at every step up in size


# ---------------------------------------------------------------------------------- data and training
def test_sized_shapes_items_are_the_scene_rendered_at_their_size_and_upscaled():
    data, plain = X.SizedShapes(40, seed=3), shapes.ShapesDataset(40, seed=3)
    seen = set()
    for i in range(40):
        item, s = data[i], X.original_size(3, i)
        assert item["caption"] == plain[i]["caption"]
        assert item["original_size"].tolist() == [s, s] and s in X.SIZES
        expected = X.degrade(shapes.to_tensor(shapes.render(data.scene(i), s)))
        assert torch.equal(item["image"], expected) and item["image"].shape == (3, 32, 32)
        if s == 32:
            assert torch.equal(item["image"], plain[i]["image"])  # full size: the plain dataset's picture
        seen.add(s)
    assert seen == set(X.SIZES)


def test_sized_latents_checks_its_sizes():
    with pytest.raises(ValueError, match=r"sizes: expected shape \(2, 2\)"):
        X.SizedLatents(torch.zeros(2, 4, 8, 8), ["a", "b"], torch.zeros(3, 2))


def test_training_hands_each_items_original_size_to_y(tmp_path):
    """Two steps of `train` on `SizedLatents`: the U-Net's y carries, after the pooled vector, each
    item's original height as sgm's timestep features phi(s) = [cos(s f_k), sin(s f_k)], f_k = 10000^(-k/128)."""
    tiny = minisd.load(minisd.TINY)
    sd = init_model("sdxl", config=X.config(tiny.vae.config), seed=0)
    sizes = torch.tensor([[8, 8], [24, 24]])
    data = X.SizedLatents(torch.randn(2, 4, 8, 8), ["a red circle on a blue background"] * 2, sizes)
    seen = []
    hook = sd.unet.register_forward_pre_hook(lambda m, args: seen.append(args[3].detach().clone()))
    try:
        train(sd, data, TrainConfig(steps=2, batch_size=2, ema_decay=None, checkpoint_every=0, log_every=0,
                                    train_text_encoder=True), tmp_path)  # fmt: skip
    finally:
        hook.remove()
    f = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
    pooled = X.TEXT_G.projection_dim
    for y in seen:
        assert y.shape == (2, X.UNET.adm_in_channels)
        for row in y:
            got = row[pooled : pooled + 256].double()
            matches = [s for s in (8, 24) if torch.allclose(got, torch.cat([torch.cos(s * f), torch.sin(s * f)]),
                                                            atol=1e-5)]  # fmt: skip  # fp32 cos/sin of args <= 24
            assert len(matches) == 1
        assert not torch.equal(y[0, pooled : pooled + 512], y[1, pooled : pooled + 512])  # the two sizes differ
    assert len(seen) == 2 and (tmp_path / "model.safetensors").is_file()


def test_fp16_vae_weights_decode_within_one_8_bit_level():
    """`ship_file` stores the VAE in fp16: TINY's VAE with its weights rounded to fp16 (and computed in
    fp32, as `minisd.load` casts back) decodes latents within 1/255 of the fp32 weights' pictures."""
    sd = minisd.load(minisd.TINY)
    z = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = sd.vae.decode(z).float().clamp(-1, 1)
        for p in sd.vae.parameters():
            p.copy_(p.half().float())
        rounded = sd.vae.decode(z).float().clamp(-1, 1)
    assert ((exact - rounded).abs().max() / 2).item() < 1 / 255  # [-1, 1] -> [0, 1]


# ---------------------------------------------------------------------------------- the committed model
@pytest.fixture(scope="module")
def demo() -> minisd.StableDiffusion:
    return minisd.load(X.ASSET)


def test_the_committed_model_is_a_small_sdxl_file_with_size_conditioning(demo):
    assert X.ASSET.stat().st_size < 8 * 2**20
    assert "minisd.config" in read_safetensors_header(X.ASSET).metadata
    assert demo.family.name == "sdxl" and demo.family.y_inputs == ("original_size", "crop_coords_top_left",
                                                                   "target_size")  # fmt: skip
    # y = pooled (the bigG-like tower's projection) + 2 numbers x 3 inputs x 256 features each
    assert demo.unet.config.adm_in_channels == X.TEXT_G.projection_dim + 3 * 2 * 256
    assert demo.unet.config == X.UNET and [e.config for e in demo.text_encoders] == [X.TEXT_L, X.TEXT_G]
    assert demo.family.default_size == 32 and demo.dtype == torch.float32


def test_the_committed_model_draws_sharper_for_a_larger_original_size(demo):
    prompts = ["a red circle on a blue background", "a large white square on a green background"]
    images = {s: demo.generate(prompts, original_size=(s, s), steps=10, seed=0, output="tensor") for s in (8, 32)}
    assert images[8].shape == (2, 3, 32, 32)
    assert (images[8] - images[32]).abs().max() > 0.05  # original_size changes the picture, not just by rounding
    assert bool((X.sharpness(images[8]) < X.sharpness(images[32])).all())
