"""minisd.clip against HF transformers' CLIPTextModel(WithProjection) and open_clip's text tower.

Tolerance: fp32 everywhere, 1e-5 relative to the largest reference value (tests.utils.assert_rel_close).
Both sides compute the same ops in fp32; they differ only in summation order (one fused [q; k; v]
matmul against three, SDPA against eager softmax, fp32-upcast LayerNorm against plain), which moves
results by a few fp32 ulps per op (~1e-7 relative) and stays well under 1e-5 after a few layers. A
wrong weight mapping, activation or mask gives errors of order 1.
"""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import safetensors.torch
import torch
from open_clip.transformer import QuickGELU as OpenClipQuickGELU
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from minisd.clip import CLIP_VIT_L14, OPENCLIP_VIT_BIGG14, OPENCLIP_VIT_H14, TextConfig, TextTransformer
from minisd.families import FAMILIES
from minisd.keymap import CheckpointError, load_strict
from minisd.layouts import hf_table, open_clip_table
from minisd.tokenizer import EOT_TOKEN_ID, VOCAB_SIZE
from tests.utils import assert_rel_close

REL = 1e-5  # fp32 parity, see the module docstring
SOT, EOT = 49406, 49407

# The text_encoder*/config.json of the diffusers repos (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0), architecture fields only.
SD1_HF = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768, vocab_size=49408, max_position_embeddings=77,
              layer_norm_eps=1e-5, eos_token_id=2)
SD2_HF = dict(SD1_HF, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
              hidden_act="gelu", projection_dim=512)
SDXL_HF_2 = dict(SD1_HF, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 hidden_act="gelu", projection_dim=1280, eos_token_id=49407)


# --------------------------------------------------------------------------- helpers
def make_ids(gen: torch.Generator, length: int = 77) -> torch.Tensor:
    """Rows [SOT, ids..., EOT, pad...]: padded with EOT (SD1/SDXL tokenizer), with 0 (open_clip's),
    and one row with no padding at all (EOT in the last position)."""
    rows = []
    for n, pad in ((5, EOT), (min(20, length), 0), (length, EOT)):
        body = torch.randint(0, SOT, (n - 2,), generator=gen).tolist()
        rows.append([SOT, *body, EOT] + [pad] * (length - n))
    return torch.tensor(rows)


@torch.no_grad()
def randomize(module: nn.Module, gen: torch.Generator, std: float = 0.3) -> None:
    """Non-trivial weights: N(0, std) everywhere, LayerNorm scales around 1."""
    for name, p in module.named_parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * std)
        if name.endswith("weight") and p.dim() == 1:  # LayerNorm scale
            p.add_(1.0)


