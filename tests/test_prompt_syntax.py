"""The prompt languages (minisd.prompt_syntax) and the 75-token chunks (minisd.prompt_chunks), pure Python.

The expected spans are A1111's own: the doctest examples of `parse_prompt_attention` in
modules/prompt_parser.py and the examples of its wiki page "Features" (Attention/emphasis), plus cases
worked by hand from the rules (each a product of 1.1 and 1/1.1 factors, computed here in the same order).
The chunk rules are A1111's `tokenize_line` (modules/sd_hijack_clip.py), checked on id lists worked by hand.

Then `encode_prompt` with tiny encoders: weights of 1 give today's context bit for bit; a long prompt's
chunks are exactly the separate encodings of its pieces; the A1111 and ComfyUI weight rules match the
equations of docs/prompts.md computed here in float64 (tolerance 1e-6 of the largest value: a few fp32
roundings per element, and fp32 means over 77 x 32 values).
"""

from __future__ import annotations

import pytest
import torch

from minisd.clip import TextConfig
from minisd.conditioning import MicroConditioning, encode_prompt
from minisd.families import FAMILIES, family_spec
from minisd.layouts import hf_table, open_clip_table
from minisd.model import StableDiffusion
from minisd.pipeline import Prompt, encode
from minisd.prompt_chunks import CHUNK_LENGTH, PLACEHOLDER_ID, chunked, truncated
from minisd.prompt_syntax import BREAK, parse_attention, parse_prompt
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNetModel
from tests.test_clip import build_ours, on_disk, tiny_hf, tiny_open_clip
from tests.test_unet import randomize
from tests.tiny import TINY_UNETS
from tests.utils import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")

UP, DOWN = 1.1, 1 / 1.1

# A1111's doctests (prompt_parser.py), verbatim inputs and outputs.
A1111_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]  # fmt: skip

# The wiki's examples ("a (word)" ... "a \\(word\\)"): the factor each gives "word".
WIKI = [
    ("a (word)", UP), ("a ((word))", UP * UP), ("a [word]", DOWN), ("a (word:1.5)", 1.5),
    ("a (word:0.25)", 0.25),
]  # fmt: skip


@pytest.mark.parametrize("text, expected", A1111_DOCTESTS)
def test_a1111_doctests(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text, factor", WIKI)
def test_a1111_wiki_examples(text, factor):
    assert parse_attention(text) == [("a ", 1.0), ("word", factor)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a \\(word\\)", [("a (word)", 1.0)]),  # the wiki's literal parentheses
        ("", [("", 1.0)]),
        ("[[a]]", [("a", DOWN * DOWN)]),
        ("([a])", [("a", DOWN * UP)]),  # inner bracket first, then the outer
        ("((a:2) b)", [("a", 2 * UP), (" b", UP)]),
        ("(a:-0.5)", [("a", -0.5)]),
        ("(a:+2)", [("a", 2.0)]),
        ("(a:2.)", [("a", 2.0)]),
        # unbalanced: a closer with nothing open is text; openers left open apply to the end
        ("a) b] c", [("a) b] c", 1.0)]),
        ("[a (b", [("a ", DOWN), ("b", UP * DOWN)]),
        ("a:1.5) b", [("a:1.5) b", 1.0)]),  # ":w)" without an open bracket is text
        ("(a:b)", [("a:b", UP)]),  # a colon followed by no number is text
        ("(a :1.2)", [("a ", 1.2)]),
        ("\\\\ x", [("\\ x", 1.0)]),  # an escaped backslash
        ("(a\\)b)", [("a)b", UP)]),
        ("[a:b:0.5]", [("a:b:0.5", DOWN)]),  # prompt editing is not part of the language: text
    ],
)
def test_hand_worked_cases(text, expected):
    assert parse_attention(text) == expected


