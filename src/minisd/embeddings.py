"""Textual-inversion embeddings: learned token vectors (Gal et al. 2022, "An Image is Worth One Word"),
read from the files people share, checked against a model, and kept as a token -> vectors table.

The file layouts (docs/prompts.md has them with examples):

| layout | file | what it holds |
|---|---|---|
| A1111 `.pt` | `torch.save` of a dict | `string_to_param: {"*": (n, width)}`, plus `name`, `step`, ... |
| A1111 `.safetensors` | safetensors | `emb_params: (n, width)` |
| diffusers `learned_embeds` | `.bin` / `.safetensors` | one entry `{token: (width,) or (n, width)}` |
| SDXL | safetensors | `clip_l: (n, 768)` and `clip_g: (n, 1280)`: one set per text encoder |

An embedding of `n` vectors stands for `n` token positions wherever its token appears in a prompt: the
vectors replace the token embeddings there (A1111's `EmbeddingsWithFixes`; diffusers adds them as new
vocabulary rows, which gives the same inputs to the transformer). Pickled files are read with
`torch.load(weights_only=True)`, which rebuilds only tensors and plain containers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .detection import open_regular, read_safetensors_header, what_else
from .families import Family
from .keymap import CheckpointError
from .prompt_chunks import CHUNK_LENGTH
from .sources import _check_archive
from .tokenizer import CLIPTokenizer

SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SDXL files: key per diffusers folder
# Widths of the released text encoders, to say which model an embedding was made for.
KNOWN_WIDTHS = {768: "SD1 (CLIP ViT-L/14)", 1024: "SD2 (OpenCLIP ViT-H/14)", 1280: "SDXL's bigG"}
_SYNTAX_CHARS = set("()[]:\\")  # prompt-syntax characters: a token holding one could never be typed


@dataclass(frozen=True)
class EmbeddingFile:
    """The vectors of an embedding file: `vectors` maps "" (a one-encoder file) or "clip_l" / "clip_g"
    (an SDXL file) to `(n, width)` float tensors; `layout` names the file layout (module table)."""

    path: Path
    layout: str
    vectors: dict[str, torch.Tensor]

    @property
    def described(self) -> str:
        """The file's shapes in words, e.g. "2 vectors of width 768" or "clip_l 1 x 768 + clip_g 1 x 1280"."""
        if "" in self.vectors:
            n, w = self.vectors[""].shape
            return f"{n} vector{'s' * (n != 1)} of width {w}"
        return " + ".join(f"{k} {self.vectors[k].shape[0]} x {self.vectors[k].shape[1]}" for k in ("clip_l", "clip_g"))


def read_embedding(path: str | Path) -> EmbeddingFile:
    """Read an embedding file in any layout of the module table; a ValueError says what else it is."""
    path = Path(path)
    entries = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
    layout, vectors = _vectors_of(entries, path)
    for key, v in vectors.items():
        v = v[None] if v.dim() == 1 else v
        if v.dim() != 2 or v.shape[0] == 0 or not v.is_floating_point():
            raise ValueError(f"{path}: {key or 'the embedding'} must be float vectors (n, width), "
                             f"got {v.dtype} {tuple(v.shape)}")  # fmt: skip
        if v.shape[0] > CHUNK_LENGTH:
            raise ValueError(f"{path}: {v.shape[0]} vectors, more than the {CHUNK_LENGTH} positions of a prompt chunk")
        if not torch.isfinite(v).all():
            raise ValueError(f"{path}: {key or 'the embedding'} holds NaN or infinite values")
        vectors[key] = v
    if "" not in vectors and vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
        raise ValueError(f"{path}: clip_l has {vectors['clip_l'].shape[0]} vectors but clip_g "
                         f"{vectors['clip_g'].shape[0]}; an SDXL embedding needs as many of each")  # fmt: skip
    return EmbeddingFile(path, layout, vectors)


def _read_safetensors(path: Path) -> dict[str, object]:
    header = read_safetensors_header(path)  # validated before any tensor is read
    if len(header.tensors) > 4:  # an embedding holds 1 or 2 tensors; do not read a checkpoint's
        raise ValueError(f"{path}: not a textual-inversion embedding: it holds {len(header.tensors)} tensors; "
                         f"{what_else(sorted(header.tensors), asked='embedding')}")  # fmt: skip
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _read_pickle(path: Path) -> dict[str, object]:
    with open_regular(path) as f:
        _check_archive(f, path)
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, or not a torch file at all
            first = (str(e).splitlines() or [""])[0]
            raise CheckpointError(f"{path}: cannot read it as an embedding with torch.load(weights_only=True) "
                                  f"({type(e).__name__}: {first})") from None  # fmt: skip
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a textual-inversion embedding: it holds a {type(obj).__name__}, not a dict")
    return obj


def _vectors_of(entries: dict[str, object], path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout, vectors) of a file's entries, by the keys that mark each layout."""
    tensors = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)}
    if isinstance(entries.get("string_to_param"), Mapping):  # A1111 .pt: {"*": (n, width)}
        params = [v for v in entries["string_to_param"].values() if isinstance(v, torch.Tensor)]
        if len(params) == 1:
            return "A1111 .pt (string_to_param)", {"": params[0]}
    if set(tensors) == {"emb_params"}:
        return "A1111 safetensors (emb_params)", {"": tensors["emb_params"]}
    if set(tensors) == set(SDXL_KEYS.values()):
        return "SDXL (clip_l, clip_g)", dict(tensors)
    if len(entries) == 1 and len(tensors) == 1 and next(iter(tensors.values())).dim() <= 2:
        return "diffusers learned_embeds", {"": next(iter(tensors.values()))}
    keys = sorted(map(str, entries))
    raise ValueError(
        f"{path}: not a textual-inversion embedding (expected string_to_param, emb_params, clip_l + clip_g, or one "
        f"{{token: vectors}} entry); its keys are {keys[:6]}{' ...' if len(keys) > 6 else ''}: "
        f"{what_else(keys, asked='embedding')}"
    )


