"""Family conditioning (context, pooled, y) against references assembled from the reference libraries.

For each family the reference is written the way the official embedder computes it, on top of
transformers' `CLIPTextModel(WithProjection)` and open_clip's text tower, with token ids from open_clip's
own tokenizer (so this file checks our tokenizer, encoders and assembly together):

- SD1 (`FrozenCLIPEmbedder`, layer "last"): `CLIPTextModel(ids).last_hidden_state`, ids padded with 49407.
- SD2 (`FrozenOpenCLIPEmbedder`, "penultimate"): open_clip blocks 0..L-2, then `ln_final`; ids padded with 0.
- SDXL base: `CLIPTextModel(..., output_hidden_states=True).hidden_states[-2]` (diffusers' SDXL pipeline)
  concatenated with bigG's penultimate block output; pooled = `encode_text(normalize=False)`.
- SDXL `y`: pooled concatenated with diffusers' `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`
  of `add_time_ids`, exactly as `UNet2DConditionModel.get_aug_embed` does for "text_time".

Tolerance: 1e-5 relative in fp32 (tests.utils.assert_rel_close): the same ops in a different summation
order (fused q/k/v, SDPA vs eager softmax) move results by fp32 ulps; a wrong layer, a missing or extra
LayerNorm, or a wrong pad token changes them by order 1.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
from diffusers.models.embeddings import Timesteps
from transformers import CLIPTokenizer as HFCLIPTokenizer

from minisd.clip import TextConfig
from minisd.conditioning import encode_prompt, refiner_vector, sdxl_vector
from minisd.families import FAMILIES, TextEncoderUse, family_spec
from minisd.layouts import hf_table, open_clip_table
from minisd.tokenizer import MAX_TEXT_CHARS, CLIPTokenizer
from tests.test_clip import build_ours, on_disk, tiny_hf, tiny_open_clip
from tests.test_tokenizer import write_hf_vocab
from tests.utils import assert_rel_close

REL = 1e-5
PROMPTS = [
    "a photograph of an astronaut riding a horse", "",
    "Ünïcode &amp; emoji 🐱 " * 12 + "far beyond 77 tokens " * 10,
]

# The tiny models of tests/test_clip.py: width 32, 4 heads, 3 blocks, MLP 48.
TINY_L = TextConfig(width=32, heads=4, layers=3, mlp_width=48, act="quick_gelu", projection_dim=None)
TINY_G = TextConfig(width=32, heads=4, layers=3, mlp_width=128, act="gelu", projection_dim=24)


def ref_ids(prompts: list[str], pad: int) -> torch.Tensor:
    """open_clip's tokenizer (pads with 0); SD1/HF CLIP-L pads with the end token instead."""
    ids = open_clip.tokenize(prompts)
    if pad != 0:
        after_eot = torch.cumsum(ids == 49407, dim=1) > 0
        ids = torch.where(after_eot & (ids == 0), torch.full_like(ids, pad), ids)
    return ids


@pytest.fixture(scope="module")
def clip_l():
    ref = tiny_hf(with_projection=False, act="quick_gelu", eos_token_id=2, seed=1)
    ours = build_ours(TINY_L, hf_table(TINY_L).to_ours(on_disk(ref.state_dict(), ref)))
    return ref, ours


@pytest.fixture(scope="module")
def open_g():
    ref = tiny_open_clip("gelu", seed=2)
    ours = build_ours(TINY_G, open_clip_table(TINY_G).to_ours(ref.state_dict()))
    return ref, ours


