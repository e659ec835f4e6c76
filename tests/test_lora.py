"""LoRA / LyCORIS files (minisd.lora) against diffusers' `load_lora_weights` and the lycoris package.

The files are made by the references, never by minisd: peft adds LoRA layers to diffusers'
UNet2DConditionModel and transformers' CLIPTextModel (`add_adapter(LoraConfig)`), their weights are
drawn at random, `get_peft_model_state_dict` reads them out, and then

- the diffusers / PEFT file is what `StableDiffusionPipeline.save_lora_weights` writes (with its
  `lora_adapter_metadata`: lora_alpha 8 over rank 4);
- the kohya file is diffusers' `convert_state_dict_to_kohya` of the same state dict, with the text
  encoder named as kohya names it (`lora_te_text_model_...` for SD1) and random `.alpha` values;
- the SDXL kohya file uses sgm's module names (`lora_unet_input_blocks_4_1_...`, as kohya's SDXL
  trainer writes them), renamed through diffusers' own single-file converter (`sgm_names`);
- LoHa / LoKr files are lycoris' `LycorisNetwork` state dicts of a network built on the diffusers U-Net.

Both sides then run the same file on the same tiny model (tests/test_pipeline.py's builders).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from minisd.families import FAMILIES
from minisd.lora import LoraError
from tests.test_pipeline import (
    SD1_UNET,
    SIZE,
    XL_BASE_UNET,
    diffusers_pipe,
    hf_tokenizer,
    make_scheduler,
    minisd_model,
    table_of,
    tiny_text,
    tiny_unet,
    tiny_vae,
)
from tests.test_unet import diffusers_config
from tests.utils import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

PROMPT = "a photograph of an astronaut riding a horse"
RANK, ALPHA = 4, 8.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]  # conv1/conv2: LoCon (3x3 down, 1x1 up)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# The outputs agree to fp32 round-off: the same products in another order (peft scales B's output,
# minisd too; diffusers' attention processors vs SDPA; fused: W + delta rounded once), through ~10
# layers of the tiny U-Net and 2 text blocks. Measured <= 3e-6 of max|output| (U-Net, context, pooled,
# fused or not; minisd vs itself with alphas folded into lora_up by hand: 8e-6); a missing layer, a
# wrong alpha or a wrong q/k/v slice moves it by > 1e-2 (each test checks the LoRA moved the output).
REL = 2e-5
# 3-4 step generations with guidance (7.5 SD1, 5 SDXL) amplify the round-off above: measured 4.5e-6
# (SD1) and 2.6e-5 (SDXL, 2048-wide context) of max|latent|; a wrong LoRA moves latents by O(1e-2).
LATENT_REL = 1e-4


# ------------------------------------------------------------------------------ models and files
@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(minisd model, diffusers parts) of a tiny SD1."""
    tok = hf_tokenizer(tmp_path_factory.mktemp("tok"), "<|endoftext|>")
    te_t, te_o = tiny_text(32, "quick_gelu", 2, seed=1)
    vae_t, vae_o = tiny_vae(0.18215, seed=2)
    u_t, u_o = tiny_unet(SD1_UNET, 3)
    use = FAMILIES["sd1"].text[0].use(te_o.config.layers)
    return minisd_model("sd1", u_o, vae_o, [te_o], [use]), dict(vae=vae_t, text_encoder=te_t, tokenizer=tok, unet=u_t)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")
    tok1, tok2 = hf_tokenizer(tok_dir, "<|endoftext|>"), hf_tokenizer(tok_dir, "!")
    l_t, l_o = tiny_text(768, "quick_gelu", 2, seed=7)
    g_t, g_o = tiny_text(1280, "gelu", 49407, seed=8, projection=True)
    vae_t, vae_o = tiny_vae(0.13025, seed=9)
    u_t, u_o = tiny_unet(XL_BASE_UNET, 10)
    uses = [t.use(e.config.layers) for t, e in zip(FAMILIES["sdxl"].text, (l_o, g_o))]
    parts = dict(vae=vae_t, text_encoder=l_t, text_encoder_2=g_t, tokenizer=tok1, tokenizer_2=tok2, unet=u_t)
    return minisd_model("sdxl", u_o, vae_o, [l_o, g_o], uses), parts


