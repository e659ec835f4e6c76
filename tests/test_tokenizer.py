"""minisd.tokenizer against open_clip's SimpleTokenizer and transformers' CLIPTokenizer.

open_clip's `SimpleTokenizer` is openai/CLIP's `simple_tokenizer.py` copied (same
vocabulary file, checked below), so it is the reference for *every* string,
except that it spells the special tokens `<start_of_text>`/`<end_of_text>`.
transformers' `CLIPTokenizer` (5.23, Rust `tokenizers` backend) skips ftfy and
HTML unescaping: it must agree everywhere else, and must differ on the cases
listed in `HF_DIVERGES`, so that the divergence documented in the module is real.

Token ids are integers: every comparison here is exact.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import pickle
import random
import string
import sys

import ftfy
import open_clip
import pytest
import regex
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from open_clip import tokenizer as oc_tokenizer
from transformers import CLIPTokenizer as HFCLIPTokenizer

from minisd.tokenizer import VOCAB_SIZE, CLIPTokenizer, TokenizedBatch

SOT, EOT = 49406, 49407
# sha256 of the public openai/CLIP `bpe_simple_vocab_16e6.txt.gz`.
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def _shipped_vocab_bytes() -> bytes:
    return (importlib.resources.files("minisd") / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()


# --------------------------------------------------------------------------- corpus
HAND_WRITTEN = [
    # empty, blank, whitespace runs
    "", " ", "     ", "\t", "\n\n\n", " \t \n \r\n ", "a  photo\t\tof\n\na   cat", "  leading and trailing  ",
    # typical SD prompts, with A1111-style weights and brackets
    "a photo of an astronaut riding a horse on mars",
    "(masterpiece:1.2), best quality, [cat], ((detailed eyes)), {{{sharp}}}",
    "portrait of a woman, by greg rutkowski, artstation, 8k, octane render, trending on ArtStation",
    "(worst quality:1.4), (low quality:1.4), lowres, bad anatomy, bad hands, jpeg artifacts",
    "a cute corgi wearing sunglasses, 35mm f/1.8, bokeh, golden hour --ar 16:9",
    "A majestic lion jumping from a big stone at night",
    "score_9, score_8_up, source_anime, 1girl, solo, <lora:detail:0.7>",
    "AN OLD SHIP IN A BOTTLE, HIGHLY DETAILED, UNREAL ENGINE 5",
    # contractions and their upper-case forms
    "it's", "IT'S", "don't", "DON'T", "you're", "we've", "I'm", "they'll", "he'd",
    "it's'nt'd", "rock'n'roll", "'s", "''", "l'été", "O'Neill's",
    "it'ſ",  # long s: the pattern's IGNORECASE makes 'ſ a contraction
    # numbers
    "1234567", "3.14", "3,14159", "-42", "1e-10", "0x1F", "2024-01-31", "v1.5", "12th", "½ ⅓ ¼", "١٢٣ ٤٥٦",
    "Ⅻ", "²³", "१२३",
    # punctuation runs
    "!!!", "???!!!...", "...", "--", "—", "a---b", "#hashtag @user", "C++ && C#", "<b>bold</b>", "</w>", "a</w>b",
    "~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/", "\"quoted\"", "(((", "[[[[]]]]",
    # HTML entities that the original unescapes (and transformers does not)
    "&amp;", "fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt;", "rock &#39;n&#39; roll", "a&nbsp;b", "&amp;amp;",
    "&amp;lt;",
    "&copy; 2024", "&#x263A;", "&quot;hi&quot;", "&lt",
    # ftfy unescapes HTML itself unless the text has a "<": then only the two html.unescape do.
    "<p>&amp;amp;</p>", "<i>&amp;lt;b&amp;gt;</i>",
    # mojibake and typography that ftfy fixes
    "Ã©", "cafÃ©", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "â€œquotedâ€", "don’t", "“curly”", "ﬁne ﬂour",
    "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ", "a\x00b", "a\x1bb", "a\u200bb", "soft\u00adhyphen", "\ufeffbom",
    # unicode letters, combining accents, scripts
    "café", "cafe\u0301", "naïve façade", "ÀÉÎÕÜ", "ΣΑΣ", "Straße", "İstanbul", "ǅemal", "ﬀ",
    "日本語のテキスト", "中文提示词，高质量", "한국어 문장", "мама мыла раму", "Ελληνικά",
    "مرحبا بالعالم", "שלום עולם", "हिन्दी", "ภาษาไทย", "ẞ",
    # emoji, ZWJ sequences, flags, skin tones, variation selectors
    "😀", "a 🐱 cat", "👨‍👩‍👧‍👦", "👩🏽‍🚀", "🏳️‍🌈", "🇯🇵🇺🇸", "❤️", "✨sparkles✨", "🤖🤖🤖",
    # mixed
    "Hello, World! 123 café 😀 &amp; ΣΑΣ",
]

CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2003", "\x0b\x0c", " \t\n "]
SUBJECTS = ["cat", "astronaut", "castle", "forest", "cyberpunk city"]


def _generated() -> list[str]:
    out = []
    for c in CONTRACTIONS:
        out += [f"it{c} fine", f"IT{c.upper()} FINE", f"x{c}{c}", f"{c} {c.upper()}"]
    out += [f"a{ws}cat{ws}" for ws in WHITESPACE]
    out += [f"cat{p * 3}dog {p}" for p in string.punctuation]
    out += [f"({s}:{w}), [background], {{detail}}" for s in SUBJECTS for w in ("0.8", "1.2", "1.5")]
    # Truncation boundary: "a" is one token, so n words give n + 2 ids around 77.
    out += ["a " * n for n in (73, 74, 75, 76, 77, 200)]
    out += [", ".join(["masterpiece, best quality, ultra detailed illustration"] * 20)]
    # Deterministic random ASCII strings (letters, digits, punctuation, spaces).
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    \t\n"
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(60)]
    return out


CORPUS = HAND_WRITTEN + _generated()

# Where transformers' CLIPTokenizer (no ftfy, no html.unescape, per-character
# lowercase) differs from the original algorithm, with the reason.
HF_DIVERGES = {
    "&amp;": "html.unescape", "fish &amp; chips": "html.unescape", "&lt;b&gt;bold&lt;/b&gt;": "html.unescape",
    "rock &#39;n&#39; roll": "html.unescape", "a&nbsp;b": "html.unescape", "&amp;amp;": "html.unescape twice",
    "&amp;lt;": "html.unescape twice", "<p>&amp;amp;</p>": "html.unescape twice",
    "<i>&amp;lt;b&amp;gt;</i>": "html.unescape twice", "&copy; 2024": "html.unescape", "&#x263A;": "html.unescape",
    "&quot;hi&quot;": "html.unescape", "&lt": "html.unescape without semicolon",
    "Hello, World! 123 café 😀 &amp; ΣΑΣ": "html.unescape and final sigma",
    "Ã©": "ftfy mojibake", "cafÃ©": "ftfy mojibake", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.": "ftfy mojibake",
    "â€œquotedâ€": "ftfy mojibake", "don’t": "ftfy uncurls quotes", "“curly”": "ftfy uncurls quotes",
    "ﬁne ﬂour": "ftfy ligatures", "ﬀ": "ftfy ligatures", "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ": "ftfy full width",
    "a\x00b": "ftfy removes control characters", "a\x1bb": "ftfy removes control characters",
    "\ufeffbom": "ftfy removes the byte-order mark", "ǅemal": "ftfy spells out the digraph ǅ",
    "中文提示词，高质量": "ftfy full-width comma",
    "ΣΑΣ": "final sigma: Python lower() gives ς, tokenizers σ",
    "it'ſ": "the pre-tokenizer regex is case-sensitive in transformers",
}

# Special tokens written inside a text. openai/CLIP (and HF) read the literal
# "<|endoftext|>" as the token; open_clip only reads its own spellings so.
SPECIAL_LITERALS = [
    "<|endoftext|>", "a photo<|endoftext|>of a cat", "<|startoftext|>hello<|endoftext|>",
    " <|endoftext|> <|endoftext|> ", "x <|endoftext|>" + " y" * 100,
]


def _open_clip_spelling(text: str) -> str:
    text = regex.sub(r"<\|startoftext\|>", "<start_of_text>", text, flags=regex.IGNORECASE)
    return regex.sub(r"<\|endoftext\|>", "<end_of_text>", text, flags=regex.IGNORECASE)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def oc() -> oc_tokenizer.SimpleTokenizer:
    return oc_tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory):
    """vocab.json and merges.txt laid out like openai/clip-vit-large-patch14's, built from
    the shipped BPE file with open_clip's byte table (not with minisd's code)."""
    lines = gzip.decompress(_shipped_vocab_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(oc_tokenizer.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path = tmp_path_factory.mktemp("hf_clip_tokenizer")
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return path


@pytest.fixture(scope="module")
def hf(hf_dir) -> HFCLIPTokenizer:
    # SD1's tokenizer_config: pad with "<|endoftext|>".
    return HFCLIPTokenizer.from_pretrained(hf_dir, pad_token="<|endoftext|>")


def _hf_batch(hf: HFCLIPTokenizer, texts: list[str]):
    # As diffusers' StableDiffusionPipeline.encode_prompt calls it.
    return hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")


# --------------------------------------------------------------------------- vocabulary
def test_vocab_file_is_open_clips(ours):
    """Parity with open_clip means something only if both read the same file."""
    shipped = _shipped_vocab_bytes()
    assert hashlib.sha256(shipped).hexdigest() == VOCAB_SHA256
    with open(oc_tokenizer.default_bpe(), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == VOCAB_SHA256
    assert len(gzip.decompress(shipped).decode("utf-8").splitlines()) == 262145
    assert ours.vocab_size == VOCAB_SIZE == 49408
    assert (ours.sot_token_id, ours.eot_token_id) == (SOT, EOT)


def test_every_token_decodes_like_open_clip(ours, oc, hf):
    """The whole id -> symbol table, checked through decode, one id at a time."""
    assert len(hf) == ours.vocab_size
    for i in range(ours.vocab_size - 2):
        assert ours.decode([i]) == oc.decode([i]), i
    assert hf.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [SOT, EOT]


def test_corpus_size_and_divergence_list():
    assert len(CORPUS) >= 200
    assert set(HF_DIVERGES) <= set(CORPUS)


# --------------------------------------------------------------------------- open_clip parity
def test_encode_matches_open_clip(ours, oc):
    for text in CORPUS:
        assert ours.encode(text) == oc.encode(text), repr(text)


@pytest.mark.parametrize("context_length", [77, 16, 2])
def test_batch_matches_open_clip_both_pads(ours, oc, context_length):
    # open_clip.tokenize, as sgm's FrozenOpenCLIPEmbedder calls it: zero padded (SD2 / SDXL bigG).
    reference = open_clip.tokenize(CORPUS, context_length=context_length)
    # Where open_clip puts eot: after the ids, or in the last slot when truncated.
    eot = torch.tensor([min(len(oc.encode(t)) + 1, context_length - 1) for t in CORPUS])
    assert (reference[torch.arange(len(CORPUS)), eot] == EOT).all()

    zero = ours(CORPUS, pad_token_id=0, context_length=context_length)
    assert isinstance(zero, TokenizedBatch)
    assert zero.input_ids.dtype == zero.eot_index.dtype == torch.long
    assert torch.equal(zero.input_ids, reference)
    assert torch.equal(zero.eot_index, eot)

    # eot padding (SD1): the same rows, with every slot after eot set to 49407.
    after_eot = torch.arange(context_length)[None, :] > eot[:, None]
    eot_padded = ours(CORPUS, pad_token_id=EOT, context_length=context_length)
    assert torch.equal(eot_padded.input_ids, reference.masked_fill(after_eot, EOT))
    assert torch.equal(eot_padded.eot_index, eot)


def test_default_context_length_and_pad_come_from_the_instance(oc):
    tok = CLIPTokenizer(context_length=20, pad_token_id=0)
    batch = tok("a photo of a cat")
    assert batch.input_ids.shape == (1, 20)
    assert torch.equal(batch.input_ids, oc(["a photo of a cat"], context_length=20))
    assert torch.equal(
        tok("a cat", pad_token_id=EOT, context_length=5).input_ids, torch.tensor([[SOT, 320, 2368, EOT, EOT]])
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_random_unicode_matches_open_clip(ours, oc, text):
    assume("<|" not in text and "_of_text>" not in text)  # special spellings differ on purpose
    assert ours.encode(text) == oc.encode(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet=st.sampled_from(list("aAbeéΣσςſ'stdlmrv0123 \t\n&;#ampltgÃ©€™<>!?.,()[]:_😀\u200d\u0301")))
)
def test_random_tricky_text_matches_open_clip(ours, oc, text):
    """A small alphabet that builds contractions, entities, mojibake and merges often."""
    assert ours.encode(text) == oc.encode(text)


# --------------------------------------------------------------------------- transformers parity
def test_encode_matches_transformers_where_it_agrees(ours, hf):
    agree = [t for t in CORPUS if t not in HF_DIVERGES]
    for text in agree:
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids, repr(text)


def test_batch_matches_transformers_both_pads(ours, hf):
    agree = [t for t in CORPUS if t not in HF_DIVERGES]
    reference = _hf_batch(hf, agree)
    assert torch.equal(ours(agree, pad_token_id=EOT).input_ids, reference.input_ids)
    # Pad 0 (OpenCLIP convention): HF's padded slots (attention_mask 0) become 0.
    zero_padded = reference.input_ids.masked_fill(reference.attention_mask == 0, 0)
    batch = ours(agree, pad_token_id=0)
    assert torch.equal(batch.input_ids, zero_padded)
    # HF's CLIPTextTransformer pools at the first eos: (input_ids == eos).int().argmax(-1).
    assert torch.equal(batch.eot_index, (reference.input_ids == hf.eos_token_id).int().argmax(-1))


@pytest.mark.parametrize("text", sorted(HF_DIVERGES))
def test_transformers_divergence_follows_the_original(ours, oc, hf, text):
    """Pinned to open_clip (= openai/CLIP); transformers really differs here."""
    assert ours.encode(text) == oc.encode(text)
    assert ours.encode(text) != hf(text, add_special_tokens=False).input_ids, HF_DIVERGES[text]


def test_sd2_diffusers_pad_token_splits_exclamation_marks(ours, oc, hf_dir):
    """SD2's diffusers tokenizer_config pads with "!" (id 0), which makes "!" an added
    token that transformers splits out before BPE; minisd pads by id and keeps BPE."""
    sd2_hf = HFCLIPTokenizer.from_pretrained(hf_dir, pad_token="!")
    text = "wow!! great!"
    assert ours.encode(text) == oc.encode(text)
    assert sd2_hf(text, add_special_tokens=False).input_ids.count(0) == 3
    assert 0 not in ours.encode(text)


# --------------------------------------------------------------------------- special tokens in text
@pytest.mark.parametrize("text", SPECIAL_LITERALS)
def test_special_token_text_follows_openai_clip(ours, oc, hf, text):
    expected = oc.encode(_open_clip_spelling(text))  # open_clip's algorithm with openai's spelling
    assert EOT in expected
    assert ours.encode(text) == expected == hf(text, add_special_tokens=False).input_ids
    assert ours.encode(text) != oc.encode(text)  # open_clip does not know "<|endoftext|>"
    batch, reference = ours(text), _hf_batch(hf, [text])
    assert torch.equal(batch.input_ids, reference.input_ids)
    assert torch.equal(batch.eot_index, (reference.input_ids == EOT).int().argmax(-1))


def test_special_token_text_is_lowercased_first(ours, oc, hf):
    """openai/CLIP lowercases before matching; transformers matches case-sensitively."""
    text = "a <|EndOfText|> b"
    assert ours.encode(text) == oc.encode(_open_clip_spelling(text)) == [320, EOT, 321]
    assert EOT not in hf(text, add_special_tokens=False).input_ids
    # open_clip's own spellings are plain text to minisd, as to openai/CLIP and HF.
    text = "<start_of_text>a cat<end_of_text>"
    assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids
    assert oc.encode(text)[0] == SOT and SOT not in ours.encode(text)


def test_whitespace_cleaning_of_openai_and_open_clip_agree_after_ftfy():
    """openai/CLIP collapses regex `\\s+`, open_clip uses str.split(); they differ only on
    U+001C..U+001F, which ftfy.fix_text removes before either runs."""
    everything = "".join(map(chr, range(sys.maxunicode + 1)))
    py_space = {c for c in everything if c.isspace()}
    differ = sorted(py_space.symmetric_difference(regex.findall(r"\s", everything)))
    assert differ == ["\x1c", "\x1d", "\x1e", "\x1f"]
    assert all(ftfy.fix_text(f"a{c}b") == "ab" for c in differ)


# --------------------------------------------------------------------------- decode
PLAIN_PROMPTS = [
    "a photo of a cat", "An Astronaut Riding A Horse", "  lots   of\tspaces\nhere ",
    "portrait of a woman by greg rutkowski",
]


@pytest.mark.parametrize("text", PLAIN_PROMPTS)
def test_decode_round_trip_plain_ascii(ours, oc, text):
    """Words come back cleaned and lowercased, each followed by one space (openai/CLIP)."""
    ids = ours.encode(text)
    assert ours.decode(ids) == " ".join(text.lower().split()) + " " == oc.decode(ids)


def test_decode_matches_open_clip_and_drops_special_tokens(ours, oc):
    for text in CORPUS:
        ids = oc.encode(text)
        assert ours.decode(ids) == oc.decode(ids), repr(text)
    text = "a photo, of a CAT!"
    expected = oc.decode(oc.encode(text))
    assert expected == "a photo , of a cat ! "
    row = ours(text, pad_token_id=EOT)
    assert ours.decode(row.input_ids[0]) == expected  # sot, eot and eot padding dropped
    row = ours(text, pad_token_id=0)
    assert ours.decode(row.input_ids[0, : row.eot_index[0]]) == expected
    # A lone UTF-8 lead byte decodes to U+FFFD, as errors="replace" in the original.
    lead = [oc.encoder[oc.byte_encoder[0xE6]]]
    assert ours.decode(lead) == oc.decode(lead) == "\ufffd"


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [1, 0, -5, 77.0, True, "77"])
def test_bad_context_length(ours, bad):
    with pytest.raises(ValueError, match="context_length must be an int >= 2"):
        CLIPTokenizer(context_length=bad)
    with pytest.raises(ValueError, match="context_length must be an int >= 2"):
        ours("a cat", context_length=bad)


@pytest.mark.parametrize("bad", [-1, 49408, 1.0, "0", False])
def test_bad_pad_token_id(ours, bad):
    with pytest.raises(ValueError, match=r"pad_token_id must be an int in \[0, 49408\)"):
        CLIPTokenizer(pad_token_id=bad)
    with pytest.raises(ValueError, match=r"pad_token_id must be an int in \[0, 49408\)"):
        ours("a cat", pad_token_id=bad)


@pytest.mark.parametrize("bad", [None, b"a cat", 3, ["a cat", 3], [b"x"], {"a": 1}])
def test_non_string_input(ours, bad):
    with pytest.raises(ValueError, match="expects a str"):
        ours(bad)
    if not isinstance(bad, list):
        with pytest.raises(ValueError, match="CLIPTokenizer.encode expects a str, got"):
            ours.encode(bad)


def test_bad_ids_and_bad_vocab_file(ours, tmp_path):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49408\), got \[49408\]"):
        ours.decode([1, 49408])
    with pytest.raises(ValueError, match=r"got \[-1\]"):
        ours.decode([-1])
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\na b\nc d\n"))
    with pytest.raises(ValueError, match="short.txt.gz: expected 48894 merge lines"):
        CLIPTokenizer(short)


def test_pickle_round_trip(ours):
    """DataLoader workers pickle the tokenizer; the BPE cache is rebuilt on load."""
    clone = pickle.loads(pickle.dumps(ours))
    assert clone.encode("a photo of a cat, ΣΑΣ &amp; Ã©") == ours.encode("a photo of a cat, ΣΑΣ &amp; Ã©") != []
    assert clone._bpe is not ours._bpe


def test_explicit_vocab_path_equals_default(ours):
    tok = CLIPTokenizer(oc_tokenizer.default_bpe())
    assert torch.equal(tok(CORPUS[:50]).input_ids, ours(CORPUS[:50]).input_ids)