def open_clip_blocks(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """open_clip's text tower run for its first `n` blocks (ldm's `encode_with_transformer`)."""
    x = model.token_embedding(ids) + model.positional_embedding
    mask = model.attn_mask
    for block in model.transformer.resblocks[:n]:
        x = block(x, attn_mask=mask)
    return x


@torch.no_grad()
def test_sd1_context(clip_l):
    ref, ours = clip_l
    expected = ref(ref_ids(PROMPTS, 49407)).last_hidden_state
    cond = encode_prompt(PROMPTS, family_spec("sd1"), [ours], CLIPTokenizer())
    assert cond.pooled is None
    assert_rel_close(cond.context, expected, REL, "SD1 context")


@torch.no_grad()
def test_sd1_clip_skip_matches_diffusers_convention(clip_l):
    # diffusers' StableDiffusionPipeline: hidden_states[-(clip_skip + 1)], then final_layer_norm.
    ref, ours = clip_l
    out = ref(ref_ids(PROMPTS, 49407), output_hidden_states=True)
    final_ln = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
    expected = final_ln(out.hidden_states[-2])
    cond = encode_prompt(PROMPTS, family_spec("sd1"), [ours], clip_skip=1)
    assert_rel_close(cond.context, expected, REL, "SD1 clip_skip=1")
    assert (cond.context - out.last_hidden_state).abs().max() > 1e-2  # it did read another layer


@torch.no_grad()
def test_sd2_context(open_g):
    ref, ours = open_g
    ids = ref_ids(PROMPTS, 0)
    expected = ref.ln_final(open_clip_blocks(ref, ids, TINY_G.layers - 1))
    cond = encode_prompt(PROMPTS, family_spec("sd2"), [ours])
    assert_rel_close(cond.context, expected, REL, "SD2 context")
    # v-prediction and inpainting variants condition exactly like SD2
    for family in ("sd2-v", "sd2-inpaint"):
        assert torch.equal(encode_prompt(PROMPTS, family_spec(family), [ours]).context, cond.context)


@torch.no_grad()
def test_sdxl_context_and_pooled(clip_l, open_g):
    (ref_l, ours_l), (ref_g, ours_g) = clip_l, open_g
    hidden_l = ref_l(ref_ids(PROMPTS, 49407), output_hidden_states=True).hidden_states[-2]
    ids_g = ref_ids(PROMPTS, 0)
    hidden_g = open_clip_blocks(ref_g, ids_g, TINY_G.layers - 1)
    pooled = ref_g.encode_text(ids_g, normalize=False)
    cond = encode_prompt(PROMPTS, family_spec("sdxl"), [ours_l, ours_g])
    assert cond.context.shape == (3, 77, 32 + 32)
    assert_rel_close(cond.context, torch.cat([hidden_l, hidden_g], dim=-1), REL, "SDXL context")
    assert_rel_close(cond.pooled, pooled, REL, "SDXL pooled")

    refiner = encode_prompt(PROMPTS, family_spec("sdxl-refiner"), [ours_g])
    assert_rel_close(refiner.context, hidden_g, REL, "refiner context")
    assert_rel_close(refiner.pooled, pooled, REL, "refiner pooled")


@torch.no_grad()
def test_zero_empty_prompt(clip_l, open_g):
    cond = encode_prompt(["a cat", ""], family_spec("sdxl"), [clip_l[1], open_g[1]], zero_empty=True)
    assert cond.context[1].abs().max() == 0 and cond.pooled[1].abs().max() == 0
    assert cond.context[0].abs().max() > 0 and cond.pooled[0].abs().max() > 0
    plain = encode_prompt(["a cat", ""], family_spec("sdxl"), [clip_l[1], open_g[1]])
    assert plain.context[1].abs().max() > 0  # without the option, "" is encoded


# Special-token literals typed in prompts: "<|endoftext|>" is the end token to transformers' CLIPTokenizer
# (CLIP-L) and text to open_clip (OpenCLIP); "<end_of_text>" the other way round. Row 0 pools, in
# open_clip, at the "<end_of_text>" typed in it (argmax: the first end token).
LITERAL_PROMPTS = ["a photo <end_of_text> of <|endoftext|> a cat", "<|startoftext|>a castle", "a dog"]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer as SD1's diffusers repo configures it (pads with eot)."""
    path = write_hf_vocab(tmp_path_factory.mktemp("hf_tokenizer"))
    return HFCLIPTokenizer.from_pretrained(path, pad_token="<|endoftext|>")


@pytest.mark.reliability(
    "prompts (tokenizer)",
    "the same prompt with special-token literals sent to SD1, SD2 and SDXL",
    "CLIP-L gets transformers' ids and OpenCLIP open_clip's; contexts and pooled vector match those references",
)
@torch.no_grad()
def test_special_literals_follow_each_encoders_tokenizer(clip_l, open_g, hf_tokenizer):
    (ref_l, ours_l), (ref_g, ours_g) = clip_l, open_g
    hf_ids = hf_tokenizer(LITERAL_PROMPTS, padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids  # fmt: skip
    oc_ids = open_clip.tokenize(LITERAL_PROMPTS)
    # The references really disagree on the literals (and agree without them).
    assert hf_ids[0, :4].tolist() == [49406, 320, 1125, 283] and hf_ids[0, 10:12].tolist() == [539, 49407]
    assert oc_ids[0, :4].tolist() == [49406, 320, 1125, 49407] and oc_ids[0, 4:6].tolist() == [539, 27]
    assert hf_ids[1, 1].item() == 49406 and oc_ids[1, 1].item() == 27
    assert torch.equal(hf_ids[2, :4], oc_ids[2, :4])  # "a dog": equal up to the padding

    # SD1: CLIP-L reads transformers' ids; SD2: OpenCLIP-H reads open_clip's.
    sd1 = encode_prompt(LITERAL_PROMPTS, family_spec("sd1"), [ours_l])
    assert_rel_close(sd1.context, ref_l(hf_ids).last_hidden_state, REL, "SD1 context, literals")
    sd2 = encode_prompt(LITERAL_PROMPTS, family_spec("sd2"), [ours_g])
    expected_sd2 = ref_g.ln_final(open_clip_blocks(ref_g, oc_ids, TINY_G.layers - 1))
    assert_rel_close(sd2.context, expected_sd2, REL, "SD2 context, literals")
    # The other encoder's ids would give another context: the test sees which rules were used.
    wrong = ref_l(ref_ids(LITERAL_PROMPTS, 49407)).last_hidden_state
    assert (sd1.context[:2] - wrong[:2]).abs().amax(dim=(1, 2)).min() > 1e-2

    # SDXL: each half by its own encoder's rules; the pooled vector at open_clip's first end token.
    sdxl = encode_prompt(LITERAL_PROMPTS, family_spec("sdxl"), [ours_l, ours_g])
    hidden_l = ref_l(hf_ids, output_hidden_states=True).hidden_states[-2]
    hidden_g = open_clip_blocks(ref_g, oc_ids, TINY_G.layers - 1)
    assert_rel_close(sdxl.context, torch.cat([hidden_l, hidden_g], dim=-1), REL, "SDXL context, literals")
    assert_rel_close(sdxl.pooled, ref_g.encode_text(oc_ids, normalize=False), REL, "SDXL pooled, literals")


def test_family_records_name_each_encoders_tokenizer():
    rules = {name: [t.tokenizer for t in f.text] for name, f in FAMILIES.items()}
    assert rules == {
        "sd1": ["hf"], "sd1-inpaint": ["hf"], "sd2": ["open_clip"], "sd2-v": ["open_clip"],
        "sd2-inpaint": ["open_clip"], "sdxl": ["hf", "open_clip"], "sdxl-refiner": ["open_clip"],
        "sdxl-inpaint": ["hf", "open_clip"],
    }  # fmt: skip
    assert [t.use().tokenizer for t in FAMILIES["sdxl"].text] == ["hf", "open_clip"]


def diffusers_aug(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """`UNet2DConditionModel.get_aug_embed` for addition_embed_type="text_time", before `add_embedding`."""
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    time_embeds = proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
    return torch.cat([pooled, time_embeds], dim=-1)


def test_sdxl_vector_matches_diffusers():
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0))
    # diffusers' `_get_add_time_ids`: original_size + crops_coords_top_left + target_size, (h, w) order
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 64.0, 1024.0, 1024.0]] * 2)
    y = sdxl_vector(pooled, (1024, 768), (0, 64), (1024, 1024))
    assert y.shape == (2, 2816)
    assert_rel_close(y, diffusers_aug(pooled, time_ids), 1e-6, "SDXL y")


