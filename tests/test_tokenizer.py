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
import math
import pickle
import random
import string
import sys
import time

import ftfy
import open_clip
import pytest
import regex
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from open_clip import tokenizer as oc_tokenizer
from transformers import CLIPTokenizer as HFCLIPTokenizer

from minisd.tokenizer import MAX_TEXT_CHARS, SPECIAL_TOKENS, VOCAB_SIZE, CLIPTokenizer, TokenizedBatch, bpe

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

# Special tokens typed inside a text. Each encoder follows its own reference tokenizer
# (minisd.tokenizer.SPECIAL_TOKENS): transformers' CLIPTokenizer (CLIP-L) matches "<|startoftext|>"
# and "<|endoftext|>" in the raw text, case-sensitively, before anything else; open_clip (OpenCLIP)
# matches its own "<start_of_text>" / "<end_of_text>" in the cleaned text, ignoring case.
SPECIAL_LITERALS = [
    "<|endoftext|>", "a photo<|endoftext|>of a cat", "<|startoftext|>hello<|endoftext|>",
    " <|endoftext|> <|endoftext|> ", "x <|endoftext|>" + " y" * 100, "<|endoftext|><|startoftext|>",
    # transformers splits the literal out first: no punctuation run or contraction swallows it
    "!!<|endoftext|>", "a!<|endoftext|>!b", "<<|endoftext|>>", "<|<|endoftext|>|>", "don<|endoftext|>'t",
    "1<|endoftext|>2", "it's<|startoftext|>'s", "<|endoftext|>'s",
    # near misses: transformers matches case-sensitively and exactly
    "a <|EndOfText|> b", "<|ENDOFTEXT|>", "<|EndOfText|><end_of_text>", "!<|EndOfText|>!", "<|endoftext |>",
    "<|endoftext|", "|endoftext|>",
    # open_clip's spellings, in any case
    "<end_of_text>", "<start_of_text>a cat<end_of_text>", "<START_OF_TEXT>a<End_Of_Text>", "it<end_of_text>'s",
    "<end_of_text>!!", "!!<end_of_text>", "a <end_of_text> <|endoftext|> b", "x <end_of_text>" + " y" * 100,
]
# open_clip matches after cleaning, transformers before: special (or not) to open_clip only. HF diverges
# on these anyway (no ftfy, no html.unescape); minisd's "hf" rules read them as ordinary text.
CLEANED_LITERALS = [
    "&lt;end_of_text&gt;", "\uff1cend_of_text\uff1e", "&lt;|endoftext|&gt;", "\uff1c|endoftext|\uff1e",
    "<\u017ftart_of_text>a",  # long s: the pattern's IGNORECASE matches it, but it is no special token
]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def oc() -> oc_tokenizer.SimpleTokenizer:
    return oc_tokenizer.SimpleTokenizer()


