"""minisd.vae against diffusers' AutoencoderKL and its single-file converter.

Tolerances. The parity tests run both sides in fp32 on the same weights and
inputs; the only differences are summation orders (SDPA kernels, conv
algorithms), each ~1e-7 relative, over ~20 layers. `assert_rel_close(rel=1e-5)`
(max abs error <= 1e-5 * max |expected|) leaves a 10x margin on that, while a
wrong mapping or a misordered block gives errors of order 1.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file
from torch import nn

from minisd.diffusers_format import vae_table
from minisd.keymap import CheckpointError, check_state_dict, load_strict
from minisd.vae import SD_VAE, SDXL_VAE, AutoencoderKL, DiagonalGaussian, VAEConfig, _blend_tiles
from tests.utils import assert_rel_close

# Three levels, so two decoder levels (up.1, up.2) have identical shapes: a
# reversed up-block order could only be caught by values, which is what we compare.
# ch 32 is the smallest width GroupNorm(32 groups) allows. Downsampling factor 4.
TINY = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
PREFIX = "first_stage_model."


def _perturb_norms(module: nn.Module, seed: int) -> nn.Module:
    """Random GroupNorm affine parameters (default init is 1 and 0, which would hide
    a swapped weight/bias or norm1/norm2). Convs keep PyTorch's random default init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return module.eval()


def _tiny(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return _perturb_norms(AutoencoderKL(TINY), seed)


def _ldm_yaml(cfg: VAEConfig) -> dict:
    """The part of an official YAML that diffusers' config builder reads."""
    ddconfig = dict(
        double_z=cfg.double_z, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=cfg.in_channels,
        out_ch=cfg.out_ch, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout,
    )  # fmt: skip
    first_stage = {"params": {"embed_dim": cfg.embed_dim, "ddconfig": ddconfig}}
    return {"model": {"params": {"scale_factor": cfg.scale_factor, "first_stage_config": first_stage}}}


def _diffusers_config(cfg: VAEConfig, official: dict[str, torch.Tensor]) -> dict:
    return create_vae_diffusers_config_from_ldm(_ldm_yaml(cfg), official)


def _images(seed: int, shape=(2, 3, 32, 32)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- parity
def test_official_layout_through_diffusers_converter_matches(tmp_path):
    ours = _tiny(seed=0)
    path = tmp_path / "vae.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    official = load_file(str(path))
    config = _diffusers_config(TINY, official)
    converted = convert_ldm_vae_checkpoint(official, config)
    theirs = DiffusersAutoencoderKL(**config).eval()
    theirs.load_state_dict(converted, strict=True)

    # Our table says where every official tensor lands in diffusers: it must agree
    # with diffusers' own converter tensor for tensor (the weights are all distinct).
    ours_as_theirs = vae_table(TINY).to_theirs(ours.state_dict())
    assert sorted(ours_as_theirs) == sorted(converted)
    for k, v in converted.items():
        assert torch.equal(ours_as_theirs[k], v), k

    x = _images(1)
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        assert_rel_close(post.mean, ref.mean, 1e-5, "posterior mean")
        assert_rel_close(post.logvar, ref.logvar, 1e-5, "posterior logvar")
        assert_rel_close(post.std, ref.std, 1e-5, "posterior std")
        assert_rel_close(post.var, ref.var, 1e-5, "posterior var")
        assert torch.equal(post.mode(), post.mean)
        # Same seed, same noise: diffusers draws with randn_tensor in the mean's dtype.
        sample = post.sample(torch.Generator().manual_seed(7))
        ref_sample = ref.sample(torch.Generator().manual_seed(7))
        assert_rel_close(sample, ref_sample, 1e-5, "posterior sample")
        assert not torch.allclose(sample, post.mean, atol=1e-3)  # the noise is really there
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        assert_rel_close(ours.decode(z), theirs.decode(z).sample, 1e-5, "decode")


def test_diffusers_weights_through_table_match():
    torch.manual_seed(5)
    config = _diffusers_config(TINY, {})
    theirs = _perturb_norms(DiffusersAutoencoderKL(**config), seed=5)
    with torch.device("meta"):
        ours = AutoencoderKL(TINY)
    sd = vae_table(TINY).to_ours(theirs.state_dict(), source="diffusers AutoencoderKL")
    load_strict(ours, sd, source="diffusers AutoencoderKL")
    ours.eval()

    x = _images(3, (1, 3, 48, 32))  # non-square, to catch an h/w mix-up in the rearranges
    z = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        assert_rel_close(post.mean, ref.mean, 1e-5, "posterior mean")
        assert_rel_close(post.std, ref.std, 1e-5, "posterior std")
        assert_rel_close(ours.decode(z), theirs.decode(z).sample, 1e-5, "decode")
        # diffusers' forward(x, sample_posterior=False) is decode(encode(x).mode()).
        assert_rel_close(ours.decode(post.mode()), theirs(x).sample, 1e-5, "reconstruction")


def test_posterior_clamps_logvar_like_the_reference():
    # logvar channels far outside [-30, 20] on both sides, and inside.
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0)) * 40
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.max() == 20.0 and ours.logvar.min() == -30.0
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


