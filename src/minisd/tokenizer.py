"""CLIP's byte-level BPE tokenizer, written out step by step.

Every text encoder of SD1, SD2 and SDXL reads token ids made by the tokenizer
of CLIP (Radford et al. 2021), openai/CLIP `clip/simple_tokenizer.py`, which
open_clip copies as `open_clip/tokenizer.py::SimpleTokenizer`. The vocabulary
is the public `bpe_simple_vocab_16e6.txt.gz`, shipped in `minisd/data/` (no
network). This module is the one home of the vocabulary's constants
(`SOT_TOKEN_ID`, `EOT_TOKEN_ID`, `VOCAB_SIZE`, `NUM_MERGES`).

See docs/tokenizer.md for the encoding steps, padding and truncation, and where
the reference tokenizers disagree.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import os
from collections.abc import Iterable, Sequence
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

# openai/CLIP simple_tokenizer.py `self.pat`, character for character.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# Distinct words kept by the BPE cache. openai/CLIP caches in an unbounded dict,
# which grows forever in a long-running service that sees arbitrary prompts; an
# LRU cache of this size holds any realistic prompt vocabulary (~10 MB at most)
# and cannot change results, since BPE is a pure function of the word.
_CACHE_WORDS = 65536


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


@dataclass(frozen=True)
class TokenizedBatch:
    """`input_ids` (B, context_length) int64 and `eot_index` (B,) int64: the position
    of the first end-of-text token of each row (where CLIP pools its output)."""

    input_ids: torch.Tensor
    eot_index: torch.Tensor


class CLIPTokenizer:
    """CLIP's BPE tokenizer (openai/CLIP `SimpleTokenizer`) with batching and padding.

    `pad_token_id` is 49407 (eot) for SD1's CLIP ViT-L/14 and SDXL's first encoder,
    0 for the OpenCLIP encoders of SD2 and SDXL."""

    sot_token_id = SOT_TOKEN_ID
    eot_token_id = EOT_TOKEN_ID

    def __init__(
        self,
        vocab_path: str | os.PathLike[str] | None = None,
        *,
        context_length: int = 77,
        pad_token_id: int = EOT_TOKEN_ID,
    ) -> None:
        self.context_length = self._check_context_length(context_length)
        self.pad_token_id = self._check_pad(pad_token_id)
        merges = read_merges(vocab_path)

        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        vocab = vocabulary(merges)
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = vocab
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._special = {SOT_TOKEN: self.sot_token_id, EOT_TOKEN: self.eot_token_id}
        self._bpe = self._new_cache()

    def _new_cache(self):
        # Per instance, since each instance may read another merges file.
        return functools.lru_cache(maxsize=_CACHE_WORDS)(self._bpe_uncached)

    # A cache wrapping a bound method does not pickle (DataLoader workers): drop and rebuild it.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_bpe"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bpe = self._new_cache()

    @property
    def vocab_size(self) -> int:
        return len(self._decoder)

    # ------------------------------------------------------------------ encode
    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        """Split one byte-encoded piece into vocabulary symbols (step 4)."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            # The adjacent pair that was merged earliest in training.
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self._ranks.get(p, NUM_MERGES))
            if pair not in self._ranks:
                break
            # Merge every occurrence, left to right, never overlapping ("a a a" -> "aa a").
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

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the start and end tokens."""
        if not isinstance(text, str):
            raise ValueError(f"CLIPTokenizer.encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            if piece in self._special:  # the literal "<|endoftext|>" (openai/CLIP's cache entry)
                ids.append(self._special[piece])
                continue
            word = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self._encoder[symbol] for symbol in self._bpe(word))
        return ids

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        pad_token_id: int | None = None,
        context_length: int | None = None,
    ) -> TokenizedBatch:
        """`[sot] + encode(text) + [eot]`, truncated to `context_length` (the last
        kept id becomes eot) and padded with `pad_token_id` (defaults: the instance's)."""
        length = self._check_context_length(self.context_length if context_length is None else context_length)
        pad = self._check_pad(self.pad_token_id if pad_token_id is None else pad_token_id)
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"CLIPTokenizer expects a str or a sequence of str, got {texts!r:.80}")

        rows = []
        for text in texts:
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                # clip.tokenize(truncate=True): tokens[:context_length]; tokens[-1] = eot
                ids = ids[: length - 1] + [self.eot_token_id]
            rows.append(ids + [pad] * (length - len(ids)))
        input_ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)
        # First eot per row: what CLIP's pooling reads (argmax over ids in open_clip,
        # first `== eos_token_id` in HF); a literal "<|endoftext|>" in the text counts.
        eot_index = (input_ids == self.eot_token_id).int().argmax(dim=1)
        return TokenizedBatch(input_ids=input_ids, eot_index=eot_index)

    # ------------------------------------------------------------------ decode
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` as openai/CLIP decodes it ("</w>" -> " "), special ids dropped."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {bad[:8]}")
        text = "".join(self._decoder[i] for i in ids if i not in (self.sot_token_id, self.eot_token_id))
        data = bytearray(self._byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    # ------------------------------------------------------------------ checks
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