def write_hf_vocab(path):
    """vocab.json and merges.txt laid out like openai/clip-vit-large-patch14's, built from
    the shipped BPE file with open_clip's byte table (not with minisd's code)."""
    lines = gzip.decompress(_shipped_vocab_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(oc_tokenizer.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory):
    return write_hf_vocab(tmp_path_factory.mktemp("hf_clip_tokenizer"))


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
def test_hf_special_tokens_match_transformers(ours, hf, text):
    """CLIP-L's rules: transformers' CLIPTokenizer, as SD1's and SDXL's embedders call it."""
    assert ours.encode(text, special_tokens="hf") == hf(text, add_special_tokens=False).input_ids
    batch, reference = ours(text, special_tokens="hf"), _hf_batch(hf, [text])
    assert torch.equal(batch.input_ids, reference.input_ids)
    assert torch.equal(batch.eot_index, (reference.input_ids == EOT).int().argmax(-1))


@pytest.mark.parametrize("text", SPECIAL_LITERALS + CLEANED_LITERALS)
def test_open_clip_special_tokens_match_open_clip(ours, oc, text):
    """OpenCLIP's rules: open_clip.tokenize, as SD2's and SDXL's bigG embedders call it."""
    assert ours.encode(text, special_tokens="open_clip") == oc.encode(text)
    reference = open_clip.tokenize([text])
    batch = ours(text, pad_token_id=0, special_tokens="open_clip")
    assert torch.equal(batch.input_ids, reference)
    assert torch.equal(batch.eot_index, reference.argmax(-1))  # open_clip pools at argmax: the first eot


def test_hf_rules_read_cleaned_literals_as_text(ours, oc, hf):
    """Only what is typed is special to transformers: a literal that cleaning makes is text."""
    as_text = [27, 347, 40786, 4160, 91, 285]  # "<|endoftext|>" read as text: "<|", "end", "of", ...
    for text in ("&lt;|endoftext|&gt;", "\uff1c|endoftext|\uff1e"):  # HTML entities, full-width brackets
        assert ours.encode(text, special_tokens="hf") == oc.encode(text) == as_text
    for text in ("&lt;end_of_text&gt;", "\uff1cend_of_text\uff1e"):
        assert ours.encode(text, special_tokens="hf") == hf("<end_of_text>", add_special_tokens=False).input_ids
        assert oc.encode(text) == [EOT]


@pytest.mark.reliability(
    "prompts (tokenizer)",
    "special-token literals typed in a prompt (`<\\|endoftext\\|>`, `<end_of_text>`, other cases)",  # \| for tables
    "each encoder reads them as its own reference tokenizer does: transformers for CLIP-L, open_clip for OpenCLIP",
)
def test_special_token_rules_differ_per_encoder(ours):
    """The literals the two encoders read as special, with exact ids."""
    text = "a <|endoftext|> b <end_of_text> c"
    # "hf": "<|endoftext|>" is the end token, "<end_of_text>" is text ("<", "end", "_", "of", ...).
    hf_ids = [320, EOT, 321, 283, 806, 318, 539, 318, 4160, 285, 322]
    assert ours.encode(text) == ours.encode(text, special_tokens="hf") == hf_ids
    # "open_clip": the other way round.
    assert ours.encode(text, special_tokens="open_clip") == [320, 27, 347, 40786, 4160, 91, 285, 321, EOT, 322]
    # Case: transformers matches exactly, open_clip after lowercasing.
    assert EOT not in ours.encode("<|EndOfText|>", special_tokens="hf")
    assert ours.encode("<End_Of_Text>", special_tokens="open_clip") == [EOT]
    # An instance's default, overridden per call.
    tok = CLIPTokenizer(special_tokens="open_clip", pad_token_id=0)
    assert tok.encode(text) == ours.encode(text, special_tokens="open_clip")
    assert tok.encode(text, special_tokens="hf") == ours.encode(text)
    assert torch.equal(tok(text).input_ids, open_clip.tokenize([text]))
    assert set(SPECIAL_TOKENS) == {"hf", "open_clip"}
    assert all(sorted(ids.values()) == [SOT, EOT] for ids in SPECIAL_TOKENS.values())


# Fragments that build literals, near misses and ordinary text, for the random tests below.
FRAGMENTS = [
    "<|endoftext|>", "<|startoftext|>", "<end_of_text>", "<start_of_text>", "<|EndOfText|>", "<END_OF_TEXT>",
    "<", "|", ">", "_", "!", "'s", "'", "a", "cat", "\u00c9", "1", " ", "\n", "endoftext", "of",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join))
def test_random_literals_match_transformers(ours, hf, text):
    assert ours.encode(text, special_tokens="hf") == hf(text, add_special_tokens=False).input_ids


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.lists(
        st.one_of(st.sampled_from(FRAGMENTS + ["&lt;", "&gt;", "\uff1c", "\u017f", "\u212a"]), st.text(max_size=4)),
        max_size=30,
    ).map("".join)
)
def test_random_literals_match_open_clip(ours, oc, text):
    assert ours.encode(text, special_tokens="open_clip") == oc.encode(text)


def test_whitespace_cleaning_of_openai_and_open_clip_agree_after_ftfy():
    """openai/CLIP collapses regex `\\s+`, open_clip uses str.split(); they differ only on
    U+001C..U+001F, which ftfy.fix_text removes before either runs."""
    everything = "".join(map(chr, range(sys.maxunicode + 1)))
    py_space = {c for c in everything if c.isspace()}
    differ = sorted(py_space.symmetric_difference(regex.findall(r"\s", everything)))
    assert differ == ["\x1c", "\x1d", "\x1e", "\x1f"]
    assert all(ftfy.fix_text(f"a{c}b") == "ab" for c in differ)