# ------------------------------------------------------------------ one embedding for one model
def check_token(token: object, tokenizer: CLIPTokenizer, loaded: Mapping[str, object]) -> str:
    """`token` if it can name an embedding: a non-empty str without prompt-syntax characters that is not a
    word of the vocabulary (it would replace that word in every prompt; diffusers refuses it too)."""
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"embedding token: expected a non-empty str, got {token!r:.60}")
    if _SYNTAX_CHARS & set(token):
        raise ValueError(f"embedding token {token!r}: must not contain any of ( ) [ ] : \\ (prompt syntax); "
                         "pass token= another name")  # fmt: skip
    ids = tokenizer.encode(token)
    if len(ids) == 1:
        raise ValueError(f"embedding token {token!r} is a word of CLIP's vocabulary (id {ids[0]}): using it would "
                         "replace that word in every prompt; pass token= another name, e.g. '<name>'")  # fmt: skip
    clash = next((t for t in loaded if t.lower() == token.lower() and t != token), None)
    if clash is not None:
        raise ValueError(f"embedding token {token!r} differs only in case from the loaded {clash!r} "
                         "(tokens match case-insensitively); pass token= another name")  # fmt: skip
    return token


def vectors_for_model(file: EmbeddingFile, family: Family, widths: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """The file's vectors for each of the model's text encoders (`widths`, in the family's order), checked:
    an SDXL file gives each encoder its own set (`SDXL_KEYS`), a one-encoder file needs a one-encoder model."""
    sdxl_model = any(t.diffusers_folder == "text_encoder_2" for t in family.text)
    sdxl_file = "" not in file.vectors
    model = f"this {family.name!r} model (text encoder width{'s' * (len(widths) > 1)} {', '.join(map(str, widths))})"
    if sdxl_file and not sdxl_model:
        raise ValueError(f"{file.path}: an SDXL embedding ({file.described}) on {model}, which is not an SDXL "
                         "model; use an embedding made for this model's family")  # fmt: skip
    if not sdxl_file and sdxl_model:
        width = file.vectors[""].shape[1]
        made_for = KNOWN_WIDTHS.get(width, "a one-encoder model")
        raise ValueError(f"{file.path}: an embedding for one text encoder ({file.described}; {made_for}) on {model}, "
                         "which needs SDXL's clip_l and clip_g vectors; use an SDXL embedding")  # fmt: skip
    keys = [SDXL_KEYS[t.diffusers_folder] for t in family.text] if sdxl_file else [""]
    out = []
    for key, width in zip(keys, widths, strict=True):
        v = file.vectors[key]
        if v.shape[1] != width:
            made_for = KNOWN_WIDTHS.get(v.shape[1])
            raise ValueError(f"{file.path}: {key or 'the'} vectors are {v.shape[1]} wide"
                             f"{f' (made for {made_for})' if made_for else ''} but {model} needs {width}; "
                             "use an embedding made for this model's family")  # fmt: skip
        out.append(v)
    return tuple(out)


# ------------------------------------------------------------------ the table a model keeps
class Embeddings:
    """The loaded embeddings: token -> one `(n, width)` tensor per text encoder. Prompts find tokens
    case-insensitively, as whole words (`pattern`), longest first."""

    def __init__(self) -> None:
        self._vectors: dict[str, tuple[torch.Tensor, ...]] = {}

    def __contains__(self, token: object) -> bool:
        return token in self._vectors

    def __iter__(self):
        return iter(self._vectors)

    def __len__(self) -> int:
        return len(self._vectors)

    def add(self, token: str, vectors: tuple[torch.Tensor, ...]) -> None:
        """Load `vectors` (one `(n, width)` tensor per text encoder) under `token`, replacing any already there.

            sd.load_embedding("EasyNegative.safetensors")
        """
        self._vectors[token] = vectors

    def remove(self, token: str) -> None:
        """Forget the embedding loaded under `token` (ValueError when none is).

            sd.unload_embedding("EasyNegative")
        """
        if token not in self._vectors:
            raise ValueError(f"no embedding is loaded for token {token!r}; loaded: {sorted(self._vectors)}")
        del self._vectors[token]

    def for_encoder(self, index: int) -> dict[str, torch.Tensor]:
        """Encoder `index`'s vectors by lower-cased token (what `pattern` matches)."""
        return {t.lower(): v[index] for t, v in self._vectors.items()}

    def pattern(self) -> re.Pattern | None:
        """A regex that finds any loaded token as a whole word, case-insensitively; None if none is loaded.
        Longer tokens come first, so "<cat-toy-2>" is not read as "<cat-toy>" followed by "-2>"."""
        if not self._vectors:
            return None
        names = "|".join(re.escape(t) for t in sorted(self._vectors, key=len, reverse=True))
        return re.compile(rf"(?<!\w)(?:{names})(?!\w)", re.IGNORECASE)
