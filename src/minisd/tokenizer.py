"""CLIP's byte-level BPE tokenizer, written out step by step.

Every text encoder of SD1, SD2 and SDXL reads token ids made by the tokenizer
of CLIP (Radford et al. 2021), openai/CLIP `clip/simple_tokenizer.py`, which
open_clip copies as `open_clip/tokenizer.py::SimpleTokenizer`. The vocabulary
is the public `bpe_simple_vocab_16e6.txt.gz`, shipped in `minisd/data/` (no
network). This module is the one home of the vocabulary's constants
(`SOT_TOKEN_ID`, `EOT_TOKEN_ID`, `VOCAB_SIZE`, `NUM_MERGES`).

See docs/tokenizer.md for the encoding steps, the special-token rules of each
encoder's reference tokenizer, the bounds on time and length, padding and
truncation, and where the reference tokenizers disagree.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import importlib.resources
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import ftfy
import regex
import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# openai/CLIP keeps `merges[1:49152-256-2+1]`: 48894 merge rules. With the 2 * 256
# byte symbols and the 2 special tokens that makes 49408 vocabulary entries.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
# The special tokens are the last two entries (so EOT is the largest id: open_clip pools at argmax).
SOT_TOKEN_ID = VOCAB_SIZE - 2  # 49406, <|startoftext|>
EOT_TOKEN_ID = VOCAB_SIZE - 1  # 49407, <|endoftext|>: ends every text; SD1's CLIP-L pads with it too

# The longest text `encode` accepts, in characters: far beyond any real prompt (77 tokens are
# about 300 characters; long A1111-style prompts a few thousand), and short enough that the worst
# text takes about a second. Every step after it is linear or O(n log n) in the cleaned text's
# UTF-8 bytes, which are at most 12 per character (NFC expands one code point to at most 3, of 4
# bytes each), and so are the ids: at most one per byte. See docs/tokenizer.md.
MAX_TEXT_CHARS = 2**16

# The literals a prompt may contain that become the start and end tokens, per reference tokenizer:
# "hf", transformers' `CLIPTokenizer` (SD1's and SDXL's CLIP-L, as the LDM/sgm embedders call it),
# matches openai/CLIP's spellings in the raw text, case-sensitively, before any cleaning;
# "open_clip", open_clip's `SimpleTokenizer` (SD2's OpenCLIP-H, SDXL's bigG), renames them and
# matches its own spellings in the cleaned text; to it "<|endoftext|>" is ordinary text.
SPECIAL_TOKENS: dict[str, dict[str, int]] = {
    "hf": {SOT_TOKEN: SOT_TOKEN_ID, EOT_TOKEN: EOT_TOKEN_ID},
    "open_clip": {"<start_of_text>": SOT_TOKEN_ID, "<end_of_text>": EOT_TOKEN_ID},
}

# The pre-tokenizer of each (step 2), on the cleaned text. Both ignore case as openai/CLIP and open_clip
# do (transformers' does not, which matters only for folds such as the long s: docs/tokenizer.md).
_PIECES = {
    # openai/CLIP simple_tokenizer.py `self.pat`, character for character, which transformers copies:
    # a special spelling is one piece, read as text (transformers' added tokens are matched before).
    "hf": regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    ),
    # open_clip `SimpleTokenizer.pat`: the same with its own special spellings; those pieces are special.
    "open_clip": regex.compile(
        r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    ),
}
# transformers' added tokens, matched in the raw text (`normalized=False`), exactly; the group makes
# `split` return them at the odd indices.
_HF_ADDED = regex.compile(f"({regex.escape(SOT_TOKEN)}|{regex.escape(EOT_TOKEN)})")
# transformers runs GPT-2's ByteLevel split after the pattern above. It changes no piece but a special
# spelling that only cleaning made ("<|EndOfText|>"): that one it splits into "<|", the name and "|>".
_HF_SPELLING = regex.compile(r"(<\|)(startoftext|endoftext)(\|>)", regex.IGNORECASE)

# The BPE cache. openai/CLIP caches every word in an unbounded dict, which grows forever
# in a long-running service that sees arbitrary prompts. Here an LRU cache holds the ids of
# words of at most _CACHE_WORD_LENGTH byte symbols (every common word; longer ones are rare
# and cheap to redo), so it holds at most about 35 MB; it cannot change results, since BPE
# is a pure function of the word.
_CACHE_WORDS = 65536
_CACHE_WORD_LENGTH = 32


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table (openai/CLIP `bytes_to_unicode`).

    The 188 printable Latin-1 bytes map to themselves; the other 68 (space,
    control characters, ...) to U+0100 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    # The dict is iterated in vocabulary order: printable bytes first, then the rest.
    return table


def _clean(text: str) -> str:
    """openai/CLIP `whitespace_clean(basic_clean(text)).lower()`."""
    text = ftfy.fix_text(text)
    # Twice, as the original: web captions are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    return regex.sub(r"\s+", " ", text).strip().lower()


def bpe(word: str, ranks: Mapping[tuple[str, str], int]) -> tuple[str, ...]:
    """Split one byte-encoded piece into symbols by the merge rules `ranks` (pair -> rank).

    The rule is openai/CLIP's `SimpleTokenizer.bpe` (Sennrich et al. 2016): start from the
    characters, "</w>" glued to the last; while some adjacent pair has a rank, take the pair
    of lowest rank and merge all its occurrences, left to right, never overlapping ("a a a"
    -> "aa a"). The original rescans the word after every merge, O(n^2) or worse in its
    length; this gives the same symbols in O(n log n) (docs/tokenizer.md):

    - the symbols form a linked list (`nxt`, `prv`); a merge keeps the left node's index;
    - every adjacent pair that has a rank sits, by its left node, in the bucket of its rank;
      `pending` is a heap of the ranks whose bucket is not empty;
    - the lowest pending rank's bucket is merged in position order, i.e. left to right. An
      entry whose pair has changed since (consumed by an overlapping merge, or a neighbour
      grew) fails the rank check and is skipped; the pairs a merge creates go to their own
      rank's bucket, never the current one (a pair holding "ab" is not ("a", "b")).

    So the next rank popped is again the lowest rank among the current pairs, even when a
    merge creates a pair ranked below the current one, exactly as the rescan finds it.
    """
    if not isinstance(word, str) or not word:
        raise ValueError(f"bpe: word must be a non-empty str, got {word!r:.40}")
    symbols: list[str | None] = [*word[:-1], word[-1] + END_OF_WORD]
    n = len(symbols)
    nxt = list(range(1, n + 1))  # n: no next symbol
    prv = list(range(-1, n - 1))  # -1: no previous symbol
    buckets: dict[int, list[int]] = {}
    pending: list[int] = []
    rank_of = ranks.get

    def add(i: int, pair: tuple[str, str]) -> None:
        rank = rank_of(pair)
        if rank is None:
            return
        bucket = buckets.get(rank)
        if bucket is None:
            buckets[rank] = [i]
            heapq.heappush(pending, rank)
        else:
            bucket.append(i)

    for i, pair in enumerate(zip(symbols, symbols[1:])):
        add(i, pair)
    while pending:
        rank = heapq.heappop(pending)
        for i in sorted(buckets.pop(rank)):
            left, j = symbols[i], nxt[i]
            if left is None or j == n or rank_of((left, symbols[j])) != rank:
                continue  # no longer this pair
            merged = left + symbols[j]
            symbols[i], symbols[j] = merged, None
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
                add(i, (merged, symbols[k]))
            if prv[i] >= 0:
                add(prv[i], (symbols[prv[i]], merged))
    return tuple(s for s in symbols if s is not None)


def _hf_byte_level(piece: str) -> tuple[str, ...]:
    """The parts of one piece after transformers' ByteLevel split (see `_HF_SPELLING`)."""
    spelled = _HF_SPELLING.fullmatch(piece)
    return spelled.groups() if spelled else (piece,)


