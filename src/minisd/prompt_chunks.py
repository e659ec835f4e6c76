"""Weighted spans -> token chunks of at most 75 ids, each later encoded as its own 77-token text.

A1111's `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line` (modules/sd_hijack_clip.py), written
anew (docs/prompts.md has the rules with examples):

- the spans are tokenized one by one; every id carries its span's weight;
- a chunk holds `CHUNK_LENGTH` = 75 ids (77 with the start and end tokens);
- `BREAK` ends the current chunk (even an empty one);
- when a chunk is full and a comma was seen in its last `COMMA_BACKTRACK` = 20 ids, the ids after
  that comma move to the next chunk, so a phrase is not cut in two (A1111's `comma_padding_backtrack`,
  default 20; the check runs at a token that is not itself a comma);
- a textual-inversion embedding of n vectors takes n positions and is never split: if it does not
  fit, the chunk ends before it.

`truncated` is the "plain" language instead: one chunk, cut at 75 positions (diffusers' behaviour).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .prompt_syntax import Break, Span

logger = logging.getLogger(__name__)

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
PLACEHOLDER_ID = 0  # the id under an embedding's positions: its token embedding is replaced (A1111 uses 0 too)


@dataclass
class Chunk:
    """Up to 75 positions of a prompt: `ids` and their `weights`, and the textual-inversion vectors
    `(offset, (n, width))` that replace the token embeddings of `ids[offset : offset + n]`."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: list[tuple[int, torch.Tensor]] = field(default_factory=list)


Piece = int | torch.Tensor  # a token id, or an embedding's (n, width) vectors
Tokenized = tuple[list[Piece], float]  # the pieces of one span and its weight


def tokenize_spans(
    spans: Sequence[Span | Break],
    encode: Callable[[str], list[int]],
    embeddings: Mapping[str, torch.Tensor],
    pattern: re.Pattern | None,
) -> list[Tokenized | Break]:
    """Each span's text as pieces: the ids of `encode`, with every embedding token (found by `pattern`,
    looked up lower-cased in `embeddings`) as its vectors. BREAKs pass through."""
    out: list[Tokenized | Break] = []
    for span in spans:
        if isinstance(span, Break):
            out.append(span)
            continue
        text, weight = span
        parts = [text] if pattern is None else pattern.split(text)  # no groups: text, token, text, ...
        tokens = pattern.findall(text) if pattern is not None else []
        pieces: list[Piece] = list(encode(parts[0]))
        for token, part in zip(tokens, parts[1:]):
            pieces.append(embeddings[token.lower()])
            pieces.extend(encode(part))
        out.append((pieces, weight))
    return out


def chunked(parts: Sequence[Tokenized | Break], comma_id: int) -> list[Chunk]:
    """The chunks of a long prompt (the module's rules); at least one."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1  # index in `chunk.ids` of its last comma, -1 for none
    for part in parts:
        if isinstance(part, Break):
            chunks.append(chunk)
            chunk, last_comma = Chunk(), -1
            continue
        pieces, weight = part
        for piece in pieces:
            if isinstance(piece, int) and piece == comma_id:
                last_comma = len(chunk.ids)
            elif len(chunk.ids) == CHUNK_LENGTH and last_comma != -1 and CHUNK_LENGTH - last_comma <= COMMA_BACKTRACK:
                chunk, moved = _split_after(chunk, last_comma + 1)
                chunks.append(chunk)
                chunk, last_comma = moved, -1
            n = 1 if isinstance(piece, int) else piece.shape[0]
            if len(chunk.ids) + n > CHUNK_LENGTH:  # full, or an embedding that does not fit
                chunks.append(chunk)
                chunk, last_comma = Chunk(), -1
            _append(chunk, piece, weight)
    if chunk.ids or not chunks:
        chunks.append(chunk)
    return chunks


def truncated(parts: Sequence[Tokenized | Break], prompt: str) -> list[Chunk]:
    """ "plain": one chunk of the first 75 positions (an embedding cut short keeps its first vectors, as
    diffusers' tokenizer truncation does), with a warning when something was cut."""
    chunk = Chunk()
    for part in parts:
        pieces, weight = part  # "plain" has no BREAK
        for piece in pieces:
            room = CHUNK_LENGTH - len(chunk.ids)
            if room <= 0 or (not isinstance(piece, int) and piece.shape[0] > room):
                logger.warning("prompt longer than %d tokens truncated (prompt_syntax='plain'; 'a1111' or 'comfy' "
                               "encode long prompts in chunks): %.80r", CHUNK_LENGTH, prompt)  # fmt: skip
                if room > 0:
                    _append(chunk, piece[:room], weight)
                return [chunk]
            _append(chunk, piece, weight)
    return [chunk]


def _append(chunk: Chunk, piece: Piece, weight: float) -> None:
    if isinstance(piece, int):
        chunk.ids.append(piece)
        chunk.weights.append(weight)
        return
    n = piece.shape[0]
    chunk.vectors.append((len(chunk.ids), piece))
    chunk.ids.extend([PLACEHOLDER_ID] * n)
    chunk.weights.extend([weight] * n)


def _split_after(chunk: Chunk, at: int) -> tuple[Chunk, Chunk]:
    """`chunk` cut before position `at` (never inside an embedding: commas sit between pieces)."""
    head = Chunk(chunk.ids[:at], chunk.weights[:at], [(o, v) for o, v in chunk.vectors if o < at])
    tail = Chunk(chunk.ids[at:], chunk.weights[at:], [(o - at, v) for o, v in chunk.vectors if o >= at])
    return head, tail
