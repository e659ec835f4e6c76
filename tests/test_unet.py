"""Tests of minisd.unet against diffusers' UNet2DConditionModel and its single-file converter.

Tolerance: 1e-5 relative to max|expected| (fp32). minisd runs the same fp32 ops
in the same order as diffusers (SDPA attention, GroupNorm, conv/linear, with the
same memory layouts), and on this machine the outputs come out bit-identical.
The slack covers kernels that pick another reduction order for another memory
layout, thread count or CPU (a channels_last-strided input to one conv moved
the output by 1.3e-6 relative); any real error (a swapped cos/sin, a wrong head
split, a missing skip) moves it by O(1). A norm epsilon off by 10x would move it
by only ~3e-6, which this tolerance cannot see, so the epsilons are checked
module by module against diffusers' (`test_norm_epsilons_match_diffusers`).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
    infer_diffusers_model_type,
)
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file

import minisd.unet as unet_module
from minisd.diffusers_format import unet_table
from minisd.keymap import check_state_dict, load_strict
from minisd.unet import (
    SD1_INPAINT_UNET,
    SD1_UNET,
    SD2_INPAINT_UNET,
    SD2_UNET,
    SDXL_BASE_UNET,
    SDXL_REFINER_UNET,
    UNetConfig,
    UNetModel,
    timestep_embedding,
)
from tests.utils import assert_rel_close

REL = 1e-5  # see the module docstring
PREFIX = "model.diffusion_model."
FOURIER = 256  # sgm ConcatTimestepEmbedderND outdim = diffusers addition_time_embed_dim

# Tiny versions of every variant (widths multiple of 32 for GroupNorm, 16x16 latents).
TINY = {
    "sd1": UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
        transformer_depth=1, num_heads=2, context_dim=24, use_linear_in_transformer=False,
    ),
    "sd2": UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
        transformer_depth=1, num_head_channels=16, context_dim=40, use_linear_in_transformer=True,
    ),
    "sd1_inpaint": UNetConfig(
        in_channels=9, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
        transformer_depth=1, num_heads=2, context_dim=24,
    ),
    # SDXL base: no attention at level 0 (depth 0 there), depth list, y = pooled(32) + 6 fourier features.
    # context_dim 2048 makes diffusers' config creator choose addition_embed_type="text_time", as for SDXL.
    "sdxl_base": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(4, 2),
        transformer_depth=(0, 1, 2), num_head_channels=16, context_dim=2048, use_linear_in_transformer=True,
        adm_in_channels=32 + 6 * FOURIER,
    ),
    # SDXL refiner: 4 levels, attention only in the middle two, y = pooled(32) + 5 fourier features.
    "sdxl_refiner": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention_resolutions=(4, 2),
        transformer_depth=2, num_head_channels=16, context_dim=1280, use_linear_in_transformer=True,
        adm_in_channels=32 + 5 * FOURIER,
    ),
    # A vector-conditioned model with a non-SDXL context width: diffusers' config creator makes
    # it a "projection" class embedding (`class_embedding`, fed y as class_labels) instead.
    "sd1_adm": UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
        transformer_depth=1, num_heads=2, context_dim=24, adm_in_channels=32 + FOURIER,
    ),
}

PRESETS = {
    "SD1_UNET": SD1_UNET,
    "SD1_INPAINT_UNET": SD1_INPAINT_UNET,
    "SD2_UNET": SD2_UNET,
    "SD2_INPAINT_UNET": SD2_INPAINT_UNET,
    "SDXL_BASE_UNET": SDXL_BASE_UNET,
    "SDXL_REFINER_UNET": SDXL_REFINER_UNET,
}

# The architecture keys of each official YAML's unet_config/network_config params, copied
# from the files (keys that do not change the weights, e.g. use_checkpoint, legacy,
# use_spatial_transformer, spatial_transformer_attn_type, image_size, are left out).
_V1 = dict(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
    channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=1, context_dim=768,
)
_V2 = dict(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
    channel_mult=[1, 2, 4, 4], num_head_channels=64, use_linear_in_transformer=True, transformer_depth=1,
    context_dim=1024,
)
OFFICIAL_YAML = {
    "SD1_UNET": _V1,  # CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml
    "SD1_INPAINT_UNET": {**_V1, "in_channels": 9},  # runwayml v1-inpainting-inference.yaml
    "SD2_UNET": _V2,  # Stability-AI/stablediffusion v2-inference.yaml, v2-inference-v.yaml
    "SD2_INPAINT_UNET": {**_V2, "in_channels": 9},  # v2-inpainting-inference.yaml
    "SDXL_BASE_UNET": dict(  # Stability-AI/generative-models configs/inference/sd_xl_base.yaml
        adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
        attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
        use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
    ),
    "SDXL_REFINER_UNET": dict(  # configs/inference/sd_xl_refiner.yaml
        adm_in_channels=2560, num_classes="sequential", in_channels=4, out_channels=4, model_channels=384,
        attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64,
        use_linear_in_transformer=True, transformer_depth=4, context_dim=[1280, 1280, 1280, 1280],
    ),
}

# Parameter counts: as commonly quoted (rounded) and exactly as diffusers' own full-size
# models count them (the test checks ours == diffusers' == these).
PUBLISHED = {
    "SD1_UNET": ("859.52M", 859_520_964),
    "SD1_INPAINT_UNET": ("859.54M", 859_535_364),
    "SD2_UNET": ("865.91M", 865_910_724),
    "SD2_INPAINT_UNET": ("865.93M", 865_925_124),
    "SDXL_BASE_UNET": ("2.567B", 2_567_463_684),
    "SDXL_REFINER_UNET": ("2.260B", 2_259_526_660),
}


# --------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def yaml_params(cfg: UNetConfig, context_dim: int | list[int] | None = None) -> dict:
    """`cfg` written as an official YAML's unet params (only the key of the set head rule)."""
    p = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
        attention_resolutions=list(cfg.attention_resolutions), num_res_blocks=cfg.num_res_blocks,
        channel_mult=list(cfg.channel_mult),
        transformer_depth=d if isinstance(d := cfg.transformer_depth, int) else list(d),
        context_dim=cfg.context_dim if context_dim is None else context_dim,
    )
    if cfg.num_head_channels == -1:
        p["num_heads"] = cfg.num_heads
    else:
        p["num_head_channels"] = cfg.num_head_channels
    if cfg.use_linear_in_transformer:
        p["use_linear_in_transformer"] = True
    if cfg.adm_in_channels is not None:
        p.update(num_classes="sequential", adm_in_channels=cfg.adm_in_channels)
    return p


