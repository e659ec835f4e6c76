"""Prompt languages: a prompt string -> weighted spans of text and BREAK markers.

Pure string processing, no torch. `conditioning.encode_prompt` tokenizes the spans, cuts them into
75-token chunks (`prompt_chunks`) and applies the weights; the rules and equations are in docs/prompts.md.

- "plain": the prompt is text, parentheses included (diffusers' behaviour): one span of weight 1.
- "a1111" and "comfy": AUTOMATIC1111's attention syntax, as its `modules/prompt_parser.py`
  (`parse_prompt_attention`) reads it. The two differ only in how weights act on the encoding.

A1111's attention syntax:

    (text)        weight x 1.1           [text]      weight / 1.1
    (text:1.3)    weight x 1.3           nesting multiplies: ((text)) is x 1.21
    \\( \\) \\[ \\]   literal brackets        \\\\          a literal backslash
    BREAK         (a whole word, upper case) ends the current 75-token chunk

Unbalanced brackets are read as A1111 reads them: a closing bracket with nothing open is text, and
brackets still open at the end apply their factor (1.1 or 1/1.1) to everything after them. Runs of
equal weight are merged. A1111's prompt editing (`[a:b:0.5]`) and alternation (`[a|b]`) are not part
of this language: their text stays text (with the `[...]` weight).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROMPT_SYNTAXES = ("plain", "a1111", "comfy")
ROUND_FACTOR = 1.1  # A1111's `round_bracket_multiplier`; `[...]` divides by it

# One lexical item per match, in A1111's order of alternatives: escapes, openers, `:w)`, closers,
# a run of plain text, or a lone colon.
_ITEM = re.compile(
    r"""
    \\[()\[\]\\]     # an escaped bracket or backslash: the character itself
  | \\               # a lone backslash: dropped, as A1111 does
  | [(\[]            # opening bracket
  | :([+-]?[.\d]+)\) # ":1.3)": closes a round bracket with that weight
  | [)\]]            # closing bracket
  | [^\\()\[\]:]+    # plain text
  | :                # a colon that gives no weight
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)  # A1111's `re_break`: BREAK and the spaces around it


@dataclass(frozen=True)
class Break:
    """The BREAK keyword: the text after it starts a new 75-token chunk."""


BREAK = Break()
Span = tuple[str, float]  # (text, weight)


def parse_prompt(text: str, syntax: str = "a1111") -> list[Span | Break]:
    """The spans of `text` in the prompt language `syntax` (one of `PROMPT_SYNTAXES`)."""
    if not isinstance(text, str):
        raise ValueError(f"parse_prompt: expected a str prompt, got {type(text).__name__}")
    if syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax: expected one of {PROMPT_SYNTAXES}, got {syntax!r:.40}")
    return [(text, 1.0)] if syntax == "plain" else parse_attention(text)


def parse_attention(text: str) -> list[Span | Break]:
    """A1111's attention syntax (module docstring): `text` -> spans `(text, weight)` and `BREAK`s.

    As A1111: every span gets weight 1 when read; a closing bracket multiplies the weight of every
    span read since its opening bracket; brackets left open multiply to the end (round ones first);
    adjacent spans of exactly equal weight are merged; an empty prompt is one empty span.

    >>> parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[:3]
    [('a ', 1.0), ('house', 1.5730000000000004), (' ', 1.1)]
    """
    spans: list[list] = []  # [text, weight] or [BREAK, None], mutable while brackets close
    round_open: list[int] = []  # index into `spans` where each open bracket starts
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for span in spans[start:]:
            if span[0] is not BREAK:
                span[1] *= factor

    for match in _ITEM.finditer(text):
        item, weight = match.group(0), match.group(1)
        if item.startswith("\\"):
            spans.append([item[1:], 1.0])
        elif item == "(":
            round_open.append(len(spans))
        elif item == "[":
            square_open.append(len(spans))
        elif weight is not None and round_open and _is_number(weight):
            multiply(round_open.pop(), float(weight))
        elif item == ")" and round_open:
            multiply(round_open.pop(), ROUND_FACTOR)
        elif item == "]" and square_open:
            multiply(square_open.pop(), 1 / ROUND_FACTOR)
        elif weight is not None and round_open:  # ":1.2.3)": not a number; A1111 raises, we read text + ")"
            spans.append([item[:-1], 1.0])
            multiply(round_open.pop(), ROUND_FACTOR)
        else:  # text, or a bracket that closes nothing
            for k, part in enumerate(_BREAK.split(item)):
                if k:
                    spans.append([BREAK, None])
                spans.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_FACTOR)
    for start in square_open:
        multiply(start, 1 / ROUND_FACTOR)
    return _merged(spans)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _merged(spans: list[list]) -> list[Span | Break]:
    """Adjacent spans of exactly equal weight joined (A1111's last step); `[("", 1.0)]` if nothing."""
    out: list[Span | Break] = []
    for text, weight in spans:
        if text is BREAK:
            out.append(BREAK)
        elif out and not isinstance(out[-1], Break) and out[-1][1] == weight:
            out[-1] = (out[-1][0] + text, weight)
        else:
            out.append((text, weight))
    return out or [("", 1.0)]