# --------------------------------------------------------------------------- full size on meta
@pytest.mark.parametrize("preset", [SD_VAE, SDXL_VAE], ids=["sd", "sdxl"])
def test_full_size_official_keys_are_what_diffusers_converts(preset):
    with torch.device("meta"):
        ours = AutoencoderKL(preset)
    official = {PREFIX + k: v for k, v in ours.state_dict().items()}
    config = _diffusers_config(preset, official)
    with torch.device("meta"):
        theirs = DiffusersAutoencoderKL(**config)
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}

    converted = convert_ldm_vae_checkpoint(official, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    # The converter skips keys it does not know; equal counts mean every official
    # key was consumed (each produces exactly one diffusers key).
    assert len(converted) == len(official)

    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters())
    assert round(n_ours / 1e6, 2) == 83.65  # the published size of the SD / SDXL VAE

    # vae_table reaches every diffusers parameter, shape for shape, both ways.
    table = vae_table(preset)
    check_state_dict(ours, table.to_ours(theirs.state_dict(), source="diffusers meta model"))
    assert {k: tuple(v.shape) for k, v in table.to_theirs(ours.state_dict()).items()} == expected


def test_presets_match_the_official_yaml():
    for preset in (SD_VAE, SDXL_VAE):
        assert (preset.ch, preset.ch_mult, preset.num_res_blocks) == (128, (1, 2, 4, 4), 2)
        assert (preset.z_channels, preset.embed_dim, preset.downsample_factor) == (4, 4, 8)
    assert (SD_VAE.scale_factor, SDXL_VAE.scale_factor) == (0.18215, 0.13025)


