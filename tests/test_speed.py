"""Speed options (minisd.speed) against the plain models and diffusers' own fused attention.

Tolerances. A fused projection computes every output element as the same length-K dot product as
the separate layer did (K = the layer's input width, <= 64 here); only the GEMM's blocking, and so the
order of the K-term sum, may change with the wider output, which moves each element by a few fp32
ulps (~1e-7 relative, at most K * 6e-8 of the terms' sum). Through the tiny U-Net's ~20 layers (norms
keep activations O(1)), measured <= 1e-6 of max|output|; the bound is test_unet.py's 1e-5, which any
real error (a q/k/v row block swapped, k and v exchanged) exceeds by orders of magnitude (checked
below). Against diffusers, fused on both sides, the same 1e-5 as every U-Net / VAE parity test.
A compiled module with the "eager" backend runs the very same kernels, so its outputs are compared
with torch.equal. The generation with fused projections is compared at the tiny model's latent tolerance
(2 guided steps: 1e-5 of max|latent|, round-off amplified ~10x by guidance, cf. test_lora.py).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

import minisd
from minisd import samplers, speed
from minisd.clip import TextTransformer
from minisd.denoisers import DiscreteDenoiser, cfg_denoiser
from minisd.diffusers_format import unet_table, vae_table
from minisd.keymap import load_strict
from minisd.pipeline import keep_known
from minisd.schedules import DiscreteSchedule
from minisd.unet import UNetConfig, UNetModel
from tests.test_unet import PREFIX, TINY, diffusers_config, inputs, randomize, run_ours, run_theirs
from tests.test_vae import TINY as TINY_VAE
from tests.test_vae import _diffusers_config as vae_diffusers_config
from tests.test_vae import _tiny as tiny_vae
from tests.tiny import TINY_L
from tests.utils import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

REL = 1e-5  # see the module docstring


def tiny_unet(name: str, seed: int = 0) -> UNetModel:
    model = UNetModel(TINY[name]).eval()
    randomize(model, seed)
    return model


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The same keys in the same order, every tensor bit-identical, none sharing storage with another."""
    after = module.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k
    pointers = [v.untyped_storage().data_ptr() for v in after.values()]
    assert len(set(pointers)) == len(pointers)  # own storage each: saves like a loaded model


# ---------------------------------------------------------------------------------- fused projections
@pytest.mark.parametrize("name", ["sd1", "sdxl_base"])  # 1x1-conv and linear proj_in; with and without y
def test_fused_unet_matches_unfused_and_diffusers_fused(name):
    ours = tiny_unet(name)
    inp = inputs(TINY[name])
    plain = run_ours(ours, inp)
    theirs = UNet2DConditionModel(**diffusers_config(TINY[name], {PREFIX + k: v for k, v in ours.state_dict().items()}))
    theirs.load_state_dict(unet_table(TINY[name]).to_theirs(ours.state_dict()))
    theirs.eval().fuse_qkv_projections()

    speed.fuse_projections(ours)
    names = [k for k in ours.state_dict() if ".attn" in k]
    assert any(".attn1.to_qkv." in k for k in names) and any(".attn2.to_kv." in k for k in names)
    assert not any(k.endswith((".to_k.weight", ".to_v.weight")) for k in names)  # no second copy kept
    fused = run_ours(ours, inp)
    assert_rel_close(fused, plain, REL, f"{name} fused vs unfused")
    assert_rel_close(fused, run_theirs(theirs, inp), REL, f"{name} fused vs diffusers fused")

    # A wrong fusion would show: exchange k and v rows of one self-attention.
    attn = ours.middle_block[1].transformer_blocks[0].attn1
    with torch.no_grad():
        q, k, v = attn.to_qkv.weight.clone().chunk(3)
        attn.to_qkv.weight.copy_(torch.cat([q, v, k]))
    assert (run_ours(ours, inp) - plain).abs().max() > 100 * REL * plain.abs().max()