def test_break():
    assert parse_attention("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    assert parse_attention("a cat\nBREAK\n(dog)") == [("a cat", 1.0), BREAK, ("", 1.0), ("dog", UP)]
    # BREAK must be a whole upper-case word
    assert parse_attention("BREAKFAST break") == [("BREAKFAST break", 1.0)]
    # inside brackets it still breaks (A1111 would weight its marker and encode the word "BREAK")
    assert parse_attention("(a BREAK b)") == [("a", UP), BREAK, ("b", UP)]
    assert parse_attention("BREAK x") == [("", 1.0), BREAK, ("x", 1.0)]


def test_plain_is_text():
    assert parse_prompt("a (cat:1.5) BREAK [dog]", "plain") == [("a (cat:1.5) BREAK [dog]", 1.0)]
    assert parse_prompt("a (cat)", "comfy") == parse_prompt("a (cat)", "a1111") == [("a ", 1.0), ("cat", UP)]
    with pytest.raises(ValueError, match=r"prompt_syntax: expected one of \('plain', 'a1111', 'comfy'\), got 'x'"):
        parse_prompt("a", "x")


# ---------------------------------------------------------------------- chunks
COMMA = 267  # ",</w>" in CLIP's vocabulary; any id serves here


def lengths(chunks):
    return [len(c.ids) for c in chunks]


def test_chunks_of_75_and_comma_backtrack():
    assert lengths(chunked([([5] * 80, 1.0)], COMMA)) == [75, 5]
    assert lengths(chunked([([5] * 150, 1.0)], COMMA)) == [75, 75]  # no empty third chunk
    assert lengths(chunked([([], 1.0)], COMMA)) == [0]  # the empty prompt: one chunk
    # A comma 5 ids before the end of a full chunk: the ids after it move to the next chunk.
    ids = [5] * 70 + [COMMA] + [6] * 10
    first, second = chunked([(ids, 1.0)], COMMA)
    assert first.ids == [5] * 70 + [COMMA] and second.ids == [6] * 10
    # 25 ids after the comma (> 20): no backtrack.
    ids = [5] * 50 + [COMMA] + [6] * 30
    assert lengths(chunked([(ids, 1.0)], COMMA)) == [75, 6]
    # Exactly 20 ids after the comma: still moved (A1111's `<=`).
    ids = [5] * 55 + [COMMA] + [6] * 25
    assert lengths(chunked([(ids, 1.0)], COMMA)) == [56, 25]
    # A comma that is itself the 76th id opens the next chunk (no backtrack at a comma).
    ids = [5] * 75 + [COMMA] + [6]
    assert [c.ids for c in chunked([(ids, 1.0)], COMMA)] == [[5] * 75, [COMMA, 6]]


def test_weights_follow_ids_across_chunks_and_breaks():
    parts = [([5] * 74, 1.0), ([6, 7], 1.5), BREAK, ([8], 0.5), BREAK, BREAK, ([9], 1.0)]
    chunks = chunked(parts, COMMA)
    assert [c.ids for c in chunks] == [[5] * 74 + [6], [7], [8], [], [9]]
    assert [c.weights for c in chunks] == [[1.0] * 74 + [1.5], [1.5], [0.5], [], [1.0]]
    assert lengths(chunked([BREAK, ([5], 1.0)], COMMA)) == [0, 1]  # a leading BREAK gives an empty chunk


def test_embeddings_take_their_positions_and_are_never_split():
    vec = torch.zeros(3, 4)
    parts = [([5] * 73 + [vec] + [6], 1.2)]
    first, second = chunked(parts, COMMA)
    assert first.ids == [5] * 73 and first.vectors == []
    assert second.ids == [PLACEHOLDER_ID] * 3 + [6] and second.weights == [1.2] * 4
    assert second.vectors[0][0] == 0 and second.vectors[0][1] is vec
    # The comma backtrack moves an embedding with the ids after the comma, offsets shifted.
    parts = [([5] * 60 + [COMMA] + [6] * 5 + [vec] + [6] * 20, 1.0)]
    first, second = chunked(parts, COMMA)
    assert len(first.ids) == 61 and second.vectors[0][0] == 5 and len(second.ids) == 5 + 3 + 20


def test_plain_truncates_at_75(caplog):
    vec = torch.zeros(3, 4)
    (chunk,) = truncated([([5] * 73 + [vec], 1.0)], "p")
    assert chunk.ids == [5] * 73 + [PLACEHOLDER_ID] * 2  # the embedding's first 2 vectors, as diffusers' cut
    assert chunk.vectors[0][1].shape == (2, 4)
    assert "truncated" in caplog.text
    caplog.clear()
    (chunk,) = truncated([([5] * CHUNK_LENGTH, 1.0)], "p")
    assert len(chunk.ids) == 75 and "truncated" not in caplog.text


# ---------------------------------------------------------------------- encoding (conditioning.encode_prompt)
# Tiny CLIP-L-like and OpenCLIP-like towers (tests/test_clip.py, as tests/test_conditioning.py).
TINY_L = TextConfig(width=32, heads=4, layers=3, mlp_width=48, act="quick_gelu", projection_dim=None)
TINY_G = TextConfig(width=32, heads=4, layers=3, mlp_width=128, act="gelu", projection_dim=24)
SHORT = ["a photograph of an astronaut riding a horse", "", "a castle, (on a hill), [at night]"]


@pytest.fixture(scope="module")
def towers():
    ref = tiny_hf(with_projection=False, act="quick_gelu", eos_token_id=2, seed=1)
    clip_l = build_ours(TINY_L, hf_table(TINY_L).to_ours(on_disk(ref.state_dict(), ref)))
    open_g = build_ours(TINY_G, open_clip_table(TINY_G).to_ours(tiny_open_clip("gelu", seed=2).state_dict()))
    return {"sd1": [clip_l], "sd2": [open_g], "sdxl": [clip_l, open_g]}


def enc(towers, family, prompts, syntax="plain"):
    with torch.no_grad():
        return encode_prompt(prompts, family_spec(family), towers[family], prompt_syntax=syntax)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_weight_one_is_bit_identical_to_plain(towers, family):
    text = [p.replace("(", "").replace(")", "").replace("[", "").replace("]", "") for p in SHORT]
    plain = enc(towers, family, text, "plain")
    for syntax in ("a1111", "comfy"):
        other = enc(towers, family, text, syntax)
        assert torch.equal(other.context, plain.context)
        if plain.pooled is not None:
            assert torch.equal(other.pooled, plain.pooled)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])  # SDXL: both tokenizers' rules, both pads, pooled