def test_decoder_up_blocks_are_stored_by_level():
    # up[0] is the full-resolution level (applied last): ch * ch_mult[0] channels,
    # and the only level without an upsampler.
    with torch.device("meta"):
        vae = AutoencoderKL(SD_VAE)
    assert vae.decoder.up[0].upsample is None and vae.decoder.up[3].upsample is not None
    assert vae.decoder.up[0].block[-1].conv2.out_channels == 128
    assert vae.decoder.up[3].block[0].conv1.in_channels == 512


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise():
    vae = _tiny()
    with pytest.raises(ValueError, match="images must have 3 channels, got 4"):
        vae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4, got 30x32"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"images must be \(B, C, H, W\), got shape \(3, 32, 32\)"):
        vae.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="latents must have 4 channels, got 3"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="latents must have 4 channels, got 8"):
        vae.decode_tiled(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match="overlap < tile_size"):
        vae.decode_tiled(torch.zeros(1, 4, 8, 8), tile_size=8, overlap=8)
    with pytest.raises(ValueError, match="both multiples of 4, got 8 and 30"):
        vae.encode_tiled(torch.zeros(1, 3, 32, 32), tile_size=30, overlap=8)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="16 channels .* are not 32 groups"):
        VAEConfig(ch=16)
    with pytest.raises(ValueError, match="attn_resolutions must be empty"):
        VAEConfig(attn_resolutions=(32,))
    with pytest.raises(ValueError, match="double_z"):
        VAEConfig(double_z=False)
    with pytest.raises(ValueError, match="embed_dim == z_channels, got 8 and 4"):
        vae_table(VAEConfig(embed_dim=8))
    with torch.device("meta"):
        sd = DiffusersAutoencoderKL(**_diffusers_config(TINY, {})).state_dict()
    del sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    with pytest.raises(CheckpointError, match=r"missing: decoder\.up_blocks\.0\.upsamplers\.0\.conv\.weight"):
        vae_table(TINY).to_ours(sd)


# --------------------------------------------------------------------------- tiling
def test_blending_is_exact_for_a_local_map():
    # A map with no spatial context (nearest upsampling + a 1x1 conv, or 4x4 average
    # pooling on the 4-aligned tiles) does not care about tiling, so the blend must
    # give back exactly the untiled result: this checks tile placement and that the
    # weights sum to 1, including the irregular, edge-flush last tiles.
    torch.manual_seed(0)
    mix = nn.Conv2d(4, 3, kernel_size=1)
    up = lambda t: mix(torch.nn.functional.interpolate(t, scale_factor=4.0, mode="nearest"))  # noqa: E731
    z = torch.randn(1, 4, 37, 23)
    with torch.no_grad():
        assert_rel_close(_blend_tiles(up, z, 16, 6, up=4, down=1), up(z), 1e-6, "blended upsampling")
    down = lambda t: torch.nn.functional.avg_pool2d(t, 4)  # noqa: E731
    x = torch.randn(2, 3, 92, 60)
    assert_rel_close(_blend_tiles(down, x, 32, 8, up=1, down=4), down(x), 1e-6, "blended pooling")


def test_single_tile_equals_untiled():
    # One tile covering the input has weight 1 everywhere: exact up to fp32 (1e-6).
    vae = _tiny(seed=1)
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(0))
    x = _images(2, (1, 3, 48, 40))
    with torch.no_grad():
        assert_rel_close(vae.decode_tiled(z, tile_size=12, overlap=4), vae.decode(z), 1e-6, "decode")
        assert_rel_close(vae.decode_tiled(z, tile_size=64), vae.decode(z), 1e-6, "decode")
        assert_rel_close(vae.encode_tiled(x, tile_size=48).mean, vae.encode(x).mean, 1e-6, "encode")


def test_tiled_decode_approximates_untiled():
    # Tiling is an approximation: each tile has its own GroupNorm statistics, its own
    # mid-block attention, and zero padding at its inner borders. Tiny random VAEs are
    # far more sensitive to that than trained ones (one channel per GroupNorm group,
    # no smooth image prior), so the bounds are loose; the exact parts of the
    # machinery are checked exactly above. Observed over seeds 0-5 of `_tiny` for a
    # 32x32 latent in 24-pixel tiles overlapping by 16: mean abs error 0.09-0.12 of
    # mean|untiled|, max error 0.12-0.19 of max|untiled|. We bound them at 0.2 and
    # 0.3. For scale, decoding the latent shifted by one pixel gives a mean abs
    # difference of 1.1-1.4 x mean|untiled|.
    vae = _tiny(seed=2)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        full = vae.decode(z)
        err = {
            (t, o): (vae.decode_tiled(z, tile_size=t, overlap=o) - full).abs()
            for t, o in ((16, 0), (16, 8), (24, 16))
        }
    assert err[24, 16].mean() <= 0.2 * full.abs().mean()
    assert err[24, 16].max() <= 0.3 * full.abs().max()
    # More overlap, and larger tiles, bring the result closer to the untiled decode
    # (observed mean errors 0.38-0.52, 0.22-0.28 and 0.09-0.12 of mean|untiled|).
    assert err[24, 16].mean() < err[16, 8].mean() < err[16, 0].mean()