def test_unfuse_restores_the_state_dict_exactly():
    ours, vae = tiny_unet("sdxl_base", seed=3), tiny_vae(3).to(torch.bfloat16)  # dtypes are kept too
    before_unet, before_vae = state(ours), state(vae)
    speed.fuse_projections(ours)
    speed.fuse_projections(speed.fuse_projections(vae))  # fusing twice is a no-op
    assert speed.projections_fused(ours) and speed.projections_fused(vae)
    assert "encoder.mid.attn_1.qkv.weight" in vae.state_dict()
    speed.unfuse_projections(ours)
    speed.unfuse_projections(vae)
    assert not speed.projections_fused(ours) and not speed.projections_fused(vae)
    assert_same_state(ours, before_unet)
    assert_same_state(vae, before_vae)
    # ... and the official key table still loads it strictly.
    load_strict(UNetModel(TINY["sdxl_base"]), ours.state_dict(), source="unfused")


def test_fused_vae_matches_unfused_and_diffusers_fused():
    ours = tiny_vae(1)
    theirs = DiffusersAutoencoderKL(**vae_diffusers_config(TINY_VAE, {})).eval()
    theirs.load_state_dict(vae_table(TINY_VAE).to_theirs(ours.state_dict()))
    theirs.fuse_qkv_projections()
    z = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(4))
    images = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        plain, plain_mean = ours.decode(z), ours.encode(images).mean
        speed.fuse_projections(ours)
        assert_rel_close(ours.decode(z), plain, REL, "fused decode vs unfused")
        assert_rel_close(ours.encode(images).mean, plain_mean, REL, "fused encode vs unfused")
        assert_rel_close(ours.decode(z), theirs.decode(z).sample, REL, "fused decode vs diffusers fused")


@pytest.fixture()
def sd():
    return minisd.load(minisd.TINY)


def lora_file(sd, path):
    """A one-layer kohya LoRA on the first self-attention's to_q (rank 2)."""
    layer = "input_blocks.3.1.transformer_blocks.0.attn1.to_q"
    out_f, in_f = sd.unet.get_submodule(layer).weight.shape
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_" + layer.replace(".", "_")
    save_file({f"{name}.lora_down.weight": torch.randn(2, in_f, generator=g),
               f"{name}.lora_up.weight": torch.randn(out_f, 2, generator=g), f"{name}.alpha": torch.tensor(2.0)},
              str(path))  # fmt: skip
    return path


@pytest.mark.reliability(
    "speed: fused projections and LoRA",
    "load_lora on a model with fused projections, or fuse_projections with LoRAs loaded",
    "ValueError saying to call unfuse_projections / unload_lora first",
)
def test_lora_and_fused_projections_refuse_each_other(sd, tmp_path):
    path = lora_file(sd, tmp_path / "one.safetensors")
    sd.fuse_projections()
    with pytest.raises(ValueError, match=r"load_lora: the attention projections are fused.*unfuse_projections"):
        sd.load_lora(path)
    assert not sd.loras.adapters
    sd.unfuse_projections()
    sd.load_lora(path)
    with pytest.raises(ValueError, match=r"fuse_projections: LoRAs are loaded \(one\).*unload_lora"):
        sd.fuse_projections()
    assert not speed.projections_fused(sd.unet)
    sd.unload_lora()
    sd.fuse_projections()  # allowed again


def test_generation_with_fused_projections(sd):
    kwargs = dict(steps=2, seed=0, output="latent", width=64, height=64)
    plain = sd.generate("a red square", **kwargs)
    sd.fuse_projections()
    fused = sd.generate("a red square", **kwargs)
    assert_rel_close(fused, plain, REL, "fused generation")


