"""Textual-inversion embeddings (minisd.embeddings, `StableDiffusion.load_embedding`) against diffusers'
`load_textual_inversion`, on tiny text encoders.

Every file is written here in its exact layout, with random vectors: A1111 `.pt` (`string_to_param`, plus
the bookkeeping entries A1111 saves), A1111 `.safetensors` (`emb_params`), diffusers `learned_embeds`
(`{token: vectors}`, `.bin` and `.safetensors`, 1-D and 2-D) and SDXL (`clip_l`, `clip_g`). The reference is a
diffusers pipeline built from the same transformers encoders (tests/test_pipeline.py's tiny models), given
the same file; both sides encode the same prompt.

Tolerance: contexts agree to 1e-5 of their largest value, as in tests/test_conditioning.py: the same
ops in another summation order (fused q/k/v, SDPA); a vector at a wrong position, a missing one or the
wrong encoder's set changes them by order 1 (each test also checks that the embedding changed the output).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from minisd.conditioning import a1111_clip_skip, encode_prompt
from minisd.families import FAMILIES
from minisd.model import StableDiffusion
from minisd.tokenizer import CLIPTokenizer
from tests.test_pipeline import hf_tokenizer, make_scheduler, tiny_text
from tests.utils import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")

REL = 1e-5
TOKEN = "<cat-toy>"
PROMPT = f"a photo of {TOKEN}, on a table"


# ---------------------------------------------------------------------- files in each layout
def a1111_pt(path, v):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "stored-name", "step": 3000,
                "sd_checkpoint": "e1441589", "sd_checkpoint_name": "v1-5-pruned"}, path)  # fmt: skip


def a1111_safetensors(path, v):
    save_file({"emb_params": v}, path)


def diffusers_bin(path, v):
    torch.save({TOKEN: v[0] if v.shape[0] == 1 else v}, path)  # single vectors saved 1-D, as older scripts did


def diffusers_safetensors(path, v):
    save_file({TOKEN: v}, path)


WRITERS = {"x.pt": a1111_pt, "x.safetensors": a1111_safetensors, "learned_embeds.bin": diffusers_bin,
           "learned_embeds.safetensors": diffusers_safetensors}  # fmt: skip


# ---------------------------------------------------------------------- tiny models, both sides
@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tokenizer")
    tok_l, tok_g = hf_tokenizer(d, "<|endoftext|>"), hf_tokenizer(d, "!")
    l_t, l_o = tiny_text(32, "quick_gelu", 2, seed=1)
    g_t, g_o = tiny_text(48, "gelu", 49407, seed=2, projection=True)  # another width: a mix-up cannot pass
    return dict(tok_l=tok_l, tok_g=tok_g, l=(l_t, l_o), g=(g_t, g_o))


def ours(family: str, encoders) -> StableDiffusion:
    uses = [t.use(e.config.layers) for t, e in zip(FAMILIES[family].text, encoders)]
    return StableDiffusion(family=FAMILIES[family], unet=None, vae=None, text_encoders=list(encoders),
                           text_uses=uses, tokenizer=CLIPTokenizer())  # fmt: skip


def sd1_pair(parts):
    """(minisd model, diffusers pipeline) with the CLIP-L-like encoder; the reference encoder is a copy,
    since `load_textual_inversion` grows its embedding matrix in place."""
    l_t, l_o = parts["l"]
    pipe = StableDiffusionPipeline(vae=None, text_encoder=copy.deepcopy(l_t), tokenizer=copy.deepcopy(parts["tok_l"]),
                                   unet=None, scheduler=make_scheduler("euler", "epsilon"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    return ours("sd1", [l_o]), pipe


def sdxl_pair(parts):
    (l_t, l_o), (g_t, g_o) = parts["l"], parts["g"]
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=copy.deepcopy(l_t), text_encoder_2=copy.deepcopy(g_t),
                                     tokenizer=copy.deepcopy(parts["tok_l"]), tokenizer_2=copy.deepcopy(parts["tok_g"]),
                                     unet=None, scheduler=make_scheduler("euler", "epsilon"),
                                     add_watermarker=False)  # fmt: skip
    return ours("sdxl", [l_o, g_o]), pipe


def their_context(pipe, prompt):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("n", [1, 3])
@torch.no_grad()
def test_sd1_matches_diffusers(parts, tmp_path, name, n):
    sd, pipe = sd1_pair(parts)
    vectors = torch.randn(n, 32, generator=torch.Generator().manual_seed(n))
    path = tmp_path / name
    WRITERS[name](path, vectors)
    before = sd.encode_prompt(PROMPT).context
    assert sd.load_embedding(path, token=TOKEN) == TOKEN
    pipe.load_textual_inversion(str(path), token=TOKEN)
    context = sd.encode_prompt(PROMPT).context
    assert_rel_close(context, their_context(pipe, PROMPT), REL, f"{name}, {n} vectors")
    assert (context - before).abs().max() > 1e-2  # the vectors were used
    # The same in the other prompt languages (no weights: the same single chunk).
    assert torch.equal(sd.encode_prompt(PROMPT, prompt_syntax="a1111").context, context)


@torch.no_grad()
def test_sdxl_matches_diffusers(parts, tmp_path):
    sd, pipe = sdxl_pair(parts)
    g = torch.Generator().manual_seed(0)
    clip_l, clip_g = torch.randn(2, 32, generator=g), torch.randn(2, 48, generator=g)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "style.safetensors")
    before = sd.encode_prompt(PROMPT)
    assert sd.load_embedding(tmp_path / "style.safetensors", token=TOKEN) == TOKEN
    # diffusers' documented recipe for SDXL: each set into its own encoder and tokenizer.
    pipe.load_textual_inversion(clip_l, token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    cond = sd.encode_prompt(PROMPT)
    theirs = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert_rel_close(cond.context, theirs[0], REL, "SDXL context")
    assert_rel_close(cond.pooled, theirs[2], REL, "SDXL pooled")
    for half in (slice(0, 32), slice(32, 80)):  # both encoders got their vectors
        assert (cond.context[..., half] - before.context[..., half]).abs().max() > 1e-2


@torch.no_grad()
def test_refiner_takes_clip_g(parts, tmp_path):
    _, g_o = parts["g"]
    sd = ours("sdxl-refiner", [g_o])
    clip_g = torch.randn(1, 48, generator=torch.Generator().manual_seed(1))
    save_file({"clip_l": torch.randn(1, 32), "clip_g": clip_g}, tmp_path / "e.safetensors")
    sd.load_embedding(tmp_path / "e.safetensors", token=TOKEN)
    # Reference: the bigG half of the SDXL pipeline's context, clip_g loaded into its second encoder.
    _, pipe = sdxl_pair(parts)
    pipe.load_textual_inversion(clip_g, token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    theirs = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert_rel_close(sd.encode_prompt(PROMPT).context, theirs[0][..., 32:], REL, "refiner context")


@torch.no_grad()
def test_weighted_span_and_chunks_with_a_multi_vector_embedding(parts, tmp_path):
    sd, _ = sd1_pair(parts)
    a1111_safetensors(tmp_path / "my-trio.safetensors", torch.randn(3, 32, generator=torch.Generator().manual_seed(3)))
    token = sd.load_embedding(tmp_path / "my-trio.safetensors")
    assert token == "my-trio"  # the file's stem
    # A weighted span: A1111's rule by hand on the unweighted context, the 3 vectors at positions 4..6.
    z = sd.encode_prompt("a photo of my-trio on a table").context.double()
    w = torch.ones(1, 77, 1, dtype=torch.float64)
    w[0, 4:7] = 1.3
    expected = z * w * (z.mean() / (z * w).mean())
    got = sd.encode_prompt("a photo of (my-trio:1.3) on a table", prompt_syntax="a1111").context
    assert_rel_close(got, expected, 1e-6, "weighted embedding")  # fp32 products and means of 77 x 32 values
    # 73 words + 3 vectors > 75: the embedding moves whole to the next chunk; each chunk as encoded alone.
    long = sd.encode_prompt("cat " * 73 + "My-Trio", prompt_syntax="a1111").context  # tokens match in any case
    assert long.shape == (1, 154, 32)
    assert torch.equal(long[:, :77], sd.encode_prompt("cat " * 73).context)
    assert torch.equal(long[:, 77:], sd.encode_prompt("my-trio").context)


# ---------------------------------------------------------------------- errors
@pytest.mark.reliability("textual inversion", "an SDXL embedding loaded into an SD1 model",
                         "ValueError: 'an SDXL embedding' with both widths")  # fmt: skip
def test_family_mismatch_is_named(parts, tmp_path):
    sd, _ = sd1_pair(parts)
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, tmp_path / "sdxl-style.safetensors")
    with pytest.raises(ValueError, match=r"an SDXL embedding \(clip_l 1 x 768 \+ clip_g 1 x 1280\) on this 'sd1' "
                                         r"model \(text encoder width 32\)"):  # fmt: skip
        sd.load_embedding(tmp_path / "sdxl-style.safetensors")
    xl, _ = sdxl_pair(parts)
    a1111_safetensors(tmp_path / "one-vec.safetensors", torch.randn(2, 768))
    with pytest.raises(
        ValueError,
        match=r"one text encoder \(2 vectors of width 768; SD1 \(CLIP ViT-L/14\)\) on "
        r"this 'sdxl' model \(text encoder widths 32, 48\), which needs SDXL's",
    ):
        xl.load_embedding(tmp_path / "one-vec.safetensors")


@pytest.mark.reliability("textual inversion", "an embedding of another width than the text encoder",
                         "ValueError naming both widths and the family the file was made for")  # fmt: skip
def test_width_mismatch_names_both_widths(parts, tmp_path):
    sd, _ = sd1_pair(parts)
    a1111_pt(tmp_path / "sd2-emb.pt", torch.randn(1, 1024))
    with pytest.raises(ValueError, match=r"the vectors are 1024 wide \(made for SD2 \(OpenCLIP ViT-H/14\)\) but "
                                         r"this 'sd1' model \(text encoder width 32\) needs 32"):  # fmt: skip
        sd.load_embedding(tmp_path / "sd2-emb.pt")
    xl, _ = sdxl_pair(parts)
    save_file({"clip_l": torch.randn(1, 48), "clip_g": torch.randn(1, 32)}, tmp_path / "swapped-pair.safetensors")
    with pytest.raises(ValueError, match=r"clip_l vectors are 48 wide but this 'sdxl' model .* needs 32"):
        xl.load_embedding(tmp_path / "swapped-pair.safetensors")
    assert len(sd.embeddings) == len(xl.embeddings) == 0  # nothing half-loaded


@pytest.mark.reliability("textual inversion", "an embedding token that is a word of the vocabulary",
                         "ValueError: it would replace that word; pass token=")  # fmt: skip
def test_bad_tokens(parts, tmp_path):
    sd, _ = sd1_pair(parts)
    a1111_safetensors(tmp_path / "cat.safetensors", torch.randn(1, 32))
    with pytest.raises(ValueError, match=r"embedding token 'cat' is a word of CLIP's vocabulary"):
        sd.load_embedding(tmp_path / "cat.safetensors")
    with pytest.raises(ValueError, match=r"must not contain any of \( \) \[ \] :"):
        sd.load_embedding(tmp_path / "cat.safetensors", token="(x)")
    with pytest.raises(ValueError, match="expected a non-empty str"):
        sd.load_embedding(tmp_path / "cat.safetensors", token=" ")
    sd.load_embedding(tmp_path / "cat.safetensors", token="<Kitty>")
    with pytest.raises(ValueError, match="differs only in case from the loaded '<Kitty>'"):
        sd.load_embedding(tmp_path / "cat.safetensors", token="<kitty>")
    sd.unload_embedding("<Kitty>")
    with pytest.raises(ValueError, match="no embedding is loaded for token '<Kitty>'"):
        sd.unload_embedding("<Kitty>")


@pytest.mark.reliability("textual inversion", "a file that is not an embedding (a LoRA, a pickle of a list)",
                         "ValueError saying what the file looks like")  # fmt: skip
def test_files_that_are_not_embeddings(parts, tmp_path):
    sd, _ = sd1_pair(parts)
    save_file(
        {
            "lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
        },
        tmp_path / "l.safetensors",
    )
    with pytest.raises(ValueError, match=r"not a textual-inversion embedding .* it looks like a LoRA"):
        sd.load_embedding(tmp_path / "l.safetensors")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="it holds a list, not a dict"):
        sd.load_embedding(tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match=r"text.pt: cannot read it as an embedding with torch.load\(weights_only"):
        sd.load_embedding(tmp_path / "text.pt")
    with pytest.raises(ValueError, match="missing.pt: no such file"):
        sd.load_embedding(tmp_path / "missing.pt")
    save_file({"emb_params": torch.full((1, 32), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="NaN or infinite"):
        sd.load_embedding(tmp_path / "nan.safetensors")
    save_file({"emb_params": torch.zeros(76, 32)}, tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match="76 vectors, more than the 75 positions"):
        sd.load_embedding(tmp_path / "big.safetensors")


def test_a1111_clip_skip():
    assert [a1111_clip_skip(n) for n in (1, 2, 3)] == [0, 1, 2]  # A1111's 2 = the penultimate layer
    with pytest.raises(ValueError, match="expected an int >= 1"):
        a1111_clip_skip(0)


def test_encode_prompt_without_a_model_takes_embeddings(parts):
    # encode_prompt's `embeddings` is the table a model keeps; an empty one changes nothing.
    from minisd.embeddings import Embeddings

    _, l_o = parts["l"]
    a = encode_prompt(PROMPT, FAMILIES["sd1"], [l_o], embeddings=Embeddings())
    b = encode_prompt(PROMPT, FAMILIES["sd1"], [l_o])
    assert torch.equal(a.context, b.context)