def test_chunks_are_the_separate_encodings(towers, family):
    def one(text):
        return enc(towers, family, text)

    cases = {
        "cat " * 75 + "dog " * 30: ["cat " * 75, "dog " * 30],  # 75 tokens, then the rest
        "a red cat BREAK a blue dog": ["a red cat", "a blue dog"],
        "cat " * 60 + ", " + "dog " * 20: ["cat " * 60 + ",", "dog " * 20],  # comma backtrack (15 <= 20)
        "cat " * 50 + ", " + "dog " * 30: ["cat " * 50 + ", " + "dog " * 24, "dog " * 6],  # 25 > 20: no backtrack
        "cat " * 160: ["cat " * 75, "cat " * 75, "cat " * 10],
    }
    for prompt, pieces in cases.items():
        long = enc(towers, family, prompt, "a1111")
        assert long.context.shape[1] == 77 * len(pieces)
        for k, piece in enumerate(pieces):
            assert torch.equal(long.context[:, 77 * k : 77 * (k + 1)], one(piece).context), (prompt, k)
        if long.pooled is not None:  # SDXL: the first chunk's pooled vector
            assert torch.equal(long.pooled, one(pieces[0]).pooled)
    # Plain truncates at 75 tokens instead.
    assert torch.equal(enc(towers, family, "cat " * 75 + "dog " * 30).context, one("cat " * 75).context)