# ---------------------------------------------------------------------------------- torch.compile
class Counter:
    """A dynamo backend that counts the graphs it is given and runs them as traced (no codegen)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# The smallest U-Net with every kind of block: a ResBlock and a linear-projection transformer with y
# (SDXL's paths), attention at the lower level only (tracing time grows with the blocks: ~20 s a graph
# here on a loaded 2-core machine).
COMPILE_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                          num_head_channels=16, context_dim=24, use_linear_in_transformer=True,
                          adm_in_channels=32 + 2 * 256)  # fmt: skip


def test_unet_compiles_whole_and_a_new_size_does_not_recompile():
    """fullgraph=True: a graph break would raise. Latent sizes 16 and 24 give a static, then a dynamic
    graph (torch's automatic dynamic shapes, `dynamic=None`). Fusing the projections changes the
    modules, so the next call compiles once more (size 32, dynamic already); size 40 reuses that graph.
    (A dimension that has not changed yet, such as the batch here, is still static: its first change
    compiles once more, then it too is dynamic.)"""
    model = UNetModel(COMPILE_UNET).eval()
    randomize(model, 0)
    expected = {size: run_ours(model, inputs(COMPILE_UNET, size=size)) for size in (16, 24, 32, 40)}
    counter = Counter()
    speed.compile_module(model, backend=counter)
    for size, graphs, fused in ((16, 1, False), (24, 2, False), (32, 3, True), (40, 3, True)):
        if fused:
            speed.fuse_projections(model)
        got = run_ours(model, inputs(COMPILE_UNET, size=size))
        if not fused:  # the eager backend runs the very same kernels
            assert torch.equal(got, expected[size]), size
        assert_rel_close(got, expected[size], REL, f"compiled, size {size}")  # fused: sums in another order
        assert counter.graphs == graphs, size
    keys = [k for k in model.state_dict() if "attn1" in k]
    assert keys[0].startswith("input_blocks.") and ".attn1.to_qkv." in keys[0]  # names unchanged by compiling


def test_vae_decoder_and_text_encoder_compile_whole():
    vae = speed.fuse_projections(tiny_vae(2))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = TextTransformer(TINY_L).eval()
    with torch.no_grad():
        for p in text.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 3, [49406, 550, 49407] + [0] * 4])
    with torch.no_grad():
        image, out = vae.decode(z), text(ids)
        counter = Counter()
        speed.compile_module(vae, backend=counter)
        speed.compile_module(text, backend=counter)
        assert torch.equal(vae.decode(z), image)
        got = text(ids)
    assert torch.equal(got.last_hidden_state, out.last_hidden_state) and torch.equal(got.pooled, out.pooled)
    assert counter.graphs == 2
    with pytest.raises(ValueError, match="input_ids must lie in"):  # the checks still run, eagerly
        text(ids - 1)


# ---------------------------------------------------------------------------------- no host syncs
SCHEDULE = DiscreteSchedule.scaled_linear()


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_sampling_loop_never_reads_a_value_back(name):
    """The whole loop (sampler, guided denoiser, inpainting overwrite) runs on the meta device, where
    any read of a value (.item(), bool(), a copy to the CPU, nonzero) raises: it never waits for the
    device. The schedule itself is host data, read once before the loop."""
    plan = samplers.plan_sampler(name, SCHEDULE, 4)
    meta = torch.device("meta")
    cond = {"context": torch.empty(1, 7, 8, device=meta)}
    uncond = {"context": torch.empty(1, 7, 8, device=meta)}
    denoiser = DiscreteDenoiser(lambda x, t, context: x * t[:, None, None, None] + context.mean(), SCHEDULE,
                                "v_prediction", quantize=plan.quantize)  # fmt: skip
    guided = cfg_denoiser(denoiser, cond, uncond, 7.5, rescale=0.7)
    mask, known, noise = (torch.empty(1, 4, 8, 8, device=meta) for _ in range(3))
    model = keep_known(guided, mask, known, noise, float(plan.sigmas[0]))
    x = plan.run(model, torch.empty(1, 4, 8, 8, device=meta), plan.sigmas)
    assert x.device == meta and x.shape == (1, 4, 8, 8)


def test_generate_reads_no_value_back_between_unet_calls(sd, monkeypatch):
    """On the CPU: from the first U-Net call to the last, nothing converts a tensor to a Python value
    (the per-step NaN check included: without a callback it is read once, after the loop)."""
    calls, armed = [], []

    def guarded(method: str):
        original = getattr(torch.Tensor, method)

        def read(self, *args, **kwargs):
            if armed:
                raise AssertionError(f"Tensor.{method} inside the sampling loop")
            return original(self, *args, **kwargs)

        return read

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method, guarded(method))
    steps = 3
    sd.unet.register_forward_pre_hook(lambda m, a: armed.append(1) if not calls else None)
    sd.unet.register_forward_hook(lambda m, a, o: calls.append(1) or (armed.clear() if len(calls) == steps else None))
    sd.generate("a red square", steps=steps, seed=0, output="latent", width=64, height=64)
    assert len(calls) == steps and not armed


def test_save_refuses_a_fused_model(tmp_path):
    """The file layouts name to_q / to_k / to_v: a fused model must be unfused before it is written."""
    sd = minisd.load(minisd.TINY)
    sd.fuse_projections()
    with pytest.raises(ValueError, match=r"save: the attention projections are fused .*unfuse_projections"):
        minisd.save(sd, tmp_path / "fused.safetensors")
    assert not (tmp_path / "fused.safetensors").exists()
    sd.unfuse_projections()
    assert minisd.save(sd, tmp_path / "unfused.safetensors").exists()


# ---------------------------------------------------------------------------------- prepacked convolutions
# oneDNN's blocked convolution sums each output's K = C_in * 9 products (<= 576 here) in another order
# than the plain NCHW path: a few fp32 ulps per layer, the same size as the fused GEMMs' reordering
# above, so the same REL bound (measured on the full-size SD1.5 U-Net: 6e-6 of max|output|).
def test_packed_convolutions_match_plain_and_diffusers_and_keep_the_state_dict():
    ours = tiny_unet("sd1", seed=5)
    inp = inputs(TINY["sd1"])
    plain, before = run_ours(ours, inp), state(ours)
    theirs = UNet2DConditionModel(**diffusers_config(TINY["sd1"], {PREFIX + k: v for k, v in before.items()}))
    theirs.load_state_dict(unet_table(TINY["sd1"]).to_theirs(before))
    speed.pack_convolutions(ours)
    convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(m) is speed.PackedConv2d for m in convs)
    with torch.inference_mode():
        packed = ours(inp["x"], inp["timesteps"], inp["context"])
    assert all(m._packed is not None for m in convs)  # the oneDNN path ran, not the plain fallback
    assert packed.is_contiguous(memory_format=torch.channels_last)  # NHWC out, as oneDNN's kernels give
    assert_rel_close(packed, plain, REL, "packed vs plain")
    assert_rel_close(packed, run_theirs(theirs.eval(), inp), REL, "packed vs diffusers")
    assert_same_state(ours, before)
    speed.unpack_convolutions(ours)
    assert all(type(m) is torch.nn.Conv2d and "_packed" not in vars(m) for m in convs)
    assert torch.equal(run_ours(ours, inp), plain)  # the plain kernels again, to the bit


def test_packed_convolution_follows_weight_changes_and_falls_back_where_it_cannot_pack():
    conv = speed.pack_convolutions(torch.nn.Conv2d(8, 16, 3, padding=1))
    reference = torch.nn.Conv2d(8, 16, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(0))
    # K = 72 products per output: a few ulps of their sum (|terms| ~ 1e-1, so ~1e-6 absolute)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-5)
        first = conv._packed
    with torch.no_grad():  # an in place update (as fuse_lora makes) bumps the version: packed again
        conv.weight.mul_(-2)
        reference.weight.mul_(-2)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-5)
    assert conv._packed is not first
    # autograd, fp16 and non-zero padding modes run the plain convolution: the very same kernels
    x.requires_grad_(True)
    out = conv(x)
    out.sum().backward()
    assert torch.equal(out, reference(x)) and conv.weight.grad is not None
    half, ref_half = conv.half(), reference.half()
    with torch.inference_mode():
        assert torch.equal(half(x.detach().half()), ref_half(x.detach().half()))


def test_generation_with_packed_convolutions(sd):
    kwargs = dict(steps=2, seed=0, output="latent", width=64, height=64)
    plain = sd.generate("a red square", **kwargs)
    sd.pack_convolutions()
    packed = sd.generate("a red square", **kwargs)
    assert_rel_close(packed, plain, REL, "packed generation")  # 2 guided steps: see the module docstring
    sd.unpack_convolutions()
    assert torch.equal(sd.generate("a red square", **kwargs), plain)


# ---------------------------------------------------------------------------------- sub-pixel upsampling
def test_upsample_conv_is_nearest_upsampling_then_the_conv_exactly():
    """In float64 the folded 2x2 phases equal conv3x3(nearest x2) to rounding (1e-12 of max; the
    folding pre-adds at most 4 taps, each product then summed in another order): an independent
    check of the identity, on odd sizes and with a bias."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(5, 6, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, 5, 5, 7, generator=g, dtype=torch.float64)
    phases = torch.nn.Conv2d(5, 24, 2, padding=1).double()
    with torch.no_grad():
        phases.weight.copy_(speed.phase_weights(conv.weight))
        phases.bias.copy_(conv.bias.repeat(4))
        expected = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        torch.testing.assert_close(speed.upsample_conv(x, phases), expected, rtol=0, atol=1e-12 * expected.abs().max())


@pytest.mark.parametrize("packed", [False, True])
def test_subpixel_upsampling_matches_plain_unet_vae_and_diffusers(packed):
    """The tiny U-Net and VAE decoder with sub-pixel upsampling (and packed convolutions): the plain
    model's outputs within REL (fp32 rounding of the pre-added taps: ~1e-7 per upsampler), diffusers' too."""
    unet, vae = tiny_unet("sd1", seed=6), tiny_vae(6)
    inp, z = inputs(TINY["sd1"]), torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(7))
    theirs = DiffusersAutoencoderKL(**vae_diffusers_config(TINY_VAE, {})).eval()
    theirs.load_state_dict(vae_table(TINY_VAE).to_theirs(vae.state_dict()))
    with torch.no_grad():
        plain, image, image_theirs = run_ours(unet, inp), vae.decode(z), theirs.decode(z).sample
    before = state(unet)
    for module in (unet, vae):
        speed.subpixel_upsampling(speed.pack_convolutions(module) if packed else module)
    ups = [m for m in (*unet.modules(), *vae.modules()) if isinstance(m, speed.SubpixelUpsample)]
    assert len(ups) == 1 + 2  # the tiny U-Net's one upsampler, the tiny VAE decoder's two
    with torch.inference_mode():
        assert_rel_close(unet(inp["x"], inp["timesteps"], inp["context"]), plain, REL, "subpixel U-Net")
        decoded = vae.decode(z)
    assert all("_phases" in vars(m) for m in ups)  # the phase path ran
    assert_rel_close(decoded, image, REL, "subpixel VAE decode")
    assert_rel_close(decoded, image_theirs, REL, "subpixel VAE decode vs diffusers")
    assert_same_state(unet, before)
    speed.plain_upsampling(unet), speed.unpack_convolutions(unet)
    assert torch.equal(run_ours(unet, inp), plain)