def test_refiner_vector_matches_diffusers():
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(1))
    # diffusers' refiner (`requires_aesthetics_score=True`): original_size + crops + (aesthetic_score,)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0], [1024.0, 1024.0, 0.0, 0.0, 2.5]])
    y = refiner_vector(pooled, (1024, 1024), (0, 0), torch.tensor([6.0, 2.5]))
    assert y.shape == (2, 2560)
    assert_rel_close(y, diffusers_aug(pooled, time_ids), 1e-6, "refiner y")


def test_vector_formula_is_cos_then_sin():
    # The official formula by hand for one number: [cos(v f_i), sin(v f_i)], f_i = 10000^(-i/128).
    v = 512.0
    f = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    y = sdxl_vector(torch.zeros(1, 4), (v, 0), (0, 0), (0, 0))
    assert torch.allclose(y[0, 4 : 4 + 256], torch.cat([torch.cos(v * f), torch.sin(v * f)]), atol=1e-5)


def test_bad_inputs(clip_l):
    with pytest.raises(ValueError, match="unknown family 'sd3'"):
        encode_prompt("x", family_spec("sd3"), [clip_l[1]])
    with pytest.raises(ValueError, match="needs 2 text encoder"):
        encode_prompt("x", family_spec("sdxl"), [clip_l[1]])
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompt("x", family_spec("sd1"), [clip_l[1]], clip_skip=7)
    with pytest.raises(ValueError, match="original_size"):
        sdxl_vector(torch.zeros(1, 1280), (1024,), (0, 0), (1024, 1024))
    # A prompt beyond the tokenizer's bound, named by its index; refused before any encoder runs.
    long = "a" * (MAX_TEXT_CHARS + 1)
    with pytest.raises(ValueError, match=rf"texts\[1\] must have at most {MAX_TEXT_CHARS} characters"):
        encode_prompt(["a cat", long], family_spec("sd1"), [clip_l[1]])
    # Special-token rules that no tokenizer has.
    use = TextEncoderUse(layer=3, final_ln=True, pad_token_id=49407, tokenizer="openai")
    with pytest.raises(ValueError, match=r"special_tokens must be one of \['hf', 'open_clip'\], got 'openai'"):
        encode_prompt("a cat", family_spec("sd1"), [clip_l[1]], uses=[use])