# --------------------------------------------------------------------------- BPE merge
def reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """openai/CLIP's `SimpleTokenizer.bpe` as minisd had it: rescan for the lowest-ranked pair after
    every merge (O(n^2) or worse in the word's length). Kept here to pin `bpe` to it."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return tuple(symbols)


def _byte_word(text: str) -> str:
    """A piece as BPE sees it, with open_clip's byte table (not minisd's)."""
    table = oc_tokenizer.bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


# Letters weighted towards the frequent ones make long words with many merges (and long runs).
COMMON_LETTERS = "eeeeaaaattoiinnsshhrrddllcumwfgypbvkjxqz"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(word=st.one_of(st.text(COMMON_LETTERS, min_size=1, max_size=300), st.text("ab", min_size=1, max_size=64),
                      st.text(min_size=1, max_size=40)))  # fmt: skip
def test_bpe_matches_the_reference_on_the_vocabulary(ours, word):
    word = _byte_word(word)
    assert bpe(word, ours._ranks) == reference_bpe(word, ours._ranks)


# Random merge tables, in which pairs join base symbols and merged ones in any order: they make the
# cases real merges rarely do (a merge creating a pair ranked below the current one, overlapping
# runs), where a heap merge most easily departs from the rescan. Every pair over a small pool in a
# random order, or random pairs over a larger one.
_SMALL_POOL = ["a", "b", "ab", "ba", "aa", "a</w>", "b</w>", "ab</w>"]
_LARGE_POOL = [*_SMALL_POOL, "c", "bc", "abc", "aab", "c</w>", "bc</w>", "aa</w>"]
_MERGE_TABLES = st.one_of(
    st.permutations([(x, y) for x in _SMALL_POOL for y in _SMALL_POOL]),
    st.lists(st.tuples(st.sampled_from(_LARGE_POOL), st.sampled_from(_LARGE_POOL)), max_size=60),
)


@settings(max_examples=500, deadline=None)
@given(merges=_MERGE_TABLES, word=st.text("abc", min_size=1, max_size=40))
def test_bpe_matches_the_reference_on_random_merge_tables(merges, word):
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    assert bpe(word, ranks) == reference_bpe(word, ranks)


def test_bpe_finishes_a_rank_before_a_lower_ranked_pair_it_created():
    """Merging ("a", "b") at 0 creates ("ab", "a"), ranked lower; the rescan still merges every
    ("a", "b") first. A plain heap of pairs would merge ("ab", "a") next and give aba, b, c."""
    ranks = {("ab", "a"): 0, ("a", "b"): 1}
    assert bpe("ababc", ranks) == reference_bpe("ababc", ranks) == ("ab", "ab", "c</w>")
    with pytest.raises(ValueError, match="bpe: word must be a non-empty str, got ''"):
        bpe("", ranks)


# --------------------------------------------------------------------------- bounds: time and length
# Times are CPU seconds of this process (time.process_time), so a busy machine does not fail them.
# The rescan took 12.6 s for one 16,000-letter word and grows as the square of the length: a
# 2**20-letter word would take about (65.5**2) * 12.6 s, 15 hours. The fast merge takes about 2.5 s
# for it and 0.03 s for the 16,000 letters; the bounds below allow a machine 10x slower and still
# fail for anything quadratic (or n**1.5: over an hour) by orders of magnitude.
def _random_letters(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _cpu_seconds(fn, *args):
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


@pytest.mark.reliability(
    "prompts (tokenizer)",
    "one very long word (16,000 letters took 12.6 s of CPU; 1 MiB would take hours)",
    "BPE in O(n log n) with the same ids as before: 0.03 s for 16,000 letters, about 2.5 s for 1 MiB (bound 30 s)",
)
def test_bpe_of_a_one_megabyte_word_is_not_quadratic(ours):
    word = _random_letters(2**20)
    symbols, seconds = _cpu_seconds(bpe, word, ours._ranks)
    assert seconds < 30, f"BPE of a 1 MiB word took {seconds:.1f} s of CPU"
    assert "".join(symbols) == word[:-1] + word[-1] + "</w>"  # a partition of the word
    assert all(s in ours._encoder for s in symbols) and len(symbols) < len(word) * 0.6  # merged, into tokens
    _, seconds = _cpu_seconds(ours.encode, word[:16000])
    assert seconds < 2, f"a 16,000-letter word took {seconds:.2f} s of CPU"


WORDS = ["masterpiece,", "best", "quality,", "a", "photo", "of", "an", "astronaut", "(detailed:1.2)", "café", "8k"]
# Texts of MAX_TEXT_CHARS characters that are slowest to tokenize: one word; ordinary prompt words; a
# run of U+1D160, which NFC expands to 3 code points of 4 bytes (12 byte symbols, the most a character
# makes, in one piece); emoji (4 bytes each, many merges); digits (one id per character).
LIMIT_TEXTS = {
    "one word": lambda: _random_letters(MAX_TEXT_CHARS),
    "prompt words": lambda: " ".join(random.Random(1).choice(WORDS) for _ in range(MAX_TEXT_CHARS))[:MAX_TEXT_CHARS],
    "U+1D160 run": lambda: "\U0001d160" * MAX_TEXT_CHARS,
    "emoji": lambda: "".join(chr(random.Random(2).randrange(0x1F300, 0x1FAFF)) for _ in range(MAX_TEXT_CHARS)),
    "digits": lambda: "7" * MAX_TEXT_CHARS,
}


@pytest.mark.reliability(
    "prompts (tokenizer)",
    "the slowest texts of `MAX_TEXT_CHARS` characters: one word, emoji, U+1D160 (12 UTF-8 bytes after NFC), digits",
    "about 1 s of CPU at most (bound 15 s); at most 12 ids per character; the 77-token batch is its first 75 ids",
)
@pytest.mark.parametrize("kind", sorted(LIMIT_TEXTS))
def test_longest_texts_are_fast_and_their_ids_bounded(ours, kind):
    """About 1 s of CPU at most here: the worst case of the documented limit (docs/tokenizer.md)."""
    text = LIMIT_TEXTS[kind]()
    assert len(text) == MAX_TEXT_CHARS
    ids, seconds = _cpu_seconds(ours.encode, text)
    assert seconds < 15, f"{kind}: {seconds:.1f} s of CPU"
    assert 0 < len(ids) <= 12 * MAX_TEXT_CHARS  # at most one id per byte, 12 bytes per character
    batch = ours(text)
    assert batch.input_ids[0, :-1].tolist() == [SOT, *ids[:75]] and batch.input_ids[0, -1] == EOT


@pytest.mark.reliability(
    "prompts (tokenizer)",
    "a prompt longer than `MAX_TEXT_CHARS` = 65,536 characters (a 1 MB word or prompt)",
    "`ValueError` naming `text` or `texts[k]`, the limit and the length, before any cleaning or BPE",
)
@pytest.mark.parametrize("length", [MAX_TEXT_CHARS + 1, 2**20])
@pytest.mark.parametrize("kind", ["one word", "prompt"])
def test_longer_texts_are_refused_at_once(ours, length, kind):
    text = "a" * length if kind == "one word" else ("a photo of a cat " * length)[:length]
    message = rf"must have at most {MAX_TEXT_CHARS} characters \(MAX_TEXT_CHARS\), got {length}"
    start = time.process_time()
    with pytest.raises(ValueError, match=r"CLIPTokenizer.encode: text " + message):
        ours.encode(text)
    with pytest.raises(ValueError, match=r"CLIPTokenizer: texts\[1\] " + message):
        ours(["a cat", text])
    assert time.process_time() - start < 0.5  # checked before any cleaning or BPE


@pytest.mark.reliability(
    "prompts (tokenizer)",
    "many distinct long words sent to a long-running process",
    "the BPE cache keeps at most 65,536 words of at most 32 byte symbols: about 35 MB at worst, not unbounded",
)
def test_bpe_cache_holds_only_short_words():
    """The cache is bounded in entries and in entry size: long words are not kept."""
    tok = CLIPTokenizer()
    tok.encode("a cat")
    assert tok._cached_word_ids.cache_info().currsize == 2
    tok.encode(_random_letters(33) + " " + "x" * 1000)
    assert tok._cached_word_ids.cache_info().currsize == 2
    tok.encode(_random_letters(32))
    assert tok._cached_word_ids.cache_info().currsize == 3


# --------------------------------------------------------------------------- all ids, then batches
def test_encode_returns_all_ids_and_from_ids_batches_them(ours, oc):
    """`encode` never truncates; `from_ids` makes the 77-token rows (as __call__ does), e.g. from
    75-token chunks of a long prompt."""
    text = ", ".join(["masterpiece, best quality, ultra detailed illustration of a castle"] * 16)
    ids = ours.encode(text)
    assert len(ids) > 150 and ids == oc.encode(text)
    whole = ours.from_ids([ids])
    assert torch.equal(whole.input_ids, ours(text).input_ids) and torch.equal(whole.input_ids, oc([text]))
    chunks = ours.from_ids([ids[:75], ids[75:150], ids[150:]], pad_token_id=0)
    assert chunks.input_ids.shape == (3, 77)
    assert chunks.input_ids[1].tolist() == [SOT, *ids[75:150], EOT]
    assert chunks.input_ids[2].tolist() == [SOT, *ids[150:], EOT] + [0] * (75 - len(ids[150:]))
    assert chunks.eot_index.tolist() == [76, 76, len(ids[150:]) + 1]
    assert torch.equal(ours.from_ids([[], [320]], context_length=4).input_ids,
                       torch.tensor([[SOT, EOT, EOT, EOT], [SOT, 320, EOT, EOT]]))  # fmt: skip


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


@pytest.mark.reliability(
    "prompts (tokenizer)",
    'unknown special-token rules (`special_tokens="openai"`)',
    "`ValueError` naming `special_tokens`, the choices `['hf', 'open_clip']` and the value",
)
@pytest.mark.parametrize("bad", ["openai", "HF", None, 1, ""])
def test_bad_special_tokens(ours, bad):
    match = r"special_tokens must be one of \['hf', 'open_clip'\], got"
    with pytest.raises(ValueError, match=match):
        CLIPTokenizer(special_tokens=bad)
    if bad is not None:  # None is "the instance's" in a call
        with pytest.raises(ValueError, match=match):
            ours.encode("a cat", special_tokens=bad)
        with pytest.raises(ValueError, match=match):
            ours("a cat", special_tokens=bad)


@pytest.mark.reliability(
    "prompts (tokenizer)",
    "`from_ids` rows that are not sequences of vocabulary ids (str, bool, float, out of range)",
    "`ValueError` naming `rows[k]` or `rows[k][m]`, the expected range and the value",
)
@pytest.mark.parametrize(
    "rows, match",
    [
        ("a cat", r"rows must be a sequence of id sequences, got 'a cat'"),
        (7, r"rows must be a sequence of id sequences, got 7"),
        ([[320], "ab"], r"rows\[1\] must be a sequence of ints, got 'ab'"),
        ([[320], 320], r"rows\[1\] must be a sequence of ints, got 320"),
        ([[320, 49408]], r"rows\[0\]\[1\] must be an int in \[0, 49408\), got 49408"),
        ([[-1]], r"rows\[0\]\[0\] must be an int in \[0, 49408\), got -1"),
        ([[True]], r"rows\[0\]\[0\] must be an int in \[0, 49408\), got True"),
        ([[320.0]], r"rows\[0\]\[0\] must be an int in \[0, 49408\), got 320.0"),
    ],
)
def test_bad_rows_of_ids(ours, rows, match):
    with pytest.raises(ValueError, match="CLIPTokenizer.from_ids: " + match):
        ours.from_ids(rows)


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
    assert clone._cached_word_ids is not ours._cached_word_ids


def test_explicit_vocab_path_equals_default(ours):
    tok = CLIPTokenizer(oc_tokenizer.default_bpe())
    assert torch.equal(tok(CORPUS[:50]).input_ids, ours(CORPUS[:50]).input_ids)