def test_subpixel_upsampling_follows_the_weights_trains_and_respects_hooks():
    up = speed.subpixel_upsampling(minisd.unet.Upsample(4))
    plain = minisd.unet.Upsample(4)
    plain.load_state_dict(up.state_dict())
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(up(x), plain(x), rtol=0, atol=1e-6)  # fp32, 36 products: a few ulps of O(1)
        up.conv.weight.mul_(3), plain.conv.weight.mul_(3)  # in place: the phases are derived again
        torch.testing.assert_close(up(x), plain(x), rtol=0, atol=3e-6)
    # autograd: the same gradients reach conv's weight as through the plain module
    up(x).square().sum().backward(), plain(x).square().sum().backward()
    torch.testing.assert_close(up.conv.weight.grad, plain.conv.weight.grad, rtol=1e-5, atol=1e-5)
    # a hook on conv (what an unfused LoRA adds) must run: the plain path is taken
    handle = up.conv.register_forward_hook(lambda module, args, out: out * 0)
    with torch.no_grad():
        assert up(x).abs().max() == 0
    handle.remove()


def test_subpixel_upsampling_compiles_whole():
    """Inside torch.compile the phase weights are derived in the graph: one graph, no break (fullgraph),
    and the traced computation is the eager sub-pixel one (same kernels with the counting backend)."""
    model = speed.subpixel_upsampling(UNetModel(COMPILE_UNET).eval())
    randomize(model, 1)
    inp = inputs(COMPILE_UNET, size=16)
    with torch.no_grad():
        speed.plain_upsampling(model)
        plain = run_ours(model, inp)
        speed.subpixel_upsampling(model)
    counter = Counter()
    speed.compile_module(model, backend=counter)
    assert_rel_close(run_ours(model, inp), plain, REL, "compiled sub-pixel U-Net")
    assert counter.graphs == 1