def peft_lora(model: torch.nn.Module, targets: list[str], seed: int) -> tuple[dict, dict]:
    """peft's LoRA state dict of `model` (a copy gets the adapter), every lora weight random, and its
    LoraConfig as diffusers stores it in the file's metadata."""
    model = copy.deepcopy(model)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return get_peft_model_state_dict(model), model.peft_config["default"].to_dict()


def diffusers_file(path, unet_lora: tuple, text_loras: dict, pipeline=StableDiffusionPipeline):
    """The file `save_lora_weights` writes (keys `unet.*`, `text_encoder*.*`, metadata with lora_alpha)."""
    kwargs = dict(unet_lora_layers=unet_lora[0], unet_lora_adapter_metadata=unet_lora[1])
    for folder, (state, config) in text_loras.items():
        kwargs[f"{folder}_lora_layers"] = state
        kwargs[f"{folder}_lora_adapter_metadata"] = config
    pipeline.save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path


def kohya_state(unet_lora: dict, text_loras: dict, te_names: dict, alpha: float = 2.0) -> dict:
    """diffusers' `convert_state_dict_to_kohya` of the PEFT state dicts, the text encoders named as
    kohya names them (`te_names`: folder -> kohya prefix, `text_model.` level included), every `.alpha`
    set to `alpha` (not the rank: scale alpha / r = 0.5).

    One alpha for all layers: diffusers 0.42.1 reads per-layer kohya alphas into an `alpha_pattern`
    keyed by its pre-PEFT names (`...attn1.processor.to_k_lora.down.weight`), which match no module,
    so its attention layers silently get the most common alpha instead of their own.
    `test_per_layer_alphas` checks minisd's per-layer alphas against a hand-rescaled file instead."""
    peft = {f"unet.{k}": v for k, v in unet_lora.items()}
    for folder, state in text_loras.items():
        # transformers 5 saves a plain CLIPTextModel without its `text_model.` level; kohya names have it
        peft.update({f"{folder}.text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()})
    kohya = convert_state_dict_to_kohya(peft)
    out = {}
    for key, value in kohya.items():
        for theirs, ours in te_names.items():
            key = key.replace(theirs, ours)
        out[key] = torch.tensor(alpha) if key.endswith(".alpha") else value
    return out


def unet_inputs(sd, seed: int = 0):
    """(x, timesteps, context, y) for minisd's U-Net; SDXL's y is built as diffusers builds it
    (`xl_y`), so the same inputs feed both U-Nets."""
    g = torch.Generator().manual_seed(seed)
    cfg = sd.unet.config
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g)
    y = None if cfg.adm_in_channels is None else torch.randn(2, cfg.adm_in_channels - 6 * 256, generator=g)
    return x, torch.tensor([10.0, 700.0]), ctx, y


TIME_IDS = torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 8, 0, 64, 64]])  # original size, crop, target size


def xl_y(pipe, pooled: torch.Tensor) -> torch.Tensor:
    """SDXL's vector y: the pooled text, then diffusers' own Fourier features of the six size/crop
    numbers (UNet2DConditionModel.get_aug_embed: add_time_proj, flattened per image)."""
    return torch.cat([pooled, pipe.unet.add_time_proj(TIME_IDS.flatten()).reshape(2, -1)], dim=-1)


@torch.no_grad()
def unet_out(sd, inputs, pipe=None):
    x, t, ctx, pooled = inputs
    return sd.unet(x, t, ctx, None if pooled is None else xl_y(pipe, pooled))