def on_disk(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 flattens CLIPTextModel (no `text_model.`); files written before, as in every
    SD checkpoint and diffusers repo, have it."""
    return sd if hasattr(model, "text_model") else {"text_model." + k: v for k, v in sd.items()}


def through_file(sd: dict[str, torch.Tensor], prefix: str, path) -> dict[str, torch.Tensor]:
    """Write `sd` under `prefix` into a safetensors file, read it back, strip the prefix."""
    safetensors.torch.save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))
    return {k.removeprefix(prefix): v for k, v in safetensors.torch.load_file(str(path)).items()}


def build_ours(config: TextConfig, sd_ours: dict[str, torch.Tensor]) -> TextTransformer:
    with torch.device("meta"):
        model = TextTransformer(config)
    return load_strict(model, sd_ours, source="test").eval()


def tiny_hf(with_projection: bool, act: str, eos_token_id: int, seed: int):
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_hidden_layers=3, max_position_embeddings=77, hidden_act=act, projection_dim=24,
                         layer_norm_eps=1e-5, eos_token_id=eos_token_id)
    cfg._attn_implementation = "eager"  # the reference's own softmax, not SDPA like ours
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()
    randomize(model, torch.Generator().manual_seed(seed))
    return model


def tiny_open_clip(act: str, seed: int):
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=32, patch_size=16, width=32, head_width=16, layers=1),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=3),
        quick_gelu=act == "quick_gelu",
    )
    del model.visual  # as ldm's FrozenOpenCLIPEmbedder does; the rest is what SD2 files store
    randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()


# --------------------------------------------------------------------------- 1. HF parity
@pytest.mark.parametrize(
    "with_projection, act, eos",
    [(False, "quick_gelu", 2), (True, "gelu", EOT)],  # SD1's legacy eos_token_id=2 (argmax) / SDXL's
    ids=["CLIPTextModel", "CLIPTextModelWithProjection"],
)
def test_parity_hf(tmp_path, with_projection, act, eos):
    ref = tiny_hf(with_projection, act, eos, seed=0)
    theirs = on_disk(ref.state_dict(), ref)
    theirs["text_model.embeddings.position_ids"] = torch.arange(77.0)[None]  # stored as floats in SD1 files
    theirs = through_file(theirs, FAMILIES["sd1"].text[0].official_prefix, tmp_path / "sd.safetensors")

    config = TextConfig.from_hf_config(ref.config.to_dict(), projection=with_projection)
    assert config == TextConfig(width=32, heads=4, layers=3, mlp_width=48, act=act,
                                projection_dim=24 if with_projection else None)
    ignored: dict[str, str] = {}
    ours = build_ours(config, hf_table(config).to_ours(theirs, source="tiny HF", ignored=ignored))
    assert list(ignored) == ["text_model.embeddings.position_ids"]

    ids = make_ids(torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(input_ids=ids, output_hidden_states=True)
        got = ours(ids)
    assert len(got.hidden_states) == len(expected.hidden_states) == 4
    for i, (a, e) in enumerate(zip(got.hidden_states, expected.hidden_states, strict=True)):
        assert_rel_close(a, e, REL, f"hidden_states[{i}]")
    assert_rel_close(got.last_hidden_state, expected.last_hidden_state, REL, "last_hidden_state")
    pooled = expected.text_embeds if with_projection else expected.pooler_output
    assert_rel_close(got.pooled, pooled, REL, "pooled")


def test_parity_hf_shorter_sequence():
    """Fewer than 77 tokens use the first positions, as HF does."""
    ref = tiny_hf(False, "quick_gelu", EOT, seed=2)
    config = TextConfig.from_hf_config(ref.config.to_dict(), projection=False)
    ours = build_ours(config, hf_table(config).to_ours(on_disk(ref.state_dict(), ref)))
    ids = make_ids(torch.Generator().manual_seed(3), length=12)
    with torch.no_grad():
        expected, got = ref(input_ids=ids), ours(ids)
    assert_rel_close(got.last_hidden_state, expected.last_hidden_state, REL, "last_hidden_state")
    assert_rel_close(got.pooled, expected.pooler_output, REL, "pooled")


# --------------------------------------------------------------------------- 2. open_clip parity
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_parity_open_clip(tmp_path, act):
    ref = tiny_open_clip(act, seed=4)
    theirs = ref.state_dict()
    # open_clip 3.3 registers attn_mask with persistent=False: only logit_scale is extra.
    assert "attn_mask" not in theirs and "logit_scale" in theirs
    theirs = through_file(theirs, FAMILIES["sd2"].text[0].official_prefix, tmp_path / "sd2.safetensors")

    config = TextConfig(width=32, heads=4, layers=3, mlp_width=128, act=act, projection_dim=24)
    ignored: dict[str, str] = {}
    ours = build_ours(config, open_clip_table(config).to_ours(theirs, ignored=ignored))
    assert list(ignored) == ["logit_scale"]

    # The reference's per-block states, read with hooks around its resblocks and ln_final.
    seen: list[torch.Tensor] = []
    blocks = ref.transformer.resblocks
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
    hooks += [b.register_forward_hook(lambda m, args, out: seen.append(out)) for b in blocks]
    hooks += [ref.ln_final.register_forward_hook(lambda m, args, out: seen.append(out))]
    ids = make_ids(torch.Generator().manual_seed(5))
    with torch.no_grad():
        pooled = ref.encode_text(ids, normalize=False)
        got = ours(ids)
    for h in hooks:
        h.remove()
    assert len(seen) == 5 and len(got.hidden_states) == 4
    for i, (a, e) in enumerate(zip(got.hidden_states, seen[:4], strict=True)):
        assert_rel_close(a, e, REL, f"hidden_states[{i}]")
    assert_rel_close(got.last_hidden_state, seen[4], REL, "ln_final output")
    assert_rel_close(got.pooled, pooled, REL, "pooled (encode_text)")


def test_early_stop_and_dtype():
    """num_layers gives the prefix of the full run's states; bf16 weights give bf16 outputs near fp32."""
    ref = tiny_open_clip("gelu", seed=6)
    config = TextConfig(width=32, heads=4, layers=3, mlp_width=128, act="gelu", projection_dim=24)
    ours = build_ours(config, open_clip_table(config).to_ours(ref.state_dict()))
    ids = make_ids(torch.Generator().manual_seed(7))
    with torch.no_grad():
        full, early = ours(ids), ours(ids, num_layers=2)  # SD2 / SDXL "penultimate"
        zero = ours(ids, num_layers=0)
        explicit = ours(ids, torch.tensor([4, 19, 76]))
        half = build_ours(config, {k: v.bfloat16() for k, v in ours.state_dict().items()})(ids)
    assert early.last_hidden_state is None and early.pooled is None and len(early.hidden_states) == 3
    assert len(zero.hidden_states) == 1
    for a, e in zip(early.hidden_states, full.hidden_states[:3], strict=True):
        assert torch.equal(a, e)
    assert torch.equal(explicit.pooled, full.pooled)  # default EOT positions are 4, 19, 76
    # The pooled vector is not the last token's: row 0 pools at position 4.
    assert not torch.allclose(full.pooled[0], full.last_hidden_state[0, -1] @ ours.text_projection)
    assert half.pooled.dtype == torch.bfloat16 and half.last_hidden_state.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few percent after 3 blocks.
    assert_rel_close(half.last_hidden_state.float(), full.last_hidden_state, 5e-2, "bf16 vs fp32")


# --------------------------------------------------------------------------- 3. full size on meta
def _shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _ours_on_meta(config: TextConfig) -> TextTransformer:
    with torch.device("meta"):
        return TextTransformer(config)


def _hf_on_meta(d: dict, with_projection: bool) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(CLIPTextConfig(**d))
    return on_disk(model.state_dict(), model)


# (name, HF config dict, with projection, our config, parameter count of the reference on meta)
HF_CASES = [
    ("SD1 CLIP-L (official and diffusers text_encoder)", SD1_HF, False, CLIP_VIT_L14, 123_060_480),
    ("SD2 diffusers text_encoder, 23 layers", SD2_HF, False,
     dataclasses.replace(OPENCLIP_VIT_H14, layers=23, projection_dim=None), 340_387_840),
    ("OpenCLIP-H as CLIPTextModelWithProjection, 24 layers",
     dict(SD2_HF, num_hidden_layers=24, projection_dim=1024), True, OPENCLIP_VIT_H14, 354_032_640),
    ("SDXL bigG (diffusers text_encoder_2)", SDXL_HF_2, True, OPENCLIP_VIT_BIGG14, 694_659_840),
]


@pytest.mark.parametrize("name, d, with_projection, config, count", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_full_size_hf_layout(name, d, with_projection, config, count):
    theirs = _hf_on_meta(d, with_projection)
    assert TextConfig.from_hf_config(d, projection=with_projection) == config
    ours = _ours_on_meta(config)
    assert _shapes(hf_table(config).to_ours(theirs)) == _shapes(ours.state_dict())
    assert sum(v.numel() for v in theirs.values()) == sum(p.numel() for p in ours.parameters()) == count


OPEN_CLIP_CASES = [
    # OpenAI's CLIP-L in open_clip layout keeps its 768 x 768 text_projection (SD files drop it).
    ("ViT-L-14-quickgelu", dataclasses.replace(CLIP_VIT_L14, projection_dim=768), 123_650_304),
    ("ViT-H-14", OPENCLIP_VIT_H14, 354_032_640),
    ("ViT-bigG-14", OPENCLIP_VIT_BIGG14, 694_659_840),
]


@pytest.mark.parametrize("arch, config, count", OPEN_CLIP_CASES, ids=[c[0] for c in OPEN_CLIP_CASES])
def test_full_size_open_clip_layout(arch, config, count):
    with torch.device("meta"):
        ref = open_clip.create_model(arch, device="meta")
    del ref.visual
    theirs = ref.state_dict()
    # The preset is the open_clip config, activation included.
    text_cfg = open_clip.get_model_config(arch)["text_cfg"]
    assert (config.width, config.heads, config.layers) == (text_cfg["width"], text_cfg["heads"], text_cfg["layers"])
    assert isinstance(ref.transformer.resblocks[0].mlp.gelu, OpenClipQuickGELU) == (config.act == "quick_gelu")

    ignored: dict[str, str] = {}
    mapped = open_clip_table(config).to_ours(theirs, ignored=ignored)
    assert list(ignored) == ["logit_scale"]
    ours = _ours_on_meta(config)
    assert _shapes(mapped) == _shapes(ours.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(v.numel() for v in mapped.values()) == count


def test_presets_agree_with_the_tokenizer():
    """clip.py may not import tokenizer.py, so the embedding rows and the EOT id it pools at are data
    of the config; they must be the tokenizer's vocabulary size and end-of-text id."""
    for config in (CLIP_VIT_L14, OPENCLIP_VIT_H14, OPENCLIP_VIT_BIGG14):
        assert (config.vocab_size, config.eot_token_id) == (VOCAB_SIZE, EOT_TOKEN_ID) == (49408, EOT)


def test_official_prefixes_match_diffusers_detection_keys():
    """diffusers detects each family by one key; it must sit under our prefix, in our layout."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES as names

    for family, slot, key in [
        ("sd1", 0, names["clip"]), ("sdxl", 0, names["clip_sdxl"]), ("sd2", 0, names["open_clip"]),
        ("sdxl", 1, names["open_clip_sdxl"]), ("sdxl-refiner", 0, names["open_clip_sdxl_refiner"]),
    ]:
        spec = FAMILIES[family].text[slot]
        table = (hf_table if spec.layout == "hf" else open_clip_table)(spec.config).prefixed(spec.official_prefix)
        assert key in table.theirs_keys, (family, slot, key)


# --------------------------------------------------------------------------- 4. round trips
def test_round_trip_hf():
    ref = tiny_hf(True, "gelu", EOT, seed=8)
    config = TextConfig.from_hf_config(ref.config.to_dict(), projection=True)
    theirs = on_disk(ref.state_dict(), ref)
    back = hf_table(config).to_theirs(hf_table(config).to_ours(theirs))
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_round_trip_open_clip():
    ref = tiny_open_clip("gelu", seed=9)
    config = TextConfig(width=32, heads=4, layers=3, mlp_width=128, act="gelu", projection_dim=24)
    theirs = {k: v for k, v in ref.state_dict().items() if k != "logit_scale"}  # ignored, not round-tripped
    back = open_clip_table(config).to_theirs(open_clip_table(config).to_ours(dict(theirs, attn_mask=torch.ones(1))))
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


# --------------------------------------------------------------------------- 5. errors
@pytest.fixture(scope="module")
def hf_pair():
    ref = tiny_hf(False, "quick_gelu", EOT, seed=10)
    config = TextConfig.from_hf_config(ref.config.to_dict(), projection=False)
    return config, on_disk(ref.state_dict(), ref)


def test_missing_key(hf_pair):
    config, theirs = hf_pair
    key = "text_model.encoder.layers.1.self_attn.k_proj.weight"
    with pytest.raises(CheckpointError, match=r"1 missing: text_model\.encoder\.layers\.1\.self_attn\.k_proj\.weight"):
        hf_table(config).to_ours({k: v for k, v in theirs.items() if k != key})


def test_unexpected_key(hf_pair):
    config, theirs = hf_pair
    # A 4th block: the file holds a deeper model than the config says.
    with pytest.raises(CheckpointError, match=r"unexpected: text_model\.encoder\.layers\.3\.mlp\.fc1\.bias"):
        hf_table(config).to_ours(dict(theirs, **{"text_model.encoder.layers.3.mlp.fc1.bias": torch.zeros(48)}))
    # text_projection without a projection in the config
    with pytest.raises(CheckpointError, match=r"unexpected: text_projection\.weight"):
        hf_table(config).to_ours(dict(theirs, **{"text_projection.weight": torch.zeros(24, 32)}))


def test_wrong_shape(hf_pair):
    config, theirs = hf_pair
    key = "text_model.embeddings.position_embedding.weight"
    mapped = hf_table(config).to_ours(dict(theirs, **{key: theirs[key][:64]}))  # a truncated position table
    expected = r"wrong shape: positional_embedding \(expected \(77, 32\), got \(64, 32\)\)"
    with pytest.raises(CheckpointError, match=expected):
        build_ours(config, mapped)


def test_bad_input_ids(hf_pair):
    config, theirs = hf_pair
    model = build_ours(config, hf_table(config).to_ours(theirs))
    ids = make_ids(torch.Generator().manual_seed(11))
    with pytest.raises(ValueError, match=r"integer \(batch, tokens\), got torch.int64 \(77,\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"integer \(batch, tokens\), got torch.float32"):
        model(ids.float())
    with pytest.raises(ValueError, match="78 tokens, more than context_length 77"):
        model(torch.cat([ids, ids[:, -1:]], dim=1))
    with pytest.raises(ValueError, match=r"\[0, 49408\), got values in \[0, 49408\]"):
        model(torch.where(ids == SOT, 49408, ids))
    with pytest.raises(ValueError, match=r"\[0, 49408\), got values in \[-1, 49407\]"):
        model(torch.where(ids == SOT, -1, ids))
    with pytest.raises(ValueError, match="needs an EOT token"):
        model(torch.where(ids == EOT, 0, ids))
    with pytest.raises(ValueError, match=r"eot_index must lie in \[0, 77\)"):
        model(ids, torch.tensor([4, 19, 77]))
    with pytest.raises(ValueError, match=r"eot_index must be integer \(3,\)"):
        model(ids, torch.tensor([4, 19]))
    with pytest.raises(ValueError, match=r"num_layers must be in \[0, 3\], got 4"):
        model(ids, num_layers=4)


def test_bad_configs():
    with pytest.raises(ValueError, match="act must be 'quick_gelu' or 'gelu', got 'relu'"):
        TextConfig.from_hf_config(dict(SD1_HF, hidden_act="relu"), projection=False)
    with pytest.raises(ValueError, match=r"lacks \['projection_dim'\]"):
        TextConfig.from_hf_config({k: v for k, v in SDXL_HF_2.items() if k != "projection_dim"}, projection=True)
    with pytest.raises(ValueError, match="width 100 does not split into 12 heads"):
        dataclasses.replace(CLIP_VIT_L14, width=100)