@dataclass(frozen=True)
class TokenizedBatch:
    """`input_ids` (B, context_length) int64 and `eot_index` (B,) int64: the position
    of the first end-of-text token of each row (where CLIP pools its output)."""

    input_ids: torch.Tensor
    eot_index: torch.Tensor


@dataclass(frozen=True)
class _Vocabulary:
    """A BPE vocabulary as the tokenizer uses it: token -> id, id -> token, merge pair -> rank."""

    encoder: dict[str, int]
    decoder: list[str]
    ranks: dict[tuple[str, str], int]

    @staticmethod
    def of(merges: Sequence[tuple[str, str]]) -> _Vocabulary:
        vocab = vocabulary(merges)
        return _Vocabulary({token: i for i, token in enumerate(vocab)}, vocab, {p: r for r, p in enumerate(merges)})


@functools.lru_cache(maxsize=1)
def _shipped_vocabulary() -> _Vocabulary:
    """The shipped `bpe_simple_vocab_16e6.txt.gz`, read once per process, when a text is first tokenized."""
    return _Vocabulary.of(read_merges())


class CLIPTokenizer:
    """CLIP's BPE tokenizer (openai/CLIP `SimpleTokenizer`) with batching and padding.

    `pad_token_id` is 49407 (eot) for SD1's CLIP ViT-L/14 and SDXL's first encoder,
    0 for the OpenCLIP encoders of SD2 and SDXL. `special_tokens` says whose literals
    in a text are the start and end tokens (`SPECIAL_TOKENS`): "hf" for the CLIP-L
    encoders, "open_clip" for the OpenCLIP ones."""

    sot_token_id = SOT_TOKEN_ID
    eot_token_id = EOT_TOKEN_ID

    def __init__(
        self,
        vocab_path: str | os.PathLike[str] | None = None,
        *,
        context_length: int = 77,
        pad_token_id: int = EOT_TOKEN_ID,
        special_tokens: str = "hf",
    ) -> None:
        self.context_length = self._check_context_length(context_length)
        self.pad_token_id = self._check_pad(pad_token_id)
        self.special_tokens = self._check_special_tokens(special_tokens)
        # The shipped vocabulary is read on first use and shared (`_shipped_vocabulary`): loading a model
        # builds a tokenizer, and reading 49k merges costs a third of a second. Another file is read now.
        self._own_vocab = None if vocab_path is None else _Vocabulary.of(read_merges(vocab_path))

        byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in byte_encoder.items()}
        # UTF-8 bytes read as Latin-1 are the code points 0..255: one str.translate maps them.
        self._byte_table = str.maketrans({chr(b): c for b, c in byte_encoder.items()})
        self._cached_word_ids = self._new_cache()

    @property
    def _vocab(self) -> _Vocabulary:
        return self._own_vocab or _shipped_vocabulary()

    @property
    def _ranks(self) -> dict[tuple[str, str], int]:  # merge pair -> rank, as `bpe` takes it
        return self._vocab.ranks

    @property
    def _encoder(self) -> dict[str, int]:  # token -> id
        return self._vocab.encoder

    def _new_cache(self):
        # Per instance, since each instance may read another merges file.
        return functools.lru_cache(maxsize=_CACHE_WORDS)(self._word_ids)

    # A cache wrapping a bound method does not pickle (DataLoader workers): drop and rebuild it.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cached_word_ids"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cached_word_ids = self._new_cache()

    @property
    def vocab_size(self) -> int:
        """The number of tokens in the vocabulary."""
        return len(self._vocab.decoder)

    # ------------------------------------------------------------------ encode
    def _word_ids(self, word: str) -> tuple[int, ...]:
        """The ids of one byte-encoded piece (steps 4 and 5)."""
        return tuple(self._encoder[symbol] for symbol in bpe(word, self._ranks))

    def _encode_text(self, text: str, rules: str, ids: list[int]) -> None:
        """Steps 1 to 5 for `text`, appending to `ids`; only open_clip has special pieces here."""
        specials = SPECIAL_TOKENS[rules] if rules == "open_clip" else {}
        pieces = _PIECES[rules].findall(_clean(text))
        if rules == "hf":
            pieces = [part for piece in pieces for part in _hf_byte_level(piece)]
        for piece in pieces:
            if piece in specials:
                ids.append(specials[piece])
                continue
            # Step 3: UTF-8 bytes -> printable characters.
            word = piece.encode("utf-8").decode("latin-1").translate(self._byte_table)
            ids.extend(self._cached_word_ids(word) if len(word) <= _CACHE_WORD_LENGTH else self._word_ids(word))

    def encode(self, text: str, *, special_tokens: str | None = None) -> list[int]:
        """All token ids of `text`, without the start and end tokens, never truncated.

        `special_tokens` ("hf" or "open_clip"; default: the instance's) says which literals
        in the text are the start and end tokens (`SPECIAL_TOKENS`). A text longer than
        `MAX_TEXT_CHARS` characters is a ValueError."""
        rules = self._check_special_tokens(self.special_tokens if special_tokens is None else special_tokens)
        if not isinstance(text, str):
            raise ValueError(f"CLIPTokenizer.encode expects a str, got {type(text).__name__}")
        self._check_length(text, "CLIPTokenizer.encode: text")
        ids: list[int] = []
        if rules == "open_clip":
            self._encode_text(text, rules, ids)
            return ids
        # transformers splits its added tokens out of the raw text first, then cleans and tokenizes
        # each part: a literal made by cleaning ("<|EndOfText|>", "&lt;|endoftext|&gt;") is text.
        for k, part in enumerate(_HF_ADDED.split(text)):
            if k % 2:
                ids.append(SPECIAL_TOKENS["hf"][part])
            else:
                self._encode_text(part, rules, ids)
        return ids

    def from_ids(
        self,
        rows: Sequence[Sequence[int]],
        *,
        pad_token_id: int | None = None,
        context_length: int | None = None,
    ) -> TokenizedBatch:
        """A batch of `[sot] + ids + [eot]` per row of ids (from `encode`), truncated to
        `context_length` (the last kept id becomes eot) and padded with `pad_token_id`
        (defaults: the instance's)."""
        length, pad = self._batch_options(context_length, pad_token_id)
        self._check_rows(rows)
        return self._batch(rows, length, pad)

    def _batch_options(self, context_length: int | None, pad_token_id: int | None) -> tuple[int, int]:
        length = self._check_context_length(self.context_length if context_length is None else context_length)
        return length, self._check_pad(self.pad_token_id if pad_token_id is None else pad_token_id)

    def _batch(self, rows: Sequence[Sequence[int]], length: int, pad: int) -> TokenizedBatch:
        padded = []
        for ids in rows:
            # clip.tokenize(truncate=True) keeps tokens[:context_length] and sets tokens[-1] = eot:
            # the same as keeping the first context_length - 2 ids.
            row = [self.sot_token_id, *ids[: length - 2], self.eot_token_id]
            padded.append(row + [pad] * (length - len(row)))
        input_ids = torch.tensor(padded, dtype=torch.long).reshape(len(padded), length)
        # First eot per row: what CLIP's pooling reads (argmax over ids in open_clip,
        # first `== eos_token_id` in HF); a literal end token in the text counts.
        eot_index = (input_ids == self.eot_token_id).int().argmax(dim=1)
        return TokenizedBatch(input_ids=input_ids, eot_index=eot_index)

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        pad_token_id: int | None = None,
        context_length: int | None = None,
        special_tokens: str | None = None,
    ) -> TokenizedBatch:
        """`from_ids` of `encode` of each text: `[sot] + ids + [eot]`, truncated and padded
        (see there); the options default to the instance's."""
        length, pad = self._batch_options(context_length, pad_token_id)
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"CLIPTokenizer expects a str or a sequence of str, got {texts!r:.80}")
        for k, text in enumerate(texts):  # every text checked before any work
            self._check_length(text, f"CLIPTokenizer: texts[{k}]")
        rows = [self.encode(text, special_tokens=special_tokens) for text in texts]
        return self._batch(rows, length, pad)  # encode's ids need no check

    # ------------------------------------------------------------------ decode
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` as openai/CLIP decodes it ("</w>" -> " "), special ids dropped."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {bad[:8]}")
        decoder = self._vocab.decoder
        text = "".join(decoder[i] for i in ids if i not in (self.sot_token_id, self.eot_token_id))
        data = bytearray(self._byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_length(text: str, name: str) -> None:
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"{name} must have at most {MAX_TEXT_CHARS} characters (MAX_TEXT_CHARS), got {len(text)}")

    def _check_rows(self, rows: Sequence[Sequence[int]]) -> None:
        if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
            raise ValueError(f"CLIPTokenizer.from_ids: rows must be a sequence of id sequences, got {rows!r:.80}")
        for k, ids in enumerate(rows):
            if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
                raise ValueError(f"CLIPTokenizer.from_ids: rows[{k}] must be a sequence of ints, got {ids!r:.80}")
            for m, i in enumerate(ids):
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                    where = f"CLIPTokenizer.from_ids: rows[{k}][{m}]"
                    raise ValueError(f"{where} must be an int in [0, {self.vocab_size}), got {i!r:.40}")

    @staticmethod
    def _check_context_length(context_length: int) -> int:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(
                f"context_length must be an int >= 2 (room for the start and end tokens), got {context_length!r}"
            )
        return context_length

    @staticmethod
    def _check_pad(pad_token_id: int) -> int:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < VOCAB_SIZE:
            raise ValueError(f"pad_token_id must be an int in [0, {VOCAB_SIZE}), got {pad_token_id!r}")
        return pad_token_id

    @staticmethod
    def _check_special_tokens(special_tokens: str) -> str:
        if not isinstance(special_tokens, str) or special_tokens not in SPECIAL_TOKENS:
            raise ValueError(f"special_tokens must be one of {sorted(SPECIAL_TOKENS)}, got {special_tokens!r:.40}")
        return special_tokens


def vocabulary(merges: Sequence[tuple[str, str]]) -> list[str]:
    """The token of each id, in openai/CLIP's order: the 256 byte characters, the same
    with "</w>", one token per merge (the pair joined), then `SOT_TOKEN`, `EOT_TOKEN`."""
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]


def read_merges(vocab_path: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """The first NUM_MERGES merge rules of a BPE vocabulary file (line 0 is a version header);
    by default of the shipped `bpe_simple_vocab_16e6.txt.gz`."""
    if vocab_path is None:
        resource = importlib.resources.files("minisd") / "data" / "bpe_simple_vocab_16e6.txt.gz"
        with resource.open("rb") as f:
            raw, name = gzip.decompress(f.read()), "minisd/data/bpe_simple_vocab_16e6.txt.gz"
    else:
        with gzip.open(vocab_path, "rb") as f:
            raw, name = f.read(), os.fspath(vocab_path)
    lines = raw.decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{name}: expected {NUM_MERGES} merge lines of two symbols after the header")
    return merges  # type: ignore[return-value]