@torch.no_grad()
def diffusers_unet_out(pipe, inputs):
    x, t, ctx, pooled = inputs
    if pooled is None:
        return pipe.unet(x, t, encoder_hidden_states=ctx).sample
    added = {"text_embeds": pooled, "time_ids": TIME_IDS}
    return pipe.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


def params(sd) -> dict:
    """Every weight of the U-Net and text encoders, as cloned tensors (for the bit-identity checks)."""
    out = {f"unet.{k}": v.clone() for k, v in sd.unet.state_dict().items()}
    for i, e in enumerate(sd.text_encoders):
        out.update({f"te{i}.{k}": v.clone() for k, v in e.state_dict().items()})
    return out


def assert_identical(before: dict, sd) -> None:
    after = params(sd)
    assert list(after) == list(before), "state_dict keys changed"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"not bit-identical after unload/unfuse: {changed[:5]}"


# ------------------------------------------------------------------------------ SD1
@pytest.fixture(scope="module")
def sd1_files(sd1, tmp_path_factory):
    sd, parts = sd1
    folder = tmp_path_factory.mktemp("sd1_lora")
    u1, t1 = peft_lora(parts["unet"], UNET_TARGETS, seed=20), peft_lora(parts["text_encoder"], TEXT_TARGETS, 21)
    u2, t2 = peft_lora(parts["unet"], ["to_k", "to_v", "conv2"], seed=22), peft_lora(parts["text_encoder"],
                                                                                         ["fc1", "v_proj"], 23)
    kohya = kohya_state(u1[0], {"text_encoder": t1[0]}, te_names={"lora_te1_": "lora_te_"})
    save_file(kohya, folder / "kohya.safetensors")
    diffusers_file(folder / "peft.safetensors", u2, {"text_encoder": t2})
    return {"kohya": folder / "kohya.safetensors", "peft": folder / "peft.safetensors"}


def test_kohya_names_are_the_kohya_spellings(sd1_files):
    # The file under test holds what real SD1 kohya files hold: LoCon conv layers, the text encoder
    # as lora_te_text_model_encoder_layers_N_..., and .alpha per layer.
    from safetensors import safe_open

    keys = list(safe_open(sd1_files["kohya"], "pt").keys())
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in keys


def check_against_diffusers(sd, pipe, before_unet, before_ctx, ctx_ref_fn, inputs):
    """minisd's U-Net output and context equal diffusers' with the same LoRAs, and both moved."""
    ours_u, theirs_u = unet_out(sd, inputs), diffusers_unet_out(pipe, inputs)
    assert_rel_close(ours_u, theirs_u, REL, "U-Net output with LoRA")
    assert (ours_u - before_unet).abs().max() > 1e-2 * before_unet.abs().max(), "the LoRA changed nothing"
    ours_c, theirs_c = sd.encode_prompt(PROMPT).context, ctx_ref_fn()
    assert_rel_close(ours_c, theirs_c, REL, "context with LoRA")
    assert (ours_c - before_ctx).abs().max() > 1e-2 * before_ctx.abs().max(), "the text LoRA changed nothing"


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_sd1_lora_matches_diffusers_unfused_fused_and_unloads_exactly(sd1, sd1_files, kind):
    sd, parts = sd1
    pipe = diffusers_pipe(StableDiffusionPipeline, parts, make_scheduler("euler", "epsilon"))
    inputs = unet_inputs(sd)
    before, before_u, before_c = params(sd), unet_out(sd, inputs), sd.encode_prompt(PROMPT).context
    pipe.load_lora_weights(str(sd1_files[kind]), adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.8])
    ref_ctx = lambda: pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]  # noqa: E731
    try:
        name = sd.load_lora(sd1_files[kind], scale=0.8)
        check_against_diffusers(sd, pipe, before_u, before_c, ref_ctx, inputs)
        assert list(params(sd)) == list(before)  # hooks: same state_dict keys, weights untouched
        assert all(torch.equal(v, before[k]) for k, v in params(sd).items())
        sd.fuse_lora()
        check_against_diffusers(sd, pipe, before_u, before_c, ref_ctx, inputs)
        sd.unfuse_lora()
        assert_identical(before, sd)
        check_against_diffusers(sd, pipe, before_u, before_c, ref_ctx, inputs)  # unfused again: hooks
        sd.fuse_lora()
        sd.unload_lora(name)
        assert_identical(before, sd)
        assert torch.equal(unet_out(sd, inputs), before_u)
    finally:
        sd.unload_lora()
        pipe.unload_lora_weights()