def test_tiled_encode_approximates_untiled():
    # As above, for a 96x96 image in 64-pixel tiles overlapping by 32 (16 and 8
    # latent pixels): observed over seeds 0-5, mean abs error 0.09-0.12 of
    # mean|untiled mean| and max error 0.11-0.17 of max|untiled mean|; bounds 0.2, 0.3.
    vae = _tiny(seed=2)
    x = _images(22, (1, 3, 96, 96))
    with torch.no_grad():
        full, tiled = vae.encode(x), vae.encode_tiled(x, tile_size=64, overlap=32)
    assert (tiled.mean - full.mean).abs().mean() <= 0.2 * full.mean.abs().mean()
    assert (tiled.mean - full.mean).abs().max() <= 0.3 * full.mean.abs().max()
    # logvar is blended in the same pass (the moments are blended before the split);
    # observed 0.08-0.10 of mean|untiled logvar|.
    assert (tiled.logvar - full.logvar).abs().mean() <= 0.2 * full.logvar.abs().mean()


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("half", ["decoder", "encoder"])
def test_fp16_overflow_falls_back_to_fp32(half, caplog):
    vae = _tiny(seed=3).half()
    # Blow up an inner conv the way the SDXL VAE's activations exceed fp16's 65504.
    # GroupNorm renormalises right after, so in fp32 the output stays ordinary.
    with torch.no_grad():
        conv = vae.get_submodule(f"{half}.mid.block_1.conv2")
        conv.weight.mul_(1e5)
        conv.bias.mul_(1e5)
    reference = copy.deepcopy(vae).float()  # the same (fp16-representable) weights in fp32
    if half == "encoder":
        x, run, raw = _images(6, (1, 3, 32, 32)), (lambda m, t: m.encode(t).mean), vae._moments
    else:
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
        run, raw = AutoencoderKL.decode, vae._decode
    with torch.no_grad():
        assert not torch.isfinite(raw(x.half())).all()  # the premise: fp16 really overflows
        expected = run(reference, x.half())
        with caplog.at_level(logging.WARNING, logger="minisd.vae"):
            out = run(vae, x.half())
    ours = [r for r in caplog.records if r.name == "minisd.vae"]
    assert [r.levelno for r in ours] == [logging.WARNING] and "upcasting" in ours[0].getMessage()
    assert vae.dtype == torch.float32 and out.dtype == torch.float32  # upcast, and kept so
    # The fallback recomputes in fp32 from exactly the reference's weights and input,
    # so it matches far inside fp16 tolerance; 1e-6 allows only fp32 run-to-run noise.
    assert_rel_close(out, expected, 1e-6, f"{half} fallback")
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="minisd.vae"):
        run(vae, x.half())
    assert not [r for r in caplog.records if r.name == "minisd.vae"]  # already fp32: no second warning


def test_half_module_without_overflow_stays_half(caplog):
    vae = _tiny(seed=4).half()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="minisd.vae"):
        out = vae.decode(z)  # fp32 latents are cast to the module's fp16
    assert out.dtype == torch.float16 and vae.dtype == torch.float16
    assert not [r for r in caplog.records if r.name == "minisd.vae"]
    assert torch.isfinite(out).all()


def test_fp32_module_decodes_half_latents_in_fp32():
    # An fp16 U-Net hands over fp16 latents; the fp32 VAE computes in fp32.
    vae = _tiny(seed=4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        out = vae.decode(z)
        assert out.dtype == torch.float32
        assert torch.equal(out, vae.decode(z.float()))