def diffusers_config(cfg: UNetConfig, checkpoint: dict) -> dict:
    """diffusers' own config for `cfg`, from its LDM-YAML config creator."""
    key = "network_config" if cfg.adm_in_channels is not None else "unet_config"  # sgm vs ldm YAML
    original = {
        "model": {
            "params": {
                key: {"params": yaml_params(cfg)},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    return create_unet_diffusers_config_from_ldm(original, checkpoint)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded normal weights: std 1/sqrt(fan_in) for matrices and kernels (activations stay
    O(1)), 1 + 0.1 n for norm scales, 0.1 n for biases; so no zero-initialised layer hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            n = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(n / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * n)
            else:
                p.copy_(0.1 * n)


def inputs(cfg: UNetConfig, seed: int = 1, size: int = 16) -> dict:
    """Random latents, context and (for adm models) SDXL-style y, with mixed timesteps 0, 999, 500.

    y is built the way SDXL builds it and diffusers' "text_time" embedding rebuilds it:
    pooled text, then a 256-wide [cos, sin] embedding of each size/crop/score number;
    here with diffusers' own `get_timestep_embedding`, so it does not rely on minisd."""
    g = torch.Generator().manual_seed(seed)
    out = dict(
        x=torch.randn(3, cfg.in_channels, size, size, generator=g),
        timesteps=torch.tensor([0.0, 999.0, 500.0]),
        context=torch.randn(3, 7, cfg.context_dim, generator=g),
    )
    if cfg.adm_in_channels is not None:
        n_ids = (cfg.adm_in_channels - 32) // FOURIER
        text_embeds = torch.randn(3, 32, generator=g)
        time_ids = torch.randint(0, 1024, (3, n_ids), generator=g).float()
        fourier = get_timestep_embedding(time_ids.flatten(), FOURIER, flip_sin_to_cos=True, downscale_freq_shift=0)
        out["y"] = torch.cat([text_embeds, fourier.reshape(3, -1)], dim=1)
        out["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
    return out


def run_ours(model: UNetModel, inp: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(inp["x"], inp["timesteps"], inp["context"], inp.get("y"))


def run_theirs(model: UNet2DConditionModel, inp: dict) -> torch.Tensor:
    """SDXL-like models take y as text_embeds + time_ids, "projection" ones as class_labels."""
    by_class = model.config.class_embed_type == "projection"
    with torch.no_grad():
        return model(
            inp["x"], inp["timesteps"], encoder_hidden_states=inp["context"],
            class_labels=inp["y"] if by_class else None,
            added_cond_kwargs=None if by_class else inp.get("added_cond_kwargs"),
        ).sample


# --------------------------------------------------------------------------- 1. parity
@pytest.mark.parametrize("name", TINY)
def test_official_file_through_diffusers_converter(name, tmp_path):
    """minisd weights, saved as an official single file, converted by diffusers' own
    converter into UNet2DConditionModel: same outputs, and our table gives the same tensors."""
    cfg = TINY[name]
    ours = UNetModel(cfg).eval()
    randomize(ours, seed=0)
    path = tmp_path / "unet.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))

    checkpoint = load_file(str(path))
    dcfg = diffusers_config(cfg, checkpoint)
    if cfg.adm_in_channels is not None:  # SDXL's "text_time" path, or a class embedding
        sdxl_like = cfg.context_dim in (2048, 1280)
        assert dcfg["addition_embed_type"] == ("text_time" if sdxl_like else None)
        assert dcfg["class_embed_type"] == (None if sdxl_like else "projection")
    converted = convert_ldm_unet_checkpoint(checkpoint, dcfg)
    theirs = UNet2DConditionModel(**dcfg).eval()
    theirs.load_state_dict(converted, strict=True)

    # Our table, applied to our state dict, is exactly diffusers' converter.
    mine = unet_table(cfg).to_theirs(ours.state_dict())
    assert mine.keys() == converted.keys()
    for k in mine:
        assert torch.equal(mine[k], converted[k]), k

    inp = inputs(cfg)
    expected = run_theirs(theirs, inp)
    assert expected.abs().max() > 0.1  # a live network, not a vanishing signal
    assert_rel_close(run_ours(ours, inp), expected, REL, f"{name} official -> diffusers")


@pytest.mark.parametrize("name", TINY)
def test_diffusers_weights_through_table(name):
    """A random diffusers UNet2DConditionModel loaded into minisd with `unet_table`."""
    cfg = TINY[name]
    with torch.device("meta"):
        ours = UNetModel(cfg)
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    theirs = UNet2DConditionModel(**diffusers_config(cfg, checkpoint)).eval()
    randomize(theirs, seed=2)

    table = unet_table(cfg)
    sd = table.to_ours(theirs.state_dict(), source="diffusers tiny UNet")
    load_strict(ours, sd, source="diffusers tiny UNet")
    ours.eval()
    # invertible: back to their layout unchanged
    back = table.to_theirs(sd)
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())

    inp = inputs(cfg, seed=3)
    assert_rel_close(run_ours(ours, inp), run_theirs(theirs, inp), REL, f"{name} diffusers -> minisd")


def test_norm_epsilons_match_diffusers():
    """Every GroupNorm / LayerNorm has diffusers' epsilon (ResBlocks 1e-5, transformers'
    GroupNorm 1e-6, LayerNorms 1e-5), found through the key table."""
    cfg = TINY["sdxl_base"]
    with torch.device("meta"):
        ours = UNetModel(cfg)
        theirs = UNet2DConditionModel(**diffusers_config(cfg, {PREFIX + k: v for k, v in ours.state_dict().items()}))
    seen = 0
    for rule in unet_table(cfg).rules:
        if not rule.ours.endswith(".weight"):
            continue
        mine = ours.get_submodule(rule.ours.removesuffix(".weight"))
        other = theirs.get_submodule(rule.theirs[0].removesuffix(".weight"))
        for kind in (torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(mine, kind):
                assert isinstance(other, kind), rule.ours
                assert (mine.eps, mine.weight.shape) == (other.eps, other.weight.shape), rule.ours
                seen += 1
    assert seen > 40  # every ResBlock, transformer and the output norm were compared


def test_timestep_embedding_matches_diffusers():
    """[cos, sin] order and frequencies of sgm, equal to diffusers' flip_sin_to_cos=True, shift 0."""
    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    expected = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    got = timestep_embedding(t, 320)
    assert got.dtype == torch.float32
    assert_rel_close(got, expected, 1e-6, "timestep embedding")
    assert torch.equal(got[0, :160], torch.ones(160))  # cos(0) first


# --------------------------------------------------------------------------- 2. full-size presets
@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_the_official_yaml(name):
    cfg = PRESETS[name]
    yaml = OFFICIAL_YAML[name]
    ours = yaml_params(cfg, context_dim=yaml["context_dim"] if isinstance(yaml["context_dim"], list) else None)
    assert ours == yaml
    if isinstance(yaml["context_dim"], list):  # the refiner's per-block list: all equal to our int
        assert set(yaml["context_dim"]) == {cfg.context_dim}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_keys_shapes_and_counts_match_diffusers(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = UNetModel(cfg)
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    # diffusers' detector recognises our keys as the official family (it tells SDXL base from
    # refiner by their text-encoder keys, which are not the U-Net's, so only SD1/SD2 here).
    expected_type = {
        "SD1_UNET": "v1", "SD1_INPAINT_UNET": "inpainting", "SD2_UNET": "v2", "SD2_INPAINT_UNET": "inpainting_v2"
    }
    if name in expected_type:
        assert infer_diffusers_model_type(checkpoint) == expected_type[name]

    # diffusers' converter consumes every one of our keys and fills every diffusers parameter.
    dcfg = diffusers_config(cfg, checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, dcfg)
    assert all(v is not None for v in converted.values())
    consumed = {id(v) for v in converted.values()}
    unused = [k for k, v in checkpoint.items() if id(v) not in consumed]
    assert not unused, unused[:5]
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**dcfg)
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == their_shapes

    # parameter counts: ours == diffusers' == published
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    rounded, exact = PUBLISHED[name]
    assert n_ours == n_theirs == exact
    assert (f"{exact / 1e6:.2f}M" if exact < 1e9 else f"{exact / 1e9:.3f}B") == rounded

    # unet_table reaches every parameter of diffusers' model, shape for shape.
    table = unet_table(cfg)
    assert set(table.theirs_keys) == set(their_shapes)
    check_state_dict(ours, table.to_ours(theirs.state_dict()), source=f"diffusers {name}")


def test_sd2_presets_share_the_network():
    """512-eps and 768-v differ only in the prediction type (samplers), not in the U-Net."""
    assert SD2_INPAINT_UNET == dataclasses.replace(SD2_UNET, in_channels=9)
    assert SD1_INPAINT_UNET == dataclasses.replace(SD1_UNET, in_channels=9)
    assert SDXL_BASE_UNET.middle_depth == 10 and SDXL_REFINER_UNET.middle_depth == 4


# --------------------------------------------------------------------------- 3. behaviour
@pytest.fixture(scope="module")
def xl_model():
    model = UNetModel(TINY["sdxl_base"]).eval()
    randomize(model, seed=4)
    return model


def test_bad_inputs(xl_model):
    cfg = TINY["sdxl_base"]
    inp = inputs(cfg)
    x, t, c, y = inp["x"], inp["timesteps"], inp["context"], inp["y"]
    with pytest.raises(ValueError, match=r"multiples of 4 .*got 18x16"):
        xl_model(torch.randn(3, 4, 18, 16), t, c, y)
    with pytest.raises(ValueError, match=r"in_channels=4, H, W\), got \(3, 9, 16, 16\)"):
        xl_model(torch.randn(3, 9, 16, 16), t, c, y)
    with pytest.raises(ValueError, match=r"context_dim\) = \(3, L, 2048\), got \(3, 7, 768\)"):
        xl_model(x, t, torch.randn(3, 7, 768), y)
    with pytest.raises(ValueError, match=r"adm_in_channels\) = \(3, 1568\), got None"):
        xl_model(x, t, c)
    with pytest.raises(ValueError, match=r"adm_in_channels\) = \(3, 1568\), got \(3, 2816\)"):
        xl_model(x, t, c, torch.randn(3, 2816))
    with pytest.raises(ValueError, match=r"timesteps .*\(3,\), got \(2,\)"):
        xl_model(x, t[:2], c, y)
    with pytest.raises(ValueError, match=r"x is torch.float64 but the weights are torch.float32"):
        xl_model(x.double(), t, c, y)
    sd1 = UNetModel(TINY["sd1"])
    with pytest.raises(ValueError, match=r"takes no y \(adm_in_channels=None\), got shape \(3, 1568\)"):
        sd1(torch.randn(3, 4, 16, 16), t, torch.randn(3, 7, 24), y)
    with pytest.raises(ValueError, match=r"set one of num_heads \(8\) and num_head_channels \(64\)"):
        UNetConfig(num_heads=8, num_head_channels=64)
    with pytest.raises(ValueError, match="chunk_size"):
        sd1.set_attention_chunk_size(0)


def test_scalar_timestep_broadcasts(xl_model):
    inp = inputs(TINY["sdxl_base"])
    with torch.no_grad():
        a = xl_model(inp["x"], torch.tensor(500.0), inp["context"], inp["y"])
        b = xl_model(inp["x"], torch.full((3,), 500.0), inp["context"], inp["y"])
    assert torch.equal(a, b)


def test_chunked_attention_is_exact(xl_model):
    inp = inputs(TINY["sdxl_base"])
    full = run_ours(xl_model, inp)
    xl_model.set_attention_chunk_size(5)  # 64 and 16 query tokens: uneven chunks
    try:
        assert all(m.chunk_size == 5 for m in xl_model.modules() if hasattr(m, "chunk_size"))
        chunked = run_ours(xl_model, inp)
    finally:
        xl_model.set_attention_chunk_size(None)
    assert_rel_close(chunked, full, REL, "chunked attention")


def test_gradient_checkpointing_same_gradients(monkeypatch):
    cfg = TINY["sdxl_base"]
    model = UNetModel(cfg).train()
    randomize(model, seed=5)
    inp = inputs(cfg)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(inp["x"], inp["timesteps"], inp["context"], inp["y"])
        (out**2).mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    # Count the checkpointed calls (and their use_reentrant flag) through the name unet.py uses.
    calls: list[object] = []
    original = unet_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting)
    model.gradient_checkpointing = True
    checkpointed = grads()
    n_blocks = len(model.input_blocks) + 1 + len(model.output_blocks)
    assert calls == [False] * n_blocks  # every block recomputed, non-reentrant
    for k in plain:
        assert_rel_close(checkpointed[k], plain[k], REL, f"grad {k}")
    # eval mode (or no_grad) runs plainly
    calls.clear()
    model.eval()
    run_ours(model, inp)
    assert calls == []


def test_channels_last_same_output(xl_model):
    inp = inputs(TINY["sdxl_base"])
    expected = run_ours(xl_model, inp)
    model = UNetModel(TINY["sdxl_base"]).eval()
    model.load_state_dict(xl_model.state_dict())
    model = model.to(memory_format=torch.channels_last)
    x = inp["x"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = model(x, inp["timesteps"], inp["context"], inp["y"])
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(got, expected, REL, "channels_last")


def test_bfloat16_casts_at_the_boundaries(xl_model):
    """A bf16 model takes fp32 timesteps, context and y (cast inside), returns bf16, and stays
    within bf16 precision of the fp32 model (8 mantissa bits, errors compound over ~40 layers)."""
    inp = inputs(TINY["sdxl_base"])
    expected = run_ours(xl_model, inp)
    model = UNetModel(TINY["sdxl_base"]).eval()
    model.load_state_dict(xl_model.state_dict())
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        got = model(inp["x"].bfloat16(), inp["timesteps"].long(), inp["context"], inp["y"])
    assert got.dtype == torch.bfloat16
    assert_rel_close(got.float(), expected, 5e-2, "bf16 vs fp32")