def test_two_loras_with_their_own_scales_and_generate(sd1, sd1_files):
    # Two adapters at once (diffusers: set_adapters with adapter_weights), a scale changed after
    # loading, then a short txt2img compared latents-to-latents.
    sd, parts = sd1
    scheduler = make_scheduler("euler", "epsilon")
    pipe = diffusers_pipe(StableDiffusionPipeline, parts, scheduler)
    pipe.load_lora_weights(str(sd1_files["kohya"]), adapter_name="k")
    pipe.load_lora_weights(str(sd1_files["peft"]), adapter_name="p")
    pipe.set_adapters(["k", "p"], adapter_weights=[0.6, -0.9])
    before = params(sd)
    try:
        sd.load_lora(sd1_files["kohya"], scale=0.6, name="k")
        sd.load_lora(sd1_files["peft"], scale=0.3, name="p")
        sd.set_lora_scale("p", -0.9)
        inputs = unet_inputs(sd, seed=1)
        assert_rel_close(unet_out(sd, inputs), diffusers_unet_out(pipe, inputs), REL, "two LoRAs")
        theirs = pipe(PROMPT, width=SIZE, height=SIZE, num_inference_steps=4, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(5), output_type="latent").images
        ours = sd.generate(PROMPT, width=SIZE, height=SIZE, steps=4, schedule=table_of(scheduler), seed=5,
                           output="latent")  # fmt: skip
        assert_rel_close(ours, theirs, LATENT_REL, "latents with two LoRAs")
        sd.unload_lora("p")
        pipe.delete_adapters("p")
        pipe.set_adapters(["k"], adapter_weights=[0.6])
        assert_rel_close(unet_out(sd, inputs), diffusers_unet_out(pipe, inputs), REL, "one LoRA left")
    finally:
        sd.unload_lora()
        pipe.unload_lora_weights()
    assert_identical(before, sd)


def test_per_layer_alphas(sd1, sd1_files, tmp_path):
    # kohya / A1111 scale each layer by its own alpha / r (networks/lora.py: self.scale = alpha / lora_dim).
    # The same file with a different alpha per layer, against one whose lora_up is multiplied by
    # alpha / r by hand and whose alphas equal the rank (scale 1): the outputs must agree.
    sd, _ = sd1
    state = load_file(sd1_files["kohya"])
    g = torch.Generator().manual_seed(3)
    varied, by_hand = dict(state), dict(state)
    for key in state:
        if key.endswith(".alpha"):
            layer = key.removesuffix(".alpha")
            alpha = float(torch.randint(1, 9, (), generator=g))
            rank = state[f"{layer}.lora_down.weight"].shape[0]
            varied[key] = torch.tensor(alpha)
            by_hand[key] = torch.tensor(float(rank))
            by_hand[f"{layer}.lora_up.weight"] = state[f"{layer}.lora_up.weight"] * (alpha / rank)
    save_file(varied, tmp_path / "varied.safetensors")
    save_file(by_hand, tmp_path / "by_hand.safetensors")
    inputs = unet_inputs(sd, seed=2)
    outs = []
    for name in ("varied", "by_hand"):
        sd.load_lora(tmp_path / f"{name}.safetensors")
        outs.append((unet_out(sd, inputs), sd.encode_prompt(PROMPT).context))
        sd.unload_lora()
    # (alpha / r) x up computed once in the file vs alpha / r applied to up(down(x)): fp32 reassociation.
    assert_rel_close(outs[0][0], outs[1][0], REL, "U-Net, per-layer alphas")
    assert_rel_close(outs[0][1], outs[1][1], REL, "context, per-layer alphas")