def test_batch_is_padded_with_the_empty_prompt(towers):
    both = enc(towers, "sdxl", ["cat " * 80, "a dog"], "a1111")
    assert both.context.shape == (2, 154, 64)
    # the same rows encoded in the same batch shape, so fp32 results are equal up to GEMM blocking
    alone = enc(towers, "sdxl", ["dog " * 5, ""], "plain")
    assert_rel_close(both.context[1, 77:], alone.context[1], 1e-6, "padding chunk")
    assert_rel_close(both.context[1, :77], enc(towers, "sdxl", ["cat", "a dog"]).context[1], 1e-6, "first chunk")


def weights_of(positions: dict[int, float]) -> torch.Tensor:
    w = torch.ones(1, 77, 1, dtype=torch.float64)
    for j, v in positions.items():
        w[0, j] = v
    return w


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a1111_rule_by_hand(towers, family):
    # "a (red:1.5) [cat]": positions 1 a, 2 red, 3 cat (after the start token).
    z = enc(towers, family, "a red cat").context.double()
    w = weights_of({2: 1.5, 3: 1 / 1.1})
    got = enc(towers, family, "a (red:1.5) [cat]", "a1111").context
    # z' = (w z) mean(z) / mean(w z), per encoder (A1111 weights each embedder's output before SDXL's concat)
    halves = torch.split(z, 32, dim=-1)
    expected = torch.cat([h * w * (h.mean() / (h * w).mean()) for h in halves], dim=-1)
    assert_rel_close(got, expected, 1e-6, "A1111 rule")  # fp32 means of 77 x 32 values, then 2 products
    assert (got - z).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_comfy_rule_by_hand(towers, family):
    z = enc(towers, family, "a red cat").context.double()
    e = enc(towers, family, "").context.double()  # the empty prompt, position by position
    w = weights_of({2: 1.5, 3: 1 / 1.1})
    expected = torch.where(w == 1, z, (z - e) * w + e)
    got = enc(towers, family, "a (red:1.5) [cat]", "comfy").context
    assert_rel_close(got, expected, 1e-6, "ComfyUI rule")  # two fp32 roundings per element
    assert torch.equal(got[:, [0, 1, 4, 5]], z[:, [0, 1, 4, 5]].float())  # weight-1 tokens untouched


def test_long_prompts_reach_the_unet_and_both_sides_have_equal_length(towers):
    """The pipeline pads the shorter of prompt and negative prompt with its empty prompt's encoding
    (zeros for SDXL base's empty negative, as that side encodes "")."""
    stand_in = torch.nn.Linear(1, 1)  # `sd.device` reads the U-Net's parameters; no U-Net runs here
    for family, zeros in (("sd1", False), ("sdxl", True)):
        uses = [t.use(e.config.layers) for t, e in zip(FAMILIES[family].text, towers[family])]
        sd = StableDiffusion(family=FAMILIES[family], unet=stand_in, vae=None, text_encoders=towers[family],
                             text_uses=uses, tokenizer=CLIPTokenizer())  # fmt: skip
        micro = MicroConditioning((64, 64), (64, 64))
        with torch.no_grad():
            conds = encode(sd, Prompt(("cat " * 100,), ("",), micro, prompt_syntax="a1111"))
            empty = sd.encode_prompt("", zero_empty=zeros).context
        assert (
            conds.cond["context"].shape
            == conds.uncond["context"].shape
            == (1, 154, sum(e.config.width for e in towers[family]))
        )
        assert torch.equal(conds.uncond["context"][:, 77:], empty)
        assert bool((conds.uncond["context"] == 0).all()) == zeros
    # The U-Net's cross-attention takes any number of tokens.
    unet = UNetModel(TINY_UNETS["sd1"])
    randomize(unet, 0)
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), context=conds.cond["context"][..., :32])
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