# ------------------------------------------------------------------------------ SDXL
def sgm_names(unet_config, diffusers_unet) -> dict[str, str]:
    """diffusers module name -> sgm (official) module name, read off diffusers' own single-file
    converter: convert an official state dict and see where each tensor lands."""
    from minisd.unet import UNetModel

    official = UNetModel(unet_config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in official.parameters():
            p.copy_(torch.randn(p.shape))
    theirs = {"model.diffusion_model." + k: v for k, v in official.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(theirs, diffusers_config(unet_config, theirs))
    by_value = {(tuple(v.shape), float(v.flatten()[0]), float(v.sum())): k for k, v in official.state_dict().items()}
    out = {}
    for key, value in converted.items():
        ours = by_value[(tuple(value.shape), float(value.flatten()[0]), float(value.sum()))]
        out[key.removesuffix(".weight")] = ours.removesuffix(".weight")
    return out


@pytest.fixture(scope="module")
def sdxl_file(sdxl, tmp_path_factory):
    """A kohya SDXL LoRA as kohya's SDXL trainer names it: sgm U-Net names, lora_te1_ / lora_te2_."""
    sd, parts = sdxl
    unet_lora = peft_lora(parts["unet"], UNET_TARGETS, seed=30)[0]
    te1 = peft_lora(parts["text_encoder"], TEXT_TARGETS, 31)[0]
    te2 = peft_lora(parts["text_encoder_2"], TEXT_TARGETS, 32)[0]
    state = kohya_state(unet_lora, {"text_encoder": te1, "text_encoder_2": te2}, te_names={})
    names = {"lora_unet_" + d.replace(".", "_"): "lora_unet_" + o.replace(".", "_")
             for d, o in sgm_names(sd.unet.config, parts["unet"]).items()}  # fmt: skip
    renamed = {}
    for key, value in state.items():
        layer, _, role = key.partition(".")
        renamed[f"{names.get(layer, layer)}.{role}"] = value
    assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
    path = tmp_path_factory.mktemp("sdxl_lora") / "xl.safetensors"
    save_file(renamed, path)
    return path


def test_sdxl_kohya_lora_matches_diffusers(sdxl, sdxl_file):
    sd, parts = sdxl
    scheduler = make_scheduler("euler", "epsilon")
    pipe = diffusers_pipe(StableDiffusionXLPipeline, parts, scheduler)
    inputs = unet_inputs(sd, seed=3)
    before, before_u = params(sd), unet_out(sd, inputs, pipe)
    before_c = sd.encode_prompt(PROMPT)
    pipe.load_lora_weights(str(sdxl_file), adapter_name="xl")
    pipe.set_adapters(["xl"], adapter_weights=[0.7])
    try:
        sd.load_lora(sdxl_file, scale=0.7)
        ours = unet_out(sd, inputs, pipe)
        assert_rel_close(ours, diffusers_unet_out(pipe, inputs), REL, "SDXL U-Net with LoRA")
        assert (ours - before_u).abs().max() > 1e-2 * before_u.abs().max()
        cond = sd.encode_prompt(PROMPT)
        ctx, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)  # fmt: skip
        assert_rel_close(cond.context, ctx, REL, "SDXL context (both encoders) with LoRA")
        assert_rel_close(cond.pooled, pooled, REL, "SDXL pooled (bigG) with LoRA")
        for part in (slice(0, 768), slice(768, 2048)):  # each encoder's LoRA moved its half
            moved = (cond.context[..., part] - before_c.context[..., part]).abs().max()
            assert moved > 1e-2 * before_c.context[..., part].abs().max()
        theirs = pipe(PROMPT, width=SIZE, height=SIZE, num_inference_steps=3,
                      generator=torch.Generator().manual_seed(6), output_type="latent").images
        ours = sd.generate(PROMPT, width=SIZE, height=SIZE, steps=3, schedule=table_of(scheduler), seed=6,
                           output="latent")  # fmt: skip
        assert_rel_close(ours, theirs, LATENT_REL, "SDXL latents with LoRA")
        sd.fuse_lora()
        assert_rel_close(unet_out(sd, inputs, pipe), diffusers_unet_out(pipe, inputs), REL, "SDXL fused")
        sd.unfuse_lora()
        sd.unload_lora()
        assert_identical(before, sd)
    finally:
        sd.unload_lora()
        pipe.unload_lora_weights()


# ------------------------------------------------------------------------------ LyCORIS
LYCORIS = {  # id -> create_lycoris arguments (rank 4, alpha 2: scale 0.5 where lycoris scales)
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-full": dict(algo="lokr", factor=-1, full_matrix=True),
}


def lycoris_file(unet, kind: str, path, seed: int):
    """A LyCORIS network on a copy of the diffusers U-Net (every Linear / Conv2d), its weights random;
    returns (the U-Net with the network applied, the saved file's tensors). lycoris names layers
    `lycoris_<module>`; kohya-style files (what A1111 and ComfyUI read) call them `lora_unet_<module>`."""
    from lycoris import create_lycoris

    unet = copy.deepcopy(unet)
    network = create_lycoris(unet, 1.0, linear_dim=RANK, linear_alpha=2.0, **LYCORIS[kind])
    network.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = {k.replace("lycoris_", "lora_unet_", 1): v.detach().clone() for k, v in network.state_dict().items()}
    save_file(state, path)
    return unet.eval(), state


def lycoris_delta(kind: str, parts: dict, alpha: float) -> torch.Tensor:
    """lycoris' functional delta of one layer (scale included) from the file's tensors."""
    from lycoris.functional import loha, lokr

    if kind.startswith("loha"):
        w = [parts.get(f"hada_{n}") for n in ("w1_b", "w1_a", "w2_b", "w2_a", "t1", "t2")]
        return loha.diff_weight(*w, gamma=alpha / parts["hada_w1_b"].shape[0], backend="torch")
    w = [parts.get(f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")]
    return lokr.diff_weight(*w, gamma=alpha, backend="torch")


@pytest.mark.parametrize("kind", list(LYCORIS))
def test_lycoris_matches_the_lycoris_package(sd1, tmp_path, kind):
    sd, parts = sd1
    reference, state = lycoris_file(parts["unet"], kind, tmp_path / f"{kind}.safetensors", seed=40)
    expected = {"loha": "hada_w2_b", "loha-tucker": "hada_t1", "lokr": "lokr_w2_b", "lokr-full": "lokr_w2"}[kind]
    assert any(k.endswith(expected) for k in state), f"the {kind} file has no {expected}"
    inputs = unet_inputs(sd, seed=4)
    before, before_u = params(sd), unet_out(sd, inputs)
    name = sd.load_lora(tmp_path / f"{kind}.safetensors")
    try:
        # per layer: minisd's delta = lycoris' functional one, on every layer of the file
        layers = sd.loras.adapters[name].layers
        assert len(layers) == len({k.rpartition(".")[0] for k in state}) > 50
        for layer in layers:
            file_parts = {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == layer.name}
            theirs = lycoris_delta(kind, file_parts, float(file_parts["alpha"]))
            # a handful of fp32 products of length <= rank x 9: a few ulps
            assert_rel_close(layer.delta(theirs.shape), theirs, 1e-6, f"{kind} delta of {layer.name}")
        # the model: lycoris' own forward on the diffusers U-Net vs minisd's hooks, then fused
        with torch.no_grad():
            theirs = reference(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        ours = unet_out(sd, inputs)
        assert_rel_close(ours, theirs, REL, f"{kind} U-Net output")
        assert (ours - before_u).abs().max() > 1e-2 * before_u.abs().max()
        sd.fuse_lora()
        assert_rel_close(unet_out(sd, inputs), theirs, REL, f"{kind} U-Net output, fused")
    finally:
        sd.unload_lora()
    assert_identical(before, sd)


# ------------------------------------------------------------------------------ errors
@pytest.mark.reliability("LoRA", "an SDXL LoRA on an SD1 model", "LoraError naming both families")
def test_lora_for_another_family_is_refused_naming_both(sd1, sdxl_file):
    sd, _ = sd1
    before = params(sd)
    with pytest.raises(LoraError, match=r"SDXL: cross-attention context width 2048.*the loaded model is sd1"):
        sd.load_lora(sdxl_file)
    assert not sd.loras.adapters
    assert_identical(before, sd)


@pytest.mark.reliability("LoRA", "layers the model does not have", "LoraError listing the unknown keys")
def test_unknown_layers_are_listed(sd1, sd1_files, tmp_path):
    sd, _ = sd1
    state = load_file(sd1_files["kohya"])
    state["lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight"] = torch.zeros(4, 32, 3, 3)
    state["lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight"] = torch.zeros(32, 4, 1, 1)
    state["lora_unet_extra.weird_tensor"] = torch.zeros(3)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(LoraError) as e:
        sd.load_lora(tmp_path / "extra.safetensors")
    assert "1 unknown layers: lora_unet_down_blocks_7_resnets_0_conv1" in str(e.value)
    assert "lora_unet_extra.weird_tensor" in str(e.value)


@pytest.mark.reliability("LoRA", "a delta of the wrong shape", "LoraError naming the layer and both shapes")
def test_wrong_shape_is_named(sd1, sd1_files, tmp_path):
    sd, _ = sd1
    state = load_file(sd1_files["kohya"])
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state[f"{layer}.lora_up.weight"] = torch.zeros(48, RANK)  # to_q is 32 x 32
    save_file(state, tmp_path / "shape.safetensors")
    with pytest.raises(LoraError, match=rf"wrong shapes: {layer} \(delta \(48, 32\), weight \(32, 32\)\)"):
        sd.load_lora(tmp_path / "shape.safetensors")


@pytest.mark.parametrize("keys,looks_like", [
    ({"emb_params": (2, 32)}, "A1111 textual-inversion embedding"),
    ({"string_to_param.*": (1, 32)}, "A1111 textual-inversion embedding"),
    ({"clip_l": (1, 768), "clip_g": (1, 1280)}, "SDXL textual-inversion embedding"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)}, "full Stable Diffusion checkpoint"),
    ({"encoder.conv_in.weight": (32, 3, 3, 3), "decoder.conv_in.weight": (32, 4, 3, 3)}, "standalone VAE"),
])  # fmt: skip
@pytest.mark.reliability("LoRA", "a file that is not a LoRA", "LoraError saying what it looks like")
def test_not_a_lora_says_what_it_looks_like(sd1, tmp_path, keys, looks_like):
    sd, _ = sd1
    save_file({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "x.safetensors")
    with pytest.raises(LoraError, match=f"not a LoRA file: it looks like an? {looks_like}"):
        sd.load_lora(tmp_path / "x.safetensors")


def test_names_and_scales_are_checked(sd1, sd1_files):
    sd, _ = sd1
    try:
        sd.load_lora(sd1_files["kohya"], name="a")
        with pytest.raises(ValueError, match="a LoRA named 'a' is already loaded"):
            sd.load_lora(sd1_files["kohya"], name="a")
        with pytest.raises(ValueError, match=r"no LoRA named 'b' is loaded; loaded: \['a'\]"):
            sd.set_lora_scale("b", 1.0)
        with pytest.raises(ValueError, match="scale: expected a finite number"):
            sd.set_lora_scale("a", float("nan"))
    finally:
        sd.unload_lora()
